"""The auditor's view: verify a ledger directory, rebuild state, make and check proofs.

Everything here reads; nothing writes.  Every function takes a ledger directory
(the ``ledger/`` inside a node's state directory).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import merkle, nodes, snapshot, verifier
from ledger.errors import LedgerUsageError
from ledger.files import FileProblem, read_bounded, written_end_of
from ledger.log import check_anchor, note_checkpoint, read_anchor, read_note_at, writer_active
from ledger.note import NoteError, verifier_key
from ledger.proofcheck import check_proof
from ledger.scan import Entry, LedgerCorrupt, LogReader, ScanResult, list_segments
from ledger.state import State, apply, apply_items

__all__ = ["KeptNote", "LogPass", "VerifyReport", "check_extends", "check_proof",
           "checkpoint_note", "entries", "prove_consistency", "prove_inclusion",
           "public_verifier_key", "state_at", "verify"]

KeptNote = tuple[str, bytes]
"""A checkpoint note someone kept earlier (``ppn ledger checkpoint DIR > note``), and
the name to report it by."""


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
    extends: tuple[tuple[str, int], ...] = ()
    """(name, size) of each kept checkpoint the log was shown to extend."""

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        kept = "".join(f"; extends {name} (size {size})" for name, size in self.extends)
        return (f"ok: {self.records} records, {self.checkpoints} checkpoints, "
                f"{self.segments} segments, {self.snapshots} snapshots, {self.members} "
                f"members; root {self.root.hex()}; signer {self.verifier_key}{kept}; "
                f"{self.seconds:.2f}s ({rate:,.0f} records/s)")


def _vkey(scan: ScanResult) -> str:
    assert scan.genesis is not None
    return verifier_key(scan.genesis.origin, scan.genesis.signing_key)


def verify(directory: Path, *, pinned_key: bytes | None = None,
           progress: Callable[[int, int], None] | None = None,
           jobs: int | None = None, against: Sequence[KeptNote] = ()) -> VerifyReport:
    """Check every record, signature, checkpoint, snapshot and nodes.jsonl.

    Raises :class:`LedgerCorrupt` naming the first failure.  A torn tail -- which
    opening for writing would truncate -- is a failure here: verify audits what is
    on disk.  ``jobs`` (default: the CPU count) above 1 lets a large log's
    hash-chain, Merkle and checkpoint checks run in a second process (:mod:`ledger.verifier`).
    ``against``: checkpoints kept earlier; the log must extend each (:func:`check_extends`).
    """
    started = time.perf_counter()
    snaps = {int(p.name[5:25]): p for p in snapshot.listing(directory)}
    snap_states: dict[int, dict[str, Any]] = {}

    # Read before the log: a writer appending meanwhile rewrites the anchor at a roll
    # to a size this pass does not read; the older one is in what it reads.  So with
    # nodes.jsonl, which a running node rewrites after each commit that changes it.
    anchor = read_anchor(directory)
    seen = _LiveNodes.read(directory)

    def committed(size: int, state: State) -> None:
        if size in snaps:
            snap_states[size] = state.to_obj()
        if seen is not None:
            seen.compare(size, state)

    scan, state = verifier.audit_fold(directory, pinned_key=pinned_key, progress=progress,
                                      on_commit=committed, jobs=jobs)
    _check_log_end(directory, scan, anchor)
    extends = tuple((name, check_extends(scan, name, note)) for name, note in against)
    _verify_snapshots(scan, snaps, snap_states)
    if seen is None or not seen.matched(scan):
        _verify_nodes(directory, state)
    return VerifyReport(scan.size, scan.checkpoints, len(scan.segments), len(snaps),
                        len(state.members), scan.tree.root(), _vkey(scan),
                        time.perf_counter() - started, extends)


def _check_log_end(directory: Path, scan: ScanResult, anchor: bytes | None) -> None:
    """What every reader checks after its pass: no uncommitted tail, and the anchor
    (read before the pass) is the log's own checkpoint at its size."""
    if scan.tail is not None:
        t = scan.tail
        raise LedgerCorrupt(t.segment.name, t.offset, scan.size,
                            f"uncommitted tail: {t.describe()}; opening the ledger for "
                            "writing truncates it")
    if anchor is None and len(scan.segments) > 1:
        anchor = read_anchor(directory)  # a first roll may have written it meanwhile
    check_anchor(scan, anchor)


def check_extends(scan: ScanResult, name: str, note: bytes) -> int:
    """The log ``scan`` read extends the checkpoint ``note`` (kept earlier, reported as
    ``name``): it is signed by this ledger's key, and the log's own checkpoint at its
    size has the same root.  Returns that size; :class:`LedgerCorrupt` naming the note
    on a rollback (the log is shorter) or a fork (another history at that size)."""
    try:
        cp = note_checkpoint(note, scan)
    except NoteError as exc:
        raise LedgerCorrupt(name, 0, None, f"kept checkpoint: {exc} (not a checkpoint "
                            "signed by this ledger's key)") from None
    if cp.size > scan.size:
        raise LedgerCorrupt(name, 0, cp.size - 1, (
            f"the log has {scan.size} committed records, fewer than the kept checkpoint's "
            f"{cp.size}: it was rolled back"))
    where = scan.notes.get(cp.size)
    if where is None:
        raise LedgerCorrupt(name, 0, cp.size - 1, (
            f"the log has no checkpoint at size {cp.size}, so it is not the history this "
            "checkpoint was signed for: a fork"))
    if note_checkpoint(read_note_at(where), scan).root_hash != cp.root_hash:
        raise LedgerCorrupt(name, 0, cp.size - 1, (
            f"the log's root at size {cp.size} differs from the kept checkpoint's: the "
            "history was rewritten (a fork)"))
    return cp.size


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


class _LiveNodes:
    """nodes.jsonl of a ledger a node has open, as read before the pass.

    The node rewrites it after each commit that changes membership, so it may have
    changed between that read and the moment the pass fixed the log's length.  It
    must then render the membership of a state the pass met no earlier than the
    batch before the last one already written when it was read (the node writes it
    right after each commit) -- never older.  Without a node running, nodes.jsonl
    must be exactly the end state's (:func:`_verify_nodes`).
    """

    def __init__(self, data: bytes, written: tuple[int, int]) -> None:
        self.digest, self.written = hashlib.sha256(data).digest(), written
        self._version = -1
        self._seen: list[tuple[int, bytes]] = []  # (size, digest) at each change

    @classmethod
    def read(cls, directory: Path) -> _LiveNodes | None:
        if not writer_active(directory):
            return None
        written = _written_so_far(directory)
        try:
            data = read_bounded(directory / nodes.NODES_FILE, 16 << 20, nodes.NODES_FILE)
        except FileProblem:
            return None  # the check after the pass says what is wrong with it
        return None if data is None else cls(data, written)

    def compare(self, size: int, state: State) -> None:
        """After each committed batch: render only when membership may have changed."""
        counts = state.event_counts
        version = counts.get("mesh.member_added", 0) + counts.get("mesh.member_removed", 0)
        if version != self._version:
            self._version = version
            self._seen.append((size, hashlib.sha256(nodes.render(state)).digest()))

    def matched(self, scan: ScanResult) -> bool:
        floor = _size_before(scan, self.written)
        current = [d for size, d in self._seen if size <= floor][-1:]
        return self.digest in current + [d for size, d in self._seen if size > floor]


def _written_so_far(directory: Path) -> tuple[int, int]:
    """(first seq of the last segment, its written end) now: where the log ends."""
    segs = list_segments(directory)
    if not segs:
        return (0, 0)
    first, path = segs[-1]
    return first, written_end_of(path)


def _size_before(scan: ScanResult, written: tuple[int, int]) -> int:
    """The tree size of the last checkpoint but one that ended before ``written``."""
    before: list[int] = []
    for size in scan.notes:
        where = scan.notes.get(size)
        assert where is not None
        path, off = where
        if (int(path.name[4:24]), off) < written:
            before = [*before[-1:], size]
    return before[0] if before else 0


def _verify_nodes(directory: Path, state: State) -> None:
    expected = nodes.render(state)
    path = directory / nodes.NODES_FILE
    try:
        actual = read_bounded(path, len(expected) + 4096, "nodes.jsonl of this log")
    except FileProblem as exc:
        raise LedgerCorrupt(nodes.NODES_FILE, 0, None, exc.reason) from None
    if actual is None:
        raise LedgerCorrupt(nodes.NODES_FILE, 0, None, "missing")
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


class LogPass:
    """One full pass over a ledger for a read command, with the checks verify makes of
    the log's end: the anchor (read before the pass) and no uncommitted tail.

    A read command reads to the end even when it prints less, so that it never
    reports from a log that is damaged, torn or shorter than its anchor without
    saying so.  ``verify=False`` checksums and strictly decodes; ``verify=True`` also
    checks the hash chain, the tree and every signature.
    """

    def __init__(self, directory: Path, *, verify: bool = False,
                 collect_leaves: bool = False) -> None:
        self.directory = directory
        self.anchor = read_anchor(directory)
        self.reader = LogReader(directory, verify=verify, collect_leaves=collect_leaves)

    def entries(self) -> Iterator[Entry]:
        yield from self.reader.entries()
        _check_log_end(self.directory, self.reader.result, self.anchor)

    def run(self) -> ScanResult:
        self.reader.run()
        _check_log_end(self.directory, self.reader.result, self.anchor)
        return self.reader.result


def entries(directory: Path) -> Iterator[Entry]:
    """Committed entries, checksummed and strictly decoded (``verify`` does the crypto);
    the log's end is checked after the last (:class:`LogPass`)."""
    return LogPass(directory).entries()


def state_at(directory: Path, seq: int | None = None) -> State:
    """The state folded up to and including record ``seq`` (default: the end)."""
    if seq is not None and seq < 0:
        raise LedgerUsageError(f"there is no record {seq}: sequence numbers start at 0")
    state = State()
    if seq is None:
        p = LogPass(directory)
        p.reader.fold(state, apply_items)
        _check_log_end(directory, p.reader.result, p.anchor)
        return state
    for e in entries(directory):
        if e.seq <= seq:
            apply(state, e.event, e.seq, e.ts_ns, e.signature)
    if state.seq < seq:
        raise LedgerUsageError(f"the ledger has no record {seq} (last is {state.seq})")
    return state


def _scan_all(directory: Path, collect_leaves: bool = False) -> ScanResult:
    return LogPass(directory, verify=True, collect_leaves=collect_leaves).run()


def checkpoint_note(directory: Path, size: int | None = None) -> bytes:
    """The newest stored checkpoint note, or the one for tree ``size``, byte-exact."""
    scan = _scan_all(directory)
    key = scan.size if size is None else size
    where = scan.notes.get(key)
    if where is None:
        raise LedgerUsageError(f"no checkpoint for size {key}; sizes with one run from "
                               f"{next(iter(scan.notes))} to {scan.size}")
    return read_note_at(where)


def public_verifier_key(directory: Path) -> str:
    return _vkey(_scan_all(directory))


def prove_inclusion(directory: Path, seq: int, size: int | None = None) -> dict[str, Any]:
    p = LogPass(directory, verify=True, collect_leaves=True)
    body = b""
    for e in p.entries():
        if e.seq == seq:
            body = e.body
    scan = p.reader.result
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
    scan = _scan_all(directory, collect_leaves=True)
    assert scan.leaves is not None and scan.genesis is not None
    for n in (old, new):
        if n not in scan.notes:
            raise LedgerUsageError(f"no checkpoint for size {n}")
    if not 0 < old <= new:
        raise LedgerUsageError(f"need 0 < OLD <= NEW, got {old} and {new}")
    return {"kind": "consistency", "origin": scan.genesis.origin, "old_size": old,
            "new_size": new,
            "proof": [h.hex() for h in merkle.consistency_proof(scan.leaves, old, new)]}
