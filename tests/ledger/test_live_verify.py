"""Live-log limits, the verifier child's lifecycle, and the torn-write policy for zero pages."""

from __future__ import annotations

import gc
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import InProcessWorker, counting_clock, new_ledger, sample_events, segments
from test_properties import _frames

from ledger import audit, verifier
from ledger.catalog import PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options

NO_FLAG = Options(set_append_only_flag=False)


# ------------------------------------------------------ written end of the last segment

@pytest.mark.parametrize("jobs", [1, 2])
def test_verify_after_roll_at_a_multiple_of_256(tmp_path: Path, jobs: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)  # jobs=2: the real child too
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(segment_bytes=1000, set_append_only_flag=False))
    led.append_many([PdDeclared(f"pd-{i}", i) for i in range(255)])  # size 256, rolls
    led.close()
    last = segments(d)[-1]
    assert last.name == "seg-00000000000000000256.log"
    assert last.stat().st_size == 20  # just the header: closed, trimmed, sound
    assert audit.verify(d, jobs=jobs).records == 256


def test_written_end_of_a_closed_ledger_is_its_size(tmp_path: Path) -> None:
    """Control: a segment ending in a checkpoint ends in a newline, never in 0x00."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=NO_FLAG)
    for i in range(10):
        led.append(PdDeclared(f"pd-{i}", i))
    led.close()
    last = segments(d)[-1]
    assert verifier.segment_limits(d)[last.name] == last.stat().st_size


# ------------------------------------------------------ the child process

def test_kill_after_the_child_exited_closes_its_pipes(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=NO_FLAG)
    led.append(PdDeclared("a", 1))
    led.close()
    worker = verifier.TreeWorker(d, verifier.segment_limits(d), None)
    proc = worker._proc
    assert proc is not None
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.kill()  # what _two_halves does when the replay half fails
    closed = proc.stdout is not None and proc.stdout.closed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del worker, proc
        gc.collect()
    assert closed
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ------------------------------------------------------ an abandoned parallel attempt

class LyingWorker(InProcessWorker):
    """Answers with a tree whose root is not the one the last checkpoint states."""

    def answer(self, honest: verifier.TreeResult) -> verifier.TreeResult:
        return replace(honest, frontier=(bytes(32), *honest.frontier[1:]))


def test_abandoned_attempt_then_combined_pass_gives_the_one_pass_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """on_commit fires in both attempts; snapshot states still compare equal."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=NO_FLAG)
    events = list(sample_events(60))
    for e in events[:30]:
        led.append(e)
    led.write_snapshot()
    for e in events[30:]:
        led.append(e)
    led.close()
    single = audit.verify(d, jobs=1)
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(verifier, "TreeWorker", LyingWorker)
    calls: list[int] = []
    real = verifier.audit_fold

    def counting_fold(*args, **kwargs):  # type: ignore[no-untyped-def]
        inner = kwargs["on_commit"]

        def on_commit(size: int, state: Any) -> None:
            calls.append(size)
            inner(size, state)

        kwargs["on_commit"] = on_commit
        return real(*args, **kwargs)

    monkeypatch.setattr(verifier, "audit_fold", counting_fold)
    both = audit.verify(d, jobs=2)
    assert len(calls) == 2 * single.checkpoints  # the parallel attempt, then the rerun
    assert (both.records, both.checkpoints, both.root, both.members, both.snapshots) == (
        single.records, single.checkpoints, single.root, single.members, single.snapshots)


# ------------------------------------------------------ torn writes vs committed damage

def _committed_batch_straddling_a_page(tmp_path: Path) -> tuple[Path, NodeKeys, int, int]:
    """A ledger (crashed: no close, no anchor) whose last committed batch spans pages and
    whose checkpoint frame starts in one page and ends in the next."""
    for extra in range(40):
        d = tmp_path / f"l{extra}"
        keys = NodeKeys.generate()
        led = Ledger.create(d, keys, "t.ppn/ledger", clock=counting_clock(), options=NO_FLAG)
        for i in range(3):
            led.append(PdDeclared(f"pd-{i}", i))
        size0 = led.size
        led.append_many([PdDeclared(f"pd-big-{j}" + "y" * extra, j) for j in range(200)])
        data = segments(d)[-1].read_bytes()[:led._segment_size]
        off, length, _ = list(_frames(data))[-1]
        os.close(led._fd)
        led._fd = -1
        os.close(led._lock_fd)
        led._lock_fd = -1
        if off // 4096 != (off + length - 1) // 4096 and off % 4096 > 100:
            return d, keys, size0, (off + length - 1) // 4096 * 4096 - 4096
    raise AssertionError("no layout found")


def test_a_zero_page_over_the_final_checkpoint_reads_as_a_torn_write(tmp_path: Path) -> None:
    """The chosen policy, stated: an all-zero page that covers the start of the last
    batch's checkpoint cannot be told from that batch's torn write with its pages
    kept out of order (zero pages are what a write that never reached the disk
    leaves in reserved space).  Under fsync's contract the batch was therefore never
    acknowledged, and open drops it -- loudly, in ``recovered`` -- rather than refuse
    to start.  Any intact checkpoint after such damage still makes it corruption."""
    d, keys, size0, page = _committed_batch_straddling_a_page(tmp_path)
    with segments(d)[-1].open("r+b") as f:
        f.seek(page)
        f.write(bytes(4096))
    led = Ledger.open(d, keys, options=NO_FLAG)
    try:
        assert led.recovered is not None and led.recovered.dropped_records > 0
        assert led.size == size0  # the log as it was before that batch
    finally:
        led.close()

