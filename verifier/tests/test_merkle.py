"""Tests for gputrace_verifier.merkle against the RFC 9162 recursive definitions and known answers."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from gputrace_verifier import merkle
from gputrace_verifier.merkle import (
    EMPTY_ROOT,
    Coord,
    Frontier,
    consistency_proof,
    consistency_proof_coords,
    frontier_coords,
    inclusion_proof,
    inclusion_proof_coords,
    leaf_hash,
    new_nodes_on_append,
    node_hash,
    root_at,
    root_coords,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

MAX_N = 300
# Distinct leaves: with equal sibling hashes, H(a||a) is order-blind and a swapped-order
# tamper could pass for the wrong reason.
LEAVES = [f"gputrace test leaf {i}".encode() for i in range(MAX_N)]
LEAF_HASHES = [leaf_hash(d) for d in LEAVES]

# --------------------------------------------------------------------------- reference
# RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 transcribed literally (recursion over D[lo:hi]).
# Memoised on (lo, hi) because every tree under test is a prefix of the same LEAVES.


def _k(n: int) -> int:
    """Largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth_of(data: list[bytes]) -> bytes:
    """MTH(D_n) for an arbitrary list, no memoisation (used for the known-answer vectors)."""
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth_of(data[:k]) + ref_mth_of(data[k:])).digest()


@cache
def ref_mth(lo: int, hi: int) -> bytes:
    """MTH(LEAVES[lo:hi])."""
    n = hi - lo
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + LEAVES[lo]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + ref_mth(lo, lo + k) + ref_mth(lo + k, hi)).digest()


def ref_path(m: int, lo: int, hi: int) -> list[bytes]:
    """PATH(m, D[lo:hi]), m relative to lo."""
    n = hi - lo
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, lo, lo + k), ref_mth(lo + k, hi)]
    return [*ref_path(m - k, lo + k, hi), ref_mth(lo, lo + k)]


def ref_subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b), m relative to lo."""
    n = hi - lo
    if m == n:
        return [] if b else [ref_mth(lo, hi)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, lo, lo + k, b), ref_mth(lo + k, hi)]
    return [*ref_subproof(m - k, lo + k, hi, False), ref_mth(lo, lo + k)]


def ref_proof(m: int, n: int) -> list[bytes]:
    """PROOF(m, D_n) for 0 < m < n; the RFC defines no proof otherwise (we use [])."""
    if m == 0 or m == n:
        return []
    return ref_subproof(m, 0, n, True)


# --------------------------------------------------------------------------- fixtures


def _build_store() -> dict[Coord, bytes]:
    store: dict[Coord, bytes] = {}
    f = Frontier()
    for lh in LEAF_HASHES:
        for level, index, h in f.append(lh):
            assert (level, index) not in store, "a complete node must be written exactly once"
            store[level, index] = h
    return store


STORE = _build_store()


def only(coords: list[Coord]) -> dict[Coord, bytes]:
    """Just the requested coordinates, so a builder that needs more fails with KeyError."""
    return {c: STORE[c] for c in coords}


def flip(h: bytes, bit: int = 3) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


# --------------------------------------------------------------------------- known answers
# vectors/rfc9162-known-answers.json: transparency-dev/merkle testonly/constants.go and
# proof/verify_test.go (RFC 6962 hashing, which RFC 9162 keeps unchanged for SHA-256).

VECTORS = Path(__file__).parent / "vectors"
_KAT = json.loads((VECTORS / "rfc9162-known-answers.json").read_text())
KAT_LEAVES = [bytes.fromhex(h) for h in _KAT["leaves"]]
KAT_ROOTS: list[str] = _KAT["roots"]
KAT_NODES = {(int(k.split("/")[0]), int(k.split("/")[1])): h for k, h in _KAT["nodes"].items()}
KAT_INCLUSION = [(v["leaf_index"], v["tree_size"], v["proof"]) for v in _KAT["inclusion"]]
KAT_CONSISTENCY = [(v["first"], v["second"], v["proof"]) for v in _KAT["consistency"]]


def _kat_store() -> tuple[dict[Coord, bytes], list[bytes]]:
    f = Frontier()
    store: dict[Coord, bytes] = {}
    roots = [f.root()]
    for d in KAT_LEAVES:
        store.update({(lv, ix): h for lv, ix, h in f.append(leaf_hash(d))})
        roots.append(f.root())
    return store, roots


def test_empty_root_is_sha256_of_empty_string() -> None:
    assert EMPTY_ROOT.hex() == KAT_ROOTS[0]
    assert Frontier().root() == EMPTY_ROOT
    assert root_at(0, {}) == EMPTY_ROOT
    assert root_coords(0) == []


def test_known_answer_roots_and_nodes() -> None:
    store, roots = _kat_store()
    assert [r.hex() for r in roots] == KAT_ROOTS
    assert {c: h.hex() for c, h in store.items()} == KAT_NODES
    for n in range(len(KAT_LEAVES) + 1):
        assert ref_mth_of(KAT_LEAVES[:n]).hex() == KAT_ROOTS[n], "the reference itself is right"
        assert root_at(n, store).hex() == KAT_ROOTS[n]


@pytest.mark.parametrize(("index", "size", "proof"), KAT_INCLUSION)
def test_known_answer_inclusion(index: int, size: int, proof: list[str]) -> None:
    store, _ = _kat_store()
    got = inclusion_proof(index, size, store)
    assert [h.hex() for h in got] == proof
    root = bytes.fromhex(KAT_ROOTS[size])
    assert verify_inclusion(leaf_hash(KAT_LEAVES[index]), index, size, got, root)


@pytest.mark.parametrize(("first", "second", "proof"), KAT_CONSISTENCY)
def test_known_answer_consistency(first: int, second: int, proof: list[str]) -> None:
    store, _ = _kat_store()
    got = consistency_proof(first, second, store)
    assert [h.hex() for h in got] == proof
    r1, r2 = bytes.fromhex(KAT_ROOTS[first]), bytes.fromhex(KAT_ROOTS[second])
    assert verify_consistency(first, second, r1, r2, got)


# --------------------------------------------------------------------------- published probes
# vectors/transparency-dev-merkle-probes.json: transparency-dev/merkle's published JSON test data
# (each happy path and every corruption of it), transcribed. Bytes are as published: a "hash" of
# the wrong length (b"WrongLeaf", b"") must make verification answer False, never raise.

PROBES = json.loads((VECTORS / "transparency-dev-merkle-probes.json").read_text())
# Where we are deliberately stricter than the Go verifier that published the probes, and why.
STRICTER = {
    ("consistency/additional", "sizes are equal (one) and proof is empty"): (
        "its roots are 12-byte strings; we refuse anything but 32-byte roots, even when the sizes are equal"
    ),
}


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _hashes(values: list[str] | None) -> list[bytes]:
    return [_b64(v) for v in values or []]  # null (a nil proof in Go) is the empty proof


def _probe_id(probe: dict[str, Any]) -> str:
    return f"{probe['dir']}:{probe['desc']}"


def _expected(probe: dict[str, Any]) -> bool:
    return not probe["wantErr"] and (probe["dir"], probe["desc"]) not in STRICTER


@pytest.mark.parametrize("probe", PROBES["inclusion"], ids=_probe_id)
def test_transparency_dev_inclusion_probes(probe: dict[str, Any]) -> None:
    leaf, root, proof = _b64(probe["leafHash"]), _b64(probe["root"]), _hashes(probe["proof"])
    assert verify_inclusion(leaf, probe["leafIdx"], probe["treeSize"], proof, root) is _expected(probe)
    if _expected(probe) and probe["dir"] != "inclusion/single-entry":
        # A published good proof is also exactly the one our builder makes from the same leaves.
        store, roots = _kat_store()
        assert inclusion_proof(probe["leafIdx"], probe["treeSize"], store) == proof
        assert roots[probe["treeSize"]] == root


@pytest.mark.parametrize("probe", PROBES["consistency"], ids=_probe_id)
def test_transparency_dev_consistency_probes(probe: dict[str, Any]) -> None:
    first, second = probe["size1"], probe["size2"]
    r1, r2, proof = _b64(probe["root1"]), _b64(probe["root2"]), _hashes(probe["proof"])
    assert verify_consistency(first, second, r1, r2, proof) is _expected(probe)
    if _expected(probe) and probe["dir"] != "consistency/additional":
        store, roots = _kat_store()
        assert consistency_proof(first, second, store) == proof
        assert (roots[first], roots[second]) == (r1, r2)


def test_the_published_probes_are_all_there() -> None:
    # A truncated transcription must not pass quietly: counts as cmd/proofgen writes them.
    assert len(PROBES["inclusion"]) == 98 and len(PROBES["consistency"]) == 98
    assert sum(not p["wantErr"] for p in PROBES["inclusion"]) == 6
    assert sum(not p["wantErr"] for p in PROBES["consistency"]) == 6


def test_pinned_roots_of_this_suite_leaves() -> None:
    # Pinned once from the reference definitions so a change to LEAVES or hashing shows.
    assert ref_mth(0, 1).hex() == leaf_hash(LEAVES[0]).hex()
    assert root_at(MAX_N, only(root_coords(MAX_N))) == ref_mth(0, MAX_N)
    assert ref_mth(0, 3) == node_hash(node_hash(LEAF_HASHES[0], LEAF_HASHES[1]), LEAF_HASHES[2])


# --------------------------------------------------------------------------- storage model


def test_store_holds_exactly_the_complete_subtrees() -> None:
    expected = {}
    for level in range(MAX_N.bit_length()):
        width = 1 << level
        for index in range(MAX_N // width):
            expected[level, index] = ref_mth(index * width, (index + 1) * width)
    assert STORE == expected


def test_new_nodes_on_append_matches_frontier_and_reads_only_left_siblings() -> None:
    store: dict[Coord, bytes] = {}
    f = Frontier()
    for i, lh in enumerate(LEAF_HASHES):
        reads: list[Coord] = []

        def get(level: int, index: int, reads: list[Coord] = reads) -> bytes:
            reads.append((level, index))
            return store[level, index]

        nodes = new_nodes_on_append(i, lh, get)
        assert nodes == f.append(lh)
        assert nodes[0] == (0, i, lh)
        trailing_ones = (~i & (i + 1)).bit_length() - 1
        assert len(reads) == trailing_ones == len(nodes) - 1
        store.update({(lv, ix): h for lv, ix, h in nodes})
    assert store == STORE


@pytest.mark.parametrize("size", range(MAX_N + 1))
def test_frontier_root_and_rebuild(size: int) -> None:
    coords = frontier_coords(size)
    assert len(coords) == size.bit_count()
    rebuilt = Frontier.from_nodes(size, only(coords))
    assert rebuilt.size == size
    assert rebuilt.root() == ref_mth(0, size) == root_at(size, only(root_coords(size)))
    # Appending after a rebuild writes the same nodes as one uninterrupted run.
    if size < MAX_N:
        fresh = Frontier.from_nodes(size, STORE)
        for i in range(size, min(size + 5, MAX_N)):
            nodes = fresh.append(LEAF_HASHES[i])
            assert all(STORE[lv, ix] == h for lv, ix, h in nodes)
            assert fresh.root() == ref_mth(0, i + 1)


def test_frontier_extend_and_bad_leaf() -> None:
    f = Frontier()
    nodes = f.extend(LEAF_HASHES[:10])
    assert {(lv, ix) for lv, ix, _ in nodes} == {c for c in STORE if (c[1] + 1) << c[0] <= 10}
    with pytest.raises(ValueError):
        f.append(b"short")
    with pytest.raises(ValueError):
        new_nodes_on_append(0, b"x" * 31, lambda lv, ix: b"")


# --------------------------------------------------------------------------- proofs vs RFC


def _inclusion_cases() -> list[tuple[int, int]]:
    return [(i, n) for n in range(1, MAX_N + 1) for i in range(n)]


def _consistency_cases() -> list[tuple[int, int]]:
    return [(m, n) for n in range(1, MAX_N + 1) for m in range(n + 1)]


def test_inclusion_every_index_every_size() -> None:
    for index, size in _inclusion_cases():
        coords = inclusion_proof_coords(index, size)
        proof = inclusion_proof(index, size, only(coords))
        assert proof == ref_path(index, 0, size), (index, size)
        root = ref_mth(0, size)
        assert root_from_inclusion_proof(LEAF_HASHES[index], index, size, proof) == root
        assert verify_inclusion(LEAF_HASHES[index], index, size, proof, root), (index, size)


def test_consistency_every_pair() -> None:
    for first, second in _consistency_cases():
        coords = consistency_proof_coords(first, second)
        proof = consistency_proof(first, second, only(coords))
        assert proof == ref_proof(first, second), (first, second)
        r1, r2 = ref_mth(0, first), ref_mth(0, second)
        assert verify_consistency(first, second, r1, r2, proof), (first, second)


# --------------------------------------------------------------------------- tampering


def _inclusion_tampers(
    index: int, size: int, proof: list[bytes], root: bytes
) -> list[tuple[str, bytes, int, int, list[bytes], bytes]]:
    lh = LEAF_HASHES[index]
    wrong_leaf = LEAF_HASHES[(index + 1) % MAX_N]
    out = [
        ("index + 1", lh, index + 1, size, proof, root),
        ("index ^ 2", lh, index ^ 2, size, proof, root),
        ("size * 2", lh, index, size * 2, proof, root),
        ("wrong leaf", wrong_leaf, index, size, proof, root),
        ("raw data as leaf", LEAVES[index].ljust(32, b"\0")[:32], index, size, proof, root),
        ("empty root", lh, index, size, proof, EMPTY_ROOT),
        ("extended", lh, index, size, [*proof, root], root),
        ("prepended", lh, index, size, [root, *proof], root),
    ]
    if index > 0:
        out.append(("index - 1", lh, index - 1, size, proof, root))
    if proof:
        out.append(("truncated", lh, index, size, proof[:-1], root))
        out.append(("dropped first", lh, index, size, proof[1:], root))
    for k in range(len(proof)):
        bad = list(proof)
        bad[k] = flip(bad[k], bit=k % 8)
        out.append((f"bit flip in proof[{k}]", lh, index, size, bad, root))
    return out


def test_tampered_inclusion_proofs_fail() -> None:
    # Exhaustive up to 130 leaves, then every 10th size so the suite stays quick.
    sizes = [n for n in range(1, MAX_N + 1) if n <= 130 or n % 10 == 0]
    for size in sizes:
        root = ref_mth(0, size)
        for index in range(size):
            proof = ref_path(index, 0, size)
            for desc, lh, i, n, p, r in _inclusion_tampers(index, size, proof, root):
                assert not verify_inclusion(lh, i, n, p, r), (desc, index, size)


def _consistency_tampers(
    first: int, second: int, proof: list[bytes], r1: bytes, r2: bytes
) -> list[tuple[str, int, int, bytes, bytes, list[bytes]]]:
    out = [
        ("first - 1", first - 1, second, r1, r2, proof),
        ("first + 1", first + 1, second, r1, r2, proof),
        ("first ^ 2", first ^ 2, second, r1, r2, proof),
        ("second * 2", first, second * 2, r1, r2, proof),
        ("swapped roots", first, second, r2, r1, proof),
        ("swapped sizes and roots", second, first, r2, r1, proof),
        ("wrong first root", first, second, flip(r1), r2, proof),
        ("wrong second root", first, second, r1, flip(r2), proof),
        ("empty proof", first, second, r1, r2, []),
        ("extended", first, second, r1, r2, [*proof, r2]),
        ("extended with first root", first, second, r1, r2, [*proof, r1]),
        ("prepended first root", first, second, r1, r2, [r1, *proof]),
        ("prepended proof[0]", first, second, r1, r2, [proof[0], *proof]),
        ("truncated", first, second, r1, r2, proof[:-1]),
        ("dropped first", first, second, r1, r2, proof[1:]),
    ]
    for k in range(len(proof)):
        bad = list(proof)
        bad[k] = flip(bad[k], bit=(k + 4) % 8)
        out.append((f"bit flip in proof[{k}]", first, second, r1, r2, bad))
    return out


def test_tampered_consistency_proofs_fail() -> None:
    cases = [(m, n) for m, n in _consistency_cases() if 0 < m < n and (n <= 130 or n % 10 == 0)]
    for first, second in cases:
        proof = ref_proof(first, second)
        r1, r2 = ref_mth(0, first), ref_mth(0, second)
        for desc, m, n, a, b, p in _consistency_tampers(first, second, proof, r1, r2):
            assert not verify_consistency(m, n, a, b, p), (desc, first, second)


# --------------------------------------------------------------------------- edge cases


def test_inclusion_edge_cases() -> None:
    lh, root1 = LEAF_HASHES[0], ref_mth(0, 1)
    assert verify_inclusion(lh, 0, 1, [], root1), "one-leaf tree: root is the leaf, proof empty"
    assert not verify_inclusion(lh, 0, 0, [], EMPTY_ROOT), "nothing is in the empty tree"
    assert not verify_inclusion(lh, 1, 1, [], root1), "index == size"
    assert not verify_inclusion(lh, 5, 3, [], root1), "index > size"
    assert not verify_inclusion(lh, -1, 1, [], root1)
    assert not verify_inclusion(lh, True, 2, [LEAF_HASHES[1]], ref_mth(0, 2)), "bool is not an index"
    with pytest.raises(ValueError):
        inclusion_proof_coords(3, 3)
    with pytest.raises(ValueError):
        inclusion_proof(0, 0, {})


@pytest.mark.parametrize(
    "args",
    [
        (None, 0, 1, [], b"\0" * 32),
        (b"\0" * 31, 0, 1, [], b"\0" * 31),
        (b"\0" * 32, "0", 1, [], b"\0" * 32),
        (b"\0" * 32, 0, 1.0, [], b"\0" * 32),
        (b"\0" * 32, 0, 2, b"\0" * 32, b"\0" * 32),
        (b"\0" * 32, 0, 2, "abc", b"\0" * 32),
        (b"\0" * 32, 0, 2, [None], b"\0" * 32),
        (b"\0" * 32, 0, 2, [b"\0" * 33], b"\0" * 32),
        (b"\0" * 32, 0, 2, [b""], b"\0" * 32),
        (b"\0" * 32, 0, 2, [b"\0" * 32], None),
        (b"\0" * 32, 0, 2**64, [b"\0" * 32] * 64, b"\0" * 32),
    ],
)
def test_malformed_inclusion_input_returns_false(args: tuple) -> None:  # type: ignore[type-arg]
    assert verify_inclusion(*args) is False
    root_from_inclusion_proof(*args[:4])  # must not raise either


def test_consistency_edge_cases() -> None:
    r5, r8 = ref_mth(0, 5), ref_mth(0, 8)
    assert verify_consistency(5, 5, r5, r5, []), "same size: empty proof and equal roots"
    assert not verify_consistency(5, 5, r5, r8, []), "same size, different roots"
    assert not verify_consistency(5, 5, r5, r5, [r5]), "same size with a non-empty proof"
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 8, EMPTY_ROOT, r8, []), "the empty tree precedes every tree"
    assert not verify_consistency(0, 8, EMPTY_ROOT, r8, [r8]), "first == 0 needs an empty proof"
    assert not verify_consistency(0, 8, r5, r8, []), "the empty tree has one root"
    assert not verify_consistency(8, 5, r8, r5, consistency_proof(5, 8, STORE)), "time travel"
    assert not verify_consistency(5, 8, r5, r8, []), "0 < first < second needs a proof"
    assert consistency_proof_coords(0, 8) == [] == consistency_proof(0, 8, {})
    assert consistency_proof_coords(8, 8) == [] == consistency_proof(8, 8, {})
    # first a power of two: its root is itself the first path element, so not sent.
    assert ref_mth(0, 4) not in consistency_proof(4, 8, STORE)
    with pytest.raises(ValueError):
        consistency_proof_coords(9, 8)


@pytest.mark.parametrize(
    "args",
    [
        (1, 2, None, b"\0" * 32, [b"\0" * 32]),
        (1, 2, b"\0" * 32, b"\0" * 31, [b"\0" * 32]),
        (1, 2, b"\0" * 32, b"\0" * 32, [b"short"]),
        (1, 2, b"\0" * 32, b"\0" * 32, "x" * 32),
        (1, 2, b"\0" * 32, b"\0" * 32, None),
        (-1, 2, b"\0" * 32, b"\0" * 32, []),
        (1, -2, b"\0" * 32, b"\0" * 32, []),
        (1.0, 2, b"\0" * 32, b"\0" * 32, [b"\0" * 32]),
        (True, 2, b"\0" * 32, b"\0" * 32, [b"\0" * 32]),
        (3, 2**70, b"\0" * 32, b"\0" * 32, [b"\0" * 32] * 200),
    ],
)
def test_malformed_consistency_input_returns_false(args: tuple) -> None:  # type: ignore[type-arg]
    assert verify_consistency(*args) is False


def test_missing_node_names_the_coordinate() -> None:
    coords = inclusion_proof_coords(5, 13)
    partial = only(coords[1:])
    with pytest.raises(KeyError, match=rf"level={coords[0][0]}, index={coords[0][1]}"):
        inclusion_proof(5, 13, partial)


# --------------------------------------------------------------------------- O(log n)


def _bound(n: int) -> int:
    return 2 * math.ceil(math.log2(n)) + 2 if n > 1 else 2


def _interesting_sizes() -> list[int]:
    sizes = {1, 2, 3, 10**6, 10**6 - 1, 999_983}
    for k in range(1, 20):
        sizes |= {2**k - 1, 2**k, 2**k + 1}
    rng = random.Random(9162)
    sizes |= {rng.randrange(1, 10**6 + 1) for _ in range(200)}
    return sorted(s for s in sizes if s <= 10**6)


def test_coords_are_logarithmic_without_building_a_tree() -> None:
    rng = random.Random(6962)
    for n in _interesting_sizes():
        bound = _bound(n)
        assert len(root_coords(n)) <= bound
        picks = {0, n - 1, n // 2, (n - 1) & ~1, *(rng.randrange(n) for _ in range(20))}
        for i in picks:
            assert len(inclusion_proof_coords(i, n)) <= bound, (i, n)
            assert len(consistency_proof_coords(i, n)) <= bound, (i, n)
            assert len(consistency_proof_coords(i + 1, n)) <= bound, (i + 1, n)


def test_coords_are_all_complete_subtrees_of_the_size() -> None:
    def complete(c: Coord, n: int) -> bool:
        return (c[1] + 1) << c[0] <= n

    for n in _interesting_sizes()[:120]:
        for i in {0, n - 1, n // 3}:
            assert all(complete(c, n) for c in inclusion_proof_coords(i, n))
            assert all(complete(c, n) for c in consistency_proof_coords(max(i, 1), n))


def test_module_exports_exist() -> None:
    for name in merkle.__all__:
        assert hasattr(merkle, name), name


def test_database_shaped_values() -> None:
    # Drivers may return bytea as memoryview; a row of the wrong length is a corrupt store.
    coords = inclusion_proof_coords(5, 13)
    as_views = {c: memoryview(h) for c, h in only(coords).items()}
    proof = inclusion_proof(5, 13, as_views)
    assert proof == ref_path(5, 0, 13) and all(type(p) is bytes for p in proof)
    assert verify_inclusion(memoryview(LEAF_HASHES[5]), 5, 13, proof, memoryview(ref_mth(0, 13)))
    assert Frontier.from_nodes(13, {c: bytearray(STORE[c]) for c in frontier_coords(13)}).root() == ref_mth(0, 13)
    corrupt = dict(as_views)
    corrupt[coords[0]] = b"\x00" * 31
    with pytest.raises(ValueError, match="not a 32-byte hash"):
        inclusion_proof(5, 13, corrupt)
