"""Messages by value: a payload is encoded at send and decoded at delivery.

Plain data only -- ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``,
``bytes``, and ``list`` / ``dict`` of those, exact types (no subclasses, no
msgpack extension objects, so no code of the sender's can run in the receiver),
nested at most :data:`MAX_DEPTH` deep, at most :data:`MAX_MESSAGE_BYTES` encoded.
Whatever ``encode`` accepts, ``decode`` reads back.  The receiver gets its own
copy, so nothing it does reaches the sender's objects, and the same bytes can
later cross a process or a network unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 1 << 20
"""The largest encoded payload a message may carry (1 MiB)."""
MAX_DEPTH = 64
"""How deeply lists and maps may nest in a payload."""

_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_local = threading.local()  # one Packer per thread: building one per message costs 3x


class NotPlainData(ValueError):
    """A payload that cannot travel by value: what it holds, or how big it is."""


def _refuse(obj: object) -> Any:
    if type(obj) is int:  # msgpack hands over what does not fit in 64 bits
        raise NotPlainData("an integer outside the 64-bit range is not plain data")
    kind = type(obj).__name__
    hint = "; send a list" if type(obj) is tuple else ""
    raise NotPlainData(f"a {kind} is not plain data (None, bool, int, float, str, bytes, "
                       f"list, dict){hint}")


def _check(obj: Any, depth: int) -> None:
    kind = type(obj)
    if kind in _SCALARS:
        return
    if depth >= MAX_DEPTH:
        raise NotPlainData(f"nested more than {MAX_DEPTH} levels deep")
    if kind is list:
        for v in obj:
            if type(v) not in _SCALARS:
                _check(v, depth + 1)
    elif kind is dict:
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise NotPlainData(f"a map key must be a scalar, not a {type(k).__name__}")
            if type(v) not in _SCALARS:
                _check(v, depth + 1)
    else:
        _refuse(obj)


def encode(payload: Any) -> bytes:
    """The payload's bytes; :class:`NotPlainData` if it is not plain or too big."""
    _check(payload, 0)  # exact types, bounded depth: msgpack alone lets ExtType through
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, strict_types=True,
                                                default=_refuse, autoreset=True)
    try:
        data: bytes = packer.pack(payload)
    except Exception as exc:  # a failed pack may leave bytes behind in the packer
        packer.reset()
        if isinstance(exc, NotPlainData):
            raise
        if isinstance(exc, OverflowError):
            raise NotPlainData("an integer outside the 64-bit range is not plain data") from None
        raise NotPlainData(f"not plain data: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise NotPlainData(f"{len(data)} bytes encoded: a message holds at most "
                           f"{MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes) -> Any:
    """The receiver's copy of an encoded payload (:class:`NotPlainData` if it is not one
    ``encode`` made: bytes from elsewhere are read strictly, extension types refused)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                               ext_hook=_no_ext, timestamp=0)
    except NotPlainData:
        raise
    except Exception as exc:  # msgpack raises a zoo: ValueError, StackError, TypeError...
        raise NotPlainData(f"undecodable payload: {type(exc).__name__}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise NotPlainData(f"msgpack extension type {code} is not plain data")


def copy(payload: Any) -> Any:
    """What the receiver of ``payload`` gets: a copy made through its encoding."""
    return decode(encode(payload))
