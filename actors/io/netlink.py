"""pd-net-driver's real adapter: links and addresses through netlink (pyroute2), and
underlay datagrams through a UDP socket.

Runs on its own worker thread (``WorkerAdapter``): a netlink dump or a send never
blocks the PD's handler.  ``netns`` reads another network namespace than the
node's own (pyroute2's ``IPRoute(netns=...)``); by default it is the namespace the
node runs in.  Nothing here runs ``ip``.
"""

from __future__ import annotations

import socket
from socket import AF_INET, AF_INET6
from typing import Any

from actors.io.base import Emit, WorkerAdapter
from actors.io.wireguard import TunnelProcesses, configure_link
from actors.pds.base import IoAnswer, IoFailure, IoRequest, IoResult
from actors.pds.pd_net_driver import ConfigureLink, ListLinks, SendDatagram, StartTunnel

FAMILIES = {AF_INET: "inet", AF_INET6: "inet6"}


class NetlinkAdapter(WorkerAdapter):
    name = "netlink"

    def __init__(self, netns: str | None = None, *, tunnels: bool = True) -> None:
        self._netns = netns
        self._tunnels_on = tunnels
        self._ipr: Any = None
        self._udp: socket.socket | None = None
        self.tunnels = TunnelProcesses()
        super().__init__()

    def attach(self, emit: Emit) -> None:
        super().attach(emit)
        self.tunnels.emit = emit

    def perform(self, request: IoRequest) -> IoAnswer:
        if type(request) is ListLinks:
            return IoResult(request.request_id, {"links": self._links()})
        if type(request) is StartTunnel and not self._tunnels_on:
            return IoFailure(request.request_id, "the tunnel is off (ppn node run --no-tunnel)")
        if type(request) is StartTunnel:
            return IoResult(request.request_id, self.tunnels.start(request.interface))
        if type(request) is ConfigureLink:
            return IoResult(request.request_id, configure_link(
                self._iproute(), request.interface, request.address, request.forwarding))
        if type(request) is SendDatagram:
            host, _, port = request.to.rpartition(":")
            if self._udp is None:
                self._udp = socket.socket(AF_INET, socket.SOCK_DGRAM)
            sent = self._udp.sendto(request.data, (host, int(port)))
            return IoResult(request.request_id, {"sent": sent})
        return IoFailure(request.request_id, f"netlink: no such request {type(request).__name__}")

    def _iproute(self) -> Any:
        if self._ipr is None:  # imported when first needed: pyroute2 costs ~9 MB of RSS
            from pyroute2 import IPRoute
            # flags=0: read a namespace that exists, never create one (pyroute2's default)
            self._ipr = IPRoute(netns=self._netns, flags=0) if self._netns else IPRoute()
        return self._ipr

    def _links(self) -> list[dict[str, Any]]:
        ipr = self._iproute()
        addresses: dict[int, list[dict[str, Any]]] = {}
        for a in ipr.get_addr():
            family = FAMILIES.get(a["family"])
            if family is None:
                continue
            addresses.setdefault(a["index"], []).append(
                {"family": family, "address": a.get_attr("IFA_ADDRESS"),
                 "prefixlen": a["prefixlen"]})
        links = []
        for link in ipr.get_links():
            index = link["index"]
            links.append({
                "index": index, "name": link.get_attr("IFLA_IFNAME"),
                "state": link.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                "addresses": sorted(addresses.get(index, []),
                                    key=lambda x: (x["family"], x["address"])),
            })
        return sorted(links, key=lambda x: x["index"])

    def close(self) -> None:
        self.tunnels.close()
        super().close()
        for thing in (self._ipr, self._udp):
            if thing is not None:
                thing.close()
