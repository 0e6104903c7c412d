"""Membership announcements between simulated nodes: a mesh grown by ceremonies (laptop-b
the founder and hub; laptop-a, then cloud, admitted by it); every member learns of each
new node and of each removal, pushed; forged, replayed and strangers' announcements are
dropped and counted."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog

from actors.pds import announce
from ledger.keys import NodeKeys
from sims.backends.announce_net import SimAnnounceNet
from sims.backends.genesis_net import SimGenesisNet, SimTcp
from sims.host import World
from sims.node import SimNode, build_node, node_keys, scratch_directory

SEEDS = {"laptop-b": 51, "laptop-a": 52, "cloud": 53}


class Mesh:
    def __init__(self, d: Path) -> None:
        self.world = World(rng=random.Random("ppn-sim-announce"))
        self.tcp = SimTcp(self.world)
        self.sockets: dict[str, SimAnnounceNet] = {}
        self.nodes: dict[str, SimNode] = {}
        self.nets: dict[str, SimAnnounceNet] = {}
        for i, (name, seed) in enumerate(SEEDS.items()):
            net = SimAnnounceNet(self.world, self.sockets, node_keys(seed))
            self.nets[name] = net
            self.nodes[name] = build_node(
                d / name, seed, name=name, role="hub" if i == 0 else "node",
                mesh_ip="10.8.0.1" if i == 0 else None, endpoint=f"192.0.2.{i + 1}:51820",
                world=self.world, adapters={"pd-genesis": SimGenesisNet(self.tcp, name),
                                            "pd-network-admin": net})
        self.world.run_for(1)

    def call(self, at: str, op: str, run: float = 2.0, **fields: Any) -> dict[str, Any]:
        node = self.nodes[at]
        entry = next(c.cap_id for c in node.kernel.state.caps.values()
                     if c.obj == "endpoint:pd-network-admin" and c.parent is None)
        answers: list[Any] = []
        node.kernel.operator().call(entry, {"op": op, **fields}, answers.append)
        self.world.run_for(run)
        assert len(answers) == 1, (op, answers)
        out: dict[str, Any] = answers[0]
        return out

    def join(self, new: str, listen: str) -> None:
        opened = self.call(new, "pair.start", listen=listen)
        taken = sorted({m.mesh_ip for m in self.nodes["laptop-b"].ledger.state.members.values()})
        done = self.call("laptop-b", "pair.approve", code=opened["code"], peer=listen,
                         taken=taken)
        assert done["ok"], done
        self.world.run_for(3)

    def members(self, name: str) -> list[str]:
        return sorted(self.nodes[name].ledger.state.members)

    def jsonl(self, name: str) -> bytes:
        return (self.nodes[name].directory / "nodes.jsonl").read_bytes()

    def heard(self, name: str) -> dict[str, int]:
        out: dict[str, int] = self.call(name, "mesh.member.list", run=0.5)["heard"]
        return out


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    with scratch_directory("ppn-simann-") as d, structlog.testing.capture_logs():
        m = Mesh(d)
        try:
            m.join("laptop-a", "192.0.2.2:7000")
            yield m
        finally:
            for node in m.nodes.values():
                node.close()


def test_every_member_learns_of_a_new_node_and_the_files_agree(mesh: Mesh) -> None:
    assert mesh.members("laptop-a") == mesh.members("laptop-b") == ["laptop-a", "laptop-b"]
    start = mesh.world.clock.elapsed
    mesh.join("cloud", "192.0.2.3:7000")
    assert mesh.members("laptop-a") == ["cloud", "laptop-a", "laptop-b"]
    assert mesh.jsonl("laptop-a") == mesh.jsonl("laptop-b") == mesh.jsonl("cloud")
    assert mesh.heard("laptop-a") == {"recorded": 1, "not news": 2}  # sent three times
    # The hub peers with both spokes; a spoke only with the hub.
    assert sorted(mesh.nodes["laptop-b"].ledger.state.peers) == ["cloud", "laptop-a"]
    assert sorted(mesh.nodes["laptop-a"].ledger.state.peers) == ["laptop-b"]
    assert mesh.world.clock.elapsed - start < 10


def test_a_removal_is_pushed_to_every_member(mesh: Mesh) -> None:
    mesh.join("cloud", "192.0.2.3:7000")
    assert mesh.call("laptop-b", "mesh.member.remove", name="cloud")["ok"]
    mesh.world.run_for(1)  # the first of its sends: no poll a minute later
    for name in ("laptop-b", "laptop-a"):
        assert "cloud" not in mesh.members(name), name
        assert "cloud" not in mesh.nodes[name].ledger.state.peers
    assert mesh.jsonl("laptop-a") == mesh.jsonl("laptop-b")
    no = mesh.call("laptop-a", "mesh.member.remove", name="nobody")
    assert no["ok"] is False and "no member 'nobody'" in no["error"]
    no = mesh.call("laptop-b", "mesh.member.remove", name="laptop-b")
    assert no["ok"] is False and "cannot remove itself" in no["error"]


def _forge(mesh: Mesh, keys: NodeKeys, kind: str, record: dict[str, Any], by: str,
           at_ns: int) -> bytes:
    a = announce.Announcement(kind, record, by, at_ns)
    return announce.datagram(a, keys.signing_key.sign(announce.CONTEXT +
                                                      announce.body(a)).signature)


def test_forged_replayed_and_strangers_announcements_are_dropped_and_counted(
        mesh: Mesh) -> None:
    mesh.join("cloud", "192.0.2.3:7000")
    a_net = mesh.nets["laptop-a"]
    old = [d for d in mesh.nets["laptop-b"].wire]
    record = {"name": "evil", "wg_key": b"\x01" * 32, "signing_key": b"\x02" * 32,
              "mesh_ip": "10.8.0.66", "endpoint": "", "role": "hub", "joined_ns": 5,
              "approved_by": "laptop-b"}
    before = mesh.heard("laptop-a")
    stranger = node_keys(99)
    a_net.inject("10.8.0.1:51900", _forge(mesh, stranger, "added", record, "laptop-b", 5))
    a_net.inject("10.8.0.9:51900", _forge(mesh, stranger, "added",
                                          {**record, "approved_by": "mallory"}, "mallory", 5))
    a_net.inject("10.8.0.1:51900", b"\x93\x01garbage")
    a_net.inject("10.8.0.1:51900", msgpack.packb([1, b"x", b"y" * 64]))
    a_net.inject("10.8.0.1:51900", b"\x00" * 5000)
    for data in old:  # every announcement laptop-b sent so far, again
        a_net.inject("10.8.0.1:51900", data)
    mesh.world.run_for(1)
    after = mesh.heard("laptop-a")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("recorded", 0) == 0
    assert delta["bad signature"] == 1 and delta["not from a member"] == 1
    assert delta["malformed"] == 3 and delta["not news"] == len(old)
    assert "evil" not in mesh.members("laptop-a")
    # A removal, then the old addition replayed: the removed node does not come back.
    assert mesh.call("laptop-b", "mesh.member.remove", name="cloud")["ok"]
    mesh.world.run_for(3)
    for data in old:
        a_net.inject("10.8.0.1:51900", data)
    mesh.world.run_for(1)
    assert "cloud" not in mesh.members("laptop-a")
