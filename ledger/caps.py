"""The capability model: rights, tokens, the derivation tree and its operations.

Pure functions over :class:`ledger.state.State`.  Each operation is a *command*:
it checks the request against the state and returns the event to journal (it
never changes the state itself; the fold does, once the event is durable).  A
refused request raises :class:`CapRefused`, which says which cap, which right
and why.

Semantics (DESIGN.md, "Capability semantics"):

* a capability comes only from the system description, derivation or transfer;
* derivation keeps or shrinks rights; a badge is set once;
* revoke deletes every descendant and keeps the cap itself;
* passing a capability in a message needs ``grant`` on the cap used to send;
* a token is bound to its holder and to the grant signature pd-ledger made.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass

from ledger.catalog import RIGHTS, CapDeleted, CapGranted, CapMoved, CapRevoked
from ledger.state import Cap, State

MAX_BADGE = 2**63 - 1


class CapRefused(Exception):
    """A capability invocation was refused; nothing happened and nothing was delivered.

    ``code`` is stable for counters: ``no-such-cap``, ``not-holder``, ``bad-token``,
    ``missing-right``, ``escalation``, ``badge-set``, ``bad-target``, ``bad-request``.
    """

    def __init__(self, code: str, pd: str, cap_id: int | None, reason: str,
                 right: str | None = None) -> None:
        self.code, self.pd, self.cap_id, self.right = code, pd, cap_id, right
        where = f"cap #{cap_id}" if cap_id is not None else "no cap"
        need = f" (needs {right!r})" if right else ""
        super().__init__(f"{pd}: {where}{need}: {reason}")


@dataclass(frozen=True, slots=True)
class Token:
    """What a PD holds and presents: a cap id, its holder, pd-ledger's grant signature.

    Anyone can build one; only a token matching the live capability table -- same
    holder, same signature -- is honoured, and only when its holder presents it.
    """

    cap_id: int
    holder: str
    signature: bytes

    def __repr__(self) -> str:
        return f"Token(#{self.cap_id} held by {self.holder})"


def token_for(cap: Cap) -> Token:
    assert cap.sig is not None, "every live capability carries its grant signature"
    return Token(cap.cap_id, cap.holder, cap.sig)


def tokens_of(state: State, pd: str) -> list[Token]:
    """The tokens of every capability ``pd`` holds, by cap id."""
    return [token_for(c) for c in sorted(state.caps.values(), key=lambda c: c.cap_id)
            if c.holder == pd]


def well_formed(token: object) -> bool:
    """Whether ``token`` is a Token of the right field types (anything else a PD hands
    over is refused and counted, never a TypeError in the kernel)."""
    return (type(token) is Token and type(token.cap_id) is int
            and type(token.holder) is str and type(token.signature) is bytes)


def check(state: State, presenter: str, token: Token, right: str | None = None) -> Cap:
    """The live cap behind ``token`` if ``presenter`` may use it (with ``right``)."""
    if not well_formed(token):
        cap_id = getattr(token, "cap_id", None)
        raise CapRefused("bad-token", presenter, cap_id if type(cap_id) is int else None,
                         "malformed token (not an int cap id, str holder, bytes signature)",
                         right)
    cap = state.caps.get(token.cap_id)
    if cap is None:
        raise CapRefused("no-such-cap", presenter, token.cap_id,
                         "no such capability (never granted, deleted or revoked)", right)
    if cap.holder != presenter or token.holder != presenter:
        raise CapRefused("not-holder", presenter, token.cap_id,
                         f"presented by {presenter}, held by {cap.holder}", right)
    if cap.sig is None or not hmac.compare_digest(cap.sig, token.signature):
        raise CapRefused("bad-token", presenter, token.cap_id,
                         "token signature does not match the ledger's grant", right)
    if right is not None and right not in cap.rights:
        raise CapRefused("missing-right", presenter, token.cap_id,
                         f"cap has rights {','.join(cap.rights) or 'none'}", right)
    return cap


def _rights(presenter: str, cap: Cap, wanted: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [r for r in wanted if r not in RIGHTS]
    if unknown:
        raise CapRefused("bad-request", presenter, cap.cap_id,
                         f"unknown rights {unknown}; rights are {', '.join(RIGHTS)}")
    extra = [r for r in wanted if r not in cap.rights]
    if extra:
        raise CapRefused("escalation", presenter, cap.cap_id,
                         f"cannot derive {extra[0]!r}: the source cap has only "
                         f"{','.join(cap.rights) or 'no rights'}", extra[0])
    return tuple(r for r in RIGHTS if r in wanted)


def _target(state: State, presenter: str, cap: Cap, to: str) -> str:
    if to not in state.pds or to in state.failed_pds:
        raise CapRefused("bad-target", presenter, cap.cap_id,
                         f"no running protection domain named {to!r}")
    return to


def mint(state: State, presenter: str, token: Token, rights: tuple[str, ...],
         badge: int | None = None, to: str | None = None) -> CapGranted:
    """Derive a child cap with fewer (or equal) rights and optionally a badge.

    Minting into another PD's space is a transfer and needs ``grant``.
    """
    cap = check(state, presenter, token, "grant" if to not in (None, presenter) else None)
    new_rights = _rights(presenter, cap, rights)
    if badge is not None:
        if cap.badge is not None and badge != cap.badge:
            raise CapRefused("badge-set", presenter, cap.cap_id,
                             f"the badge is already {cap.badge}; a badge is set once")
        if type(badge) is not int or not 0 <= badge <= MAX_BADGE:  # not True, not 1.5
            raise CapRefused("bad-request", presenter, cap.cap_id, "badge out of range")
    holder = presenter if to is None else _target(state, presenter, cap, to)
    return CapGranted(state.next_cap_id, holder, cap.obj, new_rights,
                      cap.badge if badge is None else badge, cap.cap_id, "mint")


def copy(state: State, presenter: str, token: Token, to: str | None = None) -> CapGranted:
    """A child cap with the same rights and badge (into ``to`` needs ``grant``)."""
    cap = check(state, presenter, token, "grant" if to not in (None, presenter) else None)
    holder = presenter if to is None else _target(state, presenter, cap, to)
    return CapGranted(state.next_cap_id, holder, cap.obj, cap.rights, cap.badge,
                      cap.cap_id, "copy")


def transfer(state: State, presenter: str, send_token: Token, cap_token: Token,
             to: str) -> CapGranted:
    """Pass ``cap_token`` inside a message sent under ``send_token`` (needs ``grant``)."""
    check(state, presenter, send_token, "grant")
    cap = check(state, presenter, cap_token)
    holder = _target(state, presenter, cap, to)
    return CapGranted(state.next_cap_id, holder, cap.obj, cap.rights, cap.badge,
                      cap.cap_id, "transfer")


def move(state: State, presenter: str, token: Token, to: str) -> CapMoved:
    """Hand the cap itself (its place in the tree, its children) to ``to``."""
    cap = check(state, presenter, token, "grant" if to != presenter else None)
    return CapMoved(cap.cap_id, presenter, _target(state, presenter, cap, to))


def delete(state: State, presenter: str, token: Token) -> CapDeleted:
    """Remove the cap; its children move up to its parent."""
    cap = check(state, presenter, token)
    return CapDeleted(cap.cap_id, presenter, "deleted by holder")


def revoke(state: State, presenter: str, token: Token) -> CapRevoked:
    """Delete every descendant of the cap (one event, any subtree size); keep the cap."""
    cap = check(state, presenter, token)
    return CapRevoked(cap.cap_id, sum(1 for _ in descendants(state, cap.cap_id)))


def descendants(state: State, cap_id: int) -> Iterator[int]:
    """Every cap derived from ``cap_id``, depth first."""
    stack = list(state.children.get(cap_id, ()))
    while stack:
        c = stack.pop()
        yield c
        stack.extend(state.children.get(c, ()))
