"""The simulated twin of pd-network-admin's announcement adapter: datagrams between
simulated nodes' mesh addresses, in virtual time, signed with each node's own key.
:meth:`SimAnnounceNet.inject` lets a test play a forger or a replayer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actors.io.base import Answer, Emit
from actors.pds.announce import (
    CONTEXT,
    AnnounceReceived,
    BindAnnounce,
    SendAnnounce,
    SignAnnounce,
)
from actors.pds.base import IoFailure, IoRequest, IoResult
from ledger.keys import NodeKeys

if TYPE_CHECKING:
    from sims.host import World

LATENCY_NS = 300_000


class SimAnnounceNet:
    """One node's announcement socket on a shared ``sockets`` table (address -> node)."""

    def __init__(self, world: World, sockets: dict[str, SimAnnounceNet], keys: NodeKeys
                 ) -> None:
        self.world, self.sockets, self._keys = world, sockets, keys
        self._emit: Emit = lambda event: None
        self.bound: str | None = None
        self.wire: list[bytes] = []  # every datagram sent from here (what a tap would see)

    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def close(self) -> None:
        pass

    def inject(self, source: str, data: bytes) -> None:
        self.world.after(LATENCY_NS, lambda: self._emit(AnnounceReceived(source, data)))

    def submit(self, request: IoRequest, answer: Answer) -> None:
        rid = request.request_id
        out: Any
        if type(request) is SignAnnounce:
            out = IoResult(rid, {"signature":
                                 self._keys.signing_key.sign(CONTEXT + request.body).signature})
        elif type(request) is BindAnnounce:
            address = f"{request.host}:{request.port}"
            if self.bound is not None:
                self.sockets.pop(self.bound, None)
            self.bound = address
            self.sockets[address] = self
            out = IoResult(rid, {"bound": address})
        elif type(request) is SendAnnounce:
            self.wire.append(request.data)
            to = self.sockets.get(f"{request.host}:{request.port}")
            if to is not None and self.bound is not None:
                to.inject(self.bound, request.data)
            out = IoResult(rid, {"sent": len(request.data)})  # UDP: sent is all it knows
        else:
            out = IoFailure(rid, f"simulated announcements: no {type(request).__name__}")
        self.world.after(50_000, lambda: answer(out))
