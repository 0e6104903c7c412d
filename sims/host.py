"""The deterministic host: the PD cores on one thread, in virtual time, with seeded latency.

The node runtime runs each core in its own actor on the wall clock; this host runs
the same cores from a single priority queue of ``(time, sequence, target, item)``.
Nothing here reads the wall clock, the environment or an unseeded random source,
so a seed fixes a run: the same events in the same order with the same timestamps,
hence the same ledger bytes and the same Merkle root.

The kernel's route pushes each delivery onto the queue after a seeded latency;
:meth:`Host.step` pops the earliest item, moves the clock to its time, lets the
kernel check it once more at the receiver (``kernel.accept``) and hands it to the
core.  The actions the core returns are carried out journal first: its events are
appended, then its sends, calls, replies and timers are done in order.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actors.core import Action, Append, Call, Core, IoRequest, Reply, Send, SetTimer, make_core
from actors.kernel import Delivery, Kernel
from ledger import caps
from ledger.caps import CapRefused
from ledger.catalog import PdFailed, PdRestarted
from ledger.log import Ledger

EPOCH_NS = 1_704_067_200 * 10**9
"""Virtual time zero (2024-01-01T00:00:00Z): ledger timestamps start here."""

NS = 1_000_000_000


class SimulationError(RuntimeError):
    """The simulation cannot go on as asked (e.g. it never goes idle); a harness bug, not a PD's."""


class VirtualClock:
    """Nanoseconds since :data:`EPOCH_NS`; moves only when the host moves it."""

    __slots__ = ("elapsed_ns",)

    def __init__(self) -> None:
        self.elapsed_ns = 0

    def ledger_ns(self) -> int:
        """What the ledger stamps records with (pass this method as its ``clock``)."""
        return EPOCH_NS + self.elapsed_ns

    def time(self) -> float:
        """Seconds since the Unix epoch, as a core's ``now`` (the node passes wall time)."""
        return (EPOCH_NS + self.elapsed_ns) / NS

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the simulation started."""
        return self.elapsed_ns / NS


@dataclass(frozen=True, slots=True)
class Timer:
    """A timer a core set; ``generation`` ties it to one incarnation of the core."""

    name: str
    generation: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A core's action that the kernel refused: the core's error, kept for tests to read."""

    time_ns: int
    pd: str
    action: Action
    error: CapRefused


Item = Delivery | Timer
CoreFactory = Callable[[str], Core]


class Host:
    """Runs every PD's core from one queue in virtual time.

    Supervision is simple: a core whose handler raises is restarted from the ledger
    (``PdRestarted`` journaled, a fresh core started with the PD's tokens); after
    ``max_restarts`` restarts the PD is stopped (``PdFailed``) and the kernel drops
    what is sent to it.
    """

    def __init__(self, kernel: Kernel, ledger: Ledger, clock: VirtualClock,
                 rng: random.Random, *,
                 core_factory: CoreFactory = make_core,
                 latency_ns: tuple[int, int] = (50_000, 2_000_000),
                 max_restarts: int = 3) -> None:
        self.kernel = kernel
        self.ledger = ledger
        self.clock = clock
        self.rng = rng
        self.latency_ns = latency_ns
        self.max_restarts = max_restarts
        self._factory = core_factory
        self._queue: list[tuple[int, int, str, Item]] = []
        self._seq = itertools.count()
        self._last_arrival: dict[str, int] = {}
        self._generation: Counter[str] = Counter()
        self.cores: dict[str, Core] = {}
        self.restarts: Counter[str] = Counter()
        self.handled = 0  # items a core saw (deliveries and timers)
        self.refusals: list[Refusal] = []
        self.io_requests: list[tuple[str, IoRequest]] = []
        kernel.set_route(self.route)

    # ----------------------------------------------------------------- set-up
    def start(self, pds: Sequence[str] | None = None) -> None:
        """Start a core for each running PD (all of them by default), in ledger order."""
        state = self.kernel.state
        names = list(state.pds) if pds is None else list(pds)
        for pd in names:
            if state.pd_status.get(pd) == "running":
                self._start(pd)

    def _start(self, pd: str) -> None:
        core = self._factory(pd)
        self.cores[pd] = core
        self._generation[pd] += 1
        state = self.kernel.state
        self._carry_out(pd, core.start(caps.tokens_of(state, pd), state, self.clock.time()))

    # ----------------------------------------------------------------- queue
    def route(self, target: str, d: Delivery) -> None:
        """The kernel's route: deliver ``d`` after a seeded latency, in order per receiver."""
        lo, hi = self.latency_ns
        at = self.clock.elapsed_ns + self.rng.randint(lo, hi)
        at = max(at, self._last_arrival.get(target, 0))  # a mailbox is FIFO
        self._last_arrival[target] = at
        self._push(at, target, d)

    def _push(self, at_ns: int, target: str, item: Item) -> None:
        heapq.heappush(self._queue, (at_ns, next(self._seq), target, item))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def next_time(self) -> float | None:
        """Virtual seconds of the earliest queued item, or None when idle."""
        return self._queue[0][0] / NS if self._queue else None

    # ----------------------------------------------------------------- running
    def step(self) -> bool:
        """Handle the earliest queued item; False when there was none."""
        if not self._queue:
            return False
        at, _, target, item = heapq.heappop(self._queue)
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, at)
        if isinstance(item, Timer):
            if item.generation == self._generation[target] and target in self.cores:
                self._run(target, lambda core: core.timer(item.name, self.clock.time()))
            return True
        delivered = self.kernel.accept(item)
        if delivered is not None and target in self.cores:
            self._run(target, lambda core: core.handle(delivered, self.clock.time()))
        return True

    def run_until(self, t: float) -> int:
        """Handle everything due up to virtual second ``t``, then set the clock to ``t``."""
        limit = round(t * NS)
        n = 0
        while self._queue and self._queue[0][0] <= limit:
            self.step()
            n += 1
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, limit)
        return n

    def run_for(self, seconds: float) -> int:
        return self.run_until(self.clock.elapsed + seconds)

    def run_until_idle(self, max_items: int = 1_000_000) -> int:
        """Handle items until the queue is empty; refuses to spin past ``max_items``."""
        n = 0
        while self.step():
            n += 1
            if n >= max_items:
                raise SimulationError(f"still busy after {n} items at t={self.clock.elapsed}s: "
                                      "a timer or message loop never settles")
        return n

    # ----------------------------------------------------------------- cores
    def _run(self, pd: str, handler: Callable[[Core], list[Action]]) -> None:
        self.handled += 1
        try:
            actions = handler(self.cores[pd])
        except Exception as exc:  # a PD's bug: restart it, never stop the host
            self._supervise(pd, exc)
            return
        self._carry_out(pd, actions)

    def _supervise(self, pd: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.restarts[pd] += 1
        self.cores.pop(pd, None)
        self._generation[pd] += 1  # its pending timers die with it
        if self.restarts[pd] > self.max_restarts:
            self.ledger.append(PdFailed(pd, f"gave up after {self.max_restarts} restarts; "
                                             f"last: {reason}"))
            return
        self.ledger.append(PdRestarted(pd, reason))
        self._start(pd)

    def _carry_out(self, pd: str, actions: list[Action]) -> None:
        """Journal first: the core's events are durable before anything else happens."""
        events = [a.event for a in actions if isinstance(a, Append)]
        if events:
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
            except CapRefused as exc:  # the kernel counted it; the core's error to see
                self.refusals.append(Refusal(self.clock.ledger_ns(), pd, a, exc))
