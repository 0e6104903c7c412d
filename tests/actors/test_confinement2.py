"""Confinement, second pass (issue 8): what the first adversarial review did not try.

* the operator's path through pd-network-admin: commands from a PD, callees that answer
  twice, guess reply caps or answer garbage, floods, revocation and restarts in flight;
* pd-net-driver's requests (``udp.send``, ``links``) and adapters that misbehave;
* the real netlink adapter (closed, in flight, in a namespace that does not exist);
* the control socket's ``net.links`` and ``ppn net links`` with no node;
* lifecycle requests the transition table forbids, from both hosts, and races on the node;
* payloads at the edges of what the wire takes.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` show a defect in the source: they
fail today and must pass once it is fixed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog.testing

from actors import cli, wire
from actors.control import SOCKET_NAME, ControlError
from actors.engine import CoreFactory
from actors.io.base import Adapter, Answer, Emit
from actors.io.netlink import NetlinkAdapter
from actors.kernel import MAX_PENDING_CALLS, OPERATOR
from actors.lifecycle import HostError
from actors.pds import make_core, pd_network_admin
from actors.pds.base import (
    Action,
    Call,
    Core,
    IoAnswer,
    IoFailure,
    IoRequest,
    IoResult,
    Message,
    Reply,
    ReplyCap,
    Send,
)
from actors.pds.pd_net_driver import MAX_DATAGRAM, ListLinks, NetDriverCore, SendDatagram
from actors.pds.pd_network_admin import NetworkAdminCore
from actors.runtime import Node
from actors.wire import MAX_DEPTH, MAX_MESSAGE_BYTES, NotPlainData
from ledger import caps
from ledger.caps import MAX_BADGE, CapRefused
from ledger.state import State
from sims.node import SimNode, build_node, scratch_directory
from tests.actors.test_confinement import (
    ADMIN,
    FLEET,
    GENESIS,
    GO,
    NET,
    PDS,
    VMM,
    WG,
    Puppet,
    Stage,
    cap_on,
    go,
    go_real,
    snap,
    tok,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
RESTARTED = "pd-network-admin was restarted or stopped before it answered"


# ============================================================================= scaffolding
@contextlib.contextmanager
def sim_node(make: CoreFactory, *, seed: int = 81,
             adapters: dict[str, Adapter] | None = None) -> Iterator[SimNode]:
    with scratch_directory("ppn-confine2-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=seed, make_core=make, adapters=adapters)
        try:
            yield n
        finally:
            n.close()


@contextlib.contextmanager
def real_node(make: CoreFactory, *, control: bool = False,
              adapters: Callable[[], dict[str, Adapter]] | None = None) -> Iterator[Node]:
    """A threaded node in a short directory under /tmp (a UNIX socket path is <= 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ppn8a-", dir="/tmp"))
    try:
        with structlog.testing.capture_logs(), contextlib.redirect_stdout(None):
            assert cli.main(["node", "init", "--state-dir", str(d / "s"), "--name", "n1"]) == 0
            if adapters is None:
                node = Node(d / "s", make_core=make, serve_control=control)
            else:
                node = Node(d / "s", make_core=make, serve_control=control, adapters=adapters)
            node.start()
            try:
                yield node
            finally:
                node.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


class MortalAdmin(NetworkAdminCore):
    """pd-network-admin's production core, plus a fault the test injects: ``{"op": "die"}``."""

    ops: ClassVar[dict[str, str]] = {**NetworkAdminCore.ops, "die": "op_die"}

    def op_die(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        raise RuntimeError("test fault: pd-network-admin dies")


class AdminStage(Stage):
    """Puppets for the PDs in ``only``; pd-network-admin a :class:`MortalAdmin`."""

    def make(self, pd: str) -> Core:
        if pd == ADMIN:
            return MortalAdmin(pd)
        return super().make(pd)


@pytest.fixture
def stage() -> Stage:
    s = AdminStage()
    s.only = frozenset({NET, FLEET, WG})
    return s


@pytest.fixture
def sim(stage: Stage) -> Iterator[SimNode]:
    with sim_node(stage.make) as n:
        yield n


@pytest.fixture
def real(stage: Stage) -> Iterator[Node]:
    with real_node(stage.make) as n:
        yield n


def entry(state: State) -> int:
    """The operator's way in: pd-network-admin's own endpoint original (unbadged)."""
    return cap_on(state, ADMIN, f"endpoint:{ADMIN}", original=True)


def command(node: SimNode, answers: list[Any], /, **fields: Any) -> None:
    node.kernel.operator().call(entry(node.kernel.state), {"op": "net.links", **fields},
                                answers.append)


def holding(stage: Stage) -> list[Message]:
    """pd-net-driver's puppet keeps every call it is handed, unanswered, in the list."""
    held: list[Message] = []

    def hold(core: Puppet, m: Message) -> list[Action]:
        held.append(m)
        return []
    stage.on_message[NET] = hold
    return held


def release(held: list[Message]) -> Callable[[Puppet], list[Action]]:
    """A script for pd-net-driver's puppet: answer every held call with its own ``n``."""
    def script(core: Puppet) -> list[Action]:
        return [Reply(m.reply, {"ok": True, "links": [m.payload.get("n")]})
                for m in held if m.reply is not None]
    return script


def admin_core(n: SimNode) -> NetworkAdminCore:
    core = n.host.cores[ADMIN]
    assert isinstance(core, NetworkAdminCore)
    return core


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text and text.isprintable()


# ============================================================================= pd-network-admin
@pytest.mark.parametrize("badge", [0, 6, MAX_BADGE])
def test_a_badged_pd_cannot_issue_operator_commands(sim: SimNode, stage: Stage,
                                                    badge: int) -> None:
    """A PD the operator gave a channel to pd-network-admin (badged) is refused: as a
    call, with an error; as a plain send, silently.  Nothing reaches pd-net-driver."""
    n = sim
    minted = n.kernel.operator().mint(entry(n.kernel.state), ("write", "grant-reply"), FLEET,
                                      badge)
    chan = caps.token_for(n.kernel.state.caps[minted])
    size, root = n.ledger.size, n.ledger.root()
    go(n, FLEET, lambda core: [Call(chan, {"op": "net.links"}, tag=5),
                               Send(chan, {"op": "net.links"}),
                               Call(chan, {"op": "net.links", "badge": None}, tag=6)])
    replies = [(m.tag, m.payload) for m in stage.core(FLEET).messages if m.obj == "reply"]
    refusal = {"ok": False, "error": f"{ADMIN}: operator commands come from the operator only"}
    assert replies == [(5, refusal), (6, refusal)]
    assert stage.core(NET).messages == []
    assert (n.ledger.size, n.ledger.root()) == (size, root)
    assert n.kernel._calls == {} and not any(n.kernel._pending.values())


def test_a_callee_answers_once_and_cannot_guess_another_reply_cap(sim: SimNode,
                                                                  stage: Stage) -> None:
    n = sim

    def twice(core: Puppet, m: Message) -> list[Action]:
        if m.reply is None:
            return []
        rid = m.reply.reply_id
        return [Reply(m.reply, {"ok": True, "links": [m.payload.get("n")]}),
                Reply(m.reply, {"ok": True, "links": ["again"]}),
                Reply(ReplyCap(rid + 1), {"ok": True, "links": ["guess+1"]}),
                Reply(ReplyCap(rid - 1), {"ok": True, "links": ["guess-1"]}),
                Reply(ReplyCap(rid ^ 1), {"ok": True, "links": ["guess^1"]})]
    stage.on_message[NET] = twice
    answers: dict[str, list[Any]] = {"A": [], "B": [], "C": []}
    for key, got in answers.items():
        command(n, got, n=key)
    n.host.run_until_idle()
    assert answers == {k: [{"ok": True, "links": [k]}] for k in "ABC"}
    assert n.kernel.refused[(NET, "bad-token")] == 12
    assert n.kernel._calls == {} and not any(n.kernel._pending.values())
    assert admin_core(n)._waiting == {}


def test_a_flood_of_operator_commands_each_gets_its_own_answer_or_a_refusal(
        sim: SimNode, stage: Stage) -> None:
    """More commands than any table holds, while the callee sits on them: each is refused
    at the call, or answered exactly once -- with its own answer or an error."""
    n = sim
    held = holding(stage)
    total = MAX_PENDING_CALLS + 500
    answers: list[list[Any]] = [[] for _ in range(total)]
    refused_at_call: set[int] = set()
    for i in range(total):
        try:
            command(n, answers[i], n=i)
        except CapRefused as exc:
            assert exc.code == "too-many-calls"
            refused_at_call.add(i)
    n.host.run_until_idle()
    go(n, NET, release(held))
    n.host.run_until_idle()
    own = errors = 0
    for i, got in enumerate(answers):
        if i in refused_at_call:
            assert got == []
            continue
        assert len(got) == 1, (i, got)
        if got[0] == {"ok": True, "links": [i]}:
            own += 1
        else:
            assert got[0]["ok"] is False and "too-many-calls" in got[0]["error"], (i, got)
            errors += 1
    assert len(refused_at_call) == total - MAX_PENDING_CALLS
    # The operator's calls have their own budget: pd-network-admin's forwards all fit in its.
    assert own + errors == MAX_PENDING_CALLS and own == MAX_PENDING_CALLS and errors == 0
    assert n.kernel.refused[(OPERATOR, "too-many-calls")] == len(refused_at_call)
    assert n.kernel._calls == {} and not any(n.kernel._pending.values())
    assert admin_core(n)._waiting == {}


def test_a_command_forgotten_past_max_waiting_is_still_answered(
        sim: SimNode, stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pd_network_admin, "MAX_WAITING", 4)
    n = sim
    held = holding(stage)
    answers: list[list[Any]] = [[] for _ in range(10)]
    for i, got in enumerate(answers):
        command(n, got, n=i)
    n.host.run_until_idle()
    go(n, NET, release(held))
    n.host.run_until_idle()
    assert [len(a) for a in answers] == [1] * 10, answers
    assert n.kernel._calls == {}


def test_a_forward_dropped_by_a_revoke_in_flight_still_answers_the_operator(
        sim: SimNode, stage: Stage) -> None:
    n = sim
    held = holding(stage)
    answers: list[Any] = []
    command(n, answers)
    while len(n.kernel._calls) < 2:  # the operator's call, and the forward to pd-net-driver
        assert n.host.step()
    admin_net = next(c for c in n.kernel.state.caps.values()
                     if c.holder == ADMIN and c.obj == "net")
    assert admin_net.parent is not None
    n.kernel.operator().revoke(admin_net.parent)
    n.host.run_until_idle()
    assert held == []  # the forward died at the receiver
    assert len(answers) == 1 and answers[0]["ok"] is False, answers
    assert n.kernel._calls == {}


def test_a_revoke_while_the_callee_holds_the_forward(sim: SimNode, stage: Stage) -> None:
    """The reply cap already handed out is the callee's to use: one answer; the next
    command fails naming the revoked capability and never reaches pd-net-driver."""
    n = sim
    held = holding(stage)
    first: list[Any] = []
    command(n, first, n="A")
    n.host.run_until_idle()
    assert len(held) == 1
    admin_net = next(c for c in n.kernel.state.caps.values()
                     if c.holder == ADMIN and c.obj == "net")
    assert admin_net.parent is not None
    n.kernel.operator().revoke(admin_net.parent)
    go(n, NET, release(held))
    assert first == [{"ok": True, "links": ["A"]}]
    second: list[Any] = []
    command(n, second, n="B")
    n.host.run_until_idle()
    assert len(held) == 1
    assert len(second) == 1 and second[0]["ok"] is False
    assert f"its capability #{admin_net.cap_id} on net was refused" in second[0]["error"]
    assert n.kernel._calls == {}


def admin_restart_in_flight(n: SimNode, stage: Stage) -> tuple[list[Any], list[Any]]:
    """Command A is held by pd-net-driver when pd-network-admin restarts; then command B;
    then pd-net-driver answers both (A's reply cap died with the old core)."""
    held = holding(stage)
    a: list[Any] = []
    b: list[Any] = []
    command(n, a, n="A")
    n.host.run_until_idle()
    assert len(held) == 1
    n.host.crash(ADMIN, "restarts while A is in flight")
    n.host.run_until_idle()
    command(n, b, n="B")
    n.host.run_until_idle()
    assert len(held) == 2
    go(n, NET, release(held))  # A's answer first (its reply cap is gone), then B's
    return a, b


def test_an_admin_restart_in_flight_never_gives_a_command_another_answer(
        sim: SimNode, stage: Stage) -> None:
    """The new core's first tag is the old core's first tag: the old answer must not be
    taken for the new command."""
    n = sim
    a, b = admin_restart_in_flight(n, stage)
    assert a in ([], [{"ok": False, "error": RESTARTED}])
    assert b == [{"ok": True, "links": ["B"]}]
    assert n.kernel.refused[(NET, "bad-token")] == 1
    assert n.kernel._calls == {}


def test_an_admin_restart_in_flight_answers_the_operator_with_an_error(
        sim: SimNode, stage: Stage) -> None:
    a, _ = admin_restart_in_flight(sim, stage)
    assert a == [{"ok": False, "error": RESTARTED}]


def test_an_admin_restarted_without_its_net_cap_says_so(sim: SimNode, stage: Stage) -> None:
    n = sim
    admin_net = next(c for c in n.kernel.state.caps.values()
                     if c.holder == ADMIN and c.obj == "net")
    assert admin_net.parent is not None
    n.kernel.operator().revoke(admin_net.parent)
    n.host.crash(ADMIN, "a fresh core: its view holds no net cap")
    answers: list[Any] = []
    command(n, answers)
    n.host.run_until_idle()
    assert answers == [{"ok": False, "error": f"{ADMIN}: holds no capability on net "
                                              "(needed for net.links)"}]
    assert stage.core(NET).messages == []


# ----------------------------------------------------------------------------- the real node
GARBAGE: list[Any] = [
    [], None, "links", 5, 1.5, b"x", True, {}, {"ok": "yes"}, {"ok": 1}, {"ok": False},
    {"ok": None, "links": []}, {"ok": False, "error": None}, {"ok": False, "error": ""},
    {"ok": False, "error": ["x", 1]}, {"error": "no ok"}, {"ok": [True]},
    {"ok": False, "error": {"nested": {"deep": [1, 2]}}},
]


def answering(stage: Stage, box: list[Any]) -> None:
    """pd-net-driver's puppet answers every call with ``box[0]``."""
    def answer(core: Puppet, m: Message) -> list[Action]:
        return [] if m.reply is None else [Reply(m.reply, box[0])]
    stage.on_message[NET] = answer


def test_real_node_admin_turns_garbage_answers_into_one_control_error(real: Node,
                                                                     stage: Stage) -> None:
    box: list[Any] = [None]
    answering(stage, box)
    for garbage in GARBAGE:
        box[0] = garbage
        with pytest.raises(ControlError) as err:
            real.admin("net.links", timeout=3.0)
        assert type(err.value) is ControlError, garbage
        text = str(err.value)
        assert text.startswith("net.links: ") and one_line(text), (garbage, text)
    assert real.host.running() == sorted(PDS)
    assert real.kernel._calls == {}


@pytest.mark.parametrize("error", ["first line\nsecond line", "\x1b[2J\x1b[31mred",
                                   "tab\tand\rcarriage return"],
                         ids=["newline", "escape", "tab-cr"])
def test_real_node_a_callees_error_text_is_one_printable_line(real: Node, stage: Stage,
                                                              error: str) -> None:
    answering(stage, [{"ok": False, "error": error}])
    with pytest.raises(ControlError) as err:
        real.admin("net.links", timeout=3.0)
    assert one_line(str(err.value)), repr(str(err.value))


@pytest.mark.parametrize("answer", [
    {"ok": True}, {"ok": True, "links": 5}, {"ok": True, "links": "lo"},
    {"ok": True, "links": [5]}, {"ok": True, "links": [{"name": "eth0"}]},
], ids=["no-links", "int", "str", "list-of-int", "link-missing-fields"])
def test_real_node_net_links_with_a_malformed_answer_is_a_control_error(
        real: Node, stage: Stage, answer: dict[str, Any]) -> None:
    answering(stage, [answer])
    with pytest.raises(ControlError) as err:
        real.net_links()
    assert one_line(str(err.value))


def test_ppn_net_links_with_a_malformed_link_exits_1(stage: Stage) -> None:
    answering(stage, [{"ok": True, "links": [{"name": "eth0", "index": 1}]}])
    with real_node(stage.make, control=True) as node:
        proc = ppn("net", "links", "--state-dir", node.state_dir)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_real_node_admin_restart_in_flight_gets_an_error_never_another_answer(
        real: Node, stage: Stage) -> None:
    n = real
    held = holding(stage)
    results: dict[str, Any] = {}

    def run(key: str) -> None:
        try:
            results[key] = n.admin("net.links", timeout=1.0 if key == "A" else 5.0, n=key)
        except ControlError as exc:
            results[key] = exc
    a = threading.Thread(target=run, args=("A",))
    a.start()
    wait_for(lambda: len(held) == 1)
    n.kernel.send(ADMIN, tok(n.kernel.state, ADMIN, f"endpoint:{ADMIN}", original=True),
                  {"op": "die"})
    a.join(6.0)
    assert not a.is_alive()
    assert isinstance(results["A"], ControlError)  # an error, or a timeout (see above)
    assert str(results["A"]) in (f"net.links: {RESTARTED}", "net.links: no answer within 1 s")
    b = threading.Thread(target=run, args=("B",))
    b.start()
    wait_for(lambda: len(held) == 2)
    go_real(n, NET, release(held))
    b.join(6.0)
    assert results["B"] == {"links": ["B"]}
    assert n.kernel.state.restarts == {ADMIN: 1}
    assert n.kernel.refused[(NET, "bad-token")] == 1


def test_real_node_revoked_net_cap_then_restart_names_what_is_missing(real: Node,
                                                                      stage: Stage) -> None:
    n = real
    held = holding(stage)
    admin_net = next(c for c in n.kernel.state.caps.values()
                     if c.holder == ADMIN and c.obj == "net")
    assert admin_net.parent is not None
    n.revoke(admin_net.parent)
    with pytest.raises(ControlError, match=f"its capability #{admin_net.cap_id} on net was "
                                           "refused"):
        n.net_links()
    n.kernel.send(ADMIN, tok(n.kernel.state, ADMIN, f"endpoint:{ADMIN}", original=True),
                  {"op": "die"})
    wait_for(lambda: n.kernel.state.restarts.get(ADMIN) == 1)
    with pytest.raises(ControlError) as err:
        n.net_links()
    assert str(err.value) == (f"net.links: {ADMIN}: holds no capability on net (needed for "
                              "net.links)")
    assert held == []


# ============================================================================= pd-net-driver
class Twin:
    """pd-net-driver's backend: keeps each request; answers only when the test says so."""

    def __init__(self, *, raise_on_submit: bool = False) -> None:
        self.pending: list[tuple[IoRequest, Answer]] = []
        self.raise_on_submit = raise_on_submit
        self.emit: Emit = lambda event: None

    def attach(self, emit: Emit) -> None:
        self.emit = emit

    def submit(self, request: IoRequest, answer: Answer) -> None:
        if self.raise_on_submit:
            raise OSError("the adapter's own bug")
        self.pending.append((request, answer))

    def close(self) -> None:
        pass


@pytest.fixture
def twin() -> Twin:
    return Twin()


@pytest.fixture
def driver(twin: Twin) -> Iterator[tuple[SimNode, Stage]]:
    """Production pd-net-driver on a :class:`Twin`; pd-wireguard (holding net) a puppet."""
    s = Stage()
    s.only = frozenset({WG})
    with sim_node(s.make, adapters={NET: twin}) as n:
        yield n, s


def net_token(n: SimNode) -> Any:
    return tok(n.kernel.state, WG, "net")


def wg_replies(s: Stage) -> list[Any]:
    return [m.payload for m in s.core(WG).messages if m.obj == "reply"]


BAD_TO: dict[str, Any] = {
    "ipv6-bracketed": "[::1]:53", "ipv6-bare": "::1:53", "ipv6-mapped": "::ffff:192.0.2.1:53",
    "hostname": "example.com:53", "localhost": "localhost:53", "port-0": "192.0.2.1:0",
    "port-65536": "192.0.2.1:65536", "port-negative": "192.0.2.1:-1",
    "port-plus": "192.0.2.1:+53", "port-leading-zero": "192.0.2.1:053",
    "port-arabic-indic": "192.0.2.1:\u0665\u0663", "port-fullwidth": "192.0.2.1:\uff15\uff13",
    "port-superscript": "192.0.2.1:\u00b2", "ip-fullwidth": "\uff11\uff19\uff12.0.2.1:53",
    "port-underscore": "192.0.2.1:5_3", "port-spaces": "192.0.2.1: 53",
    "port-5000-digits": "192.0.2.1:" + "9" * 5000, "no-port": "192.0.2.1",
    "empty-port": "192.0.2.1:", "empty": "", "leading-space": " 192.0.2.1:53",
    "trailing-newline": "192.0.2.1:53\n", "ip-leading-zero": "192.000.2.1:53",
    "two-ports": "192.0.2.1:53:53", "cidr": "192.0.2.1/24:53", "nul": "192.0.2.1\x00:53",
}
BAD_TYPES: dict[str, dict[str, Any]] = {
    "to-int": {"to": 3221225985, "data": b"x"},
    "to-none": {"to": None, "data": b"x"},
    "to-list": {"to": ["192.0.2.1", 53], "data": b"x"},
    "to-bytes": {"to": b"192.0.2.1:53", "data": b"x"},
    "to-missing": {"data": b"x"},
    "data-str": {"to": "192.0.2.1:53", "data": "x"},
    "data-list": {"to": "192.0.2.1:53", "data": [1, 2]},
    "data-none": {"to": "192.0.2.1:53", "data": None},
    "data-missing": {"to": "192.0.2.1:53"},
    "data-too-big": {"to": "192.0.2.1:53", "data": bytes(MAX_DATAGRAM + 1)},
}


@pytest.mark.parametrize("kind", sorted(BAD_TO) + sorted(BAD_TYPES))
def test_a_bad_udp_send_is_an_error_answer_and_no_io(driver: tuple[SimNode, Stage],
                                                     twin: Twin, kind: str) -> None:
    n, s = driver
    fields = BAD_TYPES[kind] if kind in BAD_TYPES else {"to": BAD_TO[kind], "data": b"x"}
    net = net_token(n)
    go(n, WG, lambda core: [Call(net, {"op": "udp.send", **fields}),
                            Send(net, {"op": "udp.send", **fields})])
    (reply,) = wg_replies(s)
    assert reply["ok"] is False and reply["error"].startswith(f"{NET}: "), reply
    assert one_line(reply["error"]), reply
    assert twin.pending == [] and [r for pd, r in n.host.io_requests if pd == NET] == []
    assert n.kernel.state.restarts == {} and not n.kernel.refused


def test_udp_send_at_the_limits_goes_to_the_adapter(driver: tuple[SimNode, Stage],
                                                    twin: Twin) -> None:
    n, s = driver
    net = net_token(n)
    go(n, WG, lambda core: [Call(net, {"op": "udp.send", "to": "192.0.2.1:65535",
                                       "data": bytes(MAX_DATAGRAM)}),
                            Call(net, {"op": "udp.send", "to": "0.0.0.0:1", "data": b""})])
    assert [(type(r), r.to, len(r.data)) for r, _ in twin.pending] == [  # type: ignore[attr-defined]
        (SendDatagram, "192.0.2.1:65535", MAX_DATAGRAM), (SendDatagram, "0.0.0.0:1", 0)]
    for request, answer in twin.pending:
        answer(IoResult(request.request_id, {"sent": len(request.data)}))  # type: ignore[attr-defined]
    n.host.run_until_idle()
    assert wg_replies(s) == [{"ok": True, "sent": MAX_DATAGRAM}, {"ok": True, "sent": 0}]


def test_links_as_a_plain_send_asks_the_adapter_nothing(driver: tuple[SimNode, Stage],
                                                        twin: Twin) -> None:
    n, _ = driver
    net = net_token(n)
    go(n, WG, lambda core: [Send(net, {"op": "links"}) for _ in range(5)])
    assert twin.pending == [] and [r for pd, r in n.host.io_requests if pd == NET] == []
    core = n.host.cores[NET]
    assert isinstance(core, NetDriverCore) and core.received["links"] == 5
    assert core._waiting == {} and n.host.cells[NET].inflight == {}


def test_answers_for_unknown_requests_are_dropped_and_the_real_one_still_counts(
        driver: tuple[SimNode, Stage], twin: Twin) -> None:
    n, s = driver
    net = net_token(n)
    go(n, WG, lambda core: [Call(net, {"op": "links"})])
    ((request, answer),) = twin.pending
    rid = request.request_id
    bogus: list[Any] = [IoResult(rid + 1, {"links": ["forged"]}), IoFailure(rid + 2, "x"),
                        IoResult(-1, None), {"request_id": rid, "value": {}},
                        (rid, {"links": []}), None, IoResult(str(rid), {"links": []})]  # type: ignore[arg-type]
    for b in bogus:
        answer(b)
    n.host.run_until_idle()
    assert wg_replies(s) == []
    dropped = n.host.engine.dropped
    assert dropped["answer to no request in flight"] == 4
    assert dropped["not an answer"] == 3
    answer(IoResult(rid, {"links": [{"name": "lo"}]}))
    answer(IoResult(rid, {"links": ["twice"]}))
    n.host.run_until_idle()
    assert wg_replies(s) == [{"ok": True, "links": [{"name": "lo"}]}]
    assert dropped["answer to no request in flight"] == 5
    assert n.kernel.state.restarts == {}


@pytest.mark.parametrize("value", ["links", 5, None, [1], b"x"])
def test_an_odd_adapter_result_is_an_error_answer(driver: tuple[SimNode, Stage], twin: Twin,
                                                  value: Any) -> None:
    n, s = driver
    net = net_token(n)
    go(n, WG, lambda core: [Call(net, {"op": "links"})])
    ((request, answer),) = twin.pending
    answer(IoResult(request.request_id, value))
    n.host.run_until_idle()
    assert wg_replies(s) == [{"ok": False, "error": f"{NET}: the adapter answered oddly"}]


def test_an_adapter_raising_in_submit_is_a_failure_not_the_cores_crash() -> None:
    s = Stage()
    s.only = frozenset({WG})
    with sim_node(s.make, adapters={NET: Twin(raise_on_submit=True)}) as n:
        net = net_token(n)
        for _ in range(5):
            go(n, WG, lambda core: [Call(net, {"op": "links"})])
        assert n.kernel.state.restarts == {} and n.kernel.state.pd_status[NET] == "running"
        assert all(r["ok"] is False for r in wg_replies(s))


def test_requests_to_an_adapter_that_never_answers_are_bounded(
        driver: tuple[SimNode, Stage], twin: Twin) -> None:
    n, _ = driver
    net = net_token(n)
    sends = 3 * MAX_PENDING_CALLS
    go(n, WG, lambda core: [Send(net, {"op": "udp.send", "to": "192.0.2.9:9", "data": b"x"})
                            for _ in range(sends)])
    core = n.host.cores[NET]
    assert isinstance(core, NetDriverCore)
    assert len(n.host.cells[NET].inflight) <= MAX_PENDING_CALLS
    assert len(core._waiting) <= MAX_PENDING_CALLS


# ============================================================================= the netlink adapter
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")
NS_PREFIX = f"ppn8adv{os.getpid() % 100000}"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line}


class Answers:
    def __init__(self) -> None:
        self.got: list[IoAnswer] = []
        self.event = threading.Event()

    def __call__(self, a: IoAnswer) -> None:
        self.got.append(a)
        self.event.set()


def test_netlink_a_request_after_close_is_a_one_line_failure_at_once() -> None:
    adapter = NetlinkAdapter()
    adapter.close()
    got = Answers()
    adapter.submit(ListLinks(1), got)
    adapter.submit(SendDatagram(2, "127.0.0.1:9", b"x"), got)
    assert got.got == [IoFailure(1, "netlink: closed"), IoFailure(2, "netlink: closed")]


def test_netlink_close_while_a_request_is_in_flight_gives_no_answer_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = NetlinkAdapter()
    started, go_on = threading.Event(), threading.Event()

    def slow_links() -> list[dict[str, Any]]:
        started.set()
        go_on.wait(5.0)
        return []
    monkeypatch.setattr(adapter, "_links", slow_links)
    got = Answers()
    adapter.submit(ListLinks(1), got)
    assert started.wait(5.0)
    threading.Timer(0.3, go_on.set).start()
    t0 = time.monotonic()
    adapter.close()
    assert time.monotonic() - t0 < 5.5
    time.sleep(0.1)
    assert got.got == []  # "no answer is given after this returns"
    adapter.submit(ListLinks(3), got)
    assert got.got == [IoFailure(3, "netlink: closed")]


@pytest.mark.real
@needs_root
def test_netlink_reads_another_namespace_and_fails_one_line_on_a_bad_send() -> None:
    ns = f"{NS_PREFIX}r"
    ip("netns", "del", ns)
    assert ip("netns", "add", ns).returncode == 0
    adapter = NetlinkAdapter(netns=ns)
    try:
        assert ip("-n", ns, "link", "add", "ppn8adva", "type", "veth", "peer", "name",
                  "ppn8advb").returncode == 0
        got = Answers()
        adapter.submit(ListLinks(1), got)
        assert got.event.wait(20.0)
        (answer,) = got.got
        assert isinstance(answer, IoResult), answer
        assert sorted(x["name"] for x in answer.value["links"]) == ["lo", "ppn8adva", "ppn8advb"]
        got = Answers()
        adapter.submit(SendDatagram(2, "255.255.255.255:9", b"x"), got)  # no SO_BROADCAST
        assert got.event.wait(5.0)
        (failure,) = got.got
        assert isinstance(failure, IoFailure) and failure.request_id == 2
        assert one_line(failure.error) and "PermissionError" in failure.error
    finally:
        adapter.close()
        ip("netns", "del", ns)
    assert ns not in namespaces()


def test_netlink_sends_a_real_datagram() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5.0)
        port = rx.getsockname()[1]
        adapter = NetlinkAdapter()
        try:
            got = Answers()
            adapter.submit(SendDatagram(1, f"127.0.0.1:{port}", b"hello"), got)
            assert rx.recvfrom(100)[0] == b"hello"
            assert got.event.wait(5.0) and got.got == [IoResult(1, {"sent": 5})]
        finally:
            adapter.close()


@pytest.mark.real
@needs_root
def test_netlink_a_namespace_that_does_not_exist_is_a_failure_and_is_not_created() -> None:
    ns = f"{NS_PREFIX}missing"
    ip("netns", "del", ns)
    try:
        with real_node(make_core, adapters=lambda: {NET: NetlinkAdapter(netns=ns)}) as node:
            with pytest.raises(ControlError) as err:
                node.net_links()
            assert one_line(str(err.value))
            assert node.status()["pds"][NET]["status"] == "running"
            assert node.host.running() == sorted(PDS)
        assert ns not in namespaces()
    finally:
        ip("netns", "del", ns)


# ============================================================================= the control socket
class LinksTwin:
    """A backend that answers every ListLinks at once, counting them."""

    LINKS: ClassVar[list[dict[str, Any]]] = [
        {"index": 1, "name": "lo", "state": "UNKNOWN", "mac": None, "mtu": 65536,
         "addresses": []}]

    def __init__(self) -> None:
        self.requests: list[IoRequest] = []

    def attach(self, emit: Emit) -> None:
        pass

    def submit(self, request: IoRequest, answer: Answer) -> None:
        self.requests.append(request)
        answer(IoResult(request.request_id, {"links": self.LINKS}))

    def close(self) -> None:
        pass


def exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send every line at once on one connection; the replies, one per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        sock.connect(os.fspath(path))
        sock.sendall(b"".join(lines))
        with sock.makefile("rb") as reader:
            return [json.loads(reader.readline()) for _ in lines]


BAD_NET_LINKS = [
    (b'{"cmd": "net.links", "pd": "pd-net-driver"}\n', "unknown field 'pd'"),
    (b'{"cmd": "net.links", "pd": 5}\n', "unknown field 'pd'"),
    (b'{"cmd": "net.links", "op": "udp.send"}\n', "unknown field 'op'"),
    (b'{"cmd": "net.links", "to": "192.0.2.1:53", "data": "x"}\n', "unknown field 'data'"),
    (b'{"cmd": "net.links", "cap": 5}\n', "unknown field 'cap'"),
    (b'{"cmd": "net.links", "timeout": 1e308}\n', "unknown field 'timeout'"),
    (b'{"cmd": "net.links", "": null}\n', "unknown field ''"),
    (b'{"cmd": ["net.links"]}\n', "unknown command ['net.links']"),
    (b'{"cmd": "NET.LINKS"}\n', "unknown command 'NET.LINKS'"),
    (b'{"cmd": "net.links "}\n', "unknown command 'net.links '"),
    (b'{"cmd": "net.links\\u0000"}\n', "unknown command"),
    (b'{"cmd": null}\n', "unknown command None"),
    (b'{"cmd": "net.links", "cmd": "net.links"}\n', "duplicate key 'cmd'"),
    (b'{"cmd": "net.links", "x": NaN}\n', "NaN is not a number"),
    (b'"net.links"\n', "a request is a JSON object"),
]


def test_control_net_links_refuses_extra_fields_and_wrong_types() -> None:
    backend = LinksTwin()
    with real_node(make_core, control=True, adapters=lambda: {NET: backend}) as node:
        path = node.state_dir / SOCKET_NAME
        lines = [line for line, _ in BAD_NET_LINKS] + [b'{"cmd": "net.links"}\n']
        replies = exchange(path, lines)
        for (line, needle), reply in zip(BAD_NET_LINKS, replies, strict=False):
            assert reply["ok"] is False and needle in reply["error"], (line, reply)
            assert one_line(reply["error"])
        assert replies[-1] == {"ok": True, "result": LinksTwin.LINKS}
        assert len(backend.requests) == 1  # only the good request reached pd-net-driver
        assert node.host.running() == sorted(PDS)
        assert node.kernel.refused == {}


def ppn(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def no_node(kind: str, d: Path) -> Path:
    state = d / "state"
    if kind == "missing-dir":
        return state
    state.mkdir()
    sock = state / SOCKET_NAME
    if kind == "stale-socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.fspath(sock))
        s.close()  # the file stays; nothing listens
    elif kind == "socket-is-a-file":
        sock.write_text("not a socket")
    elif kind == "socket-is-a-dir":
        sock.mkdir()
    return state


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("kind", ["missing-dir", "empty-dir", "stale-socket",
                                  "socket-is-a-file", "socket-is-a-dir"])
def test_ppn_net_links_without_a_node_exits_1_with_one_line(kind: str,
                                                            json_flag: bool) -> None:
    d = Path(tempfile.mkdtemp(prefix="ppn8a-", dir="/tmp"))
    try:
        state = no_node(kind, d)
        proc = ppn("net", "links", "--state-dir", state, *(["--json"] if json_flag else []))
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert proc.stdout == ""
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert proc.stderr.startswith("ppn: error: ")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_ppn_net_links_with_pd_network_admin_reaped_exits_1() -> None:
    with real_node(make_core, control=True, adapters=lambda: {NET: LinksTwin()}) as node:
        assert json.loads(ppn("net", "links", "--state-dir", node.state_dir,
                              "--json").stdout) == LinksTwin.LINKS
        node.host.reap(ADMIN, "no operator today")
        proc = ppn("net", "links", "--state-dir", node.state_dir)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"ppn: error: net.links: {ADMIN} is not running\n"


# ============================================================================= lifecycle
def forbidden(host: Any, state: State, ledger: Any, failed: str) -> None:
    """Each request the transition table has no row for: a precise HostError, nothing
    journalled, nothing changed."""
    attempts = [
        ("reap", failed, f"cannot reap {failed}: pd.reaped does not apply to {failed}: its "
                         "status is failed, and pd.reaped needs running"),
        ("spawn", VMM, f"cannot spawn {VMM}: pd.spawned does not apply to {VMM}: its status "
                       "is running, and pd.spawned needs failed or reaped"),
        ("reap", "pd-nobody", "cannot reap pd-nobody: pd.reaped does not apply to pd-nobody: "
                              "its status is undeclared, and pd.reaped needs running"),
        ("spawn", "pd-nobody", "cannot spawn pd-nobody: pd.spawned does not apply to "
                               "pd-nobody: its status is undeclared, and pd.spawned needs "
                               "failed or reaped"),
        ("reap", "", "cannot reap : pd.reaped does not apply to : its status is undeclared, "
                     "and pd.reaped needs running"),
    ]
    for what, pd, message in attempts:
        before = snap(state, ledger)
        with pytest.raises(HostError) as err:
            getattr(host, what)(pd, "not allowed")
        assert str(err.value) == message
        assert snap(state, ledger) == before
    host.reap(GENESIS, "ceremony over")
    before = snap(state, ledger)
    with pytest.raises(HostError, match=f"cannot reap {GENESIS}: .* status is reaped"):
        host.reap(GENESIS, "twice")
    assert snap(state, ledger) == before
    host.spawn(failed, "operator asked")
    assert state.pd_status[failed] == "running"
    before = snap(state, ledger)
    with pytest.raises(HostError, match=f"cannot spawn {failed}: .* status is running"):
        host.spawn(failed, "twice")
    assert snap(state, ledger) == before


def test_sim_forbidden_lifecycle_requests_are_precise_and_change_nothing(sim: SimNode) -> None:
    n = sim
    for _ in range(4):
        n.host.crash(FLEET, "fault")
    assert n.kernel.state.pd_status[FLEET] == "failed"
    forbidden(n.host, n.kernel.state, n.ledger, FLEET)
    n.host.run_until_idle()
    assert FLEET in n.host.cores and GENESIS not in n.host.cores
    # A crash injected into a reaped PD journals nothing.
    size = n.ledger.size
    n.host.crash(GENESIS, "after the reap")
    assert n.ledger.size == size and GENESIS not in n.kernel.state.restarts


def _raise(core: Puppet) -> list[Action]:
    raise RuntimeError("scripted crash")


def test_real_node_forbidden_lifecycle_requests_are_precise_and_change_nothing(
        real: Node, stage: Stage) -> None:
    n = real
    go_to = tok(n.kernel.state, FLEET, "endpoint:pd-fleet", original=True)
    for i in range(4):
        stage.scripts[FLEET].append(_raise)
        n.kernel.send(FLEET, go_to, GO)
        def crashed(i: int = i) -> bool:
            s = n.kernel.state
            return s.restarts.get(FLEET, 0) == min(i + 1, 3) and (
                i < 3 or s.pd_status[FLEET] == "failed")
        wait_for(crashed)
    wait_for(lambda: FLEET not in n.host.running())
    forbidden(n.host, n.kernel.state, n.ledger, FLEET)
    wait_for(lambda: GENESIS not in n.host.running() and FLEET in n.host.running())


def blocked(entered: threading.Event, go_on: threading.Event) -> Callable[[Puppet], Any]:
    def script(core: Puppet) -> Any:
        entered.set()
        go_on.wait(5.0)
        raise RuntimeError("a crash racing the lifecycle")
    return script


def test_real_node_a_crash_racing_a_reap_journals_no_restart(real: Node, stage: Stage) -> None:
    n = real
    entered, go_on = threading.Event(), threading.Event()
    stage.scripts[FLEET].append(blocked(entered, go_on))
    n.kernel.send(FLEET, tok(n.kernel.state, FLEET, "endpoint:pd-fleet", original=True), GO)
    assert entered.wait(5.0)
    n.host.reap(FLEET, "reaped while its handler runs")
    go_on.set()
    wait_for(lambda: FLEET not in n.host.running())
    time.sleep(0.2)
    s = n.kernel.state
    assert s.pd_status[FLEET] == "reaped" and FLEET not in s.restarts
    assert "pd.restarted" not in s.event_counts
    assert not [t for t in s.event_counts if t.endswith("(inapplicable)")]
    assert n.host.running() == sorted(set(PDS) - {FLEET})


@pytest.mark.parametrize("second", ["reap", "spawn"])
def test_real_node_racing_lifecycle_requests_journal_one_change(real: Node,
                                                                second: str) -> None:
    """Two threads ask at once: reap and reap (one wins, one HostError), or reap and spawn
    (the spawn fits only after the reap).  Either way the log holds only what fitted."""
    n = real
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def ask(what: str, key: str) -> None:
        barrier.wait(5.0)
        try:
            getattr(n.host, what)(VMM, f"{key} racing")
            outcome[key] = "done"
        except HostError as exc:
            outcome[key] = exc
    threads = [threading.Thread(target=ask, args=("reap", "first")),
               threading.Thread(target=ask, args=(second, "second"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    s = n.kernel.state
    assert s.event_counts.get("pd.reaped") == 1
    assert not [t for t in s.event_counts if t.endswith("(inapplicable)")]
    if second == "reap":
        assert sorted(map(str, outcome.values())).count("done") == 1
        assert s.pd_status[VMM] == "reaped"
    elif outcome["second"] == "done":
        assert s.pd_status[VMM] == "running" and s.event_counts["pd.spawned"] == 1
        wait_for(lambda: VMM in n.host.running())
    else:
        assert "status is running" in str(outcome["second"])
        assert s.pd_status[VMM] == "reaped" and "pd.spawned" not in s.event_counts


def test_real_node_a_crash_of_a_reaped_core_is_not_journalled_against_its_respawn(
        real: Node, stage: Stage) -> None:
    n = real
    entered, go_on = threading.Event(), threading.Event()
    stage.scripts[FLEET].append(blocked(entered, go_on))
    n.kernel.send(FLEET, tok(n.kernel.state, FLEET, "endpoint:pd-fleet", original=True), GO)
    assert entered.wait(5.0)
    n.host.reap(FLEET, "reaped while its handler runs")
    made = len(stage.made[FLEET]) + 1
    n.host.spawn(FLEET, "and spawned again at once")
    wait_for(lambda: len(stage.made[FLEET]) == made)  # the new actor booted its core
    go_on.set()
    time.sleep(0.5)
    s = n.kernel.state
    assert s.pd_status[FLEET] == "running"
    assert s.restarts.get(FLEET, 0) == 0, "the old incarnation's crash was journalled"
    assert len(stage.made[FLEET]) == made, "a core was booted for the reaped incarnation"


# ============================================================================= the wire
EDGE_ROUND_TRIPS: dict[str, Any] = {
    "int-2**63": 2**63, "int-2**64-1": 2**64 - 1, "int--2**63": -(2**63),
    "inf": math.inf, "-inf": -math.inf, "bool-keys": {True: "t", False: "f"},
    "int-key-then-bool": dict([(1, "a"), (True, "b")]),  # one key, 1: Python's dict
    "bool-key-then-int": dict([(True, "a"), (1, "b")]),  # one key, True
    "bytes-keys": {b"\x00": 1, b"\xff" * 40: 2}, "float-keys": {1.5: "x", -0.5: "y"},
    "none-key": {None: None}, "huge-str-key": {"k" * (MAX_MESSAGE_BYTES - 64): 1},
    "nested-64-lists": "deep-lists-64", "nested-64-maps": "deep-maps-64",
    "wide-list": [0] * (MAX_MESSAGE_BYTES // 2),
}


def deep(kind: str, levels: int) -> Any:
    """``levels`` containers nested in each other (lists, or maps keyed ``"k"``)."""
    out: Any = [] if kind == "lists" else {}
    for _ in range(levels - 1):
        out = [out] if kind == "lists" else {"k": out}
    return out


def materialise(value: Any) -> Any:
    if value == "deep-lists-64":
        return deep("lists", MAX_DEPTH)
    if value == "deep-maps-64":
        return deep("maps", MAX_DEPTH)
    return value


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (True is not 1, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                      == math.copysign(1, b))
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return (len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
                and all(same(a[k], b[k]) for k in a))
    return bool(a == b)


@pytest.mark.parametrize("kind", sorted(EDGE_ROUND_TRIPS))
def test_wire_edge_values_round_trip_exactly(kind: str) -> None:
    value = materialise(EDGE_ROUND_TRIPS[kind])
    assert same(wire.copy(value), value)


def test_wire_keeps_nan_and_negative_zero() -> None:
    out = wire.copy([math.nan, -0.0, 0.0, {"z": -0.0}])
    assert math.isnan(out[0]) and math.copysign(1, out[1]) == -1.0
    assert math.copysign(1, out[2]) == 1.0 and math.copysign(1, out[3]["z"]) == -1.0
    keys = list(wire.copy({math.nan: 1, -0.0: 2}))
    assert math.isnan(keys[0]) and math.copysign(1, keys[1]) == -1.0


def _cyclic() -> Any:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _cyclic_map() -> Any:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


EDGE_REFUSED: dict[str, Callable[[], Any]] = {
    "int-2**64": lambda: 2**64, "int--2**63-1": lambda: -(2**63) - 1,
    "int-key-2**64": lambda: {2**64: 1}, "nested-65-lists": lambda: deep("lists", MAX_DEPTH + 1),
    "nested-65-maps": lambda: deep("maps", MAX_DEPTH + 1),
    "nested-65-mixed": lambda: {"a": deep("lists", MAX_DEPTH)},
    "cyclic-list": _cyclic, "cyclic-map": _cyclic_map,
    "lone-surrogate": lambda: {"op": "\ud800"}, "lone-surrogate-key": lambda: {"\udfff": 1},
    "one-byte-over": lambda: bytes(MAX_MESSAGE_BYTES - 4),
    "huge-key-over": lambda: {"k" * MAX_MESSAGE_BYTES: 1},
    "list-key": lambda: {"k": {(): 1}}, "bytearray": lambda: bytearray(b"x"),
    "memoryview": lambda: {"m": memoryview(b"x")}, "frozenset": lambda: frozenset({1}),
}


@pytest.mark.parametrize("kind", sorted(EDGE_REFUSED))
def test_wire_refuses_edge_values_with_not_plain_data(kind: str) -> None:
    with pytest.raises(NotPlainData) as err:
        wire.encode(EDGE_REFUSED[kind]())
    assert one_line(str(err.value))


def test_wire_one_mebibyte_exactly_is_the_limit() -> None:
    assert len(wire.encode(bytes(MAX_MESSAGE_BYTES - 5))) == MAX_MESSAGE_BYTES
    assert len(wire.encode("x" * (MAX_MESSAGE_BYTES - 5))) == MAX_MESSAGE_BYTES
    with pytest.raises(NotPlainData, match=f"{MAX_MESSAGE_BYTES + 1} bytes encoded"):
        wire.encode(bytes(MAX_MESSAGE_BYTES - 4))


def test_edge_payloads_cross_the_kernel_intact_or_are_refused_at_the_sender(
        sim: SimNode, stage: Stage) -> None:
    n = sim
    to_wg = tok(n.kernel.state, FLEET, "endpoint:pd-wireguard")
    edge = {"op": "edge", "v": [math.nan, -0.0, math.inf, 2**64 - 1, -(2**63)],
            "k": {True: 1, b"b": 2, 0.5: 3}, "d": deep("lists", MAX_DEPTH - 1),
            "b": bytes(MAX_MESSAGE_BYTES - 200)}
    go(n, FLEET, lambda core: [Send(to_wg, edge)])
    (m,) = stage.core(WG).messages
    assert same(m.payload["k"], edge["k"]) and same(m.payload["d"], edge["d"])
    v = m.payload["v"]
    assert math.isnan(v[0]) and math.copysign(1, v[1]) == -1 and v[2:] == edge["v"][2:]
    before = n.kernel.refused[(FLEET, "bad-message")]
    too_deep = {"op": "edge", "d": deep("lists", MAX_DEPTH)}  # 65 levels with the map
    go(n, FLEET, lambda core: [Send(to_wg, too_deep), Send(to_wg, _cyclic())])
    assert n.kernel.refused[(FLEET, "bad-message")] == before + 2
    assert len(stage.core(WG).messages) == 1 and n.kernel.state.restarts == {}
