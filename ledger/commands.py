"""Commands for the events a PD journals: each checks one event against the state.

A PD's core returns events to append; before any is appended the kernel asks
:func:`check` whether the event is one a command would make: well typed (the
registry's field check), within the format's limits, and sensible against the
current state (a member added once, removed only while it is one).  An event
type with no command here cannot be journalled by a PD at all: capability,
lifecycle, ledger and identity events come from their own commands (``caps``,
the lifecycle, ``Ledger.create``, ``ppn node init``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

from ledger.catalog import (
    DISPATCH_OBJECTS,
    REGISTRY,
    ROLES,
    DispatchGranted,
    GenesisAborted,
    GenesisCompleted,
    GenesisExpired,
    GenesisOpened,
    MemberAdded,
    MemberRemoved,
    VmBalloonSet,
    VmDefined,
    VmDestroyed,
    VmLost,
    VmPaused,
    VmReattached,
    VmResumed,
    VmStarted,
    VmStopped,
    WgInterface,
    WgPeerAdded,
    WgPeerRemoved,
    WgRepaired,
    WgTunnelFailed,
)
from ledger.events import EventTypeError
from ledger.state import State, apply, try_state, unfit, unfit_genesis
from ledger.vms import ACCELS as VM_ACCELS
from ledger.vms import NAME_RE as VM_NAME_RE

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
"""A node's name: 1-63 of a-z, 0-9 and '-', starting with a letter or digit (use
``fullmatch``: nothing, not even a newline, may follow)."""
MESH = ipaddress.IPv4Network("10.8.0.0/24")
MAX_REASON = 300
KEY_BYTES = 32


class EventInvalid(ValueError):
    """The event is not one a command would make; the message says what is wrong."""


def _name(value: str, what: str = "name") -> None:
    if not NAME_RE.fullmatch(value):
        raise EventInvalid(f"{what} {value[:70]!r}: use 1-63 of a-z, 0-9 and '-', starting "
                           "with a letter or digit")


def _reason(value: str) -> None:
    if len(value) > MAX_REASON or not value.isprintable():
        raise EventInvalid(f"reason: at most {MAX_REASON} printable characters")


def mesh_ip(value: str) -> ipaddress.IPv4Address:
    """A host address on the mesh (10.8.0.1 - 10.8.0.254)."""
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise EventInvalid(f"mesh IP {value[:40]!r}: not an IPv4 address") from None
    if ip not in MESH or ip in (MESH.network_address, MESH.broadcast_address):
        raise EventInvalid(f"mesh IP {value}: not a host address in {MESH}")
    return ip


def endpoint(value: str) -> tuple[ipaddress.IPv4Address, int]:
    """An underlay endpoint, ``IPv4:port``."""
    host, sep, port = value.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(host)
        plain = port.isascii() and port.isdigit() and (port == "0" or port[0] != "0")
        number = int(port) if sep and plain else -1
    except ValueError:
        number = -1
    if number < 1 or number > 65535:
        raise EventInvalid(f"endpoint {value[:60]!r}: not IPv4:PORT")
    return ip, number


def _member_added(s: State, e: MemberAdded) -> None:
    _name(e.name)
    for what, key in (("signing key", e.signing_key), ("WireGuard key", e.wg_public_key)):
        if len(key) != KEY_BYTES:
            raise EventInvalid(f"{what}: {len(key)} bytes, not {KEY_BYTES}")
    mesh_ip(e.mesh_ip)
    if e.endpoint is not None:
        endpoint(e.endpoint)
    if e.role not in ROLES:
        raise EventInvalid(f"role {e.role[:20]!r}: one of {', '.join(ROLES)}")
    if e.approved_by is not None:
        _name(e.approved_by)
    if e.joined_ns is not None and not 0 <= e.joined_ns < 1 << 63:
        raise EventInvalid(f"joined_ns {e.joined_ns}: not a time")
    if e.name in s.members:
        raise EventInvalid(f"{e.name} is a member already")
    gone = s.removed.get(e.name)
    if gone is not None and e.joined_ns is not None and e.joined_ns <= gone[0]:
        raise EventInvalid(f"{e.name} was removed after that admission")
    node = s.node or {}
    if e.name == node.get("name") and (e.signing_key, e.wg_public_key, e.role) != (
            node.get("signing_key"), node.get("wg_public_key"), node.get("role")):
        raise EventInvalid(f"{e.name} is this node: its membership must carry its own "
                           "keys and role")
    if e.name != node.get("name") and {e.signing_key, e.wg_public_key} & {
            node.get("signing_key"), node.get("wg_public_key")}:
        raise EventInvalid(f"a key of {e.name} is this node's own")
    for p in s.peers.values():  # a peer of that address must be that node (same key)
        if p.mesh_ip == e.mesh_ip and (e.name == node.get("name")
                                       or p.wg_public_key != e.wg_public_key):
            raise EventInvalid(f"mesh IP {e.mesh_ip} is {p.name}'s")
    for m in s.members.values():
        if m.mesh_ip == e.mesh_ip:
            raise EventInvalid(f"mesh IP {e.mesh_ip} is {m.name}'s")
        if e.signing_key in (m.signing_key, m.wg_public_key) or e.wg_public_key in (
                m.signing_key, m.wg_public_key):
            raise EventInvalid(f"a key of {e.name} is {m.name}'s already")
    if e.signing_key == e.wg_public_key:
        raise EventInvalid("the signing key and the WireGuard key are the same")


def _member_removed(s: State, e: MemberRemoved) -> None:
    _name(e.name)
    _reason(e.reason)
    if e.removed_by is not None:
        _name(e.removed_by)
    if e.removed_ns is not None and not 0 <= e.removed_ns < 1 << 63:
        raise EventInvalid(f"removed_ns {e.removed_ns}: not a time")
    member = s.members.get(e.name)
    if member is not None and e.removed_ns is not None and e.removed_ns <= member.joined_ts_ns:
        raise EventInvalid(f"{e.name} joined again after that removal")
    if s.node is not None and e.name == s.node.get("name"):
        raise EventInvalid(f"{e.name} is this node: it cannot remove itself")
    if e.name not in s.members:
        gone = s.removed.get(e.name)
        if e.removed_ns is None or e.removed_by is None or (gone is not None
                                                            and gone[0] >= e.removed_ns):
            raise EventInvalid(f"{e.name} is not a member")


IFACE_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")
"""A Linux interface name (IFNAMSIZ - 1 characters at most)."""
MAX_KEEPALIVE = 65535


def interface(value: str) -> str:
    if not IFACE_RE.fullmatch(value) or value in (".", ".."):
        raise EventInvalid(f"interface {value[:30]!r}: 1-15 of letters, digits, '_', '.', '-'")
    return value


def port(value: int, what: str = "listen port") -> int:
    if not 1 <= value <= 65535:
        raise EventInvalid(f"{what} {value}: not 1-65535")
    return value


def allowed_ips(own_role: str | None, peer_role: str, peer_ip: str) -> tuple[str, ...]:
    """The hub rule: a spoke's entry for the hub covers the whole mesh; every other entry
    covers the peer's own address."""
    if peer_role == "hub" and own_role != "hub":
        return (str(MESH),)
    return (f"{peer_ip}/32",)


def _networks(values: tuple[str, ...]) -> list[ipaddress.IPv4Network]:
    out = []
    for v in values:
        try:
            net = ipaddress.IPv4Network(v, strict=True)
        except ValueError:
            raise EventInvalid(f"allowed IP {v[:40]!r}: not an IPv4 network (A.B.C.D/N)") from None
        if not net.subnet_of(MESH):
            raise EventInvalid(f"allowed IP {v}: outside {MESH}")
        out.append(net)
    if not out:
        raise EventInvalid("a peer needs at least one allowed IP")
    return out


def _wg_interface(s: State, e: WgInterface) -> None:
    interface(e.interface)
    port(e.listen_port)


def _wg_peer_added(s: State, e: WgPeerAdded) -> None:
    _name(e.name)
    if len(e.wg_public_key) != KEY_BYTES:
        raise EventInvalid(f"WireGuard key: {len(e.wg_public_key)} bytes, not {KEY_BYTES}")
    ip = mesh_ip(e.mesh_ip)
    if e.endpoint is not None:
        endpoint(e.endpoint)
    if e.role not in ROLES:
        raise EventInvalid(f"role {e.role[:20]!r}: one of {', '.join(ROLES)}")
    if not 0 <= e.keepalive <= MAX_KEEPALIVE:
        raise EventInvalid(f"keepalive {e.keepalive}: not 0-{MAX_KEEPALIVE} seconds")
    node = s.node or {}
    if e.name == node.get("name"):
        raise EventInvalid(f"{e.name} is this node")
    if e.wg_public_key == node.get("wg_public_key"):
        raise EventInvalid("that WireGuard key is this node's own")
    if str(ip) == node.get("mesh_ip"):
        raise EventInvalid(f"mesh IP {ip} is this node's own")
    if e.name in s.peers:
        raise EventInvalid(f"{e.name} is a peer already")
    mine = _networks(e.allowed_ips)
    for p in s.peers.values():
        if p.wg_public_key == e.wg_public_key:
            raise EventInvalid(f"that WireGuard key is {p.name}'s")
        if p.mesh_ip == e.mesh_ip:
            raise EventInvalid(f"mesh IP {e.mesh_ip} is {p.name}'s")
        for theirs in _networks(p.allowed_ips):
            for net in mine:
                # The hub's whole-mesh route may sit under more specific ones (the longest
                # prefix wins); any other overlap would make two peers claim one address.
                if net.overlaps(theirs) and MESH not in (net, theirs):
                    raise EventInvalid(f"allowed IP {net} overlaps {p.name}'s {theirs}")
                if net == theirs:
                    raise EventInvalid(f"allowed IP {net} is {p.name}'s already")


def _wg_repaired(s: State, e: WgRepaired) -> None:
    interface(e.interface)
    for what, text in (("what", e.what), ("found", e.found), ("repair", e.repair)):
        if not text or len(text) > MAX_REASON or not text.isprintable():
            raise EventInvalid(f"{what}: 1-{MAX_REASON} printable characters")


def _wg_tunnel_failed(s: State, e: WgTunnelFailed) -> None:
    interface(e.interface)
    _reason(e.reason)


def _wg_peer_removed(s: State, e: WgPeerRemoved) -> None:
    _name(e.name)
    _reason(e.reason)
    if e.name not in s.peers:
        raise EventInvalid(f"{e.name} is not a peer")


MAX_VM_VCPUS = 256
MAX_VM_RAM_MIB = 1 << 22  # 4 TiB: a bound on nonsense, not a policy (profiles set that)
MAX_SOCKET_PATH = 107  # what a UNIX socket's path may hold
STOP_HOW = ("powerdown", "quit")


def _vm_name(value: str) -> None:
    if not VM_NAME_RE.fullmatch(value):
        raise EventInvalid(f"VM name {value[:40]!r}: use 1-32 of a-z, 0-9 and '-', "
                           "starting with a letter or digit")


def _path(value: str | None, what: str, limit: int = 4096) -> None:
    if value is not None and (not value.startswith("/") or len(value) > limit
                              or not value.isprintable()):
        raise EventInvalid(f"{what}: an absolute path of at most {limit} printable "
                           "characters")


def _vm_fits(s: State, e: Any) -> None:
    why = unfit(s, [e])
    if why is not None:
        raise EventInvalid(why[1])


def _vm_defined(s: State, e: VmDefined) -> None:
    _vm_name(e.name)
    _name(e.profile, "profile")
    if not 1 <= e.vcpus <= MAX_VM_VCPUS:
        raise EventInvalid(f"vcpus {e.vcpus}: not 1-{MAX_VM_VCPUS}")
    if not 16 <= e.ram_mib <= MAX_VM_RAM_MIB:
        raise EventInvalid(f"RAM {e.ram_mib} MiB: not 16-{MAX_VM_RAM_MIB}")
    _path(e.image, "image")
    _path(e.overlay, "overlay")
    if (e.image is None) != (e.overlay is None):
        raise EventInvalid("a guest with a disk has both an image and its overlay")
    _vm_fits(s, e)


def _vm_step(s: State, e: Any) -> None:
    _vm_name(e.name)
    if type(e) is VmStarted:
        if not 1 <= e.pid < 1 << 22:
            raise EventInvalid(f"pid {e.pid}: not a process id")
        _path(e.qmp, "QMP socket", MAX_SOCKET_PATH)
        if e.accel not in VM_ACCELS:
            raise EventInvalid(f"accel {e.accel[:20]!r}: one of {', '.join(VM_ACCELS)}")
    elif type(e) is VmReattached:
        if not 1 <= e.pid < 1 << 22:
            raise EventInvalid(f"pid {e.pid}: not a process id")
    elif type(e) is VmStopped:
        if e.how not in STOP_HOW:
            raise EventInvalid(f"how {e.how[:20]!r}: one of {', '.join(STOP_HOW)}")
    elif type(e) in (VmPaused, VmResumed):
        _reason(e.why)
    elif type(e) is VmLost:
        _reason(e.reason)
    elif type(e) is VmBalloonSet:
        vm = s.vms.get(e.name)
        if vm is not None and not 1 <= e.target_mib <= vm.ram_mib:
            raise EventInvalid(f"balloon {e.target_mib} MiB: not 1-{vm.ram_mib} (its RAM)")
    _vm_fits(s, e)


GENESIS_ROLES = ("approver", "joiner")
MAX_WINDOW = 86_400


def _genesis(s: State, e: Any) -> None:
    """A ceremony's events: one open at a time, numbered in order; what they carry
    well-formed (and nothing of the code or a key: the fields have no room for it)."""
    if type(e.ceremony) is not int or e.ceremony < 1:
        raise EventInvalid("a ceremony's number is a whole number from 1")
    why = unfit_genesis(s, e)
    if why is not None:
        raise EventInvalid(why)
    if type(e) is GenesisOpened:
        if e.role not in GENESIS_ROLES:
            raise EventInvalid(f"role {e.role[:20]!r}: approver or joiner")
        endpoint(e.address)
        if not 1 <= e.window <= MAX_WINDOW:
            raise EventInvalid(f"window {e.window} s: not 1-{MAX_WINDOW}")
        if not 6 <= e.length <= 10:
            raise EventInvalid(f"code length {e.length}: not 6-10")
    elif type(e) is GenesisCompleted:
        _name(e.peer)
        if len(e.transcript) != 32:
            raise EventInvalid("a transcript hash is 32 bytes")
    elif type(e) is GenesisAborted:
        _reason(e.reason)


def _dispatch_granted(s: State, e: DispatchGranted) -> None:
    _name(e.grantee)
    _name(e.target)
    me = (s.node or {}).get("name")
    if me not in (e.grantee, e.target) or e.grantee == e.target:
        raise EventInvalid("a dispatch grant is between this node and another")
    if not e.objects or not set(e.objects) <= set(DISPATCH_OBJECTS) or len(
            set(e.objects)) != len(e.objects):
        raise EventInvalid(f"dispatch objects: some of {', '.join(DISPATCH_OBJECTS)}")
    if len(e.transcript) != 32:
        raise EventInvalid("a transcript hash is 32 bytes")
    other = e.target if me == e.grantee else e.grantee
    if other not in s.members:
        raise EventInvalid(f"{other} is not a member")


COMMANDS: dict[type[Any], Callable[[State, Any], None]] = {
    DispatchGranted: _dispatch_granted,
    **{t: _genesis for t in (GenesisOpened, GenesisCompleted, GenesisAborted,
                             GenesisExpired)},
    VmDefined: _vm_defined,
    **{t: _vm_step for t in (VmStarted, VmPaused, VmResumed, VmStopped, VmLost,
                             VmReattached, VmDestroyed, VmBalloonSet)},
    MemberAdded: _member_added,
    MemberRemoved: _member_removed,
    WgInterface: _wg_interface,
    WgPeerAdded: _wg_peer_added,
    WgPeerRemoved: _wg_peer_removed,
    WgRepaired: _wg_repaired,
    WgTunnelFailed: _wg_tunnel_failed,
}
"""Event type -> its command's check.  A PD may journal only these types."""


def check_batch(state: State, events: Sequence[object]) -> None:
    """:func:`check` each event in order, against the state the earlier ones make (on a
    trial copy): a batch whose events are each fine alone may still clash."""
    if len(events) == 1:
        check(state, events[0])
        return
    trial = try_state(state)
    for i, event in enumerate(events):
        try:
            check(trial, event)
        except EventInvalid as exc:
            raise EventInvalid(f"event {i + 1} of {len(events)}: {exc}") from None
        apply(trial, event, trial.seq + 1, 0)


def check(state: State, event: object) -> None:
    """Raise :class:`EventInvalid` unless ``event`` is one its command would make now."""
    command = COMMANDS.get(type(event))
    if command is None:
        raise EventInvalid(f"{type(event).__name__} is made by no command a PD may use")
    try:
        REGISTRY.encode(event)  # field types, exactly, and the size limit
    except EventTypeError as exc:
        raise EventInvalid(str(exc)) from None
    command(state, event)
