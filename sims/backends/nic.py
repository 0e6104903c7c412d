"""The simulated twin of pd-net-driver's netlink adapter (``actors.io.netlink``).

Same requests, same answers, in virtual time: ``ListLinks`` reports a simulated
NIC (``lo`` and ``eth0`` with the node's underlay address), ``SendDatagram`` puts
the datagram on the simulated :class:`~sims.backends.underlay.Underlay`, and a
datagram that arrives is unsolicited input (``DatagramReceived``), as a socket's
would be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actors.io.base import Answer, Emit
from actors.pds.base import IoFailure, IoRequest, IoResult
from actors.pds.pd_net_driver import DatagramReceived, ListLinks, SendDatagram
from sims.backends.underlay import Underlay

if TYPE_CHECKING:
    from sims.backends.wireguard import SimTunnels

ANSWER_NS = 20_000  # how long a netlink dump or a send takes, in virtual nanoseconds


class SimNic:
    def __init__(self, underlay: Underlay, endpoint: str, *, mac: str = "02:00:00:00:00:01",
                 mtu: int = 1500, tunnels: SimTunnels | None = None) -> None:
        self.underlay, self.endpoint = underlay, endpoint
        self.tunnels = tunnels  # the node's simulated WireGuard device, if it has one
        self.ip = endpoint.rpartition(":")[0]
        self.mac, self.mtu = mac, mtu
        self._emit: Emit = lambda event: None
        underlay.attach(endpoint, self)

    def attach(self, emit: Emit) -> None:
        self._emit = emit
        if self.tunnels is not None:
            self.tunnels.attach(emit)

    def submit(self, request: IoRequest, answer: Answer) -> None:
        world = self.underlay.world
        if self.tunnels is not None and self.tunnels.handles(request):
            self.tunnels.submit(request, answer)
        elif type(request) is ListLinks:
            value: dict[str, Any] = {"links": self.links()}
            world.after(ANSWER_NS, lambda: answer(IoResult(request.request_id, value)))
        elif type(request) is SendDatagram:
            self.underlay.send(self.endpoint, request.to, request.data)
            sent = {"sent": len(request.data)}
            world.after(ANSWER_NS, lambda: answer(IoResult(request.request_id, sent)))
        else:
            world.after(ANSWER_NS, lambda: answer(IoFailure(
                request.request_id, f"simulated NIC: no such request {type(request).__name__}")))

    def arrive(self, source: str, data: bytes) -> None:
        self._emit(DatagramReceived(source, data))

    def links(self) -> list[dict[str, Any]]:
        return [
            {"index": 1, "name": "lo", "state": "UNKNOWN", "mac": "00:00:00:00:00:00",
             "mtu": 65536, "addresses": [{"family": "inet", "address": "127.0.0.1",
                                          "prefixlen": 8}]},
            {"index": 2, "name": "eth0", "state": "UP", "mac": self.mac, "mtu": self.mtu,
             "addresses": [{"family": "inet", "address": self.ip, "prefixlen": 24}]},
            *self._tunnel_link(),
        ]

    def _tunnel_link(self) -> list[dict[str, Any]]:
        d = None if self.tunnels is None else self.tunnels.device
        if d is None or not d.running or d.interface is None:
            return []
        addresses = [] if d.address is None else [
            {"family": "inet", "address": str(d.address.ip),
             "prefixlen": d.address.network.prefixlen}]
        return [{"index": 3, "name": d.interface, "state": "UNKNOWN", "mac": None,
                 "mtu": 1420, "addresses": addresses}]

    def close(self) -> None:
        pass
