"""The deterministic host: virtual time, seeded latency, journal-first actions, supervision."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing

from actors.lifecycle import HostError
from actors.pds.base import Action, Append, Message, PdView, Send, SetTimer
from ledger.caps import CapRefused
from ledger.catalog import MemberAdded, PdFailed, PdRestarted
from ledger.scan import LogReader
from sims.host import EPOCH_NS, NS, SimulationError
from sims.node import SimNode, build_node, scratch_directory
from tests.cores import Crashy

FLEET, WG, ADMIN = "pd-fleet", "pd-wireguard", "pd-network-admin"


class Probe(Crashy):
    """Records what it sees (and when); does what a message or timer asks."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen: list[tuple[float, Any]] = []
        self.started_at: float | None = None

    def start(self, view: PdView, now: float) -> list[Action]:
        self.started_at = now
        return super().start(view, now)

    def handle(self, d: Message, now: float) -> list[Action]:
        self.seen.append((now, d.payload))
        p = d.payload if isinstance(d.payload, dict) else {}
        if p.get("op") == "timer":
            return [SetTimer(p["name"], p["delay"])]
        if p.get("op") == "journal-then-tell":  # the event must be durable before the send
            return [Send(self.held[p["token"]].token, {"op": "told"}),
                    Append(MemberAdded("joiner", bytes(32), bytes([1]) * 32, "10.8.0.9", None,
                                       "node"))]
        return super().handle(d, now)

    def timer(self, name: str, now: float) -> list[Action]:
        self.seen.append((now, f"timer:{name}"))
        if name == "forever":
            return [SetTimer("forever", 1.0)]
        return []


@pytest.fixture
def node() -> Iterator[SimNode]:
    with scratch_directory("ppn-simhost-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=5, start=False)
        n.host.make_core = Probe
        n.host.start_all()
        try:
            yield n
        finally:
            n.close()


def probe(n: SimNode, pd: str) -> Probe:
    core = n.host.cores[pd]
    assert isinstance(core, Probe)
    return core


def tunnel(n: SimNode) -> Any:
    return next(t for t in n.port(FLEET).tokens() if n.kernel.state.caps[t.cap_id].obj == "tunnel")


def test_cores_start_in_priority_order_at_virtual_time_zero(node: SimNode) -> None:
    assert list(node.host.cores) == ["pd-ledger", "pd-net-driver", WG, "pd-genesis", "pd-vmm",
                                     FLEET, "pd-network-admin"]
    assert {probe(node, pd).started_at for pd in node.host.cores} == {EPOCH_NS / NS}
    assert node.clock.elapsed == 0.0


def test_messages_arrive_after_seeded_latency_in_order(node: SimNode) -> None:
    fleet = node.port(FLEET)
    for i in range(50):
        fleet.send(tunnel(node), {"op": "n", "i": i})
    assert node.host.pending == 50 and probe(node, WG).seen == []
    node.host.run_until_idle()
    seen = probe(node, WG).seen
    assert [p["i"] for _, p in seen] == list(range(50))  # an inbox is FIFO
    lo, hi = node.host.latency_ns
    times = [t for t, _ in seen]
    assert times == sorted(times)
    assert EPOCH_NS + lo <= times[0] * NS <= EPOCH_NS + hi + 1_000
    assert 0 < node.clock.elapsed <= hi / NS


def test_run_until_stops_at_the_given_virtual_time(node: SimNode) -> None:
    node.port(WG).send(next(t for t in node.port(WG).tokens()
                            if node.kernel.state.caps[t.cap_id].obj == "endpoint:pd-wireguard"),
                       {"op": "timer", "name": "t", "delay": 5.0})
    node.host.run_until(1.0)
    assert node.clock.elapsed == 1.0 and len(probe(node, WG).seen) == 1
    node.host.run_until(5.0)
    assert len(probe(node, WG).seen) == 1  # the timer is due just after 5 s
    node.host.run_for(0.01)
    assert probe(node, WG).seen[-1][1] == "timer:t"
    assert 5.0 < probe(node, WG).seen[-1][0] - EPOCH_NS / NS < 5.01


def test_ledger_timestamps_come_from_the_virtual_clock(node: SimNode) -> None:
    node.host.run_until(3600.0)
    tok = node.port(FLEET).copy(tunnel(node))
    last = list(LogReader(node.directory).entries())[-1]
    assert last.ts_ns == EPOCH_NS + 3600 * NS and last.event.cap_id == tok.cap_id


def test_actions_are_journalled_before_the_send_is_made(node: SimNode) -> None:
    admin_core = probe(node, ADMIN)
    index = next(i for i, h in enumerate(admin_core.held) if h.obj == "tunnel")
    own = next(t for t in node.port(ADMIN).tokens()
               if node.kernel.state.caps[t.cap_id].obj == "endpoint:pd-network-admin")
    node.port(ADMIN).send(own, {"op": "journal-then-tell", "token": index})
    size = node.ledger.size
    node.host.step()  # pd-fleet handles it: the event is appended, the send queued
    # (and, the event being a membership, each running core is told of it: MembersChanged)
    assert node.ledger.size == size + 1 and node.host.pending == 1 + len(node.host.cells)
    node.host.run_until_idle()
    assert probe(node, WG).seen[-1][1] == {"op": "told"}


def test_a_crashing_core_is_restarted_then_failed(node: SimNode) -> None:
    wg_end = next(t for t in node.port(WG).tokens()
                  if node.kernel.state.caps[t.cap_id].obj == "endpoint:pd-wireguard")
    first = probe(node, WG)
    node.port(WG).send(wg_end, {"op": "timer", "name": "old", "delay": 1.0})
    node.port(WG).send(wg_end, {"op": "crash"})
    node.host.run_until_idle()
    assert probe(node, WG) is not first and "timer:old" not in [s for _, s in first.seen]
    assert node.kernel.state.restarts == {WG: 1}
    for _ in range(3):
        node.port(WG).send(wg_end, {"op": "crash"})
    node.port(FLEET).send(tunnel(node), {"op": "too late"})  # queued behind the crashes
    node.host.run_until_idle()
    assert node.kernel.dropped == 1  # the PD failed before it could see it
    events = [e.event for e in LogReader(node.directory).entries()]
    assert [type(e) for e in events[-4:]] == [PdRestarted] * 3 + [PdFailed]
    assert events[-1].reason == "RuntimeError: pd-wireguard: crash requested"
    assert node.kernel.state.pd_status[WG] == "failed" and WG not in node.host.cores
    with pytest.raises(CapRefused) as err:
        node.port(FLEET).send(tunnel(node), {"op": "later still"})
    assert err.value.code == "bad-target"
    node.host.spawn(WG, "operator asked")
    assert node.kernel.state.pd_status[WG] == "running" and probe(node, WG).seen == []


def test_reap_and_spawn(node: SimNode) -> None:
    node.host.reap("pd-genesis", "ceremony over")
    assert "pd-genesis" not in node.host.cores and not node.port("pd-genesis").tokens()
    with pytest.raises(HostError, match="needs running"):
        node.host.reap("pd-genesis", "again")
    node.host.spawn("pd-genesis", "new ceremony")
    assert "pd-genesis" in node.host.cores
    with pytest.raises(HostError, match="needs failed or reaped"):
        node.host.spawn("pd-genesis", "again")


def test_a_timer_loop_is_reported_not_run_forever(node: SimNode) -> None:
    wg_end = next(t for t in node.port(WG).tokens()
                  if node.kernel.state.caps[t.cap_id].obj == "endpoint:pd-wireguard")
    node.port(WG).send(wg_end, {"op": "timer", "name": "forever", "delay": 1.0})
    with pytest.raises(SimulationError, match="never settles"):
        node.host.run_until_idle(max_items=100)
    node.host.run_until(node.clock.elapsed + 10)  # bounded runs are fine
