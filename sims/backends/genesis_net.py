"""The simulated twin of pd-genesis's adapter: TCP between simulated nodes, in virtual time.

:class:`SimTcp` is one world's TCP: listeners by ``IP:PORT``, and connections between two
:class:`SimGenesisNet` (one per node).  Bytes arrive in order after :data:`LATENCY_NS`;
closing one end tells the other (``Closed``), as a FIN would.  Random bytes come from a
seeded generator, so a seed gives the same codes and the same ceremony, byte for byte.
:meth:`SimTcp.connect_raw` lets a test play a third party on the wire.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actors.io.base import Answer, Emit
from actors.pds.base import IoFailure, IoInput, IoRequest, IoResult
from actors.pds.genesis_io import (
    MAX_READ,
    Accepted,
    CloseConn,
    Closed,
    Connect,
    Entropy,
    Listen,
    Received,
    SendBytes,
    StopListening,
)

if TYPE_CHECKING:
    from sims.host import World

LATENCY_NS = 200_000
ANSWER_NS = 50_000


class SimTcp:
    """One world's TCP."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.listeners: dict[str, SimGenesisNet] = {}
        self._next = 0
        self.links: dict[int, tuple[Any, int]] = {}  # conn -> (the other end, its conn)

    def conn_id(self) -> int:
        self._next += 1
        return self._next

    def deliver(self, to: Any, event: IoInput) -> None:
        self.world.after(LATENCY_NS, lambda: to.tell(event))

    def connect_raw(self, address: str, on_input: Callable[[IoInput], None]) -> RawEnd:
        """A third party's connection to ``address`` (a test's hands on the wire)."""
        listener = self.listeners.get(address)
        if listener is None:
            raise ConnectionRefusedError(address)
        end = RawEnd(self, on_input)
        mine, theirs = self.conn_id(), self.conn_id()
        self.links[mine], self.links[theirs] = (listener, theirs), (end, mine)
        end.conn = mine
        self.deliver(listener, Accepted(theirs, "192.0.2.66:40000"))
        return end


class RawEnd:
    """A connection end a test drives by hand."""

    def __init__(self, tcp: SimTcp, on_input: Callable[[IoInput], None]) -> None:
        self.tcp, self.on_input, self.conn = tcp, on_input, 0

    def tell(self, event: IoInput) -> None:
        self.on_input(event)

    def send(self, data: bytes) -> None:
        other, conn = self.tcp.links[self.conn]
        self.tcp.deliver(other, Received(conn, data))

    def close(self) -> None:
        link = self.tcp.links.pop(self.conn, None)
        if link is not None:
            other, conn = link
            self.tcp.links.pop(conn, None)
            self.tcp.deliver(other, Closed(conn, "the peer closed it"))


class SimGenesisNet:
    """One node's end of :class:`SimTcp`."""

    def __init__(self, tcp: SimTcp, seed: str) -> None:
        self.tcp = tcp
        self.rng = random.Random(f"ppn-sim-genesis/{seed}")
        self._emit: Emit = lambda event: None
        self.listening: str | None = None
        self.conns: set[int] = set()

    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def close(self) -> None:
        pass

    def tell(self, event: IoInput) -> None:
        if isinstance(event, Accepted):
            self.conns.add(event.conn)
        if isinstance(event, Received | Closed) and event.conn not in self.conns:
            return  # closed here already
        if isinstance(event, Closed):
            self.conns.discard(event.conn)
        if isinstance(event, Received):
            for i in range(0, len(event.data), MAX_READ):
                self._emit(Received(event.conn, event.data[i:i + MAX_READ]))
            return
        self._emit(event)

    def submit(self, request: IoRequest, answer: Answer) -> None:
        rid = request.request_id
        out: Any
        if type(request) is Entropy:
            out = IoResult(rid, {"bytes": bytes(self.rng.getrandbits(8)
                                                for _ in range(request.n))})
        elif type(request) is Listen:
            address = f"{request.host}:{request.port}"
            if self.listening is not None or address in self.tcp.listeners:
                out = IoFailure(rid, f"cannot listen on {address}: address already in use")
            else:
                self.listening = address
                self.tcp.listeners[address] = self
                out = IoResult(rid, {"listening": address})
        elif type(request) is StopListening:
            if self.listening is not None:
                self.tcp.listeners.pop(self.listening, None)
                self.listening = None
            out = IoResult(rid, {})
        elif type(request) is Connect:
            address = f"{request.host}:{request.port}"
            listener = self.tcp.listeners.get(address)
            if listener is None:
                out = IoFailure(rid, f"cannot connect to {address}: connection refused")
            else:
                mine, theirs = self.tcp.conn_id(), self.tcp.conn_id()
                self.tcp.links[mine], self.tcp.links[theirs] = (listener, theirs), (self, mine)
                self.conns.add(mine)
                self.tcp.deliver(listener, Accepted(theirs, "192.0.2.99:40000"))
                out = IoResult(rid, {"conn": mine})
        elif type(request) is SendBytes:
            link = self.tcp.links.get(request.conn)
            if link is None or request.conn not in self.conns:
                out = IoFailure(rid, f"connection {request.conn} is closed")
            else:
                other, conn = link
                self.tcp.deliver(other, Received(conn, request.data))
                out = IoResult(rid, {"sent": len(request.data)})
        elif type(request) is CloseConn:
            self.conns.discard(request.conn)
            link = self.tcp.links.pop(request.conn, None)
            if link is not None:
                other, conn = link
                self.tcp.links.pop(conn, None)
                self.tcp.deliver(other, Closed(conn, "the peer closed it"))
            out = IoResult(rid, {})
        else:
            out = IoFailure(rid, f"simulated TCP: no such request {type(request).__name__}")
        self.tcp.world.after(ANSWER_NS, lambda: answer(out))
