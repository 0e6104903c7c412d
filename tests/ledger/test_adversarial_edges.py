"""An adversarial review of the ledger's edges (issue 7), tried as an auditor and an
attacker would.  Each test states one break (or one defence that held and is worth
guarding); the ones marked BREAK fail on the code they were written against.

BREAK  damage to an earlier batch's checkpoint is taken for a "damaged last batch", so
       ``recover --drop-last-batch`` drops acknowledged batches that are not the last
BREAK  the same over the genesis batch: ``ppn ledger recover`` dies with AssertionError
BREAK  a stray empty ``seg-N.log`` named past the log is adopted as a torn segment header;
       the next append lands in it and the ledger never opens again
BREAK  a segment that shrinks under a reader (a node truncating a torn tail while an
       auditor reads) makes the reader spin forever
BREAK  ``verify`` of a live ledger whose membership changes fails on nodes.jsonl
BREAK  a FIFO named as a key file hangs ``ppn ledger recover`` and ``ppn node run``
BREAK  ``recover`` lets go of the directory lock before it records its decision
BREAK  a second recovery at the same offset overwrites the bytes the first one kept
BREAK  a zeroed genesis frame header in a committed ledger reads as "not initialised"
BREAK  the search for a checkpoint after damage reads a frame of any declared length whole
BREAK  a fake checkpoint frame inside an event turns a damaged last batch into corruption
       that recover refuses (a denial of the recovery path)
HELD   a fake checkpoint frame cannot make damage in an earlier batch recoverable
HELD   the anchor kept live never goes back, never vanishes, is always the log's own
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from helpers import (
    QUIET,
    damaged_last_batch,
    flip,
    frames,
    member,
    new_ledger,
    ppn,
    python,
    sample_events,
    segments,
    zero,
)

from ledger import audit, recover, scan
from ledger.catalog import PdDeclared
from ledger.errors import LedgerUsageError
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options, lock_directory, read_anchor
from ledger.note import Checkpoint
from ledger.records import FRAME_HEADER, KIND_CHECKPOINT, KIND_RECORD
from ledger.scan import DamagedLastBatch, LedgerCorrupt, LedgerNotInitialised, LogReader

ORIGIN = "test-node.ppn/ledger"


# ------------------------------------------------ 1. recover drops more than the last batch

@pytest.mark.parametrize("damaged", [1, 9])
def test_damage_to_earlier_checkpoints_is_not_a_damaged_last_batch(tmp_path: Path,
                                                                   damaged: int) -> None:
    """BREAK.  One flipped bit in each of the ``damaged`` checkpoints before the last.
    Every batch before the last was fsync'd before the next one was written, so it was
    acknowledged: no torn write explains damage to it.  Today the reader calls it a
    "damaged last batch" (``records`` = all of those batches) and recover drops them all.

    Root cause: LogReader._bad_frame takes the first intact checkpoint after the damage
    and, if it ends the segment, calls everything from the last good checkpoint on "the
    last batch" -- without looking for the (damaged) checkpoint frames in between.
    """
    d = tmp_path / "l"
    led, keys = new_ledger(d, options=QUIET)
    for _ in range(20):
        led.append_many(list(sample_events(3)))
    size = led.size
    led.close()
    last = segments(d)[-1]
    cps = [f for f in frames(last) if f[1] == KIND_CHECKPOINT]
    for off, _, length in cps[-1 - damaged:-1]:
        flip(last, off + 8 + length - 5)  # inside the signature's base64: checksum fails
    before = last.read_bytes()
    problems = []
    try:
        LogReader(d).run()
    except DamagedLastBatch as exc:
        if exc.records != 3:
            problems.append(f"called a damaged last batch of {exc.records} records (the last "
                            f"batch holds 3; {damaged} acknowledged batches before it counted in)")
    except LedgerCorrupt:
        pass
    else:
        pytest.fail("damage went unnoticed")
    try:
        recover.drop_last_batch(d, keys)
    except LedgerUsageError:
        assert last.read_bytes() == before
    else:
        kept = audit.verify(d, jobs=1).records - 1  # less the ledger.recovered event
        if kept != size - 3:
            problems.append(f"recover --drop-last-batch kept {kept} of {size} records: it "
                            f"dropped {size - kept}; the last batch held 3")
    assert not problems, "; ".join(problems)


def test_recover_over_a_damaged_genesis_batch_is_a_clear_refusal(tmp_path: Path) -> None:
    """BREAK.  A node just initialised (genesis batch + the init batch), one flipped bit in
    the genesis checkpoint.  ``verify`` calls it a damaged last batch of 35 records "from
    seq 0" and suggests recover; ``ppn ledger recover`` then dies with "internal error ...
    AssertionError" (exit 2): recover._anchor_size -> note_checkpoint asserts
    scan.genesis, which is None because no checkpoint committed the genesis.  Had it gone
    on, it would have cut the segment to its header (every record) and left a ledger that
    is "not initialised" with an anchor that vouches for 35 records."""
    state = tmp_path / "n"
    r = ppn("node", "init", "--state-dir", str(state), "--name", "n1")
    assert r.returncode == 0, r.stderr
    seg = state / "ledger" / scan.segment_name(0)
    off, kind, length = frames(seg)[1]
    assert kind == KIND_CHECKPOINT
    flip(seg, off + 8 + length - 5)
    before = seg.read_bytes()
    r = ppn("ledger", "recover", str(state / "ledger"), "--drop-last-batch")
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert seg.read_bytes() == before


# ------------------------------------------------ 2. a stray file adopted as the log's end

def test_a_stray_empty_segment_named_past_the_log_is_not_adopted(tmp_path: Path) -> None:
    """BREAK.  An empty ``seg-00000000000000000500.log`` beside an 11-record log.  Open
    takes it for a roll torn before its header was written (scan.py _segment's torn-header
    branch checks ``res.count > 0 or first == 0`` but never ``first == res.count``), writes
    a header saying 500 into it and appends there.  The append is acknowledged; the next
    open refuses ("segment starts at seq 500 ... expected 11"), for good."""
    d = tmp_path / "l"
    led, keys = new_ledger(d, options=QUIET)
    led.append_many(list(sample_events(10)))
    led.close()
    stray = d / scan.segment_name(500)
    stray.write_bytes(b"")
    try:
        led = Ledger.open(d, keys, options=QUIET)
    except LedgerCorrupt:
        assert stray.read_bytes() == b""
        return
    receipt = led.append(PdDeclared("after", 1))
    led.close()
    try:
        with Ledger.open(d, keys, options=QUIET) as again:
            assert again.size == receipt.seq + 1
    except LedgerCorrupt as exc:
        pytest.fail(f"an acknowledged append made the ledger unopenable: {exc}")


# ------------------------------------------------ 3. a reader spins on a shrinking segment

def test_a_reader_does_not_spin_when_its_segment_shrinks(tmp_path: Path) -> None:
    """BREAK (a hang).  An auditor reads a ledger with a torn tail while the node starts
    and truncates that tail.  The reader fixed the segment's end when it opened it; every
    later pread returns short (or nothing) and scan.py _segment loops forever: ``more`` is
    computed against the stale ``seg.end``, the frame "goes on past this read", and the
    same read is made again.  Any segment larger than READ_CHUNK (the default segment is
    64 MiB, READ_CHUNK 16 MiB) has the window; READ_CHUNK is made small to hit it.
    (_checkpoint_after has the same flaw: an empty block moves ``pos`` backwards.)"""
    r = python("""
        import os, sys
        from pathlib import Path
        from helpers import new_ledger, sample_events, segments
        from ledger import scan
        from ledger.log import Ledger, Options
        from ledger.records import FRAME_HEADER
        from ledger.scan import LedgerCorrupt, LogReader
        d = Path(sys.argv[1])
        opts = Options(set_append_only_flag=False)
        led, keys = new_ledger(d, options=opts)
        events = list(sample_events(200))
        for i in range(0, 200, 10):
            led.append_many(events[i:i + 10])
        led.close()
        with open(segments(d)[-1], "ab") as f:  # a batch torn by a crash
            f.write(FRAME_HEADER.pack(5000, 0) + bytes(1) + os.urandom(2000))
        scan.READ_CHUNK = 4096
        it = LogReader(d).entries()
        next(it)
        Ledger.open(d, keys, options=opts).close()  # the node starts: the tail is cut
        try:
            print("read", sum(1 for _ in it) + 1)
        except LedgerCorrupt as exc:
            print("refused", exc)
        """, str(tmp_path / "l"), timeout=10)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------ 4. live verify and nodes.jsonl

def test_verify_of_a_live_ledger_whose_membership_changes(tmp_path: Path) -> None:
    """BREAK (false failure).  A writer adds members while ``verify`` runs, as the issue's
    "live readers" promise allows.  verify folds the log up to the lengths it fixed at its
    start, then reads nodes.jsonl as it is *now*: written by the writer after each
    commit, it is ahead of the pass (or, between fdatasync and the rewrite, behind it), so
    verify reports "nodes.jsonl line N does not match the log" or "larger than ... the
    most nodes.jsonl of this log can be" over a sound ledger.  (audit._verify_nodes;
    pre-existing, but the same class as the anchor race fixed in 6260f52.)"""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=QUIET)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            led.append(member(i))
            i += 1
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    failures: list[str] = []
    runs = 0
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            try:
                audit.verify(d, jobs=1)
            except LedgerCorrupt as exc:
                failures.append(str(exc))
            runs += 1
    finally:
        stop.set()
        t.join(10)
        led.close()
    assert audit.verify(d, jobs=1).records == led.size  # the ledger is sound
    assert not failures, f"{len(failures)} of {runs} live verifies failed: {failures[0]}"


# ------------------------------------------------ 5. key files that are not regular files

@pytest.mark.parametrize("command", ["recover", "node run"])
def test_a_fifo_key_file_does_not_hang_the_cli(tmp_path: Path, command: str) -> None:
    """BREAK (a hang).  keys._read_secret does stat() then read_text(): a FIFO of mode 0600
    named ``node.key`` passes the mode and size checks and then the read waits for a writer
    forever.  ``ppn node run`` even shrugs off SIGTERM there (its handler only sets an
    event; the read is retried).  Open it the way ledger.files.open_regular does."""
    state = tmp_path / "n"
    state.mkdir(mode=0o700)
    led, keys = new_ledger(state / "ledger", options=QUIET)
    led.close()
    keys.save(state)
    (state / "node.key").unlink()
    os.mkfifo(state / "node.key", 0o600)
    args = (["ledger", "recover", str(state / "ledger"), "--drop-last-batch"]
            if command == "recover" else ["node", "run", "--state-dir", str(state)])
    r = ppn(*args, timeout=8)
    assert r.returncode == 1 and "node.key" in r.stderr, (r.returncode, r.stderr)


# ------------------------------------------------ 6. recover and the directory lock

def test_recover_holds_the_lock_until_its_decision_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BREAK (a race).  drop_last_batch truncates under the directory lock, closes the lock,
    then Ledger.open()s to append the ``ledger.recovered`` event.  In between, a node
    starting on the directory gets the lock: it opens the truncated log (no trace of the
    decision), and recover fails after having cut the segment.  The probe below takes
    the lock at exactly that moment."""
    d = tmp_path / "l"
    keys, _, _ = damaged_last_batch(d, options=QUIET)
    real_open = Ledger.open
    seen: list[str] = []

    real_holding = Ledger.open_holding

    def probe(directory: Path) -> None:
        try:
            fd = lock_directory(directory)
        except LedgerUsageError:
            seen.append("held")
        else:
            os.close(fd)
            seen.append("free: another process could have opened the cut log")

    class Probe:
        @staticmethod
        def open(directory: Path, keys: NodeKeys, **kw: object) -> Ledger:
            probe(directory)
            return real_open(directory, keys, **kw)  # type: ignore[arg-type]

        @staticmethod
        def open_holding(lock_fd: int, directory: Path, keys: NodeKeys,
                         **kw: object) -> Ledger:
            probe(directory)
            return real_holding(lock_fd, directory, keys, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(recover, "Ledger", Probe)
    recover.drop_last_batch(d, keys)
    assert seen and not [s for s in seen if s.startswith("free")], seen


def test_a_second_recovery_keeps_what_the_first_kept(tmp_path: Path) -> None:
    """BREAK.  After a recovery the ``ledger.recovered`` batch starts where the dropped batch
    did; if that batch is damaged in turn, the second recovery writes
    ``dropped/<segment>@<same offset>.bin`` with O_TRUNC and destroys the first one's
    evidence (whose SHA-256 the first event recorded).  Without root, the file is 0444 and
    the second recovery fails with a permission error instead.  Use O_EXCL and a unique
    name."""
    d = tmp_path / "l"
    keys, _, _ = damaged_last_batch(d, options=QUIET)
    first = recover.drop_last_batch(d, keys)
    last = segments(d)[-1]
    off, kind, _ = [f for f in frames(last) if f[1] == KIND_RECORD][-1]
    assert off == first.offset and kind == KIND_RECORD
    zero(last, off, 8)  # its frame header: what a torn write leaves, not garbage
    with pytest.raises(DamagedLastBatch):
        LogReader(d).run()
    try:
        second = recover.drop_last_batch(d, keys)
    except OSError as exc:
        pytest.fail(f"the second recovery failed: {exc}")
    kept = (d / first.kept_as).read_bytes()
    assert hashlib.sha256(kept).digest() == first.dropped_sha256, (
        f"{first.kept_as} no longer holds what the first recovery dropped "
        f"(second kept as {second.kept_as})")


# ------------------------------------------------ 7. "not initialised" over a committed log

def test_a_zeroed_genesis_frame_header_is_not_an_uncommitted_creation(tmp_path: Path) -> None:
    """BREAK.  Eight zero bytes over the genesis frame's header of a one-segment ledger with
    21 committed batches.  "Frame length 0" counts as a torn write; _checkpoint_after
    returns None when no genesis was read (it has no origin to search for), so the whole
    segment is a torn tail and _batches says LedgerNotInitialised: "the ledger's creation
    never committed; `ppn node init` can redo it" -- and init's redo is an rmtree of the
    ledger directory (stopped only if an anchor or snapshot happens to be there)."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=QUIET)
    for _ in range(20):
        led.append_many(list(sample_events(3)))
    led.close()
    seg = segments(d)[0]
    with open(seg, "r+b") as f:
        f.seek(20)
        f.write(bytes(8))
    with pytest.raises(LedgerCorrupt) as err:
        LogReader(d).run()
    assert not isinstance(err.value, LedgerNotInitialised), str(err.value)


# ------------------------------------------------ 8. bounded reads after damage

def _fake_frame(length: int, crc: int, body: bytes = b"") -> str:
    """A frame header and a checkpoint marker, as text a PD name may hold."""
    text = (FRAME_HEADER.pack(length, crc) + bytes((KIND_CHECKPOINT,)) + ORIGIN.encode()
            + b"\n" + body).decode("utf-8")
    return text


def test_the_search_for_a_checkpoint_after_damage_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BREAK (memory).  LogReader._checkpoint_after finds the marker ``C<origin>\\n`` and
    reads the frame its 8 preceding bytes declare, of any length up to the segment's end,
    before checking its checksum: an event holding those bytes (a PD name) makes a pass
    over a damaged segment hold ~16 MiB (up to the 2 GiB format limit) whatever READ_CHUNK
    is.  Refuse a length above MAX_FRAME (a checkpoint note is far smaller) first."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(segment_bytes=64 << 20, set_append_only_flag=False,
                                          anchor_every_batches=0, anchor_every_seconds=0))
    big = [PdDeclared("p" * 60_000, i) for i in range(300)]  # ~18 MB after the fake
    led.append_many([PdDeclared("first", 0), PdDeclared(_fake_frame(0x01010101, 0x01010101), 1),
                     *big[:150]])
    led.append_many(big[150:])
    led.close()
    last = segments(d)[-1]
    off, _, length = [f for f in frames(last) if f[1] == KIND_RECORD][1]  # "first"
    flip(last, off + 8 + length // 2)
    monkeypatch.setattr(scan, "READ_CHUNK", 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(LedgerCorrupt):
            LogReader(d, verify=False).run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"a pass over a damaged 18 MB segment peaked at {peak} bytes"


# ------------------------------------------------ 9. fake checkpoint frames in events

def _valid_fake_frame() -> str:
    """A complete checkpoint frame (valid checksum) that is valid UTF-8 text."""
    for i in range(100_000):
        body = bytes((KIND_CHECKPOINT,)) + ORIGIN.encode() + f"\n{i}\n".encode()
        crc = zlib.crc32(body)
        try:
            return (FRAME_HEADER.pack(len(body), crc) + body).decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("no text-safe checksum found")


def _ledger_with_fake(d: Path, later_batches: int = 0, fake: bool = True
                      ) -> tuple[NodeKeys, int]:
    """A batch of: a record (then damaged), a PD name holding a valid fake checkpoint
    frame (or, without ``fake``, plain text as long), five more records; then
    ``later_batches`` more batches."""
    led, keys = new_ledger(d, options=QUIET)
    led.append_many(list(sample_events(10)))
    start = led.size
    name = _valid_fake_frame()
    led.append_many([PdDeclared("victim", 0), PdDeclared(name if fake else "n" * len(name), 1),
                     *[PdDeclared(f"pd-{i}", i) for i in range(5)]])
    for i in range(later_batches):
        led.append_many([PdDeclared(f"later-{i}", i)])
    led.close()
    last = segments(d)[-1]
    off, _, _ = [f for f in frames(last) if f[1] == KIND_RECORD][start]
    zero(last, off, 8)  # the victim's frame header, as a torn write leaves it
    return keys, start


@pytest.mark.parametrize("fake", [False, True], ids=["control", "fake"])
def test_a_fake_checkpoint_in_an_event_only_ever_makes_damage_look_worse(
        tmp_path: Path, fake: bool) -> None:
    """The last batch: a record damaged as a torn write leaves it, then a PD name that
    holds a complete checkpoint frame with a valid checksum, then the batch's own intact
    checkpoint.  Without the fake this is DamagedLastBatch (recover may drop it).  With
    it there are two checkpoint frames after the damage, which is what a damaged
    earlier (acknowledged) batch looks like: the reader errs on the safe side, refusing
    and offering no drop; the ledger is left as it is for an operator to restore.  (A
    fake can deny the recovery path, never widen it: see the next test.)"""
    d = tmp_path / "l"
    keys, start = _ledger_with_fake(d, fake=fake)
    if not fake:
        with pytest.raises(DamagedLastBatch) as err:
            LogReader(d).run()
        assert err.value.seq == start
        return
    last = segments(d)[-1]
    before = last.read_bytes()
    with pytest.raises(LedgerCorrupt) as refused:
        LogReader(d).run()
    assert not isinstance(refused.value, DamagedLastBatch)
    with pytest.raises(LedgerUsageError, match="not a damaged last batch"):
        recover.drop_last_batch(d, keys)
    assert last.read_bytes() == before


def test_a_fake_checkpoint_cannot_make_earlier_damage_recoverable(tmp_path: Path) -> None:
    """HELD.  The same fake frame in a batch followed by more batches, damage before it:
    it ends inside its record, never at the segment's end, and a fake that reached the
    end would need a checksum over the real checkpoint's signature, so the damage stays
    LedgerCorrupt and recover refuses it."""
    d = tmp_path / "l"
    keys, _ = _ledger_with_fake(d, later_batches=3)
    last = segments(d)[-1]
    before = last.read_bytes()
    with pytest.raises(LedgerCorrupt) as err:
        LogReader(d).run()
    assert not isinstance(err.value, DamagedLastBatch)
    with pytest.raises(LedgerCorrupt):
        Ledger.open(d, keys, options=QUIET)
    with pytest.raises(LedgerUsageError, match="not a damaged last batch"):
        recover.drop_last_batch(d, keys)
    assert last.read_bytes() == before


# ------------------------------------------------ 10. the anchor keeper (held)

def test_the_kept_anchor_never_goes_back_and_is_always_the_logs_own(tmp_path: Path) -> None:
    """HELD.  The keeper refreshing every 3 batches (or 1 ms), segments rolling every few
    dozen records (each roll writes the anchor from the committing thread), a reader
    sampling the anchor throughout, then close.  Once it exists the anchor is never
    missing or torn, its size never goes back, every note it held is a checkpoint the
    log extends, and after close it is the last one."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, segment_bytes=5000,
                                          anchor_every_batches=3, anchor_every_seconds=0.001))
    stop = threading.Event()
    keeper = threading.Thread(target=led.keep_anchor, args=(stop,), daemon=True)
    keeper.start()
    seen: dict[int, bytes] = {}
    order: list[int] = []
    problems: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            try:
                note = read_anchor(d)
            except LedgerCorrupt as exc:
                problems.append(str(exc))
                continue
            if note is None:
                if order:
                    problems.append("the anchor went missing")
                continue
            size = Checkpoint.parse(note[:note.rfind(b"\n\n") + 1]).size
            if not order or order[-1] != size:
                order.append(size)
            seen[size] = note
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for i in range(800):
            led.append(PdDeclared(f"p{i}", i))
    finally:
        stop.set()
        led.wake_anchor_keeper()
        keeper.join(10)
        sampler.join(10)
        led.close()
    assert not problems, problems[:3]
    assert order == sorted(order) and len(order) > 10, order[:20]
    assert read_anchor(d) == audit.checkpoint_note(d)
    kept = [(f"anchor@{n}", seen[n]) for n in order[::max(1, len(order) // 20)]]
    assert len(audit.verify(d, jobs=1, against=kept).extends) == len(kept)
