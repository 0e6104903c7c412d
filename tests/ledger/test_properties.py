"""Property tests: replay equals live state; snapshots; every kind of tampering is detected."""

from __future__ import annotations

import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from helpers import NO_FLAG, append_fitting, member, new_ledger, replay, segments, unseal_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import audit
from ledger.catalog import CapGranted, MemberAdded, MemberRemoved, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.note import NoteSigner, sign_note
from ledger.records import (
    FRAME_HEADER,
    GRANT_SIGNING_CONTEXT,
    KIND_CHECKPOINT,
    KIND_RECORD,
    SEGMENT_HEADER,
    decode_record,
)
from ledger.scan import LedgerCorrupt

names = st.sampled_from([f"node-{i}" for i in range(6)])
events = st.one_of(
    st.builds(PdDeclared, st.text(max_size=12), st.integers(-(2**40), 2**40)),
    st.builds(lambda i: member(i), st.integers(0, 5)),
    st.builds(MemberAdded, names, st.binary(min_size=32, max_size=32),
              st.binary(min_size=32, max_size=32), st.just("10.8.0.9"),
              st.none() | st.just("192.0.2.9:51820"), st.sampled_from(["hub", "node"])),
    st.builds(MemberRemoved, names, st.text(max_size=8)),
    st.builds(CapGranted, st.integers(0, 50), st.sampled_from(["pd-fleet", "pd-vmm"]),
              st.sampled_from(["tunnel", "vm.query"]),
              st.lists(st.sampled_from(["read", "write", "grant"]), max_size=3).map(tuple),
              st.none() | st.integers(0, 2**32), st.none() | st.integers(0, 50),
              st.sampled_from(["mint", "copy"])),
)
batches = st.lists(st.lists(events, min_size=1, max_size=6), min_size=1, max_size=8)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ppn-prop-"))


def _build(path: Path, bs: list[list[Any]], options: Options = NO_FLAG) -> tuple[Ledger, NodeKeys]:
    led, keys = new_ledger(path, options=options)
    append_fitting(led, bs)
    return led, keys


@SETTINGS
@given(batches)
def test_replay_equals_live_state(bs: list[list[Any]]) -> None:
    work = _workdir()
    try:
        led, keys = new_ledger(work / "l")
        appended = append_fitting(led, bs)
        live = led.state.copy()
        led.close()
        assert replay(work / "l") == live
        reopened = Ledger.open(work / "l", keys)
        assert reopened.state == live
        reopened.close()
        assert audit.verify(work / "l").records == 1 + appended
    finally:
        shutil.rmtree(work)


@SETTINGS
@given(batches, batches)
def test_snapshot_plus_tail_equals_full_replay(head: list[list[Any]],
                                               tail: list[list[Any]]) -> None:
    work = _workdir()
    try:
        led, keys = _build(work / "l", head)
        led.write_snapshot()
        append_fitting(led, tail)
        led.close()
        full = replay(work / "l")
        from_snapshot = Ledger.open(work / "l", keys)
        assert from_snapshot.state == full
        from_snapshot.close()
        audit.verify(work / "l")
    finally:
        shutil.rmtree(work)


# ----------------------------------------------------------------- tampering

def _frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, total length, kind) of each frame in a segment's bytes."""
    out, off = [], SEGMENT_HEADER.size
    while off < len(data):
        length = FRAME_HEADER.unpack_from(data, off)[0]
        out.append((off, 8 + length, data[off + 8]))
        off += 8 + length
    return out


def _reframe(kind: int, payload: bytes) -> bytes:
    body = bytes((kind,)) + payload
    return FRAME_HEADER.pack(len(body), zlib.crc32(body)) + body


Tamper = Callable[[bytes, st.DataObject], bytes | None]


def flip_byte(data: bytes, draw: st.DataObject) -> bytes | None:
    pos = draw.draw(st.integers(0, len(data) - 1))
    mask = draw.draw(st.integers(1, 255))
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def truncate_middle(data: bytes, draw: st.DataObject) -> bytes | None:
    start = draw.draw(st.integers(0, len(data) - 2))
    stop = draw.draw(st.integers(start + 1, len(data) - 1))
    return data[:start] + data[stop:]


def swap_records(data: bytes, draw: st.DataObject) -> bytes | None:
    recs = [f for f in _frames(data) if f[2] == KIND_RECORD]
    if len(recs) < 2:
        return None
    i, j = sorted(draw.draw(st.lists(st.sampled_from(range(len(recs))), min_size=2,
                                     max_size=2, unique=True)))
    (a, la, _), (b, lb, _) = recs[i], recs[j]
    return data[:a] + data[b:b + lb] + data[a + la:b] + data[a:a + la] + data[b + lb:]


def resign(data: bytes, draw: st.DataObject) -> bytes | None:
    """Re-sign a grant or a checkpoint with another key, with valid checksums."""
    other = nacl.signing.SigningKey.generate()
    frames = _frames(data)
    if not frames:
        return None
    off, length, kind = frames[draw.draw(st.integers(0, len(frames) - 1))]
    payload = data[off + 9:off + length]
    if kind == KIND_CHECKPOINT:
        text = payload[:payload.index(b"\n\n") + 1]
        origin = text.split(b"\n")[0].decode()
        new = sign_note(text, [NoteSigner(origin, other)])
    else:
        rec, _ = decode_record(payload)
        if rec.signature is None:
            return None
        sig = other.sign(GRANT_SIGNING_CONTEXT + rec.event_bytes).signature
        new = rec._replace(signature=sig).body()
    return data[:off] + _reframe(kind, new) + data[off + length:]


def damage_a_segment(directory: Path, tamper: Tamper, data: st.DataObject) -> bool:
    """Apply ``tamper`` to one drawn segment; False if it found nothing to change."""
    segs = segments(directory)
    seg = segs[data.draw(st.integers(0, len(segs) - 1))]
    original = seg.read_bytes()
    damaged = tamper(original, data)
    if damaged is None or damaged == original:
        return False
    seg.write_bytes(damaged)
    return True


@pytest.mark.parametrize("tamper", [flip_byte, truncate_middle, swap_records, resign])
@SETTINGS
@given(bs=st.lists(st.lists(events, min_size=1, max_size=5), min_size=2, max_size=6),
       data=st.data())
def test_tampering_is_detected(tamper: Tamper, bs: list[list[Any]], data: st.DataObject) -> None:
    work = _workdir()
    try:
        led, keys = _build(work / "l", bs, Options(segment_bytes=1500,
                                                   set_append_only_flag=False))
        size, state = led.size, led.state.copy()
        led.close()
        unseal_all(work / "l")
        if not damage_a_segment(work / "l", tamper, data):
            return
        with pytest.raises(LedgerCorrupt):
            audit.verify(work / "l")
        # Opening for writing refuses, or -- only when the damage hit bytes no
        # checkpoint covers (an empty segment's header) -- repairs without losing
        # a single committed record.
        try:
            reopened = Ledger.open(work / "l", keys)
        except LedgerCorrupt:
            return
        assert reopened.recovered is not None
        assert (reopened.size, reopened.state) == (size, state)
        reopened.close()
    finally:
        shutil.rmtree(work)
