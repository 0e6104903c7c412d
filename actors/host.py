"""The node host: each protection domain a pykka actor around its sans-I/O core.

This host is mechanism only: threads, the wall clock, one timer thread, and the
PDs' adapters.  What a core's actions mean, when a PD restarts or fails, how it is
reaped or spawned: all of that is the engine's (``actors.engine``), which the
simulator's host runs too.

An actor is a thin shell.  Deliveries reach it only through its :class:`_Mailbox`,
which only the kernel's route fills (a :class:`~actors.kernel.Delivery` told into
its pykka inbox is ignored); timer ticks, I/O answers and unsolicited input come
as their own messages.  The host keeps its own name -> actor map; nothing is
looked up in pykka's global registry (that would be ambient authority).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
import structlog

from actors.engine import Cell, CoreFactory, Engine
from actors.io.base import Adapter, submit_guarded
from actors.kernel import Backpressure, Delivery, Kernel
from actors.lifecycle import HostError
from actors.pds import make_core
from actors.pds.base import (
    Action,
    HeldChanged,
    IoAnswer,
    IoFailure,
    IoInput,
    IoRequest,
    MembersChanged,
    NodeChanged,
)
from ledger.caps import CapRefused
from ledger.log import Ledger

log = structlog.get_logger("host")

__all__ = ["CoreFactory", "Host", "HostError", "Timers"]

@dataclass(frozen=True, slots=True)
class _Tick:
    """A timer the core asked for; stale once the core that set it was replaced."""

    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class _Answer:
    """An adapter's answer to a request the core with ``generation`` made."""

    generation: int
    answer: IoAnswer


@dataclass(frozen=True, slots=True)
class _Input:
    """What an adapter was told unasked, while the core had ``generation``."""

    generation: int
    event: IoInput


class _CoreStatus:
    """Query: the core's own status (answered in the actor's thread, in queue order)."""


class _Drain:
    """Tells an actor its mailbox has deliveries; one is in flight per burst, not per message."""


_DRAIN = _Drain()


MAX_QUEUED = 100_000
"""Deliveries one PD's mailbox holds; a send past it is refused at the sender (queue-full)."""
MAX_QUEUED_BYTES = 256 << 20
"""Payload bytes one PD's mailbox holds (256 MiB); past it a send is refused too."""


class _Mailbox:
    """A PD's queue of deliveries, beside pykka's inbox.

    The kernel's messages go here; the actor is told once per burst and takes the
    whole burst at a time, so a message costs a deque append, not a pykka envelope
    and a queue hand-off.  Order is kept, and every delivery is still checked by
    ``kernel.accept`` when the actor takes it, so revocation stays immediate.
    """

    __slots__ = ("bytes", "lock", "queue", "ref", "scheduled")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref
        self.queue: deque[Delivery] = deque()
        self.lock = threading.Lock()
        self.scheduled = False
        self.bytes = 0  # payload bytes queued

    def post(self, d: Delivery) -> None:
        with self.lock:
            if len(self.queue) >= MAX_QUEUED or self.bytes + len(d.data) > MAX_QUEUED_BYTES:
                raise Backpressure(f"{d.target}'s queue is full ({len(self.queue)} messages, "
                                   f"{self.bytes} bytes)")
            self.queue.append(d)
            self.bytes += len(d.data)
            if self.scheduled:
                return
            self.scheduled = True
        self.ref.tell(_DRAIN)

    def take(self) -> deque[Delivery]:
        """Everything queued; the actor is told again if more arrives after."""
        with self.lock:
            batch, self.queue = self.queue, deque()
            self.bytes = 0
            if not batch:
                self.scheduled = False
            return batch

    def settle(self) -> bool:
        """After a burst: True if more arrived meanwhile (another drain is due)."""
        with self.lock:
            if self.queue:
                return True
            self.scheduled = False
            return False


class Timers:
    """One thread that posts callbacks when they are due; no thread per timer."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._now = monotonic
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ppn-timers", daemon=True)
        self._thread.start()

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        if not math.isfinite(delay):
            raise ValueError(f"a timer's delay must be a finite number, not {delay!r}")
        with self._cond:
            heapq.heappush(self._heap, (self._now() + max(0.0, delay), next(self._seq),
                                        callback))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > self._now()):
                    # Bounded: a far-off deadline must never overflow the wait itself.
                    wait = min(self._heap[0][0] - self._now(), 3600.0) if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception as exc:  # a timer must never kill the timer thread
                log.warning("timer.callback_failed", error=repr(exc))


class PdActor(pykka.ThreadingActor):
    """One protection domain: an inbox and the PD's cell, run by the engine."""

    use_daemon_thread = True  # a PD stuck in a handler must not keep the process alive

    def __init__(self, host: Host, cell: Cell) -> None:
        super().__init__()
        self.pd = cell.pd
        self._host = host
        self._engine = host.engine
        self.cell = cell
        # Reachable before on_start boots the core: an answer to an I/O request the core
        # makes at start (an adapter may answer at once, from its own thread) or a
        # message sent to it then must find it, not be dropped as "no actor".
        host._register(cell.pd, self.actor_ref)

    # ----------------------------------------------------------------- pykka hooks
    def on_start(self) -> None:
        self._engine.boot(self.cell)

    def on_receive(self, message: Any) -> Any:
        engine, cell = self._engine, self.cell
        if message is _DRAIN:
            self._drain()
        elif type(message) is _Tick:
            engine.tick(cell, message.name, message.generation)
        elif type(message) is _Answer:
            engine.answer(cell, message.generation, message.answer)
        elif type(message) is _Input:
            engine.unsolicited(cell, message.generation, message.event)
        elif isinstance(message, _CoreStatus):
            # Deliveries posted before the query are answered for first: a status
            # query is a barrier, as it would be in a single FIFO inbox.
            self._drain()
            return engine.status(cell)
        else:  # a Delivery told straight into the inbox is not the kernel's route
            engine.dropped["not from the kernel's route"] += 1
            log.warning("pd.unknown_message", pd=self.pd, kind=type(message).__name__)
        return None

    def _drain(self) -> None:
        mailbox = self._host.mailbox(self.pd)
        if mailbox is None:
            return
        engine, cell = self._engine, self.cell
        for d in mailbox.take():
            engine.deliver(cell, d)
        if mailbox.settle():  # more came in: go round pykka's inbox again, so timers and
            self.actor_ref.tell(_DRAIN)  # status queries are not starved by a flood


class Host:
    """Runs every PD as an actor; the kernel's only route to them."""

    def __init__(self, ledger: Ledger, kernel: Kernel, *, make_core: CoreFactory = make_core,
                 adapters: dict[str, Adapter] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 restart_limit: int = 3, restart_window: float = 60.0) -> None:
        self.ledger, self.kernel, self.clock = ledger, kernel, clock
        self._monotonic = monotonic
        self._refs: dict[str, pykka.ActorRef[PdActor]] = {}
        self._mailboxes: dict[str, _Mailbox] = {}
        self._cells: dict[str, Cell] = {}
        self._lock = threading.Lock()  # guards _refs and _mailboxes
        self._adapters = dict(adapters or {})
        self.timers = Timers(monotonic)
        self.engine = Engine(kernel, self, make_core, restart_limit=restart_limit,
                             restart_window=restart_window)
        for pd, adapter in self._adapters.items():
            adapter.attach(functools.partial(self._unsolicited, pd))
        kernel.set_route(self.route)
        kernel.watch_node(self._node_changed)
        kernel.watch_members(self._members_changed)
        kernel.watch_held(self._held_changed)

    # ----------------------------------------------------------------- routing
    def route(self, target: str, delivery: Delivery) -> None:
        """The kernel's one way to reach a PD: its mailbox, then its actor is told."""
        mailbox = self._mailboxes.get(target)  # one dict read: atomic, no lock needed
        try:
            if mailbox is None:
                raise pykka.ActorDeadError(target)
            mailbox.post(delivery)
        except pykka.ActorDeadError:
            self.kernel.dropped += 1
            log.info("host.no_actor", pd=target)

    def mailbox(self, pd: str) -> _Mailbox | None:
        return self._mailboxes.get(pd)

    def _tell(self, pd: str, message: Any) -> None:
        ref = self._refs.get(pd)
        with contextlib.suppress(pykka.ActorDeadError):
            if ref is not None:
                ref.tell(message)

    # ----------------------------------------------------------------- the mechanism
    def now(self) -> float:
        return self.clock()

    def elapsed(self) -> float:
        return self._monotonic()

    def set_timer(self, pd: str, name: str, delay: float, generation: int) -> None:
        self.timers.schedule(delay, lambda: self._tell(pd, _Tick(name, generation)))

    def submit_io(self, pd: str, generation: int, request: IoRequest) -> None:
        adapter = self._adapters.get(pd)
        if adapter is None:
            self._tell(pd, _Answer(generation, _no_adapter(pd, request)))
            return
        submit_guarded(adapter, request,
                       lambda answer: self._tell(pd, _Answer(generation, answer)))

    def _node_changed(self, node: dict[str, Any]) -> None:
        for pd in list(self._cells):
            self._unsolicited(pd, NodeChanged(dict(node)))

    def _held_changed(self, pd: str) -> None:
        self._unsolicited(pd, HeldChanged())

    def _members_changed(self, members: dict[str, Any], removed: dict[str, Any]) -> None:
        for pd in list(self._cells):
            self._unsolicited(pd, MembersChanged(dict(members), dict(removed)))

    def _unsolicited(self, pd: str, event: IoInput) -> None:
        """Stamped with the core's generation as the adapter says it: if the core is
        replaced before it is handled, it is dropped."""
        cell = self._cells.get(pd)
        if cell is None:  # stopped (failed, reaped) or never started: nobody to tell
            self.engine.dropped["no core"] += 1
            return
        self._tell(pd, _Input(cell.generation, event))

    def refused(self, pd: str, action: Action, exc: CapRefused) -> None:
        log.info("pd.action_refused", pd=pd, action=type(action).__name__, code=exc.code,
                 reason=str(exc))

    def start(self, pd: str) -> None:
        with self._lock:
            if pd in self._refs and self._refs[pd].is_alive():
                raise HostError(f"{pd} is already running")
        cell = Cell(pd)
        self._cells[pd] = cell
        PdActor.start(self, cell)  # which registers itself before its thread runs
        log.info("host.pd_started", pd=pd)

    def _register(self, pd: str, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._refs[pd] = ref
            self._mailboxes[pd] = _Mailbox(ref)

    def stop(self, pd: str) -> None:
        """Ask ``pd``'s actor to stop, without waiting (the caller may be its handler)."""
        with self._lock:
            ref = self._refs.pop(pd, None)
            self._mailboxes.pop(pd, None)
            cell = self._cells.pop(pd, None)
        if cell is not None:
            cell.stopped = True
        if ref is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)

    # ----------------------------------------------------------------- lifecycle
    def running(self) -> list[str]:
        with self._lock:
            return sorted(pd for pd, ref in self._refs.items() if ref.is_alive())

    def start_all(self) -> None:
        """Start every PD the ledger says is running, highest priority first."""
        self.engine.start_all()

    def reap(self, pd: str, reason: str) -> None:
        self.engine.reap(pd, reason)
        log.info("host.pd_reaped", pd=pd, reason=reason)

    def spawn(self, pd: str, reason: str,
              grants: Callable[[Any], list[Any]] | None = None) -> None:
        self.engine.spawn(pd, reason, grants)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop the timers, the adapters and every PD: all asked at once, all waited for
        within ``timeout``."""
        self.timers.stop()
        for adapter in self._adapters.values():
            try:
                adapter.close()
            except Exception as exc:  # closing must reach every PD regardless
                log.warning("host.adapter_close_failed", error=repr(exc))
        with self._lock:
            refs, self._refs = self._refs, {}
            self._mailboxes = {}
        stopping = []
        for pd, ref in sorted(refs.items()):
            with contextlib.suppress(pykka.ActorDeadError):
                stopping.append((pd, ref.stop(block=False)))
        deadline = self._monotonic() + timeout
        for pd, done in stopping:
            try:
                done.get(timeout=max(0.0, deadline - self._monotonic()))
            except pykka.Timeout:  # stuck in a handler; its daemon thread dies with us
                log.warning("host.pd_stop_timeout", pd=pd, timeout=timeout)

    # ----------------------------------------------------------------- queries
    def core_status(self, pd: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """The core's own status, asked in its queue (so it also waits for earlier messages).

        For the operator and tests only; never called from a PD's handler.
        """
        with self._lock:
            ref = self._refs.get(pd)
        if ref is None:
            return None
        try:
            result: dict[str, Any] | None = ref.ask(_CoreStatus(), block=True, timeout=timeout)
        except (pykka.ActorDeadError, pykka.Timeout):
            return None
        return result


def _no_adapter(pd: str, request: IoRequest) -> IoAnswer:
    return IoFailure(request.request_id, f"{pd} has no adapter on this node")
