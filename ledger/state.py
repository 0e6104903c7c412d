"""The node state as a fold over the ledger: ``apply(state, event, seq, ts_ns) -> state``.

``apply`` is deterministic and reads nothing but its arguments; replay must never
fail, so it validates nothing (commands validate before they append) and is total:
an event that does not fit the state -- a grant of a cap id that exists or under a
parent that does not, a move, delete or revoke of a cap that is gone -- changes
nothing and is counted as ``"<tag> (inapplicable)"`` in ``event_counts``.  So no
sequence of appends can leave a log that its own fold cannot replay.  For speed
on million-event replays it updates the state it is given and returns it: treat a
state as consumed by ``apply`` and call :meth:`State.copy` to keep an old one.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, field, replace
from typing import Any

from ledger import catalog as c
from ledger.vms import TRANSITIONS, Vm
from ledger.vms import refused as vm_refused


@dataclass(slots=True)
class Member:
    """One line of nodes.jsonl."""

    name: str
    signing_key: bytes
    wg_public_key: bytes
    mesh_ip: str
    endpoint: str | None
    role: str
    joined_seq: int  # where this ledger recorded it (differs from node to node)
    joined_ts_ns: int  # when it was admitted (the approving node's clock)
    approved_by: str | None = None  # the node that admitted it (None: a founder)


@dataclass(slots=True)
class Peer:
    """One WireGuard peer of the desired state."""

    name: str
    wg_public_key: bytes
    endpoint: str | None
    mesh_ip: str
    role: str
    allowed_ips: tuple[str, ...]
    keepalive: int
    added_seq: int


@dataclass(slots=True)
class Cap:
    """A capability as the ledger granted it."""

    cap_id: int
    holder: str
    obj: str
    rights: tuple[str, ...]
    badge: int | None
    parent: int | None
    via: str
    granted_seq: int
    sig: bytes | None = None


@dataclass(slots=True)
class State:
    """Everything the ledger knows, as of record ``seq`` (-1: nothing applied)."""

    seq: int = -1
    origin: str | None = None
    signing_key: bytes | None = None
    node: dict[str, Any] | None = None
    pds: dict[str, int] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    caps: dict[int, Cap] = field(default_factory=dict)
    event_counts: dict[str, int] = field(default_factory=dict)
    pd_status: dict[str, str] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    next_cap_id: int = 1
    objects: dict[str, str] = field(default_factory=dict)
    """Object -> the PD serving it: whoever got its first original grant; never changes."""
    wg: dict[str, Any] | None = None
    """The node's WireGuard interface as it should be: ``interface``, ``listen_port``."""
    peers: dict[str, Peer] = field(default_factory=dict)
    """The WireGuard peers it should have, by name."""
    vm_pool: dict[str, Any] | None = None
    """The guest capacity: ``vcpus``, ``reserve_mib``, ``accel``."""
    vms: dict[str, Vm] = field(default_factory=dict)
    """The guests, by name (a destroyed one is gone)."""
    removed: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    """Members removed, by name: (when, by whom) -- an addition older than its removal,
    replayed, is refused."""
    genesis: dict[str, Any] = field(default_factory=lambda: dict(GENESIS_EMPTY))
    dispatch: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Authority for the fleet from ceremonies, by ``grantee->target``: objects, seq."""
    """Pairing ceremonies: ``next`` (the next one's number), ``open`` (the one under way:
    ceremony, role, address, window, length, opened_ns; or None), ``opened_ns`` (when the
    last :data:`GENESIS_RECENT` began: a node refuses too many an hour), ``last`` (how the
    latest ended: ceremony, outcome, reason, peer)."""
    # Derived from ``caps`` (the derivation tree's edges); rebuilt, never stored.
    children: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def failed_pds(self) -> set[str]:
        return {p for p, s in self.pd_status.items() if s != "running"}

    def copy(self) -> State:
        return copy.deepcopy(self)

    def to_obj(self) -> dict[str, Any]:
        """Plain data (msgpack-able), in a deterministic order."""
        return {
            "seq": self.seq, "origin": self.origin, "signing_key": self.signing_key,
            "node": self.node, "pds": dict(sorted(self.pds.items())),
            "members": [list(astuple(m)) for _, m in sorted(self.members.items())],
            "caps": [list(astuple(k)) for _, k in sorted(self.caps.items())],
            "event_counts": dict(sorted(self.event_counts.items())),
            "pd_status": dict(sorted(self.pd_status.items())),
            "restarts": dict(sorted(self.restarts.items())),
            "next_cap_id": self.next_cap_id,
            "objects": dict(sorted(self.objects.items())),
            "wg": self.wg,
            "peers": [list(astuple(p)) for _, p in sorted(self.peers.items())],
            "vm_pool": self.vm_pool,
            "vms": [list(astuple(v)) for _, v in sorted(self.vms.items())],
            "genesis": self.genesis,
            "removed": {k: list(v) for k, v in sorted(self.removed.items())},
            "dispatch": dict(sorted(self.dispatch.items())),
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> State:
        members = [Member(*m) for m in obj["members"]]
        caps = [Cap(k[0], k[1], k[2], tuple(k[3]), *k[4:]) for k in obj["caps"]]
        node = dict(obj["node"]) if obj["node"] is not None else None
        if node is not None and "endpoint" not in node:
            # A snapshot from before node.identity v2: the endpoint was only in the
            # node's own membership, where replaying finds it too.
            me = next((m for m in members if m.name == node.get("name")), None)
            node["endpoint"] = None if me is None else me.endpoint
        state = cls(seq=obj["seq"], origin=obj["origin"], signing_key=obj["signing_key"],
                    node=node,
                    pds=dict(obj["pds"]), members={m.name: m for m in members},
                    caps={k.cap_id: k for k in caps}, event_counts=dict(obj["event_counts"]),
                    pd_status=dict(obj["pd_status"]), restarts=dict(obj["restarts"]),
                    next_cap_id=obj["next_cap_id"], objects=dict(obj["objects"]),
                    wg=dict(obj["wg"]) if obj.get("wg") is not None else None,
                    peers={p[0]: Peer(p[0], p[1], p[2], p[3], p[4], tuple(p[5]), p[6], p[7])
                           for p in obj.get("peers", [])},
                    vm_pool=dict(obj["vm_pool"]) if obj.get("vm_pool") is not None else None,
                    vms={v[0]: Vm(*v) for v in obj.get("vms", [])},
                    genesis=_genesis_from(obj.get("genesis")),
                    removed={k: (v[0], v[1]) for k, v in obj.get("removed", {}).items()},
                    dispatch={k: dict(v) for k, v in obj.get("dispatch", {}).items()})
        for k in caps:
            if k.parent is not None:
                state.children.setdefault(k.parent, []).append(k.cap_id)
        return state

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly view: bytes as base64."""
        out: dict[str, Any] = jsonable(self.to_obj())
        return out


GENESIS_RECENT = 64
GENESIS_EMPTY: dict[str, Any] = {"next": 1, "open": None, "opened_ns": [], "last": None,
                                 "per_hour": 10}


def _genesis_from(obj: Any) -> dict[str, Any]:
    if obj is None:  # a snapshot from before the ceremony's events
        return {**GENESIS_EMPTY, "opened_ns": []}
    return {"next": obj["next"], "open": None if obj["open"] is None else dict(obj["open"]),
            "opened_ns": list(obj["opened_ns"]),
            "last": None if obj["last"] is None else dict(obj["last"]),
            "per_hour": obj.get("per_hour", GENESIS_EMPTY["per_hour"])}


def jsonable(obj: Any) -> Any:
    """Plain data as JSON can hold it: bytes as base64, tuples as lists."""
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


Applier = Callable[[State, Any, int, int, bytes | None], "bool | None"]
"""Applies one event; returns False if it did not fit the state (and changed nothing)."""

INAPPLICABLE = " (inapplicable)"


def _genesis(s: State, e: c.LedgerGenesis, seq: int, ts: int, sig: bytes | None) -> None:
    s.origin, s.signing_key = e.origin, e.signing_key


def _identity(s: State, e: c.NodeIdentity, seq: int, ts: int, sig: bytes | None) -> None:
    me = s.members.get(e.name)  # its own membership, if (oddly) recorded before it
    s.node = {"name": e.name, "signing_key": e.signing_key, "wg_public_key": e.wg_public_key,
              "mesh_ip": e.mesh_ip if me is None else me.mesh_ip, "role": e.role,
              "endpoint": e.endpoint if me is None or me.endpoint is None else me.endpoint}


def _member_added(s: State, e: c.MemberAdded, seq: int, ts: int, sig: bytes | None) -> None:
    s.members[e.name] = Member(e.name, e.signing_key, e.wg_public_key, e.mesh_ip,
                               e.endpoint, e.role, seq,
                               ts if e.joined_ns is None else e.joined_ns, e.approved_by)
    if s.node is not None and e.name == s.node["name"]:
        # The node's own membership: how a node waiting to be joined gets its address.
        # A new dict: a trial state (try_state) must never write into the live one's.
        s.node = {**s.node, "mesh_ip": e.mesh_ip,
                  "endpoint": e.endpoint if e.endpoint is not None else s.node.get("endpoint")}


def _member_removed(s: State, e: c.MemberRemoved, seq: int, ts: int, sig: bytes | None) -> None:
    was = s.members.pop(e.name, None)
    at = ts if e.removed_ns is None else e.removed_ns
    old = s.removed.get(e.name)
    if was is not None or (e.removed_ns is not None and (old is None or old[0] < at)):
        # (a removal of a node this ledger never had is kept too: a tombstone, so that
        # an older admission, arriving late or replayed, never brings it in)
        s.removed[e.name] = (at, e.removed_by)


def _genesis_opened(s: State, e: c.GenesisOpened, seq: int, ts: int,
                    sig: bytes | None) -> bool | None:
    g = s.genesis
    if g["open"] is not None or e.ceremony != g["next"]:
        return False
    # New dicts and lists: a trial state (try_state) must never write into the live one's.
    s.genesis = {"next": e.ceremony + 1, "last": g["last"], "per_hour": g["per_hour"],
                 "open": {"ceremony": e.ceremony, "role": e.role, "address": e.address,
                          "window": e.window, "length": e.length, "opened_ns": ts},
                 "opened_ns": [*g["opened_ns"], ts][-GENESIS_RECENT:]}
    return None


def _genesis_closed(s: State, e: Any, seq: int, ts: int, sig: bytes | None) -> bool | None:
    g = s.genesis
    if g["open"] is None or g["open"]["ceremony"] != e.ceremony:
        return False
    outcome = {c.GenesisCompleted: "completed", c.GenesisAborted: "aborted",
               c.GenesisExpired: "expired"}[type(e)]
    s.genesis = {**g, "open": None,
                 "last": {"ceremony": e.ceremony, "role": g["open"]["role"],
                          "outcome": outcome, "reason": getattr(e, "reason", None),
                          "peer": getattr(e, "peer", None), "ended_ns": ts}}
    return None


def _genesis_policy(s: State, e: c.GenesisPolicy, seq: int, ts: int,
                    sig: bytes | None) -> None:
    s.genesis = {**s.genesis, "per_hour": e.per_hour}


def _dispatch(s: State, e: c.DispatchGranted, seq: int, ts: int, sig: bytes | None) -> None:
    s.dispatch[f"{e.grantee}->{e.target}"] = {"grantee": e.grantee, "target": e.target,
                                              "objects": list(e.objects), "seq": seq}


def _wg_interface(s: State, e: c.WgInterface, seq: int, ts: int, sig: bytes | None) -> None:
    s.wg = {"interface": e.interface, "listen_port": e.listen_port}


def _wg_peer_added(s: State, e: c.WgPeerAdded, seq: int, ts: int, sig: bytes | None) -> None:
    s.peers[e.name] = Peer(e.name, e.wg_public_key, e.endpoint, e.mesh_ip, e.role,
                           tuple(e.allowed_ips), e.keepalive, seq)


def _wg_peer_removed(s: State, e: c.WgPeerRemoved, seq: int, ts: int,
                     sig: bytes | None) -> None:
    s.peers.pop(e.name, None)


def _vm_pool(s: State, e: c.VmPool, seq: int, ts: int, sig: bytes | None) -> None:
    s.vm_pool = {"vcpus": e.vcpus, "reserve_mib": e.reserve_mib, "accel": e.accel}


def _vm_defined(s: State, e: c.VmDefined, seq: int, ts: int, sig: bytes | None) -> bool:
    if e.name in s.vms:
        return False
    s.vms[e.name] = Vm(e.name, e.profile, e.vcpus, e.ram_mib, e.image, e.overlay,
                       "defined", since_ns=ts, seq=seq)
    return True


VM_OPS: dict[type[Any], str] = {
    c.VmStarted: "start", c.VmPaused: "pause", c.VmResumed: "resume", c.VmStopped: "stop",
    c.VmLost: "lose", c.VmReattached: "reattach", c.VmDestroyed: "destroy"}
"""Lifecycle event -> the operation of :data:`ledger.vms.TRANSITIONS` it records."""


def _vm_step(s: State, e: Any, seq: int, ts: int, sig: bytes | None) -> bool:
    vm = s.vms.get(e.name)
    op = VM_OPS[type(e)]
    if vm_refused(op, e.name, None if vm is None else vm.state) is not None:
        return False
    assert vm is not None
    to = TRANSITIONS[op][1]
    if to is None:
        del s.vms[e.name]
        return True
    if type(e) is c.VmStarted:
        vm = replace(vm, pid=e.pid, qmp=e.qmp, accel=e.accel)
    elif type(e) is c.VmReattached:
        vm = replace(vm, pid=e.pid)
    elif to in ("stopped", "lost"):
        vm = replace(vm, pid=None)
    s.vms[e.name] = replace(vm, state=to or vm.state, since_ns=ts if to else vm.since_ns,
                            seq=seq if to else vm.seq)
    return True


def _vm_balloon(s: State, e: c.VmBalloonSet, seq: int, ts: int, sig: bytes | None) -> bool:
    vm = s.vms.get(e.name)
    if vm is None:
        return False
    s.vms[e.name] = replace(vm, balloon_mib=e.target_mib)
    return True


def _pd_declared(s: State, e: c.PdDeclared, seq: int, ts: int, sig: bytes | None) -> None:
    # A PD declared again keeps its status: a declaration states a priority and never
    # brings a failed or reaped PD back (only pd.spawned does that).
    s.pds[e.name] = e.priority
    s.pd_status.setdefault(e.name, "running")


def _cap_granted(s: State, e: c.CapGranted, seq: int, ts: int, sig: bytes | None) -> bool:
    if _unfit_grant(s, e) is not None:
        return False
    s.caps[e.cap_id] = Cap(e.cap_id, e.holder, e.obj, e.rights, e.badge, e.parent, e.via,
                           seq, sig)
    if e.parent is not None:
        s.children.setdefault(e.parent, []).append(e.cap_id)
    else:
        s.objects.setdefault(e.obj, e.holder)
    s.next_cap_id = max(s.next_cap_id, e.cap_id + 1)
    return True


def _cap_moved(s: State, e: c.CapMoved, seq: int, ts: int, sig: bytes | None) -> bool:
    cap = s.caps.get(e.cap_id)
    if cap is None:
        return False
    cap.holder, cap.sig = e.to_holder, sig
    return True


def _remove(s: State, cap_id: int) -> Cap | None:
    cap = s.caps.pop(cap_id, None)
    if cap is not None and cap.parent is not None:
        siblings = s.children.get(cap.parent)
        if siblings is not None and cap_id in siblings:
            siblings.remove(cap_id)
    return cap


def _cap_deleted(s: State, e: c.CapDeleted, seq: int, ts: int, sig: bytes | None) -> bool:
    cap = _remove(s, e.cap_id)
    if cap is None:
        return False
    for child in s.children.pop(e.cap_id, []):  # children move up to the deleted cap's parent
        moved = s.caps.get(child)
        if moved is None:
            continue
        moved.parent = cap.parent
        if cap.parent is not None:
            s.children.setdefault(cap.parent, []).append(child)
    return True


def _cap_revoked(s: State, e: c.CapRevoked, seq: int, ts: int, sig: bytes | None) -> bool:
    if e.cap_id not in s.caps:
        return False
    stack = s.children.pop(e.cap_id, [])
    while stack:
        child = stack.pop()
        s.caps.pop(child, None)
        stack.extend(s.children.pop(child, []))
    return True


# --------------------------------------------------------------------- PD status
PD_TRANSITIONS: dict[tuple[str, type[Any]], str] = {
    ("running", c.PdRestarted): "running",
    ("running", c.PdFailed): "failed",
    ("running", c.PdReaped): "reaped",
    ("reaped", c.PdSpawned): "running",
    ("failed", c.PdSpawned): "running",
}
"""A PD's status, by (status now, lifecycle event) -> status after.  A PD is
``running`` from its declaration.  A pair missing here is not a transition: the
lifecycle refuses it (:func:`pd_transition`) and the fold changes nothing."""


def pd_transition(s: State, pd: str, event_type: type[Any]) -> str | None:
    """Why ``event_type`` cannot happen to ``pd`` now, or None if it can."""
    status = s.pd_status.get(pd)
    if status is not None and (status, event_type) in PD_TRANSITIONS:
        return None
    tag = c.REGISTRY.type_of_class(event_type).tag
    allowed = sorted(a for a, t in PD_TRANSITIONS if t is event_type)
    return (f"{tag} does not apply to {pd}: its status is {status or 'undeclared'}, "
            f"and {tag} needs {' or '.join(allowed)}")


def _lifecycle(s: State, e: Any) -> bool:
    to = PD_TRANSITIONS.get((s.pd_status.get(e.name, ""), type(e)))
    if to is None:
        return False
    s.pd_status[e.name] = to
    return True


def _pd_restarted(s: State, e: c.PdRestarted, seq: int, ts: int, sig: bytes | None) -> bool:
    if not _lifecycle(s, e):
        return False
    s.restarts[e.name] = s.restarts.get(e.name, 0) + 1
    return True


def _pd_failed(s: State, e: c.PdFailed, seq: int, ts: int, sig: bytes | None) -> bool:
    return _lifecycle(s, e)


def _pd_reaped(s: State, e: c.PdReaped, seq: int, ts: int, sig: bytes | None) -> bool:
    if not _lifecycle(s, e):
        return False
    for cap in [k for k in s.caps.values() if k.holder == e.name]:
        if cap.cap_id in s.caps:
            _cap_revoked(s, c.CapRevoked(cap.cap_id, 0), seq, ts, None)
            _cap_deleted(s, c.CapDeleted(cap.cap_id, e.name, "reaped"), seq, ts, None)
    return True


def _pd_spawned(s: State, e: c.PdSpawned, seq: int, ts: int, sig: bytes | None) -> bool:
    return _lifecycle(s, e)


# --------------------------------------------------------------------- fitting
def _unfit_grant(s: State, e: c.CapGranted) -> str | None:
    if e.cap_id in s.caps:
        return f"cap #{e.cap_id} exists already"
    if e.parent is not None and e.parent not in s.caps:
        return f"its parent cap #{e.parent} does not exist"
    return None


def _unfit_cap(s: State, e: Any) -> str | None:
    return None if e.cap_id in s.caps else f"cap #{e.cap_id} does not exist"


def _unfit_lifecycle(s: State, e: Any) -> str | None:
    return pd_transition(s, e.name, type(e))


def _unfit_vm(s: State, e: Any) -> str | None:
    if type(e) is c.VmDefined:
        return f"VM {e.name} exists already" if e.name in s.vms else None
    vm = s.vms.get(e.name)
    if type(e) is c.VmBalloonSet:
        return None if vm is not None else f"no VM {e.name!r}"
    return vm_refused(VM_OPS[type(e)], e.name, None if vm is None else vm.state)


def unfit_genesis(s: State, e: Any) -> str | None:
    g = s.genesis
    if type(e) is c.GenesisOpened:
        if g["open"] is not None:
            return f"ceremony {g['open']['ceremony']} is still open"
        return None if e.ceremony == g["next"] else f"the next ceremony is {g['next']}"
    if g["open"] is None or g["open"]["ceremony"] != e.ceremony:
        return f"ceremony {e.ceremony} is not open"
    return None


UNFIT: dict[type[Any], Callable[[State, Any], str | None]] = {
    c.GenesisOpened: unfit_genesis, c.GenesisCompleted: unfit_genesis,
    c.GenesisAborted: unfit_genesis, c.GenesisExpired: unfit_genesis,
    c.VmDefined: _unfit_vm, c.VmBalloonSet: _unfit_vm,
    **{t: _unfit_vm for t in VM_OPS},
    c.CapGranted: _unfit_grant,
    c.CapMoved: _unfit_cap,
    c.CapDeleted: _unfit_cap,
    c.CapRevoked: _unfit_cap,
    c.PdRestarted: _unfit_lifecycle,
    c.PdFailed: _unfit_lifecycle,
    c.PdReaped: _unfit_lifecycle,
    c.PdSpawned: _unfit_lifecycle,
}
"""Events that fit only some states, and why one does not fit.  Every other event
always applies.  Each condition here is the one its applier tests."""


def unfit(state: State, events: Sequence[Any]) -> tuple[int, str] | None:
    """The first event of ``events`` (as one batch, in order) that would not apply, and
    why; None if the fold applies every one.  ``state`` is not changed."""
    conditional = [i for i, e in enumerate(events) if type(e) in UNFIT]
    if not conditional:
        return None
    if len(conditional) == 1:
        i = conditional[0]
        why = UNFIT[type(events[i])](state, events[i])
        return None if why is None else (i, why)
    if all(type(events[i]) is c.CapGranted for i in conditional):
        granted: set[int] = set()  # grants only: no cap disappears within the batch
        for i in conditional:
            e = events[i]
            if e.cap_id in state.caps or e.cap_id in granted:
                return i, f"cap #{e.cap_id} exists already"
            if e.parent is not None and e.parent not in state.caps and e.parent not in granted:
                return i, f"its parent cap #{e.parent} does not exist"
            granted.add(e.cap_id)
        return None
    trial = try_state(state, caps=True)
    for i, e in enumerate(events):
        check = UNFIT.get(type(e))
        why = check(trial, e) if check is not None else None
        if why is not None:
            return i, why
        apply(trial, e, trial.seq + 1, 0)
    return None


def try_state(state: State, *, caps: bool = False) -> State:
    """A copy to try a batch on: the small tables copied, the capability table deep only
    with ``caps`` (without, the batch must hold no event that changes capabilities)."""
    t = State(seq=state.seq, origin=state.origin, signing_key=state.signing_key,
              node=None if state.node is None else dict(state.node), pds=dict(state.pds),
              members=dict(state.members),
              wg=None if state.wg is None else dict(state.wg), peers=dict(state.peers),
              vm_pool=state.vm_pool, vms=dict(state.vms), genesis=state.genesis,
              removed=dict(state.removed), dispatch=dict(state.dispatch),
              caps=copy.deepcopy(state.caps) if caps else state.caps,
              pd_status=dict(state.pd_status), restarts=dict(state.restarts),
              next_cap_id=state.next_cap_id, objects=dict(state.objects))
    if caps:
        for k in t.caps.values():
            if k.parent is not None:
                t.children.setdefault(k.parent, []).append(k.cap_id)
    return t


APPLIERS: dict[type[Any], Applier] = {
    c.LedgerGenesis: _genesis,
    c.NodeIdentity: _identity,
    c.MemberAdded: _member_added,
    c.MemberRemoved: _member_removed,
    c.PdDeclared: _pd_declared,
    c.CapGranted: _cap_granted,
    c.CapMoved: _cap_moved,
    c.CapDeleted: _cap_deleted,
    c.CapRevoked: _cap_revoked,
    c.PdRestarted: _pd_restarted,
    c.PdFailed: _pd_failed,
    c.PdReaped: _pd_reaped,
    c.PdSpawned: _pd_spawned,
    c.WgInterface: _wg_interface,
    c.WgPeerAdded: _wg_peer_added,
    c.WgPeerRemoved: _wg_peer_removed,
    c.VmPool: _vm_pool,
    c.DispatchGranted: _dispatch,
    c.GenesisPolicy: _genesis_policy,
    c.GenesisOpened: _genesis_opened,
    c.GenesisCompleted: _genesis_closed,
    c.GenesisAborted: _genesis_closed,
    c.GenesisExpired: _genesis_closed,
    c.VmDefined: _vm_defined,
    c.VmBalloonSet: _vm_balloon,
    **{t: _vm_step for t in VM_OPS},
}
def _ignore(s: State, e: Any, seq: int, ts: int, sig: bytes | None) -> None:
    pass


_DISPATCH: dict[type[Any], tuple[Applier, str]] = {
    et.cls: (APPLIERS.get(et.cls, _ignore), et.tag) for et in c.REGISTRY}
"""Per event class: its applier and its tag (one lookup per event on replay)."""


def apply(state: State, event: Any, seq: int, ts_ns: int, sig: bytes | None = None) -> State:
    """Fold one event (record ``seq``, its grant signature ``sig``) into ``state``."""
    apply_items(state, ((seq, ts_ns, event, sig, 0, 0),))
    return state


def apply_items(state: State, items: Iterable[tuple[int, int, Any, bytes | None, int, int]],
                start: int = 0) -> int:
    """Fold a pass's committed ``(seq, ts_ns, event, sig, _, _)`` items from seq ``start``.

    The same as :func:`apply` on each, in one loop; returns how many were applied.
    """
    dispatch, counts = _DISPATCH, state.event_counts
    n = 0
    seq = state.seq
    for seq, ts_ns, event, sig, _a, _b in items:
        if seq < start:
            continue
        try:
            handler, tag = dispatch[type(event)]
        except KeyError:
            handler, tag = _ignore, type(event).__name__
        if handler(state, event, seq, ts_ns, sig) is False:
            tag += INAPPLICABLE
        counts[tag] = counts.get(tag, 0) + 1
        n += 1
    if n:
        state.seq = seq
    return n


def fold(entries: Iterable[tuple[int, int, Any, bytes | None]],
         state: State | None = None) -> State:
    """Fold ``(seq, ts_ns, event, signature)`` entries, from ``state`` or from empty."""
    s = State() if state is None else state
    for seq, ts, event, sig in entries:
        apply(s, event, seq, ts, sig)
    return s
