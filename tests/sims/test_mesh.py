"""Several nodes in one simulation: one virtual clock, one seeded queue, one underlay.

Datagrams go core -> pd-net-driver -> its simulated NIC -> the underlay -> the other
node's NIC -> its pd-net-driver (unsolicited input), through the same engine and
cores a real node runs.  A seed fixes everything, loss and duplication included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from sims.backends.underlay import Conditions
from sims.mesh import Mesh, build_mesh
from sims.node import scratch_directory

NAMES = ["cloud", "laptop-a", "laptop-b"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_directory("ppn-mesh-") as d, structlog.testing.capture_logs():
        yield d


def run(directory: Path, seed: int, conditions: Conditions | None = None) -> dict[str, Any]:
    mesh = build_mesh(directory, seed, NAMES, conditions=conditions, tunnels=False)
    try:
        traffic(mesh)
        return {"received": {n: mesh.received(n) for n in NAMES},
                "stats": dict(mesh.underlay.stats),
                "roots": [mesh.nodes[n].ledger.root() for n in NAMES],
                "elapsed": mesh.world.clock.elapsed}
    finally:
        mesh.close()


def traffic(mesh: Mesh) -> None:
    for i in range(60):
        mesh.send("laptop-a", "laptop-b", b"a->b %d" % i)
        mesh.send("cloud", "laptop-b", b"c->b %d" % i)
        mesh.send("laptop-b", "cloud", b"b->c %d" % i)
        mesh.world.run_for(0.001)
    mesh.world.run_until_idle()


def test_datagrams_cross_between_nodes_through_the_adapters(workdir: Path) -> None:
    mesh = build_mesh(workdir, 1, NAMES, tunnels=False)
    try:
        traffic(mesh)
        a, b, c = (mesh.endpoint(n) for n in NAMES[1:] + NAMES[:1])
        assert mesh.received("laptop-b") == {a: 60, c: 60}
        assert mesh.received("cloud") == {b: 60}
        assert mesh.received("laptop-a") == {}
        assert mesh.underlay.stats["delivered"] == 180
        # The nodes are separate: separate ledgers, keys and kernels.
        roots = {mesh.nodes[n].ledger.root() for n in NAMES}
        assert len(roots) == 3
        assert all(n.kernel.refused == {} for n in mesh.nodes.values())
    finally:
        mesh.close()


def test_a_partition_stops_datagrams_until_it_heals(workdir: Path) -> None:
    mesh = build_mesh(workdir, 2, NAMES, tunnels=False)
    try:
        ip = {n: mesh.endpoint(n).rpartition(":")[0] for n in NAMES}
        mesh.underlay.partition({ip["laptop-a"]}, {ip["laptop-b"]})
        mesh.send("laptop-a", "laptop-b", b"cut")
        mesh.send("cloud", "laptop-b", b"fine")
        mesh.world.run_until_idle()
        assert mesh.received("laptop-b") == {mesh.endpoint("cloud"): 1}
        assert mesh.underlay.stats["partitioned"] == 1
        mesh.underlay.heal()
        mesh.send("laptop-a", "laptop-b", b"healed")
        mesh.world.run_until_idle()
        assert mesh.received("laptop-b")[mesh.endpoint("laptop-a")] == 1
    finally:
        mesh.close()


def test_loss_and_duplication_are_seeded(workdir: Path) -> None:
    lossy = Conditions(loss=0.2, duplicate=0.1)
    first = run(workdir / "1", 7, lossy)
    again = run(workdir / "2", 7, lossy)
    assert first == again  # same seed: same losses, same copies, same ledgers
    stats = first["stats"]
    assert stats["sent"] == 180 and 10 < stats["lost"] < 70 and stats["duplicated"] > 0
    got = sum(sum(r.values()) for r in first["received"].values())
    assert got == stats["delivered"] == 180 - stats["lost"] + stats["duplicated"]
    other = run(workdir / "3", 8, lossy)
    assert other["stats"] != stats


def test_links_reach_the_operator_through_pd_network_admin(workdir: Path) -> None:
    mesh = build_mesh(workdir, 3, NAMES, tunnels=False)
    try:
        node = mesh.nodes["laptop-a"]
        entry = next(c.cap_id for c in node.kernel.state.caps.values()
                     if c.obj == "endpoint:pd-network-admin" and c.parent is None)
        answers: list[Any] = []
        operator = node.kernel.operator()
        operator.call(entry, {"op": "net.links"}, answers.append)
        mesh.world.run_until_idle()
        assert answers == [{"ok": True, "links": mesh.nics["laptop-a"].links()}]
        # Revoke the admin's net cap (with its parent's other children): the command fails
        # naming it, and nothing reaches pd-net-driver.
        admin_net = next(c for c in node.kernel.state.caps.values()
                         if c.holder == "pd-network-admin" and c.obj == "net")
        assert admin_net.parent is not None
        operator.revoke(admin_net.parent)
        operator.call(entry, {"op": "net.links"}, answers.append)
        mesh.world.run_until_idle()
        assert answers[1]["ok"] is False
        assert f"capability #{admin_net.cap_id} on net" in answers[1]["error"]
    finally:
        mesh.close()
