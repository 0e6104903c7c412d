"""The capability commands one by one: what each grants, and exactly how each refuses.

Commands are pure (state in, event out); the tests journal the events on a real
ledger so the fold -- live, and replayed from the files -- is what is checked.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger import audit, caps
from ledger.caps import MAX_BADGE, CapRefused, Token
from ledger.catalog import (
    RIGHTS,
    CapDeleted,
    CapGranted,
    CapMoved,
    CapRevoked,
    PdDeclared,
    PdReaped,
)
from ledger.log import EventUnfit, Ledger
from ledger.state import State, apply
from tests.ledger.helpers import new_ledger

A, B, C = "pd-a", "pd-b", "pd-c"
RW = ("read", "write")


class Caps:
    """A ledger with three PDs; pd-a holds the original of ``obj`` (cap #1)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        ledger.append_many([PdDeclared(A, 3), PdDeclared(B, 2), PdDeclared(C, 1),
                            CapGranted(1, A, "obj", RIGHTS, None, None, "system")])
        self.root = self.token(1)

    @property
    def state(self) -> State:
        return self.ledger.state

    def token(self, cap_id: int) -> Token:
        return caps.token_for(self.state.caps[cap_id])

    def do(self, event: Any) -> Token | None:
        """Journal a command's event; the new (or moved) cap's token, if there is one."""
        self.ledger.append(event)
        if isinstance(event, (CapGranted, CapMoved)):
            return self.token(event.cap_id)
        return None

    def grant(self, event: CapGranted) -> Token:
        tok = self.do(event)
        assert tok is not None
        return tok

    def refused(self, command: Callable[[State], object], code: str, cap_id: int | None,
                right: str | None = None) -> CapRefused:
        """``command`` raises exactly this refusal and leaves state and ledger untouched."""
        before, size = self.state.to_obj(), self.ledger.size
        with pytest.raises(CapRefused) as err:
            command(self.state)
        exc = err.value
        assert (exc.code, exc.cap_id, exc.right) == (code, cap_id, right), str(exc)
        assert self.state.to_obj() == before and self.ledger.size == size
        return exc


@pytest.fixture
def k(tmp_path: Path) -> Iterator[Caps]:
    ledger, _ = new_ledger(tmp_path / "ledger")
    try:
        yield Caps(ledger)
    finally:
        ledger.close()


def assert_replay_equals_live(k: Caps) -> None:
    assert audit.state_at(k.ledger.directory).to_obj() == k.state.to_obj()


# --------------------------------------------------------------------- check
def test_check_names_cap_right_and_reason(k: Caps) -> None:
    child = k.grant(caps.mint(k.state, A, k.root, RW, to=B))
    exc = k.refused(lambda s: caps.check(s, B, Token(99, B, bytes(64)), "write"),
                    "no-such-cap", 99, "write")
    assert str(exc).startswith(f"{B}: cap #99 (needs 'write')")
    k.refused(lambda s: caps.check(s, C, child, "read"), "not-holder", child.cap_id, "read")
    relabelled = Token(child.cap_id, C, child.signature)
    k.refused(lambda s: caps.check(s, C, relabelled), "not-holder", child.cap_id)
    forged = Token(child.cap_id, B, bytes(64))
    k.refused(lambda s: caps.check(s, B, forged, "read"), "bad-token", child.cap_id, "read")
    exc = k.refused(lambda s: caps.check(s, B, child, "grant"), "missing-right", child.cap_id,
                    "grant")
    assert "read,write" in str(exc)
    assert caps.check(k.state, B, child, "write").holder == B


# --------------------------------------------------------------------- mint
def test_mint_shrinks_rights_and_names_the_escalated_right(k: Caps) -> None:
    child = k.grant(caps.mint(k.state, A, k.root, ("write", "read")))
    cap = k.state.caps[child.cap_id]
    assert (cap.rights, cap.parent, cap.holder, cap.via) == (RW, 1, A, "mint")
    exc = k.refused(lambda s: caps.mint(s, A, child, ("read", "grant")), "escalation",
                    child.cap_id, "grant")
    assert "only read,write" in str(exc)
    k.refused(lambda s: caps.mint(s, A, child, ("grant-reply",)), "escalation", child.cap_id,
              "grant-reply")
    k.refused(lambda s: caps.mint(s, A, child, ("root",)), "bad-request", child.cap_id)
    none = k.grant(caps.mint(k.state, A, child, ()))
    k.refused(lambda s: caps.mint(s, A, none, ("read",)), "escalation", none.cap_id, "read")


def test_mint_into_another_pd_needs_grant_and_a_running_target(k: Caps) -> None:
    rw = k.grant(caps.mint(k.state, A, k.root, RW))
    k.refused(lambda s: caps.mint(s, A, rw, ("read",), to=B), "missing-right", rw.cap_id,
              "grant")
    k.refused(lambda s: caps.mint(s, A, k.root, ("read",), to="pd-nobody"), "bad-target", 1)
    k.do(PdReaped(C, "done"))
    k.refused(lambda s: caps.mint(s, A, k.root, ("read",), to=C), "bad-target", 1)
    given = k.grant(caps.mint(k.state, A, k.root, ("read",), to=B))
    assert given.holder == B and k.state.caps[given.cap_id].parent == 1
    k.refused(lambda s: caps.mint(s, A, given, ("read",)), "not-holder", given.cap_id)


def test_badge_is_set_once(k: Caps) -> None:
    badged = k.grant(caps.mint(k.state, A, k.root, RIGHTS, badge=5))
    assert k.state.caps[badged.cap_id].badge == 5
    k.refused(lambda s: caps.mint(s, A, badged, RW, badge=6), "badge-set", badged.cap_id)
    same = k.grant(caps.mint(k.state, A, badged, RW, badge=5))  # restating it is no change
    inherited = k.grant(caps.mint(k.state, A, same, ("read",)))
    copied = k.grant(caps.copy(k.state, A, inherited, to=None))
    assert {k.state.caps[t.cap_id].badge for t in (same, inherited, copied)} == {5}
    k.refused(lambda s: caps.mint(s, A, copied, (), badge=0), "badge-set", copied.cap_id)
    k.refused(lambda s: caps.mint(s, A, k.root, (), badge=-1), "bad-request", 1)
    k.refused(lambda s: caps.mint(s, A, k.root, (), badge=MAX_BADGE + 1), "bad-request", 1)
    top = k.grant(caps.mint(k.state, A, k.root, (), badge=MAX_BADGE))
    assert k.state.caps[top.cap_id].badge == MAX_BADGE


# --------------------------------------------------------------------- copy / transfer
def test_copy_keeps_rights_and_badge(k: Caps) -> None:
    src = k.grant(caps.mint(k.state, A, k.root, ("read", "grant"), badge=3))
    dup = k.grant(caps.copy(k.state, A, src))
    there = k.grant(caps.copy(k.state, A, src, to=C))
    for tok, holder in ((dup, A), (there, C)):
        cap = k.state.caps[tok.cap_id]
        assert (cap.holder, cap.rights, cap.badge, cap.parent, cap.via) == (
            holder, ("read", "grant"), 3, src.cap_id, "copy")
    rw = k.grant(caps.mint(k.state, A, k.root, RW))
    k.refused(lambda s: caps.copy(s, A, rw, to=B), "missing-right", rw.cap_id, "grant")
    k.refused(lambda s: caps.copy(s, B, rw), "not-holder", rw.cap_id)


def test_transfer_needs_grant_on_the_cap_used_to_send(k: Caps) -> None:
    send_rw = k.grant(caps.mint(k.state, A, k.root, RW))
    passed = k.grant(caps.mint(k.state, A, k.root, ("read",), badge=9))
    k.refused(lambda s: caps.transfer(s, A, send_rw, passed, B), "missing-right",
              send_rw.cap_id, "grant")
    theirs = k.grant(caps.mint(k.state, A, k.root, ("read",), to=B))
    k.refused(lambda s: caps.transfer(s, A, k.root, theirs, C), "not-holder", theirs.cap_id)
    k.refused(lambda s: caps.transfer(s, A, k.root, passed, "pd-nobody"), "bad-target",
              passed.cap_id)
    got = k.grant(caps.transfer(k.state, A, k.root, passed, B))
    cap = k.state.caps[got.cap_id]
    assert (cap.holder, cap.rights, cap.badge, cap.parent, cap.via) == (
        B, ("read",), 9, passed.cap_id, "transfer")


# --------------------------------------------------------------------- move
def test_move_hands_over_the_cap_and_its_place(k: Caps) -> None:
    mid = k.grant(caps.mint(k.state, A, k.root, ("read", "write", "grant")))
    below = k.grant(caps.mint(k.state, A, mid, ("read",), to=C))
    rw = k.grant(caps.mint(k.state, A, k.root, RW))
    k.refused(lambda s: caps.move(s, A, rw, B), "missing-right", rw.cap_id, "grant")
    k.refused(lambda s: caps.move(s, A, mid, "pd-nobody"), "bad-target", mid.cap_id)
    moved = k.do(caps.move(k.state, A, mid, B))
    assert moved is not None and (moved.cap_id, moved.holder) == (mid.cap_id, B)
    cap = k.state.caps[mid.cap_id]
    assert (cap.parent, cap.rights) == (1, ("read", "write", "grant"))
    assert k.state.children[mid.cap_id] == [below.cap_id]
    k.refused(lambda s: caps.check(s, A, mid), "not-holder", mid.cap_id)  # the old token
    assert caps.check(k.state, B, moved).cap_id == mid.cap_id
    assert_replay_equals_live(k)


# --------------------------------------------------------------------- delete
def test_delete_reparents_children_to_the_deleted_caps_parent(k: Caps) -> None:
    mid = k.grant(caps.mint(k.state, A, k.root, RIGHTS))
    kids = [k.grant(caps.mint(k.state, A, mid, RW, to=B)) for _ in range(3)]
    grandkid = k.grant(caps.copy(k.state, B, kids[0]))
    k.refused(lambda s: caps.delete(s, B, mid), "not-holder", mid.cap_id)
    k.do(caps.delete(k.state, A, mid))
    s = k.state
    assert mid.cap_id not in s.caps and mid.cap_id not in s.children
    assert [s.caps[t.cap_id].parent for t in kids] == [1, 1, 1]
    assert s.caps[grandkid.cap_id].parent == kids[0].cap_id
    assert sorted(s.children[1]) == [t.cap_id for t in kids]
    k.refused(lambda s: caps.check(s, A, mid), "no-such-cap", mid.cap_id)
    k.refused(lambda s: caps.delete(s, A, mid), "no-such-cap", mid.cap_id)
    # Deleting the original leaves its children parentless, nothing more.
    k.do(caps.delete(k.state, A, k.root))
    assert all(k.state.caps[t.cap_id].parent is None for t in kids)
    assert_replay_equals_live(k)


# --------------------------------------------------------------------- revoke
def test_revoke_keeps_the_cap_and_removes_every_descendant(k: Caps) -> None:
    mid = k.grant(caps.mint(k.state, A, k.root, RIGHTS, to=B))
    deep = k.grant(caps.mint(k.state, B, mid, RW, to=C))
    deeper = k.grant(caps.copy(k.state, C, deep))
    sibling = k.grant(caps.mint(k.state, A, k.root, ("read",)))
    k.refused(lambda s: caps.revoke(s, A, mid), "not-holder", mid.cap_id)
    event = caps.revoke(k.state, B, mid)
    assert event == CapRevoked(mid.cap_id, 2)
    k.do(event)
    s = k.state
    assert mid.cap_id in s.caps and sibling.cap_id in s.caps
    assert deep.cap_id not in s.caps and deeper.cap_id not in s.caps
    assert s.children.get(mid.cap_id, []) == []
    for tok in (deep, deeper):
        k.refused(functools.partial(caps.check, presenter=C, token=tok, right="read"),
                  "no-such-cap", tok.cap_id, "read")
    assert caps.revoke(k.state, B, mid) == CapRevoked(mid.cap_id, 0)
    assert_replay_equals_live(k)


def test_revoking_ten_thousand_descendants_is_one_event(k: Caps) -> None:
    n, rng = 10_000, random.Random(1)
    first = k.state.next_cap_id
    events: list[CapGranted] = []
    ids: list[int] = []
    for i in range(n):
        cap_id = first + i
        # A long chain first (no recursion anywhere may depend on depth), then a bushy tree.
        parent = 1 if i == 0 else cap_id - 1 if i < 2_000 else rng.choice(ids)
        events.append(CapGranted(cap_id, (A, B, C)[i % 3], "obj", RW, None, parent, "mint"))
        ids.append(cap_id)
    k.ledger.append_many(events)
    assert sum(1 for _ in caps.descendants(k.state, 1)) == n
    leaf = k.token(first + n - 1)
    size = k.ledger.size
    start = time.perf_counter()
    event = caps.revoke(k.state, A, k.root)
    k.do(event)
    took = time.perf_counter() - start
    assert event == CapRevoked(1, n)
    assert k.ledger.size == size + 1  # one record, whatever the subtree's size
    assert list(k.state.caps) == [1] and k.state.children.get(1, []) == []
    assert took < 5.0, f"revoking {n} caps took {took:.2f} s"
    k.refused(lambda s: caps.check(s, leaf.holder, leaf), "no-such-cap", leaf.cap_id)
    assert_replay_equals_live(k)


# --------------------------------------------------------------------- reaping
def test_reaping_a_pd_removes_its_caps_and_what_was_derived_from_them(k: Caps) -> None:
    held = k.grant(caps.mint(k.state, A, k.root, RIGHTS, to=B))
    passed_on = k.grant(caps.mint(k.state, B, held, RW, to=C))
    kept = k.grant(caps.mint(k.state, A, k.root, ("read",), to=C))
    k.do(PdReaped(B, "ceremony over"))
    s = k.state
    assert s.pd_status[B] == "reaped"
    assert held.cap_id not in s.caps and passed_on.cap_id not in s.caps
    assert kept.cap_id in s.caps and s.children[1] == [kept.cap_id]
    assert_replay_equals_live(k)


def test_deleted_event_for_an_unknown_cap_replays_harmlessly(k: Caps) -> None:
    # The ledger refuses a delete or revoke of a cap that is gone (nothing is appended);
    # and the fold, should a log hold one anyway, changes nothing for it.
    size = k.ledger.size
    for stale in (CapDeleted(42, A, "already gone"), CapRevoked(43, 0)):
        with pytest.raises(EventUnfit, match="does not exist"):
            k.do(stale)
        assert k.ledger.size == size
        s = k.state.copy()
        apply(s, stale, s.seq + 1, 0)
        assert s.caps.keys() == k.state.caps.keys()
    assert list(k.state.caps) == [1]
    assert_replay_equals_live(k)
