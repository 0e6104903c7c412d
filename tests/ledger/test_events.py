"""Event registry and codec: determinism, strict decoding, upcasting."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.catalog import REGISTRY, CapGranted, MemberAdded, PdDeclared
from ledger.events import MAX_EVENT_BYTES, EventDecodeError, EventRegistry, EventTypeError


def pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


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
