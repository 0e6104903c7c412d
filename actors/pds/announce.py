"""Membership announcements, sans I/O: how a node tells every member that it admitted or
removed a node, and how a member decides whether to believe it.

An announcement is one UDP datagram over the tunnel (to each member's mesh address, port
:data:`PORT`): ``msgpack([VERSION, body, signature])`` where ``body`` is
``msgpack([kind, record, by, at_ns])`` -- ``kind`` ``"added"`` (``record`` a member
record, as the ceremony's welcome carries it) or ``"removed"`` (``record`` ``{"name"}``),
``by`` the announcing node, ``at_ns`` when (its clock: the member's ``joined_ns``, or the
removal's time) -- and ``signature`` is ``by``'s Ed25519 signature over
:data:`CONTEXT` + ``body``.

A member accepts one only if ``by`` is a member its own ledger has (any member may admit:
each approved by a ceremony or a founder), the signature verifies under the key its own
ledger holds for ``by``, and it is news: an addition of a node it does not have and did not
remove later, a removal of a node it has that joined before.  A replay, whatever its age,
is therefore a no-op; anything else is dropped and counted by why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from actors.pds.base import IoInput, IoRequest
from actors.pds.genesis_proto import CeremonyEnded, check_member

VERSION = 1
PORT = 51_900
MAX_DATAGRAM = 4096
CONTEXT = b"ppn-membership-announcement/v1\0"
KINDS = ("added", "removed")


@dataclass(frozen=True)
class Announcement:
    kind: str
    record: dict[str, Any]
    by: str
    at_ns: int


class Rejected(ValueError):
    """Why an announcement is dropped: a short reason, also the counter's key."""


def body(a: Announcement) -> bytes:
    out: bytes = msgpack.packb([a.kind, a.record, a.by, a.at_ns], use_bin_type=True)
    return out


def datagram(a: Announcement, signature: bytes) -> bytes:
    out: bytes = msgpack.packb([VERSION, body(a), signature], use_bin_type=True)
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("no msgpack extensions")


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                               use_list=True)
    except Exception:
        raise Rejected("malformed") from None


def parse(data: bytes) -> tuple[Announcement, bytes, bytes]:
    """(the announcement, the signed bytes, the signature) -- or :class:`Rejected`."""
    if type(data) is not bytes or len(data) > MAX_DATAGRAM:
        raise Rejected("malformed")
    outer = _unpack(data)
    if (type(outer) is not list or len(outer) != 3 or outer[0] != VERSION
            or type(outer[1]) is not bytes or type(outer[2]) is not bytes
            or len(outer[2]) != 64):
        raise Rejected("malformed")
    signed, signature = outer[1], outer[2]
    inner = _unpack(signed)
    if type(inner) is not list or len(inner) != 4:
        raise Rejected("malformed")
    kind, record, by, at_ns = inner
    if (kind not in KINDS or type(record) is not dict or type(by) is not str
            or type(at_ns) is not int or not 0 <= at_ns < 1 << 63):
        raise Rejected("malformed")
    try:
        if kind == "added":
            record = check_member(record)
        elif set(record) != {"name"} or type(record["name"]) is not str:
            raise Rejected("malformed")
    except CeremonyEnded:
        raise Rejected("malformed") from None
    return Announcement(kind, record, by, at_ns), signed, signature


def judge(a: Announcement, signed: bytes, signature: bytes, members: dict[str, Any],
          removed: dict[str, int], me: str) -> None:
    """Raise :class:`Rejected` unless this node should record ``a`` now."""
    announcer = members.get(a.by)
    if announcer is None or a.by == me:
        raise Rejected("not from a member")
    try:
        VerifyKey(bytes(announcer["signing_key"])).verify(CONTEXT + signed, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise Rejected("bad signature") from None
    name = a.record["name"]
    if a.kind == "added":
        if name == me or name in members:
            raise Rejected("not news")
        if a.record.get("approved_by") != a.by or a.record.get("joined_ns") != a.at_ns:
            raise Rejected("malformed")
        if removed.get(name, -1) >= a.at_ns:
            raise Rejected("not news")  # an old addition, replayed after the removal
        return
    member = members.get(name)
    if name == me:
        raise Rejected("not news")
    if member is None:  # never had it: kept as a tombstone, unless one as new is kept
        if removed.get(name, -1) >= a.at_ns:
            raise Rejected("not news")
        return
    if int(member.get("joined_ns") or 0) >= a.at_ns:
        raise Rejected("not news")  # an old removal, replayed after it joined again


# ----------------------------------------------------------------------------- I/O
@dataclass(frozen=True, slots=True)
class BindAnnounce(IoRequest):
    """Receive announcements on UDP ``host:port`` (the node's mesh address: they come
    over the tunnel); a second bind replaces the first.  Answered ``{"bound": ...}``."""

    host: str
    port: int = PORT


@dataclass(frozen=True, slots=True)
class SendAnnounce(IoRequest):
    """One datagram to ``host:port``: answered ``{"sent": n}``."""

    host: str
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SignAnnounce(IoRequest):
    """This node's Ed25519 signature over :data:`CONTEXT` + ``body`` (the adapter holds
    the key; it never leaves it): answered ``{"signature": bytes}``."""

    body: bytes


@dataclass(frozen=True, slots=True)
class AnnounceReceived(IoInput):
    """A datagram on the announcement socket, from ``source`` (``IP:PORT``)."""

    source: str
    data: bytes
