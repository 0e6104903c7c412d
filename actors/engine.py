"""The one action interpreter: what a core's returned actions mean, for both hosts.

Each PD runs in a :class:`Cell` (its core and the core's generation).  The host
-- threads and the wall clock (``actors.host``), or one queue and a virtual clock
(``sims.host``) -- supplies a :class:`Mechanism`: how to tell the time, set a
timer, hand an I/O request to the PD's adapter, start and stop a PD.  Everything
else is decided here, once:

* journal first: every :class:`Append` of a step goes to the kernel as one batch,
  under the PD's journalling authority; if it is refused, nothing else of the step
  is done (the acts presuppose the events);
* then sends, calls, replies, timers and I/O requests, in order; a refused one is
  counted by the kernel and told to the core (:meth:`Core.refused`, once: what the
  core does about a refusal is not fed back again);
* an I/O request must be one its PD declares, with a request id not in flight; an
  answer is taken once, and only by the core that asked (a restart drops the rest);
* a core that raises, or returns anything but a list of actions, has crashed: the
  lifecycle policy (``actors.lifecycle``) journals it and restarts or fails the PD.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from actors.kernel import Delivery, Kernel
from actors.lifecycle import HostError, Lifecycle, start_order
from actors.pds.base import (
    Action,
    Append,
    Call,
    Core,
    HeldChanged,
    IoAnswer,
    IoFailure,
    IoInput,
    IoRequest,
    IoResult,
    MembersChanged,
    NodeChanged,
    Reap,
    Refused,
    Reply,
    Send,
    SetTimer,
    Spawn,
)
from actors.system import load_default
from ledger.caps import CapRefused

log = structlog.get_logger("engine")

CoreFactory = Callable[[str], Core]
Step = Callable[[Core, float], list[Action]]


class Mechanism(Protocol):
    """What a host supplies; the engine decides everything else."""

    def now(self) -> float:
        """A core's time: seconds since the Unix epoch (wall clock, or virtual)."""

    def elapsed(self) -> float:
        """A steady clock for the crash window (monotonic, or virtual seconds)."""

    def set_timer(self, pd: str, name: str, delay: float, generation: int) -> None:
        """Call :meth:`Engine.tick` for ``pd`` after ``delay`` seconds."""

    def submit_io(self, pd: str, generation: int, request: IoRequest) -> None:
        """Hand ``request`` to ``pd``'s adapter; its answer reaches :meth:`Engine.answer`.
        An adapter that raises is answered for, with an IoFailure: never the core's crash."""

    def start(self, pd: str) -> None:
        """Run ``pd`` (its cell is booted in its own context)."""

    def stop(self, pd: str) -> None:
        """Stop running ``pd`` (failed or reaped); may be called from its own handler."""

    def refused(self, pd: str, action: Action, exc: CapRefused) -> None:
        """One of ``pd``'s actions was refused (the kernel counted it): log or record it."""


@dataclass
class Cell:
    """One PD as the engine runs it: the core, its generation, its requests in flight."""

    pd: str
    core: Core | None = None
    generation: int = 0
    inflight: dict[int, type[IoRequest]] = field(default_factory=dict)
    stopped: bool = False
    """Set when the host stops running this cell (failed, reaped): a handler of it still
    running then (a reap from another thread) can neither crash nor boot it again."""


_ACTIONS = (Append, Send, Call, Reply, SetTimer, Spawn, Reap, IoRequest)
MAX_INFLIGHT = 1024
"""I/O requests one core may have waiting for their answers; one more is refused."""
MAX_TIMER = 366 * 86_400.0
"""The longest delay a timer may ask for (a year): longer, or not a finite number, is refused."""
CRASHES = (Exception, SystemExit, GeneratorExit)
"""What a core may raise that is its crash.  Any other BaseException is too (a core must
never take the host down), except KeyboardInterrupt, which is the operator's."""


def _is_crash(exc: BaseException) -> bool:
    return not isinstance(exc, KeyboardInterrupt)


class Engine:
    """Runs cores: the one interpreter of their actions and the one lifecycle policy."""

    def __init__(self, kernel: Kernel, mechanism: Mechanism, make_core: CoreFactory, *,
                 restart_limit: int = 3, restart_window: float = 60.0) -> None:
        self.kernel, self.mech, self.make_core = kernel, mechanism, make_core
        self.lifecycle = Lifecycle(kernel, restart_limit, restart_window)
        self.handled = 0  # inputs a core saw
        self.dropped: Counter[str] = Counter()  # inputs no core may see, by reason

    # ----------------------------------------------------------------- lifecycle
    def start_all(self) -> None:
        """Start every PD the ledger says is running, highest priority first."""
        for pd in start_order(self.kernel.state):
            self.lifecycle.started(pd)
            self.mech.start(pd)

    def reap(self, pd: str, reason: str) -> None:
        """End a PD's work: its caps go (in the fold), the host stops running it.

        Messages still queued for it are dropped by ``kernel.accept``: it is reaped.
        """
        self.lifecycle.reap(pd, reason)
        self.kernel.core_replaced(pd)
        self.mech.stop(pd)

    def spawn(self, pd: str, reason: str,
              grants: Callable[[Any], list[Any]] | None = None) -> None:
        """Run a reaped (or failed) PD again, with a fresh core (and ``grants``: the
        capabilities it is given, journalled with the spawn)."""
        self.lifecycle.spawn(pd, reason, grants)
        self.mech.start(pd)

    def boot(self, cell: Cell) -> bool:
        """A fresh core started from the ledger (at start, after a crash, at a spawn).

        A crash while starting counts as a crash.  False once the PD has failed.
        """
        while True:
            if cell.stopped:
                return False
            cell.generation += 1  # timers and I/O answers for the old core are now stale
            cell.core = None
            cell.inflight.clear()
            self.kernel.core_replaced(cell.pd)  # and so are calls to and from it
            try:
                core = self.make_core(cell.pd)
                actions = core.start(self.kernel.view(cell.pd), self.mech.now())
                cell.core = core
                self._carry_out(cell, actions, feedback=True)
                return True
            except BaseException as exc:
                if not _is_crash(exc):
                    raise
                if not self._crashed(cell, exc):
                    return False

    def inject_crash(self, cell: Cell, reason: str) -> None:
        """A fault the harness injects (the simulator's supervision scenarios): as if the
        core had raised.  No message can do this: production cores never crash on request."""
        if cell.core is not None and self._crashed(cell, RuntimeError(reason)):
            self.boot(cell)

    def _crashed(self, cell: Cell, exc: BaseException) -> bool:
        if cell.stopped:  # reaped (or failed) while this handler ran: not the new one's crash
            log.info("pd.crash_after_stop", pd=cell.pd, reason=f"{type(exc).__name__}: {exc}"[:300])
            return False
        cell.core = None
        cell.generation += 1
        restart = self.lifecycle.crashed(cell.pd, exc, self.mech.elapsed())
        log.error("pd.restarted" if restart else "pd.failed", pd=cell.pd,
                  reason=f"{type(exc).__name__}: {exc}"[:300], exc_info=exc)
        if not restart:
            self.kernel.core_replaced(cell.pd)
            self.mech.stop(cell.pd)
        return restart

    # ----------------------------------------------------------------- inputs
    def deliver(self, cell: Cell, d: Delivery) -> None:
        """A delivery from the kernel's route, checked once more at the receiver."""
        try:
            m = self.kernel.accept(d)
        except Exception as exc:  # a transfer's grant could not be journalled
            if self._crashed(cell, exc):
                self.boot(cell)
            return
        if m is None:
            return
        core = cell.core  # _run, inlined: this is every message's path
        if core is None:
            self.dropped["no core"] += 1
            return
        self.handled += 1
        try:
            actions = core.handle(m, self.mech.now())
            if type(actions) is not list or actions:
                self._carry_out(cell, actions, feedback=True)
        except BaseException as exc:
            if not _is_crash(exc):
                raise
            if self._crashed(cell, exc):
                self.boot(cell)

    def tick(self, cell: Cell, name: str, generation: int) -> None:
        if generation != cell.generation:
            self.dropped["stale timer"] += 1
            return
        self._run(cell, lambda core, now: core.timer(name, now))

    def answer(self, cell: Cell, generation: int, ans: IoAnswer) -> None:
        """An adapter's answer: taken once, by the core that made the request."""
        if type(ans) not in (IoResult, IoFailure):
            self.dropped["not an answer"] += 1
            return
        if generation != cell.generation:
            self.dropped["answer for an earlier core"] += 1
            return
        if cell.inflight.pop(ans.request_id, None) is None:
            self.dropped["answer to no request in flight"] += 1
            return
        self._run(cell, lambda core, now: core.io(ans, now))

    def unsolicited(self, cell: Cell, generation: int, event: IoInput) -> None:
        """What the world said unasked; dropped if the core changed since it was said."""
        if not isinstance(event, IoInput) or generation != cell.generation:
            self.dropped["stale or malformed input"] += 1
            return
        if type(event) is NodeChanged:
            self._run(cell, lambda core, now: core.node_changed(dict(event.node), now))
            return
        if type(event) is HeldChanged:
            # What it holds when it is told, not when the news was sent: two changes'
            # news may cross (a reap's and the next spawn's), the ledger's word may not.
            self._run(cell, lambda core, now: core.held_changed(
                self.kernel.held(cell.pd), now))
            return
        if type(event) is MembersChanged:
            self._run(cell, lambda core, now: core.members_changed(
                dict(event.members), now, dict(event.removed)))
            return
        self._run(cell, lambda core, now: core.input(event, now))

    def status(self, cell: Cell) -> dict[str, Any] | None:
        return None if cell.core is None else cell.core.status()

    # ----------------------------------------------------------------- actions
    def _run(self, cell: Cell, step: Step) -> None:
        core = cell.core
        if core is None:  # failed, reaped, or never started
            self.dropped["no core"] += 1
            return
        self.handled += 1
        try:
            self._carry_out(cell, step(core, self.mech.now()), feedback=True)
        except BaseException as exc:  # the PD's bug: restart it, the host runs on
            if not _is_crash(exc):
                raise
            if self._crashed(cell, exc):
                self.boot(cell)

    def _carry_out(self, cell: Cell, actions: object, *, feedback: bool) -> None:
        pd = cell.pd
        if type(actions) is not list:
            raise TypeError(f"{pd}: core returned a {type(actions).__name__}, not a list "
                            "of actions")
        events = []
        for a in actions:
            if not isinstance(a, _ACTIONS):
                raise TypeError(f"{pd}: core returned a {type(a).__name__}, not an action")
            if type(a) is Append:
                events.append(a.event)
        if events:  # journal, then act; a refused journal stops the whole step
            try:
                self.kernel.journal_as(pd, events)
            except CapRefused as exc:
                self._refused(cell, next(a for a in actions if type(a) is Append), exc,
                              feedback)
                return
        reap = None
        for a in actions:
            if type(a) is Append:
                continue
            if type(a) is Reap:
                reap = a
                continue
            try:
                self._act(cell, a)
            except CapRefused as exc:
                self._refused(cell, a, exc, feedback)
        if reap is not None:  # last: what the step sent went first, under its caps
            reason = reap.reason if type(reap.reason) is str else "its work is over"
            try:
                self.reap(pd, " ".join(reason.split())[:300] or "its work is over")
            except HostError as exc:
                log.warning("pd.reap_refused", pd=pd, reason=str(exc))

    def _act(self, cell: Cell, a: Action) -> None:
        pd, kernel = cell.pd, self.kernel
        if type(a) is Send:
            kernel.send(pd, a.token, a.payload, transfer=a.transfer)
        elif type(a) is Call:
            kernel.call(pd, a.token, a.payload, tag=a.tag)
        elif type(a) is Reply:
            kernel.reply(pd, a.reply, a.payload)
        elif type(a) is Spawn:
            target = kernel.spawn_target(pd, a.token)
            if kernel.state.pd_status.get(target) == "running":
                # Spawned a moment ago: what this PD holds now (the channel to it) is told
                # to it afresh, instead of a refusal it would have to wait out.
                kernel.tell_held(pd)
                return
            reason = " ".join(str(a.reason).split())[:300] or f"spawned by {pd}"
            try:
                self.spawn(target, reason,
                           grants=lambda state: load_default().spawn_grants(state, target))
            except HostError as exc:
                raise kernel._refuse(CapRefused("bad-transition", pd, None, str(exc))
                                     ) from None
        elif type(a) is SetTimer:
            if (type(a.name) is not str or type(a.delay) not in (int, float)
                    or not math.isfinite(a.delay) or not 0 <= a.delay <= MAX_TIMER):
                raise kernel._refuse(CapRefused(
                    "bad-request", pd, None,
                    f"a timer needs a str name and a delay of 0 to {MAX_TIMER:g} s"))
            self.mech.set_timer(pd, a.name, float(a.delay), cell.generation)
        elif isinstance(a, IoRequest):
            core = cell.core
            if core is None or type(a) not in core.requests:
                raise self.kernel._refuse(CapRefused(
                    "undeclared-io", pd, None, f"{type(a).__name__} is not an I/O request "
                    f"{pd} declares"))
            if type(a.request_id) is not int or a.request_id in cell.inflight:
                raise self.kernel._refuse(CapRefused(
                    "bad-request", pd, None, "an I/O request needs an int request id not "
                    "already in flight"))
            if len(cell.inflight) >= MAX_INFLIGHT:
                raise self.kernel._refuse(CapRefused(
                    "too-many-requests", pd, None,
                    f"{MAX_INFLIGHT} I/O requests are waiting for their answers already"))
            cell.inflight[a.request_id] = type(a)
            self.mech.submit_io(pd, cell.generation, a)
        else:  # Send, Call, Reply, SetTimer subclasses: a core may not make its own kinds
            raise TypeError(f"{pd}: core returned a {type(a).__name__}, not an action")

    def _refused(self, cell: Cell, a: Action, exc: CapRefused, feedback: bool) -> None:
        self.mech.refused(cell.pd, a, exc)
        core = cell.core
        if feedback and core is not None:
            told = Refused(a, exc.code, exc.cap_id, str(exc))
            self._carry_out(cell, core.refused(told, self.mech.now()), feedback=False)
