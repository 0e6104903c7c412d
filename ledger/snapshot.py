"""Signed snapshots: the folded state at a checkpoint, so start-up skips the fold.

A snapshot file holds ``msgpack([payload, signature])``; the payload is
``msgpack(["ppn-snapshot", 1, tree_size, root, state])`` and the signature is the
node key's Ed25519 signature over a context string and the payload.  A snapshot is
trusted only if its signature verifies *and* its root equals the log's checkpoint
root at the same size; replay from it must equal a full replay (verify checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.bindings
import nacl.exceptions

from ledger.errors import LedgerDataError
from ledger.keys import NodeKeys
from ledger.nodes import atomic_write
from ledger.state import State

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_RE = re.compile(r"^snap-(\d{20})\.bin$")
_CONTEXT = b"ppn/ledger/snapshot/v1\x00"
_MAX_SNAPSHOT = 1 << 30


class SnapshotError(LedgerDataError):
    """A snapshot file is malformed, unsigned by the ledger's key, or does not match the log."""


@dataclass(frozen=True)
class Snapshot:
    tree_size: int
    root: bytes
    state: State
    path: Path


def write(directory: Path, keys: NodeKeys, tree_size: int, root: bytes, state: State) -> Path:
    payload: bytes = msgpack.packb(["ppn-snapshot", 1, tree_size, root, state.to_obj()],
                                   use_bin_type=True)
    blob: bytes = msgpack.packb([payload, keys.sign(_CONTEXT + payload)], use_bin_type=True)
    sdir = directory / SNAPSHOT_DIR
    sdir.mkdir(mode=0o755, exist_ok=True)
    path = sdir / f"snap-{tree_size:020d}.bin"
    atomic_write(path, blob, mode=0o444)
    return path


def listing(directory: Path) -> list[Path]:
    """Snapshot files, newest first."""
    sdir = directory / SNAPSHOT_DIR
    if not sdir.is_dir():
        return []
    return sorted((p for p in sdir.iterdir() if SNAPSHOT_RE.match(p.name)), reverse=True)


def load(path: Path, public_key: bytes) -> Snapshot:
    """Read and authenticate one snapshot; :class:`SnapshotError` says why not."""
    try:
        if path.stat().st_size > _MAX_SNAPSHOT:
            raise SnapshotError(f"{path.name}: larger than {_MAX_SNAPSHOT} bytes")
        outer = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        payload, sig = outer
        nacl.bindings.crypto_sign_open(sig + _CONTEXT + payload, public_key)
        magic, fmt, size, root, obj = msgpack.unpackb(payload, raw=False,
                                                      strict_map_key=False)
        if magic != "ppn-snapshot" or fmt != 1:
            raise SnapshotError(f"{path.name}: not a version 1 snapshot")
        state = State.from_obj(obj)
        if f"snap-{size:020d}.bin" != path.name or state.seq != size - 1:
            raise SnapshotError(f"{path.name}: names size {size}, state at seq {state.seq}")
        return Snapshot(size, bytes(root), state, path)
    except SnapshotError:
        raise
    except nacl.exceptions.BadSignatureError:
        raise SnapshotError(f"{path.name}: signature does not verify") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            msgpack.UnpackException) as exc:
        raise SnapshotError(f"{path.name}: malformed ({type(exc).__name__})") from None


def prune(directory: Path, keep: int) -> None:
    for old in listing(directory)[keep:]:
        old.unlink(missing_ok=True)

