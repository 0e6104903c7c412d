"""The deterministic host: PD cores on one thread, in virtual time, with seeded latency.

The node host (``actors.host``) runs each core in its own actor on the wall clock;
this host runs the same cores, through the same engine (``actors.engine``: one
interpreter of actions, one lifecycle policy), from a :class:`World`'s single
priority queue of ``(time, sequence, work)``.  A world may hold several nodes,
each with its own ledger, kernel and host, on one virtual clock and one seeded
queue (see ``sims.mesh``).  Nothing here reads the wall clock, the environment or
an unseeded random source, so a seed fixes a run: the same events in the same
order with the same timestamps, hence the same ledger bytes and Merkle roots.

The kernel's route puts each delivery on the queue after a seeded latency, in
order per receiver; when it is due, the engine checks it once more at the receiver
(``kernel.accept``) and hands it to the core.  Timers, I/O answers from the
simulated backends (``sims.backends``) and their unsolicited input go through the
same queue.  Supervision follows the same policy as on a node, in virtual seconds.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.engine import Cell, CoreFactory, Engine
from actors.io.base import Adapter, submit_guarded
from actors.kernel import Delivery, Kernel
from actors.lifecycle import HostError
from actors.pds import make_core
from actors.pds.base import (
    Action,
    Core,
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

EPOCH_NS = 1_704_067_200 * 10**9
"""Virtual time zero (2024-01-01T00:00:00Z): ledger timestamps start here."""

NS = 1_000_000_000

__all__ = ["EPOCH_NS", "NS", "Host", "HostError", "Refusal", "SimulationError",
           "VirtualClock", "World"]


class SimulationError(RuntimeError):
    """The run cannot go on as asked (it never goes idle): a scenario's bug, not a PD's."""


class VirtualClock:
    """Nanoseconds since :data:`EPOCH_NS`; moves only when the world moves it."""

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
class Refusal:
    """An action of a core that the kernel refused (and counted); kept for tests to read."""

    time_ns: int
    pd: str
    action: Action
    error: CapRefused


class World:
    """One virtual clock and one seeded queue of work for every node in a simulation."""

    def __init__(self, clock: VirtualClock | None = None,
                 rng: random.Random | None = None) -> None:
        self.clock = clock or VirtualClock()
        self.rng = rng or random.Random(0)
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, at_ns: int, work: Callable[[], None]) -> None:
        """Do ``work`` at virtual time ``at_ns`` (after what is queued for then already)."""
        heapq.heappush(self._queue, (max(at_ns, self.clock.elapsed_ns), next(self._seq),
                                     work))

    def after(self, delay_ns: int, work: Callable[[], None]) -> None:
        self.at(self.clock.elapsed_ns + max(0, delay_ns), work)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def step(self) -> bool:
        """Do the earliest queued work; False when there was none."""
        if not self._queue:
            return False
        at, _, work = heapq.heappop(self._queue)
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, at)
        work()
        return True

    def run_until(self, t: float) -> int:
        """Do everything due by virtual second ``t``, then set the clock to ``t``."""
        limit, n = round(t * NS), 0
        while self._queue and self._queue[0][0] <= limit:
            self.step()
            n += 1
        self.clock.elapsed_ns = max(self.clock.elapsed_ns, limit)
        return n

    def run_for(self, seconds: float) -> int:
        return self.run_until(self.clock.elapsed + seconds)

    def run_until_idle(self, max_items: int = 1_000_000) -> int:
        """Do work until none is left; refuses to spin past ``max_items``."""
        n = 0
        while self.step():
            n += 1
            if n >= max_items:
                raise SimulationError(f"still busy after {n} items at t={self.clock.elapsed}s: "
                                      "a timer or message loop never settles")
        return n


class Host:
    """Runs one node's PD cores in a :class:`World`; the node's kernel's only route."""

    def __init__(self, kernel: Kernel, ledger: Ledger, clock: VirtualClock | None = None,
                 rng: random.Random | None = None, *, world: World | None = None,
                 make_core: CoreFactory = make_core,
                 adapters: dict[str, Adapter] | None = None,
                 latency_ns: tuple[int, int] = (50_000, 2_000_000),
                 restart_limit: int = 3, restart_window: float = 60.0) -> None:
        self.world = world or World(clock, rng)
        self.kernel, self.ledger = kernel, ledger
        self.clock, self.rng = self.world.clock, self.world.rng if rng is None else rng
        self.latency_ns = latency_ns
        self.cells: dict[str, Cell] = {}
        self.refusals: list[Refusal] = []
        self.io_requests: list[tuple[str, IoRequest]] = []
        self._adapters = dict(adapters or {})
        self._last_arrival: dict[str, int] = {}
        self.engine = Engine(kernel, self, make_core, restart_limit=restart_limit,
                             restart_window=restart_window)
        for pd, adapter in self._adapters.items():
            adapter.attach(functools.partial(self._unsolicited, pd))
        kernel.set_route(self.route)
        kernel.watch_node(self._node_changed)
        kernel.watch_members(self._members_changed)
        kernel.watch_held(self._held_changed)

    # ----------------------------------------------------------------- views for tests
    @property
    def make_core(self) -> CoreFactory:
        return self.engine.make_core

    @make_core.setter
    def make_core(self, factory: CoreFactory) -> None:
        self.engine.make_core = factory

    @property
    def cores(self) -> dict[str, Core]:
        return {pd: c.core for pd, c in self.cells.items() if c.core is not None}

    @property
    def handled(self) -> int:
        return self.engine.handled

    # ----------------------------------------------------------------- the mechanism
    def now(self) -> float:
        return self.clock.time()

    def elapsed(self) -> float:
        return self.clock.elapsed

    def set_timer(self, pd: str, name: str, delay: float, generation: int) -> None:
        self.world.after(round(delay * NS), lambda: self._on_cell(
            pd, lambda cell: self.engine.tick(cell, name, generation)))

    def submit_io(self, pd: str, generation: int, request: IoRequest) -> None:
        self.io_requests.append((pd, request))
        adapter = self._adapters.get(pd)

        def answer(ans: IoAnswer) -> None:  # the next thing done, in queue order
            self.world.after(0, lambda: self._on_cell(
                pd, lambda cell: self.engine.answer(cell, generation, ans)))
        if adapter is None:
            answer(IoFailure(request.request_id, f"{pd} has no simulated backend"))
        else:
            submit_guarded(adapter, request, answer)

    def _node_changed(self, node: dict[str, Any]) -> None:
        for pd in list(self.cells):
            self._unsolicited(pd, NodeChanged(dict(node)))

    def _held_changed(self, pd: str) -> None:
        self._unsolicited(pd, HeldChanged())

    def _members_changed(self, members: dict[str, Any], removed: dict[str, Any]) -> None:
        for pd in list(self.cells):
            self._unsolicited(pd, MembersChanged(dict(members), dict(removed)))

    def _unsolicited(self, pd: str, event: IoInput) -> None:
        cell = self.cells.get(pd)
        if cell is None:  # stopped (failed, reaped) or never started: nobody to tell
            self.engine.dropped["no core"] += 1
            return
        generation = cell.generation
        self.world.after(0, lambda: self._on_cell(
            pd, lambda c: self.engine.unsolicited(c, generation, event)))

    def start(self, pd: str) -> None:
        cell = self.cells.get(pd)
        if cell is not None and cell.core is not None:
            raise HostError(f"{pd} is already running")
        cell = self.cells.setdefault(pd, Cell(pd))
        self.engine.boot(cell)

    def stop(self, pd: str) -> None:
        cell = self.cells.pop(pd, None)
        if cell is not None:
            cell.stopped = True
            cell.core = None
            cell.generation += 1

    def refused(self, pd: str, action: Action, exc: CapRefused) -> None:
        self.refusals.append(Refusal(self.clock.ledger_ns(), pd, action, exc))

    # ----------------------------------------------------------------- lifecycle
    def start_all(self) -> None:
        """Start every PD the ledger says is running, highest priority first."""
        self.engine.start_all()

    def reap(self, pd: str, reason: str) -> None:
        self.engine.reap(pd, reason)

    def spawn(self, pd: str, reason: str,
              grants: Callable[[Any], list[Any]] | None = None) -> None:
        self.engine.spawn(pd, reason, grants)

    def crash(self, pd: str, reason: str) -> None:
        """Inject a crash of ``pd``'s core (a fault, for supervision scenarios)."""
        cell = self.cells.get(pd)
        if cell is not None:
            self.engine.inject_crash(cell, reason)

    def core_status(self, pd: str) -> dict[str, Any] | None:
        cell = self.cells.get(pd)
        return None if cell is None else self.engine.status(cell)

    # ----------------------------------------------------------------- queue
    def route(self, target: str, d: Delivery) -> None:
        """The kernel's route: deliver ``d`` after a seeded latency, in order per receiver."""
        lo, hi = self.latency_ns
        at = self.clock.elapsed_ns + self.rng.randint(lo, hi)
        at = max(at, self._last_arrival.get(target, 0))  # an inbox is FIFO
        self._last_arrival[target] = at
        self.world.at(at, lambda: self._on_cell(
            target, lambda cell: self.engine.deliver(cell, d), delivery=d))

    def _on_cell(self, pd: str, work: Callable[[Cell], None],
                 delivery: Delivery | None = None) -> None:
        cell = self.cells.get(pd)
        if cell is None:  # never started: what it was sent is dropped at the receiver
            if delivery is not None:
                self.kernel.accept(delivery)
            return
        work(cell)

    @property
    def pending(self) -> int:
        return self.world.pending

    def step(self) -> bool:
        return self.world.step()

    def run_until(self, t: float) -> int:
        return self.world.run_until(t)

    def run_for(self, seconds: float) -> int:
        return self.world.run_for(seconds)

    def run_until_idle(self, max_items: int = 1_000_000) -> int:
        return self.world.run_until_idle(max_items)
