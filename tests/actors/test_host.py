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
from dataclasses import dataclass
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
from actors.kernel import Kernel
from actors.lifecycle import HostError
from actors.pds.base import (
    Action,
    Append,
    Call,
    Core,
    IoRequest,
    IoResult,
    Message,
    Send,
    SetTimer,
)
from actors.runtime import Node
from ledger import caps
from ledger.caps import CapRefused, Token
from ledger.catalog import PdFailed, PdRestarted
from ledger.keys import NodeKeys
from ledger.log import Ledger
from ledger.scan import LogReader
from tests.cores import Crashy

VMM_ENDPOINT, FLEET_ENDPOINT = 9, 12  # original endpoint caps, per system.toml's order


class Probe:
    """Shared by every core a test's node makes: the gate a blocking handler waits on, and
    the tokens a test hands a core to present (a token is not plain data: it cannot
    travel in a message)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.tokens: list[Token] = []

    def make(self, pd: str) -> Core:
        return ProbeCore(pd, self)


class ProbeCore(Crashy):
    def __init__(self, name: str, probe: Probe | None = None) -> None:
        super().__init__(name)
        self.probe = probe
        self.replies: list[Any] = []
        self.fired: list[str] = []

    def handle(self, m: Message, now: float) -> list[Action]:
        actions = super().handle(m, now)  # counts it, answers ping, raises on crash
        p = m.payload if isinstance(m.payload, dict) else {}
        op = p.get("op")
        if m.obj == "reply":
            self.replies.append(m.payload)
        if op == "block" and self.probe is not None:
            self.probe.entered.set()
            self.probe.gate.wait(10)
        elif op == "relay":  # call whoever the cap reaches
            token = next(h.token for h in self.held if h.token.cap_id == p["cap"])
            actions.append(Call(token, {"op": "ping"}))
        elif op == "send" and self.probe is not None:  # present the tokens the test handed
            actions += [Send(t, {"op": "hello"}) for t in self.probe.tokens]
        elif op == "timer":
            actions.append(SetTimer(p["name"], p["delay"]))
        elif op == "send-then-bad-append" and self.probe is not None:  # journal first
            actions += [Send(self.probe.tokens[0], {"op": "hello"}), Append(object())]
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
    """An initialised node, plus cap #33: pd-fleet may call pd-vmm (badge 6)."""
    state = tmp_path / "state"
    assert cli.main(["node", "init", "--state-dir", str(state), "--name", "laptop-b"]) == 0
    with Ledger.open(state / "ledger", NodeKeys.load(state)) as ledger:
        kernel = Kernel(ledger)
        tok = caps.token_for(kernel.state.caps[VMM_ENDPOINT])
        assert kernel.mint("pd-vmm", tok, ("write", "grant-reply"), 6, "pd-fleet").cap_id == 33
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
    """Send under ``cap_id`` as the PD that holds it would."""
    token = holder_token(node, cap_id)
    node.kernel.send(token.holder, token, payload)


def holder_token(node: Node, cap_id: int) -> Token:
    return caps.token_for(node.kernel.state.caps[cap_id])


def lifecycle(node: Node, kind: type) -> list[Any]:
    return [e.event for e in LogReader(node.state_dir / "ledger").entries()
            if isinstance(e.event, kind)]


def test_ping_between_pds_through_the_kernel(node: Node) -> None:
    as_holder(node, FLEET_ENDPOINT, {"op": "relay", "cap": 33})
    replies = wait_for(lambda: node.host.core_status("pd-fleet")["replies"])  # type: ignore[index]
    assert replies == [{"op": "pong", "badge": 6, "from": "pd-vmm"}]
    # The operator's own call, answered to it and not to a PD.
    assert node.ping("pd-wireguard") == {"op": "pong", "badge": None, "from": "pd-wireguard"}
    assert node.ping(cap_id=33) == {"op": "pong", "badge": 6, "from": "pd-vmm"}


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
    child = kernel.mint("pd-vmm", holder_token(node, VMM_ENDPOINT), ("write",), 6,
                        "pd-fleet")
    as_holder(node, VMM_ENDPOINT, {"op": "block"})
    assert probe.entered.wait(5)
    kernel.port("pd-fleet").send(child, {"op": "hello"})  # queued behind the block
    dropped = kernel.dropped
    assert node.revoke(VMM_ENDPOINT) == 3  # the child, #33 and pd-fleet's channel (#18)
    probe.gate.set()
    received = node.host.core_status("pd-vmm")["received"]  # type: ignore[index]
    assert received.get("block") == 1 and "hello" not in received
    assert kernel.dropped == dropped + 1
    with pytest.raises(CapRefused) as refused:
        kernel.port("pd-fleet").send(child, {"op": "hello"})
    assert refused.value.code == "no-such-cap"


def test_refused_sends_are_counted_and_never_crash_the_pd(node: Node, probe: Probe) -> None:
    vmm_token = holder_token(node, VMM_ENDPOINT)  # held by pd-vmm, not pd-fleet
    forged = Token(33, "pd-fleet", b"\x00" * 64)
    probe.tokens[:] = [vmm_token, forged, Token(999, "pd-fleet", b"")]
    as_holder(node, FLEET_ENDPOINT, {"op": "send"})
    assert node.ping("pd-fleet")["from"] == "pd-fleet"  # after the three, in queue order
    refused = node.kernel.refused
    assert refused[("pd-fleet", "not-holder")] == 1
    assert refused[("pd-fleet", "bad-token")] == 1
    assert refused[("pd-fleet", "no-such-cap")] == 1
    assert node.ledger.state_copy().restarts == {}
    assert node.status()["refused"]["pd-fleet"] == {"bad-token": 1, "no-such-cap": 1,
                                                   "not-holder": 1}


def test_events_are_journalled_before_anything_is_sent(node: Node, probe: Probe) -> None:
    probe.tokens[:] = [holder_token(node, 33)]  # pd-fleet's cap on pd-vmm
    as_holder(node, FLEET_ENDPOINT, {"op": "send-then-bad-append"})
    # Refused whole (an object is not an event): nothing appended, nothing sent, no crash.
    assert node.ping("pd-fleet")["from"] == "pd-fleet"
    received = node.host.core_status("pd-vmm")["received"]  # type: ignore[index]
    assert "hello" not in received
    assert node.kernel.refused[("pd-fleet", "no-journal-cap")] == 1
    assert not lifecycle(node, PdRestarted)


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
        status = node.host.core_status("pd-genesis")
        assert status is not None and (status["tokens"], status["received"]) == (0, {})
        assert node.status()["pds"]["pd-genesis"]["status"] == "running"


def test_one_node_per_state_directory(node: Node) -> None:
    with pytest.raises(Exception, match="open for writing in another process"):
        Node(node.state_dir, serve_control=False).start()


def test_caps_tree_is_drawn_with_branches(node: Node) -> None:
    assert node.mint(33, ["write"], "pd-fleet") == 34
    assert node.mint(VMM_ENDPOINT, ["read"], "pd-network-admin", badge=7) == 35
    rows = [r for r in node.caps_tree() if r["object"] == "endpoint:pd-vmm"]
    assert [(r["cap"], r["depth"], r["last"]) for r in rows] == [
        (9, 0, False), (18, 1, False), (33, 1, False), (34, 2, True), (35, 1, True)]
    assert draw_tree(rows)[3:] == [
        "\u2502  \u2514\u2500 #34 pd-fleet endpoint:pd-vmm write badge=6",
        "\u2514\u2500 #35 pd-network-admin endpoint:pd-vmm read badge=7"]
    with pytest.raises(CapRefused, match="cannot derive 'grant'") as refused:
        node.mint(34, ["write", "grant"], "pd-fleet")
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
            request(state_dir, {"cmd": "caps.mint", "cap": 33, "rights": ["grant"],
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

    def recording(self: ProbeCore, d: Message, now: float) -> list[Action]:
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


def test_a_full_mailbox_refuses_the_send_at_the_sender(
        node: Node, probe: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that does not keep up makes its senders' sends refused (queue-full),
    counted against the sender: memory stays bounded and nothing queued is lost."""
    import actors.host as host_module
    monkeypatch.setattr(host_module, "MAX_QUEUED", 50)
    as_holder(node, VMM_ENDPOINT, {"op": "block"})
    assert probe.entered.wait(5)
    fleet = node.kernel.port("pd-fleet")
    tok = holder_token(node, 33)
    sent = 0
    with pytest.raises(CapRefused) as refused:
        for i in range(1000):
            fleet.send(tok, {"op": "n", "i": i})
            sent += 1
    assert refused.value.code == "queue-full" and sent == 50
    assert node.kernel.refused[("pd-fleet", "queue-full")] == 1
    probe.gate.set()
    status = node.host.core_status("pd-vmm")
    assert status is not None and status["received"]["n"] == 50
    fleet.send(tok, {"op": "n", "i": -1})  # drained: sends go through again


@dataclass(frozen=True, slots=True)
class _Hello(IoRequest):
    pass


class _AsksAtStart(ProbeCore):
    """A core whose start() asks its adapter something (as pd-vmm asks for the host)."""

    requests = (_Hello,)

    def start(self, view: Any, now: float) -> list[Action]:
        return [*super().start(view, now), _Hello(self.request_id())]

    def io(self, answer: Any, now: float) -> list[Action]:
        self.fired.append(f"answered:{answer.value}")
        return []


class _AtOnce:
    """An adapter that answers inside submit(): on the PD's own thread, during its boot."""

    def attach(self, emit: Any) -> None:
        pass

    def submit(self, request: IoRequest, answer: Any) -> None:
        answer(IoResult(request.request_id, "at once"))

    def close(self) -> None:
        pass


def test_an_answer_given_while_the_core_boots_reaches_it(state_dir: Path) -> None:
    """Found by pd-vmm's real adapter (which answers within microseconds): an answer to a
    request made in start() came before the host had registered the PD's actor, and was
    dropped as "no actor" -- the core then waited for it forever."""
    pds = ("pd-vmm", "pd-fleet", "pd-genesis", "pd-wireguard")
    for _ in range(5):
        n = Node(state_dir, make_core=_AsksAtStart, serve_control=False,
                 adapters=lambda: {pd: _AtOnce() for pd in pds}).start()
        try:
            for pd in pds:
                wait_for(lambda pd=pd, n=n: n.host.core_status(pd)["fired"] == [
                    "answered:at once"])
        finally:
            n.stop()
