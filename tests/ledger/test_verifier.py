"""The parallel audit (ledger.verifier) gives the answer a single combined pass gives.

The replay half runs here and the cryptographic half in a child process; each stops
at its first failure and the earlier one is reported.  The property tests run the
cryptographic half in-process (same code, no process start-up per example); the
other tests start the real child.
"""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from helpers import (
    InProcessWorker,
    append_fitting,
    member,
    new_ledger,
    sample_events,
    segments,
    unseal_all,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import (
    Tamper,
    _frames,
    _reframe,
    damage_a_segment,
    events,
    flip_byte,
    resign,
    swap_records,
    truncate_middle,
)

from ledger import audit, verifier
from ledger.catalog import PdDeclared
from ledger.log import Options
from ledger.note import NoteSigner, sign_note
from ledger.records import KIND_CHECKPOINT, KIND_RECORD, decode_record
from ledger.scan import LedgerCorrupt

SMALL_SEGMENTS = Options(segment_bytes=1500, set_append_only_flag=False)


@pytest.fixture
def always_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)


def _outcome(directory: Path, jobs: int) -> tuple[Any, ...]:
    try:
        r = audit.verify(directory, jobs=jobs)
    except LedgerCorrupt as exc:
        return ("corrupt", exc.segment, exc.offset)
    return ("ok", r.records, r.checkpoints, r.segments, r.members, r.root, r.verifier_key)


@pytest.mark.parametrize("tamper", [flip_byte, truncate_middle, swap_records, resign])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bs=st.lists(st.lists(events, min_size=1, max_size=5), min_size=2, max_size=6),
       data=st.data())
def test_parallel_finds_the_same_first_failure(tamper: Tamper, bs: list[list[Any]],
                                               data: st.DataObject,
                                               always_parallel: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "TreeWorker", InProcessWorker)
    work = Path(tempfile.mkdtemp(prefix="ppn-par-"))
    try:
        led, _ = new_ledger(work / "l", options=SMALL_SEGMENTS)
        append_fitting(led, bs)
        led.close()
        unseal_all(work / "l")
        intact = _outcome(work / "l", jobs=1)
        assert intact[0] == "ok"
        assert _outcome(work / "l", jobs=2) == intact
        if not damage_a_segment(work / "l", tamper, data):
            return
        single = _outcome(work / "l", jobs=1)
        assert single[0] == "corrupt"
        assert _outcome(work / "l", jobs=2) == single
    finally:
        shutil.rmtree(work)


def _ledger(tmp_path: Path, n: int = 400) -> Path:
    led, _ = new_ledger(tmp_path / "l", options=SMALL_SEGMENTS)
    evs = list(sample_events(n))
    for i in range(0, n, 7):
        led.append_many(evs[i:i + 7])
    led.close()
    unseal_all(tmp_path / "l")
    return tmp_path / "l"


def test_real_worker_agrees_with_a_single_pass(tmp_path: Path, always_parallel: None) -> None:
    d = _ledger(tmp_path)
    single = audit.verify(d, jobs=1)
    both = audit.verify(d, jobs=2)
    assert (both.records, both.checkpoints, both.segments, both.members, both.root) == (
        single.records, single.checkpoints, single.segments, single.members, single.root)
    assert both.records == 401


def _damage_checkpoint(d: Path, index: int = 1) -> tuple[str, int]:
    """Re-sign checkpoint ``index`` (of the log) with another key, keeping the frame
    checksum valid."""
    found = [(seg, f) for seg in segments(d) for f in _frames(seg.read_bytes())
             if f[2] == KIND_CHECKPOINT]
    seg, (off, length, _) = found[index]
    data = seg.read_bytes()
    payload = data[off + 9:off + length]
    text = payload[:payload.index(b"\n\n") + 1]
    signer = NoteSigner(text.split(b"\n")[0].decode(), nacl.signing.SigningKey.generate())
    seg.write_bytes(data[:off] + _reframe(KIND_CHECKPOINT, sign_note(text, [signer]))
                    + data[off + length:])
    return seg.name, off


def test_real_worker_reports_what_only_it_checks(tmp_path: Path, always_parallel: None) -> None:
    """A checkpoint signed by another key is found by the child's half; the report names it."""
    d = _ledger(tmp_path)
    where = _damage_checkpoint(d)
    with pytest.raises(LedgerCorrupt) as single:
        audit.verify(d, jobs=1)
    with pytest.raises(LedgerCorrupt) as both:
        audit.verify(d, jobs=2)
    assert (single.value.segment, single.value.offset) == where
    assert (both.value.segment, both.value.offset, both.value.seq) == (
        single.value.segment, single.value.offset, single.value.seq)
    assert "checkpoint" in str(both.value)


def test_earlier_failure_wins_across_halves(tmp_path: Path, always_parallel: None) -> None:
    """The child's failure in an early segment beats the replay half's in a later one."""
    d = _ledger(tmp_path)
    early = _damage_checkpoint(d)
    last = segments(d)[-1]
    data = last.read_bytes()
    off, length, _kind = next(f for f in _frames(data) if f[2] == KIND_RECORD)
    rec, _ = decode_record(data[off + 9:off + length])
    # a valid frame whose event is of an unknown type: only the replay half decodes events
    bogus = rec._replace(event_bytes=b"\x93\xa3zzz\x01\x80").body()
    last.write_bytes(data[:off] + _reframe(KIND_RECORD, bogus) + data[off + length:])
    assert early[0] != last.name
    with pytest.raises(LedgerCorrupt) as both:
        audit.verify(d, jobs=2)
    assert (both.value.segment, both.value.offset) == early


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/true"])
def test_a_broken_worker_falls_back_to_this_process(tmp_path: Path, always_parallel: None,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     executable: str) -> None:
    d = _ledger(tmp_path)
    expected = audit.verify(d, jobs=1)
    monkeypatch.setattr(sys, "executable", executable)
    assert audit.verify(d, jobs=2).root == expected.root
    _damage_checkpoint(d)
    with pytest.raises(LedgerCorrupt, match="checkpoint"):
        audit.verify(d, jobs=2)


def test_small_logs_use_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Path] = []

    class Spy(InProcessWorker):
        def __init__(self, directory: Path, *args: Any) -> None:
            started.append(directory)
            super().__init__(directory, *args)

    monkeypatch.setattr(verifier, "TreeWorker", Spy)
    led, _ = new_ledger(tmp_path / "l")
    led.append_many([member(1), PdDeclared("pd-x", 3)])
    led.close()
    assert audit.verify(tmp_path / "l", jobs=2).records == 3
    assert started == []
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 0)
    assert audit.verify(tmp_path / "l", jobs=2).records == 3
    assert started == [tmp_path / "l"]


def _flip_checkpoint_signature(d: Path, index: int) -> tuple[str, int]:
    """Flip one bit of checkpoint ``index``'s Ed25519 signature; key ID and text intact."""
    found = [(seg, f) for seg in segments(d) for f in _frames(seg.read_bytes())
             if f[2] == KIND_CHECKPOINT]
    seg, (off, length, _) = found[index]
    data = seg.read_bytes()
    note = data[off + 9:off + length]
    head, _, line = note[:-1].rpartition(b" ")
    raw = bytearray(base64.b64decode(line))
    raw[20] ^= 1  # inside the signature, after the 4-byte key ID
    damaged = head + b" " + base64.b64encode(bytes(raw)) + b"\n"
    seg.write_bytes(data[:off] + _reframe(KIND_CHECKPOINT, damaged) + data[off + length:])
    return seg.name, off


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_each_half_checks_its_share_of_checkpoint_signatures(tmp_path: Path, index: int,
                                                             always_parallel: None) -> None:
    """Checkpoint signatures are split by parity between the halves; none is skipped."""
    d = _ledger(tmp_path)
    where = _flip_checkpoint_signature(d, index)
    for jobs in (1, 2):
        with pytest.raises(LedgerCorrupt, match="checkpoint: ") as err:
            audit.verify(d, jobs=jobs)
        assert (err.value.segment, err.value.offset) == where


def _written_ledger(tmp_path: Path) -> tuple[Path, Any]:
    from ledger.keys import NodeKeys
    from ledger.log import Ledger

    keys = NodeKeys.generate()
    led = Ledger.create(tmp_path / "l", keys, "t.ppn/ledger", options=SMALL_SEGMENTS)
    evs = list(sample_events(300))
    for i in range(0, 300, 7):
        led.append_many(evs[i:i + 7])
    led.close()
    return tmp_path / "l", keys


def test_open_without_a_snapshot_uses_both_halves(tmp_path: Path, always_parallel: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ledger.open with no snapshot verifies everything in two processes and continues
    the chain and tree exactly where a single pass would."""
    from ledger.log import Ledger

    d, keys = _written_ledger(tmp_path)
    single = tmp_path / "single"
    shutil.copytree(d, single)
    started: list[Path] = []
    real = verifier.TreeWorker

    class Counting(real):  # type: ignore[misc,valid-type]
        def __init__(self, directory: Path, *args: Any) -> None:
            started.append(directory)
            super().__init__(directory, *args)

    monkeypatch.setattr(verifier, "TreeWorker", Counting)
    later = 4_000_000_000_000_000_000  # one clock for both, after every stored ts
    with Ledger.open(d, keys, options=SMALL_SEGMENTS, clock=lambda: later) as two:
        assert started == [d]
        receipt_two = two.append(PdDeclared("after", 1))
        state_two = two.state.to_obj()
    monkeypatch.setattr(verifier, "PARALLEL_MIN_BYTES", 1 << 62)
    with Ledger.open(single, keys, options=SMALL_SEGMENTS, clock=lambda: later) as one:
        assert len(started) == 1  # this one in a single pass
        receipt_one = one.append(PdDeclared("after", 1))
        state_one = one.state.to_obj()
    # Same seq and same leaf hash: the same prev_hash; and the same state.
    assert (receipt_two.seq, receipt_two.leaf_hash) == (receipt_one.seq, receipt_one.leaf_hash)
    assert state_two == state_one
    assert audit.verify(d, jobs=1).records == 302


def test_open_refuses_damage_only_the_tree_half_sees(tmp_path: Path,
                                                     always_parallel: None) -> None:
    from ledger.log import Ledger

    d, keys = _written_ledger(tmp_path)
    unseal_all(d)
    where = _flip_checkpoint_signature(d, 3)
    with pytest.raises(LedgerCorrupt) as err:
        Ledger.open(d, keys, options=SMALL_SEGMENTS)
    assert (err.value.segment, err.value.offset) == where


def test_a_wrong_answer_from_the_child_is_not_taken(tmp_path: Path, always_parallel: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontier whose root is not the last checkpoint's sends the work to one pass."""
    from ledger.log import Ledger

    d, keys = _written_ledger(tmp_path)
    truth = audit.verify(d, jobs=1)

    class Lying(InProcessWorker):
        def answer(self, r: verifier.TreeResult) -> verifier.TreeResult:
            bogus = tuple(bytes(32) for _ in r.frontier)
            return verifier.TreeResult(r.count, r.checkpoints, bogus, bytes(32), r.last_ts,
                                       None)

    monkeypatch.setattr(verifier, "TreeWorker", Lying)
    assert audit.verify(d, jobs=2).root == truth.root
    with Ledger.open(d, keys, options=SMALL_SEGMENTS) as led:
        assert led.root() == truth.root
        led.append(PdDeclared("after", 1))
    assert audit.verify(d, jobs=1).records == truth.records + 1
