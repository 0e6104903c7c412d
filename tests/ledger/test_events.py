"""Event registry and codec: determinism, strict decoding, upcasting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import ORIGIN, new_ledger, segments, unseal_all
from hypothesis import given
from hypothesis import strategies as st

from ledger.catalog import REGISTRY, CapGranted, MemberAdded, PdDeclared
from ledger.events import MAX_EVENT_BYTES, EventDecodeError, EventRegistry, EventTypeError
from ledger.merkle import leaf_hash
from ledger.note import NoteSigner, checkpoint_text
from ledger.records import KIND_CHECKPOINT, KIND_RECORD, Record, frame
from ledger.scan import LedgerCorrupt, LogReader


def pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpack(data: bytes) -> Any:
    """As the ledger's reader unpacks an event (arrays as tuples)."""
    return msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)


GRANT = CapGranted(7, "pd-fleet", "tunnel", ("read", "write"), 6, 3, "system")


def test_same_event_same_bytes_and_round_trip() -> None:
    a = REGISTRY.encode(GRANT)
    b = REGISTRY.encode(CapGranted(7, "pd-fleet", "tunnel", ("read", "write"), 6, 3, "system"))
    assert a == b
    assert REGISTRY.decode(a) == GRANT
    assert msgpack.unpackb(a)[0:2] == ["cap.granted", 1]


@given(st.text(max_size=50), st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_round_trip_any_values(name: str, prio: int) -> None:
    ev = PdDeclared(name, prio)
    assert REGISTRY.decode(REGISTRY.encode(ev)) == ev


@pytest.mark.parametrize(("obj", "needle"), [
    (["no.such.type", 1, {}], "unknown event type 'no.such.type'"),
    (["pd.declared", 2, {"name": "x", "priority": 1}], "newer than this code"),
    (["pd.declared", 0, {"name": "x", "priority": 1}], "not positive"),
    (["pd.declared", 1, {"name": "x"}], "missing fields ['priority']"),
    (["pd.declared", 1, {"name": "x", "priority": 1, "evil": 1}], "unexpected fields ['evil']"),
    (["pd.declared", 1, {"name": "x", "priority": "1"}], "'priority' must be int, got str"),
    (["pd.declared", 1, {"name": "x", "priority": True}], "'priority' must be int, got bool"),
    (["pd.declared", 1, {"name": b"x", "priority": 1}], "'name' must be str, got bytes"),
    (["pd.declared", 1, {"priority": 1, "name": "x"}], "canonical order"),
    (["cap.granted", 1, {"cap_id": 1, "holder": "a", "obj": "b", "rights": ["read", 3],
                         "badge": None, "parent": None, "via": "x"}], "'rights' must be"),
    (["pd.declared", 1], "must be [tag"),
    ({"pd.declared": 1}, "must be [tag"),
])
def test_strict_decoding_names_the_problem(obj: object, needle: str) -> None:
    with pytest.raises(EventDecodeError) as err:
        REGISTRY.decode(pack(obj))
    assert needle in str(err.value)


def test_non_canonical_integer_encoding_is_refused() -> None:
    canonical = REGISTRY.encode(PdDeclared("x", 1))
    # 0xd3 = int64 form of the value 1: decodes to the same event, different bytes.
    wide = canonical[:-1] + b"\xd3" + (1).to_bytes(8, "big")
    assert msgpack.unpackb(wide) == msgpack.unpackb(canonical)
    with pytest.raises(EventDecodeError, match="not canonical"):
        REGISTRY.decode(wide)


def test_garbage_and_oversize() -> None:
    with pytest.raises(EventDecodeError, match="not valid msgpack"):
        REGISTRY.decode(b"\xc1")
    with pytest.raises(EventDecodeError, match="not valid msgpack"):
        REGISTRY.decode(b"\x93\xa1")
    with pytest.raises(EventDecodeError, match="limit"):
        REGISTRY.decode(b"\x00" * (MAX_EVENT_BYTES + 1))
    with pytest.raises(EventTypeError, match="limit"):
        REGISTRY.encode(PdDeclared("x" * MAX_EVENT_BYTES, 1))


def test_encode_refuses_unregistered_and_ill_typed() -> None:
    @dataclass(frozen=True)
    class Stray:
        a: int

    with pytest.raises(EventTypeError, match="not a registered event"):
        REGISTRY.encode(Stray(1))
    with pytest.raises(EventTypeError, match="'priority' must be int"):
        REGISTRY.encode(PdDeclared("x", "high"))  # type: ignore[arg-type]
    with pytest.raises(EventTypeError, match=r"'endpoint' must be str \| None"):
        REGISTRY.encode(MemberAdded("n", b"k", b"w", "10.8.0.2", 5, "node"))  # type: ignore[arg-type]


def test_upcasting_old_versions() -> None:
    reg = EventRegistry()

    def v1_to_v2(f: dict[str, object]) -> dict[str, object]:
        return {"name": f["name"], "ip": f["ip"], "port": 51820}

    def v2_to_v3(f: dict[str, object]) -> dict[str, object]:
        return {**f, "tags": ()}

    @reg.register("peer.seen", 3, upcasters={1: v1_to_v2, 2: v2_to_v3})
    @dataclass(frozen=True)
    class PeerSeen:
        name: str
        ip: str
        port: int
        tags: tuple[str, ...]

    old = pack(["peer.seen", 1, {"name": "b", "ip": "10.8.0.2"}])
    assert reg.decode(old) == PeerSeen("b", "10.8.0.2", 51820, ())
    mid = pack(["peer.seen", 2, {"name": "b", "ip": "10.8.0.2", "port": 1}])
    assert reg.decode(mid) == PeerSeen("b", "10.8.0.2", 1, ())
    # An old record the upcaster cannot read is a decode error, not a crash.
    with pytest.raises(EventDecodeError, match="cannot upcast to v2: KeyError"):
        reg.decode(pack(["peer.seen", 1, {"name": "b"}]))
    # An upcaster whose output has the wrong shape is caught by the strict checks.
    with pytest.raises(EventDecodeError, match="'port' must be int"):
        reg.decode(pack(["peer.seen", 2, {"name": "b", "ip": "x", "port": "y"}]))


def test_registration_rules() -> None:
    reg = EventRegistry()
    with pytest.raises(EventTypeError, match="frozen dataclass"):
        @reg.register("a")
        @dataclass
        class Mutable:
            x: int
    with pytest.raises(EventTypeError, match="upcaster"):
        @reg.register("t", True)  # type: ignore[arg-type]  # == 1, but not an int
        @dataclass(frozen=True)
        class BoolVersion:
            x: int
    with pytest.raises(EventTypeError, match="upcaster"):
        @reg.register("b", 2)
        @dataclass(frozen=True)
        class NoUpcaster:
            x: int
    with pytest.raises(EventTypeError, match="unsupported field type"):
        @reg.register("c")
        @dataclass(frozen=True)
        class Floaty:
            x: float

    @reg.register("d")
    @dataclass(frozen=True)
    class Fine:
        x: int
    with pytest.raises(EventTypeError, match="already registered"):
        reg.register("d")(Fine)


def test_events_may_not_validate_while_decoding() -> None:
    reg = EventRegistry()
    with pytest.raises(EventTypeError, match="__post_init__"):
        @reg.register("v")
        @dataclass(frozen=True)
        class Validating:
            x: int

            def __post_init__(self) -> None:
                if self.x < 0:
                    raise ValueError("negative")


# ------------------------------------------- the version is an int; the order is canonical
# Both were accepted when the caller passes no bytes (``from_obj(obj, None)``, as the
# reader does after its own record-level checks): ``True == 1.0 == 1``, and the order
# check ran only alongside the canonical-bytes check.


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_equal_to_current_but_not_an_int_is_refused(version: object) -> None:
    data = msgpack.packb(["pd.declared", version, {"name": "x", "priority": 1}])
    assert unpack(data)[1] == 1  # what the fast path used to compare
    name = type(version).__name__
    with pytest.raises(EventDecodeError,
                       match=rf"'pd\.declared': version must be int, got {name}$"):
        REGISTRY.from_obj(unpack(data), None)
    with pytest.raises(EventDecodeError, match=f"version must be int, got {name}"):
        REGISTRY.decode(data)


@pytest.mark.parametrize("version", [False, True, 1.0, 2.0, 3.0], ids=str)
def test_version_not_an_int_is_refused_for_an_upcast_type_too(version: object) -> None:
    # 3.0 equals the current version, which the fast path took as current; the others
    # equal an old version or none, refused already (now with a message that says why).
    reg = EventRegistry()

    @reg.register("v", 3, upcasters={1: lambda f: f, 2: lambda f: f})
    @dataclass(frozen=True)
    class V:
        x: int

    assert reg.decode(pack(["v", 1, {"x": 1}])) == V(1)
    obj = unpack(msgpack.packb(["v", version, {"x": 1}]))
    with pytest.raises(EventDecodeError, match="version must be int"):
        reg.from_obj(obj, None)


def test_out_of_order_fields_are_refused_without_the_bytes() -> None:
    data = pack(["pd.declared", 1, {"priority": 1, "name": "x"}])
    with pytest.raises(EventDecodeError,
                       match=r"'pd\.declared': fields are not in canonical order"):
        REGISTRY.from_obj(unpack(data), None)
    with pytest.raises(EventDecodeError, match="fields are not in canonical order"):
        REGISTRY.decode(data)
    assert REGISTRY.from_obj(unpack(pack(["pd.declared", 1, {"name": "x", "priority": 1}])),
                             None) == PdDeclared("x", 1)


def test_upcast_versions_keep_their_own_field_order() -> None:
    reg = EventRegistry()

    def v1_to_v2(f: dict[str, object]) -> dict[str, object]:
        return {"port": 51820, "name": f["name"]}  # out of v2's order: the upcaster's own

    @reg.register("peer.seen", 2, upcasters={1: v1_to_v2})
    @dataclass(frozen=True)
    class PeerSeen:
        name: str
        port: int

    old = pack(["peer.seen", 1, {"ip": "10.8.0.2", "name": "b"}])
    for decoded in (reg.decode(old), reg.from_obj(unpack(old), None)):
        assert decoded == PeerSeen("b", 51820)
    current = pack(["peer.seen", 2, {"port": 1, "name": "b"}])
    with pytest.raises(EventDecodeError, match="canonical order"):
        reg.from_obj(unpack(current), None)


# ------------------------------------------------------------------ through a whole ledger


def _ledger_ending_with(tmp_path: Path, event_bytes: bytes) -> tuple[Path, int]:
    """A valid ledger, then one more record carrying ``event_bytes`` as they are: framed,
    chained, in the Merkle tree and under a checkpoint signed by the ledger's key, so
    the event is all that can be wrong with it.  Returns the directory and its seq."""
    led, keys = new_ledger(tmp_path / "l")
    led.append_many([PdDeclared("a", 1), PdDeclared("b", 2)])
    led.close()
    d = tmp_path / "l"
    unseal_all(d)
    res = LogReader(d).run()
    seq, end = res.count, res.segments[-1].committed_end
    body = Record(seq, res.last_ts + 1, res.prev_hash, event_bytes, None).body()
    tree = res.tree.copy()
    tree.append(leaf_hash(body))
    note = NoteSigner(ORIGIN, keys.signing_key).lone_note(
        checkpoint_text(ORIGIN, tree.size, tree.root()))
    seg = segments(d)[-1]
    seg.write_bytes(seg.read_bytes()[:end] + frame(KIND_RECORD, body)
                    + frame(KIND_CHECKPOINT, note))
    return d, seq


def _refusal(d: Path, verify: bool) -> LedgerCorrupt:
    with pytest.raises(LedgerCorrupt) as err:
        for _ in LogReader(d, verify=verify).entries():
            pass
    return err.value


def test_crafted_record_helper_makes_a_sound_ledger(tmp_path: Path) -> None:
    d, seq = _ledger_ending_with(tmp_path, REGISTRY.encode(PdDeclared("c", 3)))
    for verify in (True, False):
        last = list(LogReader(d, verify=verify).entries())[-1]
        assert (last.seq, last.event) == (seq, PdDeclared("c", 3))


@pytest.mark.parametrize("verify", [True, False], ids=["audit", "replay"])
def test_reader_refuses_out_of_order_fields_in_a_signed_record(tmp_path: Path,
                                                               verify: bool) -> None:
    # Re-packing keeps the map's order, so the record is in "canonical encoding" as a
    # whole: only the event's own order check can catch this, audit or replay.
    d, seq = _ledger_ending_with(tmp_path, pack(["pd.declared", 1,
                                                 {"priority": 3, "name": "c"}]))
    err = _refusal(d, verify)
    assert err.seq == seq
    assert "'pd.declared': fields are not in canonical order" in err.reason


# Needs both halves: LogReader's inner fast path must check ``type(version) is int``
# before ``version == version_now`` (or it takes True or 1.0 as current and never asks
# the registry), and EventRegistry.from_obj must refuse it on the record's slow path.
@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
@pytest.mark.parametrize("verify", [True, False], ids=["audit", "replay"])
def test_reader_refuses_a_version_that_is_not_an_int(tmp_path: Path, verify: bool,
                                                     version: object) -> None:
    # packb of this object is its canonical encoding, so no byte check catches it.
    d, seq = _ledger_ending_with(tmp_path, msgpack.packb(
        ["pd.declared", version, {"name": "c", "priority": 3}]))
    err = _refusal(d, verify)
    assert err.seq == seq
    assert f"'pd.declared': version must be int, got {type(version).__name__}" in err.reason
