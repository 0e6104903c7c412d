"""Read and verify a ledger directory, frame by frame.

One reader serves every consumer -- opening for writing, ``ppn ledger verify``,
``show``, ``state`` and ``prove`` -- so there is one definition of "valid".  It
yields only *committed* records (those a checkpoint covers) and classifies what
is wrong:

* a damaged or uncommitted tail of the last segment (a crash mid-write) is a
  :class:`TornTail`: reported, and truncated when the ledger is opened for writing;
* anything else -- a bad checksum or hash mid-log, a sequence gap, a bad
  signature, a checkpoint that does not match -- raises :class:`LedgerCorrupt`
  naming the segment, offset, sequence number and reason.
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import struct
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import nacl.bindings
import nacl.exceptions

from ledger.catalog import REGISTRY, LedgerGenesis
from ledger.errors import LedgerDataError
from ledger.events import EventRegistry, packer
from ledger.files import (
    FileProblem,
    file_size,
    open_regular,
    pread_exact,
    size_or_zero,
    written_end,
)
from ledger.merkle import CompactTree
from ledger.note import (
    Checkpoint,
    NoteError,
    NoteVerifier,
    checkpoint_text,
    lone_signature,
    open_checkpoint,
    open_note,
    stated_checkpoint,
    verifier_key,
)
from ledger.records import (
    FRAME_HEADER,
    GRANT_SIGNING_CONTEXT,
    KIND_CHECKPOINT,
    KIND_RECORD,
    MAX_FRAME,
    MAX_SEGMENT_BYTES,
    SEGMENT_HEADER,
    ZERO_HASH,
    FrameError,
    Record,
    decode_record,
    event_slice,
    parse_segment_header,
)

SEGMENT_RE = re.compile(r"^seg-(\d{20})\.log$")

READ_CHUNK = 16 << 20
"""Bytes of a segment a pass reads at a time: what a pass holds in memory, beside the
batch it is reading (a batch that spans two reads keeps both)."""


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.log"


class LedgerCorrupt(LedgerDataError):
    """The log is inconsistent somewhere other than a torn tail; it will not open for writing."""

    def __init__(self, segment: str, offset: int, seq: int | None, reason: str) -> None:
        self.segment, self.offset, self.seq, self.reason = segment, offset, seq, reason
        where = f"seq {seq}" if seq is not None else "seq -"
        super().__init__(f"{segment} offset {offset} ({where}): {reason}")


class LedgerNotInitialised(LedgerCorrupt):
    """The directory holds only a first segment whose creation never committed (a
    genesis record, or part of one, that no checkpoint covers): a ``Ledger.create``
    torn by a crash.  Nothing was ever acknowledged; ``ppn node init`` may redo it."""


class DamagedLastBatch(LedgerCorrupt):
    """A frame of the last batch is damaged while the batch's own checkpoint survived.

    Unlike a torn tail (whose checkpoint never reached the disk, so the batch was
    never acknowledged) the batch may have been acknowledged: the same bytes are what
    a torn write with pages reaching the disk out of order leaves, and what rot of
    an acknowledged batch looks like.  The node does not guess; dropping the batch is
    an operator's decision (``ppn ledger recover DIR --drop-last-batch``), recorded
    in the log.  ``tail`` is what dropping it would truncate; ``records`` how many
    records the surviving checkpoint says the batch held (None if it cannot tell).
    """

    def __init__(self, segment: str, offset: int, seq: int | None, reason: str,
                 tail: TornTail, records: int | None) -> None:
        self.tail, self.records, self.found = tail, records, reason
        n = "?" if records is None else str(records)
        super().__init__(segment, offset, seq, (
            f"{reason} inside the last batch ({n} records from seq {seq}, "
            f"{tail.dropped_bytes} bytes) whose own checkpoint is intact: a write torn with "
            "its pages reaching the disk out of order, or damage to an acknowledged batch. "
            "To keep them, restore the segment from a copy; to drop them, run `ppn ledger "
            "recover DIR --drop-last-batch` (recorded in the log)"))


@dataclass(frozen=True)
class TornTail:
    """Bytes at the end of the last segment that no checkpoint covers."""

    segment: Path
    offset: int
    dropped_bytes: int
    dropped_records: int
    reason: str

    def describe(self) -> str:
        return (f"{self.segment.name} offset {self.offset}: {self.dropped_bytes} bytes "
                f"({self.dropped_records} complete uncommitted records) after the last "
                f"checkpoint: {self.reason}")


@dataclass
class SegmentInfo:
    path: Path
    first_seq: int
    committed_end: int


class NoteIndex:
    """Where each checkpoint is: tree size -> (segment, offset), in compact arrays.

    A ledger written by one appender has a checkpoint per record; a dict of tuples
    would cost ~200 bytes each, these arrays 18.
    """

    def __init__(self) -> None:
        self._sizes = array("q")
        self._offsets = array("q")
        self._segments = array("H")
        self._paths: list[Path] = []

    def add(self, size: int, path: Path, offset: int) -> None:
        if not self._paths or self._paths[-1] != path:
            self._paths.append(path)
        self._sizes.append(size)
        self._offsets.append(offset)
        self._segments.append(len(self._paths) - 1)

    def get(self, size: int) -> tuple[Path, int] | None:
        i = bisect_left(self._sizes, size)
        if i == len(self._sizes) or self._sizes[i] != size:
            return None
        return self._paths[self._segments[i]], self._offsets[i]

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and self.get(size) is not None

    def __iter__(self) -> Iterator[int]:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)


@dataclass
class ScanResult:
    """What a full pass over the log established."""

    segments: list[SegmentInfo] = field(default_factory=list)
    tree: CompactTree = field(default_factory=CompactTree)
    prev_hash: bytes = ZERO_HASH
    last_ts: int = 0
    genesis: LedgerGenesis | None = None
    checkpoints: int = 0
    last_note: bytes | None = None
    notes: NoteIndex = field(default_factory=NoteIndex)
    tail: TornTail | None = None
    leaves: list[bytes] | None = None
    count: int = 0
    """Committed records: those the last intact checkpoint covers."""

    @property
    def size(self) -> int:
        return self.count


class Entry(NamedTuple):
    """A committed record as the reader yields it (``leaf`` is empty unless verifying)."""

    seq: int
    ts_ns: int
    body: bytes
    leaf: bytes
    signature: bytes | None
    event: Any

    @property
    def event_bytes(self) -> bytes:
        return event_slice(self.body, self.seq, self.ts_ns, self.signature is not None)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir():
        m = SEGMENT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_grant(public_key: bytes, event_bytes: bytes, signature: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(signature + GRANT_SIGNING_CONTEXT + event_bytes,
                                       public_key)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


@dataclass(frozen=True)
class TrustedPrefix:
    """What a verified snapshot vouches for: the log up to ``size`` records.

    A reader given one only checksums that prefix (no hashing, no decoding), takes
    the Merkle frontier, last hash and timestamp from here, and checks that the
    log's own signed checkpoint at ``size`` has this ``root``.
    """

    size: int
    root: bytes
    frontier: tuple[bytes, ...]
    prev_hash: bytes
    last_ts: int


Item = tuple[int, int, Any, "bytes | None", int, int]
"""A committed record as a pass hands it on: (seq, ts_ns, event, signature, body start,
body end) -- the body's place in the bytes of the read it came in (see _Batch.parts)."""


class _Segment:
    """One segment file open for a pass: a regular file, read in bounded pieces.

    ``size`` is what the pass considers of it (its length, or less if limited);
    ``end`` the offset after its last frame's bytes: for the last segment, where the
    written bytes end (the rest is space reserved ahead of the writes), found
    without reading the zeros of a sparse file; for a sealed segment, ``size``.
    """

    def __init__(self, path: Path, limit: int | None, last: bool) -> None:
        self.path, self.last = path, last
        try:
            self.fd = open_regular(path)
        except FileProblem as exc:
            raise LedgerCorrupt(path.name, 0, None, exc.reason) from None
        try:
            size = file_size(self.fd, path)
            self.size = size if limit is None else min(size, limit)
            self.end = written_end(self.fd, path, self.size) if last else self.size
            if self.end > MAX_SEGMENT_BYTES:
                raise LedgerCorrupt(path.name, 0, None, (
                    f"segment holds {self.end} bytes, more than the format allows "
                    f"({MAX_SEGMENT_BYTES})"))
        except FileProblem as exc:
            self.close()
            raise LedgerCorrupt(path.name, 0, None, exc.reason) from None
        except BaseException:
            self.close()
            raise
        self._written: int | None = self.end if last else None

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``; fewer only past ``end``, else the file shrank."""
        try:
            data = pread_exact(self.fd, self.path, offset, n)
        except FileProblem as exc:
            raise LedgerCorrupt(self.path.name, offset, None, exc.reason) from None
        if len(data) < n and offset + len(data) < self.end:
            raise LedgerCorrupt(self.path.name, offset + len(data), None,
                                "the segment shrank while it was read (a writer truncated "
                                "it); read it again")
        return data

    def written(self) -> int:
        """Where the written bytes end (the last non-zero byte), for classifying damage."""
        if self._written is None:
            try:
                self._written = written_end(self.fd, self.path, self.size)
            except FileProblem as exc:
                raise LedgerCorrupt(self.path.name, 0, None, exc.reason) from None
        return self._written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_CREATION_MAX = 64 << 10
"""More written bytes than a torn ``Ledger.create`` can leave in the first segment (a
header, the genesis record and its checkpoint take well under 2 KiB)."""


def _any_checkpoint_frame(seg: _Segment, start: int) -> bool:
    """Whether any checkpoint frame with a valid checksum lies after ``start`` in a small
    first segment whose genesis is unreadable (so its origin, the note's first line, is
    unknown): every ``C`` byte is tried as a frame's kind."""
    data = seg.read(0, seg.end)
    q = data.find(bytes((KIND_CHECKPOINT,)), start + 8)
    while q >= 0:
        length, crc = FRAME_HEADER.unpack_from(data, q - 8)
        if 0 < length <= len(data) - q and zlib.crc32(data[q:q + length]) == crc:
            return True
        q = data.find(bytes((KIND_CHECKPOINT,)), q + 1)
    return False


def _signed(note: bytes, verifier: NoteVerifier) -> bool:
    try:
        open_note(note, [verifier])
    except NoteError:
        return False
    return True


class _Batch(NamedTuple):
    """The records one checkpoint commits, as the inner loop leaves them."""

    parts: list[tuple[int, bytes]]
    """(index of the first item, the bytes its body offsets point into) per read the
    batch spans: one, unless it crossed the end of a read."""
    items: list[Item]
    """(seq, ts_ns, event, signature, body start, body end) per record."""
    leaves: list[bytes]
    """Leaf hashes, one per item, when verifying; else empty."""
    size: int
    """Tree size after this batch."""


class LogReader:
    """One pass over a ledger directory: iterate :meth:`entries` (or call :meth:`fold`),
    then read :attr:`result`.

    ``verify=True`` (the default) checks everything: checksums, the hash chain,
    the Merkle tree, every grant and checkpoint signature, and decodes every event
    strictly.  ``verify=False`` is a replay: checksums, sequence and strict event
    decoding, but no hashing or signatures (``ppn ledger verify`` is the audit).
    ``decode=False`` (with ``verify``) skips building events -- the tree
    half of a parallel audit (:mod:`ledger.verifier`); entries then carry
    ``event=None`` except the genesis record.
    ``canonical`` and ``grants`` (both default to ``verify``) check that each record
    is in canonical encoding, and that exactly the signed event types carry a grant
    signature and it verifies; the halves of a parallel audit split the checks.
    ``note_signatures=(k, m)`` checks the signatures of checkpoints number k, k + m,
    k + 2m, ... only (default: all of them when verifying, none otherwise); what else
    a verifying pass checks of every checkpoint -- size, origin, root -- it still does.
    ``trusted`` skips the work for a prefix a verified snapshot covers.
    ``pinned_key``: if given, the genesis record must name exactly this signer.
    ``limits``: read only this many bytes of the named segments (what a parallel
    pass agreed on; a segment beyond them is not read).
    """

    def __init__(self, directory: Path, *, registry: EventRegistry = REGISTRY,
                 verify: bool = True, decode: bool = True, canonical: bool | None = None,
                 grants: bool | None = None, note_signatures: tuple[int, int] | None = None,
                 trusted: TrustedPrefix | None = None,
                 pinned_key: bytes | None = None, collect_leaves: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 limits: dict[str, int] | None = None) -> None:
        if collect_leaves and (not verify or trusted is not None):
            raise ValueError("leaf hashes are only collected by a full verifying pass")
        if not decode and not verify:
            raise ValueError("a pass that neither decodes nor verifies checks nothing")
        self.directory = directory
        self.registry = registry
        self.verify = verify
        self.decode = decode
        self.canonical = verify if canonical is None else canonical
        self.grants = verify if grants is None else grants
        self.note_signatures = note_signatures
        self.trusted = trusted
        self.pinned_key = pinned_key
        self.progress = progress
        self.limits = limits
        self.result = ScanResult(leaves=[] if collect_leaves else None)
        self._verifier: NoteVerifier | None = None
        self._genesis_event: LedgerGenesis | None = None
        self._first_end = 0  # written bytes of the first segment
        self._key = b""
        # Working state: runs ahead of ``result`` by the records of the open batch.
        self._n = 0
        self._tree = CompactTree()
        self._prev = ZERO_HASH
        self._ts = 0
        # tag -> (current version, generated builder, signed?) for the inner loop.
        self._fast = {et.tag: (et.version, et.build, et.signed) for et in registry}
        self._done = self._total = 0

    def segments(self) -> list[tuple[int, Path, int | None]]:
        """(first seq, path, most bytes to read or None: all) of the segments this pass reads."""
        segs = list_segments(self.directory)
        if self.limits is None:
            return [(first, p, None) for first, p in segs]
        return [(first, p, self.limits[p.name]) for first, p in segs if p.name in self.limits]

    def entries(self) -> Iterator[Entry]:
        """Committed records, in order (each batch once its checkpoint has been read)."""
        for batch in self._batches():
            items, leaves, parts = batch.items, batch.leaves, batch.parts
            for k, (first, data) in enumerate(parts):
                last = parts[k + 1][0] if k + 1 < len(parts) else len(items)
                for i in range(first, last):
                    seq, ts, event, sig, a, b = items[i]
                    yield Entry(seq, ts, data[a:b], leaves[i] if leaves else b"", sig, event)

    def fold(self, state: Any, apply_items: Callable[[Any, list[Item], int], int],
             start: int = 0, on_commit: Callable[[int], None] | None = None) -> int:
        """Apply every committed record from seq ``start`` on; returns how many.

        The same pass as :meth:`entries` without making an :class:`Entry` per record:
        ``apply_items(state, items, start)`` (such as :func:`ledger.state.apply_items`)
        gets each committed batch as ``(seq, ts_ns, event, signature, _, _)`` tuples.
        ``on_commit(size)`` is called after each committed batch is applied.
        """
        n = 0
        for batch in self._batches():
            try:
                n += apply_items(state, batch.items, start)
            except Exception as exc:  # the fold is total; if it is not, name the records
                first = batch.items[0][0] if batch.items else batch.size
                where = self.result.notes.get(batch.size)
                raise LedgerCorrupt(where[0].name if where else str(self.directory),
                                    where[1] if where else 0, first, (
                    f"the state fold cannot apply records {first}..{batch.size - 1}: "
                    f"{type(exc).__name__}: {exc} (a bug in the fold)")) from None
            if on_commit is not None:
                on_commit(batch.size)
        return n

    def run(self) -> ScanResult:
        """The whole pass, for its :attr:`result` only."""
        for _ in self._batches():
            pass
        return self.result

    def _batches(self) -> Iterator[_Batch]:
        segs = self.segments()
        if not segs:
            raise LedgerCorrupt(str(self.directory), 0, None, "no segment files: not a ledger")
        self._total = sum(size_or_zero(p) if limit is None else limit for _, p, limit in segs)
        gc_was_on = gc.isenabled()
        gc.disable()  # a scan allocates millions of short-lived, acyclic objects
        try:
            for i, (first, path, limit) in enumerate(segs):
                seg = _Segment(path, limit, last=i == len(segs) - 1)
                try:
                    yield from self._segment(seg, first)
                finally:
                    seg.close()
                self._done += seg.end
                if self.progress:
                    self.progress(self._done, self._total)
        finally:
            if gc_was_on:
                gc.enable()
        if self.result.genesis is None:
            name = segs[0][1].name
            if len(segs) == 1 and segs[0][0] == 0 and self._first_end <= _CREATION_MAX:
                raise LedgerNotInitialised(name, SEGMENT_HEADER.size, 0, (
                    "not initialised: no checkpoint covers the genesis record (the ledger's "
                    "creation never committed); `ppn node init` can redo it"))
            raise LedgerCorrupt(name, SEGMENT_HEADER.size, 0, "no committed genesis record")
        if self.trusted is not None and self.result.count < self.trusted.size:
            raise LedgerCorrupt(segs[-1][1].name, 0, self.result.count,
                                f"the log is shorter ({self.result.count} records) than its "
                                f"snapshot ({self.trusted.size})")

    def _segment(self, seg: _Segment, first: int) -> Iterator[_Batch]:
        res = self.result
        path, last = seg.path, seg.last
        if first == 0:
            self._first_end = seg.end
        head = seg.read(0, SEGMENT_HEADER.size)
        try:
            declared = parse_segment_header(head)
        except FrameError as exc:
            if last and first == res.count and (seg.size < SEGMENT_HEADER.size
                                                or seg.end == 0):
                res.tail = TornTail(path, 0, seg.size, 0, f"torn segment header ({exc})")
                res.segments.append(SegmentInfo(path, first, 0))
                return
            raise LedgerCorrupt(path.name, 0, None, str(exc)) from None
        if declared != first or first != res.count:
            raise LedgerCorrupt(path.name, 0, first, f"segment starts at seq {declared} (name "
                                f"says {first}); expected {res.count}: records are missing")
        info = SegmentInfo(path, first, SEGMENT_HEADER.size)
        res.segments.append(info)
        items: list[Item] = []
        leaves: list[bytes] = []
        parts: list[tuple[int, bytes]] = []  # earlier reads the open batch's items point into
        part_first = 0
        win, off = 0, SEGMENT_HEADER.size  # the read window starts at file offset ``win``
        unpack_header, crc32 = FRAME_HEADER.unpack_from, zlib.crc32
        sha256 = hashlib.sha256
        pack = packer()
        fast = self._fast
        verify, decode, canonical, grants = self.verify, self.decode, self.canonical, self.grants
        skip_below = self.trusted.size if self.trusted is not None else 0
        skipping = skip_below > 0
        progress = self.progress
        key = self._key
        record_kind, max_frame = KIND_RECORD, MAX_FRAME
        add = items.append
        # The inner loop keeps the chain in locals, handing them back to the reader
        # before any slow path (which reads them) and at each checkpoint.
        n, prev, last_ts = self._n, self._prev, self._ts
        need = READ_CHUNK
        while True:
            data = seg.read(win, min(need, seg.end - win))
            end, more = len(data), win + len(data) < seg.end
            view = memoryview(data)
            # One streaming unpacker per read, kept at ``off`` between frames: cheaper
            # per record than an unpackb call (which parses its options every time).
            stream = _stream(view, off)
            read, unpack_next, tell = stream.read_bytes, stream.unpack, stream.tell
            base = off
            while off < end:
                # Fast path: a sound frame; anything else goes to _frame_problem for the reason.
                try:
                    length, crc = unpack_header(data, off)
                except struct.error:  # fewer than 8 bytes left
                    length = crc = 0
                stop = off + 8 + length
                if not (0 < length <= max_frame and stop <= end
                        and crc32(view[off + 8:stop]) == crc):
                    if more and (off + 8 > end or (0 < length <= max_frame and stop > end)):
                        break  # the frame goes on past this read
                    self._n, self._prev, self._ts = n, prev, last_ts
                    self._bad_frame(seg, info, win + off)
                    return
                kind = data[off + 8]
                if kind == record_kind:
                    if skipping and 0 < n < skip_below:
                        read(stop - off)
                        n += 1
                        off = stop
                        continue
                    # Fast path: one unpack and inline checks of a current-version record;
                    # anything else (an old version to upcast, or something wrong) takes
                    # _record, which decodes step by step and says precisely what is wrong.
                    event: Any = None
                    at = -1
                    try:
                        read(9)
                        rec = unpack_next()
                        at = base + tell()
                        r_seq, ts, prev_h, ev, sig = rec
                        tag, version, fields = ev
                        version_now, build, signed = fast[tag]
                        ok = (type(r_seq) is int and r_seq == n and type(ts) is int and ts >= 0
                              and type(prev_h) is bytes and len(prev_h) == 32
                              and (sig is None or (type(sig) is bytes and len(sig) == 64))
                              and type(ev) is tuple and type(version) is int
                              and version == version_now
                              and type(fields) is dict and n > skip_below and at == stop)
                        if ok and decode:
                            event = build(fields)
                            ok = event is not None
                        if ok and canonical:
                            ok = pack(rec) == data[off + 9:stop]
                        if ok and verify:
                            ok = prev_h == prev and ts >= last_ts
                        if ok and grants:
                            ok = signed == (sig is not None) and (sig is None or verify_grant(
                                key, event_slice(data[off + 9:stop], n, ts, True), sig))
                    except Exception:  # msgpack raises several unrelated types; so does unpacking
                        ok = False
                    if ok:
                        if verify:
                            prev = sha256(view[off + 8:stop]).digest()
                            leaves.append(prev)
                            last_ts = ts
                        add((n, ts, event, sig, off + 9, stop))
                    else:
                        self._n, self._prev, self._ts = n, prev, last_ts
                        item, leaf = self._record(path, win + off, view[off + 8:stop])
                        key = self._key  # the genesis record sets it
                        if verify:
                            prev, last_ts = leaf, item[1]
                            leaves.append(leaf)
                        add((*item, off + 9, stop))
                        if at != stop:  # the record was not one msgpack object: resynchronise
                            stream = _stream(view, stop)
                            read, unpack_next, tell = stream.read_bytes, stream.unpack, stream.tell
                            base = stop
                    n += 1
                elif kind == KIND_CHECKPOINT:
                    read(stop - off)
                    self._n, self._prev, self._ts = n, prev, last_ts
                    if verify and leaves:
                        self._tree.extend(leaves)
                    self._checkpoint(path, win + off, data[off + 9:stop])
                    if res.leaves is not None:
                        res.leaves.extend(leaves)
                    info.committed_end = win + stop
                    parts.append((part_first, data))
                    yield _Batch(parts, items, leaves, n)
                    items, leaves, parts, part_first = [], [], [], 0
                    add = items.append
                    if progress:
                        progress(self._done + win + stop, self._total)
                else:
                    raise LedgerCorrupt(path.name, win + off, None,
                                        f"unknown frame kind {kind:#04x}")
                off = stop
            if not more:
                break
            if part_first < len(items):  # the open batch has items in this read: keep it
                parts.append((part_first, data))
                part_first = len(items)
            # the next read starts at the unfinished frame and holds all of it
            need = max(READ_CHUNK, 8 + length if off + 8 <= end else 8)
            win, off = win + off, 0
        self._n, self._prev, self._ts = n, prev, last_ts
        if n != res.count:
            if last:
                self._torn(info, seg.size, "records after the last checkpoint (a batch "
                           "whose commit did not finish)")
                return
            raise LedgerCorrupt(path.name, info.committed_end, res.count,
                                "sealed segment ends with records no checkpoint covers")

    def _bad_frame(self, seg: _Segment, info: SegmentInfo, off: int) -> None:
        """The frame at file offset ``off`` is unsound: a torn tail (recorded), or raise.

        A torn write damages only the last batch, which ends at its checkpoint, and
        leaves zeros where its pages did not reach the disk.  So damage in the last
        segment is a torn tail if no checkpoint frame follows it (nothing after it was
        ever committed), or if it looks torn and only the batch's own checkpoint,
        damaged, follows; :class:`DamagedLastBatch` if it looks torn and the one
        checkpoint after it is intact, signed and the segment's last frame (the batch
        may have been acknowledged); anything else is :class:`LedgerCorrupt`.
        Any second checkpoint frame after the damage, even a damaged one, means an
        earlier batch -- acknowledged before the next was written -- is damaged.
        """
        reason, maybe_torn = _frame_problem(seg, off)
        if seg.last and self._genesis_event is None:  # the first batch: a torn creation?
            if seg.end <= _CREATION_MAX and not _any_checkpoint_frame(seg, off):
                self._torn(info, seg.size, reason)
                return
        elif seg.last:
            marks = self._checkpoint_marks(seg, off)
            if not marks or (maybe_torn and len(marks) == 1 and not marks[0][2]):
                self._torn(info, seg.size, reason)  # nothing after it was ever committed
                return
            if (maybe_torn and len(marks) == 1 and marks[0][2] and marks[0][1] == seg.end
                    and marks[0][0] > off and self.result.genesis is not None):
                self._damaged_last_batch(seg, info, off, reason, marks[0][3])
        raise LedgerCorrupt(seg.path.name, off, self._n, reason)

    def _damaged_last_batch(self, seg: _Segment, info: SegmentInfo, off: int, reason: str,
                            size: int | None) -> None:
        tail = TornTail(seg.path, info.committed_end, seg.end - info.committed_end, 0, reason)
        records = None if size is None else size - self.result.count
        raise DamagedLastBatch(seg.path.name, off, self.result.count, reason, tail, records)

    def _checkpoint_marks(self, seg: _Segment, start: int
                          ) -> list[tuple[int, int, bool, int | None]]:
        """Checkpoint frames from ``start`` on, found by the note's first line (this
        log's origin), intact or not: (frame start, end, intact and signed, size).

        Stops at two: more are never needed to classify damage.  An event may hold the
        same bytes; that can only make damage look worse (refused, never truncated).
        """
        assert self._genesis_event is not None
        marker = bytes((KIND_CHECKPOINT,)) + self._genesis_event.origin.encode() + b"\n"
        marks: list[tuple[int, int, bool, int | None]] = []
        pos = start
        while pos < seg.end and len(marks) < 2:
            block = seg.read(pos, min(READ_CHUNK, seg.end - pos))
            if len(block) <= len(marker):
                break
            q = block.find(marker)
            while q >= 0 and len(marks) < 2:
                if pos + q >= 8 and all(m[0] != pos + q - 8 for m in marks):
                    marks.append(self._mark(seg, pos + q))  # (reads overlap: once each)
                q = block.find(marker, q + 1)
            pos += len(block) - len(marker)
        return marks

    def _mark(self, seg: _Segment, at: int) -> tuple[int, int, bool, int | None]:
        length, crc = FRAME_HEADER.unpack(seg.read(at - 8, 8))
        end = at + length
        if not 0 < length <= MAX_FRAME or end > seg.end:
            return at - 8, end, False, None
        body = seg.read(at, length)
        note = body[1:]
        intact = zlib.crc32(body) == crc and self._verifier is not None and _signed(
            note, self._verifier)
        stated = stated_checkpoint(note) if intact else None
        return at - 8, end, intact, None if stated is None else stated.size

    def _torn(self, info: SegmentInfo, file_size: int, reason: str) -> None:
        res = self.result
        res.tail = TornTail(info.path, info.committed_end, file_size - info.committed_end,
                            self._n - res.count, reason)

    def _record(self, path: Path, off: int, leaf_input: memoryview
                ) -> tuple[tuple[int, int, Any, bytes | None], bytes]:
        """The careful path for one record: (seq, ts_ns, event, signature) and its leaf
        hash, or LedgerCorrupt.

        Decodes step by step in the order the checks are specified, so the error
        names the first thing wrong; also upcasts events of older versions.
        """
        seq = self._n
        body = leaf_input[1:].tobytes()
        try:
            rec, ev_obj = decode_record(body, canonical=self.canonical)
        except FrameError as exc:
            raise LedgerCorrupt(path.name, off, seq, str(exc)) from None
        if rec.seq != seq:
            raise LedgerCorrupt(path.name, off, seq, f"record says seq {rec.seq}; "
                                f"expected {seq} (gap, duplicate or reordering)")
        event: Any = None
        if self.decode or seq == 0:
            try:
                event = self.registry.from_obj(ev_obj, None)
            except LedgerDataError as exc:
                raise LedgerCorrupt(path.name, off, seq, str(exc)) from None
        if seq == 0:
            self._genesis(path, off, event)
        elif self.trusted is not None and seq == self.trusted.size:
            t = self.trusted
            self._tree = CompactTree(t.frontier, t.size)
            self._prev, self._ts = t.prev_hash, t.last_ts
        leaf = b""
        if self.verify:
            leaf = self._chain(path, off, rec, leaf_input)
        if self.grants:
            self._grant(path, off, rec, body, ev_obj)
        return (seq, rec.ts_ns, event, rec.signature), leaf

    def _chain(self, path: Path, off: int, rec: Record, leaf_input: memoryview) -> bytes:
        """Hash chain and timestamps; the Merkle leaf."""
        if rec.prev_hash != self._prev:
            raise LedgerCorrupt(path.name, off, rec.seq, "hash chain broken: prev_hash is "
                                "not the hash of the record before")
        if rec.ts_ns < self._ts:
            raise LedgerCorrupt(path.name, off, rec.seq, "timestamp goes backwards")
        return hashlib.sha256(leaf_input).digest()

    def _grant(self, path: Path, off: int, rec: Record, body: bytes, ev_obj: Any) -> None:
        """Exactly the signed event types carry a signature, and it verifies."""
        seq = rec.seq
        tag = ev_obj[0] if type(ev_obj) is tuple and ev_obj else None
        fast = self._fast.get(tag) if type(tag) is str else None
        signed = fast is not None and fast[2]
        if signed != (rec.signature is not None):
            raise LedgerCorrupt(path.name, off, seq, f"{tag} record must "
                                f"{'' if signed else 'not '}carry a signature")
        if rec.signature is not None and not verify_grant(
                self._key, event_slice(body, seq, rec.ts_ns, True), rec.signature):
            raise LedgerCorrupt(path.name, off, seq, f"{tag}: signature does not verify "
                                "with the ledger's key")

    def _genesis(self, path: Path, off: int, event: Any) -> None:
        if not isinstance(event, LedgerGenesis) or len(event.signing_key) != 32:
            raise LedgerCorrupt(path.name, off, 0, "record 0 is not a valid ledger.genesis")
        if self.pinned_key is not None and event.signing_key != self.pinned_key:
            raise LedgerCorrupt(path.name, off, 0, "ledger is signed by a different key "
                                "than the one pinned")
        self._genesis_event = event  # the ledger's genesis once a checkpoint commits it
        self._key = event.signing_key
        try:
            self._verifier = NoteVerifier.from_string(
                verifier_key(event.origin, event.signing_key))
        except NoteError as exc:
            raise LedgerCorrupt(path.name, off, 0, f"genesis origin unusable: {exc}") from None

    def _checkpoint(self, path: Path, off: int, note: bytes) -> None:
        res = self.result
        size, batch = self._n, self._n - res.count
        if self._verifier is None or self._genesis_event is None:
            raise LedgerCorrupt(path.name, off, None, "checkpoint before the genesis record")
        res.genesis = self._genesis_event
        if batch == 0:
            raise LedgerCorrupt(path.name, off, size - 1, "checkpoint covers no new records")
        t = self.trusted
        skipped = t is not None and size < t.size
        share = self.note_signatures
        sign = self.verify if share is None else res.checkpoints % share[1] == share[0]
        if self.verify and not skipped:
            self._check_note(path, off, note, size, batch, sign)
        elif sign and not skipped:
            self._check_note_signature(path, off, note)
        res.count = size
        if t is not None and size == t.size:
            res.tree = CompactTree(t.frontier, t.size)
            res.prev_hash, res.last_ts = t.prev_hash, t.last_ts
        elif self.verify and not skipped:
            # the reader's tree only grows here, at checkpoints: it is the committed one
            res.tree, res.prev_hash, res.last_ts = self._tree, self._prev, self._ts
        res.checkpoints += 1
        res.last_note = note
        res.notes.add(size, path, off)

    def _check_note(self, path: Path, off: int, note: bytes, size: int, batch: int,
                    sign: bool) -> None:
        """The checkpoint after a batch names this log's origin, size and root (and,
        with ``sign``, carries a valid signature by the log's key)."""
        res = self.result
        assert self._verifier is not None and res.genesis is not None
        if self.trusted is not None and size == self.trusted.size:
            expected = self.trusted.root
        else:
            expected = self._tree.root()
        # Fast path: exactly the note this log's writer makes for this tree.
        text = checkpoint_text(res.genesis.origin, size, expected)
        sig = lone_signature(note, text, self._verifier)
        if sig is not None and (not sign or self._verifier.verify(text, sig)):
            return
        try:
            cp: Checkpoint = open_checkpoint(note, self._verifier)
        except NoteError as exc:
            raise LedgerCorrupt(path.name, off, None, f"checkpoint: {exc}") from None
        if cp.size != size or cp.origin != res.genesis.origin:
            raise LedgerCorrupt(path.name, off, size - 1, f"checkpoint for size {cp.size} "
                                f"origin {cp.origin!r} where the log has {size} records "
                                f"({batch} new)")
        if cp.root_hash != expected:
            raise LedgerCorrupt(path.name, off, size - 1, f"checkpoint root for size {size} "
                                "does not match the records")

    def _check_note_signature(self, path: Path, off: int, note: bytes) -> None:
        """Only the signature of a checkpoint (another pass checks what it says)."""
        assert self._verifier is not None
        text = note[:note.rfind(b"\n\n") + 1]
        sig = lone_signature(note, text, self._verifier)
        if sig is not None and self._verifier.verify(text, sig):
            return
        try:
            open_note(note, [self._verifier])
        except NoteError as exc:
            raise LedgerCorrupt(path.name, off, None, f"checkpoint: {exc}") from None


def _stream(view: memoryview, start: int) -> msgpack.Unpacker:
    """An unpacker over ``view[start:]``, with the options records are decoded with."""
    stream = msgpack.Unpacker(None, raw=False, use_list=False, strict_map_key=True,
                              max_buffer_size=max(len(view) - start, 1))
    stream.feed(view[start:])
    return stream


def _frame_problem(seg: _Segment, off: int) -> tuple[str, bool]:
    """Why the frame at file offset ``off`` is unsound, and whether a torn write could
    explain it.

    The end of the written bytes is where the trailing zeros begin: a segment may
    have space reserved ahead of its writes, and a write torn there is followed by
    zeros rather than by the end of the file.  A crash may also keep a batch's pages
    out of order, so a zero frame header, or an all-zero page before the written
    end, is space the torn write never reached.  Whether the damage is then a torn
    tail depends on what follows it (:meth:`LogReader._bad_frame`): a write torn this
    way that left the batch's own checkpoint intact cannot be told from damage to an
    acknowledged batch, and is not truncated without an operator's decision.
    """
    written = seg.written()
    if written <= off:
        return "zero-filled bytes after the last frame", True
    rest = written - off
    if rest < 9:
        return f"{rest} stray bytes where a frame header should be", True
    length = FRAME_HEADER.unpack(seg.read(off, 8))[0]
    unreached = length == 0 or _zero_page(seg, off, written)
    if length < 1 or length > MAX_FRAME:
        return f"frame length {length} out of range", unreached or length > rest - 8
    if off + 8 + length > seg.size:
        return f"frame of {length} bytes runs past the end of the file", True
    if length > rest - 8:
        return (f"frame of {length} bytes runs past the end of the written bytes "
                "(zeros follow)"), True
    # Torn only with zeros in it (a page never written, or its end past the written
    # bytes): a torn write leaves zeros, never changed bytes.
    return "frame checksum mismatch", unreached or off + 8 + length > written


_PAGE = 4096


def _zero_page(seg: _Segment, start: int, end: int) -> bool:
    """Whether a whole, aligned page between ``start`` and ``end`` is all zeros."""
    page = -(-start // _PAGE) * _PAGE
    step = max(_PAGE, READ_CHUNK // _PAGE * _PAGE)
    while page + _PAGE <= end:
        block = seg.read(page, min(step, (end - page) // _PAGE * _PAGE))
        for k in range(0, len(block) - _PAGE + 1, _PAGE):
            if block.count(0, k, k + _PAGE) == _PAGE:
                return True
        if len(block) < _PAGE:
            return False
        page += len(block)
    return False
