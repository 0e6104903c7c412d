"""Adversarial cases for the scan inner loop, the two-process verifier and
preallocated segments: each found a bug in a review, now fixed."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import InProcessWorker, counting_clock, new_ledger, segments, unseal_all
from test_properties import _frames, _reframe

from ledger import audit, verifier
from ledger.catalog import CapGranted, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.records import KIND_CHECKPOINT, KIND_RECORD, decode_record
from ledger.scan import LedgerCorrupt, LogReader

SMALL = Options(segment_bytes=1500, set_append_only_flag=False)


@pytest.fixture
def parallel_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(verifier, "TreeWorker", InProcessWorker)
    monkeypatch.setattr(InProcessWorker, "before_result", None)


def _failure(d: Path, jobs: int) -> LedgerCorrupt:
    with pytest.raises(LedgerCorrupt) as err:
        audit.verify(d, jobs=jobs)
    return err.value


def _grants_ledger(tmp_path: Path, n: int = 40) -> Path:
    """Every batch is an unsigned record, a signed cap.granted record and a checkpoint."""
    led, _ = new_ledger(tmp_path / "l", options=SMALL)
    for i in range(n):
        led.append_many([PdDeclared(f"pd-{i}", i),
                         CapGranted(i, "pd-fleet", "tunnel", ("read",), i, None, "mint")])
    led.close()
    unseal_all(tmp_path / "l")
    return tmp_path / "l"


def _signed_record(seg: Path, which: int = -1) -> tuple[bytes, int, int]:
    data = seg.read_bytes()
    recs = [(o, ln) for o, ln, k in _frames(data) if k == KIND_RECORD
            and decode_record(data[o + 9:o + ln])[0].signature is not None]
    off, length = recs[which]
    return data, off, length


# --------------------------------------------------- first failure: one pass vs two

def test_two_faults_in_one_record_are_reported_as_one_pass_does(
        tmp_path: Path, parallel_in_process: None) -> None:
    d = _grants_ledger(tmp_path)
    seg = segments(d)[1]
    data, off, length = _signed_record(seg, 0)
    rec, _ = decode_record(data[off + 9:off + length])
    assert rec.signature is not None
    bad = rec._replace(prev_hash=bytes(32), signature=bytes([rec.signature[0] ^ 1])
                       + rec.signature[1:]).body()
    seg.write_bytes(data[:off] + _reframe(KIND_RECORD, bad) + data[off + length:])
    one = _failure(d, 1)
    assert "hash chain broken" in one.reason
    two = _failure(d, 2)
    assert (two.segment, two.offset, two.seq, two.reason) == (
        one.segment, one.offset, one.seq, one.reason)


def test_uncovered_sealed_tail_is_reported_as_one_pass_does(tmp_path: Path,
                                                     parallel_in_process: None) -> None:
    d = _grants_ledger(tmp_path)
    seg = segments(d)[0]
    assert len(segments(d)) > 1
    data = seg.read_bytes()
    frames = _frames(data)
    # drop the sealed segment's last checkpoint and spoil the grant it covered
    (c_off, _c_len, c_kind), (r_off, r_len, r_kind) = frames[-1], frames[-2]
    assert (c_kind, r_kind, frames[-3][2]) == (KIND_CHECKPOINT, KIND_RECORD, KIND_RECORD)
    rec, _ = decode_record(data[r_off + 9:r_off + r_len])
    assert rec.signature is not None
    bad = rec._replace(signature=bytes([rec.signature[0] ^ 1]) + rec.signature[1:]).body()
    seg.write_bytes(data[:r_off] + _reframe(KIND_RECORD, bad) + data[r_off + r_len:c_off])
    one = _failure(d, 1)
    assert one.offset == r_off and "signature" in one.reason
    two = _failure(d, 2)
    assert (two.segment, two.offset, two.reason) == (one.segment, one.offset, one.reason)


# --------------------------------------- preallocation vs the halves' agreed limits

def _live(tmp_path: Path, options: Options) -> Ledger:
    led, _ = new_ledger(tmp_path / "l", options=options)
    for i in range(20):
        led.append_many([PdDeclared(f"pd-{i}", i), PdDeclared(f"pd-{i}-b", i)])
    return led


def test_parallel_verify_of_live_preallocated_ledger(tmp_path: Path,
                                                     parallel_in_process: None) -> None:
    led = _live(tmp_path, Options(set_append_only_flag=False))
    try:
        assert audit.verify(tmp_path / "l", jobs=1).records == 41
        # the writer commits while the child is still reading (here: before it starts)
        InProcessWorker.before_result = lambda: led.append(PdDeclared("late", 1))
        report = audit.verify(tmp_path / "l", jobs=2)
        assert report.records in (41, 42)
    finally:
        InProcessWorker.before_result = None
        led.close()


def test_parallel_verify_of_live_ledger_without_preallocation(
        tmp_path: Path, parallel_in_process: None) -> None:
    """Control: growing the file as written, the agreed limits do fix what both read."""
    led = _live(tmp_path, Options(set_append_only_flag=False, preallocate=0))
    try:
        InProcessWorker.before_result = lambda: led.append(PdDeclared("late", 1))
        assert audit.verify(tmp_path / "l", jobs=2).records == 41
    finally:
        InProcessWorker.before_result = None
        led.close()


def test_verify_of_a_live_ledger_that_rolls_meanwhile(tmp_path: Path,
                                                      parallel_in_process: None) -> None:
    """A writer rolling a segment during verify rewrites the anchor to a size the pass
    does not read; verify checks the anchor as it was when it began."""
    led = _live(tmp_path, Options(set_append_only_flag=False, segment_bytes=1500))
    try:
        before = len(segments(tmp_path / "l"))

        def roll() -> None:
            while len(segments(tmp_path / "l")) == before:
                led.append(PdDeclared("late", 1))

        InProcessWorker.before_result = roll
        assert audit.verify(tmp_path / "l", jobs=2).records == 41
    finally:
        InProcessWorker.before_result = None
        led.close()


# ------------------------------------------------------------ the child's answer

def _fake_package(where: Path, answer: dict[str, Any]) -> None:
    pkg = where / "ledger"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "verifier.py").write_text(textwrap.dedent(f"""
        import sys
        sys.stdin.read()
        sys.stdout.write({json.dumps(json.dumps(answer))})
    """))


def test_a_package_in_the_working_directory_cannot_answer_for_the_child(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)
    led, _ = new_ledger(tmp_path / "l", options=SMALL)
    for i in range(30):
        led.append(PdDeclared(f"pd-{i}", i))
    led.close()
    d = tmp_path / "l"
    unseal_all(d)
    honest = verifier._encode(verifier.tree_pass(d, verifier.segment_limits(d), None))
    # damage only the tree half sees: checkpoint 1's root (re-framed, signature kept)
    seg = segments(d)[0]
    data = seg.read_bytes()
    off, length, _ = [f for f in _frames(data) if f[2] == KIND_CHECKPOINT][1]
    note = bytearray(data[off + 9:off + length])
    i = note.index(b"\n", note.index(b"\n") + 1) + 1  # first byte of the root line
    note[i] = ord("A") if note[i] != ord("A") else ord("B")
    seg.write_bytes(data[:off] + _reframe(KIND_CHECKPOINT, bytes(note)) + data[off + length:])
    for jobs in (1, 2):  # the real child finds it
        with pytest.raises(LedgerCorrupt, match="checkpoint"):
            audit.verify(d, jobs=jobs)
    _fake_package(tmp_path / "cwd", honest)
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(LedgerCorrupt):
        audit.verify(d, jobs=2)


# --------------------------------------------------- crash shapes with preallocation

def _crash(led: Ledger) -> None:
    """Let go of the files as a killed process would: no trim, no anchor, no snapshot."""
    os.close(led._fd)
    led._fd = -1
    os.close(led._lock_fd)
    led._lock_fd = -1


def _five_appends(tmp_path: Path) -> tuple[NodeKeys, Ledger]:
    keys = NodeKeys.generate()
    led = Ledger.create(tmp_path / "l", keys, "t.ppn/ledger", clock=counting_clock(),
                        options=Options(set_append_only_flag=False))
    for i in range(5):
        led.append(PdDeclared(f"pd-{i}", i))
    return keys, led


def test_torn_write_followed_by_reserved_zeros_is_recovered(tmp_path: Path) -> None:
    """A batch written only in part into reserved space: torn tail, nothing committed lost."""
    keys, led = _five_appends(tmp_path)
    size, state = led.size, led.state.copy()
    seg = segments(tmp_path / "l")[-1]
    end = led._segment_size
    assert seg.stat().st_size > end  # reserved space after the writes
    # simulate a crash: the next batch's first half reached the disk, zeros after it
    with seg.open("r+b") as f:
        f.seek(end)
        f.write(b"\x00\x00\x00\x30\x12\x34\x56\x78\x00\x95\x05\xcf")
    _crash(led)
    reopened = Ledger.open(tmp_path / "l", keys, options=Options(set_append_only_flag=False))
    try:
        assert reopened.recovered is not None
        assert (reopened.size, reopened.state) == (size, state)
    finally:
        reopened.close()


def test_torn_write_with_leading_zeros_is_recovered(tmp_path: Path) -> None:
    _keys, led = _five_appends(tmp_path)
    size = led.size
    seg = segments(tmp_path / "l")[-1]
    end = led._segment_size
    with seg.open("r+b") as f:  # page 1 of the batch lost, page 2 on disk, then reserve
        f.seek(end + 4096 - end % 4096)
        f.write(b"\x07" * 300)
    _crash(led)
    reader = LogReader(tmp_path / "l")
    reader.run()
    assert reader.result.count == size
    assert reader.result.tail is not None
