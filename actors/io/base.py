"""The adapter interface: what the node host and the simulator's twins both implement.

An adapter carries out its PD's typed I/O requests outside the PD's handler (a
worker thread here; virtual time in ``sims/backends``) and answers each exactly
once, with an :class:`~actors.pds.base.IoResult` or an
:class:`~actors.pds.base.IoFailure`.  What the world says unasked it passes to
``emit`` as an :class:`~actors.pds.base.IoInput`.  It holds no tokens and never
touches the kernel, the ledger or the state: what it reports becomes state only
through an event the PD's core returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

import structlog

from actors.pds.base import IoAnswer, IoFailure, IoInput, IoRequest

log = structlog.get_logger("io")

Answer = Callable[[IoAnswer], None]
Emit = Callable[[IoInput], None]


class Adapter(Protocol):
    def submit(self, request: IoRequest, answer: Answer) -> None:
        """Start ``request``; ``answer`` is called once, from any thread, when it is done."""

    def attach(self, emit: Emit) -> None:
        """Where unsolicited input goes (called once, before the first request)."""

    def close(self) -> None:
        """Stop: no answer is given after this returns."""


def printable_line(text: str) -> str:
    """``text`` as one line an operator's terminal may show: whitespace runs as one
    space, anything unprintable (an escape sequence) as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


def submit_guarded(adapter: Adapter, request: IoRequest, answer: Answer) -> None:
    """``adapter.submit``, with an adapter that raises answering an IoFailure instead."""
    try:
        adapter.submit(request, answer)
    except Exception as exc:
        log.warning("io.submit_failed", request=type(request).__name__, error=repr(exc)[:300])
        answer(IoFailure(request.request_id, f"{type(exc).__name__}: {exc}"[:300]))


class WorkerAdapter:
    """An adapter whose requests run one at a time on its own worker thread.

    Subclasses implement :meth:`perform` (blocking is fine: it is not the PD's
    handler); an exception there is the request's failure, in one line.
    """

    name = "adapter"

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[IoRequest, Answer] | None] = queue.SimpleQueue()
        self._emit: Emit = lambda event: None
        self._thread = threading.Thread(target=self._run, name=f"ppn-io-{self.name}",
                                        daemon=True)
        self._closed = False
        self._thread.start()

    def attach(self, emit: Emit) -> None:
        self._emit = emit

    def submit(self, request: IoRequest, answer: Answer) -> None:
        if self._closed:
            answer(IoFailure(request.request_id, f"{self.name}: closed"))
            return
        self._queue.put((request, answer))

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5.0)

    def perform(self, request: IoRequest) -> IoAnswer:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, answer = item
            if self._closed:  # closing: what is still queued is neither done nor answered
                continue
            try:
                result = self.perform(request)
            except Exception as exc:  # a failure of this request, not of the adapter
                result = IoFailure(request.request_id, f"{type(exc).__name__}: {exc}"[:300])
            if not self._closed:
                try:
                    answer(result)
                except Exception as exc:
                    log.warning("io.answer_failed", adapter=self.name, error=repr(exc))
