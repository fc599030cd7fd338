"""Durable timers, near term in memory: what a worker fires and when.

The ledger's `ordo.timers` holds one row per waiting execution; this keeps
only the owned partitions' timers due within `horizon_s`, in a heap, so that
a million executions waiting for days cost rows on disk and nothing here. A
due timer is handed to the ordering ring like any message of its execution;
the commit of the transition it causes deletes (or replaces) its row, which is
what makes it fire once across restarts.

Each owned partition's rows are walked once, in (fire_at, execution_id)
order: a load reads, per partition, the page after the key where the last
one ended, up to now + horizon (`ledger/timers.py`), so a row is read once on
its way to firing, however long it is due soon. What a commit sets behind a
partition's walk (`covered`) the walk will not come back for: the commit's
settling adds it here (`committed`). A commit of another worker (an
enrolment runs where its trigger is consumed) announces the timers it set in
partitions it does not own (ledger/timers.py, `tell_owners`), and the owner's
next load goes back for them (`set_elsewhere`). A load marks how far it goes before its
query, so a commit that lands after the query's snapshot is added by its
settling; holding a timer twice is harmless (it is held once per
(execution, timer id)), missing one is not.
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
    """The owned partitions' timers due within the horizon, earliest first, and each partition's walk."""

    def __init__(
        self, *, deployment: str = "ordo", horizon_s: float = 60.0, page: int = 20_000, most_held: int = 100_000
    ):
        #: Whose timers these are (the prefix): partition numbers are each deployment's own.
        self.deployment = deployment
        #: The partitions this worker owns now; ownership moves, the heap follows.
        self.partitions: set = set()
        self.horizon_ms = int(horizon_s * 1000)
        #: The most rows one load reads of one partition.
        self.page = page
        #: The most timers held: a load reads no more than the room left, shared among the
        #: partitions, so that memory stays bounded when more fall due at once than the worker
        #: fires (the rest wait on disk, in order).
        self.most_held = most_held
        #: (fire_at_ms, execution_id, timer_id, partition), the earliest first.
        self._heap: list = []
        #: (execution_id, timer_id) in the heap or in flight: held once.
        self._known: set = set()
        #: partition -> the (fire_at_us, execution_id) key its walk has read up to.
        self._after: dict[int, tuple[int, str]] = {}
        #: partition -> the fire time (ms) up to which it holds every timer: the furthest a load
        #: has gone (or is going). A commit's timer up to here is added by its settling.
        self._covered_ms: dict[int, int] = {}
        #: partition -> the (fire_at_us, execution_id) key the next load goes back to: a timer another
        #: worker's commit set there (an enrolment) behind the walk.
        self._behind: dict[int, tuple[int, str]] = {}
        #: partition -> how many times it was claimed: a load's page counts only for the claim it
        #: was read under (given up and claimed again meanwhile, the walk starts over).
        self._claims: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, timer: tuple[str, str]) -> bool:
        """Whether (execution_id, timer_id) is held here or in flight (not done yet)."""
        return timer in self._known

    def own(self, partition: int) -> None:
        """A partition claimed: its walk starts from its earliest timer."""
        if partition not in self.partitions:
            self.partitions.add(partition)
            self._after[partition] = ledger_timers.START
            self._covered_ms[partition] = -1
            self._claims[partition] = self._claims.get(partition, 0) + 1

    def disown(self, partition: int) -> None:
        """Another worker fires this partition's timers now (those in the heap are skipped)."""
        self.partitions.discard(partition)
        self._after.pop(partition, None)
        self._behind.pop(partition, None)
        self._covered_ms.pop(partition, None)

    async def load(self, conn, now_ms: int) -> int:
        """Read the next page of each owned partition's timers due by now + horizon."""
        room = self.most_held - len(self._heap)
        if not self.partitions or room < len(self.partitions):
            return 0
        page = min(self.page, room // len(self.partitions))
        until_ms = now_ms + self.horizon_ms
        for p, key in self._behind.items():
            if p in self._after:
                self._after[p] = min(self._after[p], key)
        self._behind.clear()
        after = dict(self._after)
        claims = dict(self._claims)
        # Before the query: a commit that lands after its snapshot settles after this line.
        for p in after:
            self._covered_ms[p] = max(self._covered_ms[p], until_ms)
        rows = await ledger_timers.due(conn, self.deployment, after, until_ms * 1000, page)
        last: dict[int, tuple[int, str]] = {}
        read: dict[int, int] = {}
        added = 0
        for execution_id, timer_id, fire_at_us, partition in rows:
            added += self.add(execution_id, timer_id, fire_at_us // 1000, partition)
            last[partition] = (fire_at_us, execution_id)
            read[partition] = read.get(partition, 0) + 1
        for p in after:
            if p not in self.partitions or self._claims[p] != claims[p]:
                continue  # given up (and maybe claimed again) while the query ran
            if read.get(p, 0) >= page:
                self._after[p] = last[p]  # a full page: the next load goes on from its last row
            else:
                # Everything up to until_ms is read; the next page starts after it.
                self._after[p] = (until_ms * 1000, "ffffffff-ffff-ffff-ffff-ffffffffffff")
        return added

    def set_elsewhere(self, partition: int, fire_at_us: int) -> None:
        """Another worker's commit set a timer in this partition (an enrolment runs where its trigger
        is consumed): if the walk has passed its time, the next load goes back for it. (What it reads
        again that is held already is held once.)"""
        if partition not in self.partitions or fire_at_us // 1000 > self._covered_ms[partition]:
            return  # not ours, or the walk will come to it
        key = (fire_at_us - 1, ledger_timers.START[1])
        self._behind[partition] = min(self._behind.get(partition, key), key)

    def walk_again(self) -> None:
        """Timers may have been set elsewhere unannounced (the worker's listener was lost): the next
        load goes back to the start of every owned partition, as `set_elsewhere` does for one."""
        for p in self.partitions:
            self._behind[p] = ledger_timers.START

    def add(self, execution_id: str, timer_id: str, fire_at_ms: int, partition: int) -> bool:
        if fire_at_ms is None or partition not in self.partitions:
            return False
        key = (execution_id, timer_id)
        if key in self._known:
            return False
        self._known.add(key)
        heapq.heappush(self._heap, (fire_at_ms, execution_id, timer_id, partition))
        return True

    def committed(self, execution_id: str, timer_id: str, fire_at_ms: int, partition: int) -> bool:
        """A commit set this timer: hold it if its partition's walk has passed its time (or is
        passing it now); a later page brings in the rest."""
        if fire_at_ms > self._covered_ms.get(partition, -1):
            return False
        return self.add(execution_id, timer_id, fire_at_ms, partition)

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
        """Its row stays and the walk has passed it: fire it again at `fire_at_ms`.

        Either the fire changed nothing (its execution cannot be read now: not
        at the next load, which would bring it back within a second), or its
        change was refused as stale (the execution moved on since it was read:
        at once, on a fresh read). Held here; a restart walks to it again.
        """
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
        """The fire has committed (or was stale): its row is gone, and the walk is past it."""
        self._known.discard((fire.key, fire.timer_id))
