"""Crash safety of the WORM log.

* :func:`test_sigkill_at_random_moments` -- a child process (``crash_child.py``)
  appends from several threads and is killed with SIGKILL at random moments, round
  after round on one ledger.  After each kill the ledger must open (truncating a
  torn tail, if any), verify, and hold every append whose call had returned.
* :func:`test_torn_tail_is_truncated` -- fabricated torn tails: audit refuses
  them, opening for writing truncates exactly them, nothing committed is lost.
* :func:`test_damaged_committed_record_is_never_truncated` (and the final
  checkpoint after a clean close) -- damage inside the committed log makes open and
  audit raise :class:`LedgerCorrupt` naming segment, offset and seq, changing nothing.

``PPN_CRASH_SEED`` and ``PPN_CRASH_ROUNDS`` replay or lengthen the crash schedule.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from ledger import audit
from ledger.catalog import REGISTRY, CapGranted, LedgerGenesis, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.records import (
    FRAME_HEADER,
    KIND_CHECKPOINT,
    KIND_RECORD,
    SEGMENT_HEADER,
    Record,
    frame,
    segment_header,
)
from ledger.scan import Entry, LedgerCorrupt, LogReader, list_segments, segment_name
from ledger.state import fold

CHILD = Path(__file__).with_name("crash_child.py")
ORIGIN = "crash.test/ledger"
SEED = int(os.environ.get("PPN_CRASH_SEED", "20240611"))
ROUNDS = max(50, int(os.environ.get("PPN_CRASH_ROUNDS", "50")))
THREADS = 4
SEGMENT_BYTES = 16 << 10
"""Small, so that rounds keep crossing segment rolls (a roll every ~60 records)."""
SNAPSHOT_EVERY = 400
"""The parent's ``close`` writes a snapshot this often, so opens start from snapshots."""
WAIT_S = 30.0
ID_RE = re.compile(r"^r(\d+)-t(\d+)-(\d+)(?:\.(\d+))?$")


def _load_child() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ppn_crash_child", CHILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_child = _load_child()
child_events: Callable[[int, int, int], list[object]] = _child.events
child_ident: Callable[[object], str] = _child.ident
event_digest: Callable[[bytes], str] = _child.event_digest


# ----------------------------------------------------------------------------- child runner
@dataclass
class Reports:
    """What a child reported before it died."""

    opening: bool = False
    opened_size: int | None = None
    open_seconds: float = 0.0
    acks: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (id, digest)
    snapshots: list[str] = field(default_factory=list)

    @property
    def landed(self) -> str:
        """Where the kill landed: before ``Ledger.open``, inside it, or while appending."""
        if self.opened_size is not None:
            return "appending"
        return "open" if self.opening else "startup"


class Child:
    """A running crash_child.py; its stdout is read concurrently, line by line."""

    def __init__(self, argv: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self.lines: list[bytes] = []
        self._tags: set[bytes] = set()
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._tags.add(line.split(b"\t", 1)[0].rstrip(b"\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, tag: bytes) -> None:
        """Wait until the child reports ``tag`` (or its stdout ends: it died early)."""
        with self._cond:
            self._cond.wait_for(lambda: tag in self._tags or self._eof, WAIT_S)

    def kill(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(WAIT_S)
        self._reader.join(WAIT_S)
        assert not self._reader.is_alive(), "the child's stdout stayed open after its death"
        self._stderr.close()
        return rc

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


def parse_reports(lines: list[bytes], context: str) -> Reports:
    rep = Reports()
    for raw in lines:
        assert raw.endswith(b"\n"), f"{context}: torn report line {raw!r}"
        tag, *rest = raw[:-1].decode().split("\t")
        if tag == "opening":
            rep.opening = True
        elif tag == "opened":
            rep.opened_size, rep.open_seconds = int(rest[0]), float(rest[1])
        elif tag == "ack":
            seq = int(rest[0])
            assert seq not in rep.acks, f"{context}: two appends returned seq {seq}"
            rep.acks[seq] = (rest[1], rest[2])
        elif tag == "snap":
            rep.snapshots.append(rest[0])
        elif tag == "error":
            pytest.fail(f"{context}: the child failed: {rest[0]}")
        else:
            pytest.fail(f"{context}: unexpected line from the child: {raw!r}")
    return rep


# ----------------------------------------------------------------------------- checks
def check_log(entries: list[Entry], acked: dict[int, tuple[str, str]], context: str) -> None:
    """The whole log: contiguous, no duplicates, exactly what the children appended.

    Per (round, thread) the records must be a prefix of that thread's event stream
    ending at a batch boundary (a thread appends sequentially, so a later step on
    disk means every earlier one returned), with each batch at consecutive seqs;
    rounds never interleave; every acknowledged (seq, id, digest) is in place.
    """
    assert [e.seq for e in entries] == list(range(len(entries))), f"{context}: seq gap"
    assert isinstance(entries[0].event, LedgerGenesis)
    seen: set[str] = set()
    cursor: dict[tuple[int, int], tuple[int, int, int]] = {}  # -> (step, index, last seq)
    last_round = -1
    for e in entries[1:]:
        eid = child_ident(e.event)
        assert eid not in seen, f"{context}: {eid} appears twice (again at seq {e.seq})"
        seen.add(eid)
        m = ID_RE.match(eid)
        assert m is not None, f"{context}: seq {e.seq} holds an unknown event {e.event!r}"
        rnd, t = int(m.group(1)), int(m.group(2))
        assert rnd >= last_round, f"{context}: seq {e.seq} ({eid}) follows round {last_round}"
        last_round = rnd
        step, index, last_seq = cursor.get((rnd, t), (0, 0, -1))
        batch = child_events(rnd, t, step)
        assert e.event == batch[index], (f"{context}: seq {e.seq} holds {e.event!r}; thread "
                                         f"{t} of round {rnd} appended {batch[index]!r} next")
        assert index == 0 or e.seq == last_seq + 1, f"{context}: batch split at seq {e.seq}"
        cursor[(rnd, t)] = (step + 1, 0, e.seq) if index + 1 == len(batch) else (
            step, index + 1, e.seq)
    partial = {k: v for k, v in cursor.items() if v[1] != 0}
    assert not partial, f"{context}: append_many batches only partly present: {partial}"
    for seq, (eid, digest) in sorted(acked.items()):
        assert seq < len(entries), (f"{context}: acknowledged append {eid} at seq {seq} is "
                                    f"lost: the ledger has {len(entries)} records")
        e = entries[seq]
        assert (child_ident(e.event), event_digest(e.event_bytes)) == (eid, digest), (
            f"{context}: seq {seq} was acknowledged as {eid} but holds {e.event!r}")


@dataclass
class Stats:
    landed: dict[str, int] = field(default_factory=dict)
    torn: list[str] = field(default_factory=list)
    unacked_durable_rounds: int = 0
    unacked_durable_records: int = 0
    deferred: int = 0
    child_recovered: int = 0
    acked: int = 0
    child_snapshots: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, started: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


def check_after_crash(directory: Path, keys: NodeKeys, options: Options,
                      acked: dict[int, tuple[str, str]], context: str,
                      stats: Stats) -> tuple[int, list[Entry]]:
    """Open (recovering), verify, compare with what was acknowledged; return size, entries."""
    started = time.perf_counter()
    ledger = Ledger.open(directory, keys, options=options)
    stats.timed("open", started)
    try:
        if ledger.recovered is not None:
            stats.torn.append(ledger.recovered.describe())
        started = time.perf_counter()
        report = audit.verify(directory)
        stats.timed("verify", started)
        assert report.records == ledger.size, context
        started = time.perf_counter()
        entries = list(LogReader(directory).entries())
        assert len(entries) == ledger.size, context
        check_log(entries, acked, context)
        # Open started from a snapshot (when there is one): its state must equal a replay.
        replay = fold((e.seq, e.ts_ns, e.event, e.signature) for e in entries)
        assert ledger.state.to_obj() == replay.to_obj(), f"{context}: state differs from replay"
        stats.timed("check", started)
        return ledger.size, entries
    finally:
        ledger.close()


# ----------------------------------------------------------------------------- the crash test
@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    keys = NodeKeys.generate()
    keys.save(state_dir)
    ledger_dir = state_dir / "ledger"
    options = Options(segment_bytes=SEGMENT_BYTES, set_append_only_flag=False,
                      snapshot_every=SNAPSHOT_EVERY)
    Ledger.create(ledger_dir, keys, ORIGIN, options=options).close()

    # Where to aim each kill: a few during interpreter start-up, some inside
    # Ledger.open, the rest while the threads append.
    modes = ["startup"] * 3 + ["open"] * 9 + ["appending"] * (ROUNDS - 12)
    rng.shuffle(modes)
    acked: dict[int, tuple[str, str]] = {}
    stats = Stats()
    size, open_estimate = 1, 0.01
    started_all = time.perf_counter()
    for rnd, mode in enumerate(modes):
        snapshot_at = rng.randrange(4) if rng.random() < 0.3 else -1
        short = rng.random() < 0.85
        delay = rng.random()
        deferred = rng.random() < 0.2
        context = f"round {rnd} (aimed at {mode}; PPN_CRASH_SEED={SEED})"

        started = time.perf_counter()
        child = Child([str(ledger_dir), str(state_dir), str(rnd), str(THREADS),
                       str(SEGMENT_BYTES), str(SNAPSHOT_EVERY), str(snapshot_at)],
                      tmp_path / f"child-{rnd}.stderr")
        try:
            if mode == "startup":
                time.sleep(0.05 * delay)
            elif mode == "open":
                child.wait_for(b"opening")
                time.sleep(open_estimate * delay)
            else:
                child.wait_for(b"opened")
                time.sleep(0.02 * delay if short else 0.02 + 0.06 * delay)
        finally:
            rc = child.kill()
        stats.timed("child", started)
        rep = parse_reports(child.lines, context)
        assert rc == -signal.SIGKILL, f"{context}: child exited {rc}: {child.stderr()}"
        stats.landed[rep.landed] = stats.landed.get(rep.landed, 0) + 1
        stats.child_snapshots += len(rep.snapshots)
        if rep.opened_size is not None:
            # Nothing committed may vanish between our last check and the child's open.
            assert rep.opened_size == size, f"{context}: child opened {rep.opened_size} records"
            open_estimate = max(rep.open_seconds, 0.001)
        for seq, ack in rep.acks.items():
            assert acked.setdefault(seq, ack) == ack, (
                f"{context}: seq {seq} acknowledged twice: {acked[seq]} and {ack}")
        stats.acked += len(rep.acks)

        target = ledger_dir
        if deferred:
            # Check a byte-identical copy and leave the crashed directory as it is, so
            # the next child has to recover it itself (and may be killed doing so).
            stats.deferred += 1
            target = tmp_path / "copy"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ledger_dir, target)
        torn_before = len(stats.torn)
        size, entries = check_after_crash(target, keys, options, acked, context, stats)
        if deferred and len(stats.torn) > torn_before:
            stats.child_recovered += 1
        unacked = sum(1 for e in entries[1:] if e.seq not in rep.acks
                      and child_ident(e.event).startswith(f"r{rnd}-"))
        if unacked:
            stats.unacked_durable_rounds += 1
            stats.unacked_durable_records += unacked

    # The crashed ledger is still an ordinary, writable ledger.
    with Ledger.open(ledger_dir, keys, options=options) as ledger:
        receipt = ledger.append(PdDeclared(name="after-the-crashes", priority=1))
        assert receipt.seq == ledger.size - 1
    final = audit.verify(ledger_dir)
    assert final.records == receipt.seq + 1
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in stats.seconds.items())
    print(f"\ncrash test: {ROUNDS} rounds, seed {SEED}, "
          f"{time.perf_counter() - started_all:.1f}s ({phases}); kills landed: "
          f"{stats.landed}; {stats.acked} appends acknowledged, {final.records} records, "
          f"{final.segments} segments, {final.snapshots} snapshots "
          f"({stats.child_snapshots} written by children); torn tails truncated on open: "
          f"{len(stats.torn)}; rounds with durable but unacknowledged records (kill "
          f"between write and report): {stats.unacked_durable_rounds} "
          f"({stats.unacked_durable_records} records); recovery left to the next child: "
          f"{stats.deferred} rounds ({stats.child_recovered} with a torn tail)")
    for line in stats.torn:
        print(f"  torn tail: {line}")


# ----------------------------------------------------------------------------- fabricated tails
OPTIONS = Options(segment_bytes=4096, set_append_only_flag=False)


def _frames(path: Path) -> list[tuple[int, int, int]]:
    """(offset, kind, length) of every frame of a well-formed segment file."""
    data = path.read_bytes()
    out, off = [], SEGMENT_HEADER.size
    while off < len(data):
        length = FRAME_HEADER.unpack_from(data, off)[0]
        out.append((off, data[off + 8], length))
        off += 8 + length
    assert off == len(data)
    return out


def _build(tmp_path: Path) -> tuple[Path, NodeKeys, list[Entry]]:
    """A closed ledger of several segments whose last segment holds a few batches."""
    keys = NodeKeys.generate()
    directory = tmp_path / "ledger"
    with Ledger.create(directory, keys, ORIGIN, options=OPTIONS) as ledger:
        i = 0
        while len(list_segments(directory)) < 3:
            ledger.append(PdDeclared(name=f"pd-{i}", priority=i))
            i += 1
        ledger.append_many([PdDeclared(name=f"batch-{j}", priority=j) for j in range(4)])
        ledger.append(CapGranted(cap_id=7, holder="pd-a", obj="ep", rights=("read",),
                                 badge=None, parent=None, via="mint"))
        ledger.append(PdDeclared(name="last", priority=0))
    segments = list_segments(directory)
    kinds = [k for _, k, _ in _frames(segments[-1][1])]
    assert len(segments) == 3 and kinds.count(KIND_CHECKPOINT) == 3, kinds
    audit.verify(directory)
    return directory, keys, list(LogReader(directory).entries())


def _record_frame(entries: list[Entry], n: int = 0) -> bytes:
    """A well-formed record frame continuing the chain: what a crash leaves uncommitted."""
    seq, prev, ts = len(entries), entries[-1].leaf, entries[-1].ts_ns
    out = b""
    for k in range(n + 1):
        event = REGISTRY.encode(PdDeclared(name=f"uncommitted-{k}", priority=k))
        body = Record(seq + k, ts + 1, prev, event, None).body()
        prev = hashlib.sha256(b"\x00" + body).digest()
        out += frame(KIND_RECORD, body)
    return out


def _torn_bytes(case: str, entries: list[Entry]) -> tuple[bytes, int, str]:
    """(bytes a crash left after the last checkpoint, complete records in them, reason)."""
    rec = _record_frame(entries)
    if case == "garbage":
        return b"\xff" * 37, 0, "out of range"
    if case == "stray-bytes":
        return rec[:5], 0, "stray bytes"
    if case == "partial-frame":
        return rec[:len(rec) // 2], 0, "runs past the end"
    if case == "record-without-checkpoint":
        return rec, 1, "records after the last checkpoint"
    if case == "records-and-partial-checkpoint":
        note = frame(KIND_CHECKPOINT, ORIGIN.encode() + b"\n2\n" + b"A" * 150)
        return _record_frame(entries, 1) + note[:-40], 2, "runs past the end"
    if case == "record-with-bad-checksum":
        return rec[:-1] + bytes((rec[-1] ^ 0x01,)), 0, "checksum mismatch"
    if case.endswith("-then-reserved-space"):  # torn inside space reserved ahead of writes
        torn, records, reason = _torn_bytes(case.removesuffix("-then-reserved-space"), entries)
        return torn + bytes(4096), records, reason
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "garbage", "stray-bytes", "partial-frame", "record-without-checkpoint",
    "records-and-partial-checkpoint", "record-with-bad-checksum",
    "partial-frame-then-reserved-space", "record-without-checkpoint-then-reserved-space",
    "record-with-bad-checksum-then-reserved-space", "stray-bytes-then-reserved-space",
    "empty-new-segment", "partial-new-segment-header",
])
def test_torn_tail_is_truncated(tmp_path: Path, case: str) -> None:
    directory, keys, entries = _build(tmp_path)
    size = len(entries)
    last = list_segments(directory)[-1][1]
    if case.endswith("new-segment") or case.endswith("new-segment-header"):
        # A crash inside a segment roll: the old segment sealed, the new one torn.
        torn = segment_header(size)[:11] if case.startswith("partial") else b""
        records, reason = 0, "torn segment header"
        last.chmod(0o444)
        segment, base = directory / segment_name(size), 0
        segment.write_bytes(torn)
    else:
        torn, records, reason = _torn_bytes(case, entries)
        segment, base = last, last.stat().st_size
        with segment.open("ab") as f:
            f.write(torn)

    # The auditor reports what is on disk: an uncommitted tail is a failure.
    with pytest.raises(LedgerCorrupt, match="uncommitted tail") as err:
        audit.verify(directory)
    assert (err.value.segment, err.value.offset, err.value.seq) == (segment.name, base, size)
    assert reason in err.value.reason

    # Opening for writing truncates exactly the tail and says so.
    with Ledger.open(directory, keys, options=OPTIONS) as ledger:
        tail = ledger.recovered
        assert tail is not None
        assert (tail.segment, tail.offset, tail.dropped_bytes, tail.dropped_records) == (
            segment, base, len(torn), records)
        assert reason in tail.reason and reason in tail.describe()
        assert ledger.size == size
    assert segment.stat().st_size == (base or SEGMENT_HEADER.size)

    # Nothing committed was touched; the ledger verifies and takes appends again.
    assert audit.verify(directory).records == size
    after = list(LogReader(directory).entries())
    assert [(e.seq, e.body) for e in after] == [(e.seq, e.body) for e in entries]
    with Ledger.open(directory, keys, options=OPTIONS) as ledger:
        assert ledger.recovered is None
        assert ledger.append(PdDeclared(name="after-recovery", priority=1)).seq == size
    assert audit.verify(directory).records == size + 1


# ----------------------------------------------------------------------------- damaged middle
def _flip(path: Path, offset: int) -> None:
    """Damage one byte in place (a sealed segment is made writable just for that)."""
    mode = path.stat().st_mode
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes((byte[0] ^ 0x40,)))
    path.chmod(mode)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["sealed-segment", "active-segment"])
def test_damaged_committed_record_is_never_truncated(tmp_path: Path, where: str) -> None:
    directory, keys, entries = _build(tmp_path)
    segments = list_segments(directory)
    first_seq, path = segments[0] if where == "sealed-segment" else segments[-1]
    frames = _frames(path)
    records = [f for f in frames if f[1] == KIND_RECORD]
    # A record in the middle of the segment, with committed batches after it.
    index = len(records) // 2 if where == "sealed-segment" else 1
    offset, _, length = records[index]
    seq = first_seq + index
    assert entries[seq].seq == seq and offset < frames[-1][0]
    _flip(path, offset + 8 + length // 2)
    before = _files(directory)

    with pytest.raises(LedgerCorrupt) as err:
        Ledger.open(directory, keys, options=OPTIONS)
    assert (err.value.segment, err.value.offset, err.value.seq) == (path.name, offset, seq)
    assert "checksum" in err.value.reason
    assert f"{path.name} offset {offset} (seq {seq})" in str(err.value)
    assert _files(directory) == before, "open changed a damaged ledger"

    with pytest.raises(LedgerCorrupt) as audited:
        audit.verify(directory)
    assert (audited.value.segment, audited.value.offset, audited.value.seq) == (
        path.name, offset, seq)
    assert _files(directory) == before


def test_damaged_last_checkpoint_after_clean_close_is_not_truncated(tmp_path: Path) -> None:
    """The final checkpoint looks like a torn write, but the anchor written at close
    proves it was committed: open must refuse rather than drop the last batch."""
    directory, keys, _entries = _build(tmp_path)
    path = list_segments(directory)[-1][1]
    offset, kind, length = _frames(path)[-1]
    assert kind == KIND_CHECKPOINT
    _flip(path, offset + 8 + length // 2)
    before = _files(directory)

    # Changed bytes, not zeros: not what a torn write leaves, so damage, refused as such
    # (before the anchor, which would refuse it too, is even looked at).
    with pytest.raises(LedgerCorrupt, match="checksum") as err:
        Ledger.open(directory, keys, options=OPTIONS)
    assert err.value.segment == path.name and err.value.offset == offset
    assert _files(directory) == before
    with pytest.raises(LedgerCorrupt):
        audit.verify(directory)
