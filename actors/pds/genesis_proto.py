"""The Genesis ceremony's protocol, sans I/O: codes, frames, and both sides' state machines.

**Codes.**  A pairing code is Crockford base32 (``0-9`` and ``A-Z`` less ``I L O U``):
``length - 1`` symbols from the CSPRNG and one check symbol, so a mistyped code (one
symbol wrong, or two neighbours swapped) is refused before any network use.  Reading is
forgiving: case-insensitive, ``I`` and ``L`` read as ``1``, ``O`` as ``0``, hyphens and
spaces ignored.  Shown grouped by four (``7KQ4-M2XD``).

**Frames.**  A frame is a 4-byte big-endian length and a msgpack array
``[version, kind, body]`` of at most :data:`MAX_FRAME` bytes, decoded strictly: exact
types, the exact keys of its kind, no msgpack extensions, nothing after it.

**The ceremony** (the approving node *A* connects to the new node *B*)::

    A -> B  hello         {name}             each side's name, then SPAKE2 with ids
    B -> A  pake          {name, pake}       bound to the version and both names
    A -> B  pake-confirm  {pake, confirm}    A's key confirmation
    B -> A  confirm       {confirm}          B's key confirmation, then, sealed under
    B -> A  sealed join    {wg_key, signing_key, endpoint}    keys from the PAKE key
    A -> B  sealed welcome {mesh_ip, admin, members}          (secretbox, a counter
    B -> A  sealed done    {transcript}                       nonce per direction)
    A -> B  sealed committed {transcript}

The approving node decides and commits first (on ``done``); the new node completes only
on ``committed``.  If that last frame is lost, the approving node has a member that never
came (``ppn mesh member remove`` takes it out), never the other way round.

Each confirmation is an HMAC-SHA-256 over the transcript so far (SHA-256 of every
frame in order), under a key of its own side, so neither can be replayed as the other.
One guess: a confirmation that does not verify ends the ceremony (both sides: ``code
mismatch``), and a :class:`Ceremony` never starts again. Anything out of order,
malformed, replayed or tampered with ends it too, with a one-line reason. Nothing here
ever puts the code or a key in a reason, a frame in the clear, or the transcript hash.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nacl.secret
from spake2 import SPAKE2_A, SPAKE2_B

VERSION = 1
MAX_FRAME = 64 * 1024
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTHS = range(6, 11)
DEFAULT_LENGTH = 8
_READ_AS = {"I": "1", "L": "1", "O": "0"}
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_CHECK_MOD = 31  # prime: a weighted sum mod 31 catches one wrong symbol, or a swap
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)
ENDPOINT_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}:\d{1,5}", re.ASCII)
MESH_IP_RE = re.compile(r"10\.8\.0\.\d{1,3}", re.ASCII)
MESH = ipaddress.IPv4Network("10.8.0.0/24")
ROLES = ("hub", "node", "cloud")
MAX_MEMBERS = 256


class CodeError(ValueError):
    """A code that cannot be right: the message says why (never what it was)."""


class CeremonyEnded(Exception):
    """The ceremony ended without completing; ``reason`` is one line, with no secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- codes
def _check_symbol(values: list[int]) -> int:
    return sum((i + 1) * v for i, v in enumerate(values)) % _CHECK_MOD


def new_code(entropy: Callable[[int], bytes], length: int = DEFAULT_LENGTH) -> str:
    """A fresh code of ``length`` symbols (the last a check), drawn from ``entropy``."""
    if length not in CODE_LENGTHS:
        raise CodeError(f"a code has {CODE_LENGTHS.start}-{CODE_LENGTHS.stop - 1} symbols")
    values: list[int] = []
    while len(values) < length - 1:
        values.extend(b & 31 for b in entropy(length))  # 256 is a multiple of 32: uniform
    values = values[:length - 1]
    return "".join(ALPHABET[v] for v in [*values, _check_symbol(values)])


def normalise(typed: str) -> str:
    """The code an operator typed, as the canonical symbols; :class:`CodeError` if it is
    not a well-formed code (bad symbols, wrong length, a failed check)."""
    if type(typed) is not str or len(typed) > 64:
        raise CodeError("not a code")
    text = "".join(_READ_AS.get(c, c) for c in typed.upper() if c not in "- \t")
    bad = sorted({c for c in text if c not in _VALUE})
    if bad:
        raise CodeError(f"a code has only 0-9 and A-Z without U ({len(bad)} other "
                        "symbol(s) typed)")
    if len(text) not in CODE_LENGTHS:
        raise CodeError(f"a code has {CODE_LENGTHS.start}-{CODE_LENGTHS.stop - 1} symbols, "
                        f"not {len(text)}")
    values = [_VALUE[c] for c in text]
    if _check_symbol(values[:-1]) != values[-1]:
        raise CodeError("the code is mistyped (its check symbol does not match)")
    return text


def grouped(code: str) -> str:
    """``7KQ4M2XD`` as an operator reads it: ``7KQ4-M2XD``."""
    return "-".join(code[i:i + 4] for i in range(0, len(code), 4))


# ----------------------------------------------------------------------------- frames
def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not accepted")


def encode_frame(kind: str, body: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb([VERSION, kind, body], use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ValueError(f"a {kind} frame of {len(data)} bytes is over {MAX_FRAME}")
    return len(data).to_bytes(4, "big") + data


class FrameReader:
    """Bytes from a stream in, whole frames out; a length over :data:`MAX_FRAME` is an
    error before anything of it is buffered."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= 4:
            n = int.from_bytes(self._buf[:4], "big")
            if not 0 < n <= MAX_FRAME:
                raise CeremonyEnded(f"a frame of {n} bytes (at most {MAX_FRAME})")
            if len(self._buf) < 4 + n:
                break
            frames.append(bytes(self._buf[4:4 + n]))
            del self._buf[:4 + n]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


SCHEMAS: dict[str, dict[str, type]] = {
    "hello": {"name": str},
    "pake": {"name": str, "pake": bytes},
    "pake-confirm": {"pake": bytes, "confirm": bytes},
    "confirm": {"confirm": bytes},
    "sealed": {"box": bytes},
    "abort": {"reason": str},
}
SEALED: dict[str, dict[str, type]] = {
    "join": {"wg_key": bytes, "signing_key": bytes, "endpoint": str, "role": str},
    "welcome": {"mesh_ip": str, "joined_ns": int, "admin": dict, "members": list,
                "removed": list},
    "done": {"transcript": bytes},
    "committed": {"transcript": bytes},
}
MEMBER: dict[str, type] = {"name": str, "wg_key": bytes, "signing_key": bytes,
                           "mesh_ip": str, "endpoint": str, "role": str, "joined_ns": int,
                           "approved_by": str}
"""A member as the approving node tells it (``endpoint`` and ``approved_by``: "" for
none)."""


def _strict(obj: Any, schema: dict[str, type], what: str) -> dict[str, Any]:
    if type(obj) is not dict or set(obj) != set(schema):
        raise CeremonyEnded(f"a malformed {what}")
    for key, want in schema.items():
        if type(obj[key]) is not want:
            raise CeremonyEnded(f"a malformed {what} ({key})")
    return obj


def decode_frame(data: bytes) -> tuple[str, dict[str, Any]]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext,
                              use_list=True)
    except Exception:  # msgpack raises many kinds: all are "not a frame"
        raise CeremonyEnded("a frame that is not msgpack") from None
    if type(obj) is not list or len(obj) != 3:
        raise CeremonyEnded("a frame that is not [version, kind, body]")
    version, kind, body = obj
    if type(version) is not int or version != VERSION:
        raise CeremonyEnded(f"protocol version {str(version)[:10]} (this node speaks "
                            f"{VERSION})")
    if type(kind) is not str or kind not in SCHEMAS:
        raise CeremonyEnded("a frame of an unknown kind")
    return kind, _strict(body, SCHEMAS[kind], f"{kind} frame")


def _name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise CeremonyEnded(f"a malformed {what} name")
    return value


def mesh_ip_ok(value: str) -> bool:
    """A host address of the mesh (10.8.0.1 - 10.8.0.254), in its canonical spelling."""
    if not MESH_IP_RE.fullmatch(value):
        return False
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return (str(ip) == value and ip in MESH
            and ip not in (MESH.network_address, MESH.broadcast_address))


def endpoint_ok(value: str) -> bool:
    """An underlay ``IPv4:PORT`` the ledger accepts (port 1-65535, canonical spelling)."""
    if not ENDPOINT_RE.fullmatch(value):
        return False
    host, _, port = value.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return str(ip) == host and port[0] != "0" and 1 <= int(port) <= 65535


def check_member(obj: Any) -> dict[str, Any]:
    m = _strict(obj, MEMBER, "member record")
    _name(m["name"], "member")
    if len(m["wg_key"]) != 32 or len(m["signing_key"]) != 32:
        raise CeremonyEnded("a member record with a key that is not 32 bytes")
    if m["wg_key"] == m["signing_key"]:
        raise CeremonyEnded("a member record whose two keys are the same")
    if not mesh_ip_ok(m["mesh_ip"]) or not (endpoint_ok(m["endpoint"])
                                            or m["endpoint"] == ""):
        raise CeremonyEnded("a member record with a malformed address")
    if m["role"] not in ROLES:
        raise CeremonyEnded("a member record with an unknown role")
    if not 0 <= m["joined_ns"] < 1 << 63 or (m["approved_by"]
                                             and not NAME_RE.fullmatch(m["approved_by"])):
        raise CeremonyEnded("a member record with a malformed admission")
    return m


# ----------------------------------------------------------------------------- ceremony
@dataclass(frozen=True)
class Offer:
    """What a side says of itself once the key is confirmed (public keys only)."""

    name: str
    wg_key: bytes
    signing_key: bytes
    endpoint: str
    role: str = "node"


@dataclass(frozen=True)
class Completed:
    """How a ceremony ended well: the other side, and what was agreed."""

    peer: dict[str, Any]  # the joiner's offer (at A), the approving node's record (at B)
    mesh_ip: str  # the new node's address
    joined_ns: int  # when it was admitted, by the approving node's clock
    members: list[dict[str, Any]]  # the members B learns (at A: what it sent)
    transcript: bytes  # SHA-256 of every frame of the ceremony, in order
    removed: list[tuple[str, int, str]] = field(default_factory=list)
    """Members the approving node removed (name, when, by whom): the new node keeps
    them as tombstones, so that no old admission of theirs, replayed, brings them in."""


Assign = Callable[[Offer], tuple[str, int, dict[str, Any], list[dict[str, Any]]]]
"""The approving side's decision for a joiner: (its address, when it is admitted, our
member record, the members it learns); a ValueError refuses it."""

_NEXT: dict[tuple[str, str], str] = {  # (role, state) -> the frame that may come
    ("joiner", "new"): "hello", ("approver", "hello-sent"): "pake",
    ("joiner", "pake-sent"): "pake-confirm", ("approver", "confirm-sent"): "confirm",
    ("approver", "confirmed"): "sealed", ("joiner", "joined"): "sealed",
    ("approver", "welcomed"): "sealed", ("joiner", "done-sent"): "sealed"}


MAX_TOMBSTONES = 1024


def _tombstones(raw: list[Any], members: set[str]) -> list[tuple[str, int, str]]:
    if len(raw) > MAX_TOMBSTONES:
        raise CeremonyEnded("a welcome with too many removed members")
    out = []
    for t in raw:
        if (type(t) is not list or len(t) != 3 or type(t[0]) is not str
                or not NAME_RE.fullmatch(t[0]) or type(t[1]) is not int
                or not 0 <= t[1] < 1 << 63 or type(t[2]) is not str
                or (t[2] and not NAME_RE.fullmatch(t[2])) or t[0] in members):
            raise CeremonyEnded("a welcome with a malformed removed member")
        out.append((t[0], t[1], t[2]))
    return out


def _ids(approver: str, joiner: str) -> tuple[bytes, bytes]:
    return (f"ppn-genesis/{VERSION}/approver/{approver}".encode(),
            f"ppn-genesis/{VERSION}/joiner/{joiner}".encode())


def _kdf(key: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(label, key=key, digest_size=32, person=b"ppn-genesis-v1").digest()


class Ceremony:
    """One side of one ceremony.  :meth:`start` (the approving side) and :meth:`receive`
    (the peer's bytes, in any pieces) return the frames to send.  It ends once:
    :attr:`completed`, or :attr:`ended` with a one-line reason; whatever ends it, it never
    starts again and reads nothing more (one guess per code)."""

    def __init__(self, role: str, code: str, offer: Offer, entropy: Callable[[int], bytes],
                 assign: Assign | None = None,
                 tombstones: list[tuple[str, int, str]] | None = None) -> None:
        if role not in ("approver", "joiner"):
            raise ValueError(f"role {role!r}")
        if role == "approver" and assign is None:
            raise ValueError("the approving side assigns the address and the members")
        self.role, self.offer = role, offer
        self._password = normalise(code).encode()
        self._entropy = entropy
        self._assign = assign
        self._reader = FrameReader()
        self._transcript = hashlib.sha256()
        self._pake: SPAKE2_A | SPAKE2_B | None = None
        self._key = b""
        self._boxes: dict[str, nacl.secret.SecretBox] = {}
        self._counters = {"send": 0, "recv": 0}
        self._state = "new"
        self.peer_name: str | None = None
        self._join: Offer | None = None
        self._welcome: tuple[str, int, dict[str, Any], list[dict[str, Any]]] | None = None
        self._agreed: Completed | None = None
        self._tombstones = list(tombstones or [])[:MAX_TOMBSTONES]
        self.completed: Completed | None = None
        self.ended: str | None = None

    @property
    def done(self) -> bool:
        return self.completed is not None or self.ended is not None

    @property
    def state(self) -> str:
        return "completed" if self.completed else "ended" if self.ended else self._state

    # -------------------------------------------------------------- frames out
    def _frame(self, kind: str, body: dict[str, Any]) -> bytes:
        data = encode_frame(kind, body)
        self._transcript.update(data)
        return data

    def _seal(self, kind: str, body: dict[str, Any]) -> bytes:
        plain = msgpack.packb([kind, body], use_bin_type=True)
        nonce = self._counters["send"].to_bytes(nacl.secret.SecretBox.NONCE_SIZE, "big")
        self._counters["send"] += 1
        box = self._boxes["send"].encrypt(plain, nonce).ciphertext
        return self._frame("sealed", {"box": box})

    def _open(self, body: dict[str, Any], want: str) -> dict[str, Any]:
        nonce = self._counters["recv"].to_bytes(nacl.secret.SecretBox.NONCE_SIZE, "big")
        try:
            plain = self._boxes["recv"].decrypt(body["box"], nonce)
        except Exception:
            raise CeremonyEnded("a sealed frame that does not open (tampered, replayed "
                                "or out of order)") from None
        self._counters["recv"] += 1
        try:
            obj = msgpack.unpackb(plain, raw=False, strict_map_key=True, ext_hook=_no_ext,
                                  use_list=True)
        except Exception:
            raise CeremonyEnded("a sealed frame that is not msgpack") from None
        if type(obj) is not list or len(obj) != 2 or obj[0] != want:
            raise CeremonyEnded(f"a sealed frame where a {want} belongs")
        return _strict(obj[1], SEALED[want], f"{want} message")

    # -------------------------------------------------------------- keys
    def _finish(self, peer_msg: bytes) -> None:
        assert self._pake is not None
        try:
            self._key = bytes(self._pake.finish(peer_msg))
        except Exception:  # spake2 raises its own kinds too (NotOnCurve, ...): all say it
            raise CeremonyEnded("a malformed PAKE message") from None
        self._pake = None
        mine, theirs = (("approver", "joiner") if self.role == "approver"
                        else ("joiner", "approver"))
        self._boxes = {"send": nacl.secret.SecretBox(_kdf(self._key, f"seal/{mine}".encode())),
                       "recv": nacl.secret.SecretBox(_kdf(self._key,
                                                          f"seal/{theirs}".encode()))}

    def _mac(self, side: str, transcript: bytes) -> bytes:
        return hmac.new(_kdf(self._key, f"confirm/{side}".encode()), transcript,
                        hashlib.sha256).digest()

    def _new_pake(self) -> bytes:
        assert self.peer_name is not None
        approver, joiner = ((self.offer.name, self.peer_name) if self.role == "approver"
                            else (self.peer_name, self.offer.name))
        ida, idb = _ids(approver, joiner)
        kind = SPAKE2_A if self.role == "approver" else SPAKE2_B
        self._pake = kind(self._password, idA=ida, idB=idb, entropy_f=self._entropy)
        return bytes(self._pake.start())

    def _forget(self) -> None:
        self._key, self._pake, self._boxes, self._password = b"", None, {}, b""

    # -------------------------------------------------------------- driving
    def start(self) -> list[bytes]:
        """The approving side's first frame (the joiner waits: it returns nothing)."""
        if self.role != "approver" or self._state != "new" or self.done:
            return []
        self._state = "hello-sent"
        return [self._frame("hello", {"name": self.offer.name})]

    def fail(self, reason: str) -> None:
        """End it from outside (the connection closed, the window passed)."""
        if not self.done:
            self.ended = reason
            self._forget()

    def receive(self, data: bytes) -> list[bytes]:
        """The peer's bytes; the frames to send back (an ``abort`` if this ends it)."""
        if self.done:
            return []
        out: list[bytes] = []
        try:
            for frame in self._reader.feed(data):
                out += self._on_frame(frame)
                if self.done:
                    break
        except CeremonyEnded as exc:
            told = exc.reason in ("code mismatch", "the other side ended it")
            self.fail(exc.reason)
            if exc.reason != "the other side ended it":
                out.append(encode_frame("abort", {"reason": "code mismatch" if told
                                                  else "protocol error"}))
        return out

    def _on_frame(self, frame: bytes) -> list[bytes]:
        kind, body = decode_frame(frame)
        if kind == "abort":
            raise CeremonyEnded("code mismatch" if body["reason"] == "code mismatch"
                                else "the other side ended it")
        want = _NEXT.get((self.role, self._state))
        if kind != want:
            raise CeremonyEnded(f"a {kind} frame where {want or 'nothing'} belongs")
        before = self._transcript.digest()
        self._transcript.update(len(frame).to_bytes(4, "big") + frame)
        handler = getattr(self, f"_{self.role}_{self._state.replace('-', '_')}")
        out: list[bytes] = handler(body, before)
        return out

    # -------------------------------------------------------------- the joiner
    def _joiner_new(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        self.peer_name = _name(body["name"], "approving node's")
        if self.peer_name == self.offer.name:
            raise CeremonyEnded("the approving node has this node's own name")
        self._state = "pake-sent"
        return [self._frame("pake", {"name": self.offer.name, "pake": self._new_pake()})]

    def _joiner_pake_sent(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        self._finish(body["pake"])
        # A's confirmation covers the transcript up to its own pake message.
        seen = before + msgpack.packb(body["pake"], use_bin_type=True)
        if not hmac.compare_digest(self._mac("approver", seen), body["confirm"]):
            raise CeremonyEnded("code mismatch")
        confirm = self._frame("confirm", {"confirm": self._mac("joiner",
                                                               self._transcript.digest())})
        self._state = "joined"
        o = self.offer
        return [confirm, self._seal("join", {"wg_key": o.wg_key, "signing_key": o.signing_key,
                                             "endpoint": o.endpoint, "role": o.role})]

    def _joiner_joined(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        w = self._open(body, "welcome")
        if not mesh_ip_ok(w["mesh_ip"]) or not 0 <= w["joined_ns"] < 1 << 63:
            raise CeremonyEnded("a welcome with a malformed address or time")
        admin = check_member(w["admin"])
        if admin["name"] != self.peer_name:
            raise CeremonyEnded("a welcome naming another approving node")
        if len(w["members"]) > MAX_MEMBERS:
            raise CeremonyEnded("a welcome with too many members")
        members = [check_member(m) for m in w["members"]]
        self._check_members(w["mesh_ip"], admin, members)
        removed = _tombstones(w["removed"], {m["name"] for m in members})
        digest = self._transcript.digest()
        self._agreed = Completed(admin, w["mesh_ip"], w["joined_ns"], members, digest,
                                 removed)
        self._state = "done-sent"
        return [self._seal("done", {"transcript": digest})]

    def _check_members(self, mesh_ip: str, admin: dict[str, Any],
                       members: list[dict[str, Any]]) -> None:
        """The member list must be one this node can record whole, before it says
        ``done`` (on which the approving side commits): unique names, addresses and
        keys; the approving node among them as it described itself; none of them this
        node under other keys, or another node with this node's keys or address."""
        o = self.offer
        mine = {o.wg_key, o.signing_key}
        names: set[str] = set()
        ips: set[str] = {mesh_ip}
        keys: set[bytes] = set(mine)
        for m in members:
            if m["name"] in names:
                raise CeremonyEnded("a welcome naming a member twice")
            names.add(m["name"])
            if m["name"] == o.name:  # this node itself: only as it is, where it is put
                if (m["wg_key"], m["signing_key"], m["mesh_ip"]) != (
                        o.wg_key, o.signing_key, mesh_ip):
                    raise CeremonyEnded("a welcome with another record for this node")
                continue
            if m["mesh_ip"] in ips:
                raise CeremonyEnded("a welcome giving two members one address")
            ips.add(m["mesh_ip"])
            if {m["wg_key"], m["signing_key"]} & keys:
                raise CeremonyEnded("a welcome giving two members one key")
            keys |= {m["wg_key"], m["signing_key"]}
        if admin not in members:
            raise CeremonyEnded("a welcome whose approving node is not among its members")

    def _joiner_done_sent(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        c = self._open(body, "committed")
        if self._agreed is None or not hmac.compare_digest(c["transcript"],
                                                           self._agreed.transcript):
            raise CeremonyEnded("the two sides saw different ceremonies")
        self.completed = self._agreed
        self._forget()
        return []

    # -------------------------------------------------------------- the approver
    def _approver_hello_sent(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        self.peer_name = _name(body["name"], "new node's")
        if self.peer_name == self.offer.name:
            raise CeremonyEnded("the new node has this node's own name")
        mine = self._new_pake()
        self._finish(body["pake"])
        seen = self._transcript.digest() + msgpack.packb(mine, use_bin_type=True)
        self._state = "confirm-sent"
        return [self._frame("pake-confirm", {"pake": mine, "confirm": self._mac("approver",
                                                                                 seen)})]

    def _approver_confirm_sent(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        if not hmac.compare_digest(self._mac("joiner", before), body["confirm"]):
            raise CeremonyEnded("code mismatch")
        self._state = "confirmed"
        return []

    def _approver_confirmed(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        j = self._open(body, "join")
        if len(j["wg_key"]) != 32 or len(j["signing_key"]) != 32:
            raise CeremonyEnded("a join with a key that is not 32 bytes")
        if j["wg_key"] == j["signing_key"]:
            raise CeremonyEnded("a join whose two keys are the same")
        if not endpoint_ok(j["endpoint"]):
            raise CeremonyEnded("a join with a malformed endpoint")
        if j["role"] not in ROLES:
            raise CeremonyEnded("a join with an unknown role")
        assert self.peer_name is not None and self._assign is not None
        self._join = Offer(self.peer_name, j["wg_key"], j["signing_key"], j["endpoint"],
                           j["role"])
        try:
            self._welcome = self._assign(self._join)
        except ValueError as exc:
            raise CeremonyEnded(f"the new node cannot be admitted: {exc}") from None
        mesh_ip, joined_ns, admin, members = self._welcome
        self._state = "welcomed"
        return [self._seal("welcome", {"mesh_ip": mesh_ip, "joined_ns": joined_ns,
                                       "admin": admin, "members": members,
                                       "removed": [list(t) for t in self._tombstones]})]

    def _approver_welcomed(self, body: dict[str, Any], before: bytes) -> list[bytes]:
        d = self._open(body, "done")
        if not hmac.compare_digest(d["transcript"], before):
            raise CeremonyEnded("the two sides saw different ceremonies")
        assert self._join is not None and self._welcome is not None
        mesh_ip, joined_ns, _, members = self._welcome
        j = self._join
        self.completed = Completed({"name": j.name, "wg_key": j.wg_key,
                                    "signing_key": j.signing_key, "endpoint": j.endpoint,
                                    "role": j.role},
                                   mesh_ip, joined_ns, members, before)
        out = [self._seal("committed", {"transcript": before})]
        self._forget()
        return out
