"""The capability kernel: every PD-to-PD message and capability operation goes through it.

The kernel is not a PD; it is what PDs are confined by, as seL4 is.  A PD acts
only through a :class:`Port` bound to its name, presenting :class:`Token` s.  The
kernel checks each token against the live capability table (which the ledger's
fold maintains), journals every capability operation before it takes effect,
and hands deliveries to the host through a ``route`` callback.  It never looks
an actor up by name in a registry: the host gives it one route.

* Messages travel by value: a payload is encoded at send (plain data, at most
  ``wire.MAX_MESSAGE_BYTES``; anything else is refused at the sender) and decoded
  for the receiver, who sees a :class:`~actors.pds.base.Message`: the object, the
  badge, its own copy of the payload, an opaque reply cap -- nothing else of the
  sender.
* Only the kernel makes deliveries: each carries the kernel's private seal, and
  :meth:`Kernel.accept` refuses (and counts) any other.
* Revocation is immediate: a delivery is checked again when the receiver is about
  to see it, so once ``revoke`` has returned nothing sent under a revoked cap gets
  through, however long it sat in a queue.
* Journalling is an act under authority (:meth:`Kernel.journal_as`): a PD appends
  only through its write capability on ``ledger.append``, only event families the
  system description gives it, and only events a command in ``ledger.commands``
  accepts.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import structlog

from actors import wire
from actors.pds.base import Held, Message, PdView, ReplyCap
from actors.system import JOURNAL_OBJECT, load_default
from ledger import caps, commands
from ledger.caps import CapRefused, Token
from ledger.catalog import REGISTRY, CapGranted, MemberAdded, MemberRemoved
from ledger.errors import LedgerUsageError
from ledger.log import Ledger
from ledger.state import Cap, State, pd_transition

log = structlog.get_logger("kernel")

OPERATOR = "operator"
"""Who the node's owner is, in the kernel's refusal counters."""


class Delivery(NamedTuple):
    """A message in flight, as the kernel made it (never seen by a core).

    A NamedTuple rather than a dataclass: one is built per message, and this is
    the cheapest immutable record Python has.  ``seal`` is the kernel's own
    object: a delivery made anywhere else is refused at the receiver.
    """

    target: str
    obj: str
    badge: int | None
    data: bytes
    cap_id: int
    transfer: Token | None
    reply: ReplyCap | None
    tag: int | None
    seal: object
    epoch: int = 0
    """For an answer: the caller's core it is for (a restart starts a new epoch)."""


Route = Callable[[str, Delivery], None]


class Backpressure(Exception):
    """Raised by a host's route: the receiver's queue is full; the send is refused."""


MAX_PENDING_CALLS = 1024
"""Calls one PD may have waiting for their answers; one more is refused and counted."""


class _Call(NamedTuple):
    caller: str
    callee: str
    tag: int
    answer: Callable[[Any], None] | None
    epoch: int
    counted: str  # whose MAX_PENDING_CALLS it counts against: the caller, or the operator


SECTIONS: dict[str, Callable[[State], Any]] = {
    "mesh": lambda s: {m.name: {"name": m.name, "signing_key": m.signing_key,
                                "wg_public_key": m.wg_public_key, "mesh_ip": m.mesh_ip,
                                "endpoint": m.endpoint, "role": m.role,
                                "joined_ns": m.joined_ts_ns, "approved_by": m.approved_by}
                       for m in list(s.members.values())},
    "wg": lambda s: {
        "interface": None if s.wg is None else dict(s.wg),
        "peers": {p.name: {"name": p.name, "wg_public_key": p.wg_public_key,
                           "endpoint": p.endpoint, "mesh_ip": p.mesh_ip, "role": p.role,
                           "allowed_ips": list(p.allowed_ips), "keepalive": p.keepalive}
                  for p in list(s.peers.values())}},
    "genesis": lambda s: {**s.genesis, "opened_ns": list(s.genesis["opened_ns"]),
                          "open": None if s.genesis["open"] is None
                          else dict(s.genesis["open"]),
                          "last": None if s.genesis["last"] is None
                          else dict(s.genesis["last"])},
    "vm": lambda s: {
        "pool": None if s.vm_pool is None else dict(s.vm_pool),
        "vms": {v.name: {"name": v.name, "profile": v.profile, "vcpus": v.vcpus,
                         "ram_mib": v.ram_mib, "image": v.image, "overlay": v.overlay,
                         "state": v.state, "accel": v.accel, "pid": v.pid, "qmp": v.qmp,
                         "balloon_mib": v.balloon_mib, "since": v.since_ns / 1e9}
                for v in list(s.vms.values())}},
}
"""Event family -> the part of the state that family's events build (as plain data).
(Each iterates over a ``list()`` of the live table: taken in one step, while another
thread's append may be folding into it.)"""


_MEMBERSHIP = (MemberAdded, MemberRemoved)
SPAWNS = {"genesis.spawn": "pd-genesis"}
"""Spawn object -> the PD a write capability on it may spawn (once reaped)."""


def removed_view(s: State) -> dict[str, Any]:
    """Members removed: when, and by whom (what an announcement is judged against)."""
    return {k: {"at": v[0], "by": v[1]} for k, v in list(s.removed.items())}


class Kernel:
    """Checks tokens, journals capability operations, routes messages."""

    def __init__(self, ledger: Ledger, route: Route | None = None, *,
                 reply_ids: Callable[[], int] | None = None,
                 journals: Mapping[str, frozenset[str]] | None = None) -> None:
        self._ledger = ledger
        # The ledger folds into one State object for its whole life: hold it directly.
        self._state = ledger.state
        self._route: Route = route or _no_route
        self._seal = object()
        self._journals = dict(load_default().journals if journals is None else journals)
        self._ops = threading.Lock()  # one capability operation at a time
        self._journal = threading.Lock()  # a PD's batch: checked, then appended, as one
        self._reply_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}  # reply id -> the call it answers
        # Unguessable: a callee cannot answer a call it has not been handed yet.  The
        # simulator passes a seeded source, so that a seed still reproduces a run.
        self._next_reply_id = reply_ids or self._random_reply_id
        self._reply_pool: list[int] = []
        self._journal_caps: dict[str, int] = {}  # PD -> its journal cap, when last looked up
        self._no_journal_cap: dict[str, int] = {}  # PD -> the seq at which it had none
        self._pending: Counter[str] = Counter()  # caller -> calls not answered yet
        self._epochs: Counter[str] = Counter()  # PD -> how many times its core was replaced
        self._node_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._member_listeners: list[Callable[[dict[str, Any], dict[str, Any]], None]] = []
        self._held_listeners: list[Callable[[str], None]] = []
        self._public: dict[str, Any] | None = None  # the node's identity, as last told
        self._node_seen: dict[str, Any] | None = None  # state.node when it was last looked at
        self.refused: Counter[tuple[str, str]] = Counter()  # (pd, code) -> count
        self.dropped = 0  # deliveries stopped at the receiver: cap revoked in flight
        self.forged = 0  # deliveries the kernel did not make, refused at the receiver

    def set_route(self, route: Route) -> None:
        self._route = route

    def watch_members(self, listener: Callable[[dict[str, Any], dict[str, Any]], None]
                      ) -> None:
        """``listener`` (the host's) hears the membership each time a journalled batch
        adds or removes a member, to tell every running core (``MembersChanged``)."""
        self._member_listeners.append(listener)

    def watch_node(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """``listener`` (the host's) hears the node's public identity each time a journalled
        batch changes it, to tell every running core (``NodeChanged``)."""
        self._node_listeners.append(listener)
        self._node_seen, self._public = self._state.node, self._public_node()

    def _public_node(self) -> dict[str, Any] | None:
        node = self._state.node
        return None if node is None else {  # public keys only (no private key is here)
            k: node.get(k) for k in ("name", "role", "mesh_ip", "endpoint", "wg_public_key",
                                     "signing_key")}

    @property
    def state(self) -> State:
        return self._state

    def _random_reply_id(self) -> int:
        """63 bits from the OS's CSPRNG, drawn 512 at a time (called under the reply lock)."""
        if not self._reply_pool:
            raw = os.urandom(8 * 512)
            self._reply_pool = [int.from_bytes(raw[i:i + 8], "big") >> 1
                                for i in range(0, len(raw), 8)]
        return self._reply_pool.pop()

    def _route_to(self, target: str, d: Delivery, pd: str, cap_id: int | None,
                  who: str | None) -> None:
        try:
            self._route(target, d)
        except Backpressure as exc:
            raise self._refuse(CapRefused("queue-full", pd, cap_id, str(exc)), who) from None

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

    def operator(self) -> OperatorPort:
        """The node owner's handle (the control socket's): refusals are counted as its."""
        return OperatorPort(self)

    def held(self, pd: str) -> tuple[Held, ...]:
        """The capabilities ``pd`` holds now, as its core sees them."""
        return tuple(Held(caps.token_for(c), c.obj, c.rights, c.badge)
                     for c in sorted(self._state.caps.values(), key=lambda c: c.cap_id)
                     if c.holder == pd)

    def view(self, pd: str) -> PdView:
        """What ``pd``'s core is started with: its own caps and the state it journals."""
        state = self._state
        held = self.held(pd)
        public = self._public_node()
        owned = {f: SECTIONS[f](state) for f in sorted(self._journals.get(pd, ()))
                 if f in SECTIONS}
        return PdView(pd, held, public, owned, SECTIONS["mesh"](state), removed_view(state))

    # ----------------------------------------------------------------- messages
    def _refuse(self, exc: CapRefused, who: str | None = None) -> CapRefused:
        self.refused[(who or exc.pd, exc.code)] += 1
        log.info("kernel.refused", pd=who or exc.pd, cap=exc.cap_id, code=exc.code,
                 right=exc.right, reason=str(exc))
        return exc

    def _encode(self, pd: str, cap_id: int | None, payload: Any, who: str | None) -> bytes:
        try:
            return wire.encode(payload)
        except wire.NotPlainData as exc:
            raise self._refuse(CapRefused("bad-message", pd, cap_id, str(exc)), who) from None

    def send(self, pd: str, token: Token, payload: Any, *, transfer: Token | None = None,
             reply: ReplyCap | None = None, tag: int | None = None,
             who: str | None = None) -> None:
        """Queue ``payload`` for the PD serving the cap's object; refusals raise."""
        state = self._state
        cap = state.caps.get(token.cap_id) if caps.well_formed(token) else None
        # Fast path, the common case: a plain message under a sound token to a running PD.
        if (transfer is None and cap is not None and cap.holder == pd == token.holder
                and cap.sig is not None and hmac.compare_digest(cap.sig, token.signature)
                and "write" in cap.rights):
            target = state.objects.get(cap.obj)
            if target is not None and state.pd_status.get(target) == "running":
                data = self._encode(pd, cap.cap_id, payload, who)
                self._route_to(target, Delivery(target, cap.obj, cap.badge, data, cap.cap_id,
                                                None, reply, tag, self._seal),
                               pd, cap.cap_id, who)
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
            raise self._refuse(exc, who) from None
        data = self._encode(pd, cap.cap_id, payload, who)
        self._route_to(target, Delivery(target, cap.obj, cap.badge, data, cap.cap_id,
                                        transfer, reply, tag, self._seal), pd, cap.cap_id, who)

    def call(self, pd: str, token: Token, payload: Any, *, tag: int = 0,
             on_reply: Callable[[Any], None] | None = None, who: str | None = None) -> None:
        """Send with a one-shot reply cap; needs ``grant`` or ``grant-reply``.

        The answer comes back to ``pd`` as a ``"reply"`` message carrying ``tag``;
        the operator's calls pass ``on_reply`` instead, which gets the answer.
        """
        try:  # the token first: a PD learns nothing of a cap it does not hold
            cap = caps.check(self.state, pd, token)
            if "grant" not in cap.rights and "grant-reply" not in cap.rights:
                raise CapRefused("missing-right", pd, token.cap_id,
                                 "a call needs grant or grant-reply", "grant-reply")
        except CapRefused as exc:
            raise self._refuse(exc, who) from None
        counted = who or pd  # the operator's calls use its own budget, not the holder's
        with self._reply_lock:
            if self._pending[counted] >= MAX_PENDING_CALLS:
                raise self._refuse(CapRefused(
                    "too-many-calls", pd, cap.cap_id,
                    f"{MAX_PENDING_CALLS} calls are waiting for their answers already"), who)
            reply_id = self._next_reply_id()
            while reply_id in self._calls:
                reply_id = self._next_reply_id()
            # Registered before sending: the callee may answer before send() returns.
            self._calls[reply_id] = _Call(pd, self.owner(cap.obj) or "", tag, on_reply,
                                          self._epochs[pd], counted)
            self._pending[counted] += 1
        try:
            self.send(pd, token, payload, reply=ReplyCap(reply_id), who=who)
        except CapRefused:
            self._forget(reply_id)
            raise

    def _forget(self, reply_id: int) -> _Call | None:
        """Drop a reply cap that will not be used (its call was refused or dropped)."""
        with self._reply_lock:
            entry = self._calls.pop(reply_id, None)
            if entry is not None:
                self._pending[entry.counted] -= 1
        return entry

    def reply(self, pd: str, reply: ReplyCap, payload: Any) -> None:
        """Answer a call, once, to the caller (who sees no badge, only the answer)."""
        reply_id = reply.reply_id if type(reply) is ReplyCap else None
        data = self._encode(pd, None, payload, None)
        with self._reply_lock:  # check, then consume: a wrong PD must not use it up
            entry = self._calls.get(reply_id) if reply_id is not None else None
            if reply_id is None or entry is None or entry.callee != pd:
                raise self._refuse(CapRefused("bad-token", pd, None,
                                              "reply cap unknown, used or not yours"))
            del self._calls[reply_id]
            self._pending[entry.counted] -= 1
        if entry.answer is not None:
            entry.answer(wire.decode(data))
            return
        try:
            self._route(entry.caller, Delivery(entry.caller, "reply", None, data, 0, None,
                                               None, entry.tag, self._seal, entry.epoch))
        except Backpressure:  # the caller's queue is full: the answer is lost, and counted
            self.dropped += 1

    def core_replaced(self, pd: str) -> None:
        """``pd``'s core is gone (restarted, failed, reaped): the calls tied to it end.

        Its own calls will never be answered to it (an answer already on its way is
        dropped at delivery: it was for the old core); calls made to it are answered to
        their callers now, with an error, and free their places in the caller's count.
        """
        with self._reply_lock:
            self._epochs[pd] += 1
            ended = [(rid, c) for rid, c in self._calls.items() if pd in (c.caller, c.callee)]
            for rid, c in ended:
                del self._calls[rid]
                self._pending[c.counted] -= 1
        for _, c in ended:
            if c.caller == pd and c.answer is None:  # its answers were for the old core
                continue
            self._answer_failure(c, f"{pd} was restarted or stopped before it answered")

    def _answer_failure(self, c: _Call, why: str) -> None:
        """Tell a caller its call will never be answered (and why)."""
        failure = wire.encode({"ok": False, "error": why})
        if c.answer is not None:
            c.answer(wire.decode(failure))
            return
        try:
            self._route(c.caller, Delivery(c.caller, "reply", None, failure, 0, None, None,
                                           c.tag, self._seal, c.epoch))
        except Backpressure:
            self.dropped += 1

    def _call_dropped(self, reply_id: int, why: str) -> None:
        """A call that will not be delivered: its reply cap goes, and its caller is told."""
        entry = self._forget(reply_id)
        if entry is not None:
            self._answer_failure(entry, why)

    def accept(self, d: Delivery) -> Message | None:
        """At the receiver: the message for its core, or None if it must not arrive.

        Called on the receiver's side just before its handler runs, so a revoke that
        returned earlier stops messages already queued.  A capability carried in the
        message is granted to the receiver here, journaled first.
        """
        if type(d) is not Delivery or d.seal is not self._seal:
            self.forged += 1
            log.warning("kernel.forged_delivery", kind=type(d).__name__)
            return None
        if d.cap_id == 0:  # a reply: its one-shot cap was consumed by ``reply``
            if d.epoch != self._epochs[d.target]:  # for a core that has been replaced
                self.dropped += 1
                return None
            return self._message(d, None)
        state = self._state
        if d.cap_id not in state.caps or state.pd_status.get(d.target) != "running":
            self.dropped += 1
            if d.reply is not None:  # the call will never be answered: say so to the caller
                why = (f"cap #{d.cap_id} was revoked before the call was delivered"
                       if d.cap_id not in state.caps else f"{d.target} is not running")
                self._call_dropped(d.reply.reply_id, why)
            return None
        held = None
        if d.transfer is not None:
            try:
                with self._ops:
                    sender = state.caps[d.cap_id]
                    event = caps.transfer(self.state, sender.holder, caps.token_for(sender),
                                          d.transfer, d.target)
                    token = self._journal_grant(event)
            except (CapRefused, KeyError, LedgerUsageError):
                self.dropped += 1
                return None
            held = Held(token, event.obj, event.rights, event.badge)
        return self._message(d, held)

    def _message(self, d: Delivery, held: Held | None) -> Message | None:
        try:
            payload = wire.decode(d.data)
        except wire.NotPlainData:  # never made by encode: dropped, not the receiver's crash
            self.dropped += 1
            log.warning("kernel.undecodable", pd=d.target)
            if d.reply is not None:
                self._call_dropped(d.reply.reply_id, "the call's payload was undecodable")
            return None
        if d.cap_id == 0:
            return Message("reply", None, payload, None, None, d.tag)
        return Message(d.obj, d.badge, payload, held, d.reply, None)

    # ----------------------------------------------------------------- journalling
    def journal_as(self, pd: str, events: Sequence[object]) -> None:
        """Append ``events`` for ``pd``, all or none, if its authority covers every one.

        ``pd`` needs a live write capability on ``ledger.append``; each event must be
        of a family the system description gives ``pd`` and pass its command's check.
        Anything else is refused (raised and counted) and nothing is appended.
        """
        with self._journal:  # no other PD's batch is checked against a state it changes
            self._journal_locked(pd, events)

    def _journal_locked(self, pd: str, events: Sequence[object]) -> None:
        state = self._state
        try:
            cap = self._journal_cap(pd)
            if cap is None:
                raise CapRefused("no-journal-cap", pd, None,
                                 f"holds no write capability on {JOURNAL_OBJECT}", "write")
            allowed = self._journals.get(pd, frozenset())
            for event in events:
                try:
                    tag = REGISTRY.type_of(event).tag
                except LedgerUsageError:
                    raise CapRefused("bad-event", pd, cap.cap_id,
                                     f"a {type(event).__name__} is not an event") from None
                family = tag.split(".", 1)[0]
                if family not in allowed:
                    raise CapRefused("not-its-family", pd, cap.cap_id,
                                     f"may not journal {tag}: the system description gives "
                                     f"it {', '.join(sorted(allowed)) or 'no'} families")
            try:
                commands.check_batch(state, events)
            except commands.EventInvalid as exc:
                raise CapRefused("bad-event", pd, cap.cap_id, str(exc)) from None
            self._ledger.append_many(events)
            if self._member_listeners and any(type(e) in _MEMBERSHIP for e in events):
                members = SECTIONS["mesh"](self._state)
                removed = removed_view(self._state)
                for member_listener in self._member_listeners:
                    member_listener(members, removed)
            if self._node_listeners and self._state.node is not self._node_seen:
                # The fold replaces the node's dict whenever it changes: an identity
                # test per batch, and the public part compared only then.
                self._node_seen = self._state.node
                public = self._public_node()
                if public != self._public and public is not None:
                    self._public = public
                    for listener in self._node_listeners:
                        listener(dict(public))
        except CapRefused as exc:
            raise self._refuse(exc) from None
        except LedgerUsageError as exc:  # the batch as a whole did not fit the state
            raise self._refuse(CapRefused("bad-event", pd, None, str(exc))) from None

    def _journal_cap(self, pd: str) -> Cap | None:
        """``pd``'s write cap on ``ledger.append``: the one found last time if it is still
        live, else looked for (a scan of the table)."""
        state = self._state
        known = state.caps.get(self._journal_caps.get(pd, -1))
        if known is not None and known.holder == pd and known.obj == JOURNAL_OBJECT \
                and "write" in known.rights:
            return known
        if self._no_journal_cap.get(pd) == state.seq:  # nothing changed since it had none
            return None
        cap = next((c for c in list(state.caps.values()) if c.holder == pd
                    and c.obj == JOURNAL_OBJECT and "write" in c.rights), None)
        if cap is not None:
            self._journal_caps[pd] = cap.cap_id
        else:
            self._no_journal_cap[pd] = state.seq
        return cap

    def lifecycle(self, event: Any, grants: Callable[[State], list[Any]] | None = None
                  ) -> None:
        """Append a PD lifecycle event (restarted, failed, reaped, spawned), if the PD's
        status allows it (:data:`ledger.state.PD_TRANSITIONS`); else :class:`CapRefused`.
        ``grants(state)``: capability grants made with it, in one batch (a spawned PD's
        capabilities); each holder then hears of its new ones (``HeldChanged``).

        Under the capability-operation lock: a reap deletes caps in the fold, and no
        capability command may be checked against a state changing beneath it.
        """
        with self._ops:
            why = pd_transition(self._state, event.name, type(event))
            if why is not None:
                raise CapRefused("bad-transition", event.name, None, why)
            extra = [] if grants is None else grants(self._state)
            if any(type(g) is not CapGranted for g in extra):
                raise CapRefused("bad-event", event.name, None, "only grants go with it")
            before = {c.cap_id: c.holder for c in list(self._state.caps.values())}
            self._ledger.append_many([event, *extra])
            after = self._state.caps
            lost = {h for k, h in before.items() if k not in after}  # a reap's casualties
        # Each PD whose capabilities changed hears of it, so that no core goes on
        # presenting a token the fold has deleted (or misses one it was granted).
        for holder in sorted(({g.holder for g in extra} | lost) - {event.name}):
            self.tell_held(holder)

    def spawn_target(self, pd: str, token: Token) -> str:
        """The PD that ``pd`` may spawn with ``token`` (a live write capability of its own
        on a spawn object, :data:`SPAWNS`); else :class:`CapRefused`, counted."""
        with self._ops:
            try:
                cap = caps.check(self._state, pd, token, "write")
            except CapRefused as exc:
                raise self._refuse(exc) from None
        target = SPAWNS.get(cap.obj)
        if target is None:
            raise self._refuse(CapRefused("not-spawnable", pd, cap.cap_id,
                                          f"a capability on {cap.obj} spawns nothing"))
        return target

    def watch_held(self, listener: Callable[[str], None]) -> None:
        """``listener`` (the host's) hears which PD's capabilities changed outside its own
        actions (a reap's deletions, a spawn's channels), to tell its running core."""
        self._held_listeners.append(listener)

    def tell_held(self, pd: str) -> None:
        for listener in self._held_listeners:
            listener(pd)

    # ----------------------------------------------------------------- cap operations
    def _journal_grant(self, event: CapGranted) -> Token:
        self._ledger.append(event)
        return caps.token_for(self.state.caps[event.cap_id])

    def _op(self, pd: str, command: Callable[[State], Any], who: str | None = None) -> Any:
        with self._ops:
            try:
                event = command(self.state)
            except CapRefused as exc:
                raise self._refuse(exc, who) from None
            if isinstance(event, CapGranted):
                return self._journal_grant(event)
            self._ledger.append(event)
            return event

    def mint(self, pd: str, token: Token, rights: tuple[str, ...], badge: int | None = None,
             to: str | None = None, *, who: str | None = None) -> Token:
        tok: Token = self._op(pd, lambda s: caps.mint(s, pd, token, rights, badge, to), who)
        return tok

    def copy(self, pd: str, token: Token, to: str | None = None) -> Token:
        tok: Token = self._op(pd, lambda s: caps.copy(s, pd, token, to))
        return tok

    def move(self, pd: str, token: Token, to: str) -> Token:
        self._op(pd, lambda s: caps.move(s, pd, token, to))
        return caps.token_for(self.state.caps[token.cap_id])

    def delete(self, pd: str, token: Token) -> None:
        self._op(pd, lambda s: caps.delete(s, pd, token))

    def revoke(self, pd: str, token: Token, *, who: str | None = None) -> int:
        """Delete every descendant; returns how many.  Queued messages under them die too."""
        event = self._op(pd, lambda s: caps.revoke(s, pd, token), who)
        return int(event.descendants)


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

    def call(self, token: Token, payload: Any, tag: int = 0) -> None:
        self._kernel.call(self.pd, token, payload, tag=tag)

    def reply(self, reply: ReplyCap, payload: Any) -> None:
        self._kernel.reply(self.pd, reply, payload)

    def journal(self, events: Sequence[object]) -> None:
        self._kernel.journal_as(self.pd, events)

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


class OperatorPort:
    """The node owner's handle: acts on any capability by id, as the control socket asks.

    It never hands out a token; every operation still goes through the kernel's
    checks and journal, and a refusal is counted against the operator, not the PD
    that holds the capability.
    """

    __slots__ = ("_kernel",)

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel

    def _token(self, cap_id: int) -> Token:
        cap = self._kernel.state.caps.get(cap_id)
        if cap is None:
            raise self._kernel._refuse(CapRefused("no-such-cap", OPERATOR, cap_id,
                                                  "no such capability"))
        return caps.token_for(cap)

    def revoke(self, cap_id: int) -> int:
        token = self._token(cap_id)
        return self._kernel.revoke(token.holder, token, who=OPERATOR)

    def mint(self, cap_id: int, rights: tuple[str, ...], to: str,
             badge: int | None = None) -> int:
        token = self._token(cap_id)
        return self._kernel.mint(token.holder, token, rights, badge, to, who=OPERATOR).cap_id

    def call(self, cap_id: int, payload: Any, on_reply: Callable[[Any], None]) -> None:
        """Call through ``cap_id`` as its holder would; ``on_reply`` gets the answer."""
        token = self._token(cap_id)
        self._kernel.call(token.holder, token, payload, on_reply=on_reply, who=OPERATOR)
