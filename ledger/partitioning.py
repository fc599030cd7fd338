"""Day partitions of the ledger's growing tables: made ahead, rescued from DEFAULT, dropped by retention.

`ordo.executions` and `ordo.history` are RANGE-partitioned by `ledger_day`
(migration 008): the UTC day of the trigger message's JetStream timestamp,
fixed at enrolment and the same on every redelivery, so a duplicate
enrolment still collides on the primary key (execution_id, ledger_day). An
execution's history rows carry its day: one execution sits in one partition.

A ledger day is a UTC day, except where the `ledger_day` setting makes it
shorter (`use_day_length`): a soak that shows retention keeping the disk flat
within minutes runs with one-minute ledger days. Short days are counted from
SHORT_DAYS_ORIGIN, one date per day, so their dates lie centuries ahead of
the calendar's; set it on a fresh ledger only.

`maintain` creates the day partitions a week ahead (never on the commit path)
and moves rows that landed in the DEFAULT partition (a day nobody made) into
a partition of their own. `retention` drops the days older than `keep`,
whole partitions at a time, after carrying forward into today's partition
the executions still running or waiting and those that finished within
`keep`, each with its history: nothing open is ever lost to retention.

Both lock the parent tables only briefly (creating or detaching a partition
takes an ACCESS EXCLUSIVE lock on the parent, which waits for the commits in
progress and holds new ones back); `lock_timeout` bounds that wait, and a
step that times out is tried again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from hotpath.durations import format_duration, parse_instant
from ledger.connection import Queryable, Transactional

log = logging.getLogger("ordo.ledger")

TABLES = ("executions", "history")
#: How many days ahead of today `maintain` keeps partitions ready.
DAYS_AHEAD = 7
#: Any fixed number: one maintainer at a time among the workers and the CLI.
MAINTAIN_LOCK = 0x6F726470
#: How long a partition change waits for the parent's lock before it gives way to the commits (and retries).
LOCK_TIMEOUT = "500ms"
_LOCK_ATTEMPTS = 20
#: Executions carried forward per transaction, so that no transaction holds many row locks for long
#: (a commit that changes one of them waits for it).
_CARRY_CHUNK = 1000
#: Passes over the executions a carry skipped because a commit was changing them.
_CARRY_PASSES = 5
_OPEN = "status IN ('running', 'waiting')"
_BOUND = re.compile(r"FOR VALUES FROM \((.+?)\) TO \((.+?)\)")


DAY_S = 86400
#: Where short ledger days are counted from: ledger day SHORT_DAYS_ORIGIN + n spans
#: [origin + n * length, origin + (n + 1) * length).
SHORT_DAYS_ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
#: The shortest ledger day: partitions and retention are made for days, not for seconds.
SHORTEST_DAY_S = 60
_day_s = DAY_S


def checked_day_length(seconds: float) -> int:
    """`seconds` if a ledger day may last that long (the `ledger_day` setting): from a minute to a UTC day.

    ValueError names the setting and the length it was given, to the millisecond: a
    setting of '250ms' is refused as '250ms', not as the '0s' of its whole seconds."""
    if not SHORTEST_DAY_S <= seconds <= DAY_S:
        raise ValueError(f"ledger_day must be between 1m and 1d, not {format_duration(round(seconds * 1000))!r}")
    return int(seconds)


def use_day_length(seconds: int) -> None:
    """Make a ledger day last `seconds` in this process (the `ledger_day` setting); a UTC day by default."""
    global _day_s
    _day_s = checked_day_length(seconds)
    _first_hour_ms.cache_clear()


def day_length() -> timedelta:
    """How long one ledger day lasts in this process."""
    return timedelta(seconds=_day_s)


def day_of(timestamp_ns: int) -> date:
    """The ledger day of a JetStream timestamp in nanoseconds: an execution's partition key."""
    if _day_s == DAY_S:
        return datetime.fromtimestamp(timestamp_ns / 1e9, tz=UTC).date()
    offset = (timestamp_ns // 1_000_000_000 - int(SHORT_DAYS_ORIGIN.timestamp())) // _day_s
    return SHORT_DAYS_ORIGIN.date() + timedelta(days=offset)


def day_at(instant: datetime) -> date:
    """The ledger day an instant falls in (today's, for `now`)."""
    if _day_s == DAY_S:
        return instant.astimezone(UTC).date()
    return SHORT_DAYS_ORIGIN.date() + timedelta(days=int((instant - SHORT_DAYS_ORIGIN).total_seconds()) // _day_s)


def start_of(day: date) -> datetime:
    """When a ledger day begins."""
    if _day_s == DAY_S:
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    return SHORT_DAYS_ORIGIN + (day - SHORT_DAYS_ORIGIN.date()).days * timedelta(seconds=_day_s)


def days_per_real_day() -> int:
    """How many ledger days one real day holds (1, unless days are short)."""
    return -(-DAY_S // _day_s)


#: How far a publisher's clock (a trigger's `ts`) may run ahead of the NATS server's
#: (a 24th of the ledger day where days are short, so that most triggers need no look-up).
PUBLISHER_SKEW = timedelta(hours=1)


def may_be_enrolled_the_day_before(ledger_day: date, ts: object) -> bool:
    """Whether a trigger that enrols on `ledger_day` may have enrolled already on the day before.

    Only a trigger published again past JetStream's duplicate window can, and only if it was
    first published before midnight: then its event time `ts` is before midnight too, or at
    most PUBLISHER_SKEW after it. A trigger whose `ts` is later in its day needs no look-up
    (that is nearly all of them); one whose `ts` cannot be read gets one.
    """
    try:
        ts_ms = parse_instant(ts)
    except ValueError:
        return True
    return ts_ms < _first_hour_ms(ledger_day)


@functools.lru_cache(maxsize=8)
def _first_hour_ms(day: date) -> float:
    return (start_of(day) + min(PUBLISHER_SKEW, day_length() / 24)).timestamp() * 1000


@dataclass(frozen=True, slots=True)
class DayPartition:
    """One partition of a table: the days [low, high), None for MINVALUE / MAXVALUE; DEFAULT has neither."""

    table: str
    name: str
    low: date | None
    high: date | None
    default: bool = False

    def holds(self, day: date) -> bool:
        return not self.default and (self.low is None or self.low <= day) and (self.high is None or day < self.high)


def _bound(text: str) -> date | None:
    return None if text in ("MINVALUE", "MAXVALUE") else date.fromisoformat(text.strip("'"))


async def partitions(conn: Queryable, table: str) -> list[DayPartition]:
    """The partitions of ordo.`table`, oldest first, DEFAULT last."""
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = to_regclass('ordo.' || $1)""",
        table,
    )
    found = []
    for r in rows:
        bound = _BOUND.match(r["bound"])
        if bound is None:
            found.append(DayPartition(table, r["relname"], None, None, default=True))
        else:
            found.append(DayPartition(table, r["relname"], _bound(bound.group(1)), _bound(bound.group(2))))
    return sorted(found, key=lambda p: (p.default, p.low or date.min))


async def try_lock(conn: Queryable) -> bool:
    """Become the one maintainer until the connection closes; False when another one is at work."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTAIN_LOCK))


def partition_name(table: str, day: date) -> str:
    return f"{table}_{day:%Y%m%d}"


async def _with_lock_timeout(conn: Transactional, work: Callable[[Transactional], Awaitable[None]]) -> None:
    """Run `work(conn)` in a transaction that waits at most LOCK_TIMEOUT for a lock; try again when it did."""
    for attempt in range(1, _LOCK_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await work(conn)
            return
        except asyncpg.LockNotAvailableError:
            if attempt == _LOCK_ATTEMPTS:
                raise
            log.info("a ledger partition change gave way to the commits (lock_timeout); trying again")
            await asyncio.sleep(0.2 * attempt)


@dataclass(slots=True)
class Maintenance:
    """What `maintain` did."""

    created: list[str] = field(default_factory=list)
    #: Rows moved out of the DEFAULT partitions into partitions of their own, per table.
    rescued: dict[str, int] = field(default_factory=dict)


async def default_rows(conn: Queryable) -> dict[str, int]:
    """Rows in each table's DEFAULT partition: rows whose day had no partition (0 on a maintained ledger)."""
    return {table: await conn.fetchval(f"SELECT count(*) FROM ordo.{table}_default") for table in TABLES}


async def maintain(conn: Transactional, today: date, ahead: int = DAYS_AHEAD) -> Maintenance:
    """Create the day partitions from `today` to `today + ahead` that are missing, and give every day that
    has rows in a DEFAULT partition a partition of its own (moving those rows into it)."""
    done = Maintenance()
    wanted = {today + timedelta(days=i) for i in range(ahead + 1)}
    for table in TABLES:
        wanted.update(r[0] for r in await conn.fetch(f"SELECT DISTINCT ledger_day FROM ordo.{table}_default"))
    for day in sorted(wanted):
        missing = [t for t in TABLES if not any(p.holds(day) for p in await partitions(conn, t))]
        if not missing:
            continue

        async def create(conn: Transactional, day: date = day, missing: list[str] = missing) -> None:
            for table in missing:
                name = partition_name(table, day)
                # Rows of this day in DEFAULT would violate the new partition's bound: take them
                # out first and route them in again once it exists, in this one transaction.
                await conn.execute(
                    f"CREATE TEMP TABLE rescued ON COMMIT DROP AS WITH d AS "
                    f"(DELETE FROM ordo.{table}_default WHERE ledger_day = '{day.isoformat()}' RETURNING *) "
                    f"SELECT * FROM d"
                )
                await conn.execute(
                    f"CREATE TABLE ordo.{name} PARTITION OF ordo.{table} "
                    f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
                )
                moved = await conn.execute(f"INSERT INTO ordo.{table} SELECT * FROM rescued")
                await conn.execute("DROP TABLE rescued")
                done.created.append(name)
                if count := int(moved.rsplit(" ", 1)[-1]):
                    done.rescued[table] = done.rescued.get(table, 0) + count

        await _with_lock_timeout(conn, create)
    return done


@dataclass(slots=True)
class Retention:
    """What `retention` did."""

    cutoff: datetime
    dropped: list[str] = field(default_factory=list)
    #: Executions carried forward into today's partition (still open, or finished after the cutoff).
    carried: int = 0
    #: Their history rows, carried with them.
    carried_history: int = 0
    #: Finished executions dropped with their partitions (counted just before each drop; each drop
    #: is recorded in ordo.retention_drops, migration 020).
    dropped_executions: int = 0


async def _columns(conn: Queryable, table: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('ordo.' || $1)
           AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
        table,
    )
    return [r[0] for r in rows]


async def _carry(
    conn: Queryable, executions: str, history: str, ids: list[str], where: str, today: date, *args: object
) -> tuple[set[str], int]:
    """Move the executions `ids` of partition `executions` that (still) match `where`, with their rows of
    partition `history`, into `today`'s partitions; (the ids moved, the history rows moved).

    Two statements, in the caller's transaction. The first locks the executions it can (SKIP LOCKED:
    one a commit is changing right now is left for the next pass, so that this transaction never
    waits for a commit, and a commit that waits for it cannot deadlock with it), then deletes and
    re-inserts them: a commit that meanwhile waits for one of them finds no row under its old key
    (0 rows: stale), so the worker loads the execution again and applies its message on the moved
    row. The second runs after the first, on a snapshot that has every history row committed before
    it, and no commit can add one since (each waits on its execution's row lock).
    """
    if not ids:
        return set(), 0
    columns = await _columns(conn, "executions")
    values = ", ".join("$1::date" if c == "ledger_day" else c for c in columns)
    moved = await conn.fetch(
        f"""WITH locked AS (
                SELECT execution_id FROM ordo.{executions}
                WHERE execution_id = ANY($2::uuid[]) AND ({where}) FOR UPDATE SKIP LOCKED
            ), moved AS (
                DELETE FROM ordo.{executions} e USING locked WHERE e.execution_id = locked.execution_id RETURNING e.*
            ), inserted AS (
                INSERT INTO ordo.executions ({", ".join(columns)}) SELECT {values} FROM moved RETURNING execution_id
            )
            SELECT execution_id FROM inserted""",
        today,
        ids,
        *args,
    )
    if not moved:
        return set(), 0
    columns = await _columns(conn, "history")
    values = ", ".join("$1::date" if c == "ledger_day" else c for c in columns)
    status = await conn.execute(
        f"""WITH moved AS (DELETE FROM ordo.{history} WHERE execution_id = ANY($2::uuid[]) RETURNING *)
            INSERT INTO ordo.history ({", ".join(columns)}) SELECT {values} FROM moved""",
        today,
        [r[0] for r in moved],
    )
    return {r[0] for r in moved}, int(status.rsplit(" ", 1)[-1])


async def _open_or_after(conn: Queryable, executions: str, cutoff: datetime | None) -> list[str]:
    """The ids of the partition's executions still open (the `executions_open` index) or, with a cutoff,
    finished after it (a scan of the partition)."""
    if cutoff is None:
        rows = await conn.fetch(f"SELECT execution_id FROM ordo.{executions} WHERE {_OPEN}")
    else:
        rows = await conn.fetch(
            f"SELECT execution_id FROM ordo.{executions} WHERE {_OPEN} OR finished_at >= $1", cutoff
        )
    return [r[0] for r in rows]


async def retention(conn: Transactional, keep: timedelta, now: datetime) -> Retention:
    """Drop the partitions whose days all lie before `now - keep`, carrying forward what must stay.

    For each such day (or the legacy partition of the rows written before
    migration 008): first, in transactions of a few thousand, carry forward
    into today's partition the executions still running or waiting and those
    that finished after the cutoff, each with its history; then, in one
    transaction, detach the day's partitions of both tables, carry forward
    whatever is open in them by now (a look-up on the `executions_open`
    index), and drop them.
    """
    if keep < day_length():
        raise ValueError(f"retention must keep at least one ledger day of history ({day_length()}), not {keep}")
    cutoff = now - keep
    today = day_at(now)
    done = Retention(cutoff)
    await maintain(conn, today)
    executions = [p for p in await partitions(conn, "executions") if not p.default]
    history = {(p.low, p.high): p for p in await partitions(conn, "history") if not p.default}
    cutoff_day = day_at(cutoff)
    for part in executions:
        if part.high is None or part.high > cutoff_day or part.holds(today):
            continue
        peer = history.get((part.low, part.high))
        if peer is None:
            raise RuntimeError(f"partition ordo.{part.name} has no history partition with the same days")
        keep_where = f"{_OPEN} OR finished_at >= $3::timestamptz"
        left = await _open_or_after(conn, part.name, cutoff)
        for attempt in range(1, _CARRY_PASSES + 1):
            skipped = []
            for i in range(0, len(left), _CARRY_CHUNK):
                chunk = left[i : i + _CARRY_CHUNK]
                async with conn.transaction():
                    moved, rows = await _carry(conn, part.name, peer.name, chunk, keep_where, today, cutoff)
                done.carried += len(moved)
                done.carried_history += rows
                skipped += [eid for eid in chunk if eid not in moved]
            # Those a commit was changing: again in a moment (what is still open at the drop goes then).
            left = skipped
            if not left:
                break
            await asyncio.sleep(0.05 * attempt)

        # Counted outside the drop's transaction, which holds the parents' locks: a scan of the day.
        finished = await conn.fetchval(f"SELECT count(*) FROM ordo.{part.name} WHERE NOT ({_OPEN})")

        async def drop(
            conn: Transactional, part: DayPartition = part, peer: DayPartition = peer, finished: int = finished
        ) -> None:
            await conn.execute(f"ALTER TABLE ordo.executions DETACH PARTITION ordo.{part.name}")
            await conn.execute(f"ALTER TABLE ordo.history DETACH PARTITION ordo.{peer.name}")
            # Detached, nothing can enter them any more: what opened since the carrying above
            # (nothing, unless a trigger older than the cutoff was delivered) goes forward now.
            ids = await _open_or_after(conn, part.name, None)
            moved, rows = await _carry(conn, part.name, peer.name, ids, _OPEN, today)
            done.carried += len(moved)
            done.carried_history += rows
            await conn.execute(f"DROP TABLE ordo.{part.name}")
            await conn.execute(f"DROP TABLE ordo.{peer.name}")
            await conn.execute(
                "INSERT INTO ordo.retention_drops (partition, low, high, executions) VALUES ($1, $2, $3, $4)",
                part.name,
                part.low,
                part.high,
                finished,
            )

        await _with_lock_timeout(conn, drop)
        done.dropped += [part.name, peer.name]
        done.dropped_executions += finished
    return done
