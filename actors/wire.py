"""Messages by value: a payload is encoded at send and decoded at delivery.

Plain data only -- ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``,
``bytes``, and ``list`` / ``dict`` of those, exact types (no subclasses, so no
code of the sender's can run in the receiver) -- at most :data:`MAX_MESSAGE_BYTES`
encoded.  The receiver gets its own copy, so nothing it does reaches the sender's
objects, and the same bytes can later cross a process or a network unchanged.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 1 << 20
"""The largest encoded payload a message may carry (1 MiB)."""


class NotPlainData(ValueError):
    """A payload that cannot travel by value: what it holds, or how big it is."""


def _refuse(obj: object) -> Any:
    kind = type(obj).__name__
    hint = "; send a list" if type(obj) is tuple else ""
    raise NotPlainData(f"a {kind} is not plain data (None, bool, int, float, str, bytes, "
                       f"list, dict){hint}")


def encode(payload: Any) -> bytes:
    """The payload's bytes; :class:`NotPlainData` if it is not plain or too big."""
    try:
        data: bytes = msgpack.packb(payload, use_bin_type=True, strict_types=True,
                                    default=_refuse)
    except NotPlainData:
        raise
    except OverflowError:
        raise NotPlainData("an integer outside the 64-bit range is not plain data") from None
    except (TypeError, ValueError) as exc:  # nested too deeply, or not packable at all
        raise NotPlainData(f"not plain data: {exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise NotPlainData(f"{len(data)} bytes encoded: a message holds at most "
                           f"{MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes) -> Any:
    """The receiver's copy of an encoded payload."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def copy(payload: Any) -> Any:
    """What the receiver of ``payload`` gets: a copy made through its encoding."""
    return decode(encode(payload))
