"""The PD lifecycle policy both hosts share: start order, supervision, reap and spawn.

A PD's status is a transition table (``ledger.state.PD_TRANSITIONS``); every change
of it is an event the kernel journals only if the table has it, so a request that
does not fit -- reap a failed PD, spawn a running one -- is a precise
:class:`HostError`, never a corrupt log.  Supervision: a handler that raises is
journalled as ``pd.restarted`` and the PD gets a fresh core; more than ``limit``
crashes within ``window`` seconds are journalled as ``pd.failed`` and it stops.
The hosts differ only in mechanism (threads and the wall clock, or one queue and
a virtual clock), never in these rules.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ledger.caps import CapRefused
from ledger.catalog import PdFailed, PdReaped, PdRestarted, PdSpawned
from ledger.state import State, pd_transition

if TYPE_CHECKING:
    from actors.kernel import Kernel

log = structlog.get_logger("lifecycle")

MAX_REASON = 300  # characters of an exception message kept in a lifecycle event


class HostError(Exception):
    """A lifecycle request the host cannot honour (unknown PD, wrong status)."""


def start_order(state: State) -> list[str]:
    """The PDs to start, highest priority first: those the ledger says are running."""
    return [pd for pd in sorted(state.pds, key=lambda p: (-state.pds[p], p))
            if state.pd_status.get(pd) == "running"]


class CrashWindow:
    """More than ``limit`` crashes of one PD within ``window`` seconds: it has failed."""

    def __init__(self, limit: int = 3, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._times: dict[str, deque[float]] = {}

    def forget(self, pd: str) -> None:
        self._times.pop(pd, None)

    def crash(self, pd: str, exc: BaseException, now: float) -> PdRestarted | PdFailed:
        """The event that journals this crash: a restart, or the PD's failure."""
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON]
        times = self._times.setdefault(pd, deque())
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        return PdFailed(pd, reason) if len(times) > self.limit else PdRestarted(pd, reason)


class Lifecycle:
    """The lifecycle's commands, journalled through the kernel; thread-safe."""

    def __init__(self, kernel: Kernel, restart_limit: int = 3,
                 restart_window: float = 60.0) -> None:
        self.kernel = kernel
        self._crashes = CrashWindow(restart_limit, restart_window)
        self._lock = threading.Lock()

    def started(self, pd: str) -> None:
        with self._lock:
            self._crashes.forget(pd)

    def crashed(self, pd: str, exc: BaseException, now: float) -> bool:
        """Journal a crash of ``pd``; True if it may restart, False if it has failed
        (or its crash could not be journalled: then it must stop, unjournalled)."""
        with self._lock:
            event = self._crashes.crash(pd, exc, now)
        try:
            self.kernel.lifecycle(event)
        except CapRefused:  # reaped or failed meanwhile: it stays stopped
            return False
        except Exception as journal_exc:  # the ledger is broken: stop it, unjournalled
            log.critical("lifecycle.crash_unjournalled", pd=pd, reason=event.reason,
                         error=repr(journal_exc))
            return False
        return not isinstance(event, PdFailed)

    def _change(self, event: PdReaped | PdSpawned, what: str,
                grants: Callable[[Any], list[Any]] | None = None) -> None:
        why = pd_transition(self.kernel.state, event.name, type(event))
        if why is not None:
            raise HostError(f"cannot {what} {event.name}: {why}")
        try:
            self.kernel.lifecycle(event, grants)
        except CapRefused as exc:  # it changed between the check and the journal
            raise HostError(f"cannot {what} {event.name}: {exc}") from None

    def reap(self, pd: str, reason: str) -> None:
        """End a PD's work (pd-genesis after a ceremony): its caps go, in the fold."""
        self._change(PdReaped(pd, reason), "reap")

    def spawn(self, pd: str, reason: str,
              grants: Callable[[Any], list[Any]] | None = None) -> None:
        """Run a reaped (or failed) PD again; ``grants(state)``: the capabilities it is
        given, journalled with its spawn as one batch."""
        self._change(PdSpawned(pd, reason), "spawn", grants)
        self.started(pd)
