"""A bounded, thread-safe LRU map that hands out deep copies: what the service's caches of loaded objects share
(architectures, tokenizers), so a caller may change what it gets and the kept object stays as it was stored."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class CopyingLRU(Generic[T]):
    """At most ``capacity`` entries, least recently used dropped first; :meth:`get` and :meth:`put` copy."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable) -> T | None:
        """A deep copy of the entry (made under the lock: the kept object is never read by two threads at once)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return copy.deepcopy(hit)

    def read(self, key: Hashable, read: Callable[[T], R]) -> R | None:
        """``read`` applied to the kept entry itself, under the lock and without a copy (``None`` on a miss): for a
        caller that only looks at a few facts of a large object, where :meth:`get`'s deep copy would cost more than
        the look. ``read`` must not change the entry nor return it (or a part of it that is not a copy), and must
        not return ``None``."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return read(hit)

    def put(self, key: Hashable, value: T) -> None:
        """Keep a deep copy of ``value`` (the caller may go on changing its own)."""
        kept = copy.deepcopy(value)
        with self._lock:
            self._entries[key] = kept
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
