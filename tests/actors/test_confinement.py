"""Confinement, tried as a misbehaving PD core would (issue 8, part 1).

Every attack here is made by a core: a :class:`Puppet` that returns whatever a test's
script says (any object, any actions), plugged into a simulated node with
``build_node(..., make_core=...)`` or into a real threaded :class:`~actors.runtime.Node`.
Each attempt must be refused and counted in ``kernel.refused[(pd, code)]`` -- or, for a
core that returns nonsense, end in a journalled restart -- and leave everything else as
it was: the ledger's size and root, every capability, every PD's status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pytest
import structlog.testing

from actors import cli
from actors import kernel as kernel_module
from actors.kernel import OPERATOR, Delivery
from actors.pds import make_core
from actors.pds.base import (
    Action,
    Append,
    Call,
    Core,
    Held,
    IoRequest,
    Message,
    PdView,
    Refused,
    Reply,
    ReplyCap,
    Send,
    SetTimer,
)
from actors.pds.pd_net_driver import ListLinks
from actors.runtime import Node
from actors.system import RESERVED_FAMILIES, load_default
from actors.wire import MAX_MESSAGE_BYTES
from ledger import audit, caps, commands
from ledger.caps import CapRefused, Token
from ledger.catalog import (
    REGISTRY,
    RIGHTS,
    CapDeleted,
    CapGranted,
    CapMoved,
    CapRevoked,
    LedgerGenesis,
    LedgerRecovered,
    MemberAdded,
    MemberRemoved,
    NodeIdentity,
    PdDeclared,
    PdFailed,
    PdReaped,
    PdRestarted,
    PdSpawned,
)
from ledger.log import EventUnfit, Ledger
from ledger.state import State
from sims.node import SimNode, build_node, scratch_directory
from tests.cores import Recorder

LEDGER, NET, WG, GENESIS = "pd-ledger", "pd-net-driver", "pd-wireguard", "pd-genesis"
VMM, FLEET, ADMIN = "pd-vmm", "pd-fleet", "pd-network-admin"
PDS = (LEDGER, NET, WG, GENESIS, VMM, FLEET, ADMIN)
MESH_PDS = (ADMIN, GENESIS)  # the PDs whose [[pd]].journals is ["mesh"]
GO = {"op": "go"}  # what makes a puppet run the next step of its script
KEY = bytes(range(32))

Script = Callable[["Puppet"], Any]
"""One step of a core: given the core, what it returns (anything at all)."""


# ----------------------------------------------------------------------------- the puppet
class Stage:
    """What the puppets of one node will do, and every core made (per PD, in order)."""

    def __init__(self) -> None:
        self.scripts: dict[str, deque[Script]] = defaultdict(deque)
        self.on_message: dict[str, Callable[[Puppet, Message], Any]] = {}
        self.made: dict[str, list[Puppet]] = defaultdict(list)
        self.only: frozenset[str] | None = None  # puppets for these PDs; production cores else

    def make(self, pd: str) -> Core:
        if self.only is not None and pd not in self.only:
            return make_core(pd)
        core = Puppet(pd, self)
        self.made[pd].append(core)
        return core

    def core(self, pd: str) -> Puppet:
        return self.made[pd][-1]


class Puppet(Recorder):
    """A core that returns what its script says on ``{"op": "go"}``, records every other
    message it is handed (and counts its op, as :class:`Recorder` does)."""

    def __init__(self, name: str, stage: Stage) -> None:
        super().__init__(name)
        self.stage = stage
        self.views: list[PdView] = []
        self.messages: list[Message] = []
        self.told: list[Refused] = []
        self.fired: list[str] = []
        self.loot: list[Token] = []  # tokens a test hands it, as if stolen from another PD

    def start(self, view: PdView, now: float) -> list[Action]:
        self.views.append(view)
        return super().start(view, now)

    def handle(self, m: Message, now: float) -> list[Action]:
        if m.obj == f"endpoint:{self.name}" and m.payload == GO:
            step: Any = self.stage.scripts[self.name].popleft()(self)
            return step  # type: ignore[no-any-return]
        self.messages.append(m)
        hook = self.stage.on_message.get(self.name)
        if hook is not None:
            out: Any = hook(self, m)
            return out  # type: ignore[no-any-return]
        return super().handle(m, now)

    def refused(self, r: Refused, now: float) -> list[Action]:
        self.told.append(r)
        return super().refused(r, now)

    def timer(self, name: str, now: float) -> list[Action]:
        self.fired.append(name)
        return []

    def status(self) -> dict[str, Any]:
        return {**super().status(), "fired": list(self.fired),
                "told": [r.code for r in self.told], "messages": len(self.messages)}


# ----------------------------------------------------------------------------- helpers
def cap_on(state: State, holder: str, obj: str, *, original: bool = False) -> int:
    """The id of ``holder``'s cap on ``obj`` (its original, if asked), the lowest first."""
    found = sorted(c.cap_id for c in state.caps.values() if c.holder == holder and c.obj == obj
                   and (not original or c.parent is None))
    assert found, f"{holder} holds no cap on {obj}"
    return found[0]


def tok(state: State, holder: str, obj: str, *, original: bool = False) -> Token:
    return caps.token_for(state.caps[cap_on(state, holder, obj, original=original)])


def snap(state: State, ledger: Ledger) -> tuple[Any, ...]:
    """Everything an attack must leave as it was."""
    return (ledger.size, ledger.root(),
            sorted((c.cap_id, c.holder, c.obj, c.rights, c.badge, c.parent, c.sig)
                   for c in state.caps.values()),
            dict(state.pd_status), dict(state.restarts), sorted(state.members),
            dict(state.event_counts), state.node)


@pytest.fixture
def stage() -> Stage:
    return Stage()


@pytest.fixture
def node(stage: Stage) -> Iterator[SimNode]:
    with scratch_directory("ppn-confine-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=8, make_core=stage.make)
        try:
            yield n
        finally:
            n.close()


def stage_of(make: object) -> Stage:
    """The stage whose ``make`` a node's host makes its cores with."""
    stage = getattr(make, "__self__", None)
    assert isinstance(stage, Stage)
    return stage


def go(n: SimNode, pd: str, script: Script) -> None:
    """Make ``pd``'s core run ``script`` once (it is sent "go" on its own endpoint)."""
    stage = stage_of(n.host.make_core)
    stage.scripts[pd].append(script)
    n.kernel.send(pd, tok(n.kernel.state, pd, f"endpoint:{pd}", original=True), GO)
    n.host.run_until_idle()


def received(n: SimNode, pd: str, op: str) -> int:
    return n.host.cores[pd].received[op]


def alive(n: SimNode, pd: str) -> None:
    """``pd``'s core still handles messages: a ping on its own endpoint reaches it."""
    state = n.kernel.state
    before = received(n, pd, "ping")
    n.kernel.send(pd, tok(state, pd, f"endpoint:{pd}", original=True), {"op": "ping"})
    n.host.run_until_idle()
    assert received(n, pd, "ping") == before + 1, f"{pd} no longer handles its messages"


def refused_step(n: SimNode, pd: str, code: str, script: Script) -> Puppet:
    """``pd``'s core runs ``script``: refused once with ``code``, told so, nothing changed,
    and no other core saw anything."""
    state = n.kernel.state
    before, count = snap(state, n.ledger), n.kernel.refused[(pd, code)]
    seen = {p: dict(c.received) for p, c in n.host.cores.items()}
    go(n, pd, script)
    assert n.kernel.refused[(pd, code)] == count + 1, dict(n.kernel.refused)
    core = n.host.cores[pd]
    assert isinstance(core, Puppet) and core.told and core.told[-1].code == code
    assert snap(state, n.ledger) == before
    assert {p: dict(c.received) for p, c in n.host.cores.items()} == seen
    return core


# ============================================================================= journalling
def reserved_events(s: State, pd: str) -> dict[str, object]:
    """What a core would journal to widen its authority or break the node."""
    journal_original = cap_on(s, LEDGER, "ledger.append", original=True)
    victim = cap_on(s, WG, "tunnel", original=True)
    return {
        "grant-itself-an-original": CapGranted(s.next_cap_id, pd, "ledger.append", RIGHTS,
                                               None, None, "system"),
        "grant-a-child": CapGranted(s.next_cap_id, pd, "tunnel", RIGHTS, None, victim, "mint"),
        "regrant-an-existing-id": CapGranted(victim, pd, "tunnel", RIGHTS, None, None,
                                             "system"),
        "steal-by-move": CapMoved(victim, WG, pd),
        "cut-every-journal-cap": CapRevoked(journal_original, 2),
        "delete-anothers": CapDeleted(victim, WG, "gone"),
        "reap-pd-ledger": PdReaped(LEDGER, "ceremony over"),
        "fail-pd-ledger": PdFailed(LEDGER, "it failed"),
        "restart-pd-ledger": PdRestarted(LEDGER, "it crashed"),
        "spawn": PdSpawned(GENESIS, "again"),
        "declare-a-pd": PdDeclared("pd-evil", 255),
        "redeclare-a-pd": PdDeclared(LEDGER, 0),
        "node-identity": NodeIdentity("evil", KEY, KEY, "10.8.0.9", "hub"),
        "genesis": LedgerGenesis("evil.ppn/ledger", KEY, 1),
        "recovered": LedgerRecovered("seg-0.log", 0, 0, 1, 10, KEY, "dropped", 0, "x"),
    }


RESERVED = ["grant-itself-an-original", "grant-a-child", "regrant-an-existing-id",
            "steal-by-move", "cut-every-journal-cap", "delete-anothers", "reap-pd-ledger",
            "fail-pd-ledger", "restart-pd-ledger", "spawn", "declare-a-pd", "redeclare-a-pd",
            "node-identity", "genesis", "recovered"]


def test_every_reserved_event_type_is_attempted(node: SimNode) -> None:
    attempted = reserved_events(node.kernel.state, FLEET)
    assert sorted(attempted) == sorted(RESERVED)
    assert {type(e) for e in attempted.values()} == {
        et.cls for et in REGISTRY if et.tag.split(".", 1)[0] in RESERVED_FAMILIES}


@pytest.mark.parametrize("attacker,code", [(FLEET, "no-journal-cap"),
                                           (ADMIN, "not-its-family"),
                                           (GENESIS, "not-its-family")])
@pytest.mark.parametrize("kind", RESERVED)
def test_a_core_cannot_journal_a_reserved_event(node: SimNode, attacker: str, code: str,
                                                kind: str) -> None:
    """Capability, lifecycle, ledger and identity events come from the kernel's own
    commands only; the Send before the Append in the same step is not carried out."""
    state = node.kernel.state
    event = reserved_events(state, attacker)[kind]
    send_tok = tok(state, attacker, f"endpoint:{attacker}", original=True)
    # A send to another PD first: journalling goes first all the same, so it never happens.
    others = [h for h in node.kernel.view(attacker).held if h.obj != f"endpoint:{attacker}"
              and "write" in h.rights and node.kernel.owner(h.obj) != attacker]
    target = others[0].token if others else send_tok
    core = refused_step(node, attacker, code,
                        lambda core: [Send(target, {"op": "after"}), Append(event)])
    assert type(core.told[-1].action) is Append and core.told[-1].action.event is event
    assert all(c.received["after"] == 0 for c in node.host.cores.values())
    assert node.kernel.state.pd_status == dict.fromkeys(PDS, "running")
    alive(node, LEDGER)


@pytest.mark.parametrize("attacker", [FLEET, *MESH_PDS])
def test_journal_cap_is_needed_first(node: SimNode, attacker: str) -> None:
    """Even an event of its own family needs the write cap on ledger.append: a mesh PD
    whose cap was revoked is refused as no-journal-cap."""
    good = MemberAdded("peer-a", KEY, KEY[::-1], "10.8.0.20", None, "node")
    if attacker == FLEET:
        refused_step(node, FLEET, "no-journal-cap", lambda core: [Append(good)])
        return
    node.port(LEDGER).revoke(tok(node.kernel.state, LEDGER, "ledger.append", original=True))
    refused_step(node, attacker, "no-journal-cap", lambda core: [Append(good)])


class NotAnEvent:
    pass


class MemberAddedSubclass(MemberAdded):
    pass


class Text(str):
    pass


class Blob(bytes):
    pass


@pytest.mark.parametrize("attacker", MESH_PDS)
@pytest.mark.parametrize("event", [
    object(), NotAnEvent(), None, "mesh.member_added", {"name": "x"},
    MemberAddedSubclass("peer-a", KEY, KEY, "10.8.0.20", None, "node"),
], ids=["object", "class", "none", "tag-string", "dict", "event-subclass"])
def test_append_of_what_is_not_an_event_is_refused(node: SimNode, attacker: str,
                                                   event: object) -> None:
    refused_step(node, attacker, "bad-event", lambda core: [Append(event)])


def member(name: str = "peer-a", signing_key: bytes = KEY, wg_key: bytes = KEY[::-1],
           mesh_ip: str = "10.8.0.20", endpoint: str | None = None,
           role: str = "node") -> MemberAdded:
    return MemberAdded(name, signing_key, wg_key, mesh_ip, endpoint, role)


BAD_MEMBERS = {
    "signing-key-31": member(signing_key=KEY[:31]),
    "wg-key-33": member(wg_key=KEY + b"\0"),
    "empty-key": member(signing_key=b""),
    "ip-outside-the-mesh": member(mesh_ip="10.9.0.5"),
    "ip-network-address": member(mesh_ip="10.8.0.0"),
    "ip-broadcast-address": member(mesh_ip="10.8.0.255"),
    "ip-not-an-ip": member(mesh_ip="mesh"),
    "ip-v6": member(mesh_ip="fd00::1"),
    "ip-of-this-node": member(mesh_ip="10.8.0.1"),
    "duplicate-name": member(name="sim-node", mesh_ip="10.8.0.30"),
    "bad-name-upper": member(name="Peer"),
    "bad-name-long": member(name="a" * 64),
    "bad-name-empty": member(name=""),
    "str-subclass-name": member(name=Text("peer-a")),
    "str-subclass-ip": member(mesh_ip=Text("10.8.0.20")),
    "str-subclass-role": member(role=Text("node")),
    "bytes-subclass-key": member(signing_key=Blob(KEY)),
    "int-name": member(name=5),  # type: ignore[arg-type]
    "bad-role": member(role="king"),
    "bad-endpoint": member(endpoint="1.2.3.4"),
    "bad-endpoint-port": member(endpoint="1.2.3.4:70000"),
    "huge-name": member(name="a" * 300_000),
}


@pytest.mark.parametrize("attacker", MESH_PDS)
@pytest.mark.parametrize("kind", sorted(BAD_MEMBERS))
def test_a_bad_member_added_is_refused(node: SimNode, attacker: str, kind: str) -> None:
    """The command's checks hold against a PD that may journal the mesh family."""
    event = BAD_MEMBERS[kind]
    target = tok(node.kernel.state, attacker, f"endpoint:{attacker}", original=True)
    core = refused_step(node, attacker, "bad-event",
                        lambda core: [Send(target, {"op": "after"}), Append(event)])
    assert core.received["after"] == 0


@pytest.mark.parametrize("attacker", MESH_PDS)
@pytest.mark.parametrize("event", [
    MemberRemoved("sim-node", "this node removes itself"),
    MemberRemoved("peer-nobody", "not a member"),
    MemberRemoved("sim-node", "x" * 301),
    MemberRemoved("sim-node", "not\nprintable"),
], ids=["itself", "not-a-member", "long-reason", "unprintable-reason"])
def test_a_bad_member_removed_is_refused(node: SimNode, attacker: str,
                                         event: MemberRemoved) -> None:
    refused_step(node, attacker, "bad-event", lambda core: [Append(event)])


@pytest.mark.parametrize("attacker", MESH_PDS)
def test_a_good_member_added_is_journalled_and_the_step_goes_on(node: SimNode,
                                                                attacker: str) -> None:
    state = node.kernel.state
    size, caps_before = node.ledger.size, dict(state.caps)
    target = tok(state, attacker, f"endpoint:{attacker}", original=True)
    event = member(endpoint="192.0.2.7:51820")
    go(node, attacker, lambda core: [Append(event), Send(target, {"op": "after"})])
    assert node.ledger.size == size + 1
    assert state.members["peer-a"].mesh_ip == "10.8.0.20"
    assert received(node, attacker, "after") == 1
    assert dict(state.caps) == caps_before and not node.kernel.refused
    # ... and the same event again is a duplicate now
    refused_step(node, attacker, "bad-event", lambda core: [Append(event)])
    removal = MemberRemoved("peer-a", "left")
    go(node, attacker, lambda core: [Append(removal)])
    assert "peer-a" not in state.members and node.ledger.size == size + 2


@pytest.mark.parametrize("attacker", MESH_PDS)
def test_a_batch_with_one_bad_event_appends_none(node: SimNode, attacker: str) -> None:
    refused_step(node, attacker, "bad-event",
                 lambda core: [Append(member()), Append(member("peer-b", mesh_ip="10.9.0.1"))])
    assert "peer-a" not in node.kernel.state.members


@pytest.mark.parametrize("second", [member("peer-b", KEY[::-1], KEY),  # same mesh IP
                                    member(mesh_ip="10.8.0.21")],     # same name
                         ids=["same-mesh-ip", "same-name"])
def test_a_batch_is_checked_as_a_whole(node: SimNode, second: MemberAdded) -> None:
    refused_step(node, ADMIN, "bad-event", lambda core: [Append(member()), Append(second)])


def test_a_member_name_with_a_trailing_newline_is_refused(node: SimNode) -> None:
    refused_step(node, ADMIN, "bad-event", lambda core: [Append(member("sim-node\n"))])


def appending(events: list[object], core: Puppet) -> list[Action]:
    return [Append(e) for e in events]


def test_the_reviews_batch_cannot_brick_the_ledger(node: SimNode) -> None:
    """[CapGranted(n, parent=1), CapGranted(n, parent=9), CapDeleted(n), CapDeleted(1)]:
    refused from any core, and refused by the ledger itself; the log reopens and verifies."""
    state = node.kernel.state
    n = state.next_cap_id

    def batch(pd: str) -> list[object]:
        return [CapGranted(n, pd, "endpoint:pd-ledger", RIGHTS, None, 1, "mint"),
                CapGranted(n, pd, "endpoint:pd-vmm", RIGHTS, None, 9, "mint"),
                CapDeleted(n, pd, "x"), CapDeleted(1, LEDGER, "x")]
    for pd, code in ((FLEET, "no-journal-cap"), (ADMIN, "not-its-family"),
                     (GENESIS, "not-its-family")):
        events = batch(pd)
        refused_step(node, pd, code, functools.partial(appending, events))
    size, root = node.ledger.size, node.ledger.root()
    with pytest.raises(EventUnfit):  # not even the ledger's own writer may append it
        node.ledger.append_many(batch(ADMIN))
    assert (node.ledger.size, node.ledger.root()) == (size, root)
    # The log goes on: a legitimate append, then a reopen, replay and audit.
    go(node, ADMIN, lambda core: [Append(member())])
    live = node.kernel.state.to_obj()
    node.close()
    with Ledger.open(node.directory, node.keys) as reopened:
        assert reopened.state.to_obj() == live
    assert audit.state_at(node.directory).to_obj() == live
    assert audit.verify(node.directory, jobs=1).records == size + 1
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "ledger", "verify",
                           str(node.directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ============================================================================= what a core sees
def test_the_receiver_learns_only_the_badge(node: SimNode, stage: Stage) -> None:
    state = node.kernel.state
    to_wg = tok(state, FLEET, "endpoint:pd-wireguard")  # the channel: badge 6
    fleet_caps = {c.cap_id for c in state.caps.values() if c.holder == FLEET}
    go(node, FLEET, lambda core: [Send(to_wg, {"op": "hello"}), Call(to_wg, {"op": "ask"}),
                                  Call(to_wg, {"op": "ask"})])
    got = stage.core(WG).messages
    assert len(got) == 3
    for m in got:
        assert type(m) is Message and m._fields == ("obj", "badge", "payload", "transfer",
                                                     "reply", "tag")
        assert (m.obj, m.badge, m.transfer, m.tag) == ("endpoint:pd-wireguard", 6, None, None)
        assert "pd-fleet" not in repr(m)
    hello, first, second = got
    assert hello.reply is None and hello.payload == {"op": "hello"}
    for m in (first, second):
        assert type(m.reply) is ReplyCap
        assert [f.name for f in dataclasses.fields(ReplyCap)] == ["reply_id"]
        assert repr(m.reply) == "ReplyCap(...)"
        assert not hasattr(m.reply, "caller") and not hasattr(m.reply, "__dict__")
    assert first.reply is not None and second.reply is not None
    ids = {first.reply.reply_id, second.reply.reply_id}
    assert len(ids) == 2 and not ids & fleet_caps and all(i > 1 << 32 for i in ids)


def test_a_core_is_started_with_its_own_view_only(node: SimNode, stage: Stage) -> None:
    state = node.kernel.state
    journals = load_default().journals
    for pd in PDS:
        view = stage.core(pd).views[-1]
        assert type(view) is PdView and not isinstance(view, State)
        assert view.pd == pd
        for name in ("caps", "pds", "pd_status", "objects", "signing_key"):
            assert not hasattr(view, name)
        assert all(type(h) is Held and h.token.holder == pd for h in view.held)
        assert [h.token for h in view.held] == caps.tokens_of(state, pd)
        assert set(view.owned) == {f for f in journals[pd]
                                   if f in ("mesh", "wg", "vm", "genesis")}
        assert view.node == {"name": "sim-node", "role": "hub", "mesh_ip": "10.8.0.1",
                             "endpoint": None, "wg_public_key": state.node["wg_public_key"],
                             "signing_key": state.node["signing_key"]}  # public keys only
        # The membership every core sees: public data, a copy (not the state's table).
        assert type(view.members) is dict and set(view.members) == set(state.members)
        assert view.members is not state.members


def test_mutating_the_view_changes_nothing(node: SimNode, stage: Stage) -> None:
    state = node.kernel.state
    before = snap(state, node.ledger)
    view = stage.core(ADMIN).views[-1]
    assert view.node is not None
    view.node["name"] = "evil"
    view.owned["mesh"]["sim-node"]["mesh_ip"] = "10.8.0.99"
    view.owned["mesh"]["evil"] = {"name": "evil"}
    view.members["sim-node"]["mesh_ip"] = "10.8.0.98"
    view.members["evil"] = {"name": "evil"}
    held = view.held[0]
    object.__setattr__(held.token, "holder", LEDGER)  # frozen is no barrier to a core
    object.__setattr__(held.token, "cap_id", 2)
    object.__setattr__(held, "rights", ("grant",))
    assert snap(state, node.ledger) == before
    assert state.node is not None and state.node["name"] == "sim-node"
    assert state.members["sim-node"].mesh_ip == "10.8.0.1" and "evil" not in state.members
    node.host.crash(ADMIN, "a fresh core")  # a restarted core is handed the truth again
    fresh = stage.core(ADMIN).views[-1]
    assert fresh is not view and fresh.owned["mesh"]["sim-node"]["mesh_ip"] == "10.8.0.1"
    assert [h.token for h in fresh.held] == caps.tokens_of(state, ADMIN)
    # and a core that presents the token it bent holds nothing by it
    bent = held.token
    refused_step(node, ADMIN, "not-holder", lambda core: [Send(bent, {"op": "x"})])


def test_payloads_travel_by_value(node: SimNode, stage: Stage) -> None:
    """A list sent on a write-only cap never comes back holding the receiver's data, and
    what the sender changes after sending never reaches the receiver."""
    state = node.kernel.state
    write_only = node.port(WG).mint(tok(state, WG, "tunnel", original=True), ("write",),
                                    badge=6, to=FLEET)
    box: dict[str, Any] = {"op": "box", "items": [1, {"k": [2]}]}

    def steal(core: Puppet, m: Message) -> list[Action]:
        m.payload["items"].append("receiver's secret")
        m.payload["items"][1]["k"].append("more")
        m.payload["op"] = "changed"
        return []
    stage.on_message[WG] = steal
    stage.scripts[FLEET].append(lambda core: [Send(write_only, box)])
    node.kernel.send(FLEET, tok(state, FLEET, "endpoint:pd-fleet"), GO)
    node.host.step()  # the puppet's step: its send is queued, not yet delivered
    assert node.host.pending == 1
    box["items"].append("sent later")
    box["items"][1]["k"].append("later")
    node.host.run_until_idle()
    (m,) = stage.core(WG).messages
    assert m.payload["items"][:2] == [1, {"k": [2, "more"]}]  # its own copy, as sent
    assert "sent later" not in m.payload["items"]
    assert box == {"op": "box", "items": [1, {"k": [2, "later"]}, "sent later"]}
    assert not [c for c in state.caps.values() if c.holder == WG
                and c.obj == "endpoint:pd-fleet"]  # it holds no way back to the sender


class Spy(dict):  # type: ignore[type-arg]
    """A payload whose methods would run in whoever touched it."""

    calls: ClassVar[list[str]] = []

    def get(self, *a: Any) -> Any:
        Spy.calls.append("get")
        raise RuntimeError("a sender's code ran")

    def items(self) -> Any:
        Spy.calls.append("items")
        return super().items()

    def keys(self) -> Any:
        Spy.calls.append("keys")
        return super().keys()

    def __iter__(self) -> Any:
        Spy.calls.append("iter")
        return super().__iter__()


class Listy(list):  # type: ignore[type-arg]
    pass


def _deep(n: int) -> Any:
    out: Any = []
    for _ in range(n):
        out = [out]
    return out


NOT_PLAIN: dict[str, Callable[[], Any]] = {
    "dict-subclass": lambda: Spy(op="ping"),
    "nested-dict-subclass": lambda: {"op": "x", "inner": Spy(a=1)},
    "list-subclass": lambda: {"op": "x", "l": Listy([1])},
    "str-subclass": lambda: {"op": Text("ping")},
    "bytes-subclass": lambda: {"op": "x", "b": Blob(b"x")},
    "tuple": lambda: ("op", "ping"),
    "tuple-inside": lambda: {"op": "x", "t": (1, 2)},
    "set": lambda: {"op": "x", "s": {1}},
    "object": lambda: object(),
    "function": lambda: {"op": "x", "f": print},
    "token": lambda: {"op": "x", "t": Token(1, FLEET, bytes(64))},
    "reply-cap": lambda: {"op": "x", "r": ReplyCap(5)},
    "tuple-key": lambda: {(1, 2): "x"},
    "int-too-big": lambda: {"op": "x", "n": 2**64},
    "int-too-small": lambda: {"op": "x", "n": -(2**63) - 1},
    "too-deep": lambda: {"op": "x", "d": _deep(5000)},
    "over-1MiB": lambda: {"op": "x", "b": bytes(MAX_MESSAGE_BYTES)},
    "over-1MiB-str": lambda: ["x" * (MAX_MESSAGE_BYTES // 2)] * 3,
}


@pytest.mark.parametrize("how", ["send", "call"])
@pytest.mark.parametrize("kind", sorted(NOT_PLAIN))
def test_what_is_not_plain_data_is_refused_at_the_sender(node: SimNode, kind: str,
                                                         how: str) -> None:
    Spy.calls.clear()
    payload = NOT_PLAIN[kind]()
    to_wg = tok(node.kernel.state, FLEET, "endpoint:pd-wireguard")
    action = Send(to_wg, payload) if how == "send" else Call(to_wg, payload)
    refused_step(node, FLEET, "bad-message", lambda core: [action])
    assert node.host.cores[WG].received == {}
    assert Spy.calls == []  # no method of the payload ran, in the receiver or anywhere
    assert node.kernel._calls == {}  # a refused call leaves no reply cap behind
    assert not node.kernel.state.restarts


def test_a_deeply_nested_payload_never_crashes_the_receiver(production: SimNode) -> None:
    n = production
    to_ledger = caps.token_for(next(c for c in n.kernel.state.caps.values()
                                    if c.holder == FLEET and c.obj == "endpoint:pd-ledger"))
    for _ in range(4):
        go(n, FLEET, lambda core: [Send(to_ledger, {"op": "note", "d": _deep(1023)})])
    assert n.kernel.state.restarts == {}
    assert n.kernel.state.pd_status[LEDGER] == "running"


@pytest.mark.parametrize("value", [msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 2)],
                         ids=["ext-type", "timestamp"])
def test_msgpack_extension_objects_are_not_plain_data(node: SimNode, value: object) -> None:
    to_wg = tok(node.kernel.state, FLEET, "endpoint:pd-wireguard")
    refused_step(node, FLEET, "bad-message", lambda core: [Send(to_wg, {"op": "x", "v": value})])


def test_the_largest_message_travels(node: SimNode, stage: Stage) -> None:
    to_wg = tok(node.kernel.state, FLEET, "endpoint:pd-wireguard")
    blob = bytes(MAX_MESSAGE_BYTES - 64)
    go(node, FLEET, lambda core: [Send(to_wg, {"op": "big", "b": blob})])
    (m,) = stage.core(WG).messages
    assert m.payload["b"] == blob and not node.kernel.refused


def test_a_reply_that_is_not_plain_keeps_the_reply_cap(node: SimNode, stage: Stage) -> None:
    to_wg = tok(node.kernel.state, FLEET, "endpoint:pd-wireguard")
    answers: list[Any] = [("a", "tuple"), Spy(op="x"), {"ok": True}]

    def answer(core: Puppet, m: Message) -> list[Action]:
        assert m.reply is not None
        return [Reply(m.reply, a) for a in answers]
    stage.on_message[WG] = answer
    go(node, FLEET, lambda core: [Call(to_wg, {"op": "ask"}, tag=3)])
    assert node.kernel.refused[(WG, "bad-message")] == 2
    replies = stage.core(FLEET).messages
    assert [(m.obj, m.payload, m.tag) for m in replies] == [("reply", {"ok": True}, 3)]
    assert node.kernel._calls == {}


# ============================================================================= malformed input
MALFORMED: list[Any] = [
    [], 5, None, "ping", b"op", 1.5, True, [{"op": "ping"}], {}, {1: 2}, {"op": 5},
    {"op": None}, {"op": ["ping"]}, {"op": b"ping"}, {"op": {"op": "ping"}}, {"op": True},
    {"op": "crash"}, {"op": "unknown"}, {"op": "x" * 500_000}, {"op": "op_ping"},
    {"op": "__init__"}, {"op": "handle"}, {"op": "start"}, {"op": "error"},
    {"op": "links", "x": [1]}, {"op": "udp.send"}, {"op": "udp.send", "to": 5, "data": "x"},
    {"op": "udp.send", "to": "1.2.3.4:99999", "data": b""},
    {"op": "udp.send", "to": "1.2.3.4:53", "data": bytes(70_000)},
    {"op": "net.links"}, {"op": "net.links", "op2": 1},
]


@pytest.fixture
def production(stage: Stage) -> Iterator[SimNode]:
    """Production cores everywhere, pd-fleet's a puppet holding (write, grant-reply) on
    every other PD's endpoint and on every object served."""
    stage.only = frozenset({FLEET})
    with scratch_directory("ppn-confine-") as d, structlog.testing.capture_logs():
        n = build_node(d / "ledger", seed=9, make_core=stage.make)
        state = n.kernel.state
        for c in sorted(state.caps.values(), key=lambda c: c.cap_id):
            if c.parent is None and c.holder != FLEET:
                n.kernel.mint(c.holder, caps.token_for(c), ("write", "grant-reply"), 6, FLEET)
        try:
            yield n
        finally:
            n.close()


def send_and_call(t: Token, payload: Any, core: Puppet) -> list[Action]:
    return [Send(t, payload), Call(t, payload)]


def test_malformed_messages_never_crash_a_production_core(production: SimNode,
                                                          stage: Stage) -> None:
    n = production
    state = n.kernel.state
    targets = [caps.token_for(c) for c in sorted(state.caps.values(), key=lambda c: c.cap_id)
               if c.holder == FLEET and c.badge == 6 and c.via == "mint"]
    assert len(targets) == 14
    generations = {pd: cell.generation for pd, cell in n.host.cells.items()}
    calls = 0
    for t in targets:
        for payload in MALFORMED:
            go(n, FLEET, functools.partial(send_and_call, t, payload))
            calls += 1
    assert state.restarts == {} and state.pd_status == dict.fromkeys(PDS, "running")
    assert {pd: cell.generation for pd, cell in n.host.cells.items()} == generations
    assert not n.kernel.refused
    replies = stage.core(FLEET).messages
    assert len(replies) == calls  # every call was answered...
    for m in replies:  # ... with an error: none of these is a request anybody serves
        assert m.obj == "reply" and type(m.payload) is dict, m
        assert m.payload.get("ok") is False and type(m.payload.get("error")) is str, m.payload
    assert n.kernel._calls == {}


@pytest.mark.parametrize("pd", [p for p in PDS if p != FLEET])
def test_crash_requests_do_nothing_to_production_cores(production: SimNode, pd: str) -> None:
    """Four {"op": "crash"} messages once put pd-ledger in failed; now they are refused."""
    n = production
    t = caps.token_for(next(c for c in n.kernel.state.caps.values() if c.holder == FLEET
                            and c.obj == f"endpoint:{pd}" and c.via == "mint"))
    for _ in range(6):
        go(n, FLEET, lambda core: [Send(t, {"op": "crash"}), Call(t, {"op": "crash"})])
    assert n.kernel.state.restarts == {} and n.kernel.state.pd_status[pd] == "running"
    core = n.host.cores[pd]
    assert core.rejected["unknown op"] == 12 and type(core) is type(make_core(pd))


# ============================================================================= forged deliveries
def forged(state: State, seal: object) -> Delivery:
    """A delivery to pd-fleet that would hand it pd-wireguard's tunnel original."""
    gift = tok(state, WG, "tunnel", original=True)
    sender = cap_on(state, WG, "endpoint:pd-wireguard", original=True)
    return Delivery(FLEET, "endpoint:pd-fleet", None, msgpack.packb({"op": "forged"}), sender,
                    gift, None, None, seal)


class DeliverySubclass(Delivery):
    pass


def test_forged_deliveries_are_refused_and_counted(node: SimNode) -> None:
    state = node.kernel.state
    kernel = node.kernel
    before = snap(state, node.ledger)
    real_seal = kernel._seal  # not a core's to have: even with it, only a Delivery goes
    attempts: list[Any] = [forged(state, object()), forged(state, None), forged(state, 0),
                           DeliverySubclass(*forged(state, real_seal)),
                           tuple(forged(state, real_seal)), "a delivery", None]
    for i, d in enumerate(attempts, 1):
        assert kernel.accept(d) is None
        assert kernel.forged == i
    cell = node.host.cells[FLEET]
    for d in attempts[:3]:
        node.host.engine.deliver(cell, d)  # what the host's mailbox would run
        node.host.route(FLEET, d)  # put on the queue as if the kernel had routed it
    node.host.run_until_idle()
    assert kernel.forged == len(attempts) + 6
    assert snap(state, node.ledger) == before
    assert node.host.cores[FLEET].received == {}
    assert not [c for c in state.caps.values() if c.holder == FLEET and c.obj == "tunnel"
                and c.via == "transfer"]


# ============================================================================= the real node
@pytest.fixture
def real(tmp_path: Path, stage: Stage) -> Iterator[Node]:
    state_dir = tmp_path / "state"
    with structlog.testing.capture_logs():
        assert cli.main(["node", "init", "--state-dir", str(state_dir), "--name", "n1"]) == 0
        n = Node(state_dir, make_core=stage.make, serve_control=False).start()
        try:
            yield n
        finally:
            n.stop()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return value


def go_real(n: Node, pd: str, script: Script) -> dict[str, Any]:
    """Run ``script`` as ``pd``'s core on the threaded node; its status after the step."""
    stage = stage_of(n.host.engine.make_core)
    stage.scripts[pd].append(script)
    n.kernel.send(pd, tok(n.kernel.state, pd, f"endpoint:{pd}", original=True), GO)
    status = n.host.core_status(pd)  # answered after the step: a barrier
    assert status is not None
    return status


def test_real_node_a_core_cannot_mint_itself_a_cap(real: Node) -> None:
    state = real.kernel.state
    size, root = real.ledger.size, real.ledger.root()
    caps_before = sorted(state.caps)
    grant = CapGranted(state.next_cap_id, ADMIN, "ledger.append", RIGHTS, None, None, "system")
    reap = PdReaped(LEDGER, "x")
    to_wg = tok(state, ADMIN, "endpoint:pd-wireguard")
    status = go_real(real, ADMIN, lambda core: [Send(to_wg, {"op": "after"}), Append(grant),
                                                Append(reap)])
    assert status["told"] == ["not-its-family"]
    status = go_real(real, FLEET, lambda core: [Append(CapMoved(2, LEDGER, FLEET))])
    assert status["told"] == ["no-journal-cap"]
    assert real.kernel.refused[(ADMIN, "not-its-family")] == 1
    assert real.kernel.refused[(FLEET, "no-journal-cap")] == 1
    assert (real.ledger.size, real.ledger.root()) == (size, root)
    assert sorted(state.caps) == caps_before
    assert (real.host.core_status(WG) or {})["received"] == {}
    assert real.host.running() == sorted(PDS)


def test_real_node_forged_deliveries_are_ignored(real: Node) -> None:
    state = real.kernel.state
    size = real.ledger.size
    dropped = real.host.engine.dropped["not from the kernel's route"]
    for seal in (object(), None):
        real.host._refs[FLEET].tell(forged(state, seal))
    mailbox = real.host.mailbox(FLEET)
    assert mailbox is not None
    mailbox.post(forged(state, object()))  # even in the mailbox the kernel's route fills
    status = real.host.core_status(FLEET)
    assert status is not None and status["received"] == {} and status["messages"] == 0
    assert real.host.engine.dropped["not from the kernel's route"] == dropped + 2
    assert real.kernel.forged == 1
    assert real.ledger.size == size
    assert not [c for c in state.caps.values() if c.holder == FLEET and c.via == "transfer"]


def test_operator_refusals_count_against_the_operator(real: Node) -> None:
    state = real.kernel.state
    size = real.ledger.size
    fleet_tunnel = cap_on(state, FLEET, "tunnel")  # read, write, grant-reply
    tunnel = cap_on(state, WG, "tunnel", original=True)
    wg_net = cap_on(state, WG, "net")  # write, grant-reply: a call may go through it
    attempts: list[tuple[Callable[[], object], str]] = [
        (lambda: real.revoke(9_999), "no-such-cap"),
        (lambda: real.mint(9_999, ["read"], FLEET), "no-such-cap"),
        (lambda: real.mint(fleet_tunnel, ["read", "grant"], FLEET), "escalation"),
        (lambda: real.mint(fleet_tunnel, ["read"], ADMIN), "missing-right"),
        (lambda: real.mint(tunnel, ["read"], "pd-nobody"), "bad-target"),
        (lambda: real.mint(tunnel, ["fly"], FLEET), "bad-request"),
        (lambda: real.mint(tunnel, ["read"], FLEET, badge=True), "bad-request"),
        (lambda: real.operator.call(wg_net, ("not", "plain"), print), "bad-message"),
    ]
    for attempt, code in attempts:
        before = real.kernel.refused[(OPERATOR, code)]
        with pytest.raises(CapRefused) as err:
            attempt()
        assert err.value.code == code
        assert real.kernel.refused[(OPERATOR, code)] == before + 1
    assert {pd for pd, _ in real.kernel.refused} == {OPERATOR}
    assert real.ledger.size == size
    assert real.status()["refused"] == {OPERATOR: {"no-such-cap": 2, "escalation": 1,
                                                   "missing-right": 1, "bad-target": 1,
                                                   "bad-request": 2, "bad-message": 1}}


# ============================================================================= the engine
class SendSubclass(Send):
    pass


class AppendSubclass(Append):
    pass


class CallSubclass(Call):
    pass


class ReplySubclass(Reply):
    pass


class TimerSubclass(SetTimer):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Undeclared(IoRequest):
    pass


def _gen() -> Iterator[Action]:
    yield SetTimer("t", 0)


CRASHING: dict[str, Script] = {
    "none": lambda core: None,
    "tuple": lambda core: (SetTimer("t", 0),),
    "dict": lambda core: {"op": "x"},
    "generator": lambda core: _gen(),
    "string": lambda core: "actions",
    "list-subclass": lambda core: Listy([SetTimer("t", 0)]),
    "not-an-action": lambda core: [SetTimer("t", 0), "send"],
    "event-not-wrapped": lambda core: [member()],
    "send-subclass": lambda core: [SendSubclass(core.held[0].token, {"op": "x"})],
    "append-subclass": lambda core: [AppendSubclass(member())],
    "call-subclass": lambda core: [CallSubclass(core.held[0].token, {"op": "x"})],
    "reply-subclass": lambda core: [ReplySubclass(ReplyCap(1), {"op": "x"})],
    "timer-subclass": lambda core: [TimerSubclass("t", 0)],
    "raises": lambda core: 1 // 0,
    "system-exit": lambda core: sys.exit(3),
}


@pytest.mark.parametrize("kind", sorted(CRASHING))
def test_a_core_returning_nonsense_is_restarted_and_journalled(node: SimNode,
                                                               kind: str) -> None:
    state = node.kernel.state
    size, caps_before = node.ledger.size, dict(state.caps)
    go(node, ADMIN, CRASHING[kind])
    assert state.restarts == {ADMIN: 1}
    assert state.event_counts["pd.restarted"] == 1 and node.ledger.size == size + 1
    assert state.pd_status == dict.fromkeys(PDS, "running") and dict(state.caps) == caps_before
    assert "peer-a" not in state.members  # nothing of a crashed step was journalled
    for pd in (ADMIN, LEDGER, FLEET):
        alive(node, pd)


def test_a_core_that_always_returns_nonsense_fails_alone(node: SimNode, stage: Stage) -> None:
    state = node.kernel.state
    for _ in range(4):
        stage.scripts[FLEET].append(CRASHING["none"])
    send = tok(state, FLEET, "endpoint:pd-fleet", original=True)
    for _ in range(4):
        node.kernel.send(FLEET, send, GO)
        node.host.run_until_idle()
    assert state.pd_status[FLEET] == "failed" and state.restarts[FLEET] == 3
    assert [p for p, s in state.pd_status.items() if s != "running"] == [FLEET]
    for pd in PDS:
        if pd != FLEET:
            alive(node, pd)


REFUSED_ACTIONS: dict[str, tuple[str, Script]] = {
    "undeclared-io": ("undeclared-io", lambda core: [Undeclared(1)]),
    "base-io-request": ("undeclared-io", lambda core: [IoRequest(1)]),
    "anothers-io": ("undeclared-io", lambda core: [ListLinks(1)]),
    "timer-name-int": ("bad-request", lambda core: [SetTimer(5, 1)]),  # type: ignore[arg-type]
    "timer-negative": ("bad-request", lambda core: [SetTimer("t", -1)]),
    "timer-str-delay": ("bad-request", lambda core: [SetTimer("t", "1")]),  # type: ignore[arg-type]
    "timer-bool-delay": ("bad-request", lambda core: [SetTimer("t", True)]),
    "timer-none": ("bad-request", lambda core: [SetTimer("t", None)]),  # type: ignore[arg-type]
    "guessed-reply": ("bad-token", lambda core: [Reply(ReplyCap(12345), {"op": "x"})]),
    "reply-not-a-cap": ("bad-token", lambda core: [Reply(12345, {"op": "x"})]),  # type: ignore[arg-type]
    "reply-subclass-cap": ("bad-token", lambda core: [Reply(_FakeReply(1), {})]),
    "send-tuple-token": ("bad-token", lambda core: [Send((1, ADMIN, b""), {})]),  # type: ignore[arg-type]
    "send-forged-token": ("bad-token", lambda core: [Send(Token(13, ADMIN, bytes(64)), {})]),
    "send-stolen-token": ("not-holder", lambda core: [Send(core.loot[0], {})]),
    "send-transfer-stolen": ("not-holder", lambda core: [
        Send(core.holding(f"endpoint:{ADMIN}").token, {}, transfer=core.loot[0])]),  # type: ignore[union-attr]
    "send-transfer-forged": ("bad-token", lambda core: [
        Send(core.holding(f"endpoint:{ADMIN}").token, {},  # type: ignore[union-attr]
             transfer=Token(13, ADMIN, bytes(64)))]),
    "send-transfer-without-grant": ("missing-right", lambda core: [
        Send(core.holding("endpoint:pd-wireguard").token, {},  # type: ignore[union-attr]
             transfer=core.holding("tunnel").token)]),  # type: ignore[union-attr]
    "call-without-grant-reply": ("missing-right", lambda core: [
        Call(core.holding("ledger.append").token, {"op": "ping"})]),  # type: ignore[union-attr]
}


class _FakeReply(ReplyCap):
    pass


@pytest.mark.parametrize("kind", sorted(REFUSED_ACTIONS))
def test_a_bad_action_is_a_counted_refusal(node: SimNode, stage: Stage, kind: str) -> None:
    stage.core(ADMIN).loot = [tok(node.kernel.state, FLEET, "vm.query")]
    code, script = REFUSED_ACTIONS[kind]
    refused_step(node, ADMIN, code, script)
    assert not node.kernel.state.restarts
    alive(node, ADMIN)


def list_links(rid: Any, core: Puppet) -> list[Action]:
    return [ListLinks(rid)]


def test_duplicate_io_request_ids_are_refused(node: SimNode, stage: Stage) -> None:
    """A core that declares ListLinks: a request id that is not an int, or one already in
    flight, is refused; the others go to the adapter."""
    Puppet.requests = (ListLinks,)
    try:
        core = stage.core(NET)
        for rid in (True, "1", None, 1.0):
            refused_step(node, NET, "bad-request", functools.partial(list_links, rid))
        size = node.ledger.size
        go(node, NET, lambda core: [ListLinks(7), ListLinks(7), ListLinks(8)])
        assert node.kernel.refused[(NET, "bad-request")] == 5
        assert [r.code for r in core.told][-1] == "bad-request"
        assert [r for _, r in node.host.io_requests] == [ListLinks(7), ListLinks(8)]
        assert node.ledger.size == size and node.kernel.state.restarts == {}
    finally:
        Puppet.requests = ()


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), 1e300, 1e12])
def test_an_absurd_timer_never_kills_the_simulated_node(node: SimNode, delay: float) -> None:
    """Refused, or a journalled restart: either way the node runs on."""
    state = node.kernel.state
    refused_before = sum(node.kernel.refused.values())
    go(node, FLEET, lambda core: [SetTimer("far", delay)])
    go(node, FLEET, lambda core: [SetTimer("soon", 0.01)])
    node.host.run_until_idle()
    restarted = state.restarts.get(FLEET, 0)
    assert sum(node.kernel.refused.values()) > refused_before or restarted == 1 or (
        "far" in node.host.cores[FLEET].fired)  # type: ignore[attr-defined]
    assert "soon" in node.host.cores[FLEET].fired  # type: ignore[attr-defined]
    assert state.pd_status == dict.fromkeys(PDS, "running")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_real_node_an_absurd_timer_does_not_kill_the_timers(real: Node) -> None:
    go_real(real, FLEET, lambda core: [SetTimer("far", 1e12)])
    time.sleep(0.1)
    go_real(real, VMM, lambda core: [SetTimer("soon", 0.01)])
    wait_for(lambda: "soon" in (real.host.core_status(VMM) or {}).get("fired", []), 2.0)


class Boom(BaseException):
    """Not an Exception: what ``raise KeyboardInterrupt`` or a bad library could raise."""


def _boom(core: Puppet) -> Any:
    raise Boom("a core raised a BaseException")


def test_a_core_raising_a_base_exception_is_restarted(node: SimNode) -> None:
    try:
        go(node, FLEET, _boom)
    except Boom:
        pytest.fail("the BaseException escaped the engine: the simulated node is dead")
    assert node.kernel.state.restarts == {FLEET: 1}


def test_real_node_a_core_raising_a_base_exception_stops_only_itself(real: Node) -> None:
    stage = stage_of(real.host.engine.make_core)
    stage.scripts[FLEET].append(_boom)
    real.kernel.send(FLEET, tok(real.kernel.state, FLEET, "endpoint:pd-fleet", original=True),
                     GO)
    wait_for(lambda: real.kernel.state.restarts.get(FLEET) == 1 or len(real.host.running()) < 7,
             3.0)
    time.sleep(0.2)
    assert real.host.running() == sorted(PDS)
    assert real.kernel.state.restarts == {FLEET: 1}


# ============================================================================= calls
def test_calls_lost_in_a_restart_do_not_use_up_the_callers_calls(
        node: SimNode, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "MAX_PENDING_CALLS", 3)
    state = node.kernel.state
    to_wg, to_vmm = tok(state, FLEET, "endpoint:pd-wireguard"), tok(state, FLEET,
                                                                    "endpoint:pd-vmm")
    go(node, FLEET, lambda core: [Call(to_wg, {"op": "ask"}) for _ in range(3)])
    assert received(node, WG, "ask") == 3  # a puppet does not answer "ask": 3 waiting
    node.host.crash(WG, "the callee restarts: its reply caps are gone with its core")
    go(node, FLEET, lambda core: [Call(to_vmm, {"op": "ping"})])
    assert node.kernel.refused[(FLEET, "too-many-calls")] == 0
    assert received(node, FLEET, "pong") == 1


def test_a_reply_to_a_call_of_an_earlier_core_is_not_taken_for_a_new_one(
        node: SimNode, stage: Stage) -> None:
    stage.only = frozenset({NET})  # production pd-network-admin; pd-net-driver a puppet
    node.host.crash(ADMIN, "take the production core")
    held: list[Message] = []

    def answer_later(core: Puppet, m: Message) -> list[Action]:
        held.append(m)  # answered together, the earlier call first
        if len(held) < 2:
            return []
        return [Reply(x.reply, {"ok": True, "links": [x.payload["n"]]})
                for x in held if x.reply is not None]
    stage.on_message[NET] = answer_later
    operator = node.kernel.operator()
    entry = cap_on(node.kernel.state, ADMIN, f"endpoint:{ADMIN}", original=True)
    answers: dict[str, list[Any]] = {"A": [], "B": []}
    operator.call(entry, {"op": "net.links", "n": "A"}, answers["A"].append)
    while not held:  # pd-network-admin forwards A to pd-net-driver, which holds it
        assert node.host.step()
    node.host.crash(ADMIN, "pd-network-admin restarts while A is in flight")
    operator.call(entry, {"op": "net.links", "n": "B"}, answers["B"].append)
    node.host.run_until_idle()
    assert answers["B"] in ([], [{"ok": True, "links": ["B"]}]), answers


# ============================================================================= concurrency
def test_real_node_concurrent_journalling_is_checked_against_each_other(
        real: Node, stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    barrier = threading.Barrier(2)
    check = commands.check

    def slow_check(state: State, event: object) -> None:
        check(state, event)
        # Both PDs' checks meet here -- unless the kernel serialises check and append.
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=3.0)
    monkeypatch.setattr(commands, "check", slow_check)
    a = member("peer-a", mesh_ip="10.8.0.40")
    b = member("peer-b", KEY[::-1], KEY, mesh_ip="10.8.0.40")
    for pd, event in ((ADMIN, a), (GENESIS, b)):
        stage.scripts[pd].append(functools.partial(appending, [event]))
    for pd in (ADMIN, GENESIS):
        real.kernel.send(pd, tok(real.kernel.state, pd, f"endpoint:{pd}", original=True), GO)
    for pd in (ADMIN, GENESIS):
        real.host.core_status(pd, timeout=5.0)
    ips = [m.mesh_ip for m in real.kernel.state.members.values()]
    assert len(ips) == len(set(ips)), ips
