"""RFC 6962 (Certificate Transparency) Merkle trees: roots, audit paths and their verification.

leaf hash = SHA-256(0x00 || leaf bytes); node hash = SHA-256(0x01 || left || right). A tree of n
leaves splits at the largest power of two below n, which is the same as hashing level by level and
carrying an odd last node up unchanged: that is how ``root`` computes it, one pass per level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


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
    """The sibling hashes from leaf ``index`` up to the root (RFC 6962 section 2.1.1 order)."""
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


class Frontier:
    """An append-only tree's right edge: the roots of its perfect subtrees, largest first.

    Appending and taking the root are O(log n), so a growing log keeps its head current cheaply.
    """

    def __init__(self) -> None:
        self.size = 0
        self._subtrees: list[tuple[int, bytes]] = []  # (leaf count, root)

    def append(self, leaf: bytes) -> None:
        count, h = 1, leaf
        while self._subtrees and self._subtrees[-1][0] == count:
            left_count, left = self._subtrees.pop()
            count, h = left_count + count, node_hash(left, h)
        self._subtrees.append((count, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._subtrees:
            return EMPTY_ROOT
        h = self._subtrees[-1][1]
        for _, left in reversed(self._subtrees[:-1]):
            h = node_hash(left, h)
        return h
