"""pd-network-admin: the operator's PD.  Commands that change the node enter here.

The operator (the control socket) calls this PD through its own endpoint's original
capability, which carries no badge: only the operator's calls arrive unbadged.
Each operator command is forwarded, as a call, to the PD that does the work, under
a capability this PD holds on that PD's object; the answer goes back to the
operator.  Without that capability -- never held, or revoked -- the command fails
with an error that names it.  (``ppn caps mint/revoke`` are not commands here:
they are the kernel-level experiments they always were.)
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, ClassVar

from actors.pds import announce
from actors.pds.announce import (
    Announcement,
    AnnounceReceived,
    BindAnnounce,
    Rejected,
    SendAnnounce,
    SignAnnounce,
)
from actors.pds.base import (
    Action,
    Append,
    Call,
    Core,
    IoAnswer,
    IoInput,
    IoResult,
    Message,
    PdView,
    Refused,
    Reply,
    ReplyCap,
    SetTimer,
    Spawn,
)
from ledger.catalog import MemberAdded, MemberRemoved

FORWARDS: dict[str, tuple[str, str]] = {
    "net.links": ("net", "links"),
    "mesh.peer.add": ("peers", "peer.add"),
    "mesh.peer.remove": ("peers", "peer.remove"),
    "mesh.repair": ("peers", "repair"),
    "mesh.status": ("peers", "status"),
    **{f"vm.{op}": ("vm.control", f"vm.{op}")
       for op in ("create", "start", "pause", "resume", "stop", "destroy", "balloon")},
    "vm.list": ("vm.query", "vm.list"),
    **{f"pair.{op}": ("endpoint:pd-genesis", f"pair.{op}")
       for op in ("start", "approve")},
    "vm.pool": ("vm.query", "vm.pool"),
}
"""Operator command -> (the object it needs a capability on, the op sent there)."""

MAX_WAITING = 1024  # operator commands in flight; the oldest is forgotten past this


GENESIS = "endpoint:pd-genesis"
RESEND = (0.0, 1.0, 3.0)  # when an announcement is sent (UDP; a new tunnel's handshake)


def _not_run(answer: Any) -> bool:
    """Whether a call's answer says its callee went before it ran it (reaped, stopped)."""
    return (type(answer) is dict and answer.get("ok") is False
            and "before it answered" in str(answer.get("error", "")))


class NetworkAdminCore(Core):
    """The operator's commands, and the mesh's membership announcements: it tells every
    member of each node this node admitted or removed, and records what members tell it
    (judged by :mod:`actors.pds.announce`; anything else dropped and counted)."""

    requests = (BindAnnounce, SendAnnounce, SignAnnounce)
    ops: ClassVar[dict[str, str]] = {**Core.ops, **{cmd: "op_forward" for cmd in FORWARDS},
                                     "mesh.member.remove": "op_member_remove",
                                     "mesh.member.list": "op_member_list"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._waiting: OrderedDict[int, tuple[ReplyCap, str, int]] = OrderedDict()
        self._next_tag = 0
        self.members: dict[str, Any] = {}
        self.removed: dict[str, Any] = {}
        self.heard: Counter[str] = Counter()  # announcements recorded, and dropped by why
        self.told: Counter[str] = Counter()  # announcements sent (and failed)
        self._signing: dict[int, Announcement] = {}
        self._sending: dict[int, tuple[bytes, list[str]]] = {}
        self._resend: dict[str, tuple[bytes, list[str]]] = {}
        self._bound: str | None = None
        self._for_genesis: list[tuple[Message, dict[str, Any]]] = []  # waiting for a spawn
        self._genesis_calls: dict[int, tuple[Message, dict[str, Any]]] = {}  # tag -> asked

    # ------------------------------------------------------------------ membership
    def start(self, view: PdView, now: float) -> list[Action]:
        actions = super().start(view, now)
        self.members, self.removed = dict(view.members), dict(view.removed)
        return actions + self._bind()

    def _me(self) -> str:
        return str((self.node or {}).get("name"))

    def _bind(self) -> list[Action]:
        ip = (self.node or {}).get("mesh_ip")
        if not ip or self._bound == ip:
            return []
        self._bound = ip
        return [BindAnnounce(self.request_id(), str(ip), announce.PORT)]

    def node_changed(self, node: dict[str, Any], now: float) -> list[Action]:
        super().node_changed(node, now)
        return self._bind()

    def members_changed(self, members: dict[str, Any], now: float,
                        removed: dict[str, Any] | None = None) -> list[Action]:
        """What this node did itself (admitted a node through a ceremony, removed one)
        is announced to every other member; what it was told is only recorded."""
        before = self.members
        self.members, self.removed = dict(members), dict(removed or {})
        me, actions = self._me(), []
        for name, m in sorted(members.items()):
            if name not in before and m.get("approved_by") == me:
                actions += self._announce(Announcement("added", {
                    "name": name, "wg_key": m["wg_public_key"],
                    "signing_key": m["signing_key"], "mesh_ip": m["mesh_ip"],
                    "endpoint": m.get("endpoint") or "", "role": m["role"],
                    "joined_ns": int(m["joined_ns"]), "approved_by": me},
                    me, int(m["joined_ns"])), exclude=name)
        for name in sorted(set(before) - set(members)):
            gone = self.removed.get(name) or {}
            if gone.get("by") == me:
                actions += self._announce(Announcement("removed", {"name": name}, me,
                                                       int(gone["at"])), exclude=name)
        return actions

    def _announce(self, a: Announcement, exclude: str) -> list[Action]:
        to = sorted(str(m["mesh_ip"]) for n, m in self.members.items()
                    if n not in (self._me(), exclude) and m.get("mesh_ip"))
        if not to:
            return []
        rid = self.request_id()
        self._signing[rid] = a
        self._sending[rid] = (b"", to)
        return [SignAnnounce(rid, announce.body(a))]

    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        rid = answer.request_id
        if rid in self._signing:
            a = self._signing.pop(rid)
            _, to = self._sending.pop(rid)
            sig = answer.value.get("signature") if isinstance(answer, IoResult) and type(
                answer.value) is dict else None
            if type(sig) is not bytes:
                self.told["not signed"] += 1
                return []
            data = announce.datagram(a, sig)
            key = f"{a.kind}:{a.record['name']}:{a.at_ns}"
            self._resend[key] = (data, to)
            return [SetTimer(f"announce:{i}:{key}", delay) for i, delay in enumerate(RESEND)]
        if not isinstance(answer, IoResult):
            self.told["failed"] += 1
        return []

    def timer(self, name: str, now: float) -> list[Action]:
        if not name.startswith("announce:"):
            return super().timer(name, now)
        _, i, key = name.split(":", 2)
        found = self._resend.get(key)
        if found is None:
            return []
        if int(i) == len(RESEND) - 1:
            self._resend.pop(key)
        data, to = found
        self.told["sent"] += len(to)
        return [SendAnnounce(self.request_id(), ip, announce.PORT, data) for ip in to]

    def input(self, event: IoInput, now: float) -> list[Action]:
        if not isinstance(event, AnnounceReceived):
            return super().input(event, now)
        try:
            a, signed, signature = announce.parse(event.data)
            removed_at = {k: int(v["at"]) for k, v in self.removed.items()}
            announce.judge(a, signed, signature, self.members, removed_at, self._me())
        except Rejected as exc:
            self.heard[str(exc)] += 1
            return []
        self.heard["recorded"] += 1
        r = a.record
        if a.kind == "added":
            return [Append(MemberAdded(r["name"], r["signing_key"], r["wg_key"], r["mesh_ip"],
                                       r["endpoint"] or None, r["role"], a.at_ns, a.by))]
        return [Append(MemberRemoved(r["name"], f"removed by {a.by}", a.at_ns, a.by))]

    def op_member_remove(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.badge is not None:
            return self.error(m, "operator commands come from the operator only")
        name = p.get("name")
        if type(name) is not str or name not in self.members:
            return self.error(m, f"no member {str(name)[:40]!r}")
        if name == self._me():
            return self.error(m, f"{name} is this node: it cannot remove itself")
        event = MemberRemoved(name, "removed by the operator", int(now * 1e9), self._me())
        out: list[Action] = [Append(event)]
        if m.reply is not None:
            out.append(Reply(m.reply, {"ok": True, "removed": name}))
        return out

    def op_member_list(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        return [Reply(m.reply, {"ok": True, "members": sorted(self.members.values(),
                                                              key=lambda x: x["name"]),
                                "heard": dict(self.heard), "told": dict(self.told)})]

    def op_forward(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        if m.badge is not None:  # a PD's channel, not the operator
            return self.error(m, "operator commands come from the operator only")
        obj, op = FORWARDS[payload["op"]]
        held = self.holding(obj, "grant-reply") or self.holding(obj, "grant")
        if held is None and obj == GENESIS:
            return self._spawn_genesis(m, payload)
        if held is None:
            return self.error(m, f"holds no capability on {obj} (needed for "
                                 f"{payload['op']})")
        self._next_tag += 1
        self._waiting[self._next_tag] = (m.reply, obj, held.token.cap_id)
        actions: list[Action] = []
        while len(self._waiting) > MAX_WAITING:  # the oldest is told, not left to time out
            old, (evicted, _, _) = self._waiting.popitem(last=False)
            self._genesis_calls.pop(old, None)
            actions.append(Reply(evicted, {"ok": False, "error": f"{self.name}: too many "
                                           "commands in flight; this one was given up"}))
        args = {k: v for k, v in payload.items() if k not in ("op", "again")}
        if obj == GENESIS:  # kept: a pd-genesis reaped meanwhile means spawn and resend
            self._genesis_calls[self._next_tag] = (m, payload)
        return [*actions, Call(held.token, {**args, "op": op}, tag=self._next_tag)]

    # ------------------------------------------------------------------ pd-genesis
    def _spawn_genesis(self, m: Message, payload: dict[str, Any]) -> list[Action]:
        """pd-genesis was reaped (its last ceremony ended): spawn one for this ceremony,
        under this PD's genesis.spawn capability; the command goes on once the channel
        to it is granted (``held_changed``)."""
        spawn = self.holding("genesis.spawn", "write")
        if spawn is None:
            return self.error(m, "holds no capability on genesis.spawn (needed to run a "
                                 "ceremony)")
        if self._for_genesis:
            return self.error(m, "a ceremony is being set up already")
        self._for_genesis.append((m, payload))
        return [Spawn(spawn.token, f"a ceremony ({payload['op']}) for the operator")]

    def held_changed(self, held: tuple[Any, ...], now: float) -> list[Action]:
        super().held_changed(held, now)
        if self.holding(GENESIS, "grant-reply") is None or not self._for_genesis:
            return []
        queued, self._for_genesis = self._for_genesis, []
        return [a for m, p in queued for a in self.op_forward(m, p, now)]

    def handle(self, m: Message, now: float) -> list[Action]:
        if m.obj == "reply":
            waiting = self._waiting.pop(m.tag, None) if type(m.tag) is int else None
            if waiting is None:
                self.rejected["reply to nothing"] += 1
                return []
            asked = self._genesis_calls.pop(m.tag, None) if type(m.tag) is int else None
            if asked is not None and _not_run(m.payload):
                return self._again(asked, waiting[2], now)
            return [Reply(waiting[0], m.payload)]
        return super().handle(m, now)

    def _again(self, asked: tuple[Message, dict[str, Any]], stale: int,
               now: float) -> list[Action]:
        """The pd-genesis a ceremony command went to was reaped before it ran it (its
        last ceremony had just ended): that capability is gone; spawn one and resend."""
        self.held = [h for h in self.held if h.token.cap_id != stale]
        m, payload = asked
        if payload.get("again"):  # once only
            return self.error(m, "pd-genesis stopped before it answered")
        return self.op_forward(m, {**payload, "again": True}, now)

    def refused(self, r: Refused, now: float) -> list[Action]:
        super().refused(r, now)
        if type(r.action) is Spawn:  # the spawn was refused: the command is told why
            queued, self._for_genesis = self._for_genesis, []
            return [Reply(m.reply, {"ok": False, "error": f"{self.name}: cannot spawn "
                                    f"pd-genesis: {r.reason}"})
                    for m, _ in queued if m.reply is not None]
        if type(r.action) is not Call:
            return []
        waiting = self._waiting.pop(r.action.tag, None)
        if waiting is None:
            return []
        reply, obj, cap_id = waiting
        asked = self._genesis_calls.pop(r.action.tag, None)
        if asked is not None and r.code in ("no-such-cap", "revoked", "not-holder"):
            return self._again(asked, cap_id, now)
        return [Reply(reply, {"ok": False, "error": f"{self.name}: its capability "
                              f"#{cap_id} on {obj} was refused ({r.code}): {r.reason}"})]
