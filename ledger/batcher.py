"""The commit protocol: many executions' transitions in one transaction.

The worker hands the batcher one `Unit` per JetStream message: the execution
changes and dead letters that message caused. A batch of units is written in
ONE transaction:

1. If the batch updates executions of owned partitions, lock those partitions'
   rows (FOR SHARE) and compare their epochs with the ones this worker claimed:
   a worker whose partition was taken over is fenced out (`Fenced`).
2. COPY (binary) the executions' new state into per-session temp tables:
   updates (only what an update changes) into `stage_upd`, new executions
   that take this path (whole rows) into `stage_exec`, and their transitions
   (one `ordo.history` row per execution) into `stage_history`. An execution
   that ends in the commit that enrols it has no history row: its row holds
   its transitions (`enrolment_steps`, migration 016).
3. One merge statement: insert new executions (a duplicate enrolment loses on
   the primary key), update existing ones only where the stored `seq` is the
   one the change was computed from (optimistic concurrency), and append the
   transitions of exactly the executions accepted.
4. Insert the dead letters.

New executions skip the staging tables when they can: they are COPYed
straight into `executions` and `history`. A duplicate among them (a
redelivered trigger) fails that transaction on the primary key, and the batch
is committed again through the merge.

Both tables are partitioned by day (migration 008, ledger/partitioning.py):
every row carries its execution's `ledger_day`, and the merge's UPDATE
matches on (execution_id, ledger_day), so Postgres reads one partition per
execution (run-time pruning of a nested loop). An update whose execution
retention has carried forward to another day finds no row under its old key:
it is refused as stale, and its message is applied again on a fresh read.

Only after COMMIT returns does the worker ack the messages. A crash anywhere
before that leaves the messages unacked; their redelivery recomputes the same
changes, which the unique keys and the seq check turn into no-ops.

A batch of enrolments alone, each ending in the commit that enrols it and
asking for nothing more (no timer, wait, limit, letter, engine or effect on
the world: W1's five set steps), is one COPY into `executions` in autocommit,
with no transaction around it: one statement commits all of it or none, and
BEGIN, txid_current() and COMMIT were three of its five round trips.

A connection that fails during COMMIT leaves the outcome in doubt. Each
transaction takes its id (txid_current) first; the retry asks Postgres
(txid_status) and, when that transaction did commit, keeps its result instead
of committing its units again: a second time their changes would be refused as
stale, and the actions and events they ask for would never be carried out.
A lone COPY has no id to ask about: once its backend has ended, its rows are
there or not, all of them or none.
A commit attempt is given up as soon as its connection is lost, wherever it
waits (`_until_connection_lost`): a COPY waiting for the socket would wait for
good.

A batch that fails for a reason other than the connection is split in halves
until the unit that causes the failure is alone; that unit is dead-lettered
with the database's error and everything else commits (bad input never blocks
good input).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

import asyncpg

from ledger import connection, leases, limits
from ledger import timers as ledger_timers
from ledger.connection import CONNECTION_ERRORS, when_lost

log = logging.getLogger("ordo.ledger")

#: An execution row as the worker builds it; updated_at and finished_at are
#: the ledger's commit clock (column defaults), see the migration.
EXEC_COLUMNS = (
    "execution_id",
    "tenant",
    "workflow_id",
    "workflow_version",
    "subject_type",
    "subject_id",
    "event_id",
    "partition",
    "status",
    "seq",
    "pc",
    "steps",
    "waiting",
    "last_stream_seq",
    "context",
    "subject",
    "event",
    "created_at",
    "runtime",
    "ledger_day",
    "enrolment_steps",
)
#: A commit's transitions of one execution as one row of ordo.history (migration 007), in the
#: table's column order; `ledger_day` is its execution's (migration 008).
HISTORY_COLUMNS = ("execution_id", "first_seq", "at", "source_seq", "steps", "ledger_day")
_STATUS = EXEC_COLUMNS.index("status")
_CONTEXT = EXEC_COLUMNS.index("context")
_LEDGER_DAY = EXEC_COLUMNS.index("ledger_day")

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_exec
    (LIKE ordo.executions INCLUDING DEFAULTS, finished boolean NOT NULL)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_upd
    (execution_id uuid NOT NULL, ledger_day date NOT NULL, status text NOT NULL, seq int NOT NULL,
     pc int NOT NULL, steps int NOT NULL, waiting text, last_stream_seq bigint NOT NULL, context jsonb NOT NULL,
     runtime jsonb NOT NULL, finished boolean NOT NULL, prev_seq int NOT NULL)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_history
    (LIKE ordo.history) ON COMMIT DELETE ROWS;
"""
_STAGE_NEW_COLUMNS = EXEC_COLUMNS + ("finished",)
#: What an update changes: an execution's identity, subject and event are written once, at enrolment.
#: Its key (execution_id, ledger_day) names the row, and so the one partition Postgres reads.
UPDATE_COLUMNS = (
    "execution_id",
    "ledger_day",
    "status",
    "seq",
    "pc",
    "steps",
    "waiting",
    "last_stream_seq",
    "context",
    "runtime",
)
_UPDATE_INDEXES = tuple(EXEC_COLUMNS.index(name) for name in UPDATE_COLUMNS)
_STAGE_UPDATE_COLUMNS = UPDATE_COLUMNS + ("finished", "prev_seq")

# The slow path, for updates and for a batch whose fast path hit a duplicate:
# insert new executions (whole rows, in stage_exec) unless they exist, update
# existing ones (only what changes, in stage_upd) only where the stored seq is
# the one the change was computed from, and append the transitions of exactly
# the executions accepted.
_MERGE = (
    """
WITH inserted AS (
    INSERT INTO ordo.executions ("""
    + ", ".join(EXEC_COLUMNS)
    + """, updated_at, finished_at)
    SELECT """
    + ", ".join(EXEC_COLUMNS)
    + """, clock_timestamp(),
           CASE WHEN finished THEN clock_timestamp() END
    FROM stage_exec
    ON CONFLICT (execution_id, ledger_day) DO NOTHING
    RETURNING execution_id
), updated AS (
    UPDATE ordo.executions e
    SET status = s.status, seq = s.seq, pc = s.pc, steps = s.steps, waiting = s.waiting,
        last_stream_seq = s.last_stream_seq, context = s.context, runtime = s.runtime,
        updated_at = clock_timestamp(),
        finished_at = CASE WHEN s.finished THEN clock_timestamp() END
    FROM stage_upd s
    WHERE e.execution_id = s.execution_id AND e.ledger_day = s.ledger_day AND e.seq = s.prev_seq
    RETURNING e.execution_id
), accepted AS (
    SELECT execution_id, true AS enrolled FROM inserted UNION ALL SELECT execution_id, false FROM updated
), appended AS (
    INSERT INTO ordo.history
    SELECT h.* FROM stage_history h JOIN accepted a USING (execution_id)
    ON CONFLICT DO NOTHING
)
SELECT execution_id::text, enrolled FROM accepted
"""
)

# A commit that enrols takes its transaction id and, in the same round trip, finds the new
# executions enrolled already on the day before theirs: a trigger published again past
# JetStream's duplicate window, across midnight UTC, has a later day than the first one and
# would not collide on the primary key (execution_id, ledger_day). One B-tree probe per
# enrolment, in the previous day's partition only (run-time pruning), and only for the
# enrolments whose trigger's time is near or before their day's midnight (`check_day_before`):
# a probe of a day of traffic's index is a random read, ~6 us with 1M rows in it.
_BEGIN_ENROLLING = """
SELECT txid_current(), ARRAY(
    SELECT e.execution_id::text FROM unnest($1::uuid[], $2::date[]) AS k(execution_id, ledger_day)
    JOIN ordo.executions e ON e.execution_id = k.execution_id AND e.ledger_day = k.ledger_day - 1)
"""

_INSERT_DEAD_LETTER = """
INSERT INTO ordo.dead_letters
    (reason, error, tenant, workflow_id, execution_id, subject, stream, stream_seq, payload, step_id, attempts,
     batch_index)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT DO NOTHING
"""

# A timer or wait written in place of a stored one is the committing deployment's, as a new one is:
# the stored one may be another's (a row of before migration 021, which every deployment's workers
# take as their own) or no one's ('', migration 013), and would fire or be woken where it is not run.
_SET_TIMERS = """
INSERT INTO ordo.timers (execution_id, partition, timer_id, fire_at, purpose, step_id, deployment)
SELECT *, $7 FROM unnest($1::uuid[], $2::int[], $3::text[], $4::timestamptz[], $5::text[], $6::text[])
ON CONFLICT (execution_id) DO UPDATE
SET timer_id = EXCLUDED.timer_id, fire_at = EXCLUDED.fire_at, purpose = EXCLUDED.purpose, step_id = EXCLUDED.step_id,
    deployment = EXCLUDED.deployment
"""

_SET_WAITS = """
INSERT INTO ordo.event_waits (execution_id, tenant, subject_type, subject_id, event_type, step_id, deployment)
SELECT *, $7 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (execution_id) DO UPDATE
SET tenant = EXCLUDED.tenant, subject_type = EXCLUDED.subject_type, subject_id = EXCLUDED.subject_id,
    event_type = EXCLUDED.event_type, step_id = EXCLUDED.step_id, deployment = EXCLUDED.deployment
"""
# The engine of executions enrolled on a candidate engine (migration 017), set on the rows just
# written: the enrolment COPY stays the same for every execution outside an engine rollout.
_SET_ENGINES = """
UPDATE ordo.executions e SET engine = s.engine
FROM unnest($1::uuid[], $2::date[], $3::text[]) AS s(execution_id, ledger_day, engine)
WHERE e.execution_id = s.execution_id AND e.ledger_day = s.ledger_day
"""


def _history_to_write(changes: list[ExecutionChange]) -> list[tuple[Any, ...]]:
    """The ordo.history rows of these changes: those whose execution's row does not hold them."""
    return [h for c in changes if not c.history_in_row for h in c.history]


def _earliest_timers(enrolled: list[ExecutionChange], owned: dict[int, int]) -> dict[int, int]:
    """Partition -> the earliest fire time (epoch µs) of the timers these enrolments set in partitions
    this worker does not own: their owners' walks may have passed it (ledger/timers.py)."""
    earliest: dict[int, int] = {}
    for change in enrolled:
        if change.partition not in owned and change.timer is not None:
            us = int(change.timer[1].timestamp() * 1_000_000)
            earliest[change.partition] = min(us, earliest.get(change.partition, us))
    return earliest


async def _insert_letters(conn: asyncpg.Connection, letters: list[DeadLetter]) -> None:
    await conn.executemany(
        _INSERT_DEAD_LETTER,
        [
            (
                d.reason,
                d.error,
                d.tenant,
                d.workflow_id,
                d.execution_id,
                d.subject,
                d.stream,
                d.stream_seq,
                d.payload,
                d.step_id,
                d.attempts,
                d.batch_index,
            )
            for d in letters
        ],
    )


#: A transaction Postgres rolled back because of another one (deadlock_detected, serialization_failure),
#: or one that waited too long for a lock (lock_not_available: retention's lock_timeout): nothing is
#: wrong with the units, and the whole commit is tried again as it was (never bisected as poison).
CONFLICT_ERRORS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, asyncpg.LockNotAvailableError)


class Fenced(RuntimeError):
    """This worker's claim on a partition is stale: another worker owns it now."""

    def __init__(self, partitions: list[int]):
        super().__init__(f"ownership of partition(s) {partitions} moved to another worker; commits refused")
        self.partitions = partitions


@dataclass(slots=True)
class ExecutionChange:
    """One execution's new state (a row in EXEC_COLUMNS order) and the history row of its new transitions."""

    execution_id: str
    partition: int
    row: tuple[Any, ...]
    #: Rows in HISTORY_COLUMNS order: one when the change records transitions, else none.
    history: list[tuple[Any, ...]]
    #: The seq the state was computed from (0: a new execution).
    prev_seq: int
    finished: bool
    #: Ledger side effects, applied in the same transaction when the change is accepted:
    #: the timer to set (timer_id, fire_at, purpose, step_id), whether to drop the
    #: execution's timer, the event wait to register (tenant, subject_type, subject_id,
    #: event_type, step_id) or drop, and dead letters (a step that failed for good).
    timer: tuple[str, datetime, str, str] | None = None
    drop_timer: bool = False
    #: The id of the stored timer this change replaces or drops (None: it keeps it, or had none).
    replaced_timer: str | None = None
    wait: tuple[str, str, str, str, str] | None = None
    drop_wait: bool = False
    letters: list[DeadLetter] = field(default_factory=list)
    #: An action call queued behind its limits (ledger/limits.py: bucket, step_id, attempt, action,
    #: rate_per_s, concurrency, lease_ms), and whether the execution gives back its queue row and
    #: its concurrency slot (written before the new wait, if both).
    limit_wait: tuple[str, str, int, str, float | None, int | None, int | None] | None = None
    limit_release: bool = False
    #: Effects on the world (action requests, emitted events), for after the commit: (kind, data).
    after_commit: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The trigger's `ts` (epoch ms) when this change ends the execution: end-to-end latency.
    trigger_ts_ms: float | None = None
    #: Set by the batcher on an enrolment that does not enrol: an earlier unit of the same batch
    #: enrols the same execution, or the merge finds it enrolled already (its id may be accepted
    #: all the same, for an update of it in the same batch).
    duplicate: bool = False
    #: The in-memory record this change was computed on (ledger.executions.ExecutionRecord),
    #: for a worker that keeps it for the execution's next message once the change commits.
    record: object = None
    #: How many transitions the history row holds.
    transitions: int = 0
    #: The row's `enrolment_steps` hold them (an execution that ends in the commit that enrols it,
    #: migration 016): `history` is what they are, and nothing is written to ordo.history.
    history_in_row: bool = False
    #: An enrolment whose trigger may have enrolled on the day before its own (ledger/partitioning.py
    #: `may_be_enrolled_the_day_before`): the commit looks there.
    check_day_before: bool = False
    #: An enrolment on a candidate engine (an engine rollout): its name, written with the execution.
    engine: str | None = None

    @property
    def is_new(self) -> bool:
        return self.prev_seq == 0

    @property
    def status(self) -> str:
        status: str = self.row[_STATUS]
        return status

    @property
    def ledger_day(self) -> date:
        day: date = self.row[_LEDGER_DAY]
        return day

    @property
    def context_json(self) -> str:
        context: str = self.row[_CONTEXT]
        return context

    def update_row(self) -> tuple[Any, ...]:
        """The stage_upd row of an update: what changed, and the seq it was computed from."""
        row = self.row
        return tuple(row[i] for i in _UPDATE_INDEXES) + (self.finished, self.prev_seq)


@dataclass(slots=True)
class DeadLetter:
    reason: str
    error: str
    subject: str
    stream: str
    stream_seq: int
    payload: bytes
    tenant: str | None = None
    workflow_id: str | None = None
    execution_id: str | None = None
    step_id: str | None = None
    #: JSON text: the attempt history of a failed step.
    attempts: str | None = None
    #: The event's place in its trigger batch message (None: the letter stands for a whole message).
    batch_index: int | None = None


@dataclass(frozen=True, slots=True)
class DispatchFailure:
    """An execution whose dispatcher raised on the unit's message, dead-lettered `dispatch_error`.

    Not written: once the batch commits, the worker counts it under its workflow's rollout as a
    failed execution of its version (daemon/rollout_tally.py), so a candidate that crashes is rolled
    back as one that fails is.
    """

    execution_id: str
    tenant: str
    workflow_id: str
    workflow_version: int
    #: The candidate engine it runs on (None: the worker's own build).
    engine: str | None
    created_at: datetime
    #: It raised on the execution's first steps, so nothing of it was recorded: it counts as started too.
    enrolling: bool


class Source(Protocol):
    """What a unit stands for: one message, or one event of a batch message, or another item of work.

    The worker's work items (daemon/work_items.py) are these; a dead letter of
    the unit records where its source came from and what it carried.
    """

    @property
    def key(self) -> str | None:
        """The execution it is addressed to, when known."""

    @property
    def subject(self) -> str: ...

    @property
    def stream(self) -> str: ...

    @property
    def stream_seq(self) -> int: ...

    @property
    def data(self) -> bytes:
        """The payload: what a dead letter keeps."""

    @property
    def batch_index(self) -> int | None:
        """Its event's place in a trigger batch message (None: it stands for a whole message)."""


@dataclass(slots=True)
class Unit:
    """Everything one message caused; acked only when all of it has committed."""

    token: Source
    changes: list[ExecutionChange] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: Set by the batcher when the unit itself could not commit and was dead-lettered.
    failed: str | None = None
    #: (execution_id, timer_id) of stale timer rows to delete (a fire nothing wanted).
    stale_timers: list[tuple[str, str]] = field(default_factory=list)
    #: A timer fire that could not be applied now (its execution's row cannot be read) and
    #: keeps its row: fire it again after this many ms (0: the fire is done).
    retry_timer_after_ms: int = 0
    #: The executions the dispatcher raised on for this message (each has its `dispatch_error` dead letter).
    dispatch_failures: list[DispatchFailure] = field(default_factory=list)

    def dead_letter(self, reason: str, error: str, **where: str | None) -> None:
        """Dead-letter the message this unit stands for (it names its source).

        The worker logs the dead letter once it has committed (with the step's dead letters).
        """
        source = self.token
        execution_id = where.pop("execution_id", None) or source.key
        self.dead_letters.append(
            DeadLetter(
                reason,
                error,
                source.subject,
                source.stream,
                source.stream_seq,
                source.data,
                execution_id=execution_id if _is_uuid(execution_id) else None,
                batch_index=source.batch_index,
                **where,
            )
        )

    @property
    def rows(self) -> int:
        return 1 + sum(1 + len(c.history) for c in self.changes) + len(self.dead_letters)


@dataclass(slots=True)
class CommitResult:
    units: list[Unit]
    #: The ids of the executions whose changes were accepted.
    accepted: set[str]
    seconds: float
    rows: int
    attempts: int


class LedgerBatcher:
    """Gathers units, then commits them in one transaction.

    One commit at a time: the caller takes the next batch when the previous
    commit is done. A batch holds at most max_rows rows (a unit is never
    split: one bigger than that goes alone). It is due when full, or once
    its oldest unit has waited max_ms. With max_ms 0 (the config's default)
    it is due at once, so a batch is whatever came in while the previous
    commit ran: small and quick when load is light, big when it is heavy
    (group commit). A wait only adds latency while the connection is idle.

    While a pull is being enrolled (`filling()`), a batch is not cut before it
    is full or `most_fill_wait_ms` old: intake yields the event loop between
    slices of a pull so that a quiet lane's events are not held behind it, and
    the commit loop would otherwise commit each slice on its own.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_rows: int,
        max_ms: float,
        deployment: str = "ordo",
        idle_in_transaction_s: float = 5.0,
        most_fill_wait_ms: float = 20.0,
        tcp_timeout_s: float = connection.TCP_TIMEOUT_S,
    ):
        self._dsn = dsn
        #: Seconds of silence after which the connection is given up (ledger/connection.py): a commit
        #: on a connection cut without a word is then retried on a new one, not held for minutes.
        self.tcp_timeout_s = tcp_timeout_s
        #: The longest a commit's transaction may wait for this worker's next statement before Postgres
        #: ends it: its partition rows stay locked meanwhile, and a claim skips locked rows, so a worker
        #: cut off mid-commit would otherwise keep its partitions from everyone, lease or no lease, until
        #: Postgres noticed the dead connection (hours of TCP keepalive, never behind a proxy).
        self.idle_in_transaction_s = idle_in_transaction_s
        #: Whose partitions the epochs and watermarks are (the prefix; ledger/leases.py), and whose
        #: the executions it enrols, timers and waits it writes are.
        self.deployment = deployment
        self.max_rows = max_rows
        self.max_delay = max_ms / 1000.0
        #: The longest a batch waits for the pulls being enrolled to end (`filling`).
        self.most_fill_wait = max(self.max_delay, most_fill_wait_ms / 1000.0)
        #: How many pulls are being enrolled now.
        self._filling = 0
        #: (unit, its rows) in arrival order; the rows counted once, when the unit comes in.
        self._pending: list[tuple[Unit, int]] = []
        #: Likewise, the units that go before all of those (`add(..., ahead=True)`).
        self._ahead: list[tuple[Unit, int]] = []
        self._rows = 0
        self._first_at = 0.0
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._conn: asyncpg.Connection | None = None
        #: partition -> the watermark this batcher last recorded: a commit writes only those that moved on.
        self._written: dict[int, int] = {}
        #: Soaks only (daemon/faults.py): called with "before_commit" and "after_commit"; may raise.
        self.fault_hook: Callable[[str], None] | None = None
        #: The transaction whose COMMIT, or the lone COPY whose rows, went out and did not return.
        self._in_doubt: _InDoubt | None = None
        #: (units, accepted) of each transaction of the current commit() that committed.
        self._landed: list[tuple[list[Unit], set[str]]] = []

    # -- intake ---------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return self._rows

    def add(self, unit: Unit, *, ahead: bool = False) -> None:
        """Queue a unit for the next batches; one `ahead` goes before every unit queued without
        (a quiet tenant's trigger before a burst's backlog: daemon/intake.py). The units of one
        execution never pass each other either way: the ordering ring holds its next message
        until this one has committed, and a trigger is an execution's first."""
        if not self._pending and not self._ahead:
            # The first unit starts the batch's clock: wake next_batch so it
            # waits max_ms from now rather than sleeping out its idle timeout.
            self._first_at = time.monotonic()
            self._wakeup.set()
        rows = unit.rows
        (self._ahead if ahead else self._pending).append((unit, rows))
        self._rows += rows
        if self._rows >= self.max_rows:
            self._wakeup.set()
            # Backpressure: past two batches' worth, intake waits for a commit.
            if self._rows >= 2 * self.max_rows:
                self._space.clear()

    @contextlib.contextmanager
    def filling(self) -> Iterator[None]:
        """While this is open, a pull is being enrolled: its next slices are on their way, so a
        batch waits for them (up to most_fill_wait) rather than being cut at each slice."""
        self._filling += 1
        try:
            yield
        finally:
            self._filling -= 1
            if not self._filling:
                self._wakeup.set()

    async def wait_for_space(self) -> None:
        await self._space.wait()

    async def next_batch(self, stop: asyncio.Event | None = None) -> list[Unit]:
        """Wait until a batch is due (full, old enough, or stopping) and take it.

        While stopping, an empty batcher returns [] after a short wait so that
        the caller can check whether anything is still in flight.
        """
        while True:
            stopping = stop is not None and stop.is_set()
            if self._pending or self._ahead:
                age = time.monotonic() - self._first_at
                due_at = self.most_fill_wait if self._filling else self.max_delay
                if self._rows >= self.max_rows or age >= due_at or stopping:
                    break
                timeout = due_at - age
            else:
                timeout = 0.05 if stopping else 0.25
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                if stopping and not self._pending and not self._ahead:
                    return []
        return self._take()

    def _take(self) -> list[Unit]:
        """The units queued ahead, then the oldest others, up to max_rows rows of them (at least one
        unit); the rest stay, still due."""
        units: list[Unit] = []
        rows = 0
        for queue in (self._ahead, self._pending):
            taken = 0
            for unit, unit_rows in queue:
                if units and rows + unit_rows > self.max_rows:
                    break
                units.append(unit)
                rows += unit_rows
                taken += 1
            del queue[:taken]
            if queue:
                break  # full
        self._rows -= rows
        if self._rows < 2 * self.max_rows:
            self._space.set()
        return units

    def nudge(self) -> None:
        """Wake next_batch (used on shutdown)."""
        self._wakeup.set()

    # -- commit ---------------------------------------------------------------

    async def connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # A statement that outlives this (a connection a restart left half-dead) fails and
            # is retried on a new connection instead of holding every commit behind it.
            # `ordo.deployment`: the executions this connection enrols are written as this
            # deployment's (the column's default, migration 021).
            self._conn = await connection.connect(
                self._dsn,
                tcp_timeout_s=self.tcp_timeout_s,
                timeout=10,
                command_timeout=120,
                server_settings={
                    "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction_s * 1000)),
                    "ordo.deployment": self.deployment,
                },
            )
            await self._conn.execute(_CREATE_STAGING)
        return self._conn

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None

    async def commit(
        self, units: list[Unit], epochs: dict[int, int], watermarks: dict[int, int], stop: asyncio.Event | None = None
    ) -> CommitResult:
        """Commit the units; retries lost connections with backoff (a slow or
        restarting Postgres slows intake, it loses nothing), and a transaction
        rolled back by a conflict with another (CONFLICT_ERRORS) at once.

        `epochs`: partition -> the epoch the caller claimed it under, checked by
        every transaction that touches the partition (read when the check runs:
        the caller's own map, not a copy). `watermarks`: partition -> the
        watermark to record with the units, where it moved on.
        """
        started = time.monotonic()
        attempts = 0
        delay = 0.05
        self._in_doubt, self._landed = None, []
        while True:
            attempts += 1
            try:
                await self._resolve_in_doubt()
                landed = {id(unit) for done, _ in self._landed for unit in done}
                remaining = [unit for unit in units if id(unit) not in landed]
                if remaining:
                    await self._until_connection_lost(self._commit_isolating_poison, remaining, epochs, watermarks)
                accepted = set().union(*(accepted for _, accepted in self._landed))
                rows = sum(u.rows for u in units)
                return CommitResult(units, accepted, time.monotonic() - started, rows, attempts)
            except CONNECTION_ERRORS as exc:
                log.warning(
                    "ledger commit failed (%s: %s); retrying in %.2fs",
                    type(exc).__name__,
                    exc,
                    delay,
                    extra={"reason": "ledger_connection", "error": f"{type(exc).__name__}: {exc}"},
                )
                await self.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except CONFLICT_ERRORS as exc:
                log.warning(
                    "ledger commit rolled back by a conflict (%s: %s); trying it again",
                    type(exc).__name__,
                    exc,
                    extra={"reason": "ledger_conflict", "error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(0.01 * min(attempts, 20))

    async def _until_connection_lost(self, attempt: Callable[..., Coroutine[Any, Any, set[str]]], *args: Any) -> None:
        """Await `attempt(*args)`, a commit attempt, given up as soon as the connection it runs on is lost.

        asyncpg's COPY waits, with no timeout, for the socket to take more data (its
        command_timeout does not cover that wait), and a connection lost meanwhile never
        takes any: a backend terminated during a COPY bigger than asyncpg's 512 KiB
        buffer could leave the commit loop waiting for good, the worker alive and silent,
        its partitions leased and none of their messages committed. Given up, the attempt
        is a lost connection like any other, retried on a new one: what it committed is
        in `_landed`, and a COMMIT it had sent is in `_in_doubt`.
        """
        conn = await self.connect()
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_lost(_conn: object) -> None:
            if not lost.done():
                lost.set_result(None)

        when_lost(conn, on_lost)
        running = asyncio.ensure_future(attempt(*args))
        either: list[asyncio.Future[Any]] = [running, lost]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                running.result()
                return
        finally:
            conn.remove_termination_listener(on_lost)
            if not running.done():
                running.cancel()
                await asyncio.wait([running])  # on a closed connection, whatever it awaits next fails at once
        cause = None if running.cancelled() else running.exception()
        raise asyncpg.ConnectionDoesNotExistError("the ledger connection was lost during the commit") from cause

    async def _commit_isolating_poison(
        self, units: list[Unit], epochs: dict[int, int], watermarks: dict[int, int]
    ) -> set[str]:
        try:
            return await self._commit_once(units, epochs, watermarks)
        except (Fenced, *CONNECTION_ERRORS, *CONFLICT_ERRORS):
            raise
        except asyncpg.PostgresError as exc:
            if len(units) == 1:
                unit = units[0]
                source = unit.token
                log.error(
                    "a message's changes cannot be committed, dead-lettering it: %s",
                    exc,
                    extra={
                        "execution_id": source.key,
                        "reason": "commit_error",
                        "error": f"{type(exc).__name__}: {exc}",
                        "source": f"{source.stream}:{source.stream_seq}",
                    },
                )
                unit.failed = f"{type(exc).__name__}: {exc}"
                unit.changes = []
                unit.dead_letters = [_commit_error_letter(unit, exc)]
                return await self._commit_once(units, epochs, watermarks)
            half = len(units) // 2
            return await self._commit_isolating_poison(
                units[:half], epochs, watermarks
            ) | await self._commit_isolating_poison(units[half:], epochs, watermarks)

    async def _resolve_in_doubt(self) -> None:
        """After a failure during COMMIT, or during a lone COPY: ask Postgres whether it committed."""
        doubt = self._in_doubt
        if doubt is None:
            return
        conn = await self.connect()
        if doubt.xid is None:
            committed = await _lone_copy_landed(conn, doubt)
            what = "lone COPY"
        else:
            for _ in range(100):
                status = await conn.fetchval("SELECT txid_status($1)", doubt.xid)
                if status != "in progress":
                    break
                # Its backend has not noticed that the client is gone: ending it settles the transaction.
                await conn.execute("SELECT pg_terminate_backend($1)", doubt.pid)
                await asyncio.sleep(0.05)
            else:
                log.warning("ledger transaction %d is still in progress; committing its units again", doubt.xid)
            committed = status == "committed"
            what = f"transaction {doubt.xid}"
        self._in_doubt = None
        if committed:
            log.warning("the ledger commit in doubt (%s) did commit; keeping its result", what)
            self._landed.append((doubt.units, doubt.accepted))

    async def _commit_once(
        self, units: list[Unit], epochs: dict[int, int], watermarks: dict[int, int], *, copy_new: bool = True
    ) -> set[str]:
        """One transaction for `units`; the accepted execution ids.

        New executions are COPYed straight into the ledger (`copy_new`): a
        duplicate among them (a redelivered trigger: rare) fails the whole
        transaction with a unique violation, and the batch is committed again
        through the staging merge, which sorts duplicates out. No savepoint:
        two round trips on every commit cost more than the rare redo.
        """
        conn = await self.connect()
        new, updates, letters, touched, enrolled, stale = [], [], [], set(), set(), []
        for unit in units:
            for change in unit.changes:
                if change.is_new:
                    # Two deliveries of one trigger in one batch: the first one enrols.
                    change.duplicate = change.execution_id in enrolled
                    if change.duplicate:
                        continue
                    enrolled.add(change.execution_id)
                    new.append(change)
                else:
                    updates.append(change)
                    touched.add(change.partition)
            letters.extend(unit.dead_letters)
            stale.extend(unit.stale_timers)
        accepted = set()
        progress = {p: w for p, w in watermarks.items() if w > self._written.get(p, -1)}
        touched.update(progress)
        if copy_new and new and not (updates or letters or stale or touched) and all(map(_alone_in_copy, new)):
            return await self._copy_alone(conn, units, epochs, watermarks, new, enrolled)
        try:
            async with conn.transaction():
                looked_up = [c for c in new if c.check_day_before]
                if looked_up:
                    xid, earlier = (
                        await conn.fetch(
                            _BEGIN_ENROLLING, [c.execution_id for c in looked_up], [c.ledger_day for c in looked_up]
                        )
                    )[0]
                    if earlier:
                        for change in new:
                            change.duplicate = change.execution_id in earlier
                        new = [c for c in new if not c.duplicate]
                        enrolled.difference_update(earlier)
                else:
                    xid = await conn.fetchval("SELECT txid_current()")
                if touched:
                    await self._check_epochs(conn, sorted(touched), epochs)
                if progress:
                    await leases.set_watermarks(conn, self.deployment, progress)
                merged = updates
                if new and copy_new:
                    await self._copy_new(conn, new)
                    accepted.update(enrolled)
                    await self._apply_effects(conn, new)
                elif new:
                    merged = new + updates
                    await conn.copy_records_to_table(
                        "stage_exec",
                        records=[c.row + (c.finished,) for c in new],
                        columns=_STAGE_NEW_COLUMNS,
                    )
                if updates:
                    await conn.copy_records_to_table(
                        "stage_upd", records=[c.update_row() for c in updates], columns=_STAGE_UPDATE_COLUMNS
                    )
                if merged:
                    history = _history_to_write(merged)
                    if history:
                        await conn.copy_records_to_table("stage_history", records=history, columns=HISTORY_COLUMNS)
                    rows = await conn.fetch(_MERGE)
                    accepted.update(r[0] for r in rows)
                    # An enrolment the merge did not insert is a duplicate, even when its execution
                    # is accepted: an update of it in this batch (a signal, a result) was.
                    inserted = {r[0] for r in rows if r[1]}
                    for change in merged:
                        if change.is_new:
                            change.duplicate = change.execution_id not in inserted
                    await self._apply_effects(
                        conn, [c for c in merged if c.execution_id in accepted and not c.duplicate]
                    )
                elsewhere = _earliest_timers(
                    [c for c in new if c.timer and c.execution_id in accepted and not c.duplicate], epochs
                )
                if elsewhere:
                    await ledger_timers.tell_owners(conn, self.deployment, elsewhere)
                if letters:
                    await _insert_letters(conn, letters)
                if stale:
                    await conn.execute(
                        "DELETE FROM ordo.timers t USING unnest($1::uuid[], $2::text[]) AS s(execution_id, timer_id)"
                        " WHERE t.execution_id = s.execution_id AND t.timer_id = s.timer_id",
                        *map(list, zip(*stale, strict=True)),
                    )
                if self.fault_hook is not None:
                    self.fault_hook("before_commit")
                self._in_doubt = _InDoubt(conn.get_server_pid(), units, accepted, xid=xid)
        except asyncpg.UniqueViolationError:
            if not (copy_new and new):
                raise
            # A duplicate among the new: merge them all.
            return await self._commit_once(units, epochs, watermarks, copy_new=False)
        self._kept(units, accepted)
        self._written.update(progress)
        return accepted

    async def _copy_alone(
        self,
        conn: asyncpg.Connection,
        units: list[Unit],
        epochs: dict[int, int],
        watermarks: dict[int, int],
        new: list[ExecutionChange],
        enrolled: set[str],
    ) -> set[str]:
        """Commit enrolments that need nothing but their rows (`_alone_in_copy`) as one COPY in autocommit.

        A duplicate among them fails the COPY, all of it, and the batch is committed again through the
        merge, as on the transaction's fast path.
        """
        if self.fault_hook is not None:
            self.fault_hook("before_commit")
        accepted = set(enrolled)
        self._in_doubt = _InDoubt(conn.get_server_pid(), units, accepted, copied=new)
        try:
            await conn.copy_records_to_table(
                "executions", schema_name="ordo", records=[c.row for c in new], columns=EXEC_COLUMNS
            )
        except asyncpg.PostgresError as exc:
            if not isinstance(exc, CONNECTION_ERRORS):
                self._in_doubt = None  # Postgres answered: the statement did not commit
            if not isinstance(exc, asyncpg.UniqueViolationError):
                raise
            return await self._commit_once(units, epochs, watermarks, copy_new=False)
        self._kept(units, accepted)
        return accepted

    def _kept(self, units: list[Unit], accepted: set[str]) -> None:
        """The COMMIT, or the lone COPY, returned: its units landed with these accepted (after the soaks'
        "after_commit" fault, which leaves it in doubt)."""
        if self.fault_hook is not None:
            self.fault_hook("after_commit")
        self._in_doubt = None
        self._landed.append((units, accepted))

    async def _apply_effects(self, conn: asyncpg.Connection, changes: list[ExecutionChange]) -> None:
        """Timers, event waits, step dead letters and enrolments' engines of the accepted changes."""
        drop_timers = [c.execution_id for c in changes if c.drop_timer]
        timers = [(c.execution_id, c.partition, *c.timer) for c in changes if c.timer]
        drop_waits = [c.execution_id for c in changes if c.drop_wait]
        waits = [(c.execution_id, *c.wait) for c in changes if c.wait]
        letters = [d for c in changes for d in c.letters]
        if drop_timers:
            await conn.execute("DELETE FROM ordo.timers WHERE execution_id = ANY($1::uuid[])", drop_timers)
        if timers:
            await conn.execute(_SET_TIMERS, *map(list, zip(*timers, strict=True)), self.deployment)
        if drop_waits:
            await conn.execute("DELETE FROM ordo.event_waits WHERE execution_id = ANY($1::uuid[])", drop_waits)
        if waits:
            await conn.execute(_SET_WAITS, *map(list, zip(*waits, strict=True)), self.deployment)
        if letters:
            await _insert_letters(conn, letters)
        releases = [c.execution_id for c in changes if c.limit_release]
        if releases:
            await limits.release(conn, releases, [c.execution_id for c in changes if c.limit_release and c.finished])
        limit_waits = [(c.execution_id, *c.limit_wait) for c in changes if c.limit_wait]
        if limit_waits:
            await limits.queue(conn, limit_waits)
        engines = [(c.execution_id, c.ledger_day, c.engine) for c in changes if c.engine is not None]
        if engines:
            await conn.execute(_SET_ENGINES, *map(list, zip(*engines, strict=True)))

    async def _copy_new(self, conn: asyncpg.Connection, new: list[ExecutionChange]) -> None:
        """The fast path: COPY new executions straight into the ledger's tables.

        Raises UniqueViolationError when one of them exists already (see _commit_once).
        """
        finished = [c.row for c in new if c.finished]
        running = [c.row + (None,) for c in new if not c.finished]
        if finished:
            await conn.copy_records_to_table("executions", schema_name="ordo", records=finished, columns=EXEC_COLUMNS)
        if running:
            await conn.copy_records_to_table(
                "executions", schema_name="ordo", records=running, columns=EXEC_COLUMNS + ("finished_at",)
            )
        history = _history_to_write(new)
        if history:
            await conn.copy_records_to_table("history", schema_name="ordo", records=history, columns=HISTORY_COLUMNS)

    async def _check_epochs(self, conn: asyncpg.Connection, partitions: list[int], epochs: dict[int, int]) -> None:
        # FOR SHARE: a claim (UPDATE of the epoch) waits for this commit, and a
        # commit after the claim sees the new epoch. Either order is safe.
        current = await leases.epochs_for_commit(conn, self.deployment, partitions)
        stale = [p for p in partitions if current.get(p) != epochs.get(p)]
        if stale:
            raise Fenced(stale)


@dataclass(slots=True)
class _InDoubt:
    """A commit whose outcome the connection lost: a transaction that sent its COMMIT (`xid`), or a
    lone COPY in autocommit (`copied`, its new executions)."""

    pid: int
    units: list[Unit]
    accepted: set[str]
    xid: int | None = None
    copied: list[ExecutionChange] = field(default_factory=list)


def _alone_in_copy(change: ExecutionChange) -> bool:
    """An enrolment whose commit is its row alone: it ends in this commit (its transitions in the row),
    and asks for nothing else in the ledger or of the world.

    Nothing it does after the commit depends on being told apart from a duplicate, then: a lone COPY
    in doubt whose rows all exist counts as committed, although an earlier delivery of every one of
    its triggers could have written them (it would have failed on the primary key).
    """
    return (
        change.finished
        and change.history_in_row
        and not change.check_day_before
        and change.timer is None
        and not change.drop_timer
        and change.wait is None
        and not change.drop_wait
        and not change.letters
        and change.limit_wait is None
        and not change.limit_release
        and not change.after_commit
        and change.engine is None
    )


async def _lone_copy_landed(conn: asyncpg.Connection, doubt: _InDoubt) -> bool:
    """Whether a lone COPY whose connection was lost committed: once its backend has ended (a COPY whose
    end had reached it commits or fails on its own), all of its rows exist, or none of them do."""
    for _ in range(100):
        gone = "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND pid <> pg_backend_pid())"
        if await conn.fetchval(gone, doubt.pid):
            break
        await conn.execute("SELECT pg_terminate_backend($1)", doubt.pid)
        await asyncio.sleep(0.05)
    else:
        log.warning("the backend of a lone COPY in doubt (pid %d) is still there; looking at its rows", doubt.pid)
    found = await conn.fetchval(
        "SELECT count(*) FROM ordo.executions e JOIN unnest($1::uuid[], $2::date[]) AS k(execution_id, ledger_day)"
        " ON e.execution_id = k.execution_id AND e.ledger_day = k.ledger_day",
        [c.execution_id for c in doubt.copied],
        [c.ledger_day for c in doubt.copied],
    )
    return bool(found == len(doubt.copied))


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and len(value) == 36 and value.count("-") == 4


def _commit_error_letter(unit: Unit, exc: Exception) -> DeadLetter:
    source = unit.token
    return DeadLetter(
        reason="commit_error",
        error=f"{type(exc).__name__}: {exc}",
        subject=source.subject,
        stream=source.stream,
        stream_seq=source.stream_seq,
        payload=source.data,
        batch_index=source.batch_index,
    )
