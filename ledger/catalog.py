"""The node's event types, registered in :data:`REGISTRY`.

Tags are the seed's words.  Adding a field means a new version plus an upcaster
from the old one; a tag is never reused for a different meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.events import EventRegistry

REGISTRY = EventRegistry()
"""The registry every node ledger decodes with."""


@REGISTRY.register("ledger.genesis")
@dataclass(frozen=True, slots=True)
class LedgerGenesis:
    """Record 0 of every ledger: who signs it and what its checkpoints are called."""

    origin: str
    signing_key: bytes
    format: int


def _identity_v1_to_v2(fields: dict[str, object]) -> dict[str, object]:
    # v1 always had a mesh IP, and kept the endpoint only in the node's own membership
    # record, which the fold still reads.  A v1 record that says otherwise is not one.
    if "endpoint" in fields:
        raise ValueError("unexpected fields ['endpoint']: v1 had none")
    if "mesh_ip" in fields and fields["mesh_ip"] is None:
        raise ValueError("mesh_ip is nil: a v1 identity always had one")
    return {**fields, "endpoint": None}  # a missing or odd field: v2's checks name it


@REGISTRY.register("node.identity", 2, upcasters={1: _identity_v1_to_v2})
@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """The node this ledger belongs to.

    ``mesh_ip`` is None for a node waiting to be joined: its address comes with its own
    membership record (``mesh.member_added`` under its name), which the Genesis ceremony
    appends.  ``endpoint`` is where peers reach it on the underlay, if known.
    """

    name: str
    signing_key: bytes
    wg_public_key: bytes
    mesh_ip: str | None
    role: str
    endpoint: str | None = None


def _member_v1_to_v2(fields: dict[str, object]) -> dict[str, object]:
    unexpected = sorted(set(fields) & {"joined_ns", "approved_by"})
    if unexpected:
        raise ValueError(f"unexpected fields {unexpected}: v1 had none")
    return {**fields, "joined_ns": None, "approved_by": None}


@REGISTRY.register("mesh.member_added", 2, upcasters={1: _member_v1_to_v2})
@dataclass(frozen=True, slots=True)
class MemberAdded:
    """A node joined the mesh (the node itself at init, peers after a ceremony).

    ``joined_ns`` and ``approved_by``: when, by the approving node's clock, and by which
    node it was admitted -- the same on every member's ledger, so that every nodes.jsonl
    says the same (None: a founding member, joined when its record was written)."""

    name: str
    signing_key: bytes
    wg_public_key: bytes
    mesh_ip: str
    endpoint: str | None
    role: str
    joined_ns: int | None = None
    approved_by: str | None = None


def _removed_v1_to_v2(fields: dict[str, object]) -> dict[str, object]:
    unexpected = sorted(set(fields) & {"removed_ns", "removed_by"})
    if unexpected:
        raise ValueError(f"unexpected fields {unexpected}: v1 had none")
    return {**fields, "removed_ns": None, "removed_by": None}


@REGISTRY.register("mesh.member_removed", 2, upcasters={1: _removed_v1_to_v2})
@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """A node left the mesh: ``removed_ns`` and ``removed_by`` say when (by the removing
    node's clock) and which node removed it (None: recorded before they were kept)."""

    name: str
    reason: str
    removed_ns: int | None = None
    removed_by: str | None = None


@REGISTRY.register("pd.declared")
@dataclass(frozen=True, slots=True)
class PdDeclared:
    """A protection domain exists, as the system description declares it."""

    name: str
    priority: int


@REGISTRY.register("cap.granted", signed=True)
@dataclass(frozen=True, slots=True)
class CapGranted:
    """pd-ledger granted a capability; the record carries pd-ledger's signature.

    ``parent`` is the capability it was derived from (None for one minted from
    the system description); ``rights`` never exceed the parent's; ``via`` says how
    it came to be (system, mint, copy, transfer).
    """

    cap_id: int
    holder: str
    obj: str
    rights: tuple[str, ...]
    badge: int | None
    parent: int | None
    via: str


ROLES = ("hub", "node", "cloud")
RIGHTS = ("read", "write", "grant", "grant-reply")


@REGISTRY.register("cap.moved", signed=True)
@dataclass(frozen=True, slots=True)
class CapMoved:
    """A capability changed holder, keeping its id, rights and place in the tree."""

    cap_id: int
    from_holder: str
    to_holder: str


@REGISTRY.register("cap.deleted")
@dataclass(frozen=True, slots=True)
class CapDeleted:
    """A capability was deleted; its children now hang from its parent."""

    cap_id: int
    holder: str
    reason: str


@REGISTRY.register("cap.revoked")
@dataclass(frozen=True, slots=True)
class CapRevoked:
    """Every descendant of ``cap_id`` was deleted (``descendants`` of them); it stays."""

    cap_id: int
    descendants: int


@REGISTRY.register("pd.restarted")
@dataclass(frozen=True, slots=True)
class PdRestarted:
    """A PD's handler raised; it was restarted from its ledger state."""

    name: str
    reason: str


@REGISTRY.register("pd.failed")
@dataclass(frozen=True, slots=True)
class PdFailed:
    """A PD kept crashing and was stopped; the node runs on without it."""

    name: str
    reason: str


@REGISTRY.register("pd.reaped")
@dataclass(frozen=True, slots=True)
class PdReaped:
    """A PD's work is over (pd-genesis after a ceremony): all its caps are gone."""

    name: str
    reason: str


@REGISTRY.register("pd.spawned")
@dataclass(frozen=True, slots=True)
class PdSpawned:
    """A reaped PD runs again, for a new ceremony."""

    name: str
    reason: str


@REGISTRY.register("wg.interface")
@dataclass(frozen=True, slots=True)
class WgInterface:
    """The node's WireGuard interface, as it should be: its name and listen port.

    Its address is the node's mesh IP (``node.identity``); its private key stays in
    ``DIR/wireguard.key`` (only the public key is ever in the ledger).
    """

    interface: str
    listen_port: int


@REGISTRY.register("wg.peer_added")
@dataclass(frozen=True, slots=True)
class WgPeerAdded:
    """A WireGuard peer this node should have: the tunnel to one mesh member.

    ``allowed_ips`` follow the hub rule when the peer is added: a spoke's entry for the
    hub covers the whole mesh (10.8.0.0/24), every other entry the peer's own /32.
    """

    name: str
    wg_public_key: bytes
    endpoint: str | None
    mesh_ip: str
    role: str
    allowed_ips: tuple[str, ...]
    keepalive: int


@REGISTRY.register("wg.peer_removed")
@dataclass(frozen=True, slots=True)
class WgPeerRemoved:
    """A WireGuard peer this node should no longer have."""

    name: str
    reason: str


@REGISTRY.register("wg.repaired")
@dataclass(frozen=True, slots=True)
class WgRepaired:
    """The device had drifted from the desired state, and was set right: what drifted,
    what was found, and what was done."""

    interface: str
    what: str
    found: str
    repair: str


@REGISTRY.register("wg.tunnel_failed")
@dataclass(frozen=True, slots=True)
class WgTunnelFailed:
    """The tunnel could not be brought up (or back): the backend exited at once, its UAPI
    socket answered nonsense, ...; it is tried again."""

    interface: str
    reason: str


@REGISTRY.register("vm.pool")
@dataclass(frozen=True, slots=True)
class VmPool:
    """The node's guest capacity: vCPUs it will hand out, RAM it keeps for itself (the
    rest of the host's is the guests'), and how guests are run (``auto``: KVM when
    ``/dev/kvm`` works, else TCG; or one forced)."""

    vcpus: int
    reserve_mib: int
    accel: str


@REGISTRY.register("vm.defined")
@dataclass(frozen=True, slots=True)
class VmDefined:
    """A guest exists (not started): its profile, its size, its disk (a base image and
    the guest's own qcow2 overlay on it; both None for a disk-less guest)."""

    name: str
    profile: str
    vcpus: int
    ram_mib: int
    image: str | None
    overlay: str | None


@REGISTRY.register("vm.started")
@dataclass(frozen=True, slots=True)
class VmStarted:
    """Its QEMU process runs: the pid, the QMP socket it is controlled through, and the
    accelerator chosen for this host."""

    name: str
    pid: int
    qmp: str
    accel: str


@REGISTRY.register("vm.paused")
@dataclass(frozen=True, slots=True)
class VmPaused:
    name: str
    why: str


@REGISTRY.register("vm.resumed")
@dataclass(frozen=True, slots=True)
class VmResumed:
    name: str
    why: str


@REGISTRY.register("vm.stopped")
@dataclass(frozen=True, slots=True)
class VmStopped:
    """Its QEMU process ended when asked: ``how`` is ``powerdown`` (the guest went), or
    ``quit`` (it did not within the timeout)."""

    name: str
    how: str


@REGISTRY.register("vm.lost")
@dataclass(frozen=True, slots=True)
class VmLost:
    """Its QEMU process died unasked (or was gone when the node came back)."""

    name: str
    reason: str


@REGISTRY.register("vm.reattached")
@dataclass(frozen=True, slots=True)
class VmReattached:
    """After the node restarted, its QEMU process was found running and taken back."""

    name: str
    pid: int


@REGISTRY.register("vm.destroyed")
@dataclass(frozen=True, slots=True)
class VmDestroyed:
    name: str


@REGISTRY.register("vm.balloon_set")
@dataclass(frozen=True, slots=True)
class VmBalloonSet:
    """The balloon's target (what QEMU reports back, without a guest driver, never moves)."""

    name: str
    target_mib: int


@REGISTRY.register("ledger.recovered")
@dataclass(frozen=True, slots=True)
class LedgerRecovered:
    """An operator dropped a damaged last batch (``ppn ledger recover --drop-last-batch``).

    What was dropped is named, never guessed at: where it was, how many records its
    checkpoint said it held (-1: unreadable), how many bytes and their SHA-256 (a
    copy is kept in ``dropped/``), what the reader found, and the size the anchor
    had vouched for -- above the new size if the batch had been acknowledged.
    """

    segment: str
    offset: int
    first_seq: int
    records: int
    dropped_bytes: int
    dropped_sha256: bytes
    reason: str
    anchor_size: int
    kept_as: str


@REGISTRY.register("genesis.opened")
@dataclass(frozen=True, slots=True)
class GenesisOpened:
    """A pairing ceremony began: as the new node (``joiner``, listening on ``address``)
    or as the approving node (``approver``, connecting to ``address``), for ``window``
    seconds, with a code of ``length`` symbols (the code itself is never recorded)."""

    ceremony: int
    role: str
    address: str
    window: int
    length: int


@REGISTRY.register("genesis.completed")
@dataclass(frozen=True, slots=True)
class GenesisCompleted:
    """The ceremony completed with node ``peer``: ``transcript`` is the SHA-256 of every
    frame both sides exchanged (never the code or a key)."""

    ceremony: int
    peer: str
    transcript: bytes


@REGISTRY.register("genesis.aborted")
@dataclass(frozen=True, slots=True)
class GenesisAborted:
    """The ceremony ended without completing (``code mismatch``, a protocol error, the
    connection lost, ...); its code is dead."""

    ceremony: int
    reason: str


@REGISTRY.register("genesis.expired")
@dataclass(frozen=True, slots=True)
class GenesisExpired:
    """The ceremony's window passed before it completed; nothing was added."""

    ceremony: int


DISPATCH_OBJECTS = ("vm.control", "vm.query")
"""What a node admitted by a ceremony lets its approving node do on it (pd-fleet)."""


@REGISTRY.register("mesh.dispatch_granted", signed=True)
@dataclass(frozen=True, slots=True)
class DispatchGranted:
    """Authority for the fleet, from a ceremony: node ``grantee`` may dispatch work
    (``objects``) to node ``target``.  Both nodes record it (the approving node as the
    grantee, the new node as the target), each signed by its own pd-ledger, tied to the
    ceremony by its transcript's hash."""

    grantee: str
    target: str
    objects: tuple[str, ...]
    transcript: bytes


@REGISTRY.register("genesis.policy")
@dataclass(frozen=True, slots=True)
class GenesisPolicy:
    """How many pairing ceremonies may begin on this node in an hour (``ppn node init
    --pairings-per-hour``; 10 unless told)."""

    per_hour: int
