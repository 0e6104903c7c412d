"""pd-genesis: the Genesis ceremony that adds a node to the mesh (one at a time).

Operator commands reach it from pd-network-admin:

* ``{"op": "pair.start", "listen": "IP:PORT", "length": 6-10, "window": S}`` on the new
  node (one waiting to be joined): a fresh code from the CSPRNG, a TCP listener, and the
  answer ``{"code": "7KQ4-M2XD", "ceremony": N, ...}`` -- the only place the code ever
  goes (the operator's own console; never the ledger, a log line or an error);
* ``{"op": "pair.approve", "code": CODE, "peer": "IP:PORT", "window": S}`` on a member:
  the typed code is checked (a mistyped one is refused before any network use), then
  the ceremony runs over a connection to the new node; answered when it ends.

(How the last one ended is the ledger's: ``ppn pair`` reads it there, pd-genesis being
reaped between ceremonies.)

The protocol is :mod:`actors.pds.genesis_proto` (SPAKE2 on the code, both sides'
key confirmation, then sealed frames).  The first connection a listening node accepts
gets the ceremony: one guess, and whatever ends it kills the code (later connections
are closed, and counted).  Each ceremony is ``genesis.opened`` and then one of
``genesis.completed`` (with its transcript's hash), ``genesis.aborted`` (the reason:
``code mismatch``, a protocol error, the connection lost) or ``genesis.expired`` (its
window passed).  On completion the approving node records the new member
(``mesh.member_added``, nodes.jsonl) and the new node records its own membership (its
address) and every member it was told of, in the same batch as the completion;
pd-wireguard then configures the peers the hub rule gives (it follows membership).
At most :data:`PER_HOUR` ceremonies begin in an hour.

The core does no I/O: its adapter (``actors/io/genesis_net.py``; a twin in ``sims/``)
moves the bytes and draws the random ones.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar

from actors.pds.base import (
    Action,
    Append,
    Core,
    IoAnswer,
    IoInput,
    IoResult,
    Message,
    PdView,
    Reap,
    Refused,
    Reply,
    ReplyCap,
    SetTimer,
)
from actors.pds.genesis_io import (
    Accepted,
    CloseConn,
    Closed,
    Connect,
    Entropy,
    Listen,
    Received,
    SendBytes,
    StopListening,
)
from actors.pds.genesis_proto import (
    DEFAULT_LENGTH,
    CeremonyEnded,
    CodeError,
    Completed,
    Offer,
    grouped,
    new_code,
    normalise,
)
from actors.pds.genesis_proto import Ceremony as Protocol
from ledger.catalog import (
    DISPATCH_OBJECTS,
    DispatchGranted,
    GenesisAborted,
    GenesisCompleted,
    GenesisExpired,
    GenesisOpened,
    MemberAdded,
    MemberRemoved,
)
from ledger.commands import EventInvalid, endpoint

PER_HOUR = 10
DEFAULT_WINDOW = 600
MAX_WINDOW = 86_400
ENTROPY_BYTES = 2048  # the code, and both SPAKE2 scalars, with room to spare
MESH = ipaddress.IPv4Network("10.8.0.0/24")


class GenesisCore(Core):
    requests = (Entropy, Listen, StopListening, Connect, SendBytes, CloseConn)
    ops: ClassVar[dict[str, str]] = {**Core.ops, "pair.start": "op_start",
                                     "pair.approve": "op_approve"}

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.genesis: dict[str, Any] = {"next": 1, "open": None, "opened_ns": [], "last": None}
        self.members: dict[str, dict[str, Any]] = {}
        self.removed: dict[str, Any] = {}
        self.proto: Protocol | None = None
        self.number: int | None = None
        self.role: str | None = None
        self.conn: int | None = None
        self.turned_away = 0  # connections closed: one was already in the ceremony
        self._pool = b""
        self._asked: tuple[str, Message, dict[str, Any]] | None = None
        self._steps: dict[int, str] = {}
        self._approver: ReplyCap | None = None
        self._committing: tuple[int, ReplyCap | None] | None = None  # a completion's batch
        self._shown: dict[str, Any] = {}
        self._now = 0.0  # when the step being handled began (the admission's time)
        self._taken: set[str] = set()  # addresses peers use (the ledger checks again)

    # ------------------------------------------------------------------ start
    def start(self, view: PdView, now: float) -> list[Action]:
        actions = super().start(view, now)
        self.genesis = dict(view.owned.get("genesis") or self.genesis)
        self.members = dict(view.owned.get("mesh") or {})
        self.removed = dict(view.removed)
        opened = self.genesis.get("open")
        if opened is not None:  # the node stopped mid-ceremony: that code is dead
            actions.append(Append(GenesisAborted(opened["ceremony"], "the node restarted "
                                                 "during the ceremony")))
            self._closed_in_view(opened["ceremony"], "aborted")
        return actions

    def members_changed(self, members: dict[str, Any], now: float,
                        removed: dict[str, Any] | None = None) -> list[Action]:
        self.members, self.removed = dict(members), dict(removed or {})
        return []

    def _closed_in_view(self, number: int, outcome: str, reason: str | None = None,
                        peer: str | None = None) -> None:
        self.genesis = {**self.genesis, "open": None,
                        "last": {"ceremony": number, "outcome": outcome, "reason": reason,
                                 "peer": peer}}

    # ------------------------------------------------------------------ helpers
    def _draw(self, n: int) -> bytes:
        if len(self._pool) < n:
            raise CeremonyEnded("out of random bytes")
        out, self._pool = self._pool[:n], self._pool[n:]
        return out

    def _busy(self, now: float) -> str | None:
        if self.proto is not None or self._asked is not None or self.genesis.get("open"):
            return "a ceremony is under way (one at a time)"
        recent = [t for t in self.genesis.get("opened_ns", []) if now - t / 1e9 < 3600]
        limit = int(self.genesis.get("per_hour") or PER_HOUR)
        if len(recent) >= limit:
            return (f"{len(recent)} ceremonies began in the last hour (at most {limit}): "
                    "try again later")
        return None

    @staticmethod
    def _window(p: dict[str, Any]) -> int | str:
        window = p.get("window", DEFAULT_WINDOW)
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            return f"window: 1-{MAX_WINDOW} seconds"
        return window

    @staticmethod
    def _address(value: Any, what: str) -> str | tuple[str, int]:
        if type(value) is not str:
            return f"{what}: IP:PORT"
        try:
            host, port = endpoint(value)
        except EventInvalid as exc:
            return f"{what}: {exc}"
        return str(host), int(port)

    def _offer(self) -> Offer:
        node = self.node or {}
        return Offer(str(node.get("name")), bytes(node.get("wg_public_key") or b""),
                     bytes(node.get("signing_key") or b""), str(node.get("endpoint") or ""),
                     str(node.get("role") or "node"))

    # ------------------------------------------------------------------ operations
    def op_start(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        node = self.node or {}
        if node.get("mesh_ip"):
            return self.error(m, f"this node is a member already ({node.get('mesh_ip')}): "
                                 "pairing is for a node waiting to be joined")
        where = self._address(p.get("listen"), "listen")
        if isinstance(where, str):
            return self.error(m, where)
        length = p.get("length", DEFAULT_LENGTH)
        if type(length) is not int or not 6 <= length <= 10:
            return self.error(m, "length: a code has 6-10 symbols")
        window = self._window(p)
        if isinstance(window, str):
            return self.error(m, window)
        busy = self._busy(now)
        if busy is not None:
            return self.error(m, busy)
        self._asked = ("start", m, {"host": where[0], "port": where[1], "length": length,
                                    "window": window})
        return self._entropy()

    def op_approve(self, m: Message, p: dict[str, Any], now: float) -> list[Action]:
        node = self.node or {}
        if not node.get("mesh_ip"):
            return self.error(m, "this node is not a member yet: only a member approves")
        try:
            code = normalise(p.get("code"))  # type: ignore[arg-type]
        except CodeError as exc:
            return self.error(m, str(exc))
        where = self._address(p.get("peer"), "peer")
        if isinstance(where, str):
            return self.error(m, where)
        window = self._window(p)
        if isinstance(window, str):
            return self.error(m, window)
        busy = self._busy(now)
        if busy is not None:
            return self.error(m, busy)
        taken = p.get("taken", [])
        if type(taken) is not list or len(taken) > 256 or not all(type(t) is str
                                                                  for t in taken):
            return self.error(m, "taken: a list of addresses")
        self._taken = set(taken)
        self._asked = ("approve", m, {"code": code, "host": where[0], "port": where[1],
                                      "window": window})
        return self._entropy()

    def _entropy(self) -> list[Action]:
        rid = self.request_id()
        self._steps[rid] = "entropy"
        return [Entropy(rid, ENTROPY_BYTES)]

    def _request(self, step: str, request: Any) -> list[Action]:
        self._steps[request.request_id] = step
        return [request]

    # ------------------------------------------------------------------ answers
    def io(self, answer: IoAnswer, now: float) -> list[Action]:
        step = self._steps.pop(answer.request_id, None)
        ok = isinstance(answer, IoResult) and type(answer.value) is dict
        value: dict[str, Any] = answer.value if ok else {}  # type: ignore[union-attr]
        error = None if ok else str(getattr(answer, "error", "failed"))
        if step == "entropy":
            return self._got_entropy(value, error, now)
        if step == "listen":
            return self._listening(error, now)
        if step == "connect":
            return self._connected(value, error, now)
        if step == "send" and error is not None and self.proto is not None:
            self.proto.fail(f"sending failed: {error}")
            return self._finish(now)
        return []

    def _got_entropy(self, value: dict[str, Any], error: str | None,
                     now: float) -> list[Action]:
        asked, self._asked = self._asked, None
        if asked is None:
            return []
        kind, m, p = asked
        data = value.get("bytes")
        if error is not None or type(data) is not bytes or len(data) < ENTROPY_BYTES:
            return self.error(m, f"no random bytes: {error or 'a short answer'}")
        self._pool, self._committing = data, None
        self.number = int(self.genesis.get("next", 1))
        if kind == "start":
            code = new_code(self._draw, p["length"])
            self.role = "joiner"
            self.proto = Protocol("joiner", code, self._offer(), self._draw)
            self._shown = {"code": grouped(code), "length": p["length"], "window": p["window"],
                           "listen": f"{p['host']}:{p['port']}", "m": m}
            rid = self.request_id()
            return self._request("listen", Listen(rid, p["host"], p["port"]))
        self.role = "approver"
        tombstones = [(n, int(t["at"]), str(t.get("by") or "")) for n, t in
                      sorted(self.removed.items())]
        self.proto = Protocol("approver", p["code"], self._offer(), self._draw, self._assign,
                              tombstones)
        self._approver = m.reply
        self._shown = {"length": len(p["code"]), "window": p["window"],
                       "peer": f"{p['host']}:{p['port']}"}
        rid = self.request_id()
        return self._request("connect", Connect(rid, p["host"], p["port"]))

    def _opened(self, address: str, now: float) -> list[Action]:
        assert self.number is not None and self.role is not None
        window = int(self._shown["window"])
        recent = [*self.genesis.get("opened_ns", []), int(now * 1e9)][-64:]
        self.genesis = {**self.genesis, "open": {"ceremony": self.number, "role": self.role,
                                                 "address": address, "window": window},
                        "next": self.number + 1, "opened_ns": recent}
        return [Append(GenesisOpened(self.number, self.role, address, window,
                                     int(self._shown["length"]))),
                SetTimer(f"window:{self.number}", float(window))]

    def _listening(self, error: str | None, now: float) -> list[Action]:
        shown = self._shown
        m: Message = shown["m"]
        if error is not None:
            self._reset()
            return self.error(m, error)  # the adapter's one line names the address
        actions = self._opened(shown["listen"], now)
        if m.reply is not None:
            actions.append(Reply(m.reply, {"ok": True, "code": shown["code"],
                                           "ceremony": self.number, "window": shown["window"],
                                           "listen": shown["listen"]}))
        shown.pop("code", None)  # shown once, to the operator who asked
        return actions

    def _connected(self, value: dict[str, Any], error: str | None,
                   now: float) -> list[Action]:
        conn = value.get("conn")
        if error is not None or type(conn) is not int or self.proto is None:
            reply, peer = self._approver, self._shown.get("peer")
            self._reset()
            why = error or f"cannot connect to {peer}: no connection"
            return [] if reply is None else [Reply(reply, {"ok": False,
                                                           "error": f"{self.name}: {why}"})]
        self.conn = conn
        return [*self._opened(self._shown["peer"], now), *self._send(self.proto.start())]

    def _send(self, frames: list[bytes]) -> list[Action]:
        if not frames or self.conn is None:
            return []
        # One write for what one step says: no frame waits behind another's ACK.
        return self._request("send", SendBytes(self.request_id(), self.conn, b"".join(frames)))

    # ------------------------------------------------------------------ the wire
    def input(self, event: IoInput, now: float) -> list[Action]:
        self._now = now
        if isinstance(event, Accepted):
            if self.proto is None or self.role != "joiner" or self.conn is not None:
                self.turned_away += 1
                return [CloseConn(self.request_id(), event.conn)]
            self.conn = event.conn
            return []
        if isinstance(event, Received):
            if event.conn != self.conn or self.proto is None:
                return []
            out = self._send(self.proto.receive(event.data))
            return out + self._finish(now) if self.proto.done else out
        if isinstance(event, Closed):
            if event.conn != self.conn or self.proto is None:
                return []
            self.conn = None
            self.proto.fail("the connection closed before the ceremony completed")
            return self._finish(now)
        return super().input(event, now)

    def timer(self, name: str, now: float) -> list[Action]:
        if not name.startswith("window:"):
            return super().timer(name, now)
        if self.proto is None or name != f"window:{self.number}":
            return []
        self.proto.fail("expired")
        return self._finish(now)

    # ------------------------------------------------------------------ the end
    def _assign(self, offer: Offer) -> tuple[str, int, dict[str, Any], list[dict[str, Any]]]:
        """The approving side's decision: the new node's address (the lowest free one),
        this node's record, and the members it learns.  ValueError refuses it."""
        me = self.members.get(str((self.node or {}).get("name")))
        if me is None:
            raise ValueError("this node has no membership record")
        if offer.name in self.members:
            raise ValueError(f"{offer.name} is a member already")
        keys = {k for m in self.members.values() for k in (m["wg_public_key"],
                                                           m["signing_key"])}
        if {offer.wg_key, offer.signing_key} & keys:
            raise ValueError("a key of the new node is a member's")
        used = {m["mesh_ip"] for m in self.members.values()} | self._taken
        free = next((str(h) for h in MESH.hosts() if str(h) not in used), None)
        if free is None:
            raise ValueError("no free address in 10.8.0.0/24")
        records = [self._record(m) for _, m in sorted(self.members.items())]
        return free, int(self._now * 1e9), self._record(me), records

    @staticmethod
    def _record(m: dict[str, Any]) -> dict[str, Any]:
        return {"name": m["name"], "wg_key": m["wg_public_key"],
                "signing_key": m["signing_key"], "mesh_ip": m["mesh_ip"],
                "endpoint": m.get("endpoint") or "", "role": m["role"],
                "joined_ns": int(m.get("joined_ns") or 0),
                "approved_by": m.get("approved_by") or ""}

    def _commit(self, done: Completed) -> list[Any]:
        """The events a completed ceremony records, with its completion, as one batch."""
        assert self.number is not None and self.proto is not None
        peer = str(done.peer["name"])
        me_name = str((self.node or {}).get("name"))
        events: list[Any] = [GenesisCompleted(self.number, peer, done.transcript)]
        if self.role == "approver":
            p = done.peer
            events.append(MemberAdded(peer, p["signing_key"], p["wg_key"], done.mesh_ip,
                                      p["endpoint"] or None, p["role"], done.joined_ns,
                                      me_name))
            # The fleet's authority: this node may dispatch work to the one it admitted.
            events.append(DispatchGranted(me_name, peer, DISPATCH_OBJECTS, done.transcript))
            return events
        me = self._offer()
        events.append(MemberAdded(me.name, me.signing_key, me.wg_key, done.mesh_ip,
                                  me.endpoint or None, me.role, done.joined_ns, peer))
        for m in done.members:
            if m["name"] != me.name and m["name"] not in self.members:
                events.append(MemberAdded(m["name"], m["signing_key"], m["wg_key"],
                                          m["mesh_ip"], m["endpoint"] or None, m["role"],
                                          m["joined_ns"], m["approved_by"] or None))
        for name, at, by in done.removed:  # tombstones: old admissions never come back
            if name not in self.members and name != me.name:
                events.append(MemberRemoved(name, "removed before this node joined", at,
                                            by or peer))
        events.append(DispatchGranted(peer, me.name, DISPATCH_OBJECTS, done.transcript))
        return events

    def _finish(self, now: float) -> list[Action]:
        proto, number = self.proto, self.number
        if proto is None or number is None or not proto.done:
            return []
        actions: list[Action] = []
        if self.conn is not None:
            actions.append(CloseConn(self.request_id(), self.conn))
        if self.role == "joiner":
            actions.append(StopListening(self.request_id()))
        reply, peer = self._approver, proto.peer_name
        if proto.completed is not None:
            # One step's Appends are one batch: the completion and the memberships are
            # recorded together or not at all (then refused() records the abort).
            self._committing = (number, reply)
            mesh_ip = proto.completed.mesh_ip
            actions[:0] = [Append(e) for e in self._commit(proto.completed)]
            self._closed_in_view(number, "completed", peer=peer)
            answer: dict[str, Any] = {"ok": True, "ceremony": number, "peer": peer,
                                      "mesh_ip": mesh_ip}
        else:
            why = str(proto.ended)
            event: Any = (GenesisExpired(number) if why == "expired"
                          else GenesisAborted(number, why[:300]))
            actions.insert(0, Append(event))
            self._closed_in_view(number, "expired" if why == "expired" else "aborted",
                                 None if why == "expired" else why[:300], peer)
            answer = {"ok": False, "error": f"{self.name}: the ceremony ended: {why}"}
        self._reset()
        if reply is not None:
            actions.append(Reply(reply, answer))
        # Its work is over: its capabilities go (recorded), its actor stops; the next
        # ceremony runs in a pd-genesis spawned for it, with fresh ones.
        actions.append(Reap(f"ceremony {number} ended"))
        return actions

    def _reset(self) -> None:
        self.proto, self.conn, self._approver, self._pool = None, None, None, b""
        self.role = None
        self._shown = {}

    def refused(self, r: Refused, now: float) -> list[Action]:
        super().refused(r, now)
        committing, self._committing = self._committing, None
        if (type(r.action) is not Append or committing is None
                or type(r.action.event) is not GenesisCompleted):
            return []
        number, reply = committing
        why = f"the ceremony completed but could not be recorded: {r.reason}"[:300]
        self._closed_in_view(number, "aborted", why)
        out: list[Action] = [Append(GenesisAborted(number, why))]
        if reply is not None:
            out.append(Reply(reply, {"ok": False, "error": f"{self.name}: {why}"}))
        return [*out, Reap(f"ceremony {number} ended")]

    def status(self) -> dict[str, Any]:
        return {**super().status(), "ceremony": None if self.proto is None
                else self.proto.state, "turned_away": self.turned_away}
