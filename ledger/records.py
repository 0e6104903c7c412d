"""On-disk framing of the WORM log: segment headers, frames, records.

A segment file is a 20-byte header (``PPNLEDG\\0``, format u32, first seq u64)
followed by frames.  A frame is ``length u32 | crc32 u32 | kind u8 | data``
(big-endian; length and checksum cover ``kind | data``).  Two kinds:

* ``0x00`` -- a record: ``msgpack([seq, ts_ns, prev_hash, event, signature])``,
  where ``event`` is the event's own msgpack encoding, nested as-is (so one
  unpack reads both, and the event's bytes are a slice of the record's).
  The record bytes are the leaf of the RFC 9162 Merkle tree; as the kind byte
  equals the leaf prefix, a record frame's checksummed payload is exactly the
  leaf hash input.  ``prev_hash`` is the leaf hash of the record before it
  (32 zero bytes for the first).
* ``C`` -- a checkpoint: a C2SP signed note over the tree after the batch.

Writers emit one ``C`` frame after each committed batch, in the same write, so
the durable prefix of the log always ends at a checkpoint.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

import msgpack

from ledger.errors import LedgerDataError
from ledger.events import MAX_EVENT_BYTES, pack

SEGMENT_MAGIC = b"PPNLEDG\x00"
SEGMENT_FORMAT = 1
SEGMENT_HEADER = struct.Struct(">8sIQ")
FRAME_HEADER = struct.Struct(">II")
KIND_RECORD = 0x00  # the RFC 9162 leaf prefix
KIND_CHECKPOINT = 0x43  # "C"
MAX_FRAME = MAX_EVENT_BYTES + 4096
MAX_SEGMENT_BYTES = 1 << 31
"""Most bytes a segment may hold (header and frames; space reserved past them is not
counted).  The writer rolls long before (``Options.segment_bytes``) and never lets one
batch cross it; a reader refuses a larger segment instead of reading it."""
MAX_BATCH_BYTES = 256 << 20
"""Most bytes of records one batch (one ``append_many``) may write."""
ZERO_HASH = bytes(32)
SIGNATURE_SIZE = 64
GRANT_SIGNING_CONTEXT = b"ppn/ledger/grant-signature/v1\x00"
"""Prefix of what a grant signature covers; the NUL keeps it apart from signed notes."""


class FrameError(LedgerDataError):
    """A frame or record in a segment is malformed (reason only; the caller adds where)."""


class Record(NamedTuple):
    """One entry of the log, as stored."""

    seq: int
    ts_ns: int
    prev_hash: bytes
    event_bytes: bytes
    signature: bytes | None

    def body(self) -> bytes:
        """The record's bytes: the Merkle leaf data (after the 0x00 prefix)."""
        head = pack((self.seq, self.ts_ns, self.prev_hash))
        tail = b"\xc0" if self.signature is None else pack(self.signature)
        return b"\x95" + head[1:] + self.event_bytes + tail


def segment_header(first_seq: int) -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_FORMAT, first_seq)


def parse_segment_header(data: bytes) -> int:
    """The first sequence number a segment declares; :class:`FrameError` if malformed."""
    if len(data) < SEGMENT_HEADER.size:
        raise FrameError(f"segment header is {len(data)} bytes, expected {SEGMENT_HEADER.size}")
    magic, fmt, first = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise FrameError(f"not a ledger segment (magic {magic!r})")
    if fmt != SEGMENT_FORMAT:
        raise FrameError(f"segment format {fmt} is not supported "
                         f"(this code reads {SEGMENT_FORMAT})")
    return int(first)


def frame(kind: int, data: bytes) -> bytes:
    payload = bytes((kind,)) + data
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _uint_size(n: int) -> int:
    """Bytes msgpack's minimal encoding of a non-negative int takes."""
    return 1 if n < 0x80 else 2 if n < 0x100 else 3 if n < 0x10000 else (
        5 if n < 0x100000000 else 9)


def decode_record(body: bytes, canonical: bool = True) -> tuple[Record, Any]:
    """Strictly decode record bytes; returns the record and its event, unpacked.

    With ``canonical`` (verification) the whole record must be in canonical
    encoding, so the same event always has the same bytes and the event's bytes
    (which a grant signature covers) are exactly a slice of the record's.
    """
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"record is not valid msgpack: {exc}") from None
    if type(obj) is not tuple or len(obj) != 5:
        raise FrameError("record must be a 5-element array")
    seq, ts, prev, ev, sig = obj
    if type(seq) is not int or seq < 0 or type(ts) is not int or ts < 0:
        raise FrameError("record seq and timestamp must be non-negative integers")
    if type(prev) is not bytes or len(prev) != 32:
        raise FrameError("record prev_hash must be 32 bytes")
    if sig is not None and (type(sig) is not bytes or len(sig) != SIGNATURE_SIZE):
        raise FrameError("record signature must be absent or 64 bytes")
    if type(ev) is not tuple:
        raise FrameError("record event must be an array [tag, version, fields]")
    if canonical and pack(obj) != body:
        raise FrameError("record is not in canonical encoding")
    return Record(seq, ts, prev, event_slice(body, seq, ts, sig is not None), sig), ev


def event_slice(body: bytes, seq: int, ts: int, signed: bool) -> bytes:
    """The event's own bytes inside canonical record bytes (what a grant signature covers)."""
    start = 1 + _uint_size(seq) + _uint_size(ts) + 34
    return body[start:len(body) - (2 + SIGNATURE_SIZE if signed else 1)]
