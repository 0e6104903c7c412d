"""Tests for ledger.merkle (RFC 9162 section 2.1 Merkle trees)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerDataError
from ledger.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# --- Published vectors --------------------------------------------------------------------
# The eight RFC 6962 test leaves and the tree heads for sizes 1..8, as used by Certificate
# Transparency's reference implementations: github.com/transparency-dev/merkle,
# testonly/constants.go (LeafInputs, RootHashes, NodeHashes, CompactTrees) and
# proof/verify_test.go (inclusionProofs, consistencyProofs; leaf numbers there are 1-based).

LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
LEAVES = [leaf_hash(d) for d in LEAF_INPUTS]

ROOTS = {  # tree size -> MTH
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}

NODES = [  # NodeHashes: level -> perfect aligned subtree roots, left to right
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]

# CompactTrees: the frontier after each size, as (level, index) into NODES.
FRONTIERS = {
    0: [],
    1: [(0, 0)],
    2: [(1, 0)],
    3: [(1, 0), (0, 2)],
    4: [(2, 0)],
    5: [(2, 0), (0, 4)],
    6: [(2, 0), (1, 2)],
    7: [(2, 0), (1, 2), (0, 6)],
    8: [(3, 0)],
}

# (0-based leaf index, tree size, audit path)
INCLUSION_VECTORS = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# (old size, new size, consistency proof)
CONSISTENCY_VECTORS = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


# --- Reference implementation, straight from the RFC 9162 definitions ----------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes, recursively (section 2.1.1)."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return d[0]
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (section 2.1.3.1)."""
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (section 2.1.4.1)."""
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def random_leaves(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(count)]


def hexes(values: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


# --- Vector tests ------------------------------------------------------------------------


def test_constants() -> None:
    assert HASH_SIZE == 32
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == bytes.fromhex(ROOTS[0])
    assert issubclass(ProofError, LedgerDataError)


def test_leaf_and_node_hash_prefixes() -> None:
    assert leaf_hash(b"") == bytes.fromhex(NODES[0][0])
    assert leaf_hash(b"\x00") == bytes.fromhex(NODES[0][1])
    assert node_hash(LEAVES[0], LEAVES[1]) == bytes.fromhex(NODES[1][0])


def test_published_leaf_and_node_hashes() -> None:
    for level, row in enumerate(NODES):
        width = 1 << level
        for i, expected in enumerate(row):
            assert root_from_leaf_hashes(LEAVES[i * width : (i + 1) * width]).hex() == expected


@pytest.mark.parametrize("size", range(9))
def test_published_roots(size: int) -> None:
    assert root_from_leaf_hashes(LEAVES[:size]).hex() == ROOTS[size]
    tree = CompactTree()
    for leaf in LEAVES[:size]:
        tree.append(leaf)
    assert tree.size == size
    assert tree.root().hex() == ROOTS[size]
    assert [h.hex() for h in tree.frontier()] == [NODES[lv][i] for lv, i in FRONTIERS[size]]


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION_VECTORS)
def test_published_inclusion_proofs(index: int, size: int, path: list[str]) -> None:
    assert inclusion_proof(LEAVES, index, size) == hexes(path)
    verify_inclusion(LEAVES[index], index, size, hexes(path), bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY_VECTORS)
def test_published_consistency_proofs(old: int, new: int, path: list[str]) -> None:
    assert consistency_proof(LEAVES, old, new) == hexes(path)
    old_root, new_root = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    verify_consistency(old, new, old_root, new_root, hexes(path))


# --- Agreement with the reference --------------------------------------------------------

RANDOM_SIZES = [*range(71), *random.Random(7).sample(range(71, 1500), 12), 1024, 1025]


@pytest.mark.parametrize("size", RANDOM_SIZES)
def test_root_matches_reference(size: int) -> None:
    leaves = random_leaves(size, seed=size)
    expected = ref_mth(leaves)
    assert root_from_leaf_hashes(leaves) == expected
    tree = CompactTree()
    for leaf in leaves:
        tree.append(leaf)
    assert tree.root() == expected
    restored = CompactTree(tree.frontier(), tree.size)
    assert restored.root() == expected


def test_compact_tree_roots_at_every_size() -> None:
    leaves = random_leaves(300, seed=1)
    tree = CompactTree()
    assert tree.root() == EMPTY_ROOT
    for n, leaf in enumerate(leaves, 1):
        tree.append(leaf)
        assert tree.root() == ref_mth(leaves[:n])
        assert len(tree.frontier()) == n.bit_count()


@pytest.mark.parametrize("size", range(1, 41))
def test_all_proofs_match_reference_and_verify(size: int) -> None:
    leaves = random_leaves(size + 3, seed=1000 + size)  # longer than the tree on purpose
    root = ref_mth(leaves[:size])
    for index in range(size):
        proof = inclusion_proof(leaves, index, size)
        assert proof == ref_path(index, leaves[:size])
        verify_inclusion(leaves[index], index, size, proof, root)
    for old in range(1, size + 1):
        proof = consistency_proof(leaves, old, size)
        assert proof == ref_subproof(old, leaves[:size], True)
        verify_consistency(old, size, ref_mth(leaves[:old]), root, proof)


@pytest.mark.parametrize("size", random.Random(11).sample(range(41, 3000), 6))
def test_random_larger_proofs(size: int) -> None:
    leaves = random_leaves(size, seed=size)
    root = root_from_leaf_hashes(leaves)
    rng = random.Random(size)
    for _ in range(10):
        index = rng.randrange(size)
        proof = inclusion_proof(leaves, index, size)
        assert proof == ref_path(index, leaves)
        verify_inclusion(leaves[index], index, size, proof, root)
        old = rng.randrange(1, size + 1)
        proof = consistency_proof(leaves, old, size)
        assert proof == ref_subproof(old, leaves, True)
        verify_consistency(old, size, root_from_leaf_hashes(leaves[:old]), root, proof)


# --- CompactTree API ---------------------------------------------------------------------


def test_compact_tree_validation() -> None:
    h = b"\x11" * 32
    with pytest.raises(ValueError):
        CompactTree([h], 2 + 1)  # size 3 needs two frontier hashes
    with pytest.raises(ValueError):
        CompactTree([], 1)
    with pytest.raises(ValueError):
        CompactTree([b"short"], 1)
    with pytest.raises(ValueError):
        CompactTree([], -1)
    with pytest.raises(ValueError):
        CompactTree([h], True)
    tree = CompactTree([h, h], 5)
    assert tree.size == 5
    with pytest.raises(ValueError):
        tree.append(b"\x00" * 31)
    with pytest.raises(ValueError):
        tree.append(bytearray(32))  # type: ignore[arg-type]
    assert tree.size == 5


def test_compact_tree_resume_and_copy() -> None:
    leaves = random_leaves(100, seed=3)
    tree = CompactTree()
    for leaf in leaves[:37]:
        tree.append(leaf)
    resumed = CompactTree(tree.frontier(), tree.size)
    clone = tree.copy()
    for leaf in leaves[37:]:
        resumed.append(leaf)
    assert resumed.root() == root_from_leaf_hashes(leaves)
    assert clone.size == 37 and tree.size == 37
    clone.append(leaves[37])
    assert tree.size == 37 and clone.size == 38
    assert tree.root() == root_from_leaf_hashes(leaves[:37])
    assert "size=37" in repr(tree)


# --- Argument checking -------------------------------------------------------------------


def test_proof_generation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 8, 8)
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, -1, 8)
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 0, 9)
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 0, 0)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 0, 3)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 4, 3)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 3, 9)
    assert consistency_proof(LEAVES, 5, 5) == []


def test_verify_inclusion_edge_cases() -> None:
    root = bytes.fromhex(ROOTS[8])
    for index, size in [(0, 0), (8, 8), (-1, 8), (1, 1)]:
        with pytest.raises(ProofError, match="out of range"):
            verify_inclusion(LEAVES[0], index, size, [], root)
    with pytest.raises(ProofError, match="leaf hash"):
        verify_inclusion(b"x", 0, 1, [], root)
    with pytest.raises(ProofError, match="root"):
        verify_inclusion(LEAVES[0], 0, 1, [], root[:31])
    with pytest.raises(ProofError, match="proof hash 1"):
        verify_inclusion(LEAVES[0], 0, 8, [root, b"", root], root)
    verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])  # one-leaf tree: root is the leaf


def test_verify_inclusion_messages() -> None:
    proof = inclusion_proof(LEAVES, 5, 8)
    root = bytes.fromhex(ROOTS[8])
    with pytest.raises(
        ProofError, match=r"leaf 5 in tree of size 8: proof has 2 hashes, expected 3"
    ):
        verify_inclusion(LEAVES[5], 5, 8, proof[:2], root)
    with pytest.raises(
        ProofError, match=r"computed root [0-9a-f]{8}\.\.\. does not match expected"
    ):
        verify_inclusion(LEAVES[4], 5, 8, proof, root)


def test_verify_consistency_edge_cases() -> None:
    r3, r5 = bytes.fromhex(ROOTS[3]), bytes.fromhex(ROOTS[5])
    verify_consistency(3, 3, r3, r3, [])
    verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ProofError, match="differ"):
        verify_consistency(3, 3, r3, r5, [])
    with pytest.raises(ProofError, match="expected 0"):
        verify_consistency(3, 3, r3, r3, [r3])
    with pytest.raises(ProofError, match="empty-tree root"):
        verify_consistency(0, 5, r3, r5, [])
    with pytest.raises(ProofError, match="0 <= old <= new"):
        verify_consistency(5, 3, r5, r3, [])
    with pytest.raises(ProofError, match="0 <= old <= new"):
        verify_consistency(-1, 3, r5, r3, [])
    with pytest.raises(ProofError, match="proof has 0 hashes, expected 4"):
        verify_consistency(3, 5, r3, r5, [])
    with pytest.raises(ProofError, match="new root"):
        verify_consistency(3, 5, r3, b"", [])
    proof = consistency_proof(LEAVES, 3, 5)
    with pytest.raises(ProofError, match="computed old root"):
        verify_consistency(3, 5, r5, r5, proof)
    with pytest.raises(ProofError, match="computed new root"):
        verify_consistency(3, 5, r3, r3, proof)


# --- Tampering (hypothesis) ----------------------------------------------------------------

MAX_TAMPER_SIZE = 64
TAMPER_LEAVES = random_leaves(MAX_TAMPER_SIZE, seed=99)
TAMPER_ROOTS = [ref_mth(TAMPER_LEAVES[:n]) for n in range(MAX_TAMPER_SIZE + 1)]
sizes = st.integers(1, MAX_TAMPER_SIZE)
hashes32 = st.binary(min_size=32, max_size=32)


@st.composite
def inclusion_cases(draw: st.DrawFn) -> tuple[int, int, list[bytes]]:
    size = draw(sizes)
    index = draw(st.integers(0, size - 1))
    return index, size, inclusion_proof(TAMPER_LEAVES, index, size)


@st.composite
def consistency_cases(draw: st.DrawFn) -> tuple[int, int, list[bytes]]:
    new = draw(st.integers(2, MAX_TAMPER_SIZE))
    old = draw(st.integers(1, new - 1))
    return old, new, consistency_proof(TAMPER_LEAVES, old, new)


def flip(proof: list[bytes], data: st.DataObject) -> list[bytes]:
    i = data.draw(st.integers(0, len(proof) - 1))
    pos = data.draw(st.integers(0, HASH_SIZE - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(proof[i])
    damaged[pos] ^= mask
    return [*proof[:i], bytes(damaged), *proof[i + 1 :]]


def resize(proof: list[bytes], data: st.DataObject) -> list[bytes]:
    remove: bool = data.draw(st.booleans())
    if proof and remove:
        del_at = data.draw(st.integers(0, len(proof) - 1))
        return proof[:del_at] + proof[del_at + 1 :]
    extra = data.draw(st.one_of(hashes32, st.sampled_from([*proof, *TAMPER_ROOTS])))
    at = data.draw(st.integers(0, len(proof)))
    return [*proof[:at], extra, *proof[at:]]


@settings(max_examples=300)
@given(case=inclusion_cases(), data=st.data())
def test_tampered_inclusion_proofs_fail(
    case: tuple[int, int, list[bytes]], data: st.DataObject
) -> None:
    index, size, proof = case
    leaf, root = TAMPER_LEAVES[index], TAMPER_ROOTS[size]
    verify_inclusion(leaf, index, size, proof, root)
    kind = data.draw(st.sampled_from(["flip", "resize", "index", "size", "root", "leaf"]))
    args: tuple[bytes, int, int, list[bytes], bytes]
    if kind == "flip" and proof:
        args = (leaf, index, size, flip(proof, data), root)
    elif kind == "index":
        other = data.draw(st.integers(-2, size + 2).filter(lambda i: i != index))
        args = (leaf, other, size, proof, root)
    elif kind == "size":
        # A different size is presented with that size's real root (as a signed
        # checkpoint would); with the *original* root an RFC 9162 verifier cannot
        # always tell sizes apart, e.g. (0, 5) and (0, 6) walk the same path shape.
        other = data.draw(sizes.filter(lambda s: s != size))
        args = (leaf, index, other, proof, TAMPER_ROOTS[other])
    elif kind == "root":
        args = (leaf, index, size, proof, data.draw(hashes32.filter(lambda r: r != root)))
    elif kind == "leaf":
        args = (data.draw(hashes32.filter(lambda x: x != leaf)), index, size, proof, root)
    else:
        args = (leaf, index, size, resize(proof, data), root)
    with pytest.raises(ProofError):
        verify_inclusion(*args)


@settings(max_examples=300)
@given(case=consistency_cases(), data=st.data())
def test_tampered_consistency_proofs_fail(
    case: tuple[int, int, list[bytes]], data: st.DataObject
) -> None:
    old, new, proof = case
    old_root, new_root = TAMPER_ROOTS[old], TAMPER_ROOTS[new]
    verify_consistency(old, new, old_root, new_root, proof)
    kind = data.draw(st.sampled_from(["flip", "resize", "old", "new", "roots"]))
    args: tuple[int, int, bytes, bytes, list[bytes]]
    if kind == "flip":
        args = (old, new, old_root, new_root, flip(proof, data))
    elif kind == "old":
        other = data.draw(st.integers(1, new).filter(lambda s: s != old))
        args = (other, new, TAMPER_ROOTS[other], new_root, proof)
    elif kind == "new":
        other = data.draw(st.integers(old + 1, MAX_TAMPER_SIZE + 1).filter(lambda s: s != new))
        args = (old, other, old_root, TAMPER_ROOTS[min(other, MAX_TAMPER_SIZE)], proof)
    elif kind == "roots":
        bad = data.draw(hashes32.filter(lambda r: r not in (old_root, new_root)))
        pair = data.draw(st.sampled_from([(bad, new_root), (old_root, bad), (new_root, old_root)]))
        args = (old, new, pair[0], pair[1], proof)
    else:
        args = (old, new, old_root, new_root, resize(proof, data))
    with pytest.raises(ProofError):
        verify_consistency(*args)
