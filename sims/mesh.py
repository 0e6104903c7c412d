"""Several simulated nodes in one world: one virtual clock, one seeded queue, one underlay.

Each node has its own ledger, kernel and host (``sims.node``); their pd-net-drivers
share a simulated :class:`~sims.backends.underlay.Underlay` (192.0.2.0/24), which
can add latency, lose, duplicate and partition datagrams.  Datagrams between nodes
go through the adapters' simulated twins like any other I/O, so the same seed gives
the same run on every node: the same ledger bytes and Merkle roots.

With ``tunnels`` (the default) every node also has a simulated WireGuard device
(``sims.backends.wireguard``), an endpoint and a mesh address in its ledger, and the
peers the hub rule gives it (the first node is the hub): pd-net-driver starts the
device and pd-wireguard sets it from the ledger, as on a real node, and
:meth:`Mesh.ping` sends an echo through the tunnels.  Periodic work (reconciliation,
keepalives) never lets the world fall idle then: run it for a while instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from actors.io.base import Adapter
from actors.kernel import Port
from actors.system import DEFAULT_LISTEN_PORT
from ledger.caps import Token
from ledger.catalog import WgPeerAdded
from ledger.commands import allowed_ips
from sims.backends.nic import SimNic
from sims.backends.underlay import Conditions, Underlay
from sims.backends.wireguard import SimDevice, SimTunnels, SimUapi, SimWireGuard
from sims.host import World
from sims.node import SimNode, build_node, node_keys

UNDERLAY_PORT = 51800
"""Where a node's own datagrams (pd-net-driver's ``udp.send``) are sent and heard;
WireGuard listens beside it, on its listen port."""
KEEPALIVE = 25


@dataclass
class Mesh:
    world: World
    underlay: Underlay
    nodes: dict[str, SimNode]
    nics: dict[str, SimNic]
    wireguard: SimWireGuard | None = None
    _pings: int = field(default=0, repr=False)

    def endpoint(self, name: str) -> str:
        return self.nics[name].endpoint

    def device(self, name: str) -> SimDevice:
        assert self.wireguard is not None, "a mesh built without tunnels"
        return self.wireguard.device(self.nics[name].ip)

    def net_token(self, name: str, pd: str = "pd-wireguard") -> Token:
        """``pd``'s capability on its node's ``net`` (to send datagrams through)."""
        node = self.nodes[name]
        return next(t for t in node.port(pd).tokens()
                    if node.kernel.state.caps[t.cap_id].obj == "net")

    def send(self, src: str, dst: str, data: bytes, pd: str = "pd-wireguard") -> None:
        """``pd`` on node ``src`` sends ``data`` to node ``dst``'s endpoint, through its net."""
        port: Port = self.nodes[src].port(pd)
        port.send(self.net_token(src, pd), {"op": "udp.send", "to": self.endpoint(dst),
                                            "data": data})

    def received(self, name: str) -> dict[str, int]:
        status = self.nodes[name].host.core_status("pd-net-driver") or {}
        got: dict[str, int] = status.get("datagrams_received", {})
        return got

    def ping(self, src: str, dst_ip: str, timeout: float = 2.0) -> tuple[float, int] | None:
        """An echo from ``src``'s tunnel address to ``dst_ip``, through the tunnels, in
        virtual time: (round trip in seconds, times forwarded there and back), or None."""
        self._pings += 1
        ident, device = self._pings, self.device(src)
        start = self.world.clock.elapsed
        device.ping(dst_ip, ident)
        while self.world.clock.elapsed - start < timeout:
            for p in device.received:
                if p.get("kind") == "reply" and p.get("id") == ident:
                    return self.world.clock.elapsed - start, int(p.get("hops", 0))
            if not self.world.step():
                break
        return None

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def build_mesh(directory: Path, seed: int, names: list[str], *,
               conditions: Conditions | None = None, tunnels: bool = True) -> Mesh:
    """A mesh of ``names`` in ``directory`` (one ledger each), node i at 192.0.2.(i+1) and,
    with ``tunnels``, 10.8.0.(i+1) on the mesh; the first node is the hub."""
    world = World(rng=random.Random(f"ppn-sim-world/{seed}"))
    underlay = Underlay(world, random.Random(f"ppn-sim-underlay/{seed}"),
                        conditions or Conditions())
    wireguard = SimWireGuard(underlay) if tunnels else None
    nodes: dict[str, SimNode] = {}
    nics: dict[str, SimNic] = {}
    roles = {name: "hub" if i == 0 else "node" for i, name in enumerate(names)}
    for i, name in enumerate(names):
        ip = f"192.0.2.{i + 1}"
        keys = node_keys(seed * 1000 + i)
        adapters: dict[str, Adapter] = {}
        if wireguard is None:
            nic = SimNic(underlay, f"{ip}:{UNDERLAY_PORT}", mac=f"02:00:00:00:00:{i + 1:02x}")
        else:
            device = wireguard.device(ip)
            nic = SimNic(underlay, f"{ip}:{UNDERLAY_PORT}", mac=f"02:00:00:00:00:{i + 1:02x}",
                         tunnels=SimTunnels(device))
            adapters["pd-wireguard"] = SimUapi(device, keys)
        nics[name] = nic
        adapters["pd-net-driver"] = nic
        nodes[name] = build_node(
            directory / name, seed * 1000 + i, name=name, role=roles[name],
            mesh_ip=f"10.8.0.{i + 1}", world=world, adapters=adapters,
            endpoint=None if wireguard is None else f"{ip}:{DEFAULT_LISTEN_PORT}",
            start=False)
    if wireguard is not None:  # each node's peers, by the hub rule, before it starts
        for name in names:
            node = nodes[name]
            node.ledger.append_many([
                WgPeerAdded(other, nodes[other].keys.wg_public_key,
                            f"192.0.2.{j + 1}:{DEFAULT_LISTEN_PORT}", f"10.8.0.{j + 1}",
                            roles[other], allowed_ips(roles[name], roles[other],
                                                      f"10.8.0.{j + 1}"), KEEPALIVE)
                for j, other in enumerate(names)
                if other != name and "hub" in (roles[name], roles[other])])
    for node in nodes.values():
        node.host.start_all()
    return Mesh(world, underlay, nodes, nics, wireguard)
