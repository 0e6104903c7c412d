"""The deterministic host: the PD cores on one thread, in virtual time, with seeded latency.

The node host (``actors.host``) runs each core in its own actor on the wall clock;
this host runs the same cores from a single priority queue of ``(time, sequence,
target, item)``.  Nothing here reads the wall clock, the environment or an
unseeded random source, so a seed fixes a run: the same events in the same order
with the same timestamps, hence the same ledger bytes and the same Merkle root.

The kernel's route pushes each delivery onto the queue after a seeded latency;
:meth:`Host.step` pops the earliest item, moves the clock to its time, lets the
kernel check it once more at the receiver (``kernel.accept``) and hands it to the
core.  The actions the core returns are carried out as the node host does: its
events are journalled first, then its sends, calls, replies and timers, in order.
Supervision follows the node host's policy too, in virtual seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from actors.core import Action, Append, Call, Core, IoRequest, Reply, Send, SetTimer, make_core
from actors.kernel import Delivery, Kernel
from actors.lifecycle import CrashWindow, require_spawnable, require_status
from ledger import caps
from ledger.caps import CapRefused
from ledger.catalog import PdFailed, PdReaped, PdSpawned
from ledger.log import Ledger

EPOCH_NS = 1_704_067_200 * 10**9
"""Virtual time zero (2024-01-01T00:00:00Z): ledger timestamps start here."""

NS = 1_000_000_000


class SimulationError(RuntimeError):
    """The run cannot go on as asked (it never goes idle): a scenario's bug, not a PD's."""


class VirtualClock:
    """Nanoseconds since :data:`EPOCH_NS`; moves only when the host moves it."""

    __slots__ = ("elapsed_ns",)

    def __init__(self) -> None:
        self.elapsed_ns = 0

    def ledger_ns(self) -> int:
        """What the ledger stamps records with (pass this method as its ``clock``)."""
        return EPOCH_NS + self.elapsed_ns

    def time(self) -> float:
        """Seconds since the Unix epoch: a core's ``now`` (the node host passes wall time)."""
        return (EPOCH_NS + self.elapsed_ns) / NS

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the simulation started."""
        return self.elapsed_ns / NS


@dataclass(frozen=True, slots=True)
class Timer:
    """A timer a core set; stale once the core that set it was replaced."""

    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """An action of a core that the kernel refused (and counted); kept for tests to read."""

    time_ns: int
    pd: str
    action: Action
    error: CapRefused


Item = Delivery | Timer
CoreFactory = Callable[[str], Core]


class Host:
    """Runs every PD's core from one queue in virtual time; the kernel's only route."""

    def __init__(self, kernel: Kernel, ledger: Ledger, clock: VirtualClock,
                 rng: random.Random, *, make_core: CoreFactory = make_core,
                 latency_ns: tuple[int, int] = (50_000, 2_000_000),
                 restart_limit: int = 3, restart_window: float = 60.0) -> None:
        self.kernel, self.ledger, self.clock, self.rng = kernel, ledger, clock, rng
        self.make_core = make_core
        self.latency_ns = latency_ns
        self.cores: dict[str, Core] = {}
        self.handled = 0  # deliveries and timers a core saw
        self.refusals: list[Refusal] = []
        self.io_requests: list[tuple[str, IoRequest]] = []
        self._queue: list[tuple[int, int, str, Item]] = []
        self._seq = itertools.count()
        self._last_arrival: dict[str, int] = {}
        self._generation: Counter[str] = Counter()
        self._crashes = CrashWindow(restart_limit, restart_window)
        kernel.set_route(self.route)

    # ----------------------------------------------------------------- lifecycle
    def start_all(self) -> None:
        """Start every PD the ledger says is running, highest priority first."""
        state = self.kernel.state
        for pd in sorted(state.pds, key=lambda p: (-state.pds[p], p)):
            if state.pd_status.get(pd) == "running":
                self._start(pd)

    def _start(self, pd: str) -> None:
        self._crashes.forget(pd)
        self._fresh_core(pd)

    def _fresh_core(self, pd: str) -> None:
        """A new core started from the ledger's state; a crash in ``start`` counts too."""
        while True:
            self._generation[pd] += 1  # timers the old core set are now stale
            self.cores.pop(pd, None)
            try:
                core = self.make_core(pd)
                state = self.kernel.state
                actions = core.start(caps.tokens_of(state, pd), state, self.clock.time())
                self.cores[pd] = core
                self._carry_out(pd, actions)
                return
            except Exception as exc:
                if not self._supervise(pd, exc):
                    return

    def reap(self, pd: str, reason: str) -> None:
        """End a PD's work: its caps go (in the fold), its core stops, its queue is dropped."""
        require_status(self.kernel.state, pd, "running", "reap")
        self.kernel.journal(PdReaped(pd, reason))
        self.cores.pop(pd, None)
        self._generation[pd] += 1

    def spawn(self, pd: str, reason: str) -> None:
        """Run a reaped (or failed) PD again, with a fresh core."""
        require_spawnable(self.kernel.state, pd)
        self.kernel.journal(PdSpawned(pd, reason))
        self._start(pd)

    def _supervise(self, pd: str, exc: Exception) -> bool:
        """Journal a crash; True if the PD may restart, False once it has failed."""
        event = self._crashes.crash(pd, exc, self.clock.elapsed)
        self.cores.pop(pd, None)
        self._generation[pd] += 1
        self.kernel.journal(event)
        return not isinstance(event, PdFailed)

    # ----------------------------------------------------------------- queue
    def route(self, target: str, d: Delivery) -> None:
        """The kernel's route: deliver ``d`` after a seeded latency, in order per receiver."""
        lo, hi = self.latency_ns
        at = self.clock.elapsed_ns + self.rng.randint(lo, hi)
        at = max(at, self._last_arrival.get(target, 0))  # an inbox is FIFO
        self._last_arrival[target] = at
        self._push(at, target, d)

    def _push(self, at_ns: int, target: str, item: Item) -> None:
        heapq.heappush(self._queue, (at_ns, next(self._seq), target, item))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> bool:
        """Handle the earliest queued item; False when there was none."""
        if not self._queue:
            return False
        at, _, target, item = heapq.heappop(self._queue)
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, at)
        if isinstance(item, Timer):
            if item.generation == self._generation[target]:
                self._run(target, lambda core: core.timer(item.name, self.clock.time()))
            return True
        try:
            d = self.kernel.accept(item)
        except Exception as exc:  # journalling a transferred cap failed
            if self._supervise(target, exc):
                self._fresh_core(target)
            return True
        if d is not None:
            self._run(target, lambda core: core.handle(d, self.clock.time()))
        return True

    def run_until(self, t: float) -> int:
        """Handle everything due by virtual second ``t``, then set the clock to ``t``."""
        limit, n = round(t * NS), 0
        while self._queue and self._queue[0][0] <= limit:
            self.step()
            n += 1
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, limit)
        return n

    def run_for(self, seconds: float) -> int:
        return self.run_until(self.clock.elapsed + seconds)

    def run_until_idle(self, max_items: int = 1_000_000) -> int:
        """Handle items until none is left; refuses to spin past ``max_items``."""
        n = 0
        while self.step():
            n += 1
            if n >= max_items:
                raise SimulationError(f"still busy after {n} items at t={self.clock.elapsed}s: "
                                      "a timer or message loop never settles")
        return n

    # ----------------------------------------------------------------- cores
    def _run(self, pd: str, handler: Callable[[Core], list[Action]]) -> None:
        core = self.cores.get(pd)
        if core is None:  # failed, reaped, or never started
            return
        self.handled += 1
        try:
            self._carry_out(pd, handler(core))
        except Exception as exc:  # the PD's bug: restart it, the host runs on
            if self._supervise(pd, exc):
                self._fresh_core(pd)

    def _carry_out(self, pd: str, actions: list[Action]) -> None:
        events = [a.event for a in actions if isinstance(a, Append)]
        if events:  # journal, then act
            self.ledger.append_many(events)
        port = self.kernel.port(pd)
        for a in actions:
            try:
                if isinstance(a, Send):
                    port.send(a.token, a.payload, a.transfer)
                elif isinstance(a, Call):
                    port.call(a.token, a.payload)
                elif isinstance(a, Reply):
                    port.reply(a.reply, a.payload)
                elif isinstance(a, SetTimer):
                    at = self.clock.elapsed_ns + max(0, round(a.delay * NS))
                    self._push(at, pd, Timer(a.name, self._generation[pd]))
                elif isinstance(a, IoRequest):
                    self.io_requests.append((pd, a))  # no simulated backends yet
                elif not isinstance(a, Append):
                    raise TypeError(f"{pd}: core returned {a!r}, not an action")
            except CapRefused as exc:  # the kernel counted it; the PD lives on
                self.refusals.append(Refusal(self.clock.ledger_ns(), pd, a, exc))
