"""PD lifecycle rules both hosts share: status checks, the crash window, the events.

The node host (threads) and the simulator's host (virtual time) differ in how
they run cores, not in when a PD may restart, fail, be reaped or spawned.
"""

from __future__ import annotations

from collections import deque

from ledger.catalog import PdFailed, PdRestarted
from ledger.state import State

MAX_REASON = 300  # characters of an exception message kept in a lifecycle event


class HostError(Exception):
    """A lifecycle request the host cannot honour (unknown PD, wrong status)."""


def require_status(state: State, pd: str, status: str, what: str) -> None:
    actual = state.pd_status.get(pd)
    if actual != status:
        raise HostError(f"cannot {what} {pd}: its status is {actual or 'unknown'}, "
                        f"not {status}")


def require_spawnable(state: State, pd: str) -> None:
    status = state.pd_status.get(pd)
    if status not in ("reaped", "failed"):
        raise HostError(f"cannot spawn {pd}: its status is {status or 'unknown'}, "
                        "not reaped or failed")


class CrashWindow:
    """More than ``limit`` crashes of one PD within ``window`` seconds: it has failed."""

    def __init__(self, limit: int = 3, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._times: dict[str, deque[float]] = {}

    def forget(self, pd: str) -> None:
        self._times.pop(pd, None)

    def crash(self, pd: str, exc: Exception, now: float) -> PdRestarted | PdFailed:
        """The event that journals this crash: a restart, or the PD's failure."""
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON]
        times = self._times.setdefault(pd, deque())
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        return PdFailed(pd, reason) if len(times) > self.limit else PdRestarted(pd, reason)
