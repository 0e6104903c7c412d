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
class DatagramReceived(IoInput):
    """A datagram arrived from ``source`` (``IP:PORT``)."""

    source: str
    data: bytes


class NetDriverCore(Core):
    requests = (ListLinks, SendDatagram)
    ops: ClassVar[dict[str, str]] = {**Core.ops, "links": "op_links", "udp.send": "op_udp_send"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._waiting: dict[int, ReplyCap | None] = {}
        self.sent = 0
        self.received_from: Counter[str] = Counter()
        self.received_bytes = 0

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
        if isinstance(event, DatagramReceived):
            self.received_from[event.source] += 1
            self.received_bytes += len(event.data)
        return []

    def status(self) -> dict[str, Any]:
        return {**super().status(), "datagrams_sent": self.sent,
                "datagrams_received": dict(self.received_from),
                "bytes_received": self.received_bytes}
