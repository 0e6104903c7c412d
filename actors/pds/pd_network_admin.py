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

from collections import OrderedDict
from typing import Any, ClassVar

from actors.pds.base import Action, Call, Core, Message, Refused, Reply, ReplyCap

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
       for op in ("start", "approve", "status")},
    "vm.pool": ("vm.query", "vm.pool"),
}
"""Operator command -> (the object it needs a capability on, the op sent there)."""

MAX_WAITING = 1024  # operator commands in flight; the oldest is forgotten past this


class NetworkAdminCore(Core):
    ops: ClassVar[dict[str, str]] = {**Core.ops, **{cmd: "op_forward" for cmd in FORWARDS}}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._waiting: OrderedDict[int, tuple[ReplyCap, str, int]] = OrderedDict()
        self._next_tag = 0

    def op_forward(self, m: Message, payload: dict[str, Any], now: float) -> list[Action]:
        if m.reply is None:
            return []
        if m.badge is not None:  # a PD's channel, not the operator
            return self.error(m, "operator commands come from the operator only")
        obj, op = FORWARDS[payload["op"]]
        held = self.holding(obj, "grant-reply") or self.holding(obj, "grant")
        if held is None:
            return self.error(m, f"holds no capability on {obj} (needed for "
                                 f"{payload['op']})")
        self._next_tag += 1
        self._waiting[self._next_tag] = (m.reply, obj, held.token.cap_id)
        actions: list[Action] = []
        while len(self._waiting) > MAX_WAITING:  # the oldest is told, not left to time out
            _, (evicted, _, _) = self._waiting.popitem(last=False)
            actions.append(Reply(evicted, {"ok": False, "error": f"{self.name}: too many "
                                           "commands in flight; this one was given up"}))
        args = {k: v for k, v in payload.items() if k != "op"}
        return [*actions, Call(held.token, {**args, "op": op}, tag=self._next_tag)]

    def handle(self, m: Message, now: float) -> list[Action]:
        if m.obj == "reply":
            waiting = self._waiting.pop(m.tag, None) if type(m.tag) is int else None
            if waiting is None:
                self.rejected["reply to nothing"] += 1
                return []
            return [Reply(waiting[0], m.payload)]
        return super().handle(m, now)

    def refused(self, r: Refused, now: float) -> list[Action]:
        super().refused(r, now)
        if type(r.action) is not Call:
            return []
        waiting = self._waiting.pop(r.action.tag, None)
        if waiting is None:
            return []
        reply, obj, cap_id = waiting
        return [Reply(reply, {"ok": False, "error": f"{self.name}: its capability "
                              f"#{cap_id} on {obj} was refused ({r.code}): {r.reason}"})]
