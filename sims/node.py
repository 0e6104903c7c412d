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

from actors.kernel import Kernel, Port
from actors.system import load_default
from ledger.catalog import MemberAdded, NodeIdentity
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from sims.host import Host, VirtualClock

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
               mesh_ip: str = "10.8.0.1", start: bool = True) -> SimNode:
    """A node initialised as ``ppn node init`` does, in ``directory`` (new or empty).

    ``start`` starts every PD's core; pass False to drive the ports by hand first.
    """
    keys = node_keys(seed)
    clock = VirtualClock()
    ledger = Ledger.create(directory, keys, f"{name}.ppn/ledger", clock=clock.ledger_ns,
                           options=SIM_OPTIONS)
    ledger.append_many([
        NodeIdentity(name, keys.public_key, keys.wg_public_key, mesh_ip, role),
        MemberAdded(name, keys.public_key, keys.wg_public_key, mesh_ip, None, role),
        *load_default().initial_events(),
    ])
    reply_ids = random.Random(f"ppn-sim-replies/{seed}")
    kernel = Kernel(ledger, reply_ids=lambda: reply_ids.getrandbits(63))
    host = Host(kernel, ledger, clock, random.Random(f"ppn-sim-host/{seed}"))
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
