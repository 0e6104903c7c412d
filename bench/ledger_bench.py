#!/usr/bin/env python3
"""Ledger benchmark: durable group-commit appends, replay, verify and open.

Every ledger figure is printed beside a SQLite baseline measured in the same run on
the same filesystem.  Nothing here asserts a timing: it prints figures and the goals
they are meant to meet.  See bench/README.md for what each figure means.

    .venv/bin/python bench/ledger_bench.py [--events N] [--quick] [--seconds S]
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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack

from ledger import audit
from ledger.catalog import REGISTRY, RIGHTS, ROLES, CapGranted, MemberAdded, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options
from ledger.scan import LogReader, list_segments
from ledger.seal import clear_append_only
from ledger.state import State, apply

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


def committed_batches(directory: Path) -> tuple[list[list[bytes]], int]:
    """The batches group commit formed, from checkpoint positions, as encoded events.

    ``LogReader.result.notes`` maps each checkpoint's tree size to its location; two
    consecutive sizes bound one batch.  The genesis batch (size 1) is left out.
    Returns the batches and the number of checkpoints read.
    """
    reader = LogReader(directory)
    encoded = [REGISTRY.encode(e.event) for e in reader.entries()]
    sizes = sorted(reader.result.notes)
    batches = [encoded[a:b] for a, b in pairwise(sizes)]
    return batches, len(sizes)


def clear_flags(root: Path) -> None:
    """Undo any append-only inode flag so the temp dir can be removed."""
    for seg in root.rglob("seg-*.log"):
        clear_append_only(seg)


# --------------------------------------------------------------------------- part 1
@dataclass
class AppendRun:
    threads: int
    appends: int
    seconds: float
    batches: list[list[bytes]]
    counted_batches: int

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


def bench_appends(root: Path, keys: NodeKeys, threads: int, seconds: float,
                  member_pct: float = MEMBER_PCT) -> AppendRun:
    directory = root / f"append-{threads}-m{member_pct:g}"
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
    batches, _ = committed_batches(directory)
    got = sum(len(b) for b in batches)
    if got != appends or len(batches) != counted:
        print(f"  warning: log holds {got} events in {len(batches)} batches; appenders "
              f"counted {appends} in {counted} batches", file=sys.stderr)
    return AppendRun(threads, appends, elapsed, batches, counted)


def sqlite_same_batches(path: Path, batches: Sequence[Sequence[bytes]]) -> float:
    """Rows/s committing exactly these batches, one transaction each, in order."""
    con = sqlite_create(path)
    seq = 0
    start = time.perf_counter()
    for batch in batches:
        con.execute("BEGIN")
        con.executemany("INSERT INTO t (seq, body) VALUES (?, ?)",
                        zip(range(seq, seq + len(batch)), batch, strict=True))
        con.execute("COMMIT")
        seq += len(batch)
    elapsed = time.perf_counter() - start
    con.close()
    return seq / elapsed


def sqlite_per_thread(path: Path, threads: int, seconds: float,
                      bodies: Sequence[bytes]) -> tuple[float, int]:
    """Rows/s with ``threads`` connections each committing single-row transactions."""
    sqlite_create(path).close()
    retries = [0] * threads

    def work(i: int, deadline: float) -> int:
        con = sqlite_connect(path)
        n, size, now = 0, len(bodies), time.perf_counter
        try:
            while now() < deadline:
                try:
                    con.execute("INSERT INTO t (body) VALUES (?)", (bodies[(i + n) % size],))
                except sqlite3.OperationalError:  # busy despite busy_timeout: retry
                    retries[i] += 1
                    continue
                n += 1
        finally:
            con.close()
        return n

    rows, elapsed = run_threads(threads, seconds, work)
    return rows / elapsed, sum(retries)


def part_appends(root: Path, keys: NodeKeys, seconds: float) -> None:
    print(f"\n== 1. Durable appends, {seconds:g} s per run, ledger.append(event) in a loop "
          "per thread ==")
    rows = []
    notes = []
    for threads in THREAD_COUNTS:
        run = bench_appends(root, keys, threads, seconds)
        same = sqlite_same_batches(root / f"same-{threads}.db", run.batches)
        bodies = [b for batch in run.batches for b in batch]
        per_thread, retries = sqlite_per_thread(root / f"pt-{threads}.db", threads, seconds,
                                                bodies)
        if retries:
            notes.append(f"SQLite per-thread, {threads} threads: {retries} busy retries")
        rows.append([str(threads), fmt_rate(run.rate),
                     f"{run.mean_batch:.1f} (max {run.max_batch})", fmt_rate(same),
                     fmt_rate(per_thread), f"{run.rate / same:.2f}",
                     f"{run.rate / per_thread:.2f}", f"{run.appends:,}/{len(run.batches):,}"])
    print_table(["appenders", "ppn appends/s", "mean batch", "SQLite same-batches rows/s",
                 "SQLite per-thread-txn rows/s", "ratio ppn/same", "ratio ppn/per-thread",
                 "ppn events/batches"], rows)
    for note in notes:
        print("  " + note)

    # Context: the same runs without MemberAdded, whose batches also rewrite nodes.jsonl.
    extra = []
    for threads in (1, THREAD_COUNTS[-1]):
        run = bench_appends(root, keys, threads, seconds, member_pct=0.0)
        same = sqlite_same_batches(root / f"same-{threads}-nomember.db", run.batches)
        extra.append([str(threads), fmt_rate(run.rate), f"{run.mean_batch:.1f}",
                      fmt_rate(same), f"{run.rate / same:.2f}"])
    print(f"\n   same, but 0% MemberAdded (PdDeclared instead; {SIGNED_PCT:g}% CapGranted "
          "kept):")
    print_table(["appenders", "ppn appends/s", "mean batch", "SQLite same-batches rows/s",
                 "ratio ppn/same"], extra)


# --------------------------------------------------------------------------- part 2
def build_ledger(directory: Path, keys: NodeKeys, events: int
                 ) -> tuple[list[list[bytes]], float]:
    """append_many in batches of BUILD_BATCH; returns the encoded batches and seconds."""
    ledger = Ledger.create(directory, keys, ORIGIN, options=BENCH_OPTIONS)
    mix = EventMix(7)
    batches: list[list[bytes]] = []
    spent = 0.0
    try:
        done = 0
        while done < events:
            chunk = mix.take(min(BUILD_BATCH, events - done))
            batches.append([REGISTRY.encode(e) for e in chunk])
            start = time.perf_counter()
            ledger.append_many(chunk)
            spent += time.perf_counter() - start
            done += len(chunk)
    finally:
        ledger.close()
    return batches, spent


def sqlite_build(path: Path, batches: Sequence[Sequence[bytes]]) -> float:
    rate = sqlite_same_batches(path, batches)
    con = sqlite_connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return rate


def replay_full(directory: Path) -> tuple[int, float, State]:
    state = State()
    start = time.perf_counter()
    n = 0
    for e in LogReader(directory).entries():
        apply(state, e.event, e.seq, e.ts_ns)
        n += 1
    return n, time.perf_counter() - start, state


def scan_only(directory: Path) -> tuple[int, float]:
    """Frames, CRCs, chain, Merkle tree, checkpoint and grant signatures; no decode."""
    start = time.perf_counter()
    n = sum(1 for _ in LogReader(directory, decode_from=1 << 62).entries())
    return n, time.perf_counter() - start


def decode_only(bodies: Sequence[bytes]) -> tuple[list[Any], float]:
    decode = REGISTRY.decode
    start = time.perf_counter()
    events = [decode(b) for b in bodies]
    return events, time.perf_counter() - start


def fold_only(events: Sequence[Any]) -> float:
    state = State()
    start = time.perf_counter()
    for seq, event in enumerate(events, 1):
        apply(state, event, seq, seq)
    return time.perf_counter() - start


def sqlite_read(path: Path, mode: str) -> tuple[int, float]:
    """SELECT body ORDER BY seq, then: nothing, msgpack.unpackb, or decode+apply."""
    con = sqlite3.connect(path)
    unpackb, decode, state = msgpack.unpackb, REGISTRY.decode, State()
    n = 0
    start = time.perf_counter()
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
    elapsed = time.perf_counter() - start
    con.close()
    return n, elapsed


def timed_open(directory: Path, keys: NodeKeys) -> tuple[float, Ledger]:
    start = time.perf_counter()
    ledger = Ledger.open(directory, keys, options=BENCH_OPTIONS)
    return time.perf_counter() - start, ledger


def part_replay(root: Path, keys: NodeKeys, events: int) -> None:
    signed = SIGNED_PCT
    print(f"\n== 2. A {events:,}-event ledger: append_many of {BUILD_BATCH:,} events per call "
          f"(mix ~{100 - signed - MEMBER_PCT:g}% PdDeclared, {MEMBER_PCT:g}% MemberAdded, "
          f"{signed:g}% signed CapGranted) ==")
    directory = root / "big"
    batches, build_s = build_ledger(directory, keys, events)
    bodies = [b for batch in batches for b in batch]
    db = root / "big.db"
    sqlite_build_rate = sqlite_build(db, batches)
    records = events + 1
    print(f"build: ppn {fmt_rate(events / build_s)} events/s ({build_s:.1f} s, "
          f"{len(batches):,} checkpoints + genesis) | SQLite same batches "
          f"{fmt_rate(sqlite_build_rate)} rows/s")

    n_full, full_s, state = replay_full(directory)
    n_scan, scan_s = scan_only(directory)
    decoded, dec_s = decode_only(bodies)
    fold_s = fold_only(decoded)
    del decoded
    report = audit.verify(directory)
    sq_read = sqlite_read(db, "read")
    sq_msgpack = sqlite_read(db, "msgpack")
    sq_fold = sqlite_read(db, "fold")
    if n_full != records or n_scan != records or report.records != records:
        print(f"  warning: expected {records} records; replay {n_full}, scan {n_scan}, "
              f"verify {report.records}", file=sys.stderr)

    def rate(n: int, s: float) -> str:
        return fmt_rate(n / s)

    print(f"records: {records:,} (genesis + {events:,}); state: {len(state.pds):,} PDs, "
          f"{len(state.members)} members, {len(state.caps):,} caps")
    print_table(
        ["figure", "ppn events/s", "seconds", "goal events/s", "SQLite baseline", "events/s",
         "ratio ppn/SQLite"],
        [
            ["replay (scan+decode+fold)", rate(n_full, full_s), f"{full_s:.2f}",
             fmt_rate(REPLAY_GOAL), "SELECT + msgpack.unpackb", rate(*sq_msgpack),
             f"{(n_full / full_s) / (sq_msgpack[0] / sq_msgpack[1]):.2f}"],
            ["  scan only (no decode)", rate(n_scan, scan_s), f"{scan_s:.2f}", "",
             "SELECT only", rate(*sq_read),
             f"{(n_scan / scan_s) / (sq_read[0] / sq_read[1]):.2f}"],
            ["  decode+fold (full - scan)", rate(n_full, full_s - scan_s),
             f"{full_s - scan_s:.2f}", "", "SELECT + REGISTRY.decode + apply",
             rate(*sq_fold), ""],
            ["  REGISTRY.decode alone", rate(len(bodies), dec_s), f"{dec_s:.2f}", "", "", "",
             ""],
            ["  apply alone", rate(len(bodies), fold_s), f"{fold_s:.2f}", "", "", "", ""],
            ["verify (audit.verify)", rate(report.records, report.seconds),
             f"{report.seconds:.2f}", fmt_rate(VERIFY_GOAL), "SELECT + msgpack.unpackb",
             rate(*sq_msgpack),
             f"{(report.records / report.seconds) / (sq_msgpack[0] / sq_msgpack[1]):.2f}"],
        ])
    for name, r, goal in (("replay", n_full / full_s, REPLAY_GOAL),
                          ("verify", report.records / report.seconds, VERIFY_GOAL)):
        verdict = "meets" if r >= goal else "misses"
        print(f"  {name}: {fmt_rate(r)} events/s {verdict} the goal of {fmt_rate(goal)} "
              f"({r / goal:.2f}x)")

    open_plain, ledger = timed_open(directory, keys)
    start = time.perf_counter()
    ledger.write_snapshot()
    snap_s = time.perf_counter() - start
    ledger.close()
    open_snap, ledger = timed_open(directory, keys)
    ledger.close()
    print(f"Ledger.open: no snapshot {open_plain:.2f} s ({rate(records, open_plain)} "
          f"records/s) | with snapshot at {records:,} {open_snap:.2f} s "
          f"({rate(records, open_snap)} records/s) | write_snapshot {snap_s:.2f} s")

    segs = list_segments(directory)
    seg_bytes = sum(p.stat().st_size for _, p in segs)
    total = dir_bytes(directory)
    sq_bytes = sqlite_size(db)
    print(f"size on disk: ledger {mib(total)} ({len(segs)} segments {mib(seg_bytes)}, "
          f"{seg_bytes / records:.0f} B/record) | SQLite {mib(sq_bytes)} "
          f"({sq_bytes / events:.0f} B/row) | raw event bytes "
          f"{mib(sum(map(len, bodies)))} | ratio ledger/SQLite {total / sq_bytes:.2f}")


# --------------------------------------------------------------------------- profile
def part_profile(root: Path, keys: NodeKeys, events: int, top: int = 15) -> None:
    directory = root / "profile"
    build_ledger(directory, keys, events)
    for name, fn in (("replay (LogReader + apply)", lambda: replay_full(directory)),
                     ("verify (audit.verify)", lambda: audit.verify(directory))):
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


def make_workdir() -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=OUT_DIR))
    if os.stat(root).st_dev != os.stat("/work").st_dev:
        print(f"note: {root} is not on the filesystem of /work", file=sys.stderr)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--events", type=int, default=None,
                    help="events in the replay/verify ledger (default 1,000,000; "
                         "--quick and --profile: 100,000)")
    ap.add_argument("--quick", action="store_true",
                    help="100,000 events and 1 s append runs")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of each append run (default 3; --quick: 1)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the figures, print cProfile tops of replay and verify")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    small = args.quick or args.profile
    events = args.events if args.events is not None else (100_000 if small else 1_000_000)
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)

    root = make_workdir()
    keys = NodeKeys.generate()
    print(f"ledger bench: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"msgpack {'.'.join(map(str, msgpack.version))}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}")
    print(f"work dir: {root} (same filesystem as /work: "
          f"{os.stat(root).st_dev == os.stat('/work').st_dev}); page cache warm, "
          "one run per figure")
    print(f"load average at start: {load()}")
    try:
        if args.profile:
            part_profile(root, keys, events)
        else:
            part_appends(root, keys, seconds)
            part_replay(root, keys, events)
        print(f"\nload average at end: {load()} (other processes share this machine)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            clear_flags(root)
            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
