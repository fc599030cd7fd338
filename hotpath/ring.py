"""The ordering ring, pure-Python twin of `hotpath._ring` (same API, same behaviour).

Per-key FIFO with at most one item in flight per key: the items of one
execution are handed out one at a time, in order, while different executions
proceed concurrently. Capacity is bounded and counts in-flight items too, so a
full ring refuses new items (backpressure) instead of growing or dropping.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

from hotpath.vocabulary import bad_capacity, ring_repr


class OrderingRing:
    """Per-key FIFO, one item in flight per key, bounded capacity."""

    __slots__ = ("_capacity", "_held", "_queues", "_in_flight", "_ready")

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(bad_capacity(capacity))
        self._capacity = capacity
        self._held = 0  # queued + in flight
        # key -> deque of queued items; present only while the key holds items
        self._queues: dict[Hashable, deque[Any]] = {}
        self._in_flight: set[Hashable] = set()
        # Keys whose head item can be popped, in the order they became ready.
        self._ready: deque[Hashable] = deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._held

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def ready(self) -> int:
        return len(self._ready)

    def is_full(self) -> bool:
        return self._held >= self._capacity

    def push(self, key: Hashable, item: Any) -> bool:
        """Queue `item` behind the key's earlier items; False (nothing changes) when full."""
        if self._held >= self._capacity:
            return False
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        self._held += 1
        if len(queue) == 1 and key not in self._in_flight:
            self._ready.append(key)
        return True

    def pop(self) -> tuple[Any, Any] | None:
        """The next ready (key, item), marking the key in flight; None when nothing is ready."""
        if not self._ready:
            return None
        key = self._ready.popleft()
        item = self._queues[key].popleft()
        self._in_flight.add(key)
        return key, item

    def pop_many(self, n: int) -> list[tuple[Any, Any]]:
        """Up to `n` ready (key, item) pairs, in ready order."""
        batch: list[tuple[Any, Any]] = []
        while len(batch) < n and (pair := self.pop()) is not None:
            batch.append(pair)
        return batch

    def complete(self, key: Hashable) -> None:
        """Release the key's in-flight item; its next queued item (if any) becomes ready."""
        if key not in self._in_flight:
            raise KeyError(key)
        self._in_flight.remove(key)
        self._held -= 1
        if self._queues[key]:
            self._ready.append(key)
        else:
            del self._queues[key]  # a key with nothing held leaves no trace

    def pending(self, key: Hashable) -> int:
        """Items held for `key`: queued plus the one in flight."""
        queue = self._queues.get(key)
        if queue is None:
            return 0
        return len(queue) + (key in self._in_flight)

    def _debug_counts(self) -> dict[str, int]:
        """Internal bookkeeping for leak checks in tests: keys tracked and free capacity."""
        return {"keys": len(self._queues), "free": self._capacity - self._held}

    def __repr__(self) -> str:
        return ring_repr(self._capacity, self._held, self.in_flight, self.ready)
