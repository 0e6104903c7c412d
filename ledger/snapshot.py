"""Signed snapshots: the folded state at a checkpoint, so start-up skips the fold.

A snapshot file holds ``msgpack([payload, signature])``; the payload is
``msgpack(["ppn-snapshot", 1, size, root, frontier, prev_hash, last_ts, state])``
and the signature is the node key's Ed25519 signature over a context string and
the payload.  A snapshot is trusted only if its signature verifies, its frontier
gives its root, and that root equals the log's own signed checkpoint at the same
size.  Opening the ledger then only checksums the prefix it covers; a full replay
must give the same state (``ppn ledger verify`` checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.bindings
import nacl.exceptions

from ledger.errors import LedgerDataError
from ledger.files import FileProblem, read_bounded
from ledger.keys import NodeKeys
from ledger.merkle import CompactTree
from ledger.nodes import atomic_write
from ledger.scan import TrustedPrefix
from ledger.state import State

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_RE = re.compile(r"^snap-(\d{20})\.bin$")
_CONTEXT = b"ppn/ledger/snapshot/v1\x00"
_MAX_SNAPSHOT = 1 << 30


class SnapshotError(LedgerDataError):
    """A snapshot file is malformed, unsigned by the ledger's key, or does not match the log."""


@dataclass(frozen=True)
class Snapshot:
    prefix: TrustedPrefix
    state: State
    path: Path

    @property
    def tree_size(self) -> int:
        return self.prefix.size

    @property
    def root(self) -> bytes:
        return self.prefix.root


def write(directory: Path, keys: NodeKeys, prefix: TrustedPrefix, state: State) -> Path:
    p = prefix
    payload: bytes = msgpack.packb(["ppn-snapshot", 1, p.size, p.root, list(p.frontier),
                                    p.prev_hash, p.last_ts, state.to_obj()],
                                   use_bin_type=True)
    blob: bytes = msgpack.packb([payload, keys.sign(_CONTEXT + payload)], use_bin_type=True)
    sdir = directory / SNAPSHOT_DIR
    sdir.mkdir(mode=0o755, exist_ok=True)
    path = sdir / f"snap-{p.size:020d}.bin"
    atomic_write(path, blob, mode=0o444)
    return path


def listing(directory: Path) -> list[Path]:
    """Snapshot files, newest first."""
    sdir = directory / SNAPSHOT_DIR
    try:
        found = [p for p in sdir.iterdir() if SNAPSHOT_RE.match(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise SnapshotError(f"{SNAPSHOT_DIR}: {exc.strerror or exc}") from None
    return sorted(found, reverse=True)


def load(path: Path, public_key: bytes) -> Snapshot:
    """Read and authenticate one snapshot; :class:`SnapshotError` says why not."""
    try:
        blob = read_bounded(path, _MAX_SNAPSHOT, "a snapshot")
        if blob is None:
            raise SnapshotError(f"{path.name}: missing")
        outer = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        payload, sig = outer
        nacl.bindings.crypto_sign_open(sig + _CONTEXT + payload, public_key)
        magic, fmt, size, root, frontier, prev, last_ts, obj = msgpack.unpackb(
            payload, raw=False, strict_map_key=False)
        if magic != "ppn-snapshot" or fmt != 1:
            raise SnapshotError(f"{path.name}: not a version 1 snapshot")
        state = State.from_obj(obj)
        if f"snap-{size:020d}.bin" != path.name or state.seq != size - 1:
            raise SnapshotError(f"{path.name}: names size {size}, state at seq {state.seq}")
        if CompactTree(frontier, size).root() != root or len(prev) != 32:
            raise SnapshotError(f"{path.name}: frontier does not give the snapshot's root")
        prefix = TrustedPrefix(size, bytes(root), tuple(frontier), bytes(prev), int(last_ts))
        return Snapshot(prefix, state, path)
    except SnapshotError:
        raise
    except FileProblem as exc:
        raise SnapshotError(str(exc)) from None
    except nacl.exceptions.BadSignatureError:
        raise SnapshotError(f"{path.name}: signature does not verify") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            msgpack.UnpackException) as exc:
        raise SnapshotError(f"{path.name}: malformed ({type(exc).__name__})") from None


def prune(directory: Path, keep: int) -> None:
    for old in listing(directory)[keep:]:
        old.unlink(missing_ok=True)

