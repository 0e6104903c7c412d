"""Shared fixtures for ledger tests: a deterministic clock and small ledgers."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ledger import verifier
from ledger.catalog import CapGranted, MemberAdded, MemberRemoved, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import EventUnfit, Ledger, Options
from ledger.records import FRAME_HEADER, KIND_CHECKPOINT, KIND_RECORD
from ledger.scan import LogReader, list_segments
from ledger.seal import clear_append_only
from ledger.state import State, apply

ORIGIN = "test-node.ppn/ledger"
NO_FLAG = Options(set_append_only_flag=False)
QUIET = Options(set_append_only_flag=False, anchor_every_batches=0, anchor_every_seconds=0)
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def counting_clock(start: int = 1_700_000_000_000_000_000) -> Callable[[], int]:
    counter = itertools.count(start, 1000)
    return lambda: next(counter)


def member(i: int) -> MemberAdded:
    return MemberAdded(f"node-{i}", bytes([i % 256]) * 32, bytes([(i + 1) % 256]) * 32,
                       f"10.8.0.{i % 250 + 2}", f"192.0.2.{i % 250 + 1}:51820", "node")


_GRANT_IDS = itertools.count(1)
"""Cap ids for sample grants, fresh per grant: the ledger refuses a second grant of an id."""


def sample_events(n: int) -> Iterator[object]:
    for i in range(n):
        k = i % 5
        if k == 0:
            yield member(i)
        elif k == 1:
            yield CapGranted(next(_GRANT_IDS), "pd-fleet", "tunnel", ("read",), i, None, "mint")
        elif k == 2:
            yield MemberRemoved(f"node-{i - 2}", "left")
        else:
            yield PdDeclared(f"pd-{i}", i)


def append_fitting(led: Ledger, batches: list[list[Any]]) -> int:
    """Append each batch; one the fold could not apply is refused whole, changing nothing.
    Returns how many events were appended."""
    n = 0
    for b in batches:
        size, root = led.size, led.root()
        try:
            led.append_many(b)
        except EventUnfit:
            assert (led.size, led.root()) == (size, root)
        else:
            n += len(b)
    return n


def new_ledger(path: Path, keys: NodeKeys | None = None,
               options: Options = NO_FLAG) -> tuple[Ledger, NodeKeys]:
    keys = keys or NodeKeys.generate()
    return Ledger.create(path, keys, ORIGIN, clock=counting_clock(), options=options), keys


def replay(path: Path) -> State:
    state = State()
    for e in LogReader(path).entries():
        apply(state, e.event, e.seq, e.ts_ns, e.signature)
    return state


def segments(path: Path) -> list[Path]:
    return [p for _, p in list_segments(path)]


def frames(path: Path) -> list[tuple[int, int, int]]:
    """(offset, kind, length) of every frame of a sound segment."""
    data = path.read_bytes()
    out, off = [], 20
    while off + 8 <= len(data):
        length = FRAME_HEADER.unpack_from(data, off)[0]
        if length == 0:
            break
        out.append((off, data[off + 8], length))
        off += 8 + length
    return out


def flip(path: Path, offset: int) -> None:
    """One bit of ``path`` changed: rot, not what a torn write leaves."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def zero(path: Path, offset: int, n: int) -> None:
    """``n`` bytes of ``path`` zeroed: what a write torn by a crash leaves."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(n))


def damaged_last_batch(d: Path, garbage: bool = False,
                       options: Options = NO_FLAG) -> tuple[NodeKeys, int, int]:
    """A closed ledger whose last batch (40 records over several pages) has a zero page
    (or, with ``garbage``, a page of random bytes) in its middle while its checkpoint
    survives; (keys, the batch's first seq, the size after it)."""
    led, keys = new_ledger(d, options=options)
    led.append_many(list(sample_events(10)))
    start = led.size
    led.append_many([PdDeclared(f"pd-{i}-" + "x" * 300, i) for i in range(40)])
    size = led.size
    led.close()
    last = segments(d)[-1]
    fr = frames(last)
    first_off = [o for o, k, _ in fr if k == KIND_RECORD][start]
    end_off, kind, _ = fr[-1]
    assert kind == KIND_CHECKPOINT and end_off - first_off > 3 * 4096
    page = ((first_off + end_off) // 2) // 4096 * 4096
    with open(last, "r+b") as f:
        f.seek(page)
        f.write(os.urandom(4096) if garbage else bytes(4096))
    return keys, start, size


def python(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (a hang fails the test, it cannot stall it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: a hang")


def ppn(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real CLI, as text; a hang fails the test."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PPN_DEBUG", None)
    try:
        return subprocess.run([sys.executable, "-m", "actors.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ppn {' '.join(args)}` still running after {timeout} s: a hang")


def unseal_all(path: Path) -> None:
    """Make sealed segments writable again so a test can damage them (and tmp can be removed)."""
    for seg in segments(path):
        clear_append_only(seg)
        os.chmod(seg, 0o644)


class InProcessWorker:
    """``verifier.TreeWorker``'s contract, computed in this process when the result is
    asked for (no child per example).  ``before_result`` runs first, if set: a test's
    way to act while "the child" is still reading.  Subclasses may doctor ``answer``."""

    before_result: ClassVar[Callable[[], Any] | None] = None

    def __init__(self, directory: Path, limits: dict[str, int],
                 pinned_key: bytes | None) -> None:
        self.args = directory, limits, pinned_key
        self.fell_back = None

    def result(self) -> verifier.TreeResult:
        if InProcessWorker.before_result is not None:
            InProcessWorker.before_result()
        return self.answer(verifier.tree_pass(*self.args))

    def answer(self, honest: verifier.TreeResult) -> verifier.TreeResult:
        return honest

    def kill(self) -> None:
        pass
