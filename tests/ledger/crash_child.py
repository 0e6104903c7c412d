"""Child process of tests/ledger/test_crash.py: append to a ledger until killed.

Usage::

    python crash_child.py LEDGER_DIR STATE_DIR ROUND THREADS SEGMENT_BYTES SNAPSHOT_EVERY SNAP_AT

Opens the ledger with the keys saved in STATE_DIR, then appends from THREADS
threads (the main thread is one of them) until the parent kills it; thread 0
writes a snapshot after its step SNAP_AT (-1: never).  It reports to the parent
on stdout, one ``os.write`` of at most PIPE_BUF bytes per report (so a report is
never torn or interleaved), and only *after* the call it reports has returned:

* ``opening``                       about to call ``Ledger.open``
* ``opened TAB size TAB seconds``    ``Ledger.open`` returned
* ``ack TAB seq TAB id TAB digest``  that event is durable at that seq (one line per
                                    event; an ``append_many`` reports all in one write)
* ``snap TAB name``                  ``write_snapshot`` returned
* ``error TAB message``              something failed; the child then exits with 3

Each event is :func:`events` (round, thread, step)[j]: its :func:`ident` is
``r<round>-t<thread>-<step>[.<j>]``; the digest is :func:`event_digest` of its
encoding.
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


def events(rnd: int, t: int, i: int) -> list[object]:
    """What thread ``t`` appends at step ``i``: one event, or a batch for append_many.

    Deterministic, so the parent can tell exactly what each record must hold.
    """
    base = f"r{rnd}-t{t}-{i}"
    if t == 0 and i % 8 == 5:
        key = (rnd * 1000 + i).to_bytes(32, "big")
        return [MemberAdded(name=base, signing_key=key, wg_public_key=key[::-1],
                            mesh_ip=f"10.{rnd % 250}.{i // 250 % 250}.{i % 250}",
                            endpoint=None, role="node")]
    if i % 10 == 3:
        return [CapGranted(cap_id=(rnd * 10 + t) * 1_000_000 + i, holder=base,
                           obj=f"endpoint-{t}", rights=("read", "write"),
                           badge=i if i % 2 else None, parent=None, via="mint")]
    if t == 1 and i % 12 == 2:  # a batch whose one write spans pages of the segment file
        return [PdDeclared(name=f"{base}.{j}" + "x" * 400, priority=j) for j in range(12)]
    if i % 5 == 2:
        return [PdDeclared(name=f"{base}.{j}", priority=j) for j in range(2 + i % 3)]
    return [PdDeclared(name=base, priority=i)]


def ident(event: object) -> str:
    """The unique id an event of :func:`events` carries (padding stripped)."""
    if isinstance(event, CapGranted):
        return event.holder
    assert isinstance(event, (PdDeclared, MemberAdded))
    return event.name.rstrip("x")


def _appender(ledger: Ledger, rnd: int, t: int, snapshot_at: int, deadline: float) -> None:
    try:
        i = 0
        while time.monotonic() < deadline:
            batch = events(rnd, t, i)
            if len(batch) == 1 and i % 2:
                receipts = [ledger.append(batch[0])]
            else:
                receipts = ledger.append_many(batch)
            _say("".join(f"ack\t{r.seq}\t{ident(e)}\t{event_digest(REGISTRY.encode(e))}\n"
                         for r, e in zip(receipts, batch, strict=True)))
            if t == 0 and i == snapshot_at:
                _say(f"snap\t{ledger.write_snapshot().name}\n")
            i += 1
    except BaseException as exc:  # any failure is a test failure: tell the parent
        _fail(exc)


def main(argv: list[str]) -> None:
    ledger_dir, state_dir = Path(argv[1]), Path(argv[2])
    rnd, threads, seg_bytes, snap_every, snapshot_at = (int(a) for a in argv[3:8])
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
    workers = [threading.Thread(target=_appender, args=(ledger, rnd, t, -1, deadline), daemon=True)
               for t in range(1, threads)]
    for w in workers:
        w.start()
    _appender(ledger, rnd, 0, snapshot_at, deadline)
    for w in workers:
        w.join()
    _say("error\tnever killed: gave up after the self-destruct timeout\n")
    os._exit(4)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BaseException as exc:
        _fail(exc)
