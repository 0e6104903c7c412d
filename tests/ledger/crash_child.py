"""Child process of tests/ledger/test_crash.py: append to a ledger until killed.

Usage: ``python crash_child.py LEDGER_DIR STATE_DIR ROUND THREADS SEGMENT_BYTES SNAPSHOT_EVERY``

Opens the ledger with the keys saved in STATE_DIR, then appends from THREADS
threads (the main thread is one of them) until the parent kills it.  It reports
to the parent on stdout, one line per ``os.write`` (atomic on a pipe), and only
*after* the append call has returned:

* ``opening``                            -- about to call ``Ledger.open``
* ``opened\\t<size>\\t<seconds>``          -- ``Ledger.open`` returned
* ``ack\\t<seq>\\t<id>\\t<digest>``     -- that event is durable at that seq; the
  digest is :func:`event_digest` of its encoding
* ``snap\\t<size>``                       -- a snapshot was written
* ``error\\t<message>``                   -- an appender failed (the child then exits 3)

An ``append_many`` reports all its receipts in one write of at most PIPE_BUF bytes.
Every event carries a unique id (``r<round>-t<thread>-<i>[.<j>]``) in its name or
holder field.
"""

from __future__ import annotations

import hashlib
import os
import select
import sys
import threading
import time
import traceback
from pathlib import Path

import structlog

from ledger.catalog import REGISTRY, CapGranted, MemberAdded, PdDeclared
from ledger.keys import NodeKeys
from ledger.log import Ledger, Options

SELF_DESTRUCT_S = 60.0
"""Exit on our own if the parent never kills us (it died, or a test bug)."""


def event_digest(event_bytes: bytes) -> str:
    return hashlib.sha256(event_bytes).hexdigest()[:24]


def _say(line: str) -> None:
    data = line.encode()
    if len(data) > select.PIPE_BUF:
        raise AssertionError(f"report of {len(data)} bytes would not be atomic")
    if os.write(1, data) != len(data):
        raise AssertionError("short write on the report pipe")


def _fail(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        _say(f"error\t{text.replace(chr(10), ' | ')[-3000:]}\n")
    finally:
        os._exit(3)


def _events(rnd: int, t: int, i: int) -> list[object]:
    """What thread ``t`` appends at step ``i``: one event, or a batch for append_many."""
    ident = f"r{rnd}-t{t}-{i}"
    k = i % 10
    if t == 0 and i % 50 == 25:
        key = (rnd * 1000 + i).to_bytes(32, "big")
        return [MemberAdded(name=ident, signing_key=key, wg_public_key=key[::-1],
                            mesh_ip=f"10.{rnd % 250}.{i // 250 % 250}.{i % 250}",
                            endpoint=None, role="node")]
    if k == 3:
        return [CapGranted(cap_id=(rnd * 10 + t) * 1_000_000 + i, holder=ident,
                           obj=f"endpoint-{t}", rights=("read", "write"),
                           badge=i if i % 2 else None, parent=None, via="mint")]
    if k == 7:
        n = 2 + i % 3
        if i % 40 == 17:  # now and then a batch spanning a few pages of the file
            n = 24
        return [PdDeclared(name=f"{ident}.{j}" + "x" * (200 if n > 4 else 0), priority=j)
                for j in range(n)]
    return [PdDeclared(name=ident, priority=i)]


def ident(event: object) -> str:
    """The unique id an event of :func:`_events` carries (padding stripped)."""
    if isinstance(event, CapGranted):
        return event.holder
    assert isinstance(event, (PdDeclared, MemberAdded))
    return event.name.rstrip("x")


def _appender(ledger: Ledger, rnd: int, t: int, deadline: float) -> None:
    try:
        i = 0
        while time.monotonic() < deadline:
            events = _events(rnd, t, i)
            if len(events) == 1 and i % 2:
                receipts = [ledger.append(events[0])]
            else:
                receipts = ledger.append_many(events)
            _say("".join(f"ack\t{r.seq}\t{ident(e)}\t{event_digest(REGISTRY.encode(e))}\n"
                         for r, e in zip(receipts, events, strict=True)))
            if t == 0 and i % 150 == 149:
                _say(f"snap\t{ledger.write_snapshot().name}\n")
            i += 1
    except BaseException as exc:  # any failure is a test failure: tell the parent
        _fail(exc)


def main(argv: list[str]) -> None:
    ledger_dir, state_dir = Path(argv[1]), Path(argv[2])
    rnd, threads, seg_bytes, snap_every = (int(a) for a in argv[3:7])
    # The ledger logs through structlog, which prints to stdout by default: keep
    # stdout for the protocol.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    keys = NodeKeys.load(state_dir)
    options = Options(segment_bytes=seg_bytes, set_append_only_flag=False,
                      snapshot_every=snap_every)
    _say("opening\n")
    started = time.monotonic()
    ledger = Ledger.open(ledger_dir, keys, options=options)
    _say(f"opened\t{ledger.size}\t{time.monotonic() - started:.6f}\n")
    deadline = time.monotonic() + SELF_DESTRUCT_S
    workers = [threading.Thread(target=_appender, args=(ledger, rnd, t, deadline), daemon=True)
               for t in range(1, threads)]
    for w in workers:
        w.start()
    _appender(ledger, rnd, 0, deadline)
    for w in workers:
        w.join()
    _say("error\tnever killed: gave up after the self-destruct timeout\n")
    os._exit(4)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BaseException as exc:
        _fail(exc)
