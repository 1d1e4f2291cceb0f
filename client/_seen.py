"""Bounded memory of what the client has seen: event ids (to drop re-emitted messages) and each
request's latest result. Oldest first out, so a long-running client holds a fixed amount."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A mapping that forgets its oldest entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def add(self, key: K, value: V) -> bool:
        """Insert unless present; whether it was new."""
        if key in self._items:
            return False
        self.put(key, value)
        return True

    def __len__(self) -> int:
        return len(self._items)
