"""The capability kernel: every PD-to-PD message and capability operation goes through it.

The kernel is not a PD; it is what PDs are confined by, as seL4 is.  A PD acts
only through a :class:`Port` bound to its name, presenting :class:`Token` s.  The
kernel checks each token against the live capability table (which the ledger's
fold maintains), journals every capability operation before it takes effect,
and hands deliveries to the host through a ``route`` callback.  It never looks
an actor up by name in a registry: the host gives it one route.

Revocation is immediate: a delivery is checked again when the receiver is about
to see it, so once ``revoke`` has returned, nothing sent under a revoked cap gets
through, however long it sat in a queue.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from ledger import caps
from ledger.caps import CapRefused, Token
from ledger.catalog import CapGranted
from ledger.log import Ledger
from ledger.state import State

log = structlog.get_logger("kernel")


@dataclass(frozen=True, slots=True)
class ReplyCap:
    """A one-shot right to answer one call; made per call, never journaled (as in seL4)."""

    reply_id: int
    caller: str


class Delivery(NamedTuple):
    """A message as its receiver sees it: the badge is all it learns of the sender.

    A NamedTuple rather than a dataclass: one is built per message, and this is
    the cheapest immutable record Python has.
    """

    target: str
    obj: str
    badge: int | None
    payload: Any
    cap_id: int
    transfer: Token | None = None
    reply: ReplyCap | None = None


Route = Callable[[str, Delivery], None]


MAX_PENDING_CALLS = 1024
"""Calls one PD may have waiting for their answers; one more is refused and counted."""


class Kernel:
    """Checks tokens, journals capability operations, routes messages."""

    def __init__(self, ledger: Ledger, route: Route | None = None, *,
                 reply_ids: Callable[[], int] | None = None) -> None:
        self._ledger = ledger
        # The ledger folds into one State object for its whole life: hold it directly.
        self._state = ledger.state
        self._route: Route = route or _no_route
        self._ops = threading.Lock()  # one capability operation at a time
        self._reply_lock = threading.Lock()
        self._replies: dict[int, tuple[str, str]] = {}  # reply id -> (caller, callee)
        self._answers: dict[int, Callable[[Any], None]] = {}  # reply id -> operator's callback
        # Unguessable: a callee cannot answer a call it has not been handed yet.  The
        # simulator passes a seeded source, so that a seed still reproduces a run.
        self._next_reply_id = reply_ids or (lambda: secrets.randbits(63))
        self._pending: Counter[str] = Counter()  # caller -> calls not answered yet
        self.refused: Counter[tuple[str, str]] = Counter()  # (pd, code) -> count
        self.dropped = 0  # deliveries stopped at the receiver: cap revoked in flight

    def set_route(self, route: Route) -> None:
        self._route = route

    @property
    def state(self) -> State:
        return self._state

    def owner(self, obj: str) -> str | None:
        """The PD serving ``obj`` (fixed by its first original grant)."""
        target = self.state.objects.get(obj)
        if target is None and obj.startswith("endpoint:"):
            return obj.removeprefix("endpoint:")
        return target

    def port(self, pd: str) -> Port:
        """The only handle through which ``pd`` can act."""
        if pd not in self.state.pds:
            raise KeyError(f"no protection domain {pd!r}")
        return Port(self, pd)

    # ----------------------------------------------------------------- messages
    def _refuse(self, exc: CapRefused) -> CapRefused:
        self.refused[(exc.pd, exc.code)] += 1
        log.info("kernel.refused", pd=exc.pd, cap=exc.cap_id, code=exc.code, right=exc.right,
                 reason=str(exc))
        return exc

    def send(self, pd: str, token: Token, payload: Any, *, transfer: Token | None = None,
             reply: ReplyCap | None = None) -> None:
        """Queue ``payload`` for the PD serving the cap's object; refusals raise."""
        state = self._state
        cap = state.caps.get(token.cap_id) if caps.well_formed(token) else None
        # Fast path, the common case: a plain message under a sound token to a running PD.
        if (transfer is None and cap is not None and cap.holder == pd == token.holder
                and cap.sig is not None and hmac.compare_digest(cap.sig, token.signature)
                and "write" in cap.rights):
            target = state.objects.get(cap.obj)
            if target is not None and state.pd_status.get(target) == "running":
                self._route(target, Delivery(target, cap.obj, cap.badge, payload, cap.cap_id,
                                             None, reply))
                return
        try:  # the full checks, which say precisely why a send is refused
            cap = caps.check(state, pd, token, "write")
            if transfer is not None:
                caps.check(state, pd, token, "grant")
                caps.check(state, pd, transfer)
            target = self.owner(cap.obj)
            if target is None or state.pd_status.get(target) != "running":
                raise CapRefused("bad-target", pd, cap.cap_id,
                                 f"{cap.obj} is served by no running PD")
        except CapRefused as exc:
            raise self._refuse(exc) from None
        self._route(target, Delivery(target, cap.obj, cap.badge, payload, cap.cap_id,
                                     transfer, reply))

    def call(self, pd: str, token: Token, payload: Any, *,
             on_reply: Callable[[Any], None] | None = None) -> None:
        """Send with a one-shot reply cap; needs ``grant`` or ``grant-reply``.

        ``on_reply`` is for the operator's calls (a :class:`Port` never passes it):
        the answer goes to it instead of being routed to ``pd``.
        """
        try:  # the token first: a PD learns nothing of a cap it does not hold
            cap = caps.check(self.state, pd, token)
            if "grant" not in cap.rights and "grant-reply" not in cap.rights:
                raise CapRefused("missing-right", pd, token.cap_id,
                                 "a call needs grant or grant-reply", "grant-reply")
        except CapRefused as exc:
            raise self._refuse(exc) from None
        with self._reply_lock:
            if self._pending[pd] >= MAX_PENDING_CALLS:
                raise self._refuse(CapRefused(
                    "too-many-calls", pd, cap.cap_id,
                    f"{MAX_PENDING_CALLS} calls are waiting for their answers already"))
            reply_id = self._next_reply_id()
            while reply_id in self._replies:
                reply_id = self._next_reply_id()
            reply = ReplyCap(reply_id, pd)
            # Registered before sending: the callee may answer before send() returns.
            self._replies[reply_id] = (pd, self.owner(cap.obj) or "")
            self._pending[pd] += 1
            if on_reply is not None:
                self._answers[reply_id] = on_reply
        try:
            self.send(pd, token, payload, reply=reply)
        except CapRefused:
            self._forget(reply_id)
            raise

    def _forget(self, reply_id: int) -> None:
        """Drop a reply cap that will not be used (its call was refused or dropped)."""
        with self._reply_lock:
            entry = self._replies.pop(reply_id, None)
            self._answers.pop(reply_id, None)
            if entry is not None:
                self._pending[entry[0]] -= 1

    def reply(self, pd: str, reply: ReplyCap, payload: Any) -> None:
        """Answer a call, once, to the caller (who sees no badge, only the answer)."""
        with self._reply_lock:  # check, then consume: a wrong PD must not use it up
            caller_callee = self._replies.get(reply.reply_id)
            if caller_callee is None or caller_callee != (reply.caller, pd):
                raise self._refuse(CapRefused("bad-token", pd, None,
                                              "reply cap unknown, used or not yours"))
            del self._replies[reply.reply_id]
            self._pending[caller_callee[0]] -= 1
        answer = self._answers.pop(reply.reply_id, None)
        if answer is not None:
            answer(payload)
            return
        self._route(reply.caller, Delivery(reply.caller, "reply", None, payload, 0))

    def accept(self, d: Delivery) -> Delivery | None:
        """At the receiver: the delivery to hand to the core, or None if it must not arrive.

        Called on the receiver's side just before its handler runs, so a revoke that
        returned earlier stops messages already queued.  A capability carried in the
        message is granted to the receiver here, journaled first.
        """
        if d.cap_id == 0:  # a reply: its one-shot cap was consumed by ``reply``
            return d
        state = self._state
        if d.cap_id not in state.caps or state.pd_status.get(d.target) != "running":
            self.dropped += 1
            if d.reply is not None:  # the call will never be answered: forget its reply cap
                self._forget(d.reply.reply_id)
            return None
        if d.transfer is None:
            return d
        try:
            with self._ops:
                sender = state.caps[d.cap_id]
                event = caps.transfer(self.state, sender.holder, caps.token_for(sender),
                                      d.transfer, d.target)
                token = self._journal_grant(event)
        except (CapRefused, KeyError):
            self.dropped += 1
            return None
        return Delivery(d.target, d.obj, d.badge, d.payload, d.cap_id, token, d.reply)

    # ----------------------------------------------------------------- cap operations
    def _journal_grant(self, event: CapGranted) -> Token:
        self._ledger.append(event)
        return caps.token_for(self.state.caps[event.cap_id])

    def _op(self, pd: str, command: Callable[[State], Any]) -> Any:
        with self._ops:
            try:
                event = command(self.state)
            except CapRefused as exc:
                raise self._refuse(exc) from None
            if isinstance(event, CapGranted):
                return self._journal_grant(event)
            self._ledger.append(event)
            return event

    def mint(self, pd: str, token: Token, rights: tuple[str, ...], badge: int | None = None,
             to: str | None = None) -> Token:
        tok: Token = self._op(pd, lambda s: caps.mint(s, pd, token, rights, badge, to))
        return tok

    def copy(self, pd: str, token: Token, to: str | None = None) -> Token:
        tok: Token = self._op(pd, lambda s: caps.copy(s, pd, token, to))
        return tok

    def move(self, pd: str, token: Token, to: str) -> Token:
        self._op(pd, lambda s: caps.move(s, pd, token, to))
        return caps.token_for(self.state.caps[token.cap_id])

    def delete(self, pd: str, token: Token) -> None:
        self._op(pd, lambda s: caps.delete(s, pd, token))

    def revoke(self, pd: str, token: Token) -> int:
        """Delete every descendant; returns how many.  Queued messages under them die too."""
        event = self._op(pd, lambda s: caps.revoke(s, pd, token))
        return int(event.descendants)

    def journal(self, event: object) -> None:
        """Append a PD lifecycle event (restarted, failed, reaped, spawned).

        Under the capability-operation lock: a reap deletes caps in the fold, and no
        capability command may be checked against a state changing beneath it.
        """
        with self._ops:
            self._ledger.append(event)

    # ----------------------------------------------------------------- operator
    def operator_token(self, cap_id: int) -> Token:
        """The operator (the node's owner, via the control socket) may act on any cap."""
        cap = self.state.caps.get(cap_id)
        if cap is None:
            raise CapRefused("no-such-cap", "operator", cap_id, "no such capability")
        return caps.token_for(cap)


def _no_route(target: str, d: Delivery) -> None:
    raise RuntimeError("kernel has no route: the host must call set_route first")


class Port:
    """A PD's handle on the kernel: every call is made as this PD and no other."""

    __slots__ = ("_kernel", "_pd")

    def __init__(self, kernel: Kernel, pd: str) -> None:
        self._kernel, self._pd = kernel, pd

    @property
    def pd(self) -> str:
        """The PD this port acts as: fixed when the kernel made it (no setter)."""
        return self._pd

    def tokens(self) -> list[Token]:
        return caps.tokens_of(self._kernel.state, self.pd)

    def send(self, token: Token, payload: Any, transfer: Token | None = None) -> None:
        self._kernel.send(self.pd, token, payload, transfer=transfer)

    def call(self, token: Token, payload: Any) -> None:
        self._kernel.call(self.pd, token, payload)

    def reply(self, reply: ReplyCap, payload: Any) -> None:
        self._kernel.reply(self.pd, reply, payload)

    def mint(self, token: Token, rights: tuple[str, ...], badge: int | None = None,
             to: str | None = None) -> Token:
        return self._kernel.mint(self.pd, token, rights, badge, to)

    def copy(self, token: Token, to: str | None = None) -> Token:
        return self._kernel.copy(self.pd, token, to)

    def move(self, token: Token, to: str) -> Token:
        return self._kernel.move(self.pd, token, to)

    def delete(self, token: Token) -> None:
        self._kernel.delete(self.pd, token)

    def revoke(self, token: Token) -> int:
        return self._kernel.revoke(self.pd, token)
