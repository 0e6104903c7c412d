"""RFC 9162 section 2.1 Merkle hash trees over SHA-256.

Leaves are hashed as ``SHA-256(0x00 || data)`` and interior nodes as
``SHA-256(0x01 || left || right)``.  Every ``leaves`` argument below is a
sequence of 32-byte *leaf hashes*, not raw entries; the bulk functions do not
re-check each element's length (that is the caller's contract), while the
verifiers check every byte string they are handed, because proofs come from
outside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ledger.errors import LedgerDataError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactTree",
    "ProofError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


class ProofError(LedgerDataError):
    """An inclusion or consistency proof is malformed or does not verify."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 9162 hash of one leaf entry."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 hash of an interior node."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _short(digest: bytes) -> str:
    return digest[:4].hex() + "..."


def _split_point(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(leaves: Sequence[bytes]) -> bytes:
    """MTH of ``leaves``, level by level: pair up nodes, promote an odd last one.

    Promoting the odd node unchanged yields exactly the RFC's left-balanced
    tree (split at the largest power of two), without recursion.
    """
    count = len(leaves)
    if count == 0:
        return EMPTY_ROOT
    level = leaves
    sha, prefix = _sha256, _NODE_PREFIX
    while count > 1:
        pairs = iter(level)
        nxt = [sha(prefix + a + b).digest() for a, b in zip(pairs, pairs, strict=False)]
        if count & 1:
            nxt.append(level[-1])
        level, count = nxt, len(nxt)
    return level[0]


def root_from_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """Return MTH(D[0:n]) for the leaf hashes ``leaves`` (EMPTY_ROOT when empty)."""
    return _mth(leaves)


class CompactTree:
    """Append-only Merkle tree that keeps only its frontier.

    The frontier is the list of roots of the perfect subtrees that make up the
    tree, largest (leftmost) first: one per set bit of ``size``.
    """

    __slots__ = ("_frontier", "_size")

    def __init__(self, frontier: Sequence[bytes] = (), size: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"tree size must be a non-negative int, got {size!r}")
        if len(frontier) != size.bit_count():
            raise ValueError(
                f"a tree of size {size} has {size.bit_count()} frontier hashes, got {len(frontier)}"
            )
        for i, digest in enumerate(frontier):
            if not isinstance(digest, bytes) or len(digest) != HASH_SIZE:
                raise ValueError(f"frontier hash {i} is not {HASH_SIZE} bytes")
        self._frontier: list[bytes] = list(frontier)
        self._size = size

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash; amortised one node hash per call."""
        if type(leaf_hash) is not bytes or len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
        frontier = self._frontier
        size = self._size
        self._size = size + 1
        digest = leaf_hash
        while size & 1:
            digest = _sha256(_NODE_PREFIX + frontier.pop() + digest).digest()
            size >>= 1
        frontier.append(digest)

    def extend(self, leaf_hashes: Sequence[bytes]) -> None:
        """Append many leaf hashes at once: the same tree as appending each, level by level.

        At each height the pending left node (if the size has that bit set) joins the
        new nodes, pairs are hashed in one comprehension, and an odd last node stays
        in the frontier.  Lengths are the caller's contract (see the module note).
        """
        if len(leaf_hashes) < 8:  # a writer with one appender commits one record a batch
            for leaf in leaf_hashes:
                self.append(leaf)
            return
        sha, prefix = _sha256, _NODE_PREFIX
        old = self._size
        # frontier hashes of the old tree by height: the i-th set bit from the top.
        by_height = {h: d for h, d in zip(
            (h for h in range(old.bit_length() - 1, -1, -1) if old >> h & 1),
            self._frontier, strict=True)}
        level = list(leaf_hashes)
        pos = old  # index, at this height, of level[0]
        keep: dict[int, bytes] = {}
        height = 0
        while level:
            if pos & 1:  # a left sibling waits in the frontier
                level.insert(0, by_height[height])
                pos -= 1
            if len(level) & 1:
                keep[height] = level.pop()
            pairs = iter(level)
            level = [sha(prefix + a + b).digest() for a, b in zip(pairs, pairs, strict=True)]
            pos >>= 1
            height += 1
        new = old + len(leaf_hashes)
        # heights above the new nodes keep their old frontier hashes.
        for h, d in by_height.items():
            if h >= height:
                keep[h] = d
        self._frontier = [keep[h] for h in range(new.bit_length() - 1, -1, -1) if new >> h & 1]
        self._size = new

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def root(self) -> bytes:
        """Return the tree head hash MTH(D[0:size])."""
        frontier = self._frontier
        if not frontier:
            return EMPTY_ROOT
        digest = frontier[-1]
        for i in range(len(frontier) - 2, -1, -1):
            digest = _sha256(_NODE_PREFIX + frontier[i] + digest).digest()
        return digest

    def frontier(self) -> tuple[bytes, ...]:
        """Return the perfect-subtree roots, largest first (for snapshots)."""
        return tuple(self._frontier)

    def copy(self) -> CompactTree:
        """Return an independent copy."""
        clone = CompactTree.__new__(CompactTree)
        clone._frontier = list(self._frontier)
        clone._size = self._size
        return clone

    def __repr__(self) -> str:
        return f"CompactTree(size={self._size}, root={self.root().hex()})"


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Return PATH(index, D[0:size]) (RFC 9162 section 2.1.3.1), bottom-up."""
    if not 0 <= size <= len(leaves):
        raise ValueError(f"tree size {size} outside 0..{len(leaves)}")
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside a tree of size {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        mid = lo + _split_point(hi - lo)
        if index < mid:
            proof.append(_mth(leaves[mid:hi]))
            hi = mid
        else:
            proof.append(_mth(leaves[lo:mid]))
            lo = mid
    proof.reverse()
    return proof


def consistency_proof(leaves: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """Return PROOF(old_size, D[0:new_size]) (RFC 9162 section 2.1.4.1), bottom-up."""
    if not 0 < old_size <= new_size <= len(leaves):
        raise ValueError(
            f"need 0 < old_size <= new_size <= {len(leaves)}, got {old_size}, {new_size}"
        )
    proof: list[bytes] = []
    lo, hi, m, complete = 0, new_size, old_size, True
    while m != hi - lo:
        mid = lo + _split_point(hi - lo)
        if m <= mid - lo:
            proof.append(_mth(leaves[mid:hi]))
            hi = mid
        else:
            proof.append(_mth(leaves[lo:mid]))
            m -= mid - lo
            lo, complete = mid, False
    if not complete:
        proof.append(_mth(leaves[lo:hi]))
    proof.reverse()
    return proof


def _inclusion_steps(index: int, size: int) -> list[bool]:
    """Dry run of the section 2.1.3.2 loop: per proof hash, is it a left sibling?"""
    fn, sn = index, size - 1
    steps: list[bool] = []
    while sn:
        if fn & 1 or fn == sn:
            steps.append(True)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            steps.append(False)
        fn, sn = fn >> 1, sn >> 1
    return steps


def _consistency_steps(old_size: int, new_size: int) -> list[bool]:
    """Dry run of the section 2.1.4.2 loop over consistency_path[1:]."""
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    return _inclusion_steps(fn, sn + 1)


def _check_hashes(what: str, named: Sequence[tuple[str, bytes]], proof: Sequence[bytes]) -> None:
    for name, digest in named:
        if not isinstance(digest, bytes) or len(digest) != HASH_SIZE:
            raise ProofError(f"{what}: {name} is not a {HASH_SIZE}-byte hash")
    for i, digest in enumerate(proof):
        if not isinstance(digest, bytes) or len(digest) != HASH_SIZE:
            raise ProofError(f"{what}: proof hash {i} is not a {HASH_SIZE}-byte hash")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``."""
    what = f"inclusion proof for leaf {index} in tree of size {size}"
    _check_hashes(what, (("leaf hash", leaf_hash), ("root", root)), proof)
    if not 0 <= index < size:
        raise ProofError(f"{what}: leaf index out of range")
    steps = _inclusion_steps(index, size)
    if len(proof) != len(steps):
        raise ProofError(f"{what}: proof has {len(proof)} hashes, expected {len(steps)}")
    digest = leaf_hash
    for sibling, is_left in zip(proof, steps, strict=True):
        pair = sibling + digest if is_left else digest + sibling
        digest = _sha256(_NODE_PREFIX + pair).digest()
    if digest != root:
        raise ProofError(
            f"{what}: computed root {_short(digest)} does not match expected {_short(root)}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (new_size, new_root) extends (old_size, old_root)."""
    what = f"consistency proof from size {old_size} to {new_size}"
    _check_hashes(what, (("old root", old_root), ("new root", new_root)), proof)
    if not 0 <= old_size <= new_size:
        raise ProofError(f"{what}: sizes must satisfy 0 <= old <= new")
    if old_size == new_size or old_size == 0:
        _verify_trivial_consistency(what, old_size, new_size, old_root, new_root, proof)
        return
    steps = _consistency_steps(old_size, new_size)
    old_is_perfect = old_size & (old_size - 1) == 0
    expected = len(steps) + (0 if old_is_perfect else 1)
    if len(proof) != expected:
        raise ProofError(f"{what}: proof has {len(proof)} hashes, expected {expected}")
    path = [old_root, *proof] if old_is_perfect else list(proof)
    fr = sr = path[0]
    for c, is_left in zip(path[1:], steps, strict=True):
        if is_left:
            fr = _sha256(_NODE_PREFIX + c + fr).digest()
            sr = _sha256(_NODE_PREFIX + c + sr).digest()
        else:
            sr = _sha256(_NODE_PREFIX + sr + c).digest()
    if fr != old_root:
        raise ProofError(
            f"{what}: computed old root {_short(fr)} does not match expected {_short(old_root)}"
        )
    if sr != new_root:
        raise ProofError(
            f"{what}: computed new root {_short(sr)} does not match expected {_short(new_root)}"
        )


def _verify_trivial_consistency(
    what: str,
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Equal sizes need equal roots; an empty old tree needs the empty root."""
    if proof:
        raise ProofError(f"{what}: proof has {len(proof)} hashes, expected 0")
    if old_size == new_size and old_root != new_root:
        raise ProofError(
            f"{what}: roots of equal-size trees differ ({_short(old_root)} vs {_short(new_root)})"
        )
    if old_size == 0 and old_root != EMPTY_ROOT:
        raise ProofError(f"{what}: old root {_short(old_root)} is not the empty-tree root")
