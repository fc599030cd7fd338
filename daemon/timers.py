"""Durable timers, near term in memory: what a worker fires and when.

The ledger's `ordo.timers` holds one row per waiting execution; this keeps
only the owned partitions' timers due within `horizon_s`, in a heap, so that
a million executions waiting for days cost rows on disk and nothing here. A
due timer is handed to the ordering ring like any message of its execution;
the commit of the transition it causes deletes (or replaces) its row, which is
what makes it fire once across restarts.
"""

import heapq
from typing import Literal

from ledger import timers as ledger_timers


class TimerFire:
    """A due timer travelling through the pipeline in place of a JetStream message."""

    __slots__ = ("key", "timer_id", "fire_at_ms", "timer_partition")
    kind: Literal["timer"] = "timer"
    subject = "timer"
    stream = "ordo.timers"
    stream_seq = 0
    data = b""
    reply = None
    delivered = 1
    partition = -1
    batch_index = None

    def __init__(self, execution_id: str, timer_id: str, fire_at_ms: int, timer_partition: int = -1):
        self.key = execution_id
        self.timer_id = timer_id
        self.fire_at_ms = fire_at_ms
        #: The ledger partition of its execution (`partition` stays -1: it is no stream message).
        self.timer_partition = timer_partition


class DueTimers:
    def __init__(self, *, horizon_s: float = 60.0, load_limit: int = 100_000):
        #: The partitions this worker owns now; ownership moves, the heap follows.
        self.partitions: set = set()
        self.horizon_ms = int(horizon_s * 1000)
        self.load_limit = load_limit
        self._heap: list = []
        #: (execution_id, timer_id) in the heap or in flight: loaded once.
        self._known: set = set()

    def __len__(self) -> int:
        return len(self._heap)

    def own(self, partition: int) -> None:
        self.partitions.add(partition)

    def disown(self, partition: int) -> None:
        """Another worker fires this partition's timers now (those in the heap are skipped)."""
        self.partitions.discard(partition)

    async def load(self, conn, now_ms: int) -> int:
        """Bring in the timers due before now + horizon that are not here yet."""
        if not self.partitions:
            return 0
        added = 0
        for execution_id, timer_id, fire_at_ms, partition in await ledger_timers.due(
            conn, list(self.partitions), now_ms + self.horizon_ms, self.load_limit
        ):
            added += self.add(execution_id, timer_id, fire_at_ms, partition)
        return added

    def add(self, execution_id: str, timer_id: str, fire_at_ms: int, partition: int) -> bool:
        if fire_at_ms is None or partition not in self.partitions:
            return False
        key = (execution_id, timer_id)
        if key in self._known:
            return False
        self._known.add(key)
        heapq.heappush(self._heap, (fire_at_ms, execution_id, timer_id, partition))
        return True

    def next_due_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_ms: int, limit: int) -> list[TimerFire]:
        fires = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms and len(fires) < limit:
            fire_at_ms, execution_id, timer_id, partition = heapq.heappop(heap)
            if (execution_id, timer_id) not in self._known:
                continue  # cancelled: a commit replaced or dropped it
            if partition not in self.partitions:
                self._known.discard((execution_id, timer_id))
                continue
            fires.append(TimerFire(execution_id, timer_id, fire_at_ms, partition))
        return fires

    def defer(self, fire: TimerFire, fire_at_ms: int) -> None:
        """The fire changed nothing and its row stays (its execution cannot be read now):
        fire it again at `fire_at_ms`, not at the next load, which would bring it back
        within a second. Held here, so a restart tries it once more at once."""
        if fire.timer_partition not in self.partitions:
            self._known.discard((fire.key, fire.timer_id))
            return
        heapq.heappush(self._heap, (fire_at_ms, fire.key, fire.timer_id, fire.timer_partition))

    def cancel(self, execution_id: str, timer_id: str) -> None:
        """A committed change replaced or dropped this timer's row: it must not fire from here.

        (It stays in the heap until its time and is skipped then. Without this,
        every action step's deadline timer fired long after its result, only to
        be found stale: a ledger read and a commit for nothing.)
        """
        self._known.discard((execution_id, timer_id))

    def done(self, fire: TimerFire) -> None:
        """The fire has committed (or was stale): a later load may not bring it back."""
        self._known.discard((fire.key, fire.timer_id))
