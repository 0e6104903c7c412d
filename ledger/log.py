"""The WORM log writer: durable, group-committed appends; recovery on open.

An append returns only after its record and a signed checkpoint covering it are
on disk (one ``write`` and one ``fdatasync`` per batch).  Concurrent appenders are
group-committed: whoever finds no commit in progress becomes the leader, takes
every queued event, and commits them as one batch while the others wait.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ledger import nodes, snapshot, verifier
from ledger.catalog import REGISTRY, LedgerGenesis, MemberAdded, MemberRemoved
from ledger.errors import LedgerUsageError
from ledger.events import EventRegistry
from ledger.files import FileProblem, fsync_dir, open_regular, pread_exact, read_bounded
from ledger.keys import NodeKeys
from ledger.merkle import CompactTree, leaf_hash
from ledger.note import (
    MAX_NOTE_SIZE,
    Checkpoint,
    NoteError,
    NoteSigner,
    NoteVerifier,
    checkpoint_text,
    open_checkpoint,
    sign_checkpoint,
    verifier_key,
)
from ledger.records import (
    FRAME_HEADER,
    GRANT_SIGNING_CONTEXT,
    KIND_CHECKPOINT,
    KIND_RECORD,
    MAX_BATCH_BYTES,
    MAX_FRAME,
    MAX_SEGMENT_BYTES,
    SEGMENT_HEADER,
    ZERO_HASH,
    Record,
    frame,
    segment_header,
)
from ledger.scan import (
    LedgerCorrupt,
    LogReader,
    ScanResult,
    TornTail,
    TrustedPrefix,
    list_segments,
    segment_name,
)
from ledger.seal import seal_segment
from ledger.state import UNFIT, State, apply, apply_items, unfit

log = structlog.get_logger("ledger")

ANCHOR_FILE = "checkpoint"
"""A recent checkpoint of the log, kept beside it: catches a log cut short.

Written at every segment roll and close, and while the ledger is open at least every
``Options.anchor_every_batches`` batches or ``anchor_every_seconds`` seconds (by a
background thread, off the appends' path), so it lags the log by a bounded window."""
LEFTOVER_SUFFIX = ".tmp"
RECOVERY_PENDING = "dropped/recovery.pending"
"""The ``ledger.recovered`` event of a recovery that has begun to cut the log and not yet
recorded it (:mod:`ledger.recover`); while it exists the ledger does not open."""

LEDGER_FORMAT = 1


class LedgerFailed(LedgerUsageError):
    """A write or fsync failed; the ledger refuses further appends until reopened."""


@dataclass(frozen=True)
class Options:
    segment_bytes: int = 64 << 20
    max_batch: int = 4096
    set_append_only_flag: bool = True
    snapshot_every: int = 100_000
    keep_snapshots: int = 2
    preallocate: int = 1 << 20
    """Bytes the active segment is grown by ahead of the writes (0: grow as written).

    Writing into space already allocated lets each commit's fdatasync skip the
    journal commit a growing file needs.  The reserved space reads as zeros, which
    the reader knows is not data; a seal or a clean close trims it.
    """
    anchor_every_batches: int = 64
    """Refresh the anchor once this many batches are newer than it (0: only by time)."""
    anchor_every_seconds: float = 1.0
    """... or once the newest batch it lacks is this old (0: only at rolls and close)."""

    def __post_init__(self) -> None:
        if not 0 < self.segment_bytes <= MAX_SEGMENT_BYTES - MAX_BATCH_BYTES:
            most = MAX_SEGMENT_BYTES - MAX_BATCH_BYTES
            raise LedgerUsageError(f"segment_bytes must be 1..{most}")
        if self.anchor_every_batches < 0 or self.anchor_every_seconds < 0:
            raise LedgerUsageError("anchor refresh intervals cannot be negative")


class EventUnfit(LedgerUsageError):
    """A batch holds an event the fold could not apply to the state it would meet."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a committed append returns: where the event landed."""

    seq: int
    ts_ns: int
    leaf_hash: bytes


class _Pending:
    """One append_many call waiting for its batch: its own wake-up, so a commit wakes
    exactly the appenders it served (and the next leader), not every waiting thread."""

    __slots__ = ("done", "error", "items", "receipts", "wake")

    def __init__(self, items: list[tuple[Any, bytes, bytes | None]]) -> None:
        self.items = items
        self.done = False
        self.error: BaseException | None = None
        self.receipts: list[Receipt] = []
        # A plain lock used as a one-shot semaphore: taken now, released to wake the
        # owner.  Cheaper than an Event, which builds a Condition per wait.
        self.wake = threading.Lock()
        self.wake.acquire()


class Ledger:
    """An open ledger directory, writable by this process."""

    def __init__(self, directory: Path, keys: NodeKeys, scan: ScanResult, state: State,
                 projection: nodes.Projection, clock: Callable[[], int], options: Options,
                 registry: EventRegistry) -> None:
        assert scan.genesis is not None
        self.directory = directory
        self.origin = scan.genesis.origin
        self.options = options
        self.registry = registry
        self._keys = keys
        self._signer = NoteSigner(self.origin, keys.signing_key)
        self._clock = clock
        self._state = state
        self._nodes = projection
        self._tree: CompactTree = scan.tree
        self._prev = scan.prev_hash
        self._last_ts = scan.last_ts
        self._latest_note = scan.last_note
        self._snap_size = 0
        self._lock = threading.Lock()  # the queue, the leader flag, closing
        self._commit_lock = threading.Lock()  # held while a batch is written and folded
        self._fit_lock = threading.Lock()  # a conditional batch: checked, then appended
        self._idle = threading.Event()  # set while no leader is active
        self._idle.set()
        self._queue: deque[_Pending] = deque()
        self._leading = False
        self._failed: BaseException | None = None
        self._closed = False
        self._fd = -1
        self._lock_fd = -1
        self._segment_size = 0  # where the next write goes in the active segment
        self._allocated = 0  # the active segment's file size (>= _segment_size)
        self.batches = 0
        self.recovered: TornTail | None = scan.tail
        # The anchor: what it holds, what it should hold, and who refreshes it.
        self._anchor_lock = threading.Lock()
        self._anchored = 0  # tree size the anchor file holds
        self._anchored_batches = 0  # self.batches when it was written
        self._newest: tuple[int, bytes | None, float] = (scan.size, scan.last_note, 0.0)
        self._anchor_wake = threading.Event()
        self._open_active(scan)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, directory: Path, keys: NodeKeys, origin: str, *,
               clock: Callable[[], int] = time.time_ns, options: Options = Options(),
               registry: EventRegistry = REGISTRY) -> Ledger:
        """Make a new ledger in an empty (or new) directory; record 0 is its genesis."""
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise LedgerUsageError(f"{directory} is not empty; refusing to create a ledger")
        NoteVerifier.from_string(verifier_key(origin, keys.public_key))  # origin usable?
        genesis = LedgerGenesis(origin, keys.public_key, LEDGER_FORMAT)
        ts = clock()
        body = Record(0, ts, ZERO_HASH, registry.encode(genesis), None).body()
        tree = CompactTree()
        leaf = leaf_hash(body)
        tree.append(leaf)
        note = sign_checkpoint(Checkpoint(origin, 1, tree.root()),
                               NoteSigner(origin, keys.signing_key))
        data = (segment_header(0) + frame(KIND_RECORD, body) + frame(KIND_CHECKPOINT, note))
        _write_new_file(directory / segment_name(0), data)
        return cls.open(directory, keys, clock=clock, options=options, registry=registry)

    @classmethod
    def open(cls, directory: Path, keys: NodeKeys, *, clock: Callable[[], int] = time.time_ns,
             options: Options = Options(), registry: EventRegistry = REGISTRY) -> Ledger:
        """Open for writing: check the log, truncate a torn tail, rebuild state.

        Without a snapshot every record is verified (hash chain, Merkle tree,
        signatures).  With the newest valid snapshot, the prefix it covers is only
        checksummed and the rest is verified; ``ppn ledger verify`` audits it all.
        """
        lock_fd = lock_directory(directory)
        if os.path.lexists(directory / RECOVERY_PENDING):
            os.close(lock_fd)
            raise LedgerUsageError(f"{directory}: a recovery was cut short before it was "
                                   "recorded; run `ppn ledger recover DIR --drop-last-batch` "
                                   "again to finish it")
        return cls.open_holding(lock_fd, directory, keys, clock=clock, options=options,
                                registry=registry)

    @classmethod
    def open_holding(cls, lock_fd: int, directory: Path, keys: NodeKeys, *,
                     clock: Callable[[], int] = time.time_ns, options: Options = Options(),
                     registry: EventRegistry = REGISTRY) -> Ledger:
        """:meth:`open` with the directory lock the caller took (:func:`lock_directory`),
        so that nothing opens the ledger in between; the ledger owns the lock from here
        (and releases it on failure or close)."""
        try:
            ledger = cls._open_locked(directory, keys, clock, options, registry)
        except BaseException:
            os.close(lock_fd)
            raise
        ledger._lock_fd = lock_fd
        return ledger

    @classmethod
    def _open_locked(cls, directory: Path, keys: NodeKeys, clock: Callable[[], int],
                     options: Options, registry: EventRegistry) -> Ledger:
        snap = _newest_snapshot(directory, keys.public_key)
        start = snap.tree_size if snap else 0
        state = snap.state.copy() if snap else State()
        if snap is None and registry is REGISTRY:  # all of it verified, on two CPUs if any
            scan, state = verifier.audit_fold(directory, pinned_key=keys.public_key,
                                              live=False)
        else:
            reader = LogReader(directory, registry=registry,
                               trusted=snap.prefix if snap else None, pinned_key=keys.public_key)
            reader.fold(state, apply_items, start=start)
            scan = reader.result
        _check_snapshot(scan, snap)
        anchor = read_anchor(directory)
        anchored = check_anchor(scan, anchor)
        if scan.tail is not None:
            log.warning("ledger.torn_tail_truncated", detail=scan.tail.describe())
            truncate_tail(scan.tail)
        clear_leftovers(directory)
        projection = nodes.Projection(directory, state)
        projection.write()
        ledger = cls(directory, keys, scan, state, projection, clock, options, registry)
        ledger._snap_size = start
        ledger._anchored = anchored
        return ledger

    def _open_active(self, scan: ScanResult) -> None:
        last = scan.segments[-1]
        if scan.tail is not None and scan.tail.offset == 0:  # torn header: rewrite it
            last.path.unlink()
            _write_new_file(last.path, segment_header(last.first_seq))
            last.committed_end = SEGMENT_HEADER.size
        if not os.access(last.path, os.W_OK) or os.stat(last.path).st_mode & 0o222 == 0:
            self._roll()
            return
        self._fd = os.open(last.path, os.O_WRONLY)
        self._segment_size = last.committed_end
        self._allocated = os.fstat(self._fd).st_size

    # ----------------------------------------------------------------- appends
    def append(self, event: object) -> Receipt:
        """Append one event durably; returns once it is on disk with a checkpoint."""
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[object]) -> list[Receipt]:
        """Append events as one unit (same batch, consecutive seqs); durable on return.

        A batch the fold could not apply whole -- a grant of a cap id that exists, a
        revoke of one that does not, a PD status change its transition table lacks --
        is refused with :class:`EventUnfit` and nothing is appended: no sequence of
        appends leaves a log whose own fold cannot replay it.
        """
        items = [self._prepare(e) for e in events]
        if not items:
            return []
        if sum(len(data) + 200 for _, data, _ in items) > MAX_BATCH_BYTES:
            raise LedgerUsageError(f"{len(items)} events are more than one batch may hold "
                                   f"({MAX_BATCH_BYTES} bytes); append them in parts")
        if not any(type(e) in UNFIT for e in events):
            return self._append_items(items)
        # Checked and appended under one lock: no other conditional batch can change
        # what this one is checked against before it is folded in.
        with self._fit_lock:
            found = unfit(self._state, events)
            if found is not None:
                i, why = found
                tag = self.registry.type_of(events[i]).tag
                raise EventUnfit(f"event {i + 1} of {len(items)} ({tag}): {why}; "
                                 "nothing was appended")
            return self._append_items(items)

    def _append_items(self, items: list[tuple[Any, bytes, bytes | None]]) -> list[Receipt]:
        p = _Pending(items)
        with self._lock:
            self._check_usable()
            self._queue.append(p)
            leader = not self._leading
            if leader:  # no commit in flight, so the queue holds only ``p``
                self._leading = True
                self._idle.clear()
        if not leader:
            p.wake.acquire()  # released when our batch is done, or to lead the next one
        if not p.done:
            self._lead(p)
        if p.error is not None:
            raise LedgerFailed(f"append failed: {p.error}; reopen the ledger to recover")
        return p.receipts

    def _prepare(self, event: object) -> tuple[Any, bytes, bytes | None]:
        et = self.registry.type_of(event)
        data = self.registry.encode(event)
        sig = self._keys.sign(GRANT_SIGNING_CONTEXT + data) if et.signed else None
        return event, data, sig

    def _lead(self, me: _Pending) -> None:
        """Commit one batch from the head of the queue, then hand over or go idle."""
        with self._lock:
            batch, taken = [], 0
            while self._queue and (taken == 0 or taken + len(self._queue[0].items)
                                   <= self.options.max_batch):
                p = self._queue.popleft()
                batch.append(p)
                taken += len(p.items)
        err: BaseException | None = None
        with self._commit_lock:
            try:
                if self._failed is not None:
                    raise self._failed
                applied = self._commit(batch)
            except BaseException as exc:  # not durable: the batch's appenders get the error
                err = exc
                self._failed = self._failed or exc
            else:
                try:
                    self._after_commit(applied)
                except BaseException as exc:  # durable already: poison later appends only
                    log.error("ledger.post_commit_failed", error=repr(exc))
                    self._failed = exc
        with self._lock:
            for p in batch:
                p.done, p.error = True, err
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
                self._idle.set()
        for p in batch:
            if p is not me:  # the leader is awake; each waiter is released exactly once
                p.wake.release()
        if successor is not None:
            successor.wake.release()  # it finds itself not done, and leads

    def _commit(self, batch: list[_Pending]) -> list[tuple[Any, int, int, bytes | None]]:
        """Write and fsync one batch; returns (event, seq, ts) of what is now durable."""
        tree, prev, ts = self._tree.copy(), self._prev, self._last_ts
        chunks: list[bytes] = []
        applied: list[tuple[Any, int, int, bytes | None]] = []
        for p in batch:
            for event, data, sig in p.items:
                seq = tree.size
                ts = max(ts, self._clock())
                body = Record(seq, ts, prev, data, sig).body()
                prev = leaf_hash(body)
                tree.append(prev)
                chunks.append(frame(KIND_RECORD, body))
                p.receipts.append(Receipt(seq, ts, prev))
                applied.append((event, seq, ts, sig))
        note = self._signer.lone_note(checkpoint_text(self.origin, tree.size, tree.root()))
        chunks.append(frame(KIND_CHECKPOINT, note))
        buf = b"".join(chunks)
        if self._segment_size + len(buf) > MAX_SEGMENT_BYTES:
            self._roll()  # a batch never crosses the format's limit on a segment
        self._reserve(len(buf))
        _write_all(self._fd, buf, self._segment_size)
        os.fdatasync(self._fd)
        # Durable: now the in-memory view may move.
        self._tree, self._prev, self._last_ts, self._latest_note = tree, prev, ts, note
        self._segment_size += len(buf)
        self.batches += 1
        since = self._newest[2] if self._newest[0] > self._anchored else time.monotonic()
        self._newest = (tree.size, note, since)
        return applied

    def _after_commit(self, applied: list[tuple[Any, int, int, bytes | None]]) -> None:
        """Fold the batch into the live state, refresh nodes.jsonl, roll the segment."""
        members = []
        for event, seq, ts_ns, sig in applied:
            apply(self._state, event, seq, ts_ns, sig)
            if isinstance(event, (MemberAdded, MemberRemoved)):
                members.append(event.name)
        if members:
            self._nodes.update(self._state, members)
            self._nodes.write(durable=False)
        if self._segment_size >= self.options.segment_bytes:
            self._roll()
        every = self.options.anchor_every_batches
        if every and self.batches - self._anchored_batches >= every:
            self._anchor_wake.set()

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more bytes in the active segment, a chunk at a time."""
        if self._segment_size + n <= self._allocated or self.options.preallocate <= 0:
            return
        grow = max(self.options.preallocate, self._segment_size + n - self._allocated)
        try:
            os.posix_fallocate(self._fd, self._allocated, grow)
        except OSError as exc:  # unsupported here, or no space: write without it
            log.warning("ledger.preallocate_failed", error=str(exc))
            self.options = dataclasses.replace(self.options, preallocate=0)
            return
        self._allocated += grow

    def _trim(self) -> None:
        """Give back the reserved space after the last write (before a seal or close)."""
        if self._allocated > self._segment_size:
            os.ftruncate(self._fd, self._segment_size)
            os.fsync(self._fd)
            self._allocated = self._segment_size

    def _roll(self) -> None:
        """Seal the active segment and start the next one at the current size."""
        if self._fd >= 0:
            path = self.directory / segment_name(self._active_first())
            self._trim()
            os.close(self._fd)
            self._fd = -1
            seal_segment(path, self.options.set_append_only_flag)
        self._write_anchor()
        path = self.directory / segment_name(self._tree.size)
        _write_new_file(path, segment_header(self._tree.size))
        self._fd = os.open(path, os.O_WRONLY)
        self._segment_size = self._allocated = os.fstat(self._fd).st_size

    def _active_first(self) -> int:
        segs = sorted(p.name for p in self.directory.glob("seg-*.log"))
        return int(segs[-1][4:24])

    def _write_anchor(self) -> None:
        """Make the anchor hold the newest durable checkpoint (never an older one)."""
        size, note, _ = self._newest
        with self._anchor_lock:
            if note is None or size <= self._anchored:
                return
            nodes.atomic_write(self.directory / ANCHOR_FILE, note, mode=0o644)
            self._anchored, self._anchored_batches = size, self.batches

    def keep_anchor(self, stop: threading.Event) -> None:
        """Refresh the anchor while the ledger is open, until ``stop`` is set: once
        ``anchor_every_batches`` batches are newer than it, or once the oldest of them
        is ``anchor_every_seconds`` old.  The node runs this in a thread of its own, so
        the refresh (a write and two fsyncs) is never on an append's path."""
        period = self.options.anchor_every_seconds or None
        if period is None and not self.options.anchor_every_batches:
            return
        timeout = period
        while not stop.is_set() and not self._closed:
            woken = self._anchor_wake.wait(timeout)
            self._anchor_wake.clear()
            if stop.is_set() or self._closed:
                return
            size, _, since = self._newest
            timeout = period
            if size <= self._anchored:
                continue
            age = time.monotonic() - since
            if woken or (period is not None and age >= period):
                try:
                    self._write_anchor()
                except OSError as exc:  # the next refresh, roll or close tries again
                    log.warning("ledger.anchor_refresh_failed", error=str(exc))
            elif period is not None:
                timeout = period - age

    def wake_anchor_keeper(self) -> None:
        """Make :meth:`keep_anchor` look at its ``stop`` now."""
        self._anchor_wake.set()

    def _check_usable(self) -> None:
        if self._closed:
            raise LedgerUsageError("the ledger is closed")
        if self._failed is not None:
            raise LedgerFailed(f"an earlier write failed ({self._failed}); reopen the ledger")

    # ----------------------------------------------------------------- views
    @property
    def size(self) -> int:
        return self._tree.size

    def root(self) -> bytes:
        return self._tree.root()

    @property
    def latest_note(self) -> bytes | None:
        return self._latest_note

    @property
    def state(self) -> State:
        """The live state; read it only while no append is in flight (else use state_copy)."""
        return self._state

    def state_copy(self) -> State:
        """A copy of the live state between two batches."""
        with self._commit_lock:
            return self._state.copy()

    # ----------------------------------------------------------------- lifecycle
    def write_snapshot(self) -> Path:
        """Snapshot the state at the current size (a checkpoint boundary)."""
        with self._commit_lock:
            path = snapshot.write(self.directory, self._keys, self._prefix(), self._state)
            snapshot.prune(self.directory, self.options.keep_snapshots)
            self._snap_size = self._tree.size
            return path

    def _prefix(self) -> TrustedPrefix:
        return TrustedPrefix(self._tree.size, self._tree.root(), self._tree.frontier(),
                             self._prev, self._last_ts)

    def close(self) -> None:
        """Refuse new appends, let those already queued commit, then close the files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._idle.wait()
        self._anchor_wake.set()
        try:
            if self._failed is None:
                self._write_anchor()
                if self._tree.size - self._snap_size >= self.options.snapshot_every:
                    snapshot.write(self.directory, self._keys, self._prefix(), self._state)
                    snapshot.prune(self.directory, self.options.keep_snapshots)
        finally:
            if self._fd >= 0:
                try:
                    if self._failed is None:
                        self._trim()
                finally:
                    os.close(self._fd)
                    self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, buf: bytes, offset: int | None = None) -> None:
    """Write all of ``buf`` (at ``offset``, or at the file position)."""
    view = memoryview(buf)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def truncate_tail(tail: TornTail) -> None:
    """Cut the last segment back to where ``tail`` begins, durably."""
    fd = os.open(tail.segment, os.O_WRONLY)
    try:
        os.ftruncate(fd, tail.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_FILE = ".lock"


def lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on the ledger directory: one writer at a time."""
    if not list_segments(directory):
        raise LedgerCorrupt(str(directory), 0, None, "no segment files: not a ledger")
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(6):  # a reader's probe (writer_active) holds it for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt < 5:
                time.sleep(0.02)
    os.close(fd)
    raise LedgerUsageError(f"{directory} is open for writing in another process; "
                           "stop that node first")


def writer_active(directory: Path) -> bool:
    """Whether a process holds the ledger open for writing (its directory lock).

    A shared lock taken and dropped at once: a writer starting in that instant is
    told the ledger is open elsewhere, and may simply try again.
    """
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return False


def _newest_snapshot(directory: Path, public_key: bytes) -> snapshot.Snapshot | None:
    for path in snapshot.listing(directory):
        try:
            return snapshot.load(path, public_key)
        except snapshot.SnapshotError as exc:
            log.warning("ledger.snapshot_skipped", reason=str(exc))
    return None


def read_note_at(where: tuple[Path, int]) -> bytes:
    """The checkpoint note stored in the frame at (segment, offset), as a pass found it."""
    path, off = where
    try:
        fd = open_regular(path)
    except FileProblem as exc:
        raise LedgerCorrupt(path.name, off, None, exc.reason) from None
    try:
        head = pread_exact(fd, path, off, FRAME_HEADER.size)
        length = FRAME_HEADER.unpack(head)[0] if len(head) == FRAME_HEADER.size else 0
        if not 0 < length <= MAX_FRAME:
            raise LedgerCorrupt(path.name, off, None, "checkpoint frame changed under the reader")
        return pread_exact(fd, path, off + FRAME_HEADER.size, length)[1:]
    finally:
        os.close(fd)


def note_checkpoint(note: bytes, scan: ScanResult) -> Checkpoint:
    """Open a checkpoint note with the signer the scanned ledger's genesis names."""
    assert scan.genesis is not None
    verifier = NoteVerifier.from_string(verifier_key(scan.genesis.origin,
                                                     scan.genesis.signing_key))
    return open_checkpoint(note, verifier)


def _check_snapshot(scan: ScanResult, snap: snapshot.Snapshot | None) -> None:
    if snap is None:
        return
    where = scan.notes.get(snap.tree_size)
    if where is None:
        raise LedgerCorrupt(snap.path.name, 0, snap.tree_size - 1,
                            f"snapshot at size {snap.tree_size} matches no checkpoint in the "
                            f"log (committed size {scan.size})")
    if note_checkpoint(read_note_at(where), scan).root_hash != snap.root:
        raise LedgerCorrupt(snap.path.name, 0, snap.tree_size - 1,
                            "snapshot root differs from the log's checkpoint at that size")


def read_anchor(directory: Path) -> bytes | None:
    """The stored ``checkpoint`` file (None if there is none); bounded, regular files only."""
    try:
        return read_bounded(directory / ANCHOR_FILE, MAX_NOTE_SIZE, "a checkpoint note")
    except FileProblem as exc:
        raise LedgerCorrupt(ANCHOR_FILE, 0, None, f"stored checkpoint {exc.reason}") from None


def check_anchor(scan: ScanResult, anchor: bytes | None) -> int:
    """The stored ``checkpoint`` file (``anchor``, as :func:`read_anchor` gave it; None:
    there is none) must equal the log's own checkpoint at its size; returns that size.

    A log with more than its first segment has rolled, and every roll writes the
    anchor: without one, it was deleted.  A reader of a log a writer may extend
    reads the anchor before the log.
    """
    if anchor is None:
        if len(scan.segments) > 1:
            raise LedgerCorrupt(ANCHOR_FILE, 0, None, (
                f"missing, though the log has {len(scan.segments)} segments and every "
                "segment roll writes it: it was deleted, perhaps to hide a rollback"))
        return 0
    try:
        cp = note_checkpoint(anchor, scan)
    except NoteError as exc:
        raise LedgerCorrupt(ANCHOR_FILE, 0, None, f"stored checkpoint: {exc}") from None
    if cp.size > scan.size:
        raise LedgerCorrupt(ANCHOR_FILE, 0, cp.size - 1, (
            f"the log is shorter than its stored checkpoint: {scan.size} committed records, "
            f"the checkpoint is for {cp.size}: records were cut off (a rollback, or a lost "
            "tail)"))
    where = scan.notes.get(cp.size)
    if where is None or read_note_at(where) != anchor:
        raise LedgerCorrupt(ANCHOR_FILE, 0, cp.size - 1, (
            f"the stored checkpoint (size {cp.size}) is not the log's own checkpoint at that "
            f"size (committed size {scan.size}): the log was rewritten (a fork)"))
    return cp.size


def clear_leftovers(directory: Path) -> list[str]:
    """Remove what a kill inside an atomic write leaves (``*.tmp`` beside the anchor,
    nodes.jsonl and the snapshots); returns their names.  Only the writer calls it."""
    gone = []
    for folder in (directory, directory / snapshot.SNAPSHOT_DIR):
        try:
            names = [p for p in folder.iterdir() if p.name.endswith(LEFTOVER_SUFFIX)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for p in names:
            if p.is_dir() and not p.is_symlink():
                continue
            p.unlink(missing_ok=True)
            gone.append(str(p.relative_to(directory)))
    if gone:
        log.info("ledger.leftovers_removed", files=gone)
    return gone
