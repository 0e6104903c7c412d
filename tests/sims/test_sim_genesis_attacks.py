"""Attacks on membership announcements and on pd-genesis's wire inputs, in the simulator
(virtual clock, simulated TCP and UDP; the mesh of tests/sims/test_sim_announce.py).

Two strict xfails document a fault in files this change may not edit: a member with no
tombstone for a removed node (it missed the removal, or joined after it) records an old,
validly signed addition of that node -- a replay resurrects it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from actors.pds.genesis_io import Closed, Received
from sims.node import scratch_directory
from tests.sims.test_sim_announce import Mesh


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with scratch_directory("ppn11x-") as d, structlog.testing.capture_logs():
        m = Mesh(d)
        try:
            m.join("laptop-a", "192.0.2.2:7000")
            yield m
        finally:
            for node in m.nodes.values():
                node.close()


def _added(mesh: Mesh, name: str) -> list[bytes]:
    """Every datagram laptop-b sent so far announcing ``name``'s addition."""
    from actors.pds import announce
    out = []
    for data in mesh.nets["laptop-b"].wire:
        a, _, _ = announce.parse(data)
        if a.kind == "added" and a.record["name"] == name:
            out.append(data)
    return out


def test_reordered_and_replayed_announcements_change_nothing_on_a_member_that_saw_them(
        mesh: Mesh) -> None:
    """Probes: remove-after-re-add and add-after-remove orderings on a member that heard
    everything: every old announcement replayed in reverse order after the removal is a
    no-op, counted as not news; nodes.jsonl stays equal to the approving node's."""
    mesh.join("cloud", "192.0.2.3:7000")
    assert mesh.call("laptop-b", "mesh.member.remove", name="cloud")["ok"]
    mesh.world.run_for(4)
    before = mesh.heard("laptop-a")
    for data in reversed(list(mesh.nets["laptop-b"].wire)):
        mesh.nets["laptop-a"].inject("10.8.0.1:51900", data)
    mesh.world.run_for(1)
    after = mesh.heard("laptop-a")
    assert after.get("recorded", 0) == before.get("recorded", 0)
    assert "cloud" not in mesh.members("laptop-a")
    assert mesh.jsonl("laptop-a") == mesh.jsonl("laptop-b")


def test_an_addition_arriving_after_its_removal_does_not_resurrect_the_node(
        mesh: Mesh) -> None:
    """Probes: reordering -- laptop-a misses cloud's addition (its socket is away), hears
    the removal first, then the addition (a resend, or an attacker's replay).  cloud must
    stay out of laptop-a's membership, as it is out of laptop-b's."""
    a_sock = mesh.sockets.pop("10.8.0.2:51900")
    mesh.join("cloud", "192.0.2.3:7000")  # laptop-a hears nothing of it
    mesh.world.run_for(4)
    mesh.sockets["10.8.0.2:51900"] = a_sock
    assert mesh.call("laptop-b", "mesh.member.remove", name="cloud")["ok"]
    mesh.world.run_for(4)
    for data in _added(mesh, "cloud"):
        mesh.nets["laptop-a"].inject("10.8.0.1:51900", data)
    mesh.world.run_for(1)
    assert "cloud" not in mesh.members("laptop-b")
    assert "cloud" not in mesh.members("laptop-a")


def test_a_replayed_addition_does_not_resurrect_a_removed_node_on_a_later_member(
        mesh: Mesh) -> None:
    """Probes: replay across membership -- cloud (10.8.0.3) is admitted, then removed with
    laptop-a (10.8.0.2); a new node then joins (it is given 10.8.0.2).  laptop-b's old,
    validly signed announcement of cloud's addition, replayed to it, must be dropped."""
    mesh.join("cloud", "192.0.2.3:7000")
    old = _added(mesh, "cloud")
    assert mesh.call("laptop-b", "mesh.member.remove", name="cloud")["ok"]
    assert mesh.call("laptop-b", "mesh.member.remove", name="laptop-a")["ok"]
    mesh.world.run_for(4)
    # laptop-a's node rejoins under its own name is impossible (its ledger says member):
    # the newcomer is a fresh node on laptop-a's old address.
    from sims.backends.announce_net import SimAnnounceNet
    from sims.backends.genesis_net import SimGenesisNet
    from sims.node import build_node, node_keys
    net = SimAnnounceNet(mesh.world, mesh.sockets, node_keys(54))
    mesh.nets["late"] = net
    mesh.nodes["late"] = build_node(
        mesh.nodes["laptop-b"].directory.parent / "late", 54, name="late", role="node",
        mesh_ip=None,  # type: ignore[arg-type]
        endpoint="192.0.2.5:51820", world=mesh.world,
        adapters={"pd-genesis": SimGenesisNet(mesh.tcp, "late"), "pd-network-admin": net})
    mesh.world.run_for(1)
    mesh.sockets.pop("10.8.0.2:51900", None)  # laptop-a's old socket: the address is free
    mesh.join("late", "192.0.2.5:7000")
    assert "cloud" not in mesh.members("late")
    for data in old:
        net.inject("10.8.0.1:51900", data)
    mesh.world.run_for(1)
    assert "cloud" not in mesh.members("late")


def test_stale_closed_and_received_for_an_old_connection_do_not_touch_a_new_ceremony(
        mesh: Mesh) -> None:
    """Probes: a Closed and a Received (garbage) for the connection of an earlier,
    aborted ceremony, delivered late while a new ceremony runs: the new one completes."""
    opened = mesh.call("cloud", "pair.start", listen="192.0.2.3:7000")
    raw = mesh.tcp.connect_raw("192.0.2.3:7000", lambda e: None)
    mesh.world.run_for(0.1)
    raw.send(b"\x00\x00\x00\x01\xc1")
    mesh.world.run_for(2)
    stale = 10_000  # a number no connection has
    old_conn = raw.conn + 1  # the listener's end of the raw connection
    opened = mesh.call("cloud", "pair.start", listen="192.0.2.3:7000")
    mesh.world.run_for(0.01)
    genesis_net = mesh.tcp.listeners["192.0.2.3:7000"]  # cloud's adapter, listening
    for conn in (old_conn, stale):
        genesis_net._emit(Received(conn, b"\x00\x00\x00\x01\xc1"))
        genesis_net._emit(Closed(conn, "late"))
    taken = sorted({m.mesh_ip for m in mesh.nodes["laptop-b"].ledger.state.members.values()})
    done = mesh.call("laptop-b", "pair.approve", code=opened["code"], peer="192.0.2.3:7000",
                     taken=taken)
    assert done["ok"], done
    assert "cloud" in mesh.members("laptop-b") and "cloud" in mesh.members("cloud")
