"""pd-wireguard: the WireGuard device and its peers, as the ledger says they should be.

It serves ``peers`` (the desired state) and ``tunnel``.  A PD holding ``peers`` may call:

* ``{"op": "peer.add", "name", "wg_key": bytes, "endpoint": "IP:PORT" | None,
  "mesh_ip", "role", "keepalive"}`` -- journals a ``wg.peer_added`` whose allowed IPs
  follow the hub rule (``ledger.commands.allowed_ips``); the answer is the peer;
* ``{"op": "peer.remove", "name", "reason"}`` -- journals ``wg.peer_removed``;
* ``{"op": "peer.list"}`` -- the desired peers.

Every request is checked by the kernel's command for its event before anything is
recorded; a refusal is the answer, in one line.

The device: once the node has a mesh address, pd-wireguard asks pd-net-driver (under
its ``net`` capability) to bring the tunnel up (``tunnel.up``: the backend's device,
its address, forwarding on a hub), then reconciles: at start, every
``RECONCILE_EVERY`` seconds, on ``{"op": "repair"}`` and whenever pd-net-driver
answers its standing ``tunnel.watch`` call (the device was restarted).  To reconcile
is to read the device (``GetDevice``), plan (``wg_plan.plan``) and, only if something
drifted, set it whole (``SetDevice``) and journal one ``wg.repaired`` per drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from actors.pds.base import (
    Action,
    Append,
    Call,
    Core,
    IoAnswer,
    IoRequest,
    IoResult,
    Message,
    PdView,
    Refused,
    Reply,
    ReplyCap,
    SetTimer,
)
from actors.pds.wg_plan import DeviceState, PeerConfig, plan, repair_peers
from ledger.catalog import WgPeerAdded, WgPeerRemoved, WgRepaired, WgTunnelFailed
from ledger.commands import EventInvalid, allowed_ips, mesh_ip

MEMBER_KEEPALIVE = 25  # a spoke's tunnel to the hub, kept open through NAT

RECONCILE_EVERY = 10.0  # seconds between reconciliations (besides the ones pushed)
RETRY_UP = 5.0  # seconds before a tunnel that failed to come up is tried again
TAG_UP, TAG_WATCH, TAG_LINK = 1, 2, 3


@dataclass(frozen=True, slots=True)
class GetDevice(IoRequest):
    interface: str


@dataclass(frozen=True, slots=True)
class SetDevice(IoRequest):
    """Set the device whole: its port, its peers, and (``set_key``) the node's private key,
    which the adapter reads from the node's key file (the core never sees it)."""

    interface: str
    listen_port: int
    peers: tuple[PeerConfig, ...]
    set_key: bool


class WireguardCore(Core):
    requests = (GetDevice, SetDevice)
    ops: ClassVar[dict[str, str]] = {**Core.ops, "peer.add": "op_peer_add",
                                     "peer.remove": "op_peer_remove",
                                     "peer.list": "op_peer_list", "repair": "op_repair",
                                     "status": "op_status"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.peers: dict[str, dict[str, Any]] = {}
        self.interface: dict[str, Any] | None = None
        self.members: dict[str, Any] = {}
        self._following: list[str] = []  # peers the last membership step added
        self._asking: ReplyCap | None = None  # who asked for this step's journalling
        self._restore: dict[str, Any] | None = None  # a removal to take back if refused
        self.up = False
        self.observed: DeviceState | None = None
        self.repairs = 0
        self.last_error: str | None = None
        self._device_steps: dict[int, tuple[str, list[ReplyCap]]] = {}
        self._last_drifts: list[str] = []
        self._after_link: list[ReplyCap] | None = None  # a repair waiting for its link check
        self._link_repairs: list[str] = []
        self._failures = 0

    def start(self, view: PdView, now: float) -> list[Action]:
        wg = view.owned.get("wg") or {}
        self.peers = dict(wg.get("peers", {}))
        self.interface = wg.get("interface")
        actions = super().start(view, now)
        self.members = dict(view.members)
        return actions + self._follow(set()) + self._bring_up()

    # ------------------------------------------------------------- membership
    def members_changed(self, members: dict[str, Any], now: float,
                        removed: dict[str, Any] | None = None) -> list[Action]:
        """A node was admitted (a ceremony, an announcement) or removed: the peers the
        hub rule gives follow, pushed at once (not at the next poll)."""
        gone = set(self.members) - set(members)
        self.members = dict(members)
        return self._follow(gone) + self._reconcile_if_up()

    def _follow(self, gone: set[str]) -> list[Action]:
        """Peers for the members the hub rule pairs this node with (the hub with every
        member, a spoke with the hub), and none for members removed.  A peer the
        operator added by hand, or one whose key or address another peer has, is left."""
        me = self.node or {}
        own, role = me.get("name"), me.get("role")
        actions: list[Action] = []
        self._following = []
        keys = {p["wg_public_key"] for p in self.peers.values()}
        ips = {p["mesh_ip"] for p in self.peers.values()}
        for name in sorted(gone & set(self.peers)):
            self.peers.pop(name)
            actions.append(Append(WgPeerRemoved(name, "no longer a member of the mesh")))
        if not own or not me.get("mesh_ip"):
            return actions  # waiting to be joined: no peers yet
        for name, m in sorted(self.members.items()):
            if (name == own or name in self.peers or "hub" not in (role, m.get("role"))
                    or m["wg_public_key"] in keys or m["mesh_ip"] in ips
                    or m["wg_public_key"] == me.get("wg_public_key")):
                continue
            try:
                allowed = allowed_ips(role, m["role"], str(mesh_ip(m["mesh_ip"])))
            except EventInvalid:
                continue
            keepalive = MEMBER_KEEPALIVE if m["role"] == "hub" and role != "hub" else 0
            event = WgPeerAdded(name, m["wg_public_key"], m.get("endpoint"), m["mesh_ip"],
                                m["role"], allowed, keepalive)
            self.peers[name] = {"name": name, "wg_public_key": m["wg_public_key"],
                                "endpoint": m.get("endpoint"), "mesh_ip": m["mesh_ip"],
                                "role": m["role"], "allowed_ips": list(allowed),
                                "keepalive": keepalive}
            keys.add(m["wg_public_key"])
            ips.add(m["mesh_ip"])
            self._following.append(name)
            actions.append(Append(event))
        return actions

    # ------------------------------------------------------------- the device
    def _address(self) -> str | None:
        ip = (self.node or {}).get("mesh_ip")
        return f"{ip}/24" if ip else None

    def _held_back(self) -> str | None:
        """Why the tunnel is not to be brought up yet, or None."""
        if self.interface is None:
            return "no WireGuard interface in the ledger"
        if self._address() is None:
            return "waiting to be joined: no mesh address yet (`ppn pair`)"
        if (self.node or {}).get("endpoint") is None:
            return "no underlay endpoint (`ppn node init --endpoint IP:PORT`)"
        if self.holding("net", "grant-reply") is None:
            return f"{self.name} holds no net capability"
        return None

    def node_changed(self, node: dict[str, Any], now: float) -> list[Action]:
        """Joined (an address at last), or moved: the tunnel comes up, or is set again."""
        before = (self._address(), (self.node or {}).get("endpoint"))
        super().node_changed(node, now)
        if (self._address(), (self.node or {}).get("endpoint")) == before:
            return []
        # Joined: the members the ceremony taught it (in the same batch) become peers.
        return self._follow(set()) + self._bring_up()

    def _bring_up(self) -> list[Action]:
        net = self.holding("net", "grant-reply")
        address = self._address()
        if self._held_back() is not None or net is None or address is None:
            return []
        assert self.interface is not None
        return [Call(net.token, {"op": "tunnel.up", "interface": self.interface["interface"],
                                 "address": address,
                                 "forwarding": (self.node or {}).get("role") == "hub"},
                     tag=TAG_UP)]

    def _reconcile(self, asked: list[ReplyCap]) -> list[Action]:
        """The link first (address, up, route: pd-net-driver's), then the device."""
        if not self.up or self.interface is None:
            return [Reply(r, {"ok": False, "error": f"{self.name}: the tunnel is not up"})
                    for r in asked]
        net = self.holding("net", "grant-reply")
        if net is not None and self._after_link is None:
            self._after_link = list(asked)
            return [Call(net.token, {"op": "link.check"}, tag=TAG_LINK)]
        return self._reconcile_device(asked)

    def _reconcile_device(self, asked: list[ReplyCap]) -> list[Action]:
        assert self.interface is not None
        rid = self.request_id()
        self._device_steps[rid] = ("get", asked)
        return [GetDevice(rid, self.interface["interface"])]

    def _reconcile_if_up(self) -> list[Action]:
        """After the desired state changed: set the device now, not at the next tick."""
        return self._reconcile([]) if self.up else []

    def timer(self, name: str, now: float) -> list[Action]:
        if name == "retry-up" and not self.up:
            return self._bring_up()
        if name != "reconcile" or not self.up:
            return []
        return [*self._reconcile([]), SetTimer("reconcile", RECONCILE_EVERY)]

    def op_repair(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        return self._reconcile([m.reply] if m.reply is not None else [])

    def op_status(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        """The state, with the device read afresh when the tunnel is up."""
        if m.reply is None:
            return []
        if self.up and self.interface is not None:
            rid = self.request_id()
            self._device_steps[rid] = ("status", [m.reply])
            return [GetDevice(rid, self.interface["interface"])]
        return [self._status_reply(m.reply)]

    def _status_reply(self, reply: ReplyCap) -> Reply:
        observed = {} if self.observed is None else {
            k.hex(): {"endpoint": v.endpoint, "allowed_ips": list(v.allowed_ips),
                      "keepalive": v.keepalive, "last_handshake": v.last_handshake,
                      "rx_bytes": v.rx_bytes, "tx_bytes": v.tx_bytes}
            for k, v in self.observed.peers.items()}
        return Reply(reply, {"ok": True, "interface": self.interface, "up": self.up,
                             "address": self._address(), "observed": observed,
                             "listen_port": None if self.observed is None
                             else self.observed.listen_port,
                             "repairs": self.repairs, "last_error": self.last_error,
                             "held_back": None if self.up else self._held_back()})

    def handle(self, m: Message, now: float) -> list[Action]:
        if m.obj != "reply":
            return super().handle(m, now)
        ok = type(m.payload) is dict and m.payload.get("ok") is True
        net = self.holding("net", "grant-reply")
        if m.tag in (TAG_UP, TAG_WATCH) and not ok:
            return self._tunnel_failed(m.payload)
        if m.tag == TAG_UP:
            self.up = True
            self._failures = 0
            watch = [] if net is None else [Call(net.token, {"op": "tunnel.watch"},
                                                 tag=TAG_WATCH)]
            # tunnel.up has just set the link: the device is all there is to reconcile.
            return [*watch, *self._reconcile_device([]), SetTimer("reconcile",
                                                                  RECONCILE_EVERY)]
        if m.tag == TAG_LINK:
            asked, self._after_link = self._after_link or [], None
            changed = m.payload.get("changed") if ok else None
            events: list[Action] = []
            self._link_repairs = []
            if type(changed) is list and self.interface is not None:
                for c in [c for c in changed if type(c) is str][:8]:
                    events.append(Append(WgRepaired(self.interface["interface"], "link",
                                                    "drifted", c[:200])))
                    self._link_repairs.append(f"link: {c[:200]}")
                self.repairs += len(events)
            return [*events, *self._reconcile_device(asked)]
        if m.tag == TAG_WATCH and ok:  # the device was restarted: it holds nothing now
            watch = [] if net is None else [Call(net.token, {"op": "tunnel.watch"},
                                                 tag=TAG_WATCH)]
            return [*watch, *self._reconcile([])]
        return []

    def _tunnel_failed(self, payload: Any) -> list[Action]:
        """The tunnel did not come up (or back): one event, one log-worthy error, a retry."""
        error = payload.get("error") if type(payload) is dict else None
        reason = " ".join(str(error or "no answer").split())
        reason = "".join(c if c.isprintable() else "?" for c in reason)[:290]
        was_up, self.up, self.last_error = self.up, False, reason
        actions: list[Action] = [SetTimer("retry-up", RETRY_UP)]
        if self.interface is not None and (was_up or self._failures == 0):
            # The first failure of a run of them is journalled, not every retry.
            actions.insert(0, Append(WgTunnelFailed(self.interface["interface"], reason)))
        self._failures += 1
        return actions

    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        step = self._device_steps.pop(answer.request_id, None)
        if step is None or self.interface is None:
            return []
        kind, asked = step
        if not isinstance(answer, IoResult):
            self.last_error = answer.error[:300]
            if kind == "status":
                return [self._status_reply(r) for r in asked]
            return [Reply(r, {"ok": False, "error": f"{self.name}: {answer.error}"})
                    for r in asked]
        if kind in ("get", "verify", "status"):
            observed = answer.value.get("device") if type(answer.value) is dict else None
            if not isinstance(observed, DeviceState):
                return []
            self.observed = observed
        if kind == "status":
            return [self._status_reply(r) for r in asked]
        if kind == "verify":  # read back after a set: shown by status, never repaired again
            return [Reply(r, {"ok": True, "repaired": list(self._last_drifts)}) for r in asked]
        if kind == "get":
            assert self.observed is not None
            observed = self.observed
            port = int(self.interface["listen_port"])
            drifts = plan(port, self.peers, observed)
            if not drifts:
                return [Reply(r, {"ok": True, "repaired": list(self._link_repairs)})
                        for r in asked]
            rid = self.request_id()
            self._device_steps[rid] = ("set", asked)
            iface = self.interface["interface"]
            events: list[Action] = [Append(WgRepaired(iface, d.what, d.found, d.repair))
                                    for d in drifts[:32]]
            self.repairs += len(drifts)
            self._last_drifts = [*self._link_repairs,
                                 *(f"{d.what}: {d.found} -> {d.repair}" for d in drifts)]
            return [*events, SetDevice(rid, iface, port, tuple(repair_peers(self.peers)),
                                       not observed.public_key_set)]
        self.last_error = None  # set: read it back (what status shows), then answer
        rid = self.request_id()
        self._device_steps[rid] = ("verify", asked)
        return [GetDevice(rid, self.interface["interface"])]

    def op_peer_add(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        name, key, ep, ip = p.get("name"), p.get("wg_key"), p.get("endpoint"), p.get("mesh_ip")
        role, keepalive = p.get("role", "node"), p.get("keepalive", 0)
        if (type(name) is not str or type(key) is not bytes or type(ip) is not str
                or (ep is not None and type(ep) is not str) or type(role) is not str
                or type(keepalive) is not int):
            return self.error(m, "peer.add needs name, wg_key (32 bytes), mesh_ip, and "
                                 "optionally endpoint, role, keepalive")
        try:
            allowed = allowed_ips((self.node or {}).get("role"), role, str(mesh_ip(ip)))
        except EventInvalid as exc:
            return self.error(m, str(exc))
        event = WgPeerAdded(name, key, ep, ip, role, allowed, keepalive)
        self._asking = m.reply
        self.peers[name] = {"name": name, "wg_public_key": key, "endpoint": ep,
                            "mesh_ip": ip, "role": role, "allowed_ips": list(allowed),
                            "keepalive": keepalive}
        return [Append(event), Reply(m.reply, {"ok": True, "peer": self.peers[name]}),
                *self._reconcile_if_up()]

    def op_peer_remove(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        name, reason = p.get("name"), p.get("reason", "removed by the operator")
        if type(name) is not str or type(reason) is not str:
            return self.error(m, "peer.remove needs a name")
        self._asking = m.reply
        removed = self.peers.pop(name, None)
        self._restore = removed
        return [Append(WgPeerRemoved(name, reason)),
                Reply(m.reply, {"ok": True, "removed": name, "was": removed}),
                *self._reconcile_if_up()]

    def op_peer_list(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        return [Reply(m.reply, {"ok": True, "peers": sorted(self.peers.values(),
                                                            key=lambda x: x["name"])})]

    def refused(self, r: Refused, now: float) -> list[Action]:
        """A journalling refused (the event's command said no): the asker is told why, and
        what this core thought it had done is taken back from the ledger's view."""
        super().refused(r, now)
        event = r.action.event if type(r.action) is Append else None
        if isinstance(event, WgPeerAdded | WgPeerRemoved) and event.name in self._following:
            for name in self._following:  # that batch is not in the ledger: nor here
                self.peers.pop(name, None)
            self._following = []
            return []
        if type(r.action) is not Append or self._asking is None:
            return []
        asking, self._asking = self._asking, None
        event = r.action.event
        if type(event) is WgPeerAdded:
            self.peers.pop(event.name, None)
        elif type(event) is WgPeerRemoved and self._restore is not None:
            self.peers[event.name] = self._restore
        self._restore = None
        reason = r.reason.split(": ", 2)[-1] if r.code == "bad-event" else r.reason
        return [Reply(asking, {"ok": False, "error": f"{self.name}: {reason}"})]
