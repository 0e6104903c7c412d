"""pd-wireguard: the WireGuard device and its peers, as the ledger says they should be.

It serves ``peers`` (the desired state) and ``tunnel``.  A PD holding ``peers`` may call:

* ``{"op": "peer.add", "name", "wg_key": bytes, "endpoint": "IP:PORT" | None,
  "mesh_ip", "role", "keepalive"}`` -- journals a ``wg.peer_added`` whose allowed IPs
  follow the hub rule (``ledger.commands.allowed_ips``); the answer is the peer;
* ``{"op": "peer.remove", "name", "reason"}`` -- journals ``wg.peer_removed``;
* ``{"op": "peer.list"}`` -- the desired peers.

Every request is checked by the kernel's command for its event before anything is
recorded; a refusal is the answer, in one line.  (Configuring the device itself,
over wireguard-go's UAPI socket, and reconciling it come with the rest of issue 9.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from actors.pds.base import Action, Append, Core, Message, PdView, Refused, Reply, ReplyCap
from ledger.catalog import WgPeerAdded, WgPeerRemoved
from ledger.commands import EventInvalid, allowed_ips, mesh_ip


class WireguardCore(Core):
    ops: ClassVar[dict[str, str]] = {**Core.ops, "peer.add": "op_peer_add",
                                     "peer.remove": "op_peer_remove",
                                     "peer.list": "op_peer_list"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.peers: dict[str, dict[str, Any]] = {}
        self.interface: dict[str, Any] | None = None
        self._asking: ReplyCap | None = None  # who asked for this step's journalling
        self._restore: dict[str, Any] | None = None  # a removal to take back if refused

    def start(self, view: PdView, now: float) -> list[Action]:
        wg = view.owned.get("wg") or {}
        self.peers = dict(wg.get("peers", {}))
        self.interface = wg.get("interface")
        return super().start(view, now)

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
        return [Append(event), Reply(m.reply, {"ok": True, "peer": self.peers[name]})]

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
                Reply(m.reply, {"ok": True, "removed": name, "was": removed})]

    def op_peer_list(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        return [Reply(m.reply, {"ok": True, "peers": sorted(self.peers.values(),
                                                            key=lambda x: x["name"])})]

    def refused(self, r: Refused, now: float) -> list[Action]:
        """A journalling refused (the event's command said no): the asker is told why, and
        what this core thought it had done is taken back from the ledger's view."""
        super().refused(r, now)
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
