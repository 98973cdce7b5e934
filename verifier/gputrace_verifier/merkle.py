"""RFC 9162 (Certificate Transparency v2) Merkle tree, section 2.1 — pure functions.

Storage model: only hashes of COMPLETE subtrees are ever stored, addressed as
``(level, index)``. Level 0 holds the leaf hashes; node ``(l, i)`` covers the leaves
``[i * 2**l, (i + 1) * 2**l)``. A complete node never changes once written, so the store
is append-only, and any past tree size can be served from it: a range that is not a
complete subtree (the right edge of a smaller tree) is rebuilt from its complete-subtree
decomposition, which is O(log n) nodes.

Workflow for the caller that owns the database:

* appending: ``Frontier.from_nodes(size, fetch(frontier_coords(size)))`` once, then
  ``frontier.append(leaf_hash(entry))`` per entry; each call returns the nodes to insert.
  ``new_nodes_on_append`` does the same one leaf at a time from point reads.
* proofs / past roots: ``coords = inclusion_proof_coords(i, n)`` (or ``consistency_...``,
  ``root_coords``), fetch those nodes into a dict, then ``inclusion_proof(i, n, nodes)``.
* verifying (no storage at all): ``verify_inclusion`` / ``verify_consistency``, which follow
  the RFC's algorithms step by step and return False (never raise) on malformed input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Coord",
    "Frontier",
    "Node",
    "consistency_proof",
    "consistency_proof_coords",
    "frontier_coords",
    "inclusion_proof",
    "inclusion_proof_coords",
    "leaf_hash",
    "new_nodes_on_append",
    "node_hash",
    "root_at",
    "root_coords",
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
# RFC 9162 §2.1.1: MTH({}) = HASH(), the hash of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

Coord = tuple[int, int]  # (level, index) of a complete subtree
Node = tuple[int, int, bytes]  # (level, index, hash) — one row to store
NodeGetter = Callable[[int, int], bytes]

# --------------------------------------------------------------------------- hashing


def leaf_hash(data: bytes) -> bytes:
    """MTH of a one-leaf tree: SHA-256(0x00 || data). The 0x00 prefix stops a leaf
    from being passed off as an interior node (second-preimage resistance)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _fold_right(hashes: Sequence[bytes]) -> bytes:
    """Root of a range from its complete-subtree decomposition (largest subtree first).

    MTH(D[lo:hi]) splits off the largest power of two k < size as a complete left subtree
    and recurses on the right, so the decomposition folds right to left."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


# --------------------------------------------------------------------------- geometry


def _largest_pow2_below(n: int) -> int:
    """The k of RFC 9162 §2.1.1: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_hash(name: str, value: bytes) -> None:
    # A short or str "hash" would be stored forever and poison every later root.
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"{name} must be {HASH_SIZE} bytes, got {value!r}")


def _range_coords(lo: int, hi: int) -> list[Coord]:
    """Complete-subtree decomposition of leaves [lo, hi), largest first.

    Only valid for the ranges the RFC recursion produces, where lo is a multiple of the
    power of two the range fits under; then the set bits of (hi - lo), high to low, give
    consecutive aligned subtrees."""
    out: list[Coord] = []
    pos = lo
    width = hi - lo
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            out.append((level, pos >> level))
            pos += 1 << level
    return out


def frontier_coords(size: int) -> list[Coord]:
    """Coordinates of the complete subtrees along the right edge of a tree of `size`
    leaves (largest first): one per set bit of size. Their fold is the root."""
    _check_size("size", size)
    return _range_coords(0, size)


def root_coords(size: int) -> list[Coord]:
    """Nodes needed by `root_at(size, ...)`: the frontier of that size."""
    return frontier_coords(size)


def _range_hash(lo: int, hi: int, nodes: Mapping[Coord, bytes]) -> bytes:
    return _fold_right([_lookup(nodes, c) for c in _range_coords(lo, hi)])


def _lookup(nodes: Mapping[Coord, bytes], coord: Coord) -> bytes:
    try:
        value = nodes[coord]
    except KeyError:
        # Say which node: a missing row is a storage bug the caller must be able to find.
        raise KeyError(f"merkle node (level={coord[0]}, index={coord[1]}) was not supplied") from None
    # Database drivers may hand back memoryview/bytearray; a wrong length means a corrupt row.
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != HASH_SIZE:
        raise ValueError(f"merkle node (level={coord[0]}, index={coord[1]}) is not a {HASH_SIZE}-byte hash")
    return bytes(value)


def _unique(coords: Iterable[Coord]) -> list[Coord]:
    return list(dict.fromkeys(coords))


# --------------------------------------------------------------------------- appending


def new_nodes_on_append(leaf_index: int, leaf_hash: bytes, get: NodeGetter) -> list[Node]:
    """Every complete subtree that becomes complete when leaf `leaf_index` is appended
    (tree grows from leaf_index to leaf_index + 1 leaves), level 0 first.

    `get(level, index)` returns an already-stored node; it is called only for the left
    siblings along the way up (one per trailing 1-bit of leaf_index)."""
    _check_size("leaf_index", leaf_index)
    _check_hash("leaf_hash", leaf_hash)
    out: list[Node] = [(0, leaf_index, leaf_hash)]
    h, index, level = leaf_hash, leaf_index, 0
    # The new leaf completes its parent exactly when it is a right child (odd index),
    # and so on upwards, like carrying in a binary counter.
    while index & 1:
        h = node_hash(get(level, index - 1), h)
        index >>= 1
        level += 1
        out.append((level, index, h))
    return out


class Frontier:
    """The right-edge complete subtrees of the current tree, enough to append without
    reading anything else and to compute the current root.

    Rebuild it for a stored tree of size n with `Frontier.from_nodes(n, nodes)` where
    nodes holds (at least) `frontier_coords(n)` — O(log n) reads."""

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []  # one per set bit of _size, largest subtree first

    @classmethod
    def from_nodes(cls, size: int, nodes: Mapping[Coord, bytes]) -> Frontier:
        f = cls()
        f._size = size
        f._hashes = [_lookup(nodes, c) for c in frontier_coords(size)]
        return f

    @property
    def size(self) -> int:
        return self._size

    def coords(self) -> list[Coord]:
        return frontier_coords(self._size)

    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    def append(self, leaf_hash: bytes) -> list[Node]:
        """Append one leaf; return the newly complete nodes (same as new_nodes_on_append)."""
        _check_hash("leaf_hash", leaf_hash)
        index = self._size
        out: list[Node] = [(0, index, leaf_hash)]
        h, level = leaf_hash, 0
        # Same carry chain as new_nodes_on_append, but each left sibling is the smallest
        # frontier subtree (the frontier is sorted largest first), so no reads are needed.
        while index & 1:
            h = node_hash(self._hashes.pop(), h)
            index >>= 1
            level += 1
            out.append((level, index, h))
        self._hashes.append(h)
        self._size += 1
        return out

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[Node]:
        out: list[Node] = []
        for lh in leaf_hashes:
            out.extend(self.append(lh))
        return out

    def root(self) -> bytes:
        return _fold_right(self._hashes)


def root_at(size: int, nodes: Mapping[Coord, bytes]) -> bytes:
    """Root hash of the tree at a past (or current) `size`, from `root_coords(size)`."""
    return _fold_right([_lookup(nodes, c) for c in frontier_coords(size)])


# --------------------------------------------------------------------------- proofs


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges [lo, hi) whose MTHs form PATH(index, D[0:size]) (§2.1.3.1), in proof
    order (deepest sibling first)."""
    _check_size("index", index)
    _check_size("size", size)
    if index >= size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if index < lo + k:
            path.append((lo + k, hi))  # PATH(m, D[0:k]) : MTH(D[k:n])
            hi = lo + k
        else:
            path.append((lo, lo + k))  # PATH(m - k, D[k:n]) : MTH(D[0:k])
            lo += k
    path.reverse()
    return path


def _consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTHs form PROOF(first, D[0:second]) (§2.1.4.1), in proof order.
    Empty when first == 0 or first == second, as the RFC defines no proof there."""
    _check_size("first", first)
    _check_size("second", second)
    if first > second:
        raise ValueError(f"first ({first}) must not exceed second ({second})")
    if first == 0 or first == second:
        return []
    path: list[tuple[int, int]] = []
    lo, hi = 0, second
    known = True  # SUBPROOF's b: is MTH(D[lo:hi]) already known to the verifier?
    # Invariant: lo < first <= hi, i.e. 0 < m <= n in the RFC's relative terms.
    while first != hi:
        k = _largest_pow2_below(hi - lo)
        if first - lo <= k:
            path.append((lo + k, hi))  # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            hi = lo + k
        else:
            path.append((lo, lo + k))  # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            lo += k
            known = False
    if not known:
        path.append((lo, hi))  # SUBPROOF(m, D[m], false) = {MTH(D[m])}
    path.reverse()
    return path


def inclusion_proof_coords(index: int, size: int) -> list[Coord]:
    """Stored nodes needed to build the inclusion proof of leaf `index` in tree `size`."""
    return _unique(c for lo, hi in _inclusion_ranges(index, size) for c in _range_coords(lo, hi))


def inclusion_proof(index: int, size: int, nodes: Mapping[Coord, bytes]) -> list[bytes]:
    """PATH(index, D[0:size]) built from the fetched `inclusion_proof_coords` nodes."""
    return [_range_hash(lo, hi, nodes) for lo, hi in _inclusion_ranges(index, size)]


def consistency_proof_coords(first: int, second: int) -> list[Coord]:
    """Stored nodes needed to build the consistency proof from size `first` to `second`."""
    return _unique(c for lo, hi in _consistency_ranges(first, second) for c in _range_coords(lo, hi))


def consistency_proof(first: int, second: int, nodes: Mapping[Coord, bytes]) -> list[bytes]:
    """PROOF(first, D[0:second]) built from the fetched `consistency_proof_coords` nodes."""
    return [_range_hash(lo, hi, nodes) for lo, hi in _consistency_ranges(first, second)]


# --------------------------------------------------------------------------- verification


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview) and len(value) == HASH_SIZE


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_proof(proof: object) -> bool:
    # A str/bytes is a Sequence too; refuse it so a caller's type slip can't pass.
    return isinstance(proof, list | tuple) and all(_is_hash(p) for p in proof)


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-4), or None if
    the inputs cannot form a valid proof (bad index, wrong path length, malformed hash)."""
    if not (_is_hash(leaf_hash) and _is_count(index) and _is_count(size) and _is_proof(proof)):
        return None
    if index >= size:  # step 1
        return None
    fn, sn = index, size - 1  # step 2
    r = bytes(leaf_hash)  # step 3
    for p in proof:  # step 4
        if sn == 0:
            return None  # path is too long
        if fn & 1 or fn == sn:
            r = node_hash(bytes(p), r)
            # fn == sn with fn even: we are on the right edge and p covers the levels
            # skipped where the right-edge node had no sibling, so climb past them.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, bytes(p))
        fn >>= 1
        sn >>= 1
    if sn != 0:  # step 5, first half: path is too short
        return None
    return r


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: is `leaf_hash` the leaf at `index` of the tree of `size` whose
    root is `root`? Never raises."""
    try:
        computed = root_from_inclusion_proof(leaf_hash, index, size, proof)
        return computed is not None and _is_hash(root) and computed == bytes(root)
    except Exception:  # defensive: verification must answer, not crash, on hostile input
        return False


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of size `second` with `second_root` an append-only
    extension of the tree of size `first` with `first_root`? Never raises.

    Edge cases the RFC algorithm (which assumes 0 < first < second) leaves to us:
    first == second needs an empty proof and equal roots; first == 0 needs an empty proof
    and first_root == SHA-256("") — the empty tree has exactly one possible root."""
    try:
        return _verify_consistency(first, second, first_root, second_root, proof)
    except Exception:  # defensive, as in verify_inclusion
        return False


def _verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    if not (_is_count(first) and _is_count(second) and _is_hash(first_root) and _is_hash(second_root)):
        return False
    if not _is_proof(proof) or first > second:
        return False
    first_root, second_root = bytes(first_root), bytes(second_root)
    if first == second:
        return len(proof) == 0 and first_root == second_root
    if first == 0:
        return len(proof) == 0 and first_root == EMPTY_ROOT
    if len(proof) == 0:  # step 1
        return False
    path = [bytes(p) for p in proof]
    if first & (first - 1) == 0:  # step 2: first is a power of two, its root is a node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            return False  # proof is too long
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:  # same climb as in inclusion
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0  # step 7
