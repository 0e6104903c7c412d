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

The child gets its request as a JSON argument and answers with one JSON object on
stdout.  If it cannot be started or answers nonsense, the cryptographic pass runs
in this process instead: slower, never weaker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.scan import LedgerCorrupt, LogReader, list_segments

PARALLEL_MIN_BYTES = 4 << 20
"""Below this much log a second process costs more (start-up, imports) than it saves."""


@dataclass(frozen=True)
class CryptoResult:
    """What the cryptographic pass established (or the first failure it found)."""

    count: int
    root: bytes
    checkpoints: int
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
    try:
        reader.run()
    except LedgerCorrupt as exc:
        return CryptoResult(reader.result.count, b"", reader.result.checkpoints, exc)
    res = reader.result
    return CryptoResult(res.count, res.tree.root(), res.checkpoints, None)


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
        self._proc: subprocess.Popen[bytes] | None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ledger.verifier", request], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
        except OSError as exc:
            self._proc = None
            self.fell_back = f"could not start: {exc}"

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
    out: dict[str, Any] = {"count": r.count, "root": r.root.hex(), "checkpoints": r.checkpoints}
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
    count, checkpoints = obj["count"], obj["checkpoints"]
    if not isinstance(count, int) or not isinstance(checkpoints, int):
        raise TypeError("malformed counts")
    return CryptoResult(count, bytes.fromhex(obj["root"]), checkpoints, failure)


def _main() -> int:
    request = json.loads(sys.argv[1])
    key = request["pinned_key"]
    limits = {str(k): int(v) for k, v in request["limits"].items()}
    result = crypto_pass(Path(request["directory"]), limits,
                         bytes.fromhex(key) if key else None)
    sys.stdout.write(json.dumps(_encode(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
