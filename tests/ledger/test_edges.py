"""The ledger's edges (an audit's findings): creation that never committed, huge and
special files, a damaged last batch and its recovery, leftovers, bounded reads."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    NO_FLAG,
    counting_clock,
    damaged_last_batch,
    frames,
    new_ledger,
    sample_events,
    segments,
    unseal_all,
)

from ledger import audit, recover, scan
from ledger.catalog import REGISTRY, LedgerGenesis, LedgerRecovered, PdDeclared
from ledger.errors import LedgerUsageError
from ledger.keys import NodeKeys
from ledger.log import ANCHOR_FILE, Ledger, Options, read_anchor
from ledger.nodes import NODES_FILE
from ledger.records import (
    KIND_CHECKPOINT,
    KIND_RECORD,
    ZERO_HASH,
    Record,
    frame,
    segment_header,
)
from ledger.scan import DamagedLastBatch, LedgerCorrupt, LedgerNotInitialised, LogReader
from ledger.snapshot import SNAPSHOT_DIR

ORIGIN = "test-node.ppn/ledger"




def in_time(fn: Callable[[], Any], seconds: float = 30.0) -> Any:
    """Run ``fn`` in a thread; fail (not hang) if it takes longer than ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------ creation that never committed

def torn_create(directory: Path, keys: NodeKeys, cut: int | None = None) -> Path:
    """What a Ledger.create torn by power loss leaves: seg-0 with the genesis record but
    not its checkpoint (or only the first ``cut`` bytes of the record)."""
    directory.mkdir(parents=True)
    body = Record(0, 1_700_000_000_000_000_000, ZERO_HASH,
                  REGISTRY.encode(LedgerGenesis(ORIGIN, keys.public_key, 1)), None).body()
    data = segment_header(0) + frame(KIND_RECORD, body)
    path = directory / scan.segment_name(0)
    path.write_bytes(data if cut is None else data[:cut])
    return path


@pytest.mark.parametrize("cut", [None, 40, 20, 7])
def test_a_creation_that_never_committed_is_not_initialised(tmp_path: Path,
                                                            cut: int | None) -> None:
    keys = NodeKeys.generate()
    d = tmp_path / "l"
    path = torn_create(d, keys, cut)
    before = path.read_bytes()
    for read in (lambda: LogReader(d).run(), lambda: list(audit.entries(d)),
                 lambda: audit.state_at(d), lambda: audit.public_verifier_key(d),
                 lambda: audit.checkpoint_note(d), lambda: audit.verify(d, jobs=1)):
        with pytest.raises(LedgerNotInitialised, match="not initialised"):
            read()
    with pytest.raises(LedgerNotInitialised):
        Ledger.open(d, keys, options=NO_FLAG)
    assert path.read_bytes() == before, "open must not truncate the genesis away"


def test_a_committed_genesis_alone_is_a_ledger(tmp_path: Path) -> None:
    """Control: the same segment with its checkpoint is a sound one-record ledger."""
    led, _ = new_ledger(tmp_path / "l")
    led.close()
    assert audit.verify(tmp_path / "l").records == 1


def test_not_initialised_only_for_a_lone_first_segment(tmp_path: Path) -> None:
    led, _keys = new_ledger(tmp_path / "l", options=Options(segment_bytes=600,
                                                          set_append_only_flag=False))
    led.append_many(list(sample_events(30)))
    led.close()
    unseal_all(tmp_path / "l")
    first = segments(tmp_path / "l")[0]
    offset, kind, length = frames(first)[1]  # the genesis batch's checkpoint
    assert kind == KIND_CHECKPOINT
    with open(first, "r+b") as f:
        f.seek(offset + 8 + length // 2)
        f.write(b"\xff")
    with pytest.raises(LedgerCorrupt) as err:
        LogReader(tmp_path / "l").run()
    assert not isinstance(err.value, LedgerNotInitialised)


# ------------------------------------------------------------ huge files

def test_huge_sparse_last_segment_is_read_by_its_written_end(tmp_path: Path) -> None:
    """64 GiB of reserved zeros after the last frame: found by SEEK_DATA, never read."""
    led, _ = new_ledger(tmp_path / "l")
    led.append_many(list(sample_events(20)))
    led.close()
    last = segments(tmp_path / "l")[-1]
    os.truncate(last, 64 << 30)
    report = in_time(lambda: audit.verify(tmp_path / "l", jobs=1))
    assert report.records == 21
    assert len(in_time(lambda: list(audit.entries(tmp_path / "l")))) == 21


def test_huge_sparse_files_are_clear_errors(tmp_path: Path) -> None:
    led, _keys = new_ledger(tmp_path / "l", options=Options(segment_bytes=600,
                                                          set_append_only_flag=False))
    led.append_many(list(sample_events(30)))
    led.close()
    d = tmp_path / "l"
    unseal_all(d)
    sealed = segments(d)[0]
    os.truncate(sealed, 64 << 30)  # a sealed segment never ends in zeros
    with pytest.raises(LedgerCorrupt, match="more than the format allows"):
        in_time(lambda: LogReader(d).run())
    with pytest.raises(LedgerCorrupt, match="more than the format allows"):
        in_time(lambda: audit.verify(d, jobs=1))
    os.truncate(sealed, 0)
    os.truncate(d / ANCHOR_FILE, 64 << 30)
    with pytest.raises(LedgerCorrupt, match="larger than"):
        in_time(lambda: read_anchor(d))


def test_huge_nodes_jsonl_is_a_clear_error_and_open_replaces_it(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append_many(list(sample_events(10)))
    led.close()
    d = tmp_path / "l"
    good = (d / NODES_FILE).read_bytes()
    os.truncate(d / NODES_FILE, 64 << 30)
    with pytest.raises(LedgerCorrupt, match=r"nodes\.jsonl"):
        in_time(lambda: audit.verify(d, jobs=1))
    in_time(lambda: Ledger.open(d, keys, options=NO_FLAG).close())
    assert (d / NODES_FILE).read_bytes() == good


def test_a_segment_larger_than_the_format_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    led, _ = new_ledger(tmp_path / "l")
    led.append_many(list(sample_events(20)))
    led.close()
    size = segments(tmp_path / "l")[-1].stat().st_size
    monkeypatch.setattr(scan, "MAX_SEGMENT_BYTES", size - 1)
    with pytest.raises(LedgerCorrupt, match="more than the format allows"):
        LogReader(tmp_path / "l").run()


def test_the_writer_never_makes_a_segment_the_format_refuses(tmp_path: Path) -> None:
    with pytest.raises(LedgerUsageError, match="segment_bytes"):
        Options(segment_bytes=1 << 31)
    led, _ = new_ledger(tmp_path / "l")
    big = [PdDeclared("x" * 200_000, i) for i in range(1400)]  # ~280 MB in one batch
    with pytest.raises(LedgerUsageError, match="more than one batch may hold"):
        led.append_many(big)
    assert led.size == 1
    led.close()


# ------------------------------------------------------------ bounded reads

@pytest.mark.parametrize("chunk", [64, 333, 4096])
def test_reads_in_small_pieces_give_the_same_log(tmp_path: Path, chunk: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches spanning a read's end, frames cut by it: the same entries, same verdict."""
    led, _ = new_ledger(tmp_path / "l", options=Options(segment_bytes=20_000,
                                                       set_append_only_flag=False))
    events = list(sample_events(200))
    for i in range(0, 200, 9):
        led.append_many(events[i:i + 9])
    led.close()
    d = tmp_path / "l"
    expected = [(e.seq, e.body, e.leaf, e.event) for e in LogReader(d).entries()]
    monkeypatch.setattr(scan, "READ_CHUNK", chunk)
    assert [(e.seq, e.body, e.leaf, e.event) for e in LogReader(d).entries()] == expected
    assert audit.verify(d, jobs=1).records == len(expected)
    last = segments(d)[-1]
    offset, _, _ = frames(last)[-3]  # a record of the last batch: its header zeroed
    with open(last, "r+b") as f:
        f.seek(offset)
        f.write(bytes(8))
    with pytest.raises(DamagedLastBatch) as err:
        LogReader(d).run()
    monkeypatch.setattr(scan, "READ_CHUNK", 16 << 20)
    with pytest.raises(DamagedLastBatch) as whole:
        LogReader(d).run()
    assert str(err.value) == str(whole.value)


def test_a_pass_holds_a_read_not_a_segment(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    led, _ = new_ledger(tmp_path / "l", options=Options(segment_bytes=32 << 20,
                                                       set_append_only_flag=False))
    blob = [PdDeclared("p" * 60_000, i) for i in range(300)]  # one ~18 MB segment
    for i in range(0, 300, 20):
        led.append_many(blob[i:i + 20])
    led.close()
    assert segments(tmp_path / "l")[-1].stat().st_size > 16 << 20
    monkeypatch.setattr(scan, "READ_CHUNK", 1 << 20)
    tracemalloc.start()
    try:
        LogReader(tmp_path / "l", verify=False, decode=True).run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the read (1 MiB), its unpacker's copy, the open batch: not the 18 MB segment
    assert peak < 12 << 20, f"a pass over an 18 MB segment peaked at {peak} bytes"


# ------------------------------------------------------------ not regular files

@pytest.mark.parametrize("which", ["segment", "anchor", "nodes", "snapshot"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "loop"])
def test_special_files_are_refused_without_blocking(tmp_path: Path, which: str,
                                                    kind: str) -> None:
    led, _keys = new_ledger(tmp_path / "l")
    led.append_many(list(sample_events(10)))
    led.write_snapshot()
    led.close()
    d = tmp_path / "l"
    target = {"segment": segments(d)[-1], "anchor": d / ANCHOR_FILE, "nodes": d / NODES_FILE,
              "snapshot": next((d / SNAPSHOT_DIR).iterdir())}[which]
    os.chmod(target, 0o644)
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        os.symlink(target.name + ".b", target)
        os.symlink(target.name, target.with_name(target.name + ".b"))
    with pytest.raises(LedgerCorrupt):
        in_time(lambda: audit.verify(d, jobs=1))
    if which in ("segment", "anchor"):
        for read in (lambda: list(audit.entries(d)), lambda: audit.public_verifier_key(d)):
            with pytest.raises(LedgerCorrupt):
                in_time(read)


# ------------------------------------------------------------ a damaged last batch

def _damaged_last_batch(tmp_path: Path, how: str) -> tuple[Path, NodeKeys, int, int]:
    """(dir, keys, batch start seq, size) of :func:`helpers.damaged_last_batch`."""
    d = tmp_path / "l"
    return (d, *damaged_last_batch(d, garbage=how != "zero page"))


def test_garbage_in_the_last_batch_is_not_a_torn_write(tmp_path: Path) -> None:
    """Random bytes are not what a torn write leaves (it leaves zeros): damage, refused,
    and not offered for dropping."""
    d, keys, _, _ = _damaged_last_batch(tmp_path, "garbage")
    with pytest.raises(LedgerCorrupt) as err:
        Ledger.open(d, keys, options=NO_FLAG)
    assert not isinstance(err.value, DamagedLastBatch)
    with pytest.raises(LedgerUsageError, match="not a damaged last batch"):
        recover.drop_last_batch(d, keys)


@pytest.mark.parametrize("how", ["zero page"])
def test_a_damaged_last_batch_is_refused_with_the_choices(tmp_path: Path, how: str) -> None:
    d, keys, start, size = _damaged_last_batch(tmp_path, how)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    with pytest.raises(DamagedLastBatch) as err:
        Ledger.open(d, keys, options=NO_FLAG)
    e = err.value
    assert e.seq == start and e.records == size - start and e.tail.dropped_records == 0
    assert "--drop-last-batch" in str(e) and "acknowledged" in str(e)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    with pytest.raises(DamagedLastBatch):
        audit.verify(d, jobs=1)


def test_recover_drops_the_batch_and_records_the_decision(tmp_path: Path) -> None:
    d, keys, start, size = _damaged_last_batch(tmp_path, "zero page")
    last = segments(d)[-1]
    whole = last.read_bytes()
    event = recover.drop_last_batch(d, keys, clock=counting_clock(2_000_000_000_000_000_000))
    assert (event.first_seq, event.records) == (start, size - start)
    assert event.anchor_size == size  # the anchor had vouched for the dropped batch
    kept = (d / event.kept_as).read_bytes()
    assert kept == whole[event.offset:] and hashlib.sha256(kept).digest() == event.dropped_sha256
    report = audit.verify(d, jobs=1)
    assert report.records == start + 1
    entries = list(LogReader(d).entries())
    assert isinstance(entries[-1].event, LedgerRecovered) and entries[-1].seq == start
    with Ledger.open(d, keys, options=NO_FLAG) as led:
        assert led.size == start + 1


def test_recover_refuses_what_it_is_not_for(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, keys = new_ledger(d)
    led.append_many(list(sample_events(10)))
    led.append_many(list(sample_events(10)))
    led.close()
    with pytest.raises(LedgerUsageError, match="nothing to recover"):
        recover.drop_last_batch(d, keys)
    last = segments(d)[-1]
    offset, _kind, length = [f for f in frames(last) if f[1] == KIND_RECORD][3]
    with open(last, "r+b") as f:  # damage in a committed batch with another after it
        f.seek(offset + 8 + length // 2)
        f.write(b"\xff")
    before = last.read_bytes()
    with pytest.raises(LedgerUsageError, match="not a damaged last batch"):
        recover.drop_last_batch(d, keys)
    assert last.read_bytes() == before


def test_recover_a_tail_the_anchor_says_was_committed(tmp_path: Path) -> None:
    """The last checkpoint torn-looking after a clean close: open refuses (the anchor
    proves it was committed); recover may drop it."""
    d = tmp_path / "l"
    led, keys = new_ledger(d)
    led.append_many(list(sample_events(5)))
    led.append_many(list(sample_events(5)))
    led.close()
    last = segments(d)[-1]
    offset, _kind, length = frames(last)[-1]
    with open(last, "r+b") as f:  # its end never reached the disk: zeros
        f.seek(offset + 8 + length - 64)
        f.write(bytes(64))
    with pytest.raises(LedgerCorrupt, match="shorter"):
        Ledger.open(d, keys, options=NO_FLAG)
    event = recover.drop_last_batch(d, keys)
    assert (event.first_seq, event.anchor_size) == (6, 11)
    assert audit.verify(d, jobs=1).records == 7


# ------------------------------------------------------------ leftovers

def test_open_clears_what_a_killed_atomic_write_leaves(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, keys = new_ledger(d)
    led.append_many(list(sample_events(10)))
    led.write_snapshot()
    led.close()
    leftovers = [d / SNAPSHOT_DIR / "snap-00000000000000000005.bin.tmp",
                 d / SNAPSHOT_DIR / "snap-00000000000000000011.bin.tmp",
                 d / (ANCHOR_FILE + ".tmp"), d / (NODES_FILE + ".tmp")]
    for p in leftovers:
        p.write_bytes(b"half a write")
        os.chmod(p, 0o400)
    Ledger.open(d, keys, options=NO_FLAG).close()
    assert [p for p in leftovers if p.exists()] == []
    assert audit.verify(d, jobs=1).records == 11


def test_huge_sparse_snapshot_is_refused_before_it_is_read(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append_many(list(sample_events(10)))
    snap = led.write_snapshot()
    led.close()
    os.chmod(snap, 0o644)
    os.truncate(snap, 64 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(LedgerCorrupt, match="larger than"):
            in_time(lambda: audit.verify(tmp_path / "l", jobs=1), 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    in_time(lambda: Ledger.open(tmp_path / "l", keys, options=NO_FLAG).close(), 10)


def test_a_torn_looking_earlier_checkpoint_is_not_part_of_the_last_batch(
        tmp_path: Path) -> None:
    """Zeros over the header of the checkpoint before the last one: torn-looking, and the
    last checkpoint is intact; but two checkpoint frames follow the damage, so an
    acknowledged batch is damaged: refused, never offered for dropping."""
    d = tmp_path / "l"
    led, keys = new_ledger(d)
    for i in range(0, 30, 3):
        led.append_many(list(sample_events(30))[i:i + 3])
    led.close()
    last = segments(d)[-1]
    cps = [f for f in frames(last) if f[1] == KIND_CHECKPOINT]
    with open(last, "r+b") as f:
        f.seek(cps[-2][0])
        f.write(bytes(8))
    with pytest.raises(LedgerCorrupt) as err:
        LogReader(d).run()
    assert not isinstance(err.value, DamagedLastBatch)
    with pytest.raises(LedgerUsageError, match="not a damaged last batch"):
        recover.drop_last_batch(d, keys)
