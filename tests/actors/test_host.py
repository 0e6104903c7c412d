"""The node host in-process: PD actors, calls through the kernel, supervision, revocation.

Each test runs a real :class:`~actors.runtime.Node` (ledger, kernel, pykka actors) on
a state directory made by ``ppn node init``, with a probe core that can block, relay
a call, send a token it was handed, set timers and journal.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from actors import cli
from actors.control import (
    ControlError,
    NodeNotRunning,
    decode_request,
    draw_tree,
    listen,
    request,
)
from actors.core import Action, Append, Call, Core, Send, SetTimer
from actors.kernel import Delivery, Kernel
from actors.lifecycle import HostError
from actors.runtime import Node
from ledger import caps
from ledger.caps import CapRefused, Token
from ledger.catalog import PdFailed, PdRestarted
from ledger.keys import NodeKeys
from ledger.log import Ledger
from ledger.scan import LogReader

VMM_ENDPOINT, FLEET_ENDPOINT = 9, 12  # original endpoint caps, per system.toml's order


class Probe:
    """Shared by every core a test's node makes: the gate a blocking handler waits on."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    def make(self, pd: str) -> Core:
        return ProbeCore(pd, probe=self)


@dataclass
class ProbeCore(Core):
    probe: Probe | None = None
    replies: list[Any] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)

    def handle(self, d: Delivery, now: float) -> list[Action]:
        actions = super().handle(d, now)  # counts it, answers ping, raises on crash
        p = d.payload if isinstance(d.payload, dict) else {}
        op = p.get("op")
        if d.obj == "reply":
            self.replies.append(d.payload)
        if op == "block" and self.probe is not None:
            self.probe.entered.set()
            self.probe.gate.wait(10)
        elif op == "relay":  # call whoever the cap reaches
            token = next(t for t in self.tokens if t.cap_id == p["cap"])
            actions.append(Call(token, {"op": "ping"}))
        elif op == "send":  # present whatever token the test handed over
            actions.append(Send(p["token"], {"op": "hello"}))
        elif op == "timer":
            actions.append(SetTimer(p["name"], p["delay"]))
        elif op == "send-then-bad-append":  # journal first: the send must never happen
            actions += [Send(p["token"], {"op": "hello"}), Append(object())]
        return actions

    def timer(self, name: str, now: float) -> list[Action]:
        self.fired.append(name)
        return []

    def status(self) -> dict[str, Any]:
        return {**super().status(), "replies": list(self.replies), "fired": list(self.fired)}


def wait_for(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An initialised node, plus cap #26: pd-fleet may call pd-vmm (badge 6)."""
    state = tmp_path / "state"
    assert cli.main(["node", "init", "--state-dir", str(state), "--name", "laptop-b"]) == 0
    with Ledger.open(state / "ledger", NodeKeys.load(state)) as ledger:
        kernel = Kernel(ledger)
        tok = kernel.operator_token(VMM_ENDPOINT)
        assert kernel.mint("pd-vmm", tok, ("write", "grant-reply"), 6, "pd-fleet").cap_id == 26
    return state


@pytest.fixture
def probe() -> Iterator[Probe]:
    p = Probe()
    yield p
    p.gate.set()  # never leave an actor blocked


@pytest.fixture
def node(state_dir: Path, probe: Probe) -> Iterator[Node]:
    n = Node(state_dir, make_core=probe.make, serve_control=False).start()
    yield n
    n.stop()


def as_holder(node: Node, cap_id: int, payload: Any) -> None:
    """Send under ``cap_id`` as the PD that holds it (the operator's authority)."""
    token = node.kernel.operator_token(cap_id)
    node.kernel.send(token.holder, token, payload)


def lifecycle(node: Node, kind: type) -> list[Any]:
    return [e.event for e in LogReader(node.state_dir / "ledger").entries()
            if isinstance(e.event, kind)]


def test_ping_between_pds_through_the_kernel(node: Node) -> None:
    as_holder(node, FLEET_ENDPOINT, {"op": "relay", "cap": 26})
    replies = wait_for(lambda: node.host.core_status("pd-fleet")["replies"])  # type: ignore[index]
    assert replies == [{"op": "pong", "badge": 6, "from": "pd-vmm"}]
    # The operator's own call, answered to it and not to a PD.
    assert node.ping("pd-wireguard") == {"op": "pong", "badge": None, "from": "pd-wireguard"}
    assert node.ping(cap_id=26) == {"op": "pong", "badge": 6, "from": "pd-vmm"}


def test_crash_restarts_the_pd_from_the_ledger(node: Node) -> None:
    as_holder(node, VMM_ENDPOINT, {"op": "crash"})
    wait_for(lambda: node.ledger.state_copy().restarts.get("pd-vmm") == 1)
    (event,) = lifecycle(node, PdRestarted)
    assert event.name == "pd-vmm" and "crash requested" in event.reason
    assert node.ping("pd-vmm")["from"] == "pd-vmm"
    status = node.host.core_status("pd-vmm")
    assert status is not None and status["tokens"] == len(
        caps.tokens_of(node.ledger.state_copy(), "pd-vmm"))
    assert node.status()["pds"]["pd-vmm"] == {"status": "running", "alive": True,
                                              "priority": 180, "restarts": 1}


def test_four_crashes_fail_the_pd_and_the_node_runs_on(node: Node) -> None:
    for _ in range(4):
        as_holder(node, VMM_ENDPOINT, {"op": "crash"})
    wait_for(lambda: node.ledger.state_copy().pd_status["pd-vmm"] == "failed")
    assert [e.name for e in lifecycle(node, PdRestarted)] == ["pd-vmm"] * 3
    assert [e.name for e in lifecycle(node, PdFailed)] == ["pd-vmm"]
    wait_for(lambda: "pd-vmm" not in node.host.running())
    assert node.ping("pd-fleet")["from"] == "pd-fleet"
    with pytest.raises(CapRefused) as refused:
        as_holder(node, VMM_ENDPOINT, {"op": "ping"})
    assert refused.value.code == "bad-target"
    with pytest.raises(CapRefused, match="served by no running PD"):
        node.ping("pd-vmm")
    assert node.status()["pds"]["pd-vmm"]["status"] == "failed"


def test_message_queued_before_revoke_is_not_delivered_after(node: Node, probe: Probe) -> None:
    kernel = node.kernel
    child = kernel.mint("pd-vmm", kernel.operator_token(VMM_ENDPOINT), ("write",), 6,
                        "pd-fleet")
    as_holder(node, VMM_ENDPOINT, {"op": "block"})
    assert probe.entered.wait(5)
    kernel.port("pd-fleet").send(child, {"op": "hello"})  # queued behind the block
    dropped = kernel.dropped
    assert node.revoke(VMM_ENDPOINT) == 2  # the child, and #26
    probe.gate.set()
    received = node.host.core_status("pd-vmm")["received"]  # type: ignore[index]
    assert received.get("block") == 1 and "hello" not in received
    assert kernel.dropped == dropped + 1
    with pytest.raises(CapRefused) as refused:
        kernel.port("pd-fleet").send(child, {"op": "hello"})
    assert refused.value.code == "no-such-cap"


def test_refused_sends_are_counted_and_never_crash_the_pd(node: Node) -> None:
    vmm_token = node.kernel.operator_token(VMM_ENDPOINT)  # held by pd-vmm, not pd-fleet
    forged = Token(26, "pd-fleet", b"\x00" * 64)
    for token in (vmm_token, forged, Token(999, "pd-fleet", b"")):
        as_holder(node, FLEET_ENDPOINT, {"op": "send", "token": token})
    assert node.ping("pd-fleet")["from"] == "pd-fleet"  # after the three, in queue order
    refused = node.kernel.refused
    assert refused[("pd-fleet", "not-holder")] == 1
    assert refused[("pd-fleet", "bad-token")] == 1
    assert refused[("pd-fleet", "no-such-cap")] == 1
    assert node.ledger.state_copy().restarts == {}
    assert node.status()["refused"]["pd-fleet"] == {"bad-token": 1, "no-such-cap": 1,
                                                   "not-holder": 1}


def test_events_are_journalled_before_anything_is_sent(node: Node) -> None:
    token = node.kernel.operator_token(26)  # pd-fleet's cap on pd-vmm
    as_holder(node, FLEET_ENDPOINT, {"op": "send-then-bad-append", "token": token})
    wait_for(lambda: node.ledger.state_copy().restarts.get("pd-fleet") == 1)
    received = node.host.core_status("pd-vmm")["received"]  # type: ignore[index]
    assert "hello" not in received
    assert "not a registered event type" in lifecycle(node, PdRestarted)[0].reason


def test_timers_post_back_and_die_with_their_core(node: Node) -> None:
    as_holder(node, VMM_ENDPOINT, {"op": "timer", "name": "soon", "delay": 0.01})
    wait_for(lambda: node.host.core_status("pd-vmm")["fired"] == ["soon"])  # type: ignore[index]
    as_holder(node, VMM_ENDPOINT, {"op": "timer", "name": "stale", "delay": 0.2})
    as_holder(node, VMM_ENDPOINT, {"op": "crash"})
    wait_for(lambda: node.ledger.state_copy().restarts.get("pd-vmm") == 1)
    time.sleep(0.4)
    assert node.host.core_status("pd-vmm")["fired"] == []  # type: ignore[index]


def test_reap_and_spawn(state_dir: Path, probe: Probe) -> None:
    with Node(state_dir, make_core=probe.make, serve_control=False) as node:
        node.host.reap("pd-genesis", "ceremony over")
        state = node.ledger.state_copy()
        assert state.pd_status["pd-genesis"] == "reaped"
        assert not [c for c in state.caps.values()
                    if c.holder == "pd-genesis" or c.obj == "endpoint:pd-genesis"]
        wait_for(lambda: "pd-genesis" not in node.host.running())
        with pytest.raises(ControlError, match="no capability reaches"):
            node.ping("pd-genesis")
        with pytest.raises(HostError, match="status is reaped"):
            node.host.reap("pd-genesis", "again")
    with Node(state_dir, make_core=probe.make, serve_control=False) as node:
        assert "pd-genesis" not in node.host.running()  # a reaped PD does not come back
        with pytest.raises(HostError, match="status is running"):
            node.host.spawn("pd-vmm", "no")
        node.host.spawn("pd-genesis", "new ceremony")
        assert "pd-genesis" in node.host.running()
        assert node.host.core_status("pd-genesis") == {"tokens": 0, "received": {},
                                                       "replies": [], "fired": []}
        assert node.status()["pds"]["pd-genesis"]["status"] == "running"


def test_one_node_per_state_directory(node: Node) -> None:
    with pytest.raises(Exception, match="open for writing in another process"):
        Node(node.state_dir, serve_control=False).start()


def test_caps_tree_is_drawn_with_branches(node: Node) -> None:
    assert node.mint(26, ["write"], "pd-fleet") == 27
    assert node.mint(VMM_ENDPOINT, ["read"], "pd-network-admin", badge=7) == 28
    rows = [r for r in node.caps_tree() if r["object"] == "endpoint:pd-vmm"]
    assert [(r["cap"], r["depth"], r["last"]) for r in rows] == [
        (9, 0, False), (26, 1, False), (27, 2, True), (28, 1, True)]
    assert draw_tree(rows) == [
        "#9 pd-vmm endpoint:pd-vmm read,write,grant,grant-reply",
        "\u251c\u2500 #26 pd-fleet endpoint:pd-vmm write,grant-reply badge=6",
        "\u2502  \u2514\u2500 #27 pd-fleet endpoint:pd-vmm write badge=6",
        "\u2514\u2500 #28 pd-network-admin endpoint:pd-vmm read badge=7"]
    with pytest.raises(CapRefused, match="cannot derive 'grant'") as refused:
        node.mint(27, ["write", "grant"], "pd-fleet")
    assert refused.value.code == "escalation"


@pytest.mark.parametrize(("line", "needle"), [
    (b'{"cmd": "caps.revoke", "cap": NaN}', "NaN is not a number"),
    (b'{"cmd": "status", "cmd": "status"}', "duplicate key 'cmd'"),
    (b'["status"]', "a request is a JSON object"),
    (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
    (b'{"cmd": "caps.mint", "cap": 4, "to": "pd-vmm"}', "missing field 'rights'"),
    (b'{"cmd": "caps.revoke", "cap": true}', "'cap' must be a capability id"),
    (b'{"cmd": "caps.revoke", "cap": -1}', "'cap' must be a capability id"),
    (b'{"cmd": "caps.mint", "cap": 4, "to": "pd-vmm", "rights": "read"}', "list of rights"),
    (b'{"cmd": "status"', "not one JSON object"),
    (b"[" * 60_000, "not one JSON object"),
    (b'{"cmd": "\xff"}', "not UTF-8"),
    (b" " * 70_000, "larger than 65536 bytes"),
])
def test_bad_requests_are_refused_precisely(line: bytes, needle: str) -> None:
    with pytest.raises(ControlError, match=needle):
        decode_request(line)


def test_control_socket_in_process(state_dir: Path, probe: Probe) -> None:
    path = state_dir / "control.sock"
    with Node(state_dir, make_core=probe.make):
        assert path.stat().st_mode & 0o777 == 0o600
        assert request(state_dir, {"cmd": "ping", "pd": "pd-ledger"})["from"] == "pd-ledger"
        with pytest.raises(ControlError, match="already listening"):
            listen(path)
        with pytest.raises(ControlError, match="cannot derive 'grant'"):
            request(state_dir, {"cmd": "caps.mint", "cap": 26, "rights": ["grant"],
                                "to": "pd-fleet"})
        assert request(state_dir, {"cmd": "status"})["pds"]["pd-ledger"]["alive"]
    assert not path.exists()
    with pytest.raises(NodeNotRunning, match="no control socket"):
        request(state_dir, {"cmd": "status"})
    stale = socket.socket(socket.AF_UNIX)  # bound, never listening: what kill -9 leaves
    stale.bind(str(path))
    stale.close()
    with pytest.raises(NodeNotRunning, match="stale"):
        request(state_dir, {"cmd": "status"})
    listen(path).close()  # the stale file is replaced
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        listen(path)
    assert path.read_text() == "not a socket"


def test_a_burst_arrives_whole_and_in_order_and_a_status_query_waits_for_it(
        node: Node, probe: Probe) -> None:
    """Deliveries go through the PD's mailbox; the actor takes them a burst at a time."""
    as_holder(node, VMM_ENDPOINT, {"op": "block"})  # hold pd-vmm while the burst queues
    assert probe.entered.wait(5)
    seen: list[int] = []
    core = node.host.core_status  # the query is answered after what was queued before it
    original = ProbeCore.handle

    def recording(self: ProbeCore, d: Delivery, now: float) -> list[Action]:
        if isinstance(d.payload, dict) and d.payload.get("op") == "n":
            seen.append(d.payload["i"])
        return original(self, d, now)

    ProbeCore.handle = recording  # type: ignore[method-assign]
    try:
        for i in range(2_000):
            as_holder(node, VMM_ENDPOINT, {"op": "n", "i": i})
        probe.gate.set()
        status = core("pd-vmm")
        assert status is not None and status["received"]["n"] == 2_000
        assert seen == list(range(2_000))
    finally:
        ProbeCore.handle = original  # type: ignore[method-assign]
