#!/usr/bin/env python3
"""Ledger benchmark: durable group-commit appends, replay, verify and open.

Every ledger figure is printed beside a SQLite baseline measured in the same run on
the same filesystem.  Nothing here asserts a timing: it prints figures and the goals
they are meant to meet.  See bench/README.md for what each figure means.

    .venv/bin/python bench/ledger_bench.py [--events N] [--quick] [--seconds S] [--repeat R]
    .venv/bin/python bench/ledger_bench.py --profile [--events N]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack

from ledger import audit
from ledger import scan as ledger_scan
from ledger.catalog import REGISTRY, RIGHTS, ROLES, CapGranted, MemberAdded, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.records import MAX_SEGMENT_BYTES
from ledger.scan import LogReader, list_segments
from ledger.seal import clear_append_only
from ledger.state import State, apply, apply_items

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
ORIGIN = "bench.ppn.example/ledger"
THREAD_COUNTS = (1, 8, 64)
BUILD_BATCH = 1_000
REPLAY_GOAL = 300_000
VERIFY_GOAL = 150_000

# Event mix, in percent of appended events; the rest are PdDeclared.
SIGNED_PCT = 1.0  # CapGranted: carries pd-ledger's Ed25519 signature
MEMBER_PCT = 5.0  # MemberAdded: each batch holding one rewrites nodes.jsonl
MEMBER_POOL = 64  # distinct mesh members (keeps nodes.jsonl at a realistic size)
PD_POOL = 4_096  # distinct protection-domain names
PD_KINDS = ("net-driver", "blk-driver", "wg-tunnel", "timer", "serial", "console",
            "vmm", "pd-ledger", "crypto", "router")
CAP_OBJECTS = ("endpoint", "notification", "frame", "untyped", "irq", "cnode")
CAP_VIA = ("system", "mint", "copy", "transfer")

# No append-only inode flag (it would stop us deleting the temp dir), and no automatic
# snapshot on close (part 2 measures opening with and without one explicitly).
BENCH_OPTIONS = Options(set_append_only_flag=False, snapshot_every=1 << 62)


# --------------------------------------------------------------------------- events
class EventMix:
    """Deterministic stream of realistic events: ~94% PdDeclared, 5% MemberAdded, 1% CapGranted."""

    def __init__(self, seed: int, *, member_pct: float = MEMBER_PCT,
                 signed_pct: float = SIGNED_PCT) -> None:
        self._rng = random.Random(seed)
        self._member_pct = member_pct
        self._signed_pct = signed_pct
        self._next_cap = seed * 10_000_000 + 1
        rng = self._rng
        self._members = [(rng.randbytes(32), rng.randbytes(32)) for _ in range(MEMBER_POOL)]

    def _pd_name(self) -> str:
        n = self._rng.randrange(PD_POOL)
        return f"{PD_KINDS[n % len(PD_KINDS)]}-{n:04d}"

    def next(self) -> object:
        rng = self._rng
        roll = rng.random() * 100.0
        if roll < self._signed_pct:
            cap_id = self._next_cap
            self._next_cap += 1
            k = rng.randrange(1, len(RIGHTS) + 1)
            return CapGranted(
                cap_id=cap_id, holder=self._pd_name(),
                obj=f"{rng.choice(CAP_OBJECTS)}:{self._pd_name()}",
                rights=tuple(RIGHTS[:k]),
                badge=rng.randrange(1 << 20) if rng.random() < 0.5 else None,
                parent=cap_id - rng.randrange(1, 50) if rng.random() < 0.7 else None,
                via=rng.choice(CAP_VIA))
        if roll < self._signed_pct + self._member_pct:
            j = rng.randrange(MEMBER_POOL)
            signing, wg = self._members[j]
            endpoint = f"198.51.100.{j + 1}:51820" if j % 4 else None
            return MemberAdded(name=f"node-{j:03d}", signing_key=signing, wg_public_key=wg,
                               mesh_ip=f"10.8.{j // 250}.{j % 250 + 1}", endpoint=endpoint,
                               role=ROLES[j % len(ROLES)])
        return PdDeclared(name=self._pd_name(), priority=rng.randrange(256))

    def take(self, n: int) -> list[object]:
        return [self.next() for _ in range(n)]


# --------------------------------------------------------------------------- helpers
def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = " | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """Autocommit connection (we issue BEGIN/COMMIT), WAL, synchronous=FULL."""
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=60000")
    return con


def sqlite_create(path: Path) -> sqlite3.Connection:
    con = sqlite_connect(path)
    con.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    return con


def sqlite_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def committed_batches(directory: Path) -> list[list[bytes]]:
    """The batches group commit formed, from checkpoint positions, as encoded events.

    ``LogReader.result.notes`` maps each checkpoint's tree size to its location; two
    consecutive sizes bound one batch.  The genesis batch (size 1) is left out.  The
    events are re-encoded with ``REGISTRY.encode`` (the same bytes the records hold).
    """
    reader = LogReader(directory)
    encoded = [REGISTRY.encode(e.event) for e in reader.entries()]
    return [encoded[a:b] for a, b in pairwise(sorted(reader.result.notes))]


def clear_flags(root: Path) -> None:
    """Undo any append-only inode flag so the temp dir can be removed."""
    for seg in root.rglob("seg-*.log"):
        clear_append_only(seg)


@dataclass(frozen=True)
class Timing:
    """``n`` items in ``wall`` seconds, using ``cpu`` seconds of this process's CPU."""

    n: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.n / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.n / self.cpu if self.cpu > 0 else float("nan")


def measure(fn: Callable[[], int]) -> Timing:
    """Time ``fn``, which returns how many items it handled."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return Timing(n, time.perf_counter() - wall, time.process_time() - cpu)


def best(repeat: int, fn: Callable[[], int]) -> Timing:
    """The fastest of ``repeat`` runs (other processes only ever slow a run down)."""
    return min((measure(fn) for _ in range(repeat)), key=lambda t: t.wall)


def interleaved(rounds: int, figures: dict[str, Callable[[], int]]) -> dict[str, Timing]:
    """Each figure's fastest of ``rounds`` rounds, every round measuring each once, in order."""
    out: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, fn in figures.items():
            t = measure(fn)
            if name not in out or t.wall < out[name].wall:
                out[name] = t
    return out


# --------------------------------------------------------------------------- part 1
@dataclass
class AppendRun:
    threads: int
    appends: int
    seconds: float
    batches: list[list[bytes]]

    @property
    def rate(self) -> float:
        return self.appends / self.seconds

    @property
    def mean_batch(self) -> float:
        return statistics.fmean(len(b) for b in self.batches) if self.batches else 0.0

    @property
    def max_batch(self) -> int:
        return max((len(b) for b in self.batches), default=0)


def run_threads(threads: int, seconds: float,
                work: Callable[[int, float], int]) -> tuple[int, float]:
    """Start ``threads`` workers together; each runs ``work(index, deadline)`` -> count."""
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def body(i: int) -> None:
        barrier.wait()
        try:
            counts[i] = work(i, deadline[0])
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def bench_appends(directory: Path, keys: NodeKeys, threads: int, seconds: float,
                  member_pct: float) -> AppendRun:
    """``threads`` threads call ledger.append(event) until the deadline."""
    ledger = Ledger.create(directory, keys, ORIGIN, options=BENCH_OPTIONS)
    pools = [EventMix(1000 + i, member_pct=member_pct).take(4_096) for i in range(threads)]
    before = ledger.batches

    def work(i: int, deadline: float) -> int:
        events, n, append, now = pools[i], 0, ledger.append, time.perf_counter
        size = len(events)
        while now() < deadline:
            append(events[n % size])
            n += 1
        return n

    try:
        appends, elapsed = run_threads(threads, seconds, work)
        counted = ledger.batches - before
    finally:
        ledger.close()
    batches = committed_batches(directory)
    got = sum(len(b) for b in batches)
    if got != appends or len(batches) != counted:
        print(f"  warning: the log holds {got} events in {len(batches)} batches; the "
              f"appenders counted {appends} in {counted} batches", file=sys.stderr)
    return AppendRun(threads, appends, elapsed, batches)


def sqlite_same_batches(path: Path, batches: Sequence[Sequence[bytes]]) -> Timing:
    """Commit exactly these batches in order, one transaction each, from one thread."""
    con = sqlite_create(path)

    def run() -> int:
        seq = 0
        for batch in batches:
            con.execute("BEGIN")
            con.executemany("INSERT INTO t (seq, body) VALUES (?, ?)",
                            zip(range(seq, seq + len(batch)), batch, strict=True))
            con.execute("COMMIT")
            seq += len(batch)
        return seq

    try:
        return measure(run)
    finally:
        con.close()


def sqlite_per_thread(path: Path, threads: int, seconds: float,
                      bodies: Sequence[bytes]) -> tuple[float, int]:
    """Rows/s with ``threads`` connections each committing single-row transactions."""
    sqlite_create(path).close()
    cons = [sqlite_connect(path) for _ in range(threads)]
    retries = [0] * threads

    def work(i: int, deadline: float) -> int:
        con, n, size, now = cons[i], 0, len(bodies), time.perf_counter
        while now() < deadline:
            try:
                con.execute("INSERT INTO t (body) VALUES (?)", (bodies[(i + n) % size],))
            except sqlite3.OperationalError:  # busy despite busy_timeout: retry
                retries[i] += 1
                continue
            n += 1
        return n

    try:
        rows, elapsed = run_threads(threads, seconds, work)
    finally:
        for con in cons:
            con.close()
    return rows / elapsed, sum(retries)


def append_figures(root: Path, keys: NodeKeys, threads: int, seconds: float, repeat: int,
                   member_pct: float) -> tuple[AppendRun, float, float, int]:
    """Best ledger run of ``repeat``; SQLite on its batches; SQLite per-thread transactions."""
    tag = f"{threads}-m{member_pct:g}"
    runs = [bench_appends(root / f"append-{tag}-{r}", keys, threads, seconds, member_pct)
            for r in range(repeat)]
    run = max(runs, key=lambda r: r.rate)
    same = min((sqlite_same_batches(root / f"same-{tag}-{r}.db", run.batches)
                for r in range(repeat)), key=lambda t: t.wall)
    bodies = [b for batch in run.batches for b in batch]
    per_thread = [sqlite_per_thread(root / f"pt-{tag}-{r}.db", threads, seconds, bodies)
                  for r in range(repeat)]
    pt_rate, retries = max(per_thread)
    return run, same.rate, pt_rate, retries


class _Wait:
    __slots__ = ("done", "wake")

    def __init__(self) -> None:
        self.done = False
        self.wake = threading.Lock()
        self.wake.acquire()


class FloorLog:
    """Group commit with nothing but the disk: the floor under any Python-thread design.

    The shape of ``Ledger.append`` -- the first appender to find no commit in flight
    leads; the others queue and sleep on their own lock; the leader takes the queue,
    writes 100 bytes per append into preallocated space, fdatasyncs, wakes its batch
    and hands over to the next queued appender -- with no encoding, hashing, signing
    or folding.  What threads and fsyncs cost here, the ledger cannot avoid.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.posix_fallocate(self._fd, 0, 64 << 20)
        self._offset = 0
        self._lock = threading.Lock()
        self._queue: deque[_Wait] = deque()
        self._leading = False
        self.batches = 0

    def append(self) -> None:
        me = _Wait()
        with self._lock:
            self._queue.append(me)
            lead = not self._leading
            self._leading = True
        if not lead:
            me.wake.acquire()
        if not me.done:
            self._lead(me)

    def _lead(self, me: _Wait) -> None:
        with self._lock:
            batch = list(self._queue)
            self._queue.clear()
        size = 100 * len(batch)
        os.pwrite(self._fd, b"r" * size, self._offset)
        self._offset = (self._offset + size) % (60 << 20)
        os.fdatasync(self._fd)
        self.batches += 1
        with self._lock:
            for w in batch:
                w.done = True
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._leading = False
        for w in batch:
            if w is not me:
                w.wake.release()
        if successor is not None:
            successor.wake.release()

    def close(self) -> None:
        os.close(self._fd)


def floor_rate(path: Path, threads: int, seconds: float) -> tuple[float, float]:
    """(appends/s, mean batch) of FloorLog with ``threads`` appenders."""
    flog = FloorLog(path)

    def work(i: int, deadline: float) -> int:
        n, append, now = 0, flog.append, time.perf_counter
        while now() < deadline:
            append()
            n += 1
        return n

    try:
        appends, elapsed = run_threads(threads, seconds, work)
    finally:
        flog.close()
        path.unlink()
    return appends / elapsed, appends / max(1, flog.batches)


def part_appends(root: Path, keys: NodeKeys, seconds: float, repeat: int) -> None:
    print(f"\n== 1. Durable appends: each thread calls ledger.append(event) for {seconds:g} s "
          f"(best of {repeat}) ==")
    print(f"   mix: ~{100 - SIGNED_PCT - MEMBER_PCT:g}% PdDeclared, {MEMBER_PCT:g}% MemberAdded "
          f"(of {MEMBER_POOL} members), {SIGNED_PCT:g}% signed CapGranted")
    rows = []
    for threads in THREAD_COUNTS:
        run, same, per_thread, retries = append_figures(root, keys, threads, seconds, repeat,
                                                        MEMBER_PCT)
        note = f" ({retries} busy retries)" if retries else ""
        rows.append([str(threads), fmt_rate(run.rate),
                     f"{run.mean_batch:.1f} (max {run.max_batch})", fmt_rate(same),
                     fmt_rate(per_thread) + note, f"{run.rate / same:.2f}",
                     f"{run.rate / per_thread:.2f}",
                     f"{run.appends:,} / {len(run.batches):,}"])
    rows_main = rows
    print_table(["appenders", "ppn appends/s", "mean batch", "SQLite same-batches rows/s",
                 "SQLite per-thread-txn rows/s", "ratio ppn/same", "ratio ppn/per-thread",
                 "ppn events / batches"], rows)

    # The floor: the same threads and group commit with no work but pwrite + fdatasync.
    rows = []
    for threads, row in zip(THREAD_COUNTS, [r[:] for r in rows_main], strict=True):
        rate, batch = max(floor_rate(root / f"floor-{threads}.bin", threads, seconds)
                          for _ in range(repeat))
        same = float(row[3].replace(",", ""))
        rows.append([str(threads), fmt_rate(rate), f"{batch:.1f}", row[3],
                     f"{rate / same:.2f}", row[1], f"{float(row[1].replace(',', '')) / rate:.2f}"])
    print("\n   floor: the same threads and group commit doing nothing but a 100-byte pwrite "
          "per append and one fdatasync per batch (bench FloorLog):")
    print_table(["appenders", "floor appends/s", "mean batch", "SQLite same-batches rows/s",
                 "ratio floor/SQLite", "ppn appends/s", "ratio ppn/floor"], rows)

    # Context: batches holding a MemberAdded also rewrite and fsync nodes.jsonl.
    rows = []
    for threads in (1, THREAD_COUNTS[-1]):
        run, same, _, _ = append_figures(root, keys, threads, seconds, repeat, 0.0)
        rows.append([str(threads), fmt_rate(run.rate), f"{run.mean_batch:.1f}",
                     fmt_rate(same), f"{run.rate / same:.2f}"])
    print(f"\n   the same with 0% MemberAdded (PdDeclared instead, {SIGNED_PCT:g}% CapGranted "
          "kept), so no nodes.jsonl rewrites:")
    print_table(["appenders", "ppn appends/s", "mean batch", "SQLite same-batches rows/s",
                 "ratio ppn/same"], rows)


# --------------------------------------------------------------------------- part 2
def build_ledger(directory: Path, keys: NodeKeys, events: int) -> tuple[list[bytes], Timing]:
    """append_many in batches of BUILD_BATCH; returns the encoded events and the timing."""
    ledger = Ledger.create(directory, keys, ORIGIN, options=BENCH_OPTIONS)
    mix = EventMix(7)
    bodies: list[bytes] = []
    wall = cpu = 0.0
    try:
        while len(bodies) < events:
            chunk = mix.take(min(BUILD_BATCH, events - len(bodies)))
            bodies.extend(REGISTRY.encode(e) for e in chunk)
            w, c = time.perf_counter(), time.process_time()
            ledger.append_many(chunk)
            wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
    finally:
        ledger.close()
    return bodies, Timing(len(bodies), wall, cpu)


def replay_full(directory: Path, states: list[State]) -> int:
    """The fold from scratch: read, checksum, decode every event strictly, apply it.

    Replay mode (as ``ppn ledger state`` and ``show`` run it): no hashing and no
    signatures -- those are the verify figure.
    """
    state = State()
    n = LogReader(directory, verify=False).fold(state, apply_items)
    states[:] = [state]
    return n


def whole_reads(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` with each segment read in one piece (as before reads were bounded)."""
    def run() -> int:
        chunk = ledger_scan.READ_CHUNK
        ledger_scan.READ_CHUNK = MAX_SEGMENT_BYTES
        try:
            return fn()
        finally:
            ledger_scan.READ_CHUNK = chunk
    return run


def scan_only(directory: Path) -> int:
    """Replay mode without the fold: frames, checksums, strict decoding."""
    return LogReader(directory, verify=False).run().count


def decode_only(bodies: Sequence[bytes], out: list[Any]) -> int:
    decode = REGISTRY.decode
    out[:] = [decode(b) for b in bodies]
    return len(out)


def fold_only(events: Sequence[Any]) -> int:
    state = State()
    for seq, event in enumerate(events, 1):
        apply(state, event, seq, seq)
    return len(events)


def sqlite_read(path: Path, mode: str) -> int:
    """SELECT seq, body ORDER BY seq; then nothing, msgpack.unpackb, or decode + apply."""
    con = sqlite3.connect(path)
    unpackb, decode, state = msgpack.unpackb, REGISTRY.decode, State()
    n = 0
    try:
        cur = con.execute("SELECT seq, body FROM t ORDER BY seq")
        if mode == "read":
            for _ in cur:
                n += 1
        elif mode == "msgpack":
            for _, body in cur:
                unpackb(body, raw=False, use_list=False, strict_map_key=True)
                n += 1
        else:
            for seq, body in cur:
                apply(state, decode(body), seq + 1, seq)
                n += 1
    finally:
        con.close()
    return n


def time_open(directory: Path, keys: NodeKeys, repeat: int) -> Timing:
    """Best of ``repeat`` Ledger.open calls (each closed again outside the timing)."""
    timings = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        ledger = Ledger.open(directory, keys, options=BENCH_OPTIONS)
        timings.append(Timing(ledger.size, time.perf_counter() - wall,
                              time.process_time() - cpu))
        ledger.close()
    return min(timings, key=lambda t: t.wall)


def part_replay(root: Path, keys: NodeKeys, events: int, repeat: int) -> None:
    print(f"\n== 2. A {events:,}-event ledger built with append_many({BUILD_BATCH:,} events) "
          f"(best of {repeat} interleaved rounds) ==")
    print(f"   same mix; {events // BUILD_BATCH:,} batches -> {events // BUILD_BATCH:,} "
          "checkpoints (+ the genesis one)")
    directory = root / "big"
    bodies, build = build_ledger(directory, keys, events)
    db = root / "big.db"
    sq_build = sqlite_same_batches(
        db, [bodies[i:i + BUILD_BATCH] for i in range(0, len(bodies), BUILD_BATCH)])
    con = sqlite_connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()

    states: list[State] = []
    decoded: list[Any] = []
    # Interleaved rounds (each figure once per round, best round kept): a slow spell of
    # the machine then costs every figure one sample instead of all of one figure's.
    figures: dict[str, Callable[[], int]] = {
        "full": lambda: replay_full(directory, states),
        "sq_fold": lambda: sqlite_read(db, "fold"),
        "scan": lambda: scan_only(directory),
        "sq_msgpack": lambda: sqlite_read(db, "msgpack"),
        "dec": lambda: decode_only(bodies, decoded),
        "fold": lambda: fold_only(decoded),
        "verify": lambda: audit.verify(directory).records,
        "verify1": lambda: audit.verify(directory, jobs=1).records,
        "sq_read": lambda: sqlite_read(db, "read"),
        "full_whole": whole_reads(lambda: replay_full(directory, [])),
        "verify1_whole": whole_reads(lambda: audit.verify(directory, jobs=1).records),
    }
    got = interleaved(repeat, figures)
    decoded.clear()
    full, scan, dec, fold = got["full"], got["scan"], got["dec"], got["fold"]
    verify, verify1 = got["verify"], got["verify1"]
    sq_read, sq_msgpack, sq_fold = got["sq_read"], got["sq_msgpack"], got["sq_fold"]
    records = events + 1
    if not full.n == scan.n == verify.n == records:
        print(f"  warning: expected {records} records; replay {full.n}, scan {scan.n}, "
              f"verify {verify.n}", file=sys.stderr)
    state = states[0]

    print(f"build: ppn append_many {fmt_rate(build.rate)} events/s ({build.wall:.1f} s) | "
          f"SQLite, same batches of {BUILD_BATCH:,} {fmt_rate(sq_build.rate)} rows/s "
          f"| ratio {build.rate / sq_build.rate:.2f}")
    print(f"records: {records:,} (genesis + {events:,}); final state: {len(state.pds):,} PDs, "
          f"{len(state.members)} members, {len(state.caps):,} caps")

    def row(name: str, t: Timing, goal: str, base_name: str = "",
            base: Timing | None = None) -> list[str]:
        return [name, fmt_rate(t.rate), f"{t.wall:.2f}", fmt_rate(t.cpu_rate), goal, base_name,
                fmt_rate(base.rate) if base else "",
                f"{t.rate / base.rate:.2f}" if base else ""]

    print_table(
        ["figure", "ppn events/s", "seconds", "per CPU-s", "goal", "SQLite baseline",
         "rows/s", "ratio ppn/SQLite"],
        [row("replay: read+decode+fold", full, fmt_rate(REPLAY_GOAL),
             "SELECT + REGISTRY.decode + apply", sq_fold),
         row("  read+decode, no fold", scan, "", "SELECT + msgpack.unpackb", sq_msgpack),
         row("  SELECT only", sq_read, ""),
         row("  REGISTRY.decode alone", dec, ""),
         row("  apply alone", fold, ""),
         row("verify: audit.verify", verify, fmt_rate(VERIFY_GOAL),
             "SELECT + msgpack.unpackb", sq_msgpack),
         row("  the same in one process", verify1, "")])
    for name, t, goal in (("replay", full, REPLAY_GOAL), ("verify", verify, VERIFY_GOAL)):
        verdict = "meets" if t.rate >= goal else "misses"
        print(f"  {name} {verdict} its goal: {fmt_rate(t.rate)} vs {fmt_rate(goal)} events/s "
              f"({t.rate / goal:.2f}x; {t.cpu_rate / goal:.2f}x counting CPU time only)")
    for name, bounded, whole in (("replay", full, got["full_whole"]),
                                 ("verify, one process", verify1, got["verify1_whole"])):
        print(f"  bounded reads ({ledger_scan.READ_CHUNK >> 20} MiB at a time), {name}: "
              f"{fmt_rate(bounded.rate)} events/s vs {fmt_rate(whole.rate)} reading each "
              f"segment whole ({bounded.rate / whole.rate:.2f}x)")

    plain = time_open(directory, keys, repeat)
    ledger = Ledger.open(directory, keys, options=BENCH_OPTIONS)
    snap = measure(lambda: ledger.write_snapshot().stat().st_size)
    ledger.close()
    with_snap = time_open(directory, keys, repeat)
    print(f"Ledger.open: no snapshot {plain.wall:.2f} s ({fmt_rate(plain.rate)} records/s, "
          f"{fmt_rate(plain.cpu_rate)} per CPU-s) | snapshot at {records:,}: "
          f"{with_snap.wall:.2f} s ({fmt_rate(with_snap.rate)} records/s, "
          f"{fmt_rate(with_snap.cpu_rate)} per CPU-s) | write_snapshot {snap.wall:.2f} s "
          f"({snap.n / 1024:,.0f} KiB)")

    segs = list_segments(directory)
    seg_bytes = sum(p.stat().st_size for _, p in segs)
    total, sq_bytes = dir_bytes(directory), sqlite_size(db)
    print(f"size on disk: ledger dir {mib(total)} ({len(segs)} segments {mib(seg_bytes)}, "
          f"{seg_bytes / records:.0f} B/record) | SQLite {mib(sq_bytes)} "
          f"({sq_bytes / events:.0f} B/row) | ratio {total / sq_bytes:.2f} | event bytes "
          f"alone {mib(sum(map(len, bodies)))}")


# --------------------------------------------------------------------------- profile
def part_profile(root: Path, keys: NodeKeys, events: int, top: int = 15) -> None:
    directory = root / "profile"
    build_ledger(directory, keys, events)
    runs: tuple[tuple[str, Callable[[], object]], ...] = (
        ("replay (LogReader + apply)", lambda: replay_full(directory, [])),
        ("verify (audit.verify)", lambda: audit.verify(directory)))
    for name, fn in runs:
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.runcall(fn)
        wall = time.perf_counter() - start
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        print(f"\n== profile: {name}, {events:,} events, {wall:.2f} s under cProfile ==")
        print(out.getvalue().strip())


# --------------------------------------------------------------------------- main
def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return fields[7], sum(fields)


def code_version() -> str:
    """The commit the ledger code was measured at, and whether ledger/ differs from it."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "ledger"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes in ledger/" if dirty else "")


def make_workdir() -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=OUT_DIR))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--events", type=int, default=None,
                    help="events in the replay/verify ledger (default 1,000,000; "
                         "--quick and --profile: 100,000)")
    ap.add_argument("--quick", action="store_true",
                    help="100,000 events and 1 s append runs")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of each append run (default 3; --quick: 1)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="run each measurement this many times and keep the fastest "
                         "(default 2; --quick and --profile: 1)")
    ap.add_argument("--profile", action="store_true",
                    help="print cProfile tops of replay and verify instead of the figures")
    ap.add_argument("--part", choices=("all", "appends", "replay"), default="all",
                    help="run only the appends part or only the replay/verify part")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    small = args.quick or args.profile
    events = args.events if args.events is not None else (100_000 if small else 1_000_000)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    repeat = max(1, args.repeat if args.repeat is not None else (1 if small else 2))

    root = make_workdir()
    keys = NodeKeys.generate()
    same_fs = os.stat(root).st_dev == os.stat("/work").st_dev
    print(f"ledger bench: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"msgpack {'.'.join(map(str, msgpack.version))}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}")
    print(f"ledger code: {code_version()}")
    print(f"work dir: {root} (same filesystem as /work: {same_fs}); page cache warm; "
          f"load average at start: {load()}")
    steal0, total0 = cpu_ticks()
    try:
        if args.profile:
            part_profile(root, keys, events)
        else:
            if args.part in ("all", "appends"):
                part_appends(root, keys, seconds, repeat)
            if args.part in ("all", "replay"):
                part_replay(root, keys, events, repeat)
        steal1, total1 = cpu_ticks()
        steal = (steal1 - steal0) / max(1, total1 - total0)
        print(f"\nload average at end: {load()}; CPU time stolen by the hypervisor during "
              f"the run: {steal:.1%} (other processes share this machine)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            clear_flags(root)
            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
