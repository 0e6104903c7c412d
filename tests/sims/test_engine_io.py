"""Typed I/O through the engine: declared requests only, one answer each, and nothing
from before a restart reaches the new core (issue 8, part 2)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog.testing

from actors.io.base import Answer, Emit
from actors.pds.base import (
    Action,
    Core,
    IoAnswer,
    IoInput,
    IoRequest,
    IoResult,
    Message,
    PdView,
)
from actors.pds.pd_net_driver import DatagramReceived, ListLinks
from sims.node import SimNode, build_node, scratch_directory

NET = "pd-net-driver"


@dataclass(frozen=True, slots=True)
class Undeclared(IoRequest):
    pass


class Twin:
    """A backend that holds answers until the test releases them (and may answer twice)."""

    def __init__(self) -> None:
        self.pending: list[tuple[IoRequest, Answer]] = []
        self.emit: Emit = lambda event: None

    def attach(self, emit: Emit) -> None:
        self.emit = emit

    def submit(self, request: IoRequest, answer: Answer) -> None:
        self.pending.append((request, answer))

    def close(self) -> None:
        pass


class Asker(Core):
    """On any note: asks for what the note names."""

    requests = (ListLinks,)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.answers: list[Any] = []
        self.inputs: list[Any] = []

    def start(self, view: PdView, now: float) -> list[Action]:
        return super().start(view, now)

    def op_note(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        kind = payload.get("ask")
        if kind == "links":
            return [ListLinks(self.request_id())]
        if kind == "same-id":
            return [ListLinks(7), ListLinks(7)]
        if kind == "undeclared":
            return [Undeclared(self.request_id())]
        return []

    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        self.answers.append(answer)
        return []

    def input(self, event: IoInput, now: float) -> list[Action]:
        self.inputs.append(event)
        return []


@pytest.fixture
def node() -> Iterator[tuple[SimNode, Twin]]:
    twin = Twin()
    with scratch_directory("ppn-engine-io-") as d, structlog.testing.capture_logs():
        n = build_node(d / "l", 3, adapters={NET: twin},
                       make_core=lambda pd: Asker(pd) if pd == NET else Core(pd))
        try:
            yield n, twin
        finally:
            n.close()


def ask(n: SimNode, what: str) -> None:
    wg = n.port("pd-wireguard")
    net = next(t for t in wg.tokens() if n.kernel.state.caps[t.cap_id].obj == "net")
    wg.send(net, {"op": "note", "ask": what})
    n.host.run_until_idle()


def core(n: SimNode) -> Asker:
    c = n.host.cores[NET]
    assert isinstance(c, Asker)
    return c


def test_an_answer_is_taken_once(node: tuple[SimNode, Twin]) -> None:
    n, twin = node
    ask(n, "links")
    (request, answer), = twin.pending
    answer(IoResult(request.request_id, {"links": []}))
    answer(IoResult(request.request_id, {"links": ["again"]}))  # a buggy adapter
    n.host.run_until_idle()
    assert core(n).answers == [IoResult(request.request_id, {"links": []})]
    assert n.host.engine.dropped["answer to no request in flight"] == 1


def test_nothing_from_before_a_restart_reaches_the_new_core(node: tuple[SimNode, Twin]) -> None:
    n, twin = node
    ask(n, "links")
    (request, answer), = twin.pending
    n.host.crash(NET, "test fault")
    twin.emit(DatagramReceived("192.0.2.9:1", b"old"))  # stamped with the new generation
    n.host.run_until_idle()
    answer(IoResult(request.request_id, {"links": []}))
    n.host.run_until_idle()
    assert core(n).answers == []
    assert n.host.engine.dropped["answer for an earlier core"] == 1
    assert [e.data for e in core(n).inputs] == [b"old"]
    generation = n.host.cells[NET].generation
    n.host._unsolicited(NET, DatagramReceived("192.0.2.9:1", b"x"))  # queued, then a restart
    n.host.crash(NET, "again")
    n.host.run_until_idle()
    assert n.host.cells[NET].generation > generation and core(n).inputs == []
    assert n.host.engine.dropped["stale or malformed input"] == 1


def test_undeclared_and_duplicate_requests_are_refused(node: tuple[SimNode, Twin]) -> None:
    n, twin = node
    ask(n, "undeclared")
    ask(n, "same-id")
    assert [type(r) for r, _ in twin.pending] == [ListLinks]  # the second 7 was refused
    assert n.kernel.refused[(NET, "undeclared-io")] == 1
    assert n.kernel.refused[(NET, "bad-request")] == 1
    assert not n.kernel.state.restarts
