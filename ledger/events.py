"""Event types: an explicit registry of tags, versioned schemas, strict msgpack codec.

An event is a frozen dataclass registered under a type tag and a schema version.
Its encoding is deterministic -- ``msgpack([tag, version, {field: value, ...}])``
with fields in declaration order -- so the same event always gives the same bytes.
Decoding is strict: an unknown tag, a missing or extra field, a value of the wrong
type or an oversized event is an :class:`EventDecodeError` naming what and where.

Old versions are read through upcasters: functions that turn the field map of
version ``v`` into the field map of version ``v + 1``.  Classes are never looked up
by a name found in data; only registered tags decode.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from ledger.errors import LedgerDataError, LedgerUsageError

_local = threading.local()


def packer() -> Callable[[object], bytes]:
    """This thread's ``pack`` function, for loops that pack many objects."""
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    fn: Callable[[object], bytes] = p.pack
    return fn


def pack(obj: object) -> bytes:
    """msgpack bytes of ``obj`` as the ledger writes them (bin type, minimal ints).

    One Packer per thread: making a Packer per call costs more than packing.
    """
    return packer()(obj)


MAX_EVENT_BYTES = 256 * 1024
"""Largest encoded event accepted, in bytes; a record adds a small header."""

_MAX_SEQ_LEN = 100_000

E = TypeVar("E")
FieldMap = dict[str, Any]
Upcaster = Callable[[FieldMap], FieldMap]
Validator = Callable[[object], bool]


class EventDecodeError(LedgerDataError):
    """Bytes claimed to be an event but do not decode to a registered, valid one.

    Raised for unknown tags, versions newer than this code knows, missing, extra
    or ill-typed fields and oversized events.  Distinct from
    :class:`EventTypeError`, which is our own code trying to *encode* something
    that is not a registered event.
    """


class EventTypeError(LedgerUsageError):
    """Code tried to register or encode something that is not a valid event type."""


@dataclass(frozen=True, slots=True)
class EventType:
    """What the registry knows of one tag."""

    tag: str
    version: int
    cls: type[Any]
    signed: bool
    fields: tuple[str, ...]
    validators: tuple[Validator, ...]
    type_names: tuple[str, ...]
    upcasters: dict[int, Upcaster]
    build: Callable[[FieldMap], Any]
    """Fast path: a current-version field map to an event, or None (then the slow
    path explains what is wrong)."""
    unbuild: Callable[[Any], Any]
    """Fast path the other way: an event to the object its encoding packs, or None."""


def _check_expr(tp: Any, var: str, env: dict[str, Any]) -> str:
    """A Python expression testing ``var`` against annotation ``tp`` (for codegen)."""
    simple = {bool: f"({var} is True or {var} is False)", int: f"type({var}) is int",
              str: f"type({var}) is str", bytes: f"type({var}) is bytes"}
    if tp in simple:
        return simple[tp]
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return f"({var} is None or {_check_expr(inner, var, env)})"
    name = f"_v{len(env)}"
    env[name] = _validator(tp)[0]
    return f"{name}({var})"


def _compile_builder(cls: type[Any], names: tuple[str, ...],
                     hints: dict[str, Any]) -> Callable[[FieldMap], Any]:
    """A generated function: field map -> event, or None if anything is off.

    One call per event instead of a check per field plus ``__init__``: it tests the
    keys (and their canonical order) and every type inline, then fills the frozen
    instance's slots as the dataclass ``__init__`` would.  The source is built from
    our own annotations, never from data.
    """
    env: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "_cls": cls,
                           "_names": names}
    lines = ["def build(f):", "    if tuple(f) != _names:", "        return None"]
    for i, n in enumerate(names):
        lines.append(f"    v{i} = f[{n!r}]")
    conds = [_check_expr(hints[n], f"v{i}", env) for i, n in enumerate(names)] or ["True"]
    lines += ["    if not (" + " and ".join(conds) + "):", "        return None",
              "    o = _new(_cls)"]
    lines += [f"    _set(o, {n!r}, v{i})" for i, n in enumerate(names)]
    lines.append("    return o")
    exec(compile("\n".join(lines) + "\n", "<event-builder>", "exec"), env)
    build: Callable[[FieldMap], Any] = env["build"]
    return build


def _compile_encoder(cls: type[Any], tag: str, version: int, names: tuple[str, ...],
                     hints: dict[str, Any]) -> Callable[[Any], Any]:
    """A generated function: event -> ``[tag, version, {field: value}]`` ready to pack,
    or None if a field has the wrong type (then :meth:`EventRegistry.encode` says which).
    Like :func:`_compile_builder`, built from our own annotations only."""
    env: dict[str, Any] = {"_tag": tag, "_version": version}
    lines = ["def encode(e):"]
    lines += [f"    v{i} = e.{n}" for i, n in enumerate(names)]
    conds = [_check_expr(hints[n], f"v{i}", env) for i, n in enumerate(names)] or ["True"]
    lines += ["    if not (" + " and ".join(conds) + "):", "        return None"]
    fields = ", ".join(f"{n!r}: v{i}" for i, n in enumerate(names))
    lines.append(f"    return [_tag, _version, {{{fields}}}]")
    exec(compile("\n".join(lines) + "\n", "<event-encoder>", "exec"), env)
    encode: Callable[[Any], Any] = env["encode"]
    return encode


def _validator(tp: Any) -> tuple[Validator, str]:
    """A predicate for values of annotation ``tp`` as msgpack gives them back."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return (lambda v: v is True or v is False), "bool"
    if tp is int:
        return (lambda v: type(v) is int), "int"
    if tp is str:
        return (lambda v: type(v) is str), "str"
    if tp is bytes:
        return (lambda v: type(v) is bytes), "bytes"
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise EventTypeError(f"only 'X | None' unions are supported, not {tp!r}")
        inner, name = _validator(args[0])
        return (lambda v: v is None or inner(v)), f"{name} | None"
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) != 2 or targs[1] is not Ellipsis:
            raise EventTypeError(f"only homogeneous 'tuple[X, ...]' is supported, not {tp!r}")
        inner, name = _validator(targs[0])

        def check_tuple(v: object) -> bool:
            return type(v) is tuple and len(v) <= _MAX_SEQ_LEN and all(inner(x) for x in v)

        return check_tuple, f"tuple[{name}, ...]"
    raise EventTypeError(f"unsupported field type {tp!r} (use int, str, bytes, bool, "
                         "X | None, tuple[X, ...])")


class EventRegistry:
    """The explicit map from type tags to event classes (one per node, or per test)."""

    def __init__(self) -> None:
        self._by_tag: dict[str, EventType] = {}
        self._by_cls: dict[type[Any], EventType] = {}

    def register(
        self, tag: str, version: int = 1, *, signed: bool = False,
        upcasters: dict[int, Upcaster] | None = None,
    ) -> Callable[[type[E]], type[E]]:
        """Class decorator: register a frozen dataclass as event ``tag`` at ``version``.

        ``upcasters[v]`` turns the field map of version ``v`` into that of ``v + 1``;
        every version below ``version`` needs one.  ``signed`` events carry their own
        Ed25519 signature by pd-ledger (capability grants).
        """
        def deco(cls: type[E]) -> type[E]:
            self._add(cls, tag, version, signed, dict(upcasters or {}))
            return cls
        return deco

    def _add(self, cls: type[Any], tag: str, version: int, signed: bool,
             upcasters: dict[int, Upcaster]) -> None:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise EventTypeError(f"{cls.__name__}: an event must be a frozen dataclass")
        if "__post_init__" in vars(cls):
            raise EventTypeError(f"{cls.__name__}: events take no __post_init__; validate in "
                                 "the command that makes the event (replay must not fail)")
        if not tag or tag in self._by_tag:
            raise EventTypeError(f"event tag {tag!r} is empty or already registered")
        if type(version) is not int or version < 1 or sorted(upcasters) != list(
                range(1, version)):
            raise EventTypeError(
                f"{tag!r} v{version}: needs exactly one upcaster for each of versions "
                f"1..{version - 1}, has {sorted(upcasters)}")
        hints = typing.get_type_hints(cls)
        names = tuple(f.name for f in dataclasses.fields(cls))
        checks = [_validator(hints[n]) for n in names]
        et = EventType(tag, version, cls, signed, names, tuple(c[0] for c in checks),
                       tuple(c[1] for c in checks), upcasters,
                       _compile_builder(cls, names, hints),
                       _compile_encoder(cls, tag, version, names, hints))
        self._by_tag[tag] = et
        self._by_cls[cls] = et

    def type_of(self, event: object) -> EventType:
        """The registration of ``event``'s class; :class:`EventTypeError` if none."""
        et = self._by_cls.get(type(event))
        if et is None:
            raise EventTypeError(f"{type(event).__name__} is not a registered event type")
        return et

    def type_of_class(self, cls: type[Any]) -> EventType:
        """The registration of event class ``cls``; :class:`EventTypeError` if none."""
        et = self._by_cls.get(cls)
        if et is None:
            raise EventTypeError(f"{cls.__name__} is not a registered event type")
        return et

    def by_tag(self, tag: str) -> EventType | None:
        return self._by_tag.get(tag)

    def __iter__(self) -> Iterator[EventType]:
        return iter(sorted(self._by_tag.values(), key=lambda e: e.tag))

    def encode(self, event: object) -> bytes:
        """Deterministic bytes of ``event``; validates field types first."""
        et = self.type_of(event)
        obj = et.unbuild(event)
        if obj is not None:
            data = pack(obj)
            if len(data) <= MAX_EVENT_BYTES:
                return data
        values = [getattr(event, n) for n in et.fields]
        for name, value, ok, tname in zip(et.fields, values, et.validators, et.type_names,
                                          strict=True):
            if not ok(value):
                raise EventTypeError(f"{et.tag}: field {name!r} must be {tname}, "
                                     f"got {type(value).__name__}")
        data = pack([et.tag, et.version, dict(zip(et.fields, values, strict=True))])
        if len(data) > MAX_EVENT_BYTES:
            raise EventTypeError(f"{et.tag}: encoded event is {len(data)} bytes, "
                                 f"limit {MAX_EVENT_BYTES}")
        return data

    def decode(self, data: bytes) -> Any:
        """Strictly decode event bytes; :class:`EventDecodeError` on anything off."""
        return self.from_obj(self._unpack(data), data)

    def from_obj(self, obj: Any, data: bytes | None) -> Any:
        """Build the event from unpacked ``[tag, version, fields]`` (tuples for arrays).

        ``data`` is the bytes ``obj`` came from, to check they are the canonical
        encoding; pass None when the caller has checked that already.  Either way
        the version must be an ``int`` (not a bool or float that equals one) and a
        current-version event's fields must be in canonical order.
        """
        # Fast path: current version (a genuine int: ``True == 1`` and ``1.0 == 1``),
        # fields in canonical order (``build`` checks) and of the right types,
        # canonical bytes.  Anything else takes the slow path for a precise error.
        if type(obj) is tuple and len(obj) == 3 and type(obj[0]) is str:
            et = self._by_tag.get(obj[0])
            if (et is not None and type(obj[1]) is int and obj[1] == et.version
                    and type(obj[2]) is dict):
                event = et.build(obj[2])
                if event is not None and (data is None or pack(obj) == data):
                    return event
        return self._decode_slow(_shape(obj), data)

    def _decode_slow(self, obj: tuple[str, int, FieldMap], data: bytes | None) -> Any:
        tag, version, fields = obj
        et = self._by_tag.get(tag)
        if et is None:
            raise EventDecodeError(f"unknown event type {tag!r}")
        if version > et.version:
            raise EventDecodeError(f"{tag!r} v{version} is newer than this code "
                                   f"(knows v{et.version}); upgrade os-infrastructure")
        # A current-version event is held to its canonical encoding on every path:
        # field order always, the bytes too when we have them.  An upcast one is
        # not (its field order is the old schema's, and the upcaster's).
        current = version == et.version
        for v in range(version, et.version):
            try:
                fields = et.upcasters[v](dict(fields))
            except Exception as exc:  # an old record the upcaster cannot read
                raise EventDecodeError(f"{tag!r} v{v}: cannot upcast to v{v + 1}: "
                                       f"{type(exc).__name__}: {exc}") from None
        return self._build(et, fields, ordered=current, raw=data if current else None)

    @staticmethod
    def _unpack(data: bytes) -> Any:
        if len(data) > MAX_EVENT_BYTES:
            raise EventDecodeError(f"event is {len(data)} bytes, limit {MAX_EVENT_BYTES}")
        try:
            obj = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True,
                                  max_bin_len=MAX_EVENT_BYTES, max_str_len=MAX_EVENT_BYTES)
        except Exception as exc:  # msgpack raises several unrelated types
            raise EventDecodeError(f"event bytes are not valid msgpack: {exc}") from None
        return obj

    def _build(self, et: EventType, fields: FieldMap, *, ordered: bool,
               raw: bytes | None) -> Any:
        """The event from a field map of the current schema.  ``ordered``: the
        fields must be in declaration order; ``raw``: and these bytes must be the
        event's canonical encoding."""
        if len(fields) != len(et.fields) or any(k not in fields for k in et.fields):
            missing = [k for k in et.fields if k not in fields]
            extra = [k for k in fields if k not in et.fields]
            raise EventDecodeError(f"{et.tag!r} v{et.version}: missing fields {missing}, "
                                   f"unexpected fields {extra}")
        for name, ok, tname in zip(et.fields, et.validators, et.type_names, strict=True):
            if not ok(fields[name]):
                raise EventDecodeError(f"{et.tag!r}: field {name!r} must be {tname}, "
                                       f"got {type(fields[name]).__name__}")
        if ordered and tuple(fields) != et.fields:
            raise EventDecodeError(f"{et.tag!r}: fields are not in canonical order")
        event = et.cls(**fields)
        if raw is not None and pack([et.tag, et.version, fields]) != raw:
            raise EventDecodeError(f"{et.tag!r}: encoding is not canonical")
        return event


def _shape(obj: Any) -> tuple[str, int, FieldMap]:
    if (type(obj) is not tuple or len(obj) != 3 or type(obj[0]) is not str
            or type(obj[2]) is not dict):
        raise EventDecodeError("event must be [tag: str, version: int, fields: map]")
    if type(obj[1]) is not int:  # not a bool or a float, though True == 1.0 == 1
        raise EventDecodeError(f"event {obj[0]!r}: version must be int, "
                               f"got {type(obj[1]).__name__}")
    if obj[1] < 1:
        raise EventDecodeError(f"event {obj[0]!r}: version {obj[1]} is not positive")
    return obj
