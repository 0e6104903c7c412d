"""The Genesis ceremony between two simulated nodes (virtual clock, simulated TCP): pairing,
a wrong code, expiry and a late approval, one guess, the hourly limit, and what is
recorded (never the code)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ledger import audit
from ledger.catalog import (
    REGISTRY,
    DispatchGranted,
    GenesisAborted,
    GenesisCompleted,
    GenesisExpired,
    GenesisOpened,
    GenesisPolicy,
)
from sims.backends.genesis_net import SimGenesisNet, SimTcp
from sims.host import World
from sims.node import SimNode, build_node, scratch_directory

JOIN_AT = "192.0.2.4:7000"


class Pair:
    def __init__(self, d: Path) -> None:
        self.world = World(rng=random.Random("ppn-sim-genesis"))
        self.tcp = SimTcp(self.world)
        self.admin: SimNode = build_node(
            d / "b", 41, name="laptop-b", role="hub", mesh_ip="10.8.0.1",
            endpoint="192.0.2.1:51820", world=self.world,
            adapters={"pd-genesis": SimGenesisNet(self.tcp, "laptop-b")})
        self.new: SimNode = build_node(
            d / "c", 42, name="laptop-c", role="node", mesh_ip=None,
            endpoint="192.0.2.4:51820", world=self.world,
            adapters={"pd-genesis": SimGenesisNet(self.tcp, "laptop-c")})
        self.world.run_for(1)

    def call(self, node: SimNode, op: str, run: float = 2.0, **fields: Any) -> dict[str, Any]:
        entry = next(c.cap_id for c in node.kernel.state.caps.values()
                     if c.obj == "endpoint:pd-network-admin" and c.parent is None)
        answers: list[Any] = []
        node.kernel.operator().call(entry, {"op": op, **fields}, answers.append)
        self.world.run_for(run)
        assert len(answers) == 1, (op, answers)
        out: dict[str, Any] = answers[0]
        return out

    def events(self, node: SimNode, family: str = "genesis.") -> list[Any]:
        return [e.event for e in audit.entries(node.directory)
                if REGISTRY.type_of(e.event).tag.startswith(family)
                and type(e.event) is not GenesisPolicy]  # (init's, not a ceremony's)

    def close(self) -> None:
        self.admin.close()
        self.new.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    with scratch_directory("ppn-simgen-") as d, structlog.testing.capture_logs():
        p = Pair(d)
        try:
            yield p
        finally:
            p.close()


def test_pairing_adds_the_node_on_both_sides_and_the_hub_rule_peers(pair: Pair) -> None:
    opened = pair.call(pair.new, "pair.start", listen=JOIN_AT)
    assert opened["ok"] and len(opened["code"].replace("-", "")) == 8
    done = pair.call(pair.admin, "pair.approve", code=opened["code"].lower(), peer=JOIN_AT)
    assert done == {"ok": True, "ceremony": 1, "peer": "laptop-c", "mesh_ip": "10.8.0.2"}
    pair.world.run_for(2)
    for node, peer in ((pair.admin, "laptop-c"), (pair.new, "laptop-b")):
        kinds = [type(e) for e in pair.events(node)]
        assert kinds == [GenesisOpened, GenesisCompleted], node.name
        assert pair.events(node)[1].peer == peer
        # The fleet's authority, recorded on both sides, signed by each pd-ledger.
        grants = [(e.event, e.signature) for e in audit.entries(node.directory)
                  if type(e.event) is DispatchGranted]
        assert [(g.grantee, g.target, g.objects) for g, _ in grants] == [
            ("laptop-b", "laptop-c", ("vm.control", "vm.query"))]
        assert grants[0][1] is not None and len(grants[0][1]) == 64
        assert grants[0][0].transcript == pair.events(node)[1].transcript
    assert pair.events(pair.admin)[1].transcript == pair.events(pair.new)[1].transcript
    new_state, admin_state = pair.new.ledger.state, pair.admin.ledger.state
    assert new_state.node is not None and new_state.node["mesh_ip"] == "10.8.0.2"
    assert sorted(new_state.members) == sorted(admin_state.members) == ["laptop-b", "laptop-c"]
    for name in ("laptop-b", "laptop-c"):  # the same entry on both sides
        a, b = new_state.members[name], admin_state.members[name]
        assert (a.signing_key, a.wg_public_key, a.mesh_ip, a.endpoint, a.role) == \
            (b.signing_key, b.wg_public_key, b.mesh_ip, b.endpoint, b.role)
    # pd-wireguard follows membership: the hub has the new spoke, the spoke the hub.
    assert admin_state.peers["laptop-c"].allowed_ips == ("10.8.0.2/32",)
    assert new_state.peers["laptop-b"].allowed_ips == ("10.8.0.0/24",)
    assert new_state.peers["laptop-b"].keepalive == 25
    status = pair.new.ledger.state.genesis  # what `ppn pair` reads (pd-genesis is reaped)
    assert status["open"] is None and status["last"]["outcome"] == "completed"
    assert status["last"]["peer"] == "laptop-b"
    jsonl = [(n.directory / "nodes.jsonl").read_bytes() for n in (pair.admin, pair.new)]
    # Both pd-genesis are reaped: their capabilities gone, any former one refused.
    for node in (pair.admin, pair.new):
        st = node.ledger.state
        assert st.pd_status["pd-genesis"] == "reaped"
        assert not [c for c in st.caps.values()
                    if c.holder == "pd-genesis" or c.obj == "endpoint:pd-genesis"]
    assert jsonl[0] == jsonl[1] and b'"approved_by":"laptop-b"' in jsonl[0]
    for node in (pair.admin, pair.new):  # the code is nowhere in the ledger
        raw = b"".join(p.read_bytes() for p in node.directory.iterdir() if p.is_file())
        for form in (opened["code"], opened["code"].replace("-", "")):
            assert form.encode() not in raw


def test_a_wrong_code_adds_nothing_and_the_code_is_dead(pair: Pair) -> None:
    opened = pair.call(pair.new, "pair.start", listen=JOIN_AT)
    from actors.pds.genesis_proto import new_code
    wrong = new_code(random.Random("wrong").randbytes)
    no = pair.call(pair.admin, "pair.approve", code=wrong, peer=JOIN_AT)
    assert no["ok"] is False and "code mismatch" in no["error"]
    pair.world.run_for(1)
    for node in (pair.admin, pair.new):
        evs = pair.events(node)
        assert [type(e) for e in evs] == [GenesisOpened, GenesisAborted]
        assert evs[1].reason == "code mismatch"
        assert sorted(node.ledger.state.members) == [node.name] if node is pair.admin \
            else node.ledger.state.members == {}
    late = pair.call(pair.admin, "pair.approve", code=opened["code"], peer=JOIN_AT)
    assert late["ok"] is False and "cannot connect to 192.0.2.4:7000" in late["error"]


def test_past_its_window_the_code_expires_and_a_late_approval_is_refused(pair: Pair) -> None:
    opened = pair.call(pair.new, "pair.start", listen=JOIN_AT, window=600)
    pair.world.run_for(590)
    assert pair.new.ledger.state.genesis["open"] is not None
    pair.world.run_for(10)
    assert [type(e) for e in pair.events(pair.new)] == [GenesisOpened, GenesisExpired]
    late = pair.call(pair.admin, "pair.approve", code=opened["code"], peer=JOIN_AT)
    assert late["ok"] is False and "cannot connect to 192.0.2.4:7000" in late["error"]
    assert pair.events(pair.admin) == [] and pair.new.ledger.state.members == {}


def test_a_third_party_connecting_first_spends_the_one_guess(pair: Pair) -> None:
    opened = pair.call(pair.new, "pair.start", listen=JOIN_AT)
    heard: list[Any] = []
    raw = pair.tcp.connect_raw(JOIN_AT, heard.append)
    pair.world.run_for(0.1)
    raw.send(b"\x00\x00\x00\x05hello")  # not a frame
    pair.world.run_for(1)
    evs = pair.events(pair.new)
    assert [type(e) for e in evs] == [GenesisOpened, GenesisAborted]
    assert "not msgpack" in evs[1].reason
    no = pair.call(pair.admin, "pair.approve", code=opened["code"], peer=JOIN_AT)
    assert no["ok"] is False and pair.new.ledger.state.members == {}


def test_a_mistyped_code_is_refused_before_any_network_use(pair: Pair) -> None:
    opened = pair.call(pair.new, "pair.start", listen=JOIN_AT)
    code = opened["code"].replace("-", "")
    typo = code[:-1] + ("0" if code[-1] != "0" else "1")
    no = pair.call(pair.admin, "pair.approve", code=typo, peer=JOIN_AT)
    assert no["ok"] is False and "mistyped" in no["error"] and code not in no["error"]
    assert pair.events(pair.admin) == []
    assert pair.new.ledger.state.genesis["open"] is not None  # still waiting
    assert pair.call(pair.admin, "pair.approve", code=code, peer=JOIN_AT)["ok"]


def test_the_roles_are_kept_and_ceremonies_are_limited_per_hour(pair: Pair) -> None:
    no = pair.call(pair.admin, "pair.start", listen="192.0.2.1:7000")
    assert no["ok"] is False and "a member already" in no["error"]
    no = pair.call(pair.new, "pair.approve", code="0000000", peer="192.0.2.1:7000")
    assert no["ok"] is False and "not a member" in no["error"]
    for _ in range(10):
        assert pair.call(pair.new, "pair.start", listen=JOIN_AT, window=5)["ok"]
        pair.world.run_for(6)
    no = pair.call(pair.new, "pair.start", listen=JOIN_AT)
    assert no["ok"] is False and "10 ceremonies began in the last hour" in no["error"]
    pair.world.run_for(3600)
    assert pair.call(pair.new, "pair.start", listen=JOIN_AT)["ok"]
