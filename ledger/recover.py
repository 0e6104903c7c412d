"""An operator's recovery of a ledger that will not open: dropping a damaged last batch.

When a frame of the last batch is damaged but the batch's own checkpoint survived
(:class:`ledger.scan.DamagedLastBatch`), the batch may have been acknowledged, so
opening the ledger refuses instead of truncating it.  Dropping it is the operator's
decision: the bytes are kept in ``dropped/``, the segment is cut back to the last
intact batch, anything that vouched for the dropped records (the anchor, snapshots)
is brought back to the new end, and one ``ledger.recovered`` event records it all.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ledger import snapshot
from ledger.catalog import REGISTRY, LedgerRecovered
from ledger.errors import LedgerUsageError
from ledger.events import MAX_EVENT_BYTES
from ledger.files import open_regular, pread_exact, read_bounded
from ledger.keys import NodeKeys
from ledger.log import (
    ANCHOR_FILE,
    RECOVERY_PENDING,
    Ledger,
    _write_all,
    lock_directory,
    note_checkpoint,
    read_anchor,
    read_note_at,
    truncate_tail,
)
from ledger.nodes import atomic_write
from ledger.note import NoteError
from ledger.scan import DamagedLastBatch, LedgerCorrupt, LogReader, ScanResult, TornTail

DROPPED_DIR = "dropped"


def drop_last_batch(directory: Path, keys: NodeKeys, *,
                    clock: Callable[[], int] = time.time_ns) -> LedgerRecovered:
    """Drop the damaged last batch of the ledger in ``directory``; returns the event
    appended.  :class:`LedgerUsageError` if the ledger has no such batch (it opens as
    it is, or is damaged elsewhere, which dropping the last batch would not mend).

    Crash-safe in steps: the bytes are kept, the event is written down
    (:data:`RECOVERY_PENDING`, which keeps the ledger from opening), the anchor and
    snapshots are moved back, the segment is cut, the event is appended; run again
    after a crash, it finishes what was begun.
    """
    lock_fd = lock_directory(directory)
    try:
        event = _pending(directory, keys)
        if event is None:
            damage, scan = _find_damage(directory, keys)
            t = damage.tail
            anchor_size = _anchor_size(directory, scan)
            kept_as, digest = _keep_bytes(directory, t.segment, t.offset, t.dropped_bytes)
            event = LedgerRecovered(t.segment.name, t.offset, scan.size,
                                    -1 if damage.records is None else damage.records,
                                    t.dropped_bytes, digest, damage.found, anchor_size,
                                    kept_as)
            atomic_write(directory / RECOVERY_PENDING, REGISTRY.encode(event), mode=0o444)
            _bring_back(directory, scan)
            truncate_tail(t)
    except BaseException:
        os.close(lock_fd)
        raise
    # Recorded under the same lock: no node opens the cut log before the decision is in it.
    with Ledger.open_holding(lock_fd, directory, keys, clock=clock) as ledger:
        ledger.append(event)
        (directory / RECOVERY_PENDING).unlink()
    return event


def _pending(directory: Path, keys: NodeKeys) -> LedgerRecovered | None:
    """The event of a recovery cut short after it cut the log (None if there is none, or
    it was cut short before: then it is begun again)."""
    path = directory / RECOVERY_PENDING
    data = read_bounded(path, MAX_EVENT_BYTES, "a pending recovery")
    if data is None:
        return None
    event = REGISTRY.decode(data)
    if not isinstance(event, LedgerRecovered):
        raise LedgerUsageError(f"{path}: not a ledger.recovered event")
    try:
        scan = LogReader(directory, pinned_key=keys.public_key).run()
    except LedgerCorrupt:
        return None  # the damage is still there: the cut never happened
    if scan.tail is None and scan.size == event.first_seq:
        return event
    raise LedgerUsageError(f"{path}: the log ({scan.size} records) is not where the pending "
                           f"recovery left it ({event.first_seq}); look before removing it")


class _Damage(NamedTuple):
    tail: TornTail
    records: int | None
    found: str


def _find_damage(directory: Path, keys: NodeKeys) -> tuple[_Damage, ScanResult]:
    """What recover may drop: a damaged last batch whose checkpoint survived, or an
    uncommitted-looking tail that the anchor says was committed (so it was
    acknowledged, and the damage is rot, not a torn write)."""
    reader = LogReader(directory, pinned_key=keys.public_key)
    try:
        scan = reader.run()
    except DamagedLastBatch as exc:
        return _Damage(exc.tail, exc.records, exc.found), reader.result
    except LedgerCorrupt as exc:
        raise LedgerUsageError(f"not a damaged last batch, which is all recover drops: "
                               f"{exc}") from None
    anchored = _anchor_size(directory, scan)
    if scan.tail is not None and anchored > scan.size:
        t = scan.tail
        return _Damage(t, anchored - scan.size,
                       f"{t.reason}, in records the anchor says were committed"), scan
    raise LedgerUsageError("nothing to recover: the log has no damaged last batch "
                           "(a torn tail the anchor does not vouch for is truncated when "
                           "the ledger opens)")


def _anchor_size(directory: Path, scan: ScanResult) -> int:
    anchor = read_anchor(directory)
    if anchor is None or scan.genesis is None:
        return 0
    try:
        return note_checkpoint(anchor, scan).size
    except NoteError:
        return -1


def _keep_bytes(directory: Path, segment: Path, offset: int, n: int) -> tuple[str, bytes]:
    """Copy the bytes about to be dropped into ``dropped/``; (its name, their SHA-256)."""
    folder = directory / DROPPED_DIR
    folder.mkdir(mode=0o755, exist_ok=True)
    src = open_regular(segment)
    digest = hashlib.sha256()
    tmp = folder / f".{segment.name}@{offset}.partial"
    tmp.unlink(missing_ok=True)
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        done = 0
        while done < n:
            block = pread_exact(src, segment, offset + done, min(1 << 20, n - done))
            if not block:
                break
            digest.update(block)
            _write_all(out, block)
            done += len(block)
        os.fsync(out)
    finally:
        os.close(src)
        os.close(out)
    # Named by content too: a later recovery at the same offset keeps its own copy.
    name = f"{DROPPED_DIR}/{segment.name}@{offset}-{digest.hexdigest()[:16]}.bin"
    if (directory / name).exists():
        tmp.unlink()  # the very same bytes are kept already
    else:
        os.rename(tmp, directory / name)
    return name, digest.digest()


def _bring_back(directory: Path, scan: ScanResult) -> None:
    """The anchor and snapshots may vouch for the dropped records: move them to the
    new end (the anchor to the last intact checkpoint, later snapshots aside)."""
    where = scan.notes.get(scan.size)
    if where is not None:
        atomic_write(directory / ANCHOR_FILE, read_note_at(where), mode=0o644)
    for path in snapshot.listing(directory):
        if int(path.name[5:25]) > scan.size:
            os.replace(path, directory / DROPPED_DIR / path.name)
