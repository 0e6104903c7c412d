"""The auditor's view: verify a ledger directory, rebuild state, make and check proofs.

Everything here reads; nothing writes.  Every function takes a ledger directory
(the ``ledger/`` inside a node's state directory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import merkle, nodes, snapshot, verifier
from ledger.errors import LedgerDataError, LedgerUsageError
from ledger.log import check_anchor, note_checkpoint, read_anchor, read_note_at
from ledger.note import Checkpoint, NoteVerifier, open_checkpoint, verifier_key
from ledger.scan import Entry, LedgerCorrupt, LogReader, ScanResult
from ledger.state import State, apply, apply_items


@dataclass(frozen=True)
class VerifyReport:
    records: int
    checkpoints: int
    segments: int
    snapshots: int
    members: int
    root: bytes
    verifier_key: str
    seconds: float

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        return (f"ok: {self.records} records, {self.checkpoints} checkpoints, "
                f"{self.segments} segments, {self.snapshots} snapshots, {self.members} "
                f"members; root {self.root.hex()}; signer {self.verifier_key}; "
                f"{self.seconds:.2f}s ({rate:,.0f} records/s)")


def _vkey(scan: ScanResult) -> str:
    assert scan.genesis is not None
    return verifier_key(scan.genesis.origin, scan.genesis.signing_key)


def verify(directory: Path, *, pinned_key: bytes | None = None,
           progress: Callable[[int, int], None] | None = None,
           jobs: int | None = None) -> VerifyReport:
    """Check every record, signature, checkpoint, snapshot and nodes.jsonl.

    Raises :class:`LedgerCorrupt` naming the first failure.  A torn tail -- which
    opening for writing would truncate -- is a failure here: verify audits what is
    on disk.  ``jobs`` (default: the CPU count) above 1 lets a large log's
    hash-chain, Merkle and checkpoint checks run in a second process (:mod:`ledger.verifier`).
    """
    started = time.perf_counter()
    snaps = {int(p.name[5:25]): p for p in snapshot.listing(directory)}
    snap_states: dict[int, dict[str, Any]] = {}

    def committed(size: int, state: State) -> None:
        if size in snaps:
            snap_states[size] = state.to_obj()

    # Read before the log: a writer appending meanwhile rewrites the anchor at a roll
    # to a size this pass does not read; the older one is in what it reads.
    anchor = read_anchor(directory)
    scan, state = verifier.audit_fold(directory, pinned_key=pinned_key, progress=progress,
                                      on_commit=committed, jobs=jobs)
    if scan.tail is not None:
        t = scan.tail
        raise LedgerCorrupt(t.segment.name, t.offset, scan.size,
                            f"uncommitted tail: {t.describe()}; opening the ledger for "
                            "writing truncates it")
    check_anchor(scan, anchor)
    _verify_snapshots(scan, snaps, snap_states)
    _verify_nodes(directory, state)
    return VerifyReport(scan.size, scan.checkpoints, len(scan.segments), len(snaps),
                        len(state.members), scan.tree.root(), _vkey(scan),
                        time.perf_counter() - started)


def _verify_snapshots(scan: ScanResult, snaps: dict[int, Path],
                      states: dict[int, dict[str, Any]]) -> None:
    assert scan.genesis is not None
    for size, path in sorted(snaps.items()):
        try:
            snap = snapshot.load(path, scan.genesis.signing_key)
        except snapshot.SnapshotError as exc:
            raise LedgerCorrupt(path.name, 0, size - 1, str(exc)) from None
        where = scan.notes.get(size)
        if where is None or note_checkpoint(read_note_at(where), scan).root_hash != snap.root:
            raise LedgerCorrupt(path.name, 0, size - 1,
                                "snapshot root matches no checkpoint of the log")
        if states.get(size) != snap.state.to_obj():
            raise LedgerCorrupt(path.name, 0, size - 1,
                                "snapshot state differs from replaying the log to that point")


def _verify_nodes(directory: Path, state: State) -> None:
    expected = nodes.render(state)
    path = directory / nodes.NODES_FILE
    try:
        actual = path.read_bytes()
    except FileNotFoundError:
        raise LedgerCorrupt(nodes.NODES_FILE, 0, None, "missing") from None
    if actual == expected:
        return
    exp_lines, act_lines = expected.splitlines(), actual.splitlines()
    for i in range(max(len(exp_lines), len(act_lines))):
        a = act_lines[i] if i < len(act_lines) else b"<missing>"
        x = exp_lines[i] if i < len(exp_lines) else b"<none>"
        if a != x:
            off = sum(len(line) + 1 for line in act_lines[:i])
            raise LedgerCorrupt(nodes.NODES_FILE, off, None,
                                f"line {i + 1} does not match the log: has {a[:80]!r}, "
                                f"log gives {x[:80]!r}")


def entries(directory: Path) -> Iterator[Entry]:
    """Committed entries, checksummed and strictly decoded (``verify`` does the crypto)."""
    return LogReader(directory, verify=False).entries()


def state_at(directory: Path, seq: int | None = None) -> State:
    """The state folded up to and including record ``seq`` (default: the end)."""
    state = State()
    if seq is None:
        LogReader(directory, verify=False).fold(state, apply_items)
        return state
    for e in entries(directory):
        if e.seq > seq:
            break
        apply(state, e.event, e.seq, e.ts_ns, e.signature)
    if seq is not None and state.seq < seq:
        raise LedgerUsageError(f"the ledger has no record {seq} (last is {state.seq})")
    return state


def _scan_all(directory: Path, collect_leaves: bool = False) -> LogReader:
    reader = LogReader(directory, collect_leaves=collect_leaves)
    reader.run()
    return reader


def checkpoint_note(directory: Path, size: int | None = None) -> bytes:
    """The newest stored checkpoint note, or the one for tree ``size``, byte-exact."""
    scan = _scan_all(directory).result
    key = scan.size if size is None else size
    where = scan.notes.get(key)
    if where is None:
        raise LedgerUsageError(f"no checkpoint for size {key}; sizes with one run from "
                               f"{next(iter(scan.notes))} to {scan.size}")
    return read_note_at(where)


def public_verifier_key(directory: Path) -> str:
    reader = LogReader(directory)
    next(iter(reader.entries()))
    return _vkey(reader.result)


def prove_inclusion(directory: Path, seq: int, size: int | None = None) -> dict[str, Any]:
    reader = LogReader(directory, collect_leaves=True)
    body = b""
    for e in reader.entries():
        if e.seq == seq:
            body = e.body
    scan = reader.result
    assert scan.leaves is not None and scan.genesis is not None
    n = scan.size if size is None else size
    if n not in scan.notes:
        raise LedgerUsageError(f"no checkpoint for size {n} to prove against")
    if not 0 <= seq < n:
        raise LedgerUsageError(f"record {seq} is not in a tree of size {n}")
    return {"kind": "inclusion", "origin": scan.genesis.origin, "leaf_index": seq,
            "tree_size": n, "leaf_hash": scan.leaves[seq].hex(), "record": body.hex(),
            "proof": [h.hex() for h in merkle.inclusion_proof(scan.leaves, seq, n)]}


def prove_consistency(directory: Path, old: int, new: int) -> dict[str, Any]:
    scan = _scan_all(directory, collect_leaves=True).result
    assert scan.leaves is not None and scan.genesis is not None
    for n in (old, new):
        if n not in scan.notes:
            raise LedgerUsageError(f"no checkpoint for size {n}")
    if not 0 < old <= new:
        raise LedgerUsageError(f"need 0 < OLD <= NEW, got {old} and {new}")
    return {"kind": "consistency", "origin": scan.genesis.origin, "old_size": old,
            "new_size": new,
            "proof": [h.hex() for h in merkle.consistency_proof(scan.leaves, old, new)]}


def check_proof(proof: dict[str, Any], checkpoint: bytes, vkey: str,
                old_checkpoint: bytes | None = None) -> str:
    """Verify a proof from :func:`prove_inclusion`/:func:`prove_consistency`.

    Returns a one-line confirmation; raises :class:`LedgerDataError` saying what failed.
    """
    verifier = NoteVerifier.from_string(vkey)
    cp = open_checkpoint(checkpoint, verifier)
    try:
        hashes = [bytes.fromhex(h) for h in proof["proof"]]
        kind = proof["kind"]
        if cp.origin != proof["origin"]:
            raise LedgerDataError(f"proof is for {proof['origin']!r}, checkpoint for "
                                  f"{cp.origin!r}")
        if kind == "inclusion":
            return _check_inclusion(proof, hashes, cp)
        if kind == "consistency":
            if old_checkpoint is None:
                raise LedgerUsageError("a consistency proof needs --old-checkpoint too")
            old = open_checkpoint(old_checkpoint, verifier)
            if (old.size, cp.size) != (proof["old_size"], proof["new_size"]):
                raise LedgerDataError(f"proof is for sizes {proof['old_size']}->"
                                      f"{proof['new_size']}, checkpoints are {old.size}->"
                                      f"{cp.size}")
            merkle.verify_consistency(old.size, cp.size, old.root_hash, cp.root_hash, hashes)
            return f"ok: tree {old.size} is a prefix of tree {cp.size} ({cp.origin})"
        raise LedgerDataError(f"unknown proof kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerDataError(f"malformed proof: {type(exc).__name__}: {exc}") from None


def _check_inclusion(proof: dict[str, Any], hashes: list[bytes], cp: Checkpoint) -> str:
    index, size = int(proof["leaf_index"]), int(proof["tree_size"])
    leaf = bytes.fromhex(proof["leaf_hash"])
    if "record" in proof and merkle.leaf_hash(bytes.fromhex(proof["record"])) != leaf:
        raise LedgerDataError("the record does not hash to the proof's leaf hash")
    if size != cp.size:
        raise LedgerDataError(f"proof is for tree size {size}, checkpoint is {cp.size}")
    merkle.verify_inclusion(leaf, index, size, hashes, cp.root_hash)
    return f"ok: record {index} is in tree {size} ({cp.origin})"
