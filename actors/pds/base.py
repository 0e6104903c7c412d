"""What a PD's core sees and what it returns: the vocabulary every core and both hosts share.

A core is sans-I/O.  It is handed, and only ever sees:

* a :class:`PdView` when it (re)starts -- its own capabilities, the node's public
  identity and the sections of the state its PD journals (copies, not the state);
* a :class:`Message` per delivery -- the object it came in on, the badge, its own
  copy of the payload (plain data), a token carried in it, and an opaque
  :class:`ReplyCap` if the sender awaits an answer;
* timer ticks, answers to its I/O requests and unsolicited input from its adapter;
* a :class:`Refused` when the kernel refused one of its actions.

It returns actions: :class:`Append` (journal; carried out first, and nothing else
is done if the kernel refuses the journalling), :class:`Send`, :class:`Call`,
:class:`Reply`, :class:`SetTimer`, and I/O requests (subclasses of
:class:`IoRequest`, which the PD's core declares in ``requests``).

This module imports no threads, sockets or actor library: a test keeps every
core so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from ledger.caps import Token


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True, slots=True)
class ReplyCap:
    """A one-shot right to answer one call: opaque (the kernel alone knows the caller)."""

    reply_id: int

    def __repr__(self) -> str:
        return "ReplyCap(...)"


@dataclass(frozen=True, slots=True)
class Held:
    """One capability this PD holds, as its core sees it: the token and what it is for."""

    token: Token
    obj: str
    rights: tuple[str, ...]
    badge: int | None


@dataclass(frozen=True, slots=True)
class PdView:
    """What a core is started with: its own capabilities and the state its PD owns."""

    pd: str
    held: tuple[Held, ...]
    node: dict[str, Any] | None = None
    """The node's public identity: name, role, mesh IP, underlay endpoint (no keys)."""
    owned: dict[str, Any] = field(default_factory=dict)
    """Per event family this PD journals, that family's part of the state (a copy)."""
    members: dict[str, Any] = field(default_factory=dict)
    """The mesh's members as the ledger has them, by name: public keys, mesh IP,
    endpoint and role (what every node's nodes.jsonl says; no secret)."""
    removed: dict[str, Any] = field(default_factory=dict)
    """Members removed, by name: ``{"at": ns, "by": node or None}``."""

    @property
    def tokens(self) -> list[Token]:
        return [h.token for h in self.held]


class Message(NamedTuple):
    """A delivery as its receiver's core sees it: the badge is all it learns of the sender.

    ``obj`` is the object it came in on (one this PD serves), or ``"reply"`` for the
    answer to one of its own calls, which then carries the ``tag`` the call was made
    with.  ``payload`` is the receiver's own copy, decoded from the bytes the sender's
    payload was encoded to: plain data only.
    """

    obj: str
    badge: int | None
    payload: Any
    transfer: Held | None = None
    reply: ReplyCap | None = None
    tag: int | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The kernel refused one of this core's actions: which, with the kernel's reason."""

    action: Action
    code: str
    cap_id: int | None
    reason: str


# ----------------------------------------------------------------------------- I/O
@dataclass(frozen=True, slots=True)
class IoRequest:
    """Work for the PD's adapter.  Each PD declares its requests as subclasses."""

    request_id: int


@dataclass(frozen=True, slots=True)
class IoResult:
    """An adapter's answer to request ``request_id``: it was done, with ``value``."""

    request_id: int
    value: Any


@dataclass(frozen=True, slots=True)
class IoFailure:
    """An adapter's answer to request ``request_id``: it could not be done, and why."""

    request_id: int
    error: str


IoAnswer = IoResult | IoFailure


@dataclass(frozen=True, slots=True)
class IoInput:
    """What the world says unasked (a datagram arrived, a process exited): subclassed."""


@dataclass(frozen=True, slots=True)
class NodeChanged(IoInput):
    """The node's public identity changed in the ledger (a node waiting to be joined got
    its mesh address, say): told by the kernel to every running core, which gets it by
    :meth:`Core.node_changed`."""

    node: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HeldChanged(IoInput):
    """This PD's capabilities changed outside its own actions (a reap deleted some, a
    spawn granted the channels to the PD spawned): the host hands its core what it holds
    when it is told (:meth:`Core.held_changed`)."""


@dataclass(frozen=True, slots=True)
class MembersChanged(IoInput):
    """The mesh's membership changed in the ledger (a ceremony admitted a node, a member
    was removed): told to every running core, which gets it by
    :meth:`Core.members_changed` (``members`` as :attr:`PdView.members` gives it)."""

    members: dict[str, Any]
    removed: dict[str, Any]


# ----------------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Append:
    """An event for the ledger, journalled under this PD's ``ledger.append`` capability."""

    event: object


@dataclass(frozen=True, slots=True)
class Send:
    token: Token
    payload: Any
    transfer: Token | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """A send with a reply cap; the answer comes back as a ``"reply"`` message with ``tag``."""

    token: Token
    payload: Any
    tag: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    reply: ReplyCap
    payload: Any


@dataclass(frozen=True, slots=True)
class Spawn:
    """Spawn the PD a capability on a spawn object runs (``genesis.spawn``: pd-genesis),
    given again what the system description gives it; refused unless ``token`` is a live
    write capability this PD holds on such an object, and the PD is reaped."""

    token: Token
    reason: str


@dataclass(frozen=True, slots=True)
class Reap:
    """End this PD's own work (pd-genesis, its ceremony over): after this step's other
    actions, its capabilities are revoked (recorded) and its actor stops."""

    reason: str


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    delay: float


Action = Append | Send | Call | Reply | SetTimer | Spawn | Reap | IoRequest
MESSAGE_ACTIONS = (Send, Call, Reply)


# ----------------------------------------------------------------------------- the core
class Core:
    """The logic every PD shares; each PD's module refines it.

    Messages are dispatched on their ``"op"`` through :attr:`ops` (op -> method
    name).  Anything else -- a payload that is not a map, an op that is not a
    string or not known -- is a refused message: counted, answered with an error
    if it was a call, and never a crash.  The stock ops: ``ping`` (a call) is
    answered with ``{"op": "pong", "badge": badge, "from": pd}``; ``note`` is
    counted.  A token carried in a message is kept.
    """

    requests: ClassVar[tuple[type[IoRequest], ...]] = ()
    """The I/O requests this PD may make; the host refuses any other."""
    ops: ClassVar[dict[str, str]] = {"ping": "op_ping", "note": "op_note"}

    def __init__(self, name: str) -> None:
        self.name = name
        self.held: list[Held] = []
        self.node: dict[str, Any] | None = None
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self._next_request = 0

    # --------------------------------------------------------------- inputs
    def start(self, view: PdView, now: float) -> list[Action]:
        """(Re)start from the ledger: this PD's capabilities and its part of the state."""
        self.held = list(view.held)
        self.node = view.node
        return []

    def handle(self, m: Message, now: float) -> list[Action]:
        if m.transfer is not None:
            self.held.append(m.transfer)
        payload = m.payload
        op = payload.get("op") if type(payload) is dict else None
        method = self.ops.get(op) if type(op) is str else None
        if method is None:
            why = ("not a map with a string 'op'" if type(op) is not str
                   else f"unknown op {op[:40]!r}")
            self.rejected[why if type(op) is not str else "unknown op"] += 1
            return self.error(m, why)
        self.received[str(op)] += 1
        actions: list[Action] = getattr(self, method)(m, payload, now)
        return actions

    def timer(self, name: str, now: float) -> list[Action]:
        return []

    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        return []

    def input(self, event: IoInput, now: float) -> list[Action]:
        return []

    def node_changed(self, node: dict[str, Any], now: float) -> list[Action]:
        """The node's public identity is now ``node`` (as ``PdView.node`` gives it)."""
        self.node = dict(node)
        return []

    def held_changed(self, held: tuple[Held, ...], now: float) -> list[Action]:
        """This PD was granted capabilities outside its own actions: ``held`` is all it
        holds now."""
        self.held = list(held)
        return []

    def members_changed(self, members: dict[str, Any], now: float,
                        removed: dict[str, Any] | None = None) -> list[Action]:
        """The mesh's members are now ``members`` (as ``PdView.members`` gives them), and
        those removed ``removed``."""
        return []

    def refused(self, r: Refused, now: float) -> list[Action]:
        self.refusals[r.code] += 1
        return []

    def status(self) -> dict[str, Any]:
        return {"tokens": len(self.held), "received": dict(self.received),
                "rejected": dict(self.rejected), "refusals": dict(self.refusals)}

    # --------------------------------------------------------------- helpers
    def error(self, m: Message, why: str) -> list[Action]:
        """Answer a call with an error (a plain send gets no answer; it was counted)."""
        if m.reply is None:
            return []
        return [Reply(m.reply, {"ok": False, "error": f"{self.name}: {why}"})]

    def request_id(self) -> int:
        """A fresh id for one of this core's I/O requests."""
        self._next_request += 1
        return self._next_request

    def holding(self, obj: str, right: str = "write") -> Held | None:
        """A capability this PD holds on ``obj`` with ``right`` (the first, by cap id)."""
        fit = [h for h in self.held if h.obj == obj and right in h.rights]
        return min(fit, key=lambda h: h.token.cap_id) if fit else None

    # --------------------------------------------------------------- stock ops
    def op_ping(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        return [Reply(m.reply, {"op": "pong", "badge": m.badge, "from": self.name})]

    def op_note(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        return []
