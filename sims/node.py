"""A simulated node: a real ledger and kernel, run by the deterministic host.

Everything a node needs is derived from the seed: its keys (``sha256`` of the
seed), its ledger timestamps (the virtual clock) and the latency of every message
(the host's ``random.Random``).  The ledger is a real one on disk, with fsyncs,
so what a run leaves behind can be audited with ``ppn ledger verify``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from actors.engine import CoreFactory
from actors.io.base import Adapter
from actors.kernel import Kernel, Port
from actors.pds import make_core
from actors.system import SystemDescription, load_default
from ledger.catalog import VmPool
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from sims.host import Host, VirtualClock, World

SIM_OPTIONS = Options(set_append_only_flag=False)
"""Simulated ledgers are throwaway: no append-only flag (it needs root to remove)."""


def node_keys(seed: int) -> NodeKeys:
    """The node's keys for ``seed``: Ed25519 seeded with ``sha256(seed)``."""
    return NodeKeys.from_seed(hashlib.sha256(f"ppn-sim-node/{seed}".encode()).digest())


@dataclass
class SimNode:
    """One node: its ledger, its capability kernel and the host running its cores."""

    name: str
    directory: Path
    keys: NodeKeys
    ledger: Ledger
    kernel: Kernel
    host: Host

    @property
    def clock(self) -> VirtualClock:
        return self.host.clock

    def port(self, pd: str) -> Port:
        return self.kernel.port(pd)

    def close(self) -> None:
        self.ledger.close()


def build_node(directory: Path, seed: int, *, name: str = "sim-node", role: str = "hub",
               mesh_ip: str = "10.8.0.1", endpoint: str | None = None,
               world: World | None = None, adapters: dict[str, Adapter] | None = None,
               make_core: CoreFactory = make_core, start: bool = True,
               pool: VmPool | None = None) -> SimNode:
    """A node initialised as ``ppn node init`` does, in ``directory`` (new or empty).

    ``world`` puts it on a shared clock and queue with other nodes (``sims.mesh``);
    ``adapters`` are its simulated backends, by PD.  ``start`` starts every PD's
    core; pass False to drive the ports by hand first.
    """
    keys = node_keys(seed)
    clock = VirtualClock() if world is None else world.clock
    ledger = Ledger.create(directory, keys, f"{name}.ppn/ledger", clock=clock.ledger_ns,
                           options=SIM_OPTIONS)
    system = load_default()
    ledger.append_many(system.first_events(name, keys, mesh_ip, role, endpoint, pool=pool))
    return boot_node(name, directory, keys, ledger, seed, world=world, clock=clock,
                     adapters=adapters, make_core=make_core, start=start, system=system)


def boot_node(name: str, directory: Path, keys: NodeKeys, ledger: Ledger, seed: int, *,
              world: World | None, clock: VirtualClock, adapters: dict[str, Adapter] | None,
              make_core: CoreFactory = make_core, start: bool = True,
              system: SystemDescription | None = None) -> SimNode:
    """A kernel and host on ``ledger`` (a new one, or one a node ran on before: what
    ``ppn node run`` does after a restart)."""
    system = system or load_default()
    reply_ids = random.Random(f"ppn-sim-replies/{seed}")
    kernel = Kernel(ledger, reply_ids=lambda: reply_ids.getrandbits(63),
                    journals=system.journals)
    host = Host(kernel, ledger, clock, random.Random(f"ppn-sim-host/{seed}"), world=world,
                adapters=adapters, make_core=make_core)
    if start:
        host.start_all()
    return SimNode(name, directory, keys, ledger, kernel, host)


@contextlib.contextmanager
def scratch_directory(prefix: str = "ppn-sim-") -> Iterator[Path]:
    """A throwaway directory, in memory (``/dev/shm``) when there is one: fsyncs cost nothing.

    Removed on exit.  Simulated ledgers fsync every batch; on a disk that dominates.
    """
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and _writable(shm) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False
