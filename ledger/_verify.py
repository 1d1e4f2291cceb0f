"""Verifying: what a holder of a root (and nothing else) can check of a proof. RFC 9162 section
2.1.3.2 (inclusion) and 2.1.4.2 (consistency), step by step; nothing here sees the leaves."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nexuscore.ledger._hash import EMPTY_ROOT, HASH_SIZE, node_hash


def root_from_path(leaf: bytes, index: int, size: int, path: Iterable[bytes]) -> bytes:
    """Recompute the root from a leaf hash and its audit path (RFC 9162 section 2.1.3.2)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} outside a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("audit path longer than the tree is deep")
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ValueError("audit path shorter than the tree is deep")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """Whether ``path`` proves the leaf hash ``leaf`` at ``index`` in the tree of ``size`` with
    ``root``."""
    if any(len(h) != HASH_SIZE for h in (leaf, root, *path)):
        return False
    try:
        return root_from_path(leaf, index, size, path) == root
    except ValueError:
        return False


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows that the tree of ``old_size`` with ``old_root`` is a prefix of the
    tree of ``new_size`` with ``new_root``: the log only grew (RFC 9162 section 2.1.4.2).

    The empty tree (whose root must be the empty root) is a prefix of every tree, and every tree is
    a prefix of itself; both take an empty proof.
    """
    if not 0 <= old_size <= new_size or any(len(h) != HASH_SIZE for h in (old_root, new_root, *proof)):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # the old tree is perfect: its root is a node of the new one
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn % 2 == 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
