"""The cryptographic half of an audit, run in a second process beside the replay.

``ppn ledger verify`` has two independent halves of work per record:

* the *replay* half -- checksum, canonical encoding, strict event decoding, grant
  signatures, the state fold (which the snapshot and ``nodes.jsonl`` checks need)
  and the signatures of the even-numbered checkpoints, and
* the *tree* half -- checksum, the hash chain, the Merkle tree, what every
  checkpoint says (origin, size, root) and the signatures of the odd-numbered ones.

The split balances the two: grant signatures sit with the replay half because
the tree half has more to do per record, and checkpoint signatures -- the bulk of
the work in a log written one record per commit -- are shared.

On a machine with more than one CPU a large log is audited with the replay half in
this process and the cryptographic half in a child (``python -m ledger.verifier``),
both reading the same segments up to the same agreed lengths.  Each pass stops at
its first failure; the earlier of the two (by segment and offset) is reported, so
the answer is the one a single combined pass gives -- only sooner.

The child gets its request as JSON on stdin and answers with one JSON object on
stdout.  If it cannot be started or answers nonsense, the cryptographic pass runs
in this process instead: slower, never weaker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ledger.merkle import CompactTree
from ledger.scan import LedgerCorrupt, LogReader, ScanResult, list_segments
from ledger.state import State, apply_items

log = structlog.get_logger("ledger")

PARALLEL_MIN_BYTES = 4 << 20
"""Below this much log a second process costs more (start-up, imports) than it saves."""


@dataclass(frozen=True)
class CryptoResult:
    """What the tree half established (or the first failure it found)."""

    count: int
    checkpoints: int
    frontier: tuple[bytes, ...]
    prev_hash: bytes
    last_ts: int
    failure: LedgerCorrupt | None


def segment_limits(directory: Path) -> dict[str, int]:
    """The segment lengths both passes read: fixed before either starts."""
    return {p.name: p.stat().st_size for _, p in list_segments(directory)}


def crypto_pass(directory: Path, limits: dict[str, int] | None,
                pinned_key: bytes | None) -> CryptoResult:
    """Run the cryptographic half in this process."""
    reader = LogReader(directory, decode=False, canonical=False, grants=False,
                       note_signatures=(1, 2), pinned_key=pinned_key,
                       limits=limits)
    failure = None
    try:
        reader.run()
    except LedgerCorrupt as exc:
        failure = exc
    res = reader.result
    return CryptoResult(res.count, res.checkpoints, res.tree.frontier(), res.prev_hash,
                        res.last_ts, failure)


def audit_fold(directory: Path, state: State, *, pinned_key: bytes | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_commit: Callable[[int], None] | None = None,
               jobs: int | None = None) -> ScanResult:
    """Fold every committed record into ``state``, checking everything on the way.

    What ``LogReader(directory).fold(state, apply_items)`` does -- in two processes
    when ``jobs`` (default: the CPU count) allows it and the log is large enough.
    Raises the first :class:`LedgerCorrupt`; a torn tail is left in the result.
    """
    limits = segment_limits(directory)
    parallel = ((jobs or os.cpu_count() or 1) > 1
                and sum(limits.values()) >= PARALLEL_MIN_BYTES)
    if not parallel:
        reader = LogReader(directory, pinned_key=pinned_key, progress=progress, limits=limits)
        reader.fold(state, apply_items, on_commit=on_commit)
        return reader.result
    worker = CryptoWorker(directory, limits, pinned_key)
    reader = LogReader(directory, verify=False, canonical=True, grants=True,
                       note_signatures=(0, 2), pinned_key=pinned_key, progress=progress,
                       limits=limits)
    failure: LedgerCorrupt | None = None
    try:
        reader.fold(state, apply_items, on_commit=on_commit)
    except LedgerCorrupt as exc:
        failure = exc
    except BaseException:
        worker.kill()
        raise
    tree = worker.result()
    if worker.fell_back:
        log.warning("ledger.verify_worker_fell_back", detail=worker.fell_back)
    failure = _first_failure(list(limits), failure, tree.failure)
    if failure is not None:
        raise failure
    scan = reader.result
    if (tree.count, tree.checkpoints) != (scan.count, scan.checkpoints):
        raise LedgerCorrupt(str(directory), 0, None, f"the two verify passes disagree: "
                            f"{scan.count} records and {scan.checkpoints} checkpoints "
                            f"against {tree.count} and {tree.checkpoints}")
    scan.tree = CompactTree(tree.frontier, tree.count)
    scan.prev_hash, scan.last_ts = tree.prev_hash, tree.last_ts
    return scan


def _first_failure(segments: list[str], a: LedgerCorrupt | None,
                   b: LedgerCorrupt | None) -> LedgerCorrupt | None:
    """The earlier of two failures by place in the log; ``a`` (the replay half) on a tie,
    as a combined pass decodes a record before it checks its chain and signature."""
    if a is None or b is None:
        return a or b

    def place(f: LedgerCorrupt) -> tuple[int, int]:
        return (segments.index(f.segment) if f.segment in segments else -1, f.offset)

    return b if place(b) < place(a) else a


class CryptoWorker:
    """The cryptographic pass in a child process; :meth:`result` waits for it."""

    def __init__(self, directory: Path, limits: dict[str, int],
                 pinned_key: bytes | None) -> None:
        self.directory, self.limits, self.pinned_key = directory, limits, pinned_key
        self.fell_back: str | None = None
        request = json.dumps({"directory": str(directory), "limits": limits,
                              "pinned_key": pinned_key.hex() if pinned_key else None})
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ledger.verifier"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
        except OSError as exc:
            self.fell_back = f"could not start: {exc}"
            return
        stdin, self._proc.stdin = self._proc.stdin, None  # ours to close, not communicate's
        assert stdin is not None
        try:
            with stdin:
                stdin.write(request.encode())
        except OSError:  # the child is gone already: result() finds no answer and says so
            pass

    def result(self) -> CryptoResult:
        if self._proc is not None:
            out, err = self._proc.communicate()
            try:
                return _decode(json.loads(out))
            except (ValueError, KeyError, TypeError):
                tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.fell_back = (f"exited {self._proc.returncode}: {tail[0][:200]}")
        return crypto_pass(self.directory, self.limits, self.pinned_key)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


def _encode(r: CryptoResult) -> dict[str, Any]:
    out: dict[str, Any] = {"count": r.count, "checkpoints": r.checkpoints,
                           "frontier": [h.hex() for h in r.frontier],
                           "prev_hash": r.prev_hash.hex(), "last_ts": r.last_ts}
    if r.failure is not None:
        f = r.failure
        out["failure"] = {"segment": f.segment, "offset": f.offset, "seq": f.seq,
                          "reason": f.reason}
    return out


def _decode(obj: dict[str, Any]) -> CryptoResult:
    f = obj.get("failure")
    failure = None
    if f is not None:
        seq = f["seq"]
        if not (isinstance(f["segment"], str) and isinstance(f["offset"], int)
                and (seq is None or isinstance(seq, int)) and isinstance(f["reason"], str)):
            raise TypeError("malformed failure")
        failure = LedgerCorrupt(f["segment"], f["offset"], seq, f["reason"])
    count, checkpoints, last_ts = obj["count"], obj["checkpoints"], obj["last_ts"]
    if not all(isinstance(x, int) for x in (count, checkpoints, last_ts)):
        raise TypeError("malformed counts")
    frontier = tuple(bytes.fromhex(h) for h in obj["frontier"])
    prev = bytes.fromhex(obj["prev_hash"])
    if failure is None:
        CompactTree(frontier, count)  # raises ValueError unless a frontier of that size
        if len(prev) != 32:
            raise ValueError("malformed prev_hash")
    return CryptoResult(count, checkpoints, frontier, prev, last_ts, failure)


def _main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    key = request["pinned_key"]
    limits = {str(k): int(v) for k, v in request["limits"].items()}
    result = crypto_pass(Path(request["directory"]), limits,
                         bytes.fromhex(key) if key else None)
    sys.stdout.write(json.dumps(_encode(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
