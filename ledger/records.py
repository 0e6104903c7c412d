"""On-disk framing of the WORM log: segment headers, frames, records.

A segment file is a 20-byte header (``PPNLEDG\\0``, format u32, first seq u64)
followed by frames.  A frame is ``length u32 | crc32 u32 | kind u8 | data``
(big-endian; length and checksum cover ``kind | data``).  Two kinds:

* ``R`` -- a record: ``msgpack([seq, ts_ns, prev_hash, event_bytes, signature])``.
  Its bytes are the leaf of the RFC 9162 Merkle tree; ``prev_hash`` is the
  leaf hash of the record before it (32 zero bytes for the first).
* ``C`` -- a checkpoint: a C2SP signed note over the tree after the batch.

Writers emit one ``C`` frame after each committed batch, in the same write, so
the durable prefix of the log always ends at a checkpoint.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import msgpack

from ledger.errors import LedgerDataError
from ledger.events import MAX_EVENT_BYTES

SEGMENT_MAGIC = b"PPNLEDG\x00"
SEGMENT_FORMAT = 1
SEGMENT_HEADER = struct.Struct(">8sIQ")
FRAME_HEADER = struct.Struct(">II")
KIND_RECORD = 0x52  # "R"
KIND_CHECKPOINT = 0x43  # "C"
MAX_FRAME = MAX_EVENT_BYTES + 4096
ZERO_HASH = bytes(32)
SIGNATURE_SIZE = 64
GRANT_SIGNING_CONTEXT = b"ppn/ledger/grant-signature/v1\x00"
"""Prefix of what a grant signature covers; the NUL keeps it apart from signed notes."""


class FrameError(LedgerDataError):
    """A frame or record in a segment is malformed (reason only; the caller adds where)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One entry of the log, as stored."""

    seq: int
    ts_ns: int
    prev_hash: bytes
    event_bytes: bytes
    signature: bytes | None

    def body(self) -> bytes:
        """The record's bytes: the Merkle leaf data and the checksummed frame payload."""
        out: bytes = msgpack.packb(
            [self.seq, self.ts_ns, self.prev_hash, self.event_bytes, self.signature],
            use_bin_type=True)
        return out


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


def decode_record(body: bytes) -> Record:
    """Strictly decode record bytes (the ``R`` frame's data)."""
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True,
                              max_bin_len=MAX_FRAME, max_str_len=0, max_map_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"record is not valid msgpack: {exc}") from None
    if type(obj) is not tuple or len(obj) != 5:
        raise FrameError("record must be a 5-element array")
    seq, ts, prev, ev, sig = obj
    if type(seq) is not int or seq < 0 or type(ts) is not int or ts < 0:
        raise FrameError("record seq and timestamp must be non-negative integers")
    if type(prev) is not bytes or len(prev) != 32 or type(ev) is not bytes:
        raise FrameError("record prev_hash must be 32 bytes and event must be bytes")
    if sig is not None and (type(sig) is not bytes or len(sig) != SIGNATURE_SIZE):
        raise FrameError("record signature must be absent or 64 bytes")
    return Record(seq, ts, prev, ev, sig)
