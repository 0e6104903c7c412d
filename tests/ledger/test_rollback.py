"""Rollbacks and forks made detectable.

A rollback that takes the anchor (``checkpoint``) with it -- the anchor deleted, the
log cut back with an older note in the anchor's place, an older directory copied
in, a never-closed ledger cut back to a checkpoint at or above its anchor -- passes a
plain verify only where nothing on disk can tell; a checkpoint someone kept earlier
(``verify --against NOTE``) catches every one of them, and a fork.  Missing anchors
on a log that has rolled are failures; read commands say when the log is shorter
than its anchor; the anchor is refreshed while the ledger runs, off the append path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ORIGIN, counting_clock, new_ledger, segments, unseal_all

from actors import cli
from actors.runtime import Node
from ledger import audit
from ledger.catalog import PdDeclared
from ledger.keys import NodeKeys
from ledger.log import ANCHOR_FILE, Ledger, Options, note_checkpoint, read_anchor
from ledger.note import Checkpoint, NoteSigner, sign_checkpoint
from ledger.records import FRAME_HEADER, SEGMENT_HEADER
from ledger.scan import LedgerCorrupt, LogReader, list_segments

ROOT = Path(__file__).resolve().parents[2]
MULTI = Options(segment_bytes=2000, set_append_only_flag=False)
ONE_SEGMENT = Options(set_append_only_flag=False)


# ------------------------------------------------------------------ helpers

def ppn(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "actors.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, timeout=60)


def append(led: Ledger, n: int, tag: str = "pd") -> None:
    """``n`` single-event batches (one checkpoint per record); no member changes, so
    nodes.jsonl stays valid at every size a test cuts the log back to."""
    for _ in range(n):
        led.append(PdDeclared(f"{tag}-{led.size}", led.size))


def crash(led: Ledger) -> None:
    """Let go of the files as a killed process would: no trim, no anchor, no snapshot."""
    os.close(led._fd)
    led._fd = -1
    os.close(led._lock_fd)
    led._lock_fd = -1


def anchored_size(d: Path) -> int | None:
    note = read_anchor(d)
    return None if note is None else note_checkpoint(note, LogReader(d).run()).size


def cut_at(d: Path, size: int) -> None:
    """Cut the log back to its checkpoint at ``size``: truncate the segment holding that
    checkpoint just after its frame and delete every later segment."""
    unseal_all(d)
    where = LogReader(d).run().notes.get(size)
    assert where is not None, f"no checkpoint at size {size}"
    path, off = where
    with path.open("rb") as f:
        f.seek(off)
        length = FRAME_HEADER.unpack(f.read(FRAME_HEADER.size))[0]
    os.truncate(path, off + FRAME_HEADER.size + length)
    for seg in segments(d):
        if seg.name > path.name:
            seg.unlink()


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    unseal_all(dst)
    return dst


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> float:
    """Poll ``cond`` until true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return time.monotonic()


class Keeper:
    """``Ledger.keep_anchor`` in a thread of its own, as the node runs it."""

    def __init__(self, led: Ledger) -> None:
        self.led, self.stop = led, threading.Event()
        self.thread = threading.Thread(target=led.keep_anchor, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.led.wake_anchor_keeper()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[tuple[Path, NodeKeys]]:
    """A closed ledger of several segments (size 41)."""
    d = tmp_path / "l"
    led, keys = new_ledger(d, options=MULTI)
    append(led, 40)
    led.close()
    assert len(segments(d)) >= 3 and anchored_size(d) == 41
    yield d, keys
    unseal_all(d)


# ------------------------------------------------------------------ 1. a missing anchor

def test_missing_anchor_of_a_rolled_log_fails_verify_and_every_read(multi: tuple[Path, NodeKeys]
                                                                    ) -> None:
    d, _ = multi
    audit.verify(d)  # control: intact
    (d / ANCHOR_FILE).unlink()
    with pytest.raises(LedgerCorrupt, match="missing") as err:
        audit.verify(d)
    assert err.value.segment == ANCHOR_FILE
    reads: list[Callable[[], object]] = [
        lambda: list(audit.entries(d)), lambda: audit.state_at(d), lambda: audit.state_at(d, 3),
        lambda: audit.checkpoint_note(d), lambda: audit.checkpoint_note(d, 5),
        lambda: audit.prove_inclusion(d, 1), lambda: audit.prove_consistency(d, 2, 10),
        lambda: audit.public_verifier_key(d)]
    for read in reads:
        with pytest.raises(LedgerCorrupt, match="missing") as err:
            read()
        assert err.value.segment == ANCHOR_FILE


def test_missing_anchor_of_a_first_segment_is_no_failure(tmp_path: Path) -> None:
    # Never closed (a crash): it never rolled, so it never wrote an anchor.
    led, _ = new_ledger(tmp_path / "crashed", options=ONE_SEGMENT)
    append(led, 5)
    crash(led)
    assert read_anchor(tmp_path / "crashed") is None
    assert audit.verify(tmp_path / "crashed").records == 6
    assert len(list(audit.entries(tmp_path / "crashed"))) == 6
    # Closed, then its anchor deleted: nothing on disk can tell (a kept note can: below).
    led, _ = new_ledger(tmp_path / "closed", options=ONE_SEGMENT)
    append(led, 5)
    led.close()
    (tmp_path / "closed" / ANCHOR_FILE).unlink()
    assert audit.verify(tmp_path / "closed").records == 6
    assert audit.checkpoint_note(tmp_path / "closed") == led.latest_note


# ------------------------------------------------------------------ 2. rollbacks, kept notes

def test_against_an_older_note_of_an_untouched_ledger_passes(multi: tuple[Path, NodeKeys],
                                                             tmp_path: Path) -> None:
    d, _ = multi
    notes = [(f"n{size}", audit.checkpoint_note(d, size)) for size in (1, 7, 41)]
    report = audit.verify(d, against=notes)
    assert report.extends == (("n1", 1), ("n7", 7), ("n41", 41))
    assert "extends n7 (size 7)" in report.summary()
    for name, note in notes:
        (tmp_path / name).write_bytes(note)
    out = ppn("ledger", "verify", d, "--against", tmp_path / "n7", "--against", tmp_path / "n41")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.decode()
    assert text.startswith("ok: 41 records")
    assert f"extends {tmp_path / 'n7'} (size 7)" in text
    assert f"extends {tmp_path / 'n41'} (size 41)" in text


def test_anchor_deleted_and_log_cut_back(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=ONE_SEGMENT)
    append(led, 9)
    kept = tmp_path / "kept.note"
    led.close()
    out = ppn("ledger", "checkpoint", d)  # someone keeps the checkpoint at size 10
    assert out.returncode == 0
    kept.write_bytes(out.stdout)
    assert note_checkpoint(out.stdout, LogReader(d).run()).size == 10
    cut_at(d, 4)
    (d / ANCHOR_FILE).unlink()
    assert audit.verify(d).records == 4  # undetectable without a kept note
    with pytest.raises(LedgerCorrupt, match="rolled back") as err:
        audit.verify(d, against=[("kept.note", kept.read_bytes())])
    assert err.value.segment == "kept.note"
    bad = ppn("ledger", "verify", d, "--against", kept)
    assert bad.returncode == 1
    line = bad.stdout.decode()
    assert line.startswith("FAILED:") and str(kept) in line and "rolled back" in line


def test_log_cut_back_with_an_older_note_as_anchor(multi: tuple[Path, NodeKeys],
                                                   tmp_path: Path) -> None:
    d, _ = multi
    older = audit.checkpoint_note(d, 12)  # what the anchor held once
    newer = audit.checkpoint_note(d)  # kept by someone at size 41
    cut_at(d, 12)
    (d / ANCHOR_FILE).write_bytes(older)
    # The undetectable case without a kept note: the log is a consistent older log.
    assert audit.verify(d).records == 12
    assert audit.checkpoint_note(d) == older
    with pytest.raises(LedgerCorrupt, match="rolled back") as err:
        audit.verify(d, against=[("newer", newer)])
    assert err.value.segment == "newer" and "41" in str(err.value)
    # A kept note inside what is left still passes beside it.
    assert audit.verify(d, against=[("older", older)]).extends == (("older", 12),)
    (tmp_path / "newer.note").write_bytes(newer)
    bad = ppn("ledger", "verify", d, "--against", tmp_path / "older.missing",
              "--against", tmp_path / "newer.note")
    assert bad.returncode == 1 and str(tmp_path / "older.missing") in (
        bad.stdout + bad.stderr).decode()
    bad = ppn("ledger", "verify", d, "--against", tmp_path / "newer.note")
    assert bad.returncode == 1
    assert bad.stdout.decode().startswith("FAILED: " + str(tmp_path / "newer.note"))


def test_older_directory_copied_in(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, keys = new_ledger(d, options=MULTI)
    append(led, 15)
    led.close()
    old = copy_dir(d, tmp_path / "old")
    led = Ledger.open(d, keys, clock=counting_clock(2_000_000_000_000_000_000), options=MULTI)
    append(led, 25)
    led.close()
    newer = audit.checkpoint_note(d)
    unseal_all(d)
    shutil.rmtree(d)
    shutil.copytree(old, d)
    assert audit.verify(d).records == 16  # a whole, consistent, older ledger
    with pytest.raises(LedgerCorrupt, match="rolled back") as err:
        audit.verify(d, against=[("newer", newer)])
    assert err.value.segment == "newer"
    unseal_all(d)


def test_never_closed_ledger_cut_back_to_at_or_above_its_anchor(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=MULTI)  # no keeper: the anchor moves only at rolls
    append(led, 30)
    anchor = anchored_size(d)
    assert anchor is not None and anchor < 31
    kept = audit.checkpoint_note(d)  # size 31, while the node runs
    append(led, 3)
    copy = copy_dir(d, tmp_path / "copy")  # the disk as a crash leaves it
    led.close()
    assert anchored_size(copy) == anchor
    for size in (anchor, anchor + 1):  # at, and above, the anchor
        victim = copy_dir(copy, tmp_path / f"cut{size}")
        cut_at(victim, size)
        assert audit.verify(victim).records == size  # the anchor still matches
        with pytest.raises(LedgerCorrupt, match="rolled back") as err:
            audit.verify(victim, against=[("kept", kept)])
        assert err.value.segment == "kept"


def test_fork_is_caught_and_shared_history_passes(tmp_path: Path) -> None:
    a = tmp_path / "a"
    led, keys = new_ledger(a, options=MULTI)
    append(led, 14)
    led.close()
    shared = audit.checkpoint_note(a)  # size 15
    b = copy_dir(a, tmp_path / "b")
    for d, tag in ((a, "alpha"), (b, "beta")):
        led = Ledger.open(d, keys, clock=counting_clock(2_000_000_000_000_000_000),
                          options=MULTI)
        append(led, 10, tag)
        assert led.size == 25
        led.close()
    assert audit.verify(b).records == 25  # each copy is a valid ledger on its own
    note_a = audit.checkpoint_note(a)
    assert note_a != audit.checkpoint_note(b)
    with pytest.raises(LedgerCorrupt, match="fork") as err:
        audit.verify(b, against=[("a.note", note_a)])
    assert err.value.segment == "a.note"
    assert "differs" in err.value.reason
    report = audit.verify(b, against=[("shared", shared)])
    assert report.extends == (("shared", 15),)
    (tmp_path / "a.note").write_bytes(note_a)
    (tmp_path / "shared.note").write_bytes(shared)
    bad = ppn("ledger", "verify", b, "--against", tmp_path / "shared.note",
              "--against", tmp_path / "a.note")
    assert bad.returncode == 1
    line = bad.stdout.decode()
    assert line.startswith("FAILED:") and str(tmp_path / "a.note") in line and "fork" in line
    unseal_all(a)
    unseal_all(b)


def test_fork_to_a_size_with_no_checkpoint(tmp_path: Path) -> None:
    """The other history batched its records differently: no checkpoint at the kept size."""
    a = tmp_path / "a"
    led, keys = new_ledger(a, options=ONE_SEGMENT)
    append(led, 4)
    led.close()
    b = copy_dir(a, tmp_path / "b")
    led = Ledger.open(a, keys, clock=counting_clock(2_000_000_000_000_000_000),
                      options=ONE_SEGMENT)
    append(led, 3, "alpha")
    led.close()
    led = Ledger.open(b, keys, clock=counting_clock(2_000_000_000_000_000_000),
                      options=ONE_SEGMENT)
    led.append_many([PdDeclared(f"beta-{i}", i) for i in range(6)])  # sizes 5 -> 11
    led.close()
    with pytest.raises(LedgerCorrupt, match="fork") as err:
        audit.verify(b, against=[("a.note", audit.checkpoint_note(a))])  # size 8
    assert err.value.segment == "a.note"


def test_kept_note_of_another_signer_or_garbage_fails_naming_it(multi: tuple[Path, NodeKeys],
                                                                tmp_path: Path) -> None:
    d, _ = multi
    scan = LogReader(d).run()
    ours = note_checkpoint(audit.checkpoint_note(d, 10), scan)
    other = NodeKeys.generate()
    forged = sign_checkpoint(Checkpoint(ORIGIN, 10, ours.root_hash),
                             NoteSigner(ORIGIN, other.signing_key))
    for name, note in (("forged", forged), ("garbage", b"not a note\n"), ("empty", b"")):
        with pytest.raises(LedgerCorrupt) as err:
            audit.verify(d, against=[(name, note)])
        assert err.value.segment == name
        assert "kept checkpoint" in err.value.reason
    (tmp_path / "forged.note").write_bytes(forged)
    bad = ppn("ledger", "verify", d, "--against", tmp_path / "forged.note")
    assert bad.returncode == 1
    assert bad.stdout.decode().startswith(f"FAILED: {tmp_path / 'forged.note'}")


# ------------------------------------------------------------------ 3. read commands

@pytest.mark.parametrize("damage", ["zeroed", "cut"])
def test_read_commands_say_the_log_is_shorter(multi: tuple[Path, NodeKeys], damage: str) -> None:
    d, _ = multi
    unseal_all(d)
    last = segments(d)[-1]
    first_seq = list_segments(d)[-1][0]
    assert first_seq < 40  # the last segment holds records
    if damage == "zeroed":
        data = last.read_bytes()
        keep = SEGMENT_HEADER.size
        last.write_bytes(data[:keep] + bytes(len(data) - keep))
    else:
        cut_at(d, 40)
    short = LogReader(d, verify=False).run().size
    assert short < 41
    commands: list[list[str | Path]] = [["show", d], ["state", d], ["checkpoint", d],
                                        ["prove", d, "1"], ["pubkey", d]]
    for args in commands:
        out = ppn("ledger", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        err = out.stderr.decode()
        assert err.startswith("ppn: error: ") and "shorter than its stored checkpoint" in err
        if args[0] == "checkpoint":
            assert out.stdout == b""  # never an older note with no word
    for read in (lambda: list(audit.entries(d)), lambda: audit.state_at(d),
                 lambda: audit.checkpoint_note(d), lambda: audit.prove_inclusion(d, 1),
                 lambda: audit.verify(d)):
        with pytest.raises(LedgerCorrupt, match="shorter than its stored checkpoint"):
            read()


# ------------------------------------------------------------------ 4. the anchor kept live

def test_keeper_refreshes_the_anchor_of_an_open_ledger(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, anchor_every_batches=5,
                                           anchor_every_seconds=0.2))
    keeper = Keeper(led)
    try:
        append(led, 20)
        wait_for(lambda: anchored_size(d) == 21)
        assert len(segments(d)) == 1  # not a roll: the keeper wrote it
        assert not led._closed
    finally:
        keeper.close()
        led.close()
    assert anchored_size(d) == 21


def test_keeper_refreshes_every_n_batches(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, anchor_every_batches=5,
                                           anchor_every_seconds=0))
    keeper = Keeper(led)
    try:
        append(led, 5)
        wait_for(lambda: anchored_size(d) == 6)
        append(led, 4)  # four batches newer than the anchor: not yet
        time.sleep(0.5)
        assert anchored_size(d) == 6
        append(led, 1)
        wait_for(lambda: anchored_size(d) == 11)
    finally:
        keeper.close()
        led.close()


def test_keeper_refreshes_by_time_alone(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, anchor_every_batches=0,
                                           anchor_every_seconds=0.2))
    keeper = Keeper(led)
    try:
        wait_for(lambda: anchored_size(d) == 1, timeout=5)  # the genesis, of unknown age
        before = time.monotonic()
        append(led, 1)
        seen = wait_for(lambda: anchored_size(d) == 2, timeout=5)
        assert seen - before >= 0.2  # not before the batch is that old
    finally:
        keeper.close()
        led.close()


def test_appends_never_write_the_anchor(tmp_path: Path) -> None:
    """Without a keeper the anchor moves only at a roll or close: a commit never writes it."""
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, anchor_every_batches=1,
                                           anchor_every_seconds=0.01))
    append(led, 10)
    time.sleep(0.1)
    assert read_anchor(d) is None
    led.close()
    assert anchored_size(d) == 11
    d2 = tmp_path / "rolling"
    led, _ = new_ledger(d2, options=Options(segment_bytes=2000, set_append_only_flag=False,
                                            anchor_every_batches=1, anchor_every_seconds=0.01))
    while len(segments(d2)) < 2:
        append(led, 1)
    rolled_at = list_segments(d2)[-1][0]
    assert anchored_size(d2) == rolled_at
    append(led, 3)
    time.sleep(0.1)
    assert anchored_size(d2) == rolled_at
    led.close()
    assert anchored_size(d2) == rolled_at + 3
    unseal_all(d2)


def test_stopped_keeper_returns_and_keeper_off_returns_at_once(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "l", options=Options(set_append_only_flag=False,
                                                         anchor_every_batches=0,
                                                         anchor_every_seconds=0))
    t = threading.Thread(target=led.keep_anchor, args=(threading.Event(),), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()  # nothing to keep: it does not linger
    led.close()
    led, _ = new_ledger(tmp_path / "m", options=Options(set_append_only_flag=False,
                                                         anchor_every_batches=5,
                                                         anchor_every_seconds=0))
    keeper = Keeper(led)
    keeper.close()  # stop + wake: returns though no time period is set
    led.close()


def test_live_ledger_cut_below_its_refreshed_anchor_fails_plain_verify(tmp_path: Path) -> None:
    d = tmp_path / "l"
    led, _ = new_ledger(d, options=Options(set_append_only_flag=False, anchor_every_batches=5,
                                           anchor_every_seconds=0.2))
    keeper = Keeper(led)
    try:
        append(led, 12)
        wait_for(lambda: anchored_size(d) == 13)
        copy = copy_dir(d, tmp_path / "copy")  # the disk of the running node
    finally:
        keeper.close()
        led.close()
    assert audit.verify(copy).records == 13
    cut_at(copy, 9)
    with pytest.raises(LedgerCorrupt, match="shorter") as err:
        audit.verify(copy)
    assert err.value.segment == ANCHOR_FILE


def test_node_runs_a_keeper(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert cli.main(["node", "init", "--state-dir", str(state), "--name", "laptop-b"]) == 0
    d = state / "ledger"
    at_init = anchored_size(d)
    assert at_init is not None
    node = Node(state, serve_control=False).start()
    try:
        node.ledger.append(PdDeclared("pd-x", 1))
        size = node.ledger.size
        assert size > at_init
        wait_for(lambda: anchored_size(d) == size, timeout=10)  # default: within ~1 s
        assert not node.ledger._closed
    finally:
        node.stop()
    audit.verify(d)
