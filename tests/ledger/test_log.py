"""The WORM log: appends, group commit, segments and sealing, recovery, snapshots, keys."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from helpers import (
    NO_FLAG,
    ORIGIN,
    counting_clock,
    member,
    new_ledger,
    replay,
    sample_events,
    segments,
    unseal_all,
)

from ledger import audit, snapshot
from ledger.catalog import CapGranted, PdDeclared
from ledger.errors import LedgerUsageError
from ledger.events import EventTypeError
from ledger.keys import KeyFileError, NodeKeys
from ledger.log import Ledger, LedgerFailed, Options
from ledger.merkle import root_from_leaf_hashes
from ledger.scan import LedgerCorrupt, LogReader
from ledger.seal import is_append_only


def test_append_returns_receipts_and_state_matches_replay(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    receipts = [led.append(e) for e in sample_events(40)]
    assert [r.seq for r in receipts] == list(range(1, 41))
    assert led.size == 41
    live = led.state.to_obj()
    led.close()
    assert replay(tmp_path / "l").to_obj() == live
    reader = LogReader(tmp_path / "l", collect_leaves=True)
    entries = list(reader.entries())
    assert [e.leaf for e in entries[1:]] == [r.leaf_hash for r in receipts]
    assert reader.result.leaves is not None
    assert reader.result.tree.root() == root_from_leaf_hashes(reader.result.leaves)


def test_group_commit_batches_concurrent_appenders(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(40):
            r = led.append(PdDeclared(f"t{t}-{i}", i))
            with lock:
                seqs.append(r.seq)

    before = led.batches
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(seqs) == list(range(1, 641))
    assert led.batches - before < 640, "one fsync served several appends"
    led.close()
    assert audit.verify(tmp_path / "l").checkpoints == led.batches + 1


def test_append_many_is_one_batch_with_consecutive_seqs(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    before = led.batches
    rs = led.append_many([PdDeclared(f"p{i}", i) for i in range(100)])
    assert [r.seq for r in rs] == list(range(1, 101))
    assert led.batches == before + 1
    assert led.append_many([]) == []
    led.close()


def test_bad_event_changes_nothing(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    led.append(PdDeclared("a", 1))
    size, root = led.size, led.root()
    with pytest.raises(EventTypeError):
        led.append_many([PdDeclared("b", 2), PdDeclared("c", "x")])  # type: ignore[arg-type]
    with pytest.raises(EventTypeError):
        led.append(object())
    assert (led.size, led.root()) == (size, root)
    assert "b" not in led.state.pds
    led.close()


def test_segments_roll_and_seal(tmp_path: Path) -> None:
    opts = Options(segment_bytes=4096, set_append_only_flag=True)
    led, keys = new_ledger(tmp_path / "l", options=opts)
    try:
        for e in sample_events(300):
            led.append(e)
        led.close()
        segs = segments(tmp_path / "l")
        assert len(segs) > 3
        for seg in segs[:-1]:
            assert stat.S_IMODE(seg.stat().st_mode) == 0o444
        assert os.access(segs[-1], os.W_OK)
        if os.geteuid() == 0:
            assert all(is_append_only(s) for s in segs[:-1])
            with pytest.raises(PermissionError), segs[0].open("r+b") as f:
                f.write(b"x")
        report = audit.verify(tmp_path / "l")
        assert report.records == 301 and report.segments == len(segs)
        # Reopen and keep appending across the sealed segments.
        led = Ledger.open(tmp_path / "l", keys, options=opts)
        led.append(PdDeclared("after", 1))
        led.close()
        assert audit.verify(tmp_path / "l").records == 302
    finally:
        unseal_all(tmp_path / "l")


def test_open_with_another_key_is_refused(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    led.close()
    with pytest.raises(LedgerCorrupt, match="different key"):
        Ledger.open(tmp_path / "l", NodeKeys.generate())


def test_create_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "x").write_text("x")
    with pytest.raises(LedgerUsageError, match="not empty"):
        new_ledger(tmp_path / "l")


def test_cut_off_log_is_caught_by_the_stored_checkpoint(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l", options=Options(segment_bytes=2048,
                                                           set_append_only_flag=False))
    for e in sample_events(120):
        led.append(e)
    led.close()
    unseal_all(tmp_path / "l")
    segments(tmp_path / "l")[-1].unlink()  # whole segments gone: the chain alone can't tell
    with pytest.raises(LedgerCorrupt, match="shorter than its stored checkpoint"):
        Ledger.open(tmp_path / "l", keys)
    with pytest.raises(LedgerCorrupt, match="shorter than its stored checkpoint"):
        audit.verify(tmp_path / "l")


def test_write_failure_poisons_until_reopen(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append(PdDeclared("kept", 1))
    os.close(led._fd)  # the disk goes away under the writer
    led._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(LedgerFailed, match="reopen"):
        led.append(PdDeclared("lost", 2))
    with pytest.raises(LedgerFailed, match="reopen"):
        led.append(PdDeclared("also refused", 3))
    led.close()
    led = Ledger.open(tmp_path / "l", keys)
    assert led.size == 2 and "kept" in led.state.pds and "lost" not in led.state.pds
    led.close()


def test_snapshot_then_tail_equals_full_replay(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    for e in sample_events(50):
        led.append(e)
    path = led.write_snapshot()
    for e in sample_events(30):
        led.append(e)
    live = led.state.to_obj()
    led.close()
    snap = snapshot.load(path, keys.public_key)
    assert snap.tree_size == 51
    reopened = Ledger.open(tmp_path / "l", keys)
    assert reopened.state.to_obj() == live == replay(tmp_path / "l").to_obj()
    reopened.close()
    assert audit.verify(tmp_path / "l").snapshots == 1


def test_damaged_snapshot_is_skipped_on_open_and_failed_by_verify(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    for e in sample_events(20):
        led.append(e)
    path = led.write_snapshot()
    led.close()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    reopened = Ledger.open(tmp_path / "l", keys)  # falls back to a full replay
    assert reopened.state.to_obj() == replay(tmp_path / "l").to_obj()
    reopened.close()
    with pytest.raises(LedgerCorrupt, match="snap-"):
        audit.verify(tmp_path / "l")


def test_forged_snapshot_state_is_caught_by_verify(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append(member(1))
    state = led.state.copy()
    state.pds["pd-backdoor"] = 1
    snapshot.write(tmp_path / "l", keys, led._prefix(), state)
    led.close()
    with pytest.raises(LedgerCorrupt, match="differs from replaying"):
        audit.verify(tmp_path / "l")


def test_nodes_jsonl_is_projected_and_checked(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append(member(1))
    led.append(member(2))
    led.close()
    lines = (tmp_path / "l" / "nodes.jsonl").read_text().splitlines()
    assert [line.split('"name":"')[1].split('"')[0] for line in lines] == ["node-1", "node-2"]
    (tmp_path / "l" / "nodes.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(LedgerCorrupt, match="line 2 does not match"):
        audit.verify(tmp_path / "l")
    Ledger.open(tmp_path / "l", keys).close()  # open rebuilds the projection
    assert audit.verify(tmp_path / "l").members == 2


def test_only_grants_carry_their_own_signature(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l")
    led.append(CapGranted(1, "pd-fleet", "tunnel", ("read",), 1, None, "system"))
    led.close()
    entries = list(LogReader(tmp_path / "l").entries())
    assert entries[1].signature is not None
    assert entries[0].signature is None


def test_key_files(tmp_path: Path) -> None:
    keys = NodeKeys.generate()
    keys.save(tmp_path)
    for name in ("node.key", "wireguard.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    loaded = NodeKeys.load(tmp_path)
    assert loaded.public_key == keys.public_key and loaded.wg_public_key == keys.wg_public_key
    secret = (tmp_path / "node.key").read_text().split()[1]
    assert secret not in repr(keys) and keys.wg_private_key_b64() not in repr(keys)
    with pytest.raises(LedgerUsageError, match="refusing to overwrite"):
        keys.save(tmp_path)
    os.chmod(tmp_path / "node.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600") as err:
        NodeKeys.load(tmp_path)
    assert secret not in str(err.value)
    os.chmod(tmp_path / "node.key", 0o600)
    (tmp_path / "node.key").write_text("ppn-ed25519-seed-v1 AAAA\n")
    with pytest.raises(KeyFileError, match="not 32 bytes"):
        NodeKeys.load(tmp_path)


def test_timestamps_never_go_backwards(tmp_path: Path) -> None:
    ticks = iter([100, 50, 40, 200, 10])
    keys = NodeKeys.generate()
    led = Ledger.create(tmp_path / "l", keys, ORIGIN, clock=lambda: next(ticks),
                        options=NO_FLAG)
    rs = [led.append(PdDeclared(str(i), i)) for i in range(4)]
    assert [r.ts_ns for r in rs] == [100, 100, 200, 200]
    led.close()
    assert audit.verify(tmp_path / "l").records == 5


def test_closed_ledger_refuses_appends(tmp_path: Path) -> None:
    led = Ledger.create(tmp_path / "l", NodeKeys.generate(), ORIGIN, clock=counting_clock(),
                        options=NO_FLAG)
    led.close()
    led.close()
    with pytest.raises(LedgerUsageError, match="closed"):
        led.append(PdDeclared("x", 1))


def test_failure_after_the_fsync_does_not_disown_a_durable_append(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    (tmp_path / "l" / "nodes.jsonl").unlink()
    (tmp_path / "l" / "nodes.jsonl").mkdir()  # the projection can no longer be replaced
    receipt = led.append(member(1))  # durable, so it must not be reported as failed
    with pytest.raises(LedgerFailed):
        led.append(PdDeclared("after", 1))
    led.close()
    (tmp_path / "l" / "nodes.jsonl").rmdir()
    reopened = Ledger.open(tmp_path / "l", keys)
    assert reopened.size == receipt.seq + 1 and "node-1" in reopened.state.members
    reopened.close()
    assert audit.verify(tmp_path / "l").members == 1


def test_stale_read_only_temp_file_does_not_block_a_snapshot(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    led.append(PdDeclared("a", 1))
    led.close()
    sdir = tmp_path / "l" / "snapshots"
    sdir.mkdir()
    stale = sdir / "snap-00000000000000000002.bin.tmp"  # as a kill mid-snapshot leaves it
    stale.write_bytes(b"half")
    os.chmod(stale, 0o444)
    led = Ledger.open(tmp_path / "l", keys, options=Options(snapshot_every=1,
                                                          set_append_only_flag=False))
    led.close()
    assert not stale.exists()
    assert audit.verify(tmp_path / "l").snapshots == 1


def test_close_under_load_lets_queued_appends_finish_and_refuses_new_ones(
        tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    stop = threading.Event()
    done: list[int] = []
    refused: list[str] = []

    def appender(t: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                done.append(led.append(PdDeclared(f"t{t}-{i}", i)).seq)
            except LedgerUsageError as exc:
                refused.append(str(exc))
                return
            i += 1

    threads = [threading.Thread(target=appender, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    while len(done) < 200:
        threading.Event().wait(0.01)
    closer = threading.Thread(target=led.close)
    closer.start()
    closer.join(timeout=20)
    starved = closer.is_alive()
    stop.set()
    for th in threads:
        th.join()
    assert not starved, "close() must not wait for appenders that keep coming"
    assert refused and all("closed" in r for r in refused)
    reopened = Ledger.open(tmp_path / "l", keys)
    assert reopened.size == max(done) + 1 == len(done) + 1
    reopened.close()


def test_open_from_a_snapshot_still_checksums_the_prefix(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    for e in sample_events(50):
        led.append(e)
    led.write_snapshot()
    for e in sample_events(10):
        led.append(e)
    led.close()
    seg = segments(tmp_path / "l")[0]
    data = bytearray(seg.read_bytes())
    data[400] ^= 0x01  # inside an early record, which the snapshot covers
    seg.write_bytes(bytes(data))
    with pytest.raises(LedgerCorrupt, match="checksum"):
        Ledger.open(tmp_path / "l", keys)


def test_a_snapshot_that_disagrees_with_the_log_is_refused(tmp_path: Path) -> None:
    from ledger.merkle import CompactTree
    from ledger.scan import TrustedPrefix
    led, keys = new_ledger(tmp_path / "l")
    for e in sample_events(20):
        led.append(e)
    real = led._prefix()
    frontier = tuple(bytes([i]) * 32 for i in range(len(real.frontier)))
    forged = TrustedPrefix(real.size, CompactTree(frontier, real.size).root(), frontier,
                           real.prev_hash, real.last_ts)
    snapshot.write(tmp_path / "l", keys, forged, led.state)  # signed, but a different tree
    led.close()
    with pytest.raises(LedgerCorrupt, match="does not match"):
        Ledger.open(tmp_path / "l", keys)
    with pytest.raises(LedgerCorrupt, match="snap-"):
        audit.verify(tmp_path / "l")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    led, keys = new_ledger(tmp_path / "l")
    with pytest.raises(LedgerUsageError, match="another process"):
        Ledger.open(tmp_path / "l", keys)
    led.close()
    Ledger.open(tmp_path / "l", keys).close()  # free again once closed
    audit.verify(tmp_path / "l")  # readers never need the lock


# ----------------------------------------------------------------- reserved space
def _written(seg: Path) -> int:
    return len(seg.read_bytes().rstrip(b"\x00"))


def test_the_active_segment_grows_ahead_of_writes_and_is_trimmed(tmp_path: Path) -> None:
    import shutil

    opts = Options(set_append_only_flag=False, preallocate=64 << 10)
    keys = NodeKeys.generate()
    led = Ledger.create(tmp_path / "l", keys, "t.ppn/ledger", options=opts)
    led.append(PdDeclared("a", 1))
    seg = sorted((tmp_path / "l").glob("seg-*.log"))[-1]
    assert seg.stat().st_size >= _written(seg) + (60 << 10)  # space reserved, reads as zeros
    assert audit.verify(tmp_path / "l").records == 2  # reserved space is not a torn tail
    # A crash now leaves the reserved space behind: the copy opens without a repair,
    # writes over the zeros at the committed end, and trims on close.
    shutil.copytree(tmp_path / "l", tmp_path / "crashed")
    (tmp_path / "crashed" / ".lock").unlink()
    with Ledger.open(tmp_path / "crashed", keys, options=opts) as again:
        assert again.recovered is None and again.size == 2
        assert again.append(PdDeclared("b", 2)).seq == 2
    copy = sorted((tmp_path / "crashed").glob("seg-*.log"))[-1]
    assert copy.stat().st_size == _written(copy)
    assert audit.verify(tmp_path / "crashed").records == 3
    led.append_many([PdDeclared(f"p{i}", i) for i in range(2000)])  # past the first chunk
    assert audit.verify(tmp_path / "l").records == 2002
    led.close()
    assert all(p.stat().st_size == _written(p) for p in (tmp_path / "l").glob("seg-*.log"))
    assert audit.verify(tmp_path / "l").records == 2002


def test_segments_are_trimmed_before_sealing(tmp_path: Path) -> None:
    opts = Options(set_append_only_flag=False, preallocate=64 << 10, segment_bytes=4096)
    led, _ = new_ledger(tmp_path / "l", options=opts)
    for i in range(200):
        led.append(PdDeclared(f"p{i}", i))
    segs = sorted((tmp_path / "l").glob("seg-*.log"))
    assert len(segs) > 3
    assert all(p.stat().st_size == _written(p) for p in segs[:-1])
    led.close()
    assert audit.verify(tmp_path / "l").records == 201


def test_no_preallocation_where_the_filesystem_refuses(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    led, _ = new_ledger(tmp_path / "l")
    for i in range(5):
        led.append(PdDeclared(f"p{i}", i))
    seg = sorted((tmp_path / "l").glob("seg-*.log"))[-1]
    assert seg.stat().st_size == _written(seg)
    led.close()
    assert audit.verify(tmp_path / "l").records == 6
