"""Building: a tree's root and the proofs a log hands out, from the full list of its leaf hashes.

A tree of n leaves splits at the largest power of two below n (RFC 6962 section 2.1), which is the
same as hashing level by level and carrying an odd last node up unchanged: that is how ``root`` and
``audit_path`` compute it, one pass per level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from nexuscore.ledger._hash import EMPTY_ROOT, node_hash

_sha256 = hashlib.sha256


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The tree head of ``leaf_hashes`` (already hashed with ``leaf_hash``)."""
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        it = iter(level)
        # zip over one iterator pairs neighbours; the fastest pure-Python pass measured here.
        nxt = [_sha256(b"\x01" + a + b).digest() for a, b in zip(it, it, strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def audit_path(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The inclusion proof of leaf ``index``: the sibling hashes from it up to the root
    (RFC 6962 section 2.1.1 order)."""
    if not 0 <= index < len(leaf_hashes):
        raise IndexError(f"leaf {index} outside a tree of {len(leaf_hashes)}")
    path: list[bytes] = []
    level = list(leaf_hashes)
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        it = iter(level)
        nxt = [node_hash(a, b) for a, b in zip(it, it, strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return path


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The proof that the tree of the first ``old_size`` leaves is a prefix of the tree of all of
    them (RFC 9162 section 2.1.4.1, PROOF(m, D[n])); empty when ``old_size`` is 0 or all of them."""
    if not 0 <= old_size <= len(leaf_hashes):
        raise ValueError(f"an old size of {old_size} outside a tree of {len(leaf_hashes)}")
    if old_size in (0, len(leaf_hashes)):
        return []
    return _subproof(old_size, leaf_hashes, 0, len(leaf_hashes), True)


def _subproof(m: int, leaves: Sequence[bytes], lo: int, hi: int, whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b) of RFC 9162 section 2.1.4.1, on index ranges rather than copies.
    ``whole`` (the RFC's b) says whether the old tree is all of D[lo:hi] as the verifier knows it,
    so that its root need not be sent."""
    n = hi - lo
    if m == n:
        return [] if whole else [root(leaves[lo:hi])]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    if m <= k:
        return [*_subproof(m, leaves, lo, lo + k, whole), root(leaves[lo + k : hi])]
    return [*_subproof(m - k, leaves, lo + k, hi, False), root(leaves[lo : lo + k])]
