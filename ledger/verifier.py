"""The tree half of an audit, run in a second process beside the replay.

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
this process and the tree half in a child (``python -P -m ledger.verifier``), both
reading the same segments up to the same agreed lengths.  If both pass and agree
(and the tree the child reports has the root the last checkpoint states), that is
the answer.  Otherwise -- a failure in either, or any disagreement -- one combined
pass over the same bytes gives the verdict, so what is reported never depends on
how the work was split; a damaged log costs a second pass, a sound one does not.

The child gets its request as JSON on stdin and answers with one JSON object on
stdout.  If it cannot be started or answers nonsense, the tree half runs in this
process instead: slower, never weaker.
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

from ledger.files import size_or_zero, written_end_of
from ledger.merkle import CompactTree
from ledger.note import stated_checkpoint
from ledger.records import SEGMENT_HEADER
from ledger.scan import LedgerCorrupt, LogReader, ScanResult, list_segments
from ledger.state import State, apply_items

log = structlog.get_logger("ledger")

PARALLEL_MIN_BYTES = 4 << 20
"""Below this much log a second process costs more (start-up, imports) than it saves."""


@dataclass(frozen=True)
class TreeResult:
    """What the tree half established (or the first failure it found)."""

    count: int
    checkpoints: int
    frontier: tuple[bytes, ...]
    prev_hash: bytes
    last_ts: int
    failure: LedgerCorrupt | None


def segment_limits(directory: Path, *, live: bool = True) -> dict[str, int]:
    """The segment lengths both passes read: fixed before either starts.

    ``live``: a writer may be appending.  The last segment is then read only up to
    its last non-zero byte -- the end of what was written -- because commits land
    in space already reserved (zeros) inside the file's size, and the two passes
    must not read different logs.
    """
    segs = list_segments(directory)
    limits = {p.name: size_or_zero(p) for _, p in segs}
    if live and segs:
        last = segs[-1][1]
        size = limits[last.name]
        # never into the header (its last byte, the first seq's low byte, may be zero)
        limits[last.name] = max(written_end_of(last, size), min(size, SEGMENT_HEADER.size))
    return limits


def tree_pass(directory: Path, limits: dict[str, int] | None,
              pinned_key: bytes | None) -> TreeResult:
    """Run the tree half in this process."""
    reader = LogReader(directory, decode=False, canonical=False, grants=False,
                       note_signatures=(1, 2), pinned_key=pinned_key,
                       limits=limits)
    failure = None
    try:
        reader.run()
    except LedgerCorrupt as exc:
        failure = exc
    res = reader.result
    return TreeResult(res.count, res.checkpoints, res.tree.frontier(), res.prev_hash,
                      res.last_ts, failure)


def audit_fold(directory: Path, *, pinned_key: bytes | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_commit: Callable[[int, State], None] | None = None,
               jobs: int | None = None, live: bool = True) -> tuple[ScanResult, State]:
    """Fold every committed record into a new state, checking everything on the way.

    What ``LogReader(directory).fold(State(), apply_items)`` does -- in two processes
    when ``jobs`` (default: the CPU count) allows it and the log is large enough.
    ``on_commit(size, state)`` follows each committed batch.  Raises the first
    :class:`LedgerCorrupt`; a torn tail is left in the result.  ``live=False``
    (the caller holds the ledger's lock) reads every segment to its full size.

    The two halves are for speed only: when either finds anything wrong, or their
    answers disagree, the verdict comes from one combined pass over the same bytes,
    so a report never depends on how the work was split.
    """
    limits = segment_limits(directory, live=live)
    parallel = ((jobs or os.cpu_count() or 1) > 1
                and sum(limits.values()) >= PARALLEL_MIN_BYTES)
    if parallel:
        done = _two_halves(directory, limits, pinned_key, progress, on_commit)
        if done is not None:
            return done
    state = State()
    reader = LogReader(directory, pinned_key=pinned_key, progress=progress, limits=limits)
    reader.fold(state, apply_items,
                on_commit=None if on_commit is None else lambda size: on_commit(size, state))
    return reader.result, state


def _two_halves(directory: Path, limits: dict[str, int], pinned_key: bytes | None,
                progress: Callable[[int, int], None] | None,
                on_commit: Callable[[int, State], None] | None
                ) -> tuple[ScanResult, State] | None:
    """The replay half here, the tree half in a child; None unless both pass and agree."""
    state = State()
    worker = TreeWorker(directory, limits, pinned_key)
    reader = LogReader(directory, verify=False, canonical=True, grants=True,
                       note_signatures=(0, 2), pinned_key=pinned_key, progress=progress,
                       limits=limits)
    try:
        reader.fold(state, apply_items,
                    on_commit=None if on_commit is None else lambda size: on_commit(size, state))
    except LedgerCorrupt:
        worker.kill()
        return None
    except BaseException:
        worker.kill()
        raise
    tree = worker.result()
    if worker.fell_back:
        log.warning("ledger.verify_worker_fell_back", detail=worker.fell_back)
    scan = reader.result
    if tree.failure is not None or (tree.count, tree.checkpoints) != (scan.count,
                                                                      scan.checkpoints):
        return None
    tree_now = CompactTree(tree.frontier, tree.count)
    stated = None if scan.last_note is None else stated_checkpoint(scan.last_note)
    if stated is None or stated.root_hash != tree_now.root():
        log.warning("ledger.verify_halves_disagree", records=scan.count)
        return None
    scan.tree = tree_now
    scan.prev_hash, scan.last_ts = tree.prev_hash, tree.last_ts
    return scan, state


class TreeWorker:
    """The tree half in a child process; :meth:`result` waits for it."""

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
                # -P: never let the working directory shadow the ledger package.
                [sys.executable, "-P", "-m", "ledger.verifier"], stdin=subprocess.PIPE,
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
        except BaseException:
            self.kill()
            raise

    def result(self) -> TreeResult:
        proc = self._proc
        if proc is not None:
            try:
                out, err = proc.communicate()
            except BaseException:
                self.kill()
                raise
            self._proc = None  # reaped, pipes closed
            try:
                answer = json.loads(out)
                if not isinstance(answer, dict):
                    raise TypeError("not an object")
                return _decode(answer)
            except (ValueError, KeyError, TypeError, AttributeError):
                tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.fell_back = f"exited {proc.returncode}: {tail[0][:200]}"
        return tree_pass(self.directory, self.limits, self.pinned_key)

    def kill(self) -> None:
        """Stop the child if it still runs; reap it and close its pipes either way."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.communicate()
            self._proc = None


def _encode(r: TreeResult) -> dict[str, Any]:
    out: dict[str, Any] = {"count": r.count, "checkpoints": r.checkpoints,
                           "frontier": [h.hex() for h in r.frontier],
                           "prev_hash": r.prev_hash.hex(), "last_ts": r.last_ts}
    if r.failure is not None:
        f = r.failure
        out["failure"] = {"segment": f.segment, "offset": f.offset, "seq": f.seq,
                          "reason": f.reason}
    return out


def _decode(obj: dict[str, Any]) -> TreeResult:
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
    return TreeResult(count, checkpoints, frontier, prev, last_ts, failure)


def _main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    key = request["pinned_key"]
    limits = {str(k): int(v) for k, v in request["limits"].items()}
    result = tree_pass(Path(request["directory"]), limits,
                         bytes.fromhex(key) if key else None)
    sys.stdout.write(json.dumps(_encode(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
