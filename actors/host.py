"""The node host: each protection domain a pykka actor around its sans-I/O core.

An actor is a thin shell.  Its inbox receives :class:`~actors.kernel.Delivery` s
(from the kernel's one ``route``), timer ticks and the host's own queries; for a
delivery it asks ``kernel.accept`` first (a cap revoked while the message sat in
the queue stops it here), hands it to the core with the wall-clock time, and
carries out the returned actions: events are journalled first, then messages,
replies and timers.

The host keeps its own name -> actor map; nothing is looked up in pykka's
global registry (that would be ambient authority).  Supervision is per PD: a
handler that raises is journalled as ``PdRestarted`` and the PD gets a fresh core
started from the ledger; more than ``restart_limit`` crashes within
``restart_window`` seconds are journalled as ``PdFailed`` and the PD is stopped,
while the node runs on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
import structlog

from actors.core import Action, Append, Call, Core, IoRequest, Reply, Send, SetTimer, make_core
from actors.kernel import Delivery, Kernel
from actors.lifecycle import CrashWindow, HostError, require_spawnable, require_status
from ledger import caps
from ledger.caps import CapRefused
from ledger.catalog import PdFailed, PdReaped, PdSpawned
from ledger.log import Ledger

log = structlog.get_logger("host")

CoreFactory = Callable[[str], Core]

@dataclass(frozen=True, slots=True)
class _Tick:
    """A timer the core asked for; stale once the core that set it was replaced."""

    name: str
    generation: int


class _CoreStatus:
    """Query: the core's own status (answered in the actor's thread, in queue order)."""


class _Drain:
    """Tells an actor its mailbox has deliveries; one is in flight per burst, not per message."""


_DRAIN = _Drain()


class _Mailbox:
    """A PD's queue of deliveries, beside pykka's inbox.

    The kernel's messages go here; the actor is told once per burst and takes the
    whole burst at a time, so a message costs a deque append, not a pykka envelope
    and a queue hand-off.  Order is kept, and every delivery is still checked by
    ``kernel.accept`` when the actor takes it, so revocation stays immediate.
    """

    __slots__ = ("lock", "queue", "ref", "scheduled")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref
        self.queue: deque[Delivery] = deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, d: Delivery) -> None:
        with self.lock:
            self.queue.append(d)
            if self.scheduled:
                return
            self.scheduled = True
        self.ref.tell(_DRAIN)

    def take(self) -> deque[Delivery]:
        """Everything queued; the actor is told again if more arrives after."""
        with self.lock:
            batch, self.queue = self.queue, deque()
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
                    wait = self._heap[0][0] - self._now() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception as exc:  # a timer must never kill the timer thread
                log.warning("timer.callback_failed", error=repr(exc))


class PdActor(pykka.ThreadingActor):
    """One protection domain: an inbox, a core, and the PD's port on the kernel."""

    use_daemon_thread = True  # a PD stuck in a handler must not keep the process alive

    def __init__(self, host: Host, pd: str) -> None:
        super().__init__()
        self.pd = pd
        self._host = host
        self._port = host.kernel.port(pd)
        self._core: Core | None = None
        self._generation = 0

    # ----------------------------------------------------------------- pykka hooks
    def on_start(self) -> None:
        try:
            self._fresh_core()
        except Exception as exc:
            self._crashed(exc)

    def on_receive(self, message: Any) -> Any:
        if message is _DRAIN:
            self._drain()
        elif type(message) is Delivery:
            self._deliver(message)
        elif isinstance(message, _Tick):
            if message.generation == self._generation and self._core is not None:
                name = message.name
                self._step(lambda core, now: core.timer(name, now))
        elif isinstance(message, _CoreStatus):
            # Deliveries posted before the query are answered for first: a status
            # query is a barrier, as it would be in a single FIFO inbox.
            self._drain()
            return None if self._core is None else self._core.status()
        else:
            log.warning("pd.unknown_message", pd=self.pd, kind=type(message).__name__)
        return None

    # ----------------------------------------------------------------- handling
    def _drain(self) -> None:
        mailbox = self._host.mailbox(self.pd)
        if mailbox is None:
            return
        for d in mailbox.take():
            self._deliver(d)
        if mailbox.settle():  # more came in: go round pykka's inbox again, so timers and
            self.actor_ref.tell(_DRAIN)  # status queries are not starved by a flood

    def _deliver(self, message: Delivery) -> None:
        try:
            d = self._host.kernel.accept(message)
        except Exception as exc:  # journalling a transferred cap failed
            self._crashed(exc)
            return
        if d is None:  # counted by the kernel; a flood must not become a flood of lines
            log.debug("pd.delivery_dropped", pd=self.pd, cap=message.cap_id)
            return
        core = self._core
        if core is None:
            return
        try:
            actions = core.handle(d, self._host.clock())
            if actions:
                self._carry_out(actions)
        except Exception as exc:
            self._crashed(exc)

    def _step(self, run: Callable[[Core, float], list[Action]]) -> None:
        core = self._core
        if core is None:
            return
        try:
            self._carry_out(run(core, self._host.clock()))
        except Exception as exc:
            self._crashed(exc)

    def _carry_out(self, actions: list[Action]) -> None:
        events = [a.event for a in actions if isinstance(a, Append)]
        if events:  # journal, then act
            self._host.ledger.append_many(events)
        for action in actions:
            if isinstance(action, Append):
                continue
            try:
                self._act(action)
            except CapRefused as exc:  # the kernel counted it; the PD lives on
                log.info("pd.action_refused", pd=self.pd, action=type(action).__name__,
                         code=exc.code, reason=str(exc))

    def _act(self, action: Action) -> None:
        if isinstance(action, Send):
            self._port.send(action.token, action.payload, action.transfer)
        elif isinstance(action, Call):
            self._port.call(action.token, action.payload)
        elif isinstance(action, Reply):
            self._port.reply(action.reply, action.payload)
        elif isinstance(action, SetTimer):
            self._host.set_timer(self.pd, action.name, action.delay, self._generation)
        elif isinstance(action, IoRequest):
            self._host.io_request(self.pd, action)
        else:
            raise TypeError(f"{self.pd}: core returned {action!r}, not an action")

    # ----------------------------------------------------------------- supervision
    def _fresh_core(self) -> None:
        """A new core started from the ledger's state, as after a crash or a spawn."""
        self._generation += 1  # timers the old core set are now stale
        self._core = None
        core = self._host.make_core(self.pd)
        state = self._host.ledger.state_copy()
        actions = core.start(caps.tokens_of(state, self.pd), state, self._host.clock())
        self._core = core
        self._carry_out(actions)

    def _crashed(self, exc: Exception) -> None:
        while True:
            if not self._host.supervise(self.pd, exc):
                self._core = None
                self.stop()
                return
            try:
                self._fresh_core()
                return
            except Exception as again:  # the restart itself crashed: that counts too
                exc = again


class Host:
    """Runs every PD as an actor; the kernel's only route to them."""

    def __init__(self, ledger: Ledger, kernel: Kernel, *, make_core: CoreFactory = make_core,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 restart_limit: int = 3, restart_window: float = 60.0) -> None:
        self.ledger, self.kernel, self.make_core, self.clock = ledger, kernel, make_core, clock
        self._monotonic = monotonic
        self._refs: dict[str, pykka.ActorRef[PdActor]] = {}
        self._mailboxes: dict[str, _Mailbox] = {}
        self._crashes = CrashWindow(restart_limit, restart_window)
        self._lock = threading.Lock()  # guards _refs and _crashes
        self.timers = Timers(monotonic)
        kernel.set_route(self.route)

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

    def set_timer(self, pd: str, name: str, delay: float, generation: int) -> None:
        self.timers.schedule(delay, lambda: self._tell(pd, _Tick(name, generation)))

    def io_request(self, pd: str, request: IoRequest) -> None:
        """PD adapters arrive with later issues; until then a request is only logged."""
        log.warning("host.io_unhandled", pd=pd, kind=request.kind)

    # ----------------------------------------------------------------- lifecycle
    def running(self) -> list[str]:
        with self._lock:
            return sorted(pd for pd, ref in self._refs.items() if ref.is_alive())

    def start_all(self) -> None:
        """Start every PD the ledger says is running, highest priority first."""
        state = self.ledger.state
        for pd in sorted(state.pds, key=lambda p: (-state.pds[p], p)):
            if state.pd_status.get(pd) == "running":
                self._start(pd)
            else:
                log.info("host.pd_not_started", pd=pd, status=state.pd_status.get(pd))

    def _start(self, pd: str) -> None:
        with self._lock:
            self._crashes.forget(pd)
            if pd in self._refs and self._refs[pd].is_alive():
                raise HostError(f"{pd} is already running")
        ref = PdActor.start(self, pd)
        with self._lock:
            self._refs[pd] = ref
            self._mailboxes[pd] = _Mailbox(ref)
        log.info("host.pd_started", pd=pd)

    def _stop_actor(self, pd: str) -> None:
        """Ask ``pd``'s actor to stop, without waiting (the caller may be a PD's handler)."""
        with self._lock:
            ref = self._refs.pop(pd, None)
            self._mailboxes.pop(pd, None)
        if ref is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop(block=False)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop the timers and every PD: all asked at once, all waited for within ``timeout``."""
        self.timers.stop()
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

    def reap(self, pd: str, reason: str) -> None:
        """End a PD's work (pd-genesis after a ceremony): its caps go, its actor stops.

        Does not wait for the actor (a PD may ask for this from its handler); messages
        still queued for it are dropped by ``kernel.accept``, as its status is reaped.
        """
        require_status(self.ledger.state, pd, "running", "reap")
        self.kernel.journal(PdReaped(pd, reason))
        self._stop_actor(pd)
        log.info("host.pd_reaped", pd=pd, reason=reason)

    def spawn(self, pd: str, reason: str) -> None:
        """Run a reaped (or failed) PD again, with a fresh core."""
        require_spawnable(self.ledger.state, pd)
        self.kernel.journal(PdSpawned(pd, reason))
        self._start(pd)

    def supervise(self, pd: str, exc: Exception) -> bool:
        """Journal a crash of ``pd``'s handler; True if the PD may restart, False if failed."""
        with self._lock:
            event = self._crashes.crash(pd, exc, self._monotonic())
            failed = isinstance(event, PdFailed)
            if failed:
                self._refs.pop(pd, None)
                self._mailboxes.pop(pd, None)
        reason = event.reason
        try:
            self.kernel.journal(event)
        except Exception as journal_exc:  # the ledger is broken: stop the PD, unjournalled
            log.critical("host.supervision_unjournalled", pd=pd, reason=reason,
                         error=repr(journal_exc))
            with self._lock:
                self._refs.pop(pd, None)
                self._mailboxes.pop(pd, None)
            return False
        log.error("host.pd_failed" if failed else "host.pd_restarted", pd=pd, reason=reason,
                  exc_info=exc)
        return not failed

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
