"""pd-net-driver: the node's side of the NIC -- links, addresses, underlay datagrams.

It serves ``net``.  A PD holding ``net`` may call:

* ``{"op": "links"}`` -- the node's links and their addresses, as the adapter reads
  them (netlink on a node, the simulated NIC in the simulator):
  ``{"ok": true, "links": [{"name", "index", "state", "mac", "mtu", "addresses"}]}``;
* ``{"op": "udp.send", "to": "IP:PORT", "data": bytes}`` -- one datagram on the
  underlay (a send, or a call answered once it left).

Datagrams that arrive are counted by source.  Every request is checked before any
I/O is asked for; a malformed one is an error answer, never a crash.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from actors.pds.base import (
    Action,
    Core,
    IoAnswer,
    IoInput,
    IoRequest,
    IoResult,
    Message,
    Reply,
    ReplyCap,
)
from ledger.commands import EventInvalid, endpoint

MAX_DATAGRAM = 65_507  # what one UDP datagram over IPv4 can carry


@dataclass(frozen=True, slots=True)
class ListLinks(IoRequest):
    """Read the links of the node's network namespace, with their addresses."""


@dataclass(frozen=True, slots=True)
class SendDatagram(IoRequest):
    """Send ``data`` to ``to`` (``IP:PORT``) on the underlay."""

    to: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTunnel(IoRequest):
    """Have the WireGuard backend's device ``interface`` exist: adopt one that answers on
    its UAPI socket, else start it (a stale socket is removed first)."""

    interface: str


@dataclass(frozen=True, slots=True)
class ConfigureLink(IoRequest):
    """Give ``interface`` its address (``10.8.0.X/24``), bring it up, and set IP
    forwarding (a hub forwards between spokes, and sends no ICMP redirects)."""

    interface: str
    address: str
    forwarding: bool


@dataclass(frozen=True, slots=True)
class TunnelExited(IoInput):
    """The backend's process for ``interface`` exited, unasked."""

    interface: str
    returncode: int


@dataclass(frozen=True, slots=True)
class DatagramReceived(IoInput):
    """A datagram arrived from ``source`` (``IP:PORT``)."""

    source: str
    data: bytes


class NetDriverCore(Core):
    requests = (ListLinks, SendDatagram, StartTunnel, ConfigureLink)
    ops: ClassVar[dict[str, str]] = {**Core.ops, "links": "op_links", "udp.send": "op_udp_send",
                                     "tunnel.up": "op_tunnel_up",
                                     "tunnel.watch": "op_tunnel_watch",
                                     "link.check": "op_link_check"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._waiting: dict[int, ReplyCap | None] = {}
        self.sent = 0
        self.received_from: Counter[str] = Counter()
        self.received_bytes = 0
        self.tunnel: dict[str, Any] | None = None  # interface, address, forwarding
        self._tunnel_steps: dict[int, tuple[str, ReplyCap | None]] = {}
        self._watchers: list[ReplyCap] = []
        self.restarts = 0

    # ------------------------------------------------------------- the tunnel's device
    def op_tunnel_up(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        iface, address, fwd = p.get("interface"), p.get("address"), p.get("forwarding", False)
        if type(iface) is not str or type(address) is not str or type(fwd) is not bool:
            return self.error(m, "tunnel.up needs interface, address (A.B.C.D/N), forwarding")
        self.tunnel = {"interface": iface, "address": address, "forwarding": fwd}
        return self._start_tunnel(m.reply)

    def _start_tunnel(self, reply: ReplyCap | None) -> list[Action]:
        assert self.tunnel is not None
        rid = self.request_id()
        self._tunnel_steps[rid] = ("start", reply)
        return [StartTunnel(rid, self.tunnel["interface"])]

    def op_link_check(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        """Set the tunnel's link right again (address, up, route); the answer says what
        had to change (nothing, when it matched)."""
        if self.tunnel is None:
            return self.error(m, "no tunnel yet")
        rid = self.request_id()
        self._tunnel_steps[rid] = ("check", m.reply)
        return [ConfigureLink(rid, self.tunnel["interface"], self.tunnel["address"],
                              self.tunnel["forwarding"])]

    def op_tunnel_watch(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        """A call answered when the tunnel's device was restarted (so its configuration is
        gone): the caller's push, with no capability beyond the reply cap."""
        if m.reply is not None:
            self._watchers.append(m.reply)
            del self._watchers[:-8]  # a few watchers at most; older calls lapse
        return []

    def _tunnel_io(self, step: str, reply: ReplyCap | None, answer: IoAnswer) -> list[Action]:
        if not isinstance(answer, IoResult):
            body = {"ok": False, "error": f"{self.name}: {step}: {answer.error}"}
            if reply is not None:
                return [Reply(reply, body)]
            # A restart that failed: whoever watches is told (and tries again, in time).
            told: list[Action] = [Reply(w, body) for w in self._watchers]
            self._watchers.clear()
            return told
        if step == "check":
            changed = answer.value.get("changed", []) if type(answer.value) is dict else []
            return [] if reply is None else [Reply(reply, {"ok": True, "changed": changed})]
        if step == "start" and self.tunnel is not None:
            rid = self.request_id()
            self._tunnel_steps[rid] = ("link", reply)
            return [ConfigureLink(rid, self.tunnel["interface"], self.tunnel["address"],
                                  self.tunnel["forwarding"])]
        actions: list[Action] = []
        if reply is not None:
            actions.append(Reply(reply, {"ok": True, "tunnel": self.tunnel,
                                         "started": answer.value}))
        if step == "link" and reply is None:  # a restart is done: tell who watches
            actions += [Reply(w, {"ok": True, "restarted": self.tunnel})
                        for w in self._watchers]
            self._watchers.clear()
        return actions

    def op_links(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []  # nobody to tell
        rid = self.request_id()
        self._waiting[rid] = m.reply
        return [ListLinks(rid)]

    def op_udp_send(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        to, data = payload.get("to"), payload.get("data")
        if type(to) is not str or type(data) is not bytes:
            return self.error(m, "udp.send needs 'to' (IP:PORT) and 'data' (bytes)")
        try:
            endpoint(to)
        except EventInvalid as exc:
            return self.error(m, str(exc))
        if len(data) > MAX_DATAGRAM:
            return self.error(m, f"{len(data)} bytes: a datagram holds at most {MAX_DATAGRAM}")
        rid = self.request_id()
        if m.reply is not None:  # a plain send expects no answer: nothing to remember
            self._waiting[rid] = m.reply
        return [SendDatagram(rid, to, data)]

    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        step = self._tunnel_steps.pop(answer.request_id, None)
        if step is not None:
            return self._tunnel_io(step[0], step[1], answer)
        reply = self._waiting.pop(answer.request_id, None)
        if isinstance(answer, IoResult) and isinstance(answer.value, dict):
            if "sent" in answer.value:
                self.sent += 1
            body: dict[str, Any] = {"ok": True, **answer.value}
        elif isinstance(answer, IoResult):
            body = {"ok": False, "error": f"{self.name}: the adapter answered oddly"}
        else:
            body = {"ok": False, "error": f"{self.name}: {answer.error}"}
        return [] if reply is None else [Reply(reply, body)]

    def input(self, event: IoInput, now: float) -> list[Action]:
        if isinstance(event, TunnelExited):
            if self.tunnel is None or event.interface != self.tunnel["interface"]:
                return []
            self.restarts += 1  # supervised: started again, then its watchers are told
            return self._start_tunnel(None)
        if isinstance(event, DatagramReceived):
            self.received_from[event.source] += 1
            self.received_bytes += len(event.data)
        return []

    def status(self) -> dict[str, Any]:
        return {**super().status(), "tunnel": self.tunnel, "tunnel_restarts": self.restarts,
                "datagrams_sent": self.sent,
                "datagrams_received": dict(self.received_from),
                "bytes_received": self.received_bytes}
