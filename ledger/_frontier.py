"""The right edge of an append-only tree, so that a growing log keeps its root current cheaply."""

from __future__ import annotations

from nexuscore.ledger._hash import EMPTY_ROOT, node_hash


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
