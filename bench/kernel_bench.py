#!/usr/bin/env python3
"""Kernel benchmark: messages and round trips through the capability kernel, the cost of
copying payloads by value, revocation of a large subtree, checked journalling, and the idle
memory of ``ppn node run``.

Every figure is printed beside a baseline measured in the same run: raw pykka ``tell`` and
``ask`` between plain actors (which pass references), a single durable append, an
unchecked append, and bare Python processes.  Nothing here asserts a timing: it prints
figures and the goals they are meant to meet.  See bench/README.md for what each figure
means.

    .venv/bin/python bench/kernel_bench.py [--quick] [--messages N] [--round-trips N]
    .venv/bin/python bench/kernel_bench.py --profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import importlib.metadata
import io
import json
import logging
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import pykka
import structlog
from ledger_bench import clear_flags, cpu_ticks, load, print_table

from actors import wire
from actors.engine import Cell
from actors.host import _Mailbox
from actors.kernel import Delivery, Kernel
from actors.logs import configure_logging
from actors.pds.base import Action, Append, Call, Core, Message, Reply, Send
from actors.runtime import Node
from actors.system import JOURNAL_OBJECT
from ledger import caps, commands
from ledger.caps import CapRefused, Token
from ledger.catalog import CapGranted, MemberAdded, MemberRemoved, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.state import State, apply

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

TELL_GOAL = 0.7  # kernel messages/s as a share of raw pykka tell
ASK_GOAL = 0.8  # kernel round trips/s as a share of raw pykka ask().get()
PHASE2_IDLE_MB = 48  # the seed's resource targets, RAM idle
PHASE1_IDLE_MB = 400
COPY_SIZES = (64, 1024, 65536)  # part 3: bytes of data in the payload
COPY_BUDGET = 512 << 20  # part 3: at most this many payload bytes queued in a tell run
COPY_ROUNDS = 3  # part 3: at least this many rounds, even with --quick (its runs are short)
SUBTREE = 10_000  # descendants revoked at once
FANOUT = 100  # the subtree: 100 children of the revoked cap, each with 99 children
QUEUED_CAPS = 8  # descendants messages are queued under while the receiver is blocked
QUEUED_EACH = 250
KEPT_MESSAGES = 100  # queued under the revoked cap itself, which revoke keeps
DURABLE_SAMPLES = 21  # single durable appends, median taken
JOURNAL_PD = "pd-network-admin"  # journals family "mesh" (system.toml)
SETTLE = 3.0  # seconds a process idles before its memory is read

# Payloads are plain data, copied by value (actors/wire.py): a receiver sees its own copy,
# so every receiver -- kernel core or raw actor -- recognises them by their "op".
MSG: dict[str, Any] = {"op": "bench", "n": 0}
QUEUED: dict[str, Any] = {"op": "queued"}
KEPT: dict[str, Any] = {"op": "kept"}
PING: dict[str, Any] = {"op": "ping"}
NOP: dict[str, Any] = {"op": "nop"}
RAW_PONG: dict[str, Any] = {"op": "pong", "badge": None, "from": "raw"}
PROFILE_ON: dict[str, Any] = {"op": "profile-on"}
PROFILE_OFF: dict[str, Any] = {"op": "profile-off"}


def sized(op: str, size: int) -> dict[str, Any]:
    """A payload carrying ``size`` bytes of data (part 3)."""
    return {"op": op, "data": b"x" * size}


# --------------------------------------------------------------------------- shared counters
class Tally:
    """Counts arrivals in a receiver's thread; notes the time of the ``target``-th."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0  # the receiving thread's CPU time
        self.done = threading.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == 1:
            self.cpu_first = time.thread_time()
        if self.count == self.target:
            self.last = time.perf_counter()
            self.cpu_last = time.thread_time()
            self.done.set()

    def wait(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise RuntimeError(f"only {self.count:,} of {self.target:,} arrived in {timeout:g} s")


@dataclass
class Shared:
    """What the bench's cores share with the bench: tallies, a gate, profilers."""

    tally: Tally = field(default_factory=Tally)
    arrived: Counter[str] = field(default_factory=Counter)  # part 4, by payload kind
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    profiles: dict[str, cProfile.Profile] = field(default_factory=dict)


# --------------------------------------------------------------------------- the PD core
def member_event(e: dict[str, Any]) -> MemberAdded | MemberRemoved:
    """A mesh event from its plain-data description (what travels in a message)."""
    if e["kind"] == "add":
        return MemberAdded(e["name"], e["signing_key"], e["wg_public_key"], e["mesh_ip"],
                           e["endpoint"], e["role"])
    return MemberRemoved(e["name"], e["reason"])


class BenchCore(Core):
    """The stock core plus what the bench needs; ping still gets the stock pong.

    Tokens are not plain data, so a message names a cap by id and the core presents its
    own token for it (``self.held``, from its ``PdView``: the channel caps of system.toml).

    * ``{"op": "bench"}``: counted (the receiver of parts 1 and 3), nothing returned;
    * a reply (a pong or an echo coming back): counted, and the next call is made until the
      tally is full (the PD-to-PD loop of parts 2 and 3);
    * ``{"op": "echo"}``: answered with the payload itself (part 3's call/reply);
    * ``{"op": "burst", "n", "cap"}``: return ``n`` Send actions (part 1, sender in a PD);
    * ``{"op": "calls", "cap", "size"}``: start the call loop under that cap;
    * ``{"op": "block"}``: wait on the gate (part 4's blocked receiver);
    * ``{"op": "queued"}`` / ``{"op": "kept"}``: counted by kind (part 4);
    * ``{"op": "journal", "events"}``: return one Append per mesh event (part 5);
    * ``{"op": "nop"}``: nothing (part 5's round trip without a journal);
    * ``PROFILE_ON`` / ``PROFILE_OFF``: cProfile this PD's thread (``--profile``).
    """

    def __init__(self, name: str, shared: Shared) -> None:
        super().__init__(name)
        self.shared = shared
        self.calls_under: Token | None = None
        self.call_payload: dict[str, Any] = PING

    def token(self, cap_id: Any) -> Token:
        for h in self.held:
            if h.token.cap_id == cap_id:
                return h.token
        raise LookupError(f"{self.name} holds no cap #{cap_id}")

    def handle(self, m: Message, now: float) -> list[Action]:
        p, sh = m.payload, self.shared
        op = p.get("op") if type(p) is dict else None
        if op == "bench":
            sh.tally.hit()
            return []
        if m.obj == "reply":
            sh.tally.hit()
            if sh.tally.count < sh.tally.target and self.calls_under is not None:
                return [Call(self.calls_under, self.call_payload)]
            return []
        if op == "echo":
            return [] if m.reply is None else [Reply(m.reply, p)]
        if op == "queued" or op == "kept":
            sh.arrived[op] += 1
            return []
        if op == "burst":
            return [Send(self.token(p["cap"]), MSG)] * p["n"]
        if op == "calls":
            self.calls_under = self.token(p["cap"])
            size = p.get("size")
            self.call_payload = PING if size is None else sized("echo", size)
            return [Call(self.calls_under, self.call_payload)]
        if op == "block":
            sh.entered.set()
            sh.gate.wait(120)
            return []
        if op == "journal":
            return [Append(member_event(e)) for e in p["events"]]
        if op == "nop":
            return []
        if op == "profile-on":
            sh.profiles[self.name] = prof = cProfile.Profile()
            prof.enable()
            return []
        if op == "profile-off":
            sh.profiles[self.name].disable()
            return []
        return super().handle(m, now)


# --------------------------------------------------------------------------- raw pykka
class RawActor(pykka.ThreadingActor):
    """A plain pykka actor doing what BenchCore does, with no kernel, no host and no copy:
    pykka hands the receiver the sender's own object."""

    use_daemon_thread = True

    def __init__(self, tally: Tally, peer: pykka.ActorRef[Any] | None = None) -> None:
        super().__init__()
        self.tally, self.peer = tally, peer
        self.payload: Any = PING

    def on_receive(self, message: Any) -> Any:
        if type(message) is tuple:  # (payload, reply_to): tell ping-pong, answer with a tell
            message[1].tell(RAW_PONG)
            return None
        op = message.get("op")
        if op == "bench":
            self.tally.hit()
        elif op == "ping":  # ask: the answer goes back through pykka's future
            return RAW_PONG
        elif op == "echo":
            return message
        elif op == "pong":  # tell ping-pong: the answer came back
            self.tally.hit()
            if self.tally.count < self.tally.target and self.peer is not None:
                self.peer.tell((PING, self.actor_ref))
        elif op == "burst":
            tell = message["to"].tell
            for _ in range(message["n"]):
                tell(MSG)
        elif op == "calls":
            assert self.peer is not None
            self.peer.tell((PING, self.actor_ref))
        return None


@contextlib.contextmanager
def raw_actors(*tallies: Tally) -> Iterator[list[pykka.ActorRef[Any]]]:
    refs: list[pykka.ActorRef[Any]] = []
    try:
        for t in tallies:
            refs.append(RawActor.start(t))
        yield refs
    finally:
        for r in refs:
            with contextlib.suppress(pykka.ActorDeadError):
                r.stop()


# --------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Run:
    """``n`` items between the first send and the last receipt."""

    n: int
    wall: float  # first send -> last receipt
    sent: float  # first send -> the sender's loop returned
    cpu: float  # this process's CPU time over the run (all threads)
    sender_cpu: float = 0.0  # the bench thread's CPU time in ``start``
    receiver_cpu: float = 0.0  # the counting thread's, first arrival to last

    @property
    def rate(self) -> float:
        return self.n / self.wall


def timed(n: int, tally: Tally, start: Callable[[], None], timeout: float = 600.0) -> Run:
    """Reset ``tally`` to ``n``, call ``start`` (which sends), wait for the ``n``-th arrival."""
    tally.reset(n)
    cpu0, own0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    start()
    sent = time.perf_counter() - t0
    own = time.thread_time() - own0
    tally.wait(timeout)
    return Run(n, tally.last - t0, sent, time.process_time() - cpu0, own,
               tally.cpu_last - tally.cpu_first)


def sequential(n: int, one: Callable[[], object]) -> Run:
    """``n`` calls of ``one`` in the bench thread, one after the other."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        one()
    wall = time.perf_counter() - t0
    return Run(n, wall, wall, time.process_time() - cpu0)


def rounds(repeat: int, figures: dict[str, Callable[[], Run]],
           spread: list[str]) -> dict[str, Run]:
    """Each figure once per round, ``repeat`` rounds, the fastest run of each kept: a slow
    spell of the machine costs every figure one sample, not all of one figure's.  Every
    run's rate is noted in ``spread``."""
    runs: dict[str, list[Run]] = {name: [] for name in figures}
    for _ in range(repeat):
        for name, fn in figures.items():
            runs[name].append(fn())
    spread.extend(f"{name} " + " / ".join(fmt(r.rate) for r in rs) for name, rs in runs.items())
    return {name: min(rs, key=lambda r: r.wall) for name, rs in runs.items()}


def per_call_us(k: int, fn: Callable[[], object], repeat: int = 3) -> float:
    """Microseconds per call of ``fn`` in this thread, best of ``repeat`` loops of ``k``."""
    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k * 1e6
    return min(once() for _ in range(repeat))


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def size_name(n: int) -> str:
    return f"{n >> 10} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def verdict(ratio: float, goal: float) -> str:
    return f"{'meets' if ratio >= goal else 'misses'} the goal (>= {goal:.2f})"


def code_version() -> str:
    """The commit measured, and whether actors/ or ledger/ differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "actors", "ledger"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    if len(head) > 100:
        head = head[:97] + "..."
    return head + (" + uncommitted changes in actors/ or ledger/" if dirty else "")


def ppn_command() -> list[str]:
    """The installed ``ppn`` entry point beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "ppn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "actors.cli"]


def ppn(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ppn_command(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def node_init(state_dir: Path, name: str) -> None:
    out = ppn("node", "init", "--state-dir", str(state_dir), "--name", name)
    if out.returncode != 0:
        raise RuntimeError(f"ppn node init failed: {out.stderr.strip()}")


def log_like_the_node(logfile: TextIO) -> None:
    """The node's own logging set-up (INFO, JSON lines), written to a file, not the screen."""
    configure_logging()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=logfile))
    logging.basicConfig(level=logging.WARNING, stream=logfile, force=True)


def cap_of(node: Node, holder: str, obj: str, *, original: bool = False) -> Token:
    """The token of ``holder``'s first cap on ``obj`` (its original one if ``original``):
    what the bench presents when it acts as that holder."""
    state = node.kernel.state
    for c in sorted(state.caps.values(), key=lambda c: c.cap_id):
        if c.holder == holder and c.obj == obj and (c.parent is None) == original:
            return caps.token_for(c)
    raise LookupError(f"{holder} holds no {'original ' if original else ''}cap on {obj}")


def token_of(node: Node, cap_id: int) -> Token:
    """The token of cap ``cap_id``, to act as its holder."""
    return caps.token_for(node.kernel.state.caps[cap_id])


def as_self(node: Node, pd: str, payload: Any) -> None:
    """Send ``payload`` to ``pd`` under its own endpoint cap, through its own port."""
    node.kernel.port(pd).send(cap_of(node, pd, f"endpoint:{pd}", original=True), payload)


def sync(node: Node, pd: str, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until ``pd`` has handled everything queued before this call."""
    status = node.host.core_status(pd, timeout=timeout)
    if status is None:
        raise RuntimeError(f"{pd} did not answer a status query within {timeout:g} s")
    return status


def describe(node: Node, token: Token) -> str:
    cap = node.kernel.state.caps[token.cap_id]
    return f"#{cap.cap_id} ({cap.obj}, {','.join(cap.rights)}, badge {cap.badge})"


# --------------------------------------------------------------------------- part 1
SENDER, RECEIVER = "pd-fleet", "pd-wireguard"  # parts 1 and 3: system.toml's channel
CALLER, CALLEE = "pd-fleet", "pd-vmm"  # parts 2 and 3: system.toml's channel


def part_messages(node: Node, sh: Shared, n: int, repeat: int) -> None:
    print(f"\n== 1. One-way messages between two PDs: {n:,} messages of "
          f"{len(wire.encode(MSG))} encoded bytes, the receiver counts (best of {repeat} "
          "interleaved rounds) ==")
    token = cap_of(node, SENDER, f"endpoint:{RECEIVER}")
    print(f"   kernel: {SENDER} -> {RECEIVER} under {describe(node, token)}, system.toml's "
          "channel cap; every payload is encoded at send and decoded for the receiver, whose "
          "PD runs the real host (kernel.accept, core.handle, actions) with a counting core")
    port = node.kernel.port(SENDER)

    def kernel_main() -> None:
        send = port.send
        for _ in range(n):
            send(token, MSG)

    def kernel_in_pd() -> None:
        as_self(node, SENDER, {"op": "burst", "n": n, "cap": token.cap_id})

    spread: list[str] = []
    raw_tally = Tally()
    with raw_actors(raw_tally, Tally()) as (rx, tx):
        def raw_main() -> None:
            tell = rx.tell
            for _ in range(n):
                tell(MSG)

        def raw_in_actor() -> None:
            tx.tell({"op": "burst", "n": n, "to": rx})

        got = rounds(repeat, {
            "kernel/bench thread": lambda: timed(n, sh.tally, kernel_main),
            "raw/bench thread": lambda: timed(n, raw_tally, raw_main),
            "kernel/PD": lambda: timed(n, sh.tally, kernel_in_pd),
            "raw/actor": lambda: timed(n, raw_tally, raw_in_actor)}, spread)
    k_main, r_main = got["kernel/bench thread"], got["raw/bench thread"]
    k_pd, r_actor = got["kernel/PD"], got["raw/actor"]

    def us(seconds: float, k: int) -> str:
        return f"{seconds / k * 1e6:.2f}"

    rows = []
    for what, k, r, own in (("the bench thread: Port.send / ref.tell", k_main, r_main, True),
                            ("a PD's handler: core returns Send actions / on_receive "
                             "tells", k_pd, r_actor, False)):
        rows.append([what, fmt(k.rate), fmt(r.rate), f"{k.rate / r.rate:.2f}",
                     f"{us(k.sender_cpu, n)} / {us(r.sender_cpu, n)}" if own else "-",
                     f"{us(k.receiver_cpu, n)} / {us(r.receiver_cpu, n)}",
                     f"{us(k.cpu, n)} / {us(r.cpu, n)}",
                     f"{k.sent:.2f} / {r.sent:.2f}", f"{k.wall:.2f} / {r.wall:.2f}"])
    print_table(["sender", "kernel msgs/s", "raw tell msgs/s", "ratio",
                 "sender CPU us/msg (k / raw)", "receiver CPU us/msg", "process CPU us/msg",
                 "send loop s", "last receipt s"], rows)
    if repeat > 1:
        print(f"   every run, msgs/s: {'; '.join(spread)}")
    ratio = k_main.rate / r_main.rate
    print(f"   kernel vs raw tell: {ratio:.2f} -> {verdict(ratio, TELL_GOAL)} "
          f"(first row; the second row's ratio is {k_pd.rate / r_actor.rate:.2f})")


# --------------------------------------------------------------------------- part 2
def part_round_trips(node: Node, sh: Shared, n: int, repeat: int) -> None:
    print(f"\n== 2. Sequential request/reply round trips: {n:,} (best of {repeat} interleaved "
          "rounds) ==")
    token = cap_of(node, CALLER, f"endpoint:{CALLEE}")
    print(f"   kernel: {CALLER} calls {CALLEE} under {describe(node, token)}, system.toml's "
          f"channel cap; {CALLEE}'s core answers with the stock Core's pong (both the call "
          "and the answer are copied by value)")

    def pd_loop() -> None:
        as_self(node, CALLER, {"op": "calls", "cap": token.cap_id})

    operator = node.operator

    def operator_call() -> None:
        answered = threading.Event()
        operator.call(token.cap_id, PING, lambda _answer: answered.set())
        if not answered.wait(10):
            raise RuntimeError("no pong within 10 s")

    m = max(1, n // 10)
    spread: list[str] = []
    loop_tally = Tally()
    with raw_actors(Tally(), Tally()) as (server, callee_ref):
        client = RawActor.start(loop_tally, callee_ref)
        try:
            def raw_ask() -> None:
                server.ask(PING, block=False).get(timeout=10)

            got = rounds(repeat, {
                "kernel PD->PD": lambda: timed(n, sh.tally, pd_loop),
                "raw ask": lambda: sequential(n, raw_ask),
                "OperatorPort.call": lambda: sequential(n, operator_call),
                "raw ping-pong": lambda: timed(n, loop_tally,
                                               lambda: client.tell({"op": "calls"})),
                "Node.ping": lambda: sequential(m, lambda: node.ping(cap_id=token.cap_id))},
                spread)
        finally:
            client.stop()
    k_pd, k_op, k_ping = got["kernel PD->PD"], got["OperatorPort.call"], got["Node.ping"]
    r_ask, r_loop = got["raw ask"], got["raw ping-pong"]

    rows = [
        ["PD -> PD: Call, stock pong Reply, reply routed to the caller PD", fmt(k_pd.rate),
         fmt(r_ask.rate), f"{k_pd.rate / r_ask.rate:.2f}", fmt(r_loop.rate),
         f"{k_pd.rate / r_loop.rate:.2f}"],
        ["bench thread: OperatorPort.call(cap, on_reply=...) + Event.wait", fmt(k_op.rate),
         fmt(r_ask.rate), f"{k_op.rate / r_ask.rate:.2f}", "", ""],
        [f"bench thread: Node.ping(cap) ({m:,} of them)", fmt(k_ping.rate), fmt(r_ask.rate),
         f"{k_ping.rate / r_ask.rate:.2f}", "", ""],
    ]
    print_table(["kernel path", "kernel trips/s", "raw ask().get() trips/s", "ratio",
                 "raw tell ping-pong trips/s", "ratio"], rows)
    if repeat > 1:
        print(f"   every run, trips/s: {'; '.join(spread)}")
    ratio = k_pd.rate / r_ask.rate
    print(f"   kernel PD->PD vs raw ask().get(): {ratio:.2f} -> {verdict(ratio, ASK_GOAL)}; "
          f"bench-thread call vs ask: {k_op.rate / r_ask.rate:.2f}")
    print(f"   CPU s per run: PD->PD {k_pd.cpu:.2f}, OperatorPort.call {k_op.cpu:.2f}, "
          f"raw ask {r_ask.cpu:.2f}, raw tell ping-pong {r_loop.cpu:.2f}")


# --------------------------------------------------------------------------- part 3
def copy_count(n: int) -> int:
    """Messages of every part-3 tell run: ``n``, but at most COPY_BUDGET bytes of the largest
    payload (a sender ahead of its receiver queues one copy per message, where raw pykka
    queues references to one object); the same count at every size, so that the rates
    compare (a short run is also a run with fewer thread hand-offs)."""
    return min(n, COPY_BUDGET // max(COPY_SIZES))


@dataclass
class CopyRow:
    size: int
    encoded: int
    encode_us: float
    decode_us: float
    k_tell: Run
    r_tell: Run
    k_call: Run
    r_ask: Run


def part_copy(node: Node, sh: Shared, n: int, trips: int, repeat: int) -> None:
    count = copy_count(n)
    print(f"\n== 3. The cost of the copy: payloads {{'op', 'data': bytes}} of "
          f"{', '.join(size_name(s) for s in COPY_SIZES)}; {count:,} messages and {trips:,} "
          f"round trips at each size (best of {repeat} interleaved rounds) ==")
    send_tok = cap_of(node, SENDER, f"endpoint:{RECEIVER}")
    call_tok = cap_of(node, CALLER, f"endpoint:{CALLEE}")
    print(f"   kernel tell: the bench thread's Port.send as {SENDER} -> {RECEIVER} "
          f"({describe(node, send_tok)}), the receiver counts; kernel call/reply: {CALLER}'s "
          f"core calls {CALLEE} ({describe(node, call_tok)}), whose core answers with the "
          "payload it got (an echo: one copy each way); raw: the same payload object told / "
          "asked to a plain pykka actor, which gets (and, asked, returns) the sender's reference")
    port = node.kernel.port(SENDER)
    spread: list[str] = []

    def one_size(size: int, rx: pykka.ActorRef[Any], raw_tally: Tally,
                 server: pykka.ActorRef[Any]) -> CopyRow:
        tell_payload, echo = sized("bench", size), sized("echo", size)
        data = wire.encode(tell_payload)
        k = max(200, min(20_000, (8 << 20) // size))
        encode_us = per_call_us(k, functools.partial(wire.encode, tell_payload))
        decode_us = per_call_us(k, functools.partial(wire.decode, data))

        def k_main() -> None:
            send = port.send
            for _ in range(count):
                send(send_tok, tell_payload)

        def r_main() -> None:
            tell = rx.tell
            for _ in range(count):
                tell(tell_payload)

        def k_loop() -> None:
            as_self(node, CALLER, {"op": "calls", "cap": call_tok.cap_id, "size": size})

        def r_one() -> None:
            server.ask(echo, block=False).get(timeout=10)

        name = size_name(size)
        got = rounds(repeat, {
            f"kernel tell {name}": lambda: timed(count, sh.tally, k_main),
            f"raw tell {name}": lambda: timed(count, raw_tally, r_main),
            f"kernel call {name}": lambda: timed(trips, sh.tally, k_loop),
            f"raw ask {name}": lambda: sequential(trips, r_one)}, spread)
        gc.collect()
        return CopyRow(size, len(data), encode_us, decode_us, got[f"kernel tell {name}"],
                       got[f"raw tell {name}"], got[f"kernel call {name}"],
                       got[f"raw ask {name}"])

    raw_tally = Tally()
    with raw_actors(Tally(), raw_tally) as (server, rx):
        rows = [one_size(size, rx, raw_tally, server) for size in COPY_SIZES]

    def cpu(r: Run) -> str:
        return f"{r.sender_cpu / r.n * 1e6:.2f} / {r.receiver_cpu / r.n * 1e6:.2f}"

    print_table(["data", "encoded", "one copy: encode + decode us", "kernel tell msgs/s",
                 "raw tell msgs/s", "ratio", "tell CPU us/msg, sender / receiver: kernel",
                 "raw", "kernel call/reply trips/s", "raw ask trips/s", "ratio"],
                [[size_name(r.size), f"{r.encoded:,} B",
                  f"{r.encode_us:.2f} + {r.decode_us:.2f}", fmt(r.k_tell.rate),
                  fmt(r.r_tell.rate), f"{r.k_tell.rate / r.r_tell.rate:.2f}", cpu(r.k_tell),
                  cpu(r.r_tell), fmt(r.k_call.rate), fmt(r.r_ask.rate),
                  f"{r.k_call.rate / r.r_ask.rate:.2f}"] for r in rows])
    if repeat > 1:
        print(f"   every run: {'; '.join(spread)}")
    base = rows[0]

    def extra(r: Run, b: Run) -> str:
        return f"{(r.wall / r.n - b.wall / b.n) * 1e6:+.2f} us"

    for r in rows[1:]:
        print(f"   {size_name(r.size)} over {size_name(base.size)}, per item: kernel tell "
              f"{extra(r.k_tell, base.k_tell)} (one copy: {r.encode_us + r.decode_us:.2f} us in "
              f"one thread), raw tell {extra(r.r_tell, base.r_tell)}; kernel call/reply "
              f"{extra(r.k_call, base.k_call)} (two copies: "
              f"{2 * (r.encode_us + r.decode_us):.2f} us), raw ask {extra(r.r_ask, base.r_ask)}")


# --------------------------------------------------------------------------- part 4
def build_subtree(node: Node, root: int, holders: Sequence[str]) -> list[int]:
    """SUBTREE descendants of cap ``root``, appended as CapGranted events in one batch.

    Bypasses the kernel (setup speed): FANOUT children of ``root`` with write,grant, each
    with FANOUT - 1 write-only children, held in turn by ``holders``.
    """
    state = node.ledger.state
    parent = state.caps[root]
    next_id = state.next_cap_id
    events: list[CapGranted] = []
    for i in range(FANOUT):
        mid = next_id
        next_id += 1
        events.append(CapGranted(mid, holders[i % len(holders)], parent.obj,
                                 ("write", "grant"), parent.badge, root, "mint"))
        for j in range(FANOUT - 1):
            events.append(CapGranted(next_id, holders[(i + j + 1) % len(holders)], parent.obj,
                                     ("write",), parent.badge, mid, "copy"))
            next_id += 1
    assert len(events) == SUBTREE
    node.ledger.append_many(events)
    return [e.cap_id for e in events]


@dataclass
class RevokeRun:
    setup: float
    command: float  # caps.revoke alone: counting the descendants, making the event
    fold: float  # apply(CapRevoked) alone, on a copy of the state
    revoke: float
    revoked: int
    records: int  # ledger records the revoke added
    queued: int
    arrived: int
    kept_sent: int
    kept_arrived: int
    dropped: int
    drain: float  # unblock -> every queued message handled (dropped or delivered)
    caps_left: int


def revoke_once(node: Node, sh: Shared, root: Token, receiver: str) -> RevokeRun:
    kernel, ledger = node.kernel, node.ledger
    holders = ("pd-fleet", "pd-network-admin")
    t0 = time.perf_counter()
    ids = build_subtree(node, root.cap_id, holders)
    setup = time.perf_counter() - t0
    caps_before = len(ledger.state.caps)

    sh.gate.clear()
    sh.entered.clear()
    sh.arrived.clear()
    as_self(node, receiver, {"op": "block"})
    if not sh.entered.wait(10):
        raise RuntimeError(f"{receiver} did not block")
    step = len(ids) // QUEUED_CAPS
    chosen = [ids[0], *(ids[i * step + step // 2] for i in range(1, QUEUED_CAPS))]
    queued = 0
    for cap_id in chosen:
        token = token_of(node, cap_id)
        port = kernel.port(token.holder)
        for _ in range(QUEUED_EACH):
            port.send(token, QUEUED)
            queued += 1
    root_port = kernel.port(root.holder)
    for _ in range(KEPT_MESSAGES):
        root_port.send(root, KEPT)
    dropped0, size0 = kernel.dropped, ledger.size

    c0 = time.perf_counter()
    event = caps.revoke(ledger.state, root.holder, root)
    command = time.perf_counter() - c0
    scratch = ledger.state.copy()
    f0 = time.perf_counter()
    apply(scratch, event, scratch.seq + 1, 0)
    fold = time.perf_counter() - f0
    del scratch
    r0 = time.perf_counter()
    revoked = root_port.revoke(root)
    revoke = time.perf_counter() - r0
    assert event.descendants == revoked
    records = ledger.size - size0

    d0 = time.perf_counter()
    sh.gate.set()
    sync(node, receiver)
    drain = time.perf_counter() - d0
    return RevokeRun(setup, command, fold, revoke, revoked, records, queued, sh.arrived["queued"],
                     KEPT_MESSAGES, sh.arrived["kept"], kernel.dropped - dropped0, drain,
                     caps_before - len(ledger.state.caps))


def durable_baselines(node: Node, scratch: Path, keys: NodeKeys, k: int) -> dict[str, float]:
    """Median seconds of single durable appends: through the kernel, and on a bare ledger."""
    source = cap_of(node, CALLER, f"endpoint:{CALLEE}")
    port = node.kernel.port(CALLER)
    mints, deletes, plain = [], [], []
    for _ in range(k):
        t0 = time.perf_counter()
        leaf = port.mint(source, ("write",))
        mints.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        port.delete(leaf)
        deletes.append(time.perf_counter() - t0)
    options = Options(set_append_only_flag=False, snapshot_every=1 << 62)
    with Ledger.create(scratch, keys, "bench.ppn.example/scratch", options=options) as led:
        for i in range(k):
            t0 = time.perf_counter()
            led.append(PdDeclared(f"pd-scratch-{i}", 1))
            plain.append(time.perf_counter() - t0)
    return {"mint": statistics.median(mints), "delete": statistics.median(deletes),
            "plain": statistics.median(plain)}


def part_revoke(node: Node, sh: Shared, root_dir: Path, repeat: int) -> None:
    print(f"\n== 4. Revoke a {SUBTREE:,}-cap subtree with {QUEUED_CAPS * QUEUED_EACH:,} "
          f"messages queued under it at a blocked receiver ({repeat} run(s)) ==")
    receiver = CALLEE
    endpoint = cap_of(node, receiver, f"endpoint:{receiver}", original=True)
    root_id = node.mint(endpoint.cap_id, ["write", "grant"], "pd-fleet", badge=6)
    root = token_of(node, root_id)
    print(f"   revoked cap: #{root_id} (pd-fleet, endpoint:{receiver}, write,grant, badge 6, "
          f"minted by the operator port from #{endpoint.cap_id}); subtree: {FANOUT} children x "
          f"{FANOUT - 1} grandchildren, held alternately by pd-fleet and pd-network-admin, set "
          "up with ledger.append_many of CapGranted events (not through the kernel)")
    print(f"   queued: {QUEUED_EACH} messages under each of {QUEUED_CAPS} descendants "
          f"(through the holder's Port.send) + {KEPT_MESSAGES} under #{root_id} itself "
          f"(revoke keeps it), while {receiver}'s handler waits on a gate")
    runs = [revoke_once(node, sh, root, receiver) for _ in range(repeat)]
    base = durable_baselines(node, root_dir / "scratch-ledger", NodeKeys.generate(),
                             DURABLE_SAMPLES)

    rows = []
    for i, r in enumerate(runs, 1):
        rows.append([str(i), ms(r.revoke), ms(r.command), ms(r.fold), f"{r.revoked:,}",
                     str(r.records), f"{r.caps_left:,}", f"{r.arrived} of {r.queued:,}",
                     f"+{r.dropped:,}", f"{r.kept_arrived} of {r.kept_sent}",
                     f"{r.drain:.3f} s ({fmt(r.queued / r.drain)}/s)", f"{r.setup:.2f} s"])
    print_table(["run", "kernel.revoke", "caps.revoke alone", "fold alone", "descendants",
                 "ledger records", "caps gone", "queued that reached the core",
                 "kernel.dropped", "kept-cap msgs arrived", "drain after unblock",
                 "setup (append_many)"], rows)
    med = statistics.median(r.revoke for r in runs)
    print(f"   baseline, single durable appends (median of {DURABLE_SAMPLES}): kernel.delete of "
          f"a leaf cap {ms(base['delete'])}, kernel.mint of a leaf cap (signed) "
          f"{ms(base['mint'])}, ledger.append(PdDeclared) on a bare ledger {ms(base['plain'])}")
    print(f"   revoke of {SUBTREE:,} (median {ms(med)}) = {med / base['delete']:.1f}x one "
          f"kernel.delete, {med / base['plain']:.1f}x one bare append")
    ok = all(r.arrived == 0 and r.dropped == r.queued and r.kept_arrived == r.kept_sent
             and r.records == 1 and r.revoked == SUBTREE for r in runs)
    print(f"   every run: one record, {SUBTREE:,} descendants, 0 queued messages reached the "
          f"core, dropped rose by the number queued, kept-cap messages arrived: "
          f"{'yes' if ok else 'NO (see the table)'}")


# --------------------------------------------------------------------------- part 5
class NoAppend:
    """Stands in for the ledger under a second Kernel: ``journal_as`` runs every check
    against ``state`` (the cap, the family, the command) and appends nothing."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.batches = 0

    def append_many(self, events: Sequence[object]) -> list[object]:
        self.batches += 1
        return []


def peer_events(signing_key: bytes, wg_key: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid MemberAdded and the MemberRemoved that undoes it (as plain data), so that
    the pair can be journalled again and again."""
    add = {"kind": "add", "name": "bench-peer", "signing_key": signing_key,
           "wg_public_key": wg_key, "mesh_ip": "10.8.0.200", "endpoint": "192.0.2.7:51820",
           "role": "node"}
    return add, {"kind": "remove", "name": "bench-peer", "reason": "bench"}


def with_more_caps(state: State, extra: int) -> State:
    """A copy of ``state`` with ``extra`` more caps (write-only children of pd-fleet's first
    cap), folded in directly: a large capability table, nothing appended anywhere."""
    scratch = state.copy()
    parent = next(c for c in sorted(scratch.caps.values(), key=lambda c: c.cap_id)
                  if c.holder == "pd-fleet" and c.parent is not None)
    first = scratch.next_cap_id
    for i in range(extra):
        apply(scratch, CapGranted(first + i, "pd-fleet", parent.obj, ("write",), parent.badge,
                                  parent.cap_id, "copy"), scratch.seq + 1, 0, b"\0" * 64)
    return scratch


def refusal_us(kernel: Kernel, pd: str, events: list[object], k: int) -> tuple[float, str]:
    """Microseconds per refused ``journal_as`` (counted and logged, as on the node)."""
    codes: Counter[str] = Counter()

    def once() -> None:
        try:
            kernel.journal_as(pd, events)
        except CapRefused as exc:
            codes[exc.code] += 1
    us = per_call_us(k, once)
    return us, ", ".join(sorted(codes)) or "NOT refused"


def part_journal(node: Node, k: int) -> None:
    samples = DURABLE_SAMPLES
    print(f"\n== 5. Journalling under the check: {JOURNAL_PD} journals family 'mesh' "
          f"(MemberAdded, then the MemberRemoved that undoes it; median of {samples} each) ==")
    kernel, ledger = node.kernel, node.ledger
    add, remove = peer_events(os.urandom(32), os.urandom(32))
    add_ev = member_event(add)
    journal_cap = next(c for c in kernel.state.caps.values()
                       if c.holder == JOURNAL_PD and c.obj == JOURNAL_OBJECT)
    print(f"   {JOURNAL_PD} journals under cap #{journal_cap.cap_id} ({JOURNAL_OBJECT}, "
          f"{','.join(journal_cap.rights)}); each row is one durable append (record + signed "
          "checkpoint fsynced)")

    def durable(one: Callable[[dict[str, Any]], None]) -> tuple[float, float, int]:
        adds: list[float] = []
        removes: list[float] = []
        size0 = ledger.size
        for _ in range(samples):
            for e, out in ((add, adds), (remove, removes)):
                t0 = time.perf_counter()
                one(e)
                out.append(time.perf_counter() - t0)
        return statistics.median(adds), statistics.median(removes), ledger.size - size0

    def through_core(e: dict[str, Any]) -> None:
        as_self(node, JOURNAL_PD, {"op": "journal", "events": [e]})
        sync(node, JOURNAL_PD)

    def checked(e: dict[str, Any]) -> None:
        kernel.journal_as(JOURNAL_PD, [member_event(e)])

    def unchecked(e: dict[str, Any]) -> None:
        ledger.append(member_event(e))

    refused0 = sum(kernel.refused.values())
    rows, medians = [], []
    for name, one in (
            (f"through {JOURNAL_PD}'s core: an Append action -> engine -> "
             "kernel.journal_as (+ a message and a status round trip)", through_core),
            ("kernel.journal_as(pd, [event]) from the bench thread", checked),
            ("baseline: ledger.append(event), unchecked (no cap, family or command)",
             unchecked)):
        a, r, records = durable(one)
        medians.append(a)
        rows.append([name, ms(a), ms(r), f"{records} of {2 * samples}"])
    trips = []
    for _ in range(samples):
        t0 = time.perf_counter()
        as_self(node, JOURNAL_PD, NOP)
        sync(node, JOURNAL_PD)
        trips.append(time.perf_counter() - t0)
    trip = statistics.median(trips)
    rows.append([f"context: the same message + status round trip to {JOURNAL_PD}, "
                 "nothing journalled", ms(trip), "", ""])
    print_table(["journalling path", "MemberAdded", "MemberRemoved", "records appended"], rows)
    refused = sum(kernel.refused.values()) - refused0
    print(f"   kernel refusals during these rows: {refused} (0 expected)")

    # The check alone: a second kernel over the same state whose ledger appends nothing.
    small = kernel.state
    big = with_more_caps(small, SUBTREE)
    checks = []
    for label, state in ((f"{len(small.caps)} caps", small), (f"{len(big.caps):,} caps", big)):
        stub = NoAppend(state)
        dry = Kernel(cast(Ledger, stub))
        ok_us = per_call_us(k, functools.partial(dry.journal_as, JOURNAL_PD, [add_ev]))
        cmd_us = per_call_us(k, functools.partial(commands.check, state, add_ev))
        no_cap = refusal_us(dry, "pd-fleet", [add_ev], k)
        family = refusal_us(dry, JOURNAL_PD, [CapGranted(
            state.next_cap_id, JOURNAL_PD, JOURNAL_OBJECT, ("write",), 7, journal_cap.cap_id,
            "mint")], k)
        node_name = (state.node or {}).get("name", "?")
        existing = refusal_us(dry, JOURNAL_PD, [MemberAdded(
            node_name, add["signing_key"], add["wg_public_key"], "10.8.0.201", None, "node")], k)
        checks.append((label, cmd_us, ok_us, no_cap, family, existing, stub.batches))
    rows = []
    for label, cmd_us, ok_us, no_cap, family, existing, batches in checks:
        rows.append([label, f"{cmd_us:.2f}", f"{ok_us:.2f}", f"{no_cap[0]:.2f} ({no_cap[1]})",
                     f"{family[0]:.2f} ({family[1]})", f"{existing[0]:.2f} ({existing[1]})",
                     f"{batches:,}"])
    print(f"   the check alone, us per call (best of 3 x {k:,}; a kernel over the same state "
          "whose ledger appends nothing; a refusal is counted and logged at INFO as on the "
          "node):")
    print_table(["state", "commands.check(MemberAdded)", "journal_as, accepted",
                 "refused: pd-fleet has no journal cap", "refused: CapGranted (not its family)",
                 "refused: MemberAdded of a member (command)", "batches it would append"], rows)
    accepted = checks[0][2]
    print(f"   the check's share of a checked durable append: {accepted:.1f} us of "
          f"{ms(medians[1])} ({accepted / 1e6 / medians[1]:.2%}); kernel.journal_as vs "
          f"the unchecked ledger.append: {ms(medians[1] - medians[2])} (noise of an fsync "
          "shows here: compare with the us figures above)")


# --------------------------------------------------------------------------- part 6
@dataclass
class Memory:
    rss: int  # bytes
    hwm: int
    pss: int | None
    anon: int
    threads: int


def read_memory(pid: int) -> Memory:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()

    def kib(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0]) * 1024

    pss: int | None = None
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return Memory(kib("VmRSS"), kib("VmHWM"), pss, kib("RssAnon"), int(fields["Threads"]))


def mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def third_party_modules() -> list[str]:
    """Every non-stdlib module the node's code loads (the packages it imports, in full)."""
    probe = ("import json, sys, actors.cli, actors.runtime\n"
             "own = {'actors', 'ledger', '__main__'}\n"
             "mods = [m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names\n"
             "        and m.split('.')[0] not in own and not m.startswith('_')\n"
             "        and getattr(sys.modules[m], '__spec__', None) is not None]\n"
             "print(json.dumps(sorted(mods)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=REPO)
    mods: list[str] = json.loads(out.stdout)
    return mods


def importer(mods: Sequence[str]) -> list[str]:
    """argv of a Python that imports ``mods``, says ready, and sleeps."""
    code = ("import importlib, time\n"
            f"for m in {list(mods)!r}:\n"
            "    importlib.import_module(m)\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    return [sys.executable, "-c", code]


def idle_process(argv: list[str], ready: str | None) -> Memory:
    """Start ``argv``, wait for its ``ready`` line (if any), idle SETTLE s, read its memory."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != ready:
                raise RuntimeError(f"{argv[:3]}...: expected {ready!r}, got {line!r}")
        time.sleep(SETTLE)
        return read_memory(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def part_memory(root: Path) -> None:
    print(f"\n== 6. Idle memory: `ppn node run` with all seven PDs, read after {SETTLE:g} s "
          "idle ==")
    state_dir = root / "idle-node"
    node_init(state_dir, "bench-idle")
    log_path = root / "idle-node.log"
    cmd = [*ppn_command(), "node", "run", "--state-dir", str(state_dir)]
    with open(log_path, "w") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, cwd=REPO)
        try:
            status = wait_for_status(state_dir, proc)
            up = time.perf_counter() - t0
            time.sleep(SETTLE)
            node_mem = read_memory(proc.pid)
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                measured = f.read().replace(b"\0", b" ").decode().strip()
            # The first `ppn net links` makes pd-net-driver's adapter load pyroute2.
            links = ppn("net", "links", "--state-dir", str(state_dir))
            time.sleep(SETTLE)
            used_mem = read_memory(proc.pid)
        finally:
            s0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            stop = time.perf_counter() - s0
    alive = sorted(pd for pd, v in status["pds"].items() if v["alive"])
    print(f"   measured: pid {proc.pid} `{measured}`; control socket answered `ppn node "
          f"status` {up:.2f} s after start; {len(alive)} PDs alive ({', '.join(alive)})")

    mods = third_party_modules()
    tops = sorted({m.split(".")[0] for m in mods})
    bare = idle_process([sys.executable, "-c", "import time; time.sleep(60)"], None)
    third = idle_process(importer(mods), "ready")
    alone = {top: idle_process(importer([m for m in mods if m.split(".")[0] == top]), "ready")
             for top in tops}
    own = idle_process([sys.executable, "-c", "import time, actors.cli, actors.runtime; "
                        "print('ready', flush=True); time.sleep(60)"], "ready")
    rows = [[f"ppn node run (7 PDs, {node_mem.threads} threads)", mb(node_mem.rss),
             mb(node_mem.hwm), mb(node_mem.pss), mb(node_mem.anon)],
            ["  the same node after one `ppn net links` " + (
                f"({len(links.stdout.splitlines())} links read)" if links.returncode == 0
                else f"(FAILED: {(links.stderr.strip() or '?')[:60]})"),
             mb(used_mem.rss), mb(used_mem.hwm), mb(used_mem.pss), mb(used_mem.anon)]]
    for name, m in ((f"python -c 'time.sleep' (bare, {bare.threads} thread)", bare),
                    (f"python importing {', '.join(tops)} ({len(mods)} modules)", third),
                    ("python importing actors.cli + actors.runtime (not running)", own)):
        rows.append([name, mb(m.rss), mb(m.hwm), mb(m.pss), mb(m.anon)])
    print_table(["process", "VmRSS", "VmHWM", "PSS", "RssAnon"], rows)
    print("   each package imported alone, VmRSS over bare Python: " + ", ".join(
        f"{top} +{mb(m.rss - bare.rss)}" for top, m in alone.items()))
    print(f"   targets (the seed's RAM idle, whole node): Phase 2 {PHASE2_IDLE_MB} MB goal -> "
          f"node VmRSS is {node_mem.rss / 1e6 / PHASE2_IDLE_MB:.2f}x of it (after `ppn net "
          f"links`: {used_mem.rss / 1e6 / PHASE2_IDLE_MB:.2f}x); Phase 1 "
          f"~{PHASE1_IDLE_MB} MB -> {node_mem.rss / 1e6 / PHASE1_IDLE_MB:.2f}x")
    print(f"   on top of bare Python: {mb(node_mem.rss - bare.rss)}; on top of the same "
          f"imports: {mb(node_mem.rss - own.rss)} (running: ledger, kernel, actors, socket)")
    ok = "exit 0 (clean)" if code == 0 else f"exit {code} (NOT clean; see {log_path})"
    print(f"   SIGTERM -> {ok} in {stop:.2f} s")
    if code != 0:
        print(log_path.read_text()[-2000:])


def wait_for_status(state_dir: Path, proc: subprocess.Popen[bytes],
                    timeout: float = 30.0) -> dict[str, Any]:
    """Poll `ppn node status --json` until the control socket answers."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ppn node run exited with {proc.returncode} before answering")
        out = ppn("node", "status", "--state-dir", str(state_dir), "--json")
        if out.returncode == 0:
            status: dict[str, Any] = json.loads(out.stdout)
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the control socket: {out.stderr.strip()}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- profile
def print_profile(title: str, prof: cProfile.Profile, top: int = 15) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"\n-- {title} --")
    print(out.getvalue().strip())


def part_profile(node: Node, sh: Shared, n: int, trips: int) -> None:
    """cProfile each thread of the kernel paths of parts 1 and 2 (the bench thread and the
    PD threads, each profiled in its own thread)."""
    token = cap_of(node, SENDER, f"endpoint:{RECEIVER}")
    port = node.kernel.port(SENDER)
    as_self(node, RECEIVER, PROFILE_ON)
    sync(node, RECEIVER)
    main = cProfile.Profile()

    def send_all() -> None:
        main.enable()
        for _ in range(n):
            port.send(token, MSG)
        main.disable()

    run = timed(n, sh.tally, send_all)
    as_self(node, RECEIVER, PROFILE_OFF)
    sync(node, RECEIVER)
    print(f"\n== profile: part 1, bench thread -> {RECEIVER}, {n:,} messages, "
          f"{run.rate:,.0f} msgs/s under cProfile ==")
    print_profile("sender: the bench thread (Port.send -> kernel.send -> wire.encode -> "
                  "host.route -> mailbox)", main)
    print_profile(f"receiver: {RECEIVER}'s actor thread", sh.profiles[RECEIVER])

    call_tok = cap_of(node, CALLER, f"endpoint:{CALLEE}")
    for pd in (CALLER, CALLEE):
        as_self(node, pd, PROFILE_ON)
        sync(node, pd)
    run = timed(trips, sh.tally,
                lambda: as_self(node, CALLER, {"op": "calls", "cap": call_tok.cap_id}))
    for pd in (CALLER, CALLEE):
        as_self(node, pd, PROFILE_OFF)
        sync(node, pd)
    print(f"\n== profile: part 2, {CALLER} calls {CALLEE}, {trips:,} round trips, "
          f"{run.rate:,.0f}/s under cProfile ==")
    print_profile(f"caller: {CALLER}'s actor thread", sh.profiles[CALLER])
    print_profile(f"callee: {CALLEE}'s actor thread", sh.profiles[CALLEE])


def stage_costs(node: Node, k: int, repeat: int = 3) -> None:
    """Per-message cost of each stage of part 1's two paths, run in one thread.

    The sink is a RawActor that is never started (its inbox only fills and is then
    drained); the receiving side of the kernel path is the engine's ``deliver`` on a cell
    of its own (a BenchCore no actor runs), called directly as the PD's thread would.
    Each stage runs ``k`` times, best of ``repeat``, with the garbage collector paused (a
    filling queue otherwise makes collections grow with it).
    """
    kernel, host = node.kernel, node.host
    engine = host.engine
    token = cap_of(node, SENDER, f"endpoint:{RECEIVER}")
    port = kernel.port(SENDER)
    captured: list[Delivery] = []
    try:
        kernel.set_route(lambda _t, dl: captured.append(dl))
        port.send(token, MSG)
    finally:
        kernel.set_route(host.route)
    d = captured[0]
    data = d.data
    sink = RawActor(Tally())
    sink.tally.reset(1 << 62)
    sink_ref, inbox = sink.actor_ref, sink.actor_inbox
    mailbox = _Mailbox(sink_ref)
    mailbox.scheduled = True  # a burst in progress: post is a lock and a deque append
    own = Shared()
    own.tally.reset(1 << 62)
    cell = Cell(RECEIVER, core=BenchCore(RECEIVER, own))
    state = kernel.state

    def once(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k * 1e6

    def per_msg(fn: Callable[[], object]) -> float:
        return min(once(fn) for _ in range(repeat))

    def tell_then_get(send: Callable[[], object]) -> tuple[float, float]:
        """(send, inbox.get) us/msg: fill the sink's inbox, then drain it."""
        pairs = [(once(send), once(inbox.get)) for _ in range(repeat)]
        return min(p[0] for p in pairs), min(p[1] for p in pairs)

    def post_then_clear() -> float:
        us = once(lambda: mailbox.post(d))
        mailbox.queue.clear()
        return us

    gc.collect()
    gc.disable()
    try:
        raw_tell, raw_get = tell_then_get(lambda: sink_ref.tell(MSG))
        raw_rx = per_msg(lambda: sink._handle_receive(MSG))
        try:
            kernel.set_route(lambda _t, _d: None)
            k_checks = per_msg(lambda: port.send(token, MSG))
        finally:
            kernel.set_route(host.route)
        encode = per_msg(lambda: wire.encode(MSG))
        check = per_msg(lambda: caps.check(state, SENDER, token, "write"))
        make = per_msg(lambda: Delivery(d.target, d.obj, d.badge, data, d.cap_id, None, None,
                                        None, d.seal))
        post = min(post_then_clear() for _ in range(repeat))
        k_rx = per_msg(lambda: engine.deliver(cell, d))
        accept = per_msg(lambda: kernel.accept(d))
        decode = per_msg(lambda: wire.decode(data))
    finally:
        gc.enable()
    rows = [
        ("raw: ref.tell(msg) (Envelope + queue.put)", raw_tell),
        ("raw: inbox.get()", raw_get),
        ("raw: actor._handle_receive(msg) (pykka dispatch + on_receive)", raw_rx),
        ("kernel: Port.send with a no-op route (checks, encode, Delivery)", k_checks),
        ("kernel:   of which wire.encode(msg)", encode),
        ("kernel:   of which caps.check (the slow path's check; the fast path inlines it)",
         check),
        ("kernel:   of which Delivery(...) (a NamedTuple)", make),
        ("kernel: host.route's mailbox.post (burst in progress: lock + deque append)", post),
        ("kernel: engine.deliver(cell, delivery) (accept, decode, core.handle, actions)", k_rx),
        ("kernel:   of which kernel.accept (seal, cap and status check, decode)", accept),
        ("kernel:     of which wire.decode(data)", decode),
    ]
    print(f"\n== single-thread cost per message of each stage of part 1 ({k:,} each, best of "
          f"{repeat}, GC paused) ==")
    print_table(["stage", "us/msg"], [[name, f"{v:.2f}"] for name, v in rows])
    raw = raw_tell + raw_get + raw_rx
    kern = k_checks + post + k_rx
    print(f"   sums: raw {raw:.2f} us/msg (-> {1e6 / raw:,.0f} msgs/s if the two threads "
          f"never overlapped); kernel {kern:.2f} us/msg (-> {1e6 / kern:,.0f}; one pykka "
          f"tell + get + dispatch per burst, not per message, is left out); ratio "
          f"{raw / kern:.2f}; the copy (encode + decode) is {encode + decode:.2f} of it")


# --------------------------------------------------------------------------- main
@contextlib.contextmanager
def running_node(root: Path, sh: Shared) -> Iterator[Node]:
    state_dir = root / "node"
    node_init(state_dir, "bench-kernel")
    node = Node(state_dir, make_core=lambda pd: BenchCore(pd, sh), adapters=lambda: {},
                serve_control=False).start()
    try:
        yield node
    finally:
        sh.gate.set()
        node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="50,000 messages, 5,000 round trips, one run each")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages in parts 1 and 3 (default 200,000; --quick: 50,000)")
    ap.add_argument("--round-trips", type=int, default=None,
                    help="round trips in parts 2 and 3 (default 20,000; --quick: 5,000)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of each measurement, the fastest kept (default 3; --quick: 1)")
    ap.add_argument("--profile", action="store_true",
                    help="print per-stage costs and cProfile tops of parts 1 and 2 instead")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    n = args.messages or (50_000 if args.quick else 200_000)
    trips = args.round_trips or (5_000 if args.quick else 20_000)
    repeat = max(1, args.repeat or (1 if args.quick else 3))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kernel-bench-", dir=OUT_DIR))
    print(f"kernel bench: Python {platform.python_version()}, pykka "
          f"{importlib.metadata.version('pykka')}, msgpack "
          f"{importlib.metadata.version('msgpack')}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, GIL switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms")
    code = code_version()
    print(f"code: {code}")
    print(f"work dir: {root}; node logs (INFO, JSON, as `ppn node run` logs) go to "
          f"{root / 'bench.log'}; load average at start: {load()}")
    print(f"goals: kernel tell >= {TELL_GOAL}x raw pykka tell, call/reply >= {ASK_GOAL}x raw "
          f"ask().get(), idle VmRSS of `ppn node run` <= {PHASE2_IDLE_MB} MB")
    steal0, total0 = cpu_ticks()
    sh = Shared()
    try:
        with open(root / "bench.log", "w") as logfile:
            log_like_the_node(logfile)
            with running_node(root, sh) as node:
                if args.profile:
                    stage_costs(node, 100_000)
                    part_profile(node, sh, n, trips)
                else:
                    part_messages(node, sh, n, repeat)
                    part_round_trips(node, sh, trips, repeat)
                    part_copy(node, sh, n, trips, max(repeat, COPY_ROUNDS))
                    part_revoke(node, sh, root, repeat)
                    part_journal(node, 2_000 if args.quick else 10_000)
        if not args.profile:
            part_memory(root)
        steal1, total1 = cpu_ticks()
        steal = (steal1 - steal0) / max(1, total1 - total0)
        if code_version() != code:
            print(f"\nNOTE: the code changed during the run (now: {code_version()}); parts "
                  "that started processes may have measured the new code")
        print(f"\nload average at end: {load()}; CPU time stolen by the hypervisor during the "
              f"run: {steal:.1%} (other processes share this machine)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            clear_flags(root)
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
