"""The simulated underlay: datagrams between nodes' NICs, with latency, loss,
duplication and partitions, all drawn from one seeded ``random.Random``.

Addresses are the nodes' underlay IPs (192.0.2.0/24 in the scenarios); a datagram
to an IP no NIC has is lost, as on a real network.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sims.host import World


class Listener(Protocol):
    """What listens at an endpoint: a node's NIC, or its simulated WireGuard device."""

    @property
    def endpoint(self) -> str: ...

    def arrive(self, source: str, data: bytes) -> None: ...


@dataclass
class Conditions:
    """How the underlay treats a datagram (latency in virtual nanoseconds)."""

    latency_ns: tuple[int, int] = (200_000, 5_000_000)
    loss: float = 0.0
    duplicate: float = 0.0


@dataclass
class Underlay:
    world: World
    rng: random.Random
    conditions: Conditions = field(default_factory=Conditions)
    stats: Counter[str] = field(default_factory=Counter)
    _nics: dict[str, Listener] = field(default_factory=dict)
    _cut: set[frozenset[str]] = field(default_factory=set)

    def attach(self, endpoint: str, nic: Listener) -> None:
        """``nic`` listens on ``endpoint`` (``IP:PORT``): datagrams to any other port of its
        IP find no listener and are lost."""
        self._nics[endpoint] = nic

    def detach(self, endpoint: str, nic: Listener) -> None:
        if self._nics.get(endpoint) is nic:
            del self._nics[endpoint]

    def partition(self, side_a: set[str], side_b: set[str]) -> None:
        """No datagram crosses between the IPs of ``side_a`` and those of ``side_b``."""
        self._cut.update(frozenset((a, b)) for a in side_a for b in side_b if a != b)

    def heal(self) -> None:
        self._cut.clear()

    def send(self, source: str, to: str, data: bytes) -> None:
        """``source`` and ``to`` are ``IP:PORT``; the datagram may arrive late, twice or never."""
        self.stats["sent"] += 1
        nic = self._nics.get(to)
        if nic is None:
            self.stats["no listener"] += 1
            return
        if self._partitioned(source, to):
            self.stats["partitioned"] += 1
            return
        c, rng = self.conditions, self.rng
        if rng.random() < c.loss:
            self.stats["lost"] += 1
            return
        copies = 2 if rng.random() < c.duplicate else 1
        self.stats["duplicated"] += copies - 1
        for _ in range(copies):
            delay = rng.randint(*c.latency_ns)
            self.world.after(delay, lambda: self._arrive(nic, source, data))

    def _partitioned(self, source: str, to: str) -> bool:
        return frozenset((source.rpartition(":")[0], to.rpartition(":")[0])) in self._cut

    def _arrive(self, nic: Listener, source: str, data: bytes) -> None:
        if self._partitioned(source, nic.endpoint):  # cut while it was in flight
            self.stats["partitioned"] += 1
            return
        self.stats["delivered"] += 1
        nic.arrive(source, data)
