"""The capability kernel against a small reference model, driven by Hypothesis.

Random PDs mint, copy, move, delete, revoke and send (passing caps inside
messages), presenting their own tokens and tokens they must not be able to use:
another PD's, relabelled, with a made-up signature, of a deleted cap, outdated by
a move.  A tiny dict-based model of the derivation tree predicts every outcome --
the new cap, or the exact refusal (code, cap, right) -- and every delivery.
After each step: the live capability table equals the model's; authority flows
only along grants; dead tokens stay dead; the fold of the files equals the live
state; every refusal was counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from actors.kernel import Delivery, Kernel
from actors.system import load_default
from ledger import audit, caps
from ledger.caps import MAX_BADGE, CapRefused, Token
from ledger.catalog import REGISTRY, RIGHTS, CapGranted, CapMoved, PdReaped, PdSpawned
from ledger.log import Ledger
from ledger.scan import LogReader, verify_grant
from ledger.state import State, fold
from sims.node import build_node, scratch_directory

PDS = tuple(p.name for p in load_default().pds)
REAPABLE = ("pd-genesis", "pd-fleet")
BADGES = st.sampled_from([None, None, None, 0, 1, 2, 7, MAX_BADGE, MAX_BADGE + 1, -1])
TARGETS = st.one_of(st.none(), st.sampled_from(PDS))
TOKEN_KINDS = ("own", "own", "own", "own", "stolen", "relabelled", "forged", "dead", "stale",
               "unknown")
EXAMPLES, STEPS = 150, 100  # Hypothesis ends some examples early: 150 give >10,000 steps
FULL_REPLAY_EVERY = 20  # steps between verifying replays (audit.state_at); others: replay mode

Refusal = tuple[str, int | None, str | None]  # (code, cap id, right)


@dataclass
class MCap:
    """The model's view of one capability."""

    holder: str
    obj: str
    rights: frozenset[str]
    badge: int | None
    parent: int | None
    via: str
    token: Token
    lineage: tuple[int, ...] = ()  # every cap it was derived from, nearest first


@dataclass
class Model:
    """The derivation tree as plain dicts; predicts what the kernel must do."""

    caps: dict[int, MCap]
    status: dict[str, str]
    owner: dict[str, str]
    next_id: int
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    dropped: int = 0
    dead: list[Token] = field(default_factory=list)   # tokens of caps that are gone
    stale: list[Token] = field(default_factory=list)  # tokens a move made obsolete
    grants: dict[int, tuple[str, frozenset[str], int | None]] = field(default_factory=dict)

    def check(self, pd: str, tok: Token, right: str | None = None) -> Refusal | None:
        cap = self.caps.get(tok.cap_id)
        if cap is None:
            return ("no-such-cap", tok.cap_id, right)
        if cap.holder != pd or tok.holder != pd:
            return ("not-holder", tok.cap_id, right)
        if cap.token.signature != tok.signature:
            return ("bad-token", tok.cap_id, right)
        if right is not None and right not in cap.rights:
            return ("missing-right", tok.cap_id, right)
        return None

    def target_ok(self, pd: str) -> bool:
        return self.status.get(pd) == "running"

    def children(self, cap_id: int) -> list[int]:
        return sorted(k for k, c in self.caps.items() if c.parent == cap_id)

    def subtree(self, cap_id: int) -> list[int]:
        out, todo = [], self.children(cap_id)
        while todo:
            k = todo.pop()
            out.append(k)
            todo.extend(self.children(k))
        return out

    def remove(self, cap_ids: list[int]) -> None:
        for k in cap_ids:
            self.dead.append(self.caps.pop(k).token)


def _edges(s: State) -> dict[int, list[int]]:
    return {k: sorted(v) for k, v in s.children.items() if v}


class CapMachine(RuleBasedStateMachine):
    steps_run = 0

    def __init__(self) -> None:
        super().__init__()
        self.dir: Path | None = None
        self.queue: list[Delivery] = []
        self.steps = 0

    # ----------------------------------------------------------------- set-up
    @initialize()
    def boot(self) -> None:
        with contextlib.ExitStack() as stack:  # /dev/shm when there is one: fsyncs are free
            where = stack.enter_context(scratch_directory("ppn-capm-"))
            node = build_node(where / "ledger", seed=1, start=False)
            self.cleanup = stack.pop_all()
        self.dir = where
        self.ledger: Ledger = node.ledger
        self.kernel: Kernel = node.kernel
        self.kernel.set_route(lambda target, d: self.queue.append(d))
        self.public_key = node.keys.public_key
        s = self.kernel.state
        self.model = Model(
            caps={c.cap_id: MCap(c.holder, c.obj, frozenset(c.rights), c.badge, c.parent,
                                 c.via, caps.token_for(c)) for c in s.caps.values()},
            status=dict(s.pd_status),
            owner={c.obj: c.holder for c in s.caps.values() if c.parent is None},
            next_id=s.next_cap_id)
        for k, c in sorted(self.model.caps.items()):
            c.lineage = (c.parent, *self.model.caps[c.parent].lineage) if c.parent else ()
            self.model.grants[k] = (c.obj, c.rights, c.badge)
            rights = tuple(r for r in RIGHTS if r in c.rights)
            self.signed(c.token, CapGranted(k, c.holder, c.obj, rights, c.badge, c.parent, c.via))

    def teardown(self) -> None:
        if self.dir is not None:
            with self.cleanup:
                self.ledger.close()
                self.full_replay()

    def full_replay(self) -> None:
        assert self.dir is not None
        replayed = audit.state_at(self.dir / "ledger")
        assert replayed.to_obj() == self.kernel.state.to_obj()
        assert _edges(replayed) == _edges(self.kernel.state)

    # ----------------------------------------------------------------- helpers
    def pick(self, data: st.DataObject, kinds: tuple[str, ...] = TOKEN_KINDS
             ) -> tuple[str, Token]:
        """A presenter and a token: usually the holder's own, else one it must not use."""
        m, kind = self.model, data.draw(st.sampled_from(kinds), label="kind")
        live = sorted(m.caps)
        pd = data.draw(st.sampled_from(PDS), label="presenter")
        if kind in ("own", "stolen", "relabelled", "forged") and live:
            cap = m.caps[data.draw(st.sampled_from(live), label="cap")]
            if kind == "own":
                return cap.holder, cap.token
            if kind == "stolen":
                return pd, cap.token
            if kind == "relabelled":
                return pd, Token(cap.token.cap_id, pd, cap.token.signature)
            made_up = data.draw(st.integers(0, 2**32), label="signature seed")
            sig = hashlib.sha512(made_up.to_bytes(5, "big")).digest()
            return cap.holder, Token(cap.token.cap_id, cap.holder, sig)
        pool = m.dead if kind == "dead" else m.stale if kind == "stale" else []
        if pool:
            tok = data.draw(st.sampled_from(pool[-50:]), label=kind)
            return (tok.holder if data.draw(st.booleans()) else pd), tok
        made_up = m.next_id + data.draw(st.integers(0, 3), label="unknown id")
        return pd, Token(made_up, pd, bytes(64))

    def refused(self, pd: str, want: Refusal | None, exc: CapRefused | None) -> bool:
        """Assert the kernel refused exactly as predicted; True if it did refuse."""
        got = None if exc is None else (exc.code, exc.cap_id, exc.right)
        assert got == want, f"{pd}: kernel {got}, model {want}"
        if exc is not None:
            assert exc.pd == pd
            self.model.refused[(pd, exc.code)] += 1
        return exc is not None

    def signed(self, tok: Token, event: CapGranted | CapMoved) -> None:
        """The token carries pd-ledger's signature over exactly the grant (or move) expected."""
        assert verify_grant(self.public_key, REGISTRY.encode(event), tok.signature), event

    def grant(self, tok: Token, holder: str, obj: str, rights: frozenset[str],
              badge: int | None, parent: int, via: str) -> None:
        m = self.model
        assert (tok.cap_id, tok.holder) == (m.next_id, holder)
        self.signed(tok, CapGranted(tok.cap_id, holder, obj,
                                    tuple(r for r in RIGHTS if r in rights), badge, parent, via))
        lineage = (parent, *m.caps[parent].lineage)
        m.caps[tok.cap_id] = MCap(holder, obj, rights, badge, parent, via, tok, lineage)
        m.grants[tok.cap_id] = (obj, rights, badge)
        m.next_id += 1

    # ----------------------------------------------------------------- rules
    @rule(data=st.data(), rights=st.lists(st.sampled_from(RIGHTS), unique=True),
          badge=BADGES, to=TARGETS)
    def mint(self, data: st.DataObject, rights: list[str], badge: int | None,
             to: str | None) -> None:
        pd, tok = self.pick(data)
        m = self.model
        want = m.check(pd, tok, "grant" if to not in (None, pd) else None)
        if want is None:
            cap = m.caps[tok.cap_id]
            extra = [r for r in rights if r not in cap.rights]
            if extra:
                want = ("escalation", tok.cap_id, extra[0])
            elif badge is not None and cap.badge is not None and badge != cap.badge:
                want = ("badge-set", tok.cap_id, None)
            elif badge is not None and not 0 <= badge <= MAX_BADGE:
                want = ("bad-request", tok.cap_id, None)
            elif to is not None and not m.target_ok(to):
                want = ("bad-target", tok.cap_id, None)
        try:
            new = self.kernel.mint(pd, tok, tuple(rights), badge, to)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        cap = m.caps[tok.cap_id]
        self.grant(new, to or pd, cap.obj, frozenset(rights),
                   cap.badge if badge is None else badge, tok.cap_id, "mint")

    @rule(data=st.data(), to=TARGETS)
    def copy(self, data: st.DataObject, to: str | None) -> None:
        pd, tok = self.pick(data)
        m = self.model
        want = m.check(pd, tok, "grant" if to not in (None, pd) else None)
        if want is None and to is not None and not m.target_ok(to):
            want = ("bad-target", tok.cap_id, None)
        try:
            new = self.kernel.copy(pd, tok, to)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        cap = m.caps[tok.cap_id]
        self.grant(new, to or pd, cap.obj, cap.rights, cap.badge, tok.cap_id, "copy")

    @rule(data=st.data(), to=st.sampled_from(PDS))
    def move(self, data: st.DataObject, to: str) -> None:
        pd, tok = self.pick(data)
        m = self.model
        want = m.check(pd, tok, "grant" if to != pd else None)
        if want is None and not m.target_ok(to):
            want = ("bad-target", tok.cap_id, None)
        try:
            new = self.kernel.move(pd, tok, to)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        cap = m.caps[tok.cap_id]
        assert (new.cap_id, new.holder) == (tok.cap_id, to)
        self.signed(new, CapMoved(tok.cap_id, pd, to))
        m.stale.append(cap.token)
        cap.holder, cap.token = to, new

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        pd, tok = self.pick(data)
        m = self.model
        want = m.check(pd, tok)
        try:
            self.kernel.delete(pd, tok)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        parent = m.caps[tok.cap_id].parent
        for k in m.children(tok.cap_id):  # children move up to the deleted cap's parent
            m.caps[k].parent = parent
        m.remove([tok.cap_id])

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        pd, tok = self.pick(data)
        m = self.model
        want = m.check(pd, tok)
        try:
            n = self.kernel.revoke(pd, tok)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        gone = m.subtree(tok.cap_id)
        assert n == len(gone)
        dead = [m.caps[k].token for k in gone]
        m.remove(gone)
        assert tok.cap_id in self.kernel.state.caps  # revoke keeps the cap itself
        for d in dead:  # nothing below works: every former holder's send is refused
            try:
                self.kernel.send(d.holder, d, {"after": "revoke"})
            except CapRefused as exc:
                self.refused(d.holder, ("no-such-cap", d.cap_id, "write"), exc)
            else:
                raise AssertionError(f"{d} still sends after its ancestor was revoked")

    def _send_refusal(self, pd: str, tok: Token, transfer: Token | None) -> Refusal | None:
        m = self.model
        want = m.check(pd, tok, "write")
        if want is None and transfer is not None:
            want = m.check(pd, tok, "grant") or m.check(pd, transfer)
        if want is None and not m.target_ok(m.owner[m.caps[tok.cap_id].obj]):
            want = ("bad-target", tok.cap_id, None)
        return want

    @rule(data=st.data(), with_cap=st.booleans())
    def send(self, data: st.DataObject, with_cap: bool) -> None:
        pd, tok = self.pick(data)
        transfer = None
        if with_cap:
            _, transfer = self.pick(data)
            live = self.model.caps.get(transfer.cap_id)
            if live is not None and data.draw(st.booleans(), label="holder's own token"):
                transfer = live.token
        want = self._send_refusal(pd, tok, transfer)
        before = len(self.queue)
        try:
            self.kernel.send(pd, tok, {"n": before}, transfer=transfer)
        except CapRefused as exc:
            self.refused(pd, want, exc)
            assert len(self.queue) == before  # a refused send routes nothing
            return
        self.refused(pd, want, None)
        assert len(self.queue) == before + 1

    @rule(data=st.data())
    def call(self, data: st.DataObject) -> None:
        # Only tokens the caller holds, or dead ones: see test_attacks for stolen ones in calls.
        pd, tok = self.pick(data, ("own", "dead", "unknown"))
        cap = self.model.caps.get(tok.cap_id)
        want = self._send_refusal(pd, tok, None)
        if want is not None and want[0] in ("no-such-cap", "not-holder", "bad-token"):
            want = (want[0], want[1], None)  # a call checks the token before any right
        elif cap is not None and not cap.rights & {"grant", "grant-reply"}:
            want = ("missing-right", tok.cap_id, "grant-reply")
        try:
            self.kernel.call(pd, tok, {"op": "ping"})
        except CapRefused as exc:
            self.refused(pd, want, exc)
            return
        self.refused(pd, want, None)
        # The reply cap is opaque: the kernel alone knows whom the answer goes to.
        assert self.queue[-1].reply is not None and not hasattr(self.queue[-1].reply, "caller")

    @precondition(lambda self: bool(self.queue))
    @rule(n=st.integers(1, 4))
    def deliver(self, n: int) -> None:
        """The receiver side: each queued message is checked again as it arrives."""
        m = self.model
        for d in self.queue[:n]:
            if d.cap_id == 0:  # the kernel telling a caller its call was dropped at delivery
                got = self.kernel.accept(d)
                assert got is not None and got.obj == "reply"
                assert got.payload["ok"] is False and (
                    "before the call was delivered" in got.payload["error"]
                    or "is not running" in got.payload["error"])
                continue
            sender = m.caps.get(d.cap_id)
            passed = m.caps.get(d.transfer.cap_id) if d.transfer is not None else None
            arrives = sender is not None and m.target_ok(d.target) and (
                d.transfer is None or m.check(sender.holder, d.transfer) is None)
            got = self.kernel.accept(d)
            assert (got is not None) == arrives, (d, arrives)
            if got is None or sender is None:
                m.dropped += 1
                continue
            # The receiver learns the sender through the badge only.
            assert d.target == m.owner[sender.obj]
            assert (got.obj, got.badge) == (sender.obj, sender.badge)
            assert not hasattr(got, "cap_id") and not hasattr(got, "target")
            if passed is not None and d.transfer is not None:
                assert got.transfer is not None
                self.grant(got.transfer.token, d.target, passed.obj, passed.rights, passed.badge,
                           d.transfer.cap_id, "transfer")
        del self.queue[:n]

    @rule(pd=st.sampled_from(REAPABLE))
    def reap_or_spawn(self, pd: str) -> None:
        """The supervisor ends a PD's work (all its caps go) or starts it again."""
        m = self.model
        if m.status[pd] == "running":
            self.ledger.append(PdReaped(pd, "ceremony over"))
            mine = [k for k, c in m.caps.items() if c.holder == pd]
            gone = sorted({g for k in mine for g in (k, *m.subtree(k))})
            m.remove(gone)
            m.status[pd] = "reaped"
        else:
            self.ledger.append(PdSpawned(pd, "new ceremony"))
            m.status[pd] = "running"

    # ----------------------------------------------------------------- invariants
    @invariant()
    def count_step(self) -> None:
        CapMachine.steps_run += 1
        self.steps += 1

    @invariant()
    def live_table_equals_model(self) -> None:
        s, m = self.kernel.state, self.model
        live = {k: (c.holder, c.obj, c.rights, c.badge, c.parent, c.via, caps.token_for(c))
                for k, c in s.caps.items()}
        model = {k: (c.holder, c.obj, tuple(r for r in RIGHTS if r in c.rights), c.badge,
                     c.parent, c.via, c.token) for k, c in m.caps.items()}
        assert live == model
        assert s.next_cap_id == m.next_id and s.pd_status == m.status

    @invariant()
    def authority_flows_only_along_grants(self) -> None:
        """Rights only shrink and a badge only stays, along the whole derivation chain.

        A deleted cap's children hang from its parent, so a cap's parent is always
        its nearest live ancestor (None once every ancestor is deleted).
        """
        s, m = self.kernel.state, self.model
        for c in s.caps.values():
            lineage = m.caps[c.cap_id].lineage
            assert c.parent == next((a for a in lineage if a in s.caps), None), c
            for a in lineage:
                obj, rights, badge = m.grants[a]
                assert c.obj == obj and set(c.rights) <= rights, (c, a)
                assert badge is None or c.badge == badge, (c, a)  # a badge is set once
            if c.parent is not None:
                assert c.cap_id in s.children.get(c.parent, [])
            else:
                assert c.via == "system" or lineage, c

    @invariant()
    def dead_tokens_stay_dead(self) -> None:
        s = self.kernel.state
        for tok in self.model.dead[-50:]:
            for pd in {tok.holder, "pd-ledger"}:
                try:
                    caps.check(s, pd, tok)
                except CapRefused as exc:
                    assert exc.code == "no-such-cap"
                else:
                    raise AssertionError(f"{tok} works after its cap was deleted or revoked")

    @invariant()
    def refusals_are_counted(self) -> None:
        assert +self.kernel.refused == +self.model.refused
        assert self.kernel.dropped == self.model.dropped

    @invariant()
    def replay_equals_live(self) -> None:
        """The fold of the files is the live state (verifying every signature every few steps)."""
        assert self.dir is not None
        live = self.kernel.state
        entries = LogReader(self.dir / "ledger", verify=False).entries()
        replayed = fold((e.seq, e.ts_ns, e.event, e.signature) for e in entries)
        assert replayed == live and _edges(replayed) == _edges(live)
        if self.steps % FULL_REPLAY_EVERY == 0:
            self.full_replay()


def test_capability_machine() -> None:
    CapMachine.steps_run = 0
    start = time.perf_counter()
    with structlog.testing.capture_logs():  # one log line per refusal: keep them off stdout
        run_state_machine_as_test(CapMachine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    took = time.perf_counter() - start
    print(f"capability machine: {CapMachine.steps_run} steps in {took:.1f} s")
    assert CapMachine.steps_run >= 10_000
