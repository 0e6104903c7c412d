"""PD cores: sans-I/O protection-domain logic, and the actions they return.

A core takes a message and the time and returns actions; it never calls the
kernel, the ledger or a socket itself.  Hosts (threads for the node, a virtual
clock for the simulator) carry the actions out, journal first:

* :class:`Append` -- an event for the ledger (appended before the rest is done);
* :class:`Send` / :class:`Call` -- a message under a token (a Call carries a reply cap);
* :class:`Reply` -- the answer to a call;
* :class:`SetTimer` -- ask for :meth:`Core.timer` after ``delay`` seconds;
* :class:`IoRequest` -- work for the PD's I/O adapter (later issues).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from actors.kernel import Delivery, ReplyCap
from ledger.caps import Token
from ledger.state import State


@dataclass(frozen=True, slots=True)
class Append:
    event: object


@dataclass(frozen=True, slots=True)
class Send:
    token: Token
    payload: Any
    transfer: Token | None = None


@dataclass(frozen=True, slots=True)
class Call:
    token: Token
    payload: Any


@dataclass(frozen=True, slots=True)
class Reply:
    reply: ReplyCap
    payload: Any


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class IoRequest:
    kind: str
    args: Any = None


Action = Append | Send | Call | Reply | SetTimer | IoRequest


@dataclass
class Core:
    """The logic every PD shares; the seven PDs refine it in later issues.

    It answers ``{"op": "ping"}`` (a call) with ``{"op": "pong", "badge": badge}``,
    keeps tokens handed to it inside messages, and counts what it received.
    """

    name: str
    tokens: list[Token] = field(default_factory=list)
    received: Counter[str] = field(default_factory=Counter)

    def start(self, tokens: list[Token], state: State, now: float) -> list[Action]:
        """(Re)start from the ledger's state: the tokens this PD holds there."""
        self.tokens = list(tokens)
        return []

    def handle(self, d: Delivery, now: float) -> list[Action]:
        op = d.payload.get("op") if isinstance(d.payload, dict) else None
        self.received[str(op)] += 1
        if d.transfer is not None:
            self.tokens.append(d.transfer)
        if op == "ping" and d.reply is not None:
            return [Reply(d.reply, {"op": "pong", "badge": d.badge, "from": self.name})]
        if op == "crash":  # lets tests and operators exercise supervision
            raise RuntimeError(f"{self.name}: crash requested")
        return []

    def timer(self, name: str, now: float) -> list[Action]:
        return []

    def status(self) -> dict[str, Any]:
        return {"tokens": len(self.tokens), "received": dict(self.received)}


def make_core(pd: str) -> Core:
    """The core for a PD named in the system description."""
    return Core(pd)
