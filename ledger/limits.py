"""Action limits in the ledger: the queue of calls waiting their turn, the token buckets, the slots.

A call of an action step with `limits` is queued by the commit that made its
execution wait (`queue`, run by the batcher), so a worker killed after that
commit loses nothing, and nothing of the wait is held in a worker's memory. Any
worker may then take a bucket's turn (`grant`): in one transaction it locks
the bucket's row (a worker that finds it locked skips it: another is granting),
refills the tokens for the time since the last refill, counts the bucket's
live slots, takes that many queue rows in queue order, and hands them to
`deliver` before it commits. Crash windows:

- Killed before `deliver` returns: the transaction rolls back; the rows are
  granted again later.
- Killed after `deliver`, before COMMIT: the rows are granted again, and
  delivered again. The repeat carries the same message id (JetStream drops it
  within its duplicate window) and, past that, finds its execution no longer
  waiting for it and changes nothing. The tokens it took are lost, so the rate
  stays under its limit, never over it.

A rate is kept twice: a grant takes a token of the bucket, and the call,
when the worker makes it, takes one of the bucket's `#calls` twin
(`take_call_tokens`): the grants bound how many calls leave the queue (and so
the memory they take), and the call tokens keep the rate exact at the
provider, whatever delays a granted call on its way (a commit, a busy loop).

Tokens: a call bucket holds at most `burst_of(rate)` (20 ms worth, at least
one), so that no 1 s window sees more than rate + burst calls; grants may run
100 ms ahead (`grant_burst_of`), since a turn takes a few round trips. A concurrency slot
is a row from the grant until the commit that applies the call's result,
timeout or cancel (`release`); a slot whose worker died before any of those
stops counting at `lease_until` (the step's timeout plus `LEASE_MARGIN_S`).

Start gates (migration 019) are buckets too: `enrolments|<tenant>` (a rate) and
`running|<tenant>|<workflow>` (a concurrency, `max_running`), whose rows a new
execution's first commit queues (step_id '#start', the gate's number as attempt). A
running slot has no lease: it counts until the commit that ends its execution
deletes it (`release` with the execution among `ended`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from asyncpg import Record

from ledger.connection import Queryable, Transactional

#: A bucket holds at most this many seconds' worth of tokens (and at least one token).
BURST_S = 0.02
#: A bucket's grants may run this many seconds' worth of tokens ahead (see `grant_burst_of`).
GRANT_BURST_S = 0.1
#: What a bucket's name ends with for the tokens its calls take when they are made (`take_call_tokens`).
CALLS = "#calls"
#: How long past its step's timeout a granted call's concurrency slot still counts.
LEASE_MARGIN_S = 60.0

_QUEUE = """
INSERT INTO ordo.limit_queue (execution_id, bucket, step_id, attempt, action, rate_per_s, concurrency, lease_ms)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::float8[], $7::int[], $8::bigint[])
ON CONFLICT (execution_id) DO UPDATE
SET bucket = EXCLUDED.bucket, step_id = EXCLUDED.step_id, attempt = EXCLUDED.attempt, action = EXCLUDED.action,
    rate_per_s = EXCLUDED.rate_per_s, concurrency = EXCLUDED.concurrency, lease_ms = EXCLUDED.lease_ms
"""

#: What a start gate's bucket begins with (an action's bucket begins with "<action>@").
GATES = ("enrolments|", "running|")
#: The start gate whose slot an execution holds until it ends.
RUNNING = "running|"

_WAITING = """
SELECT bucket, min(action) AS action, count(*) AS waiting,
       extract(epoch FROM clock_timestamp() - min(queued_at))::float8 AS oldest_s
FROM ordo.limit_queue GROUP BY bucket
"""

_LOCK_BUCKET = """
SELECT tokens, refilled_at, clock_timestamp() AS now FROM ordo.limit_buckets WHERE bucket = $1 FOR UPDATE SKIP LOCKED
"""

_HEAD = """
SELECT id, execution_id::text, step_id, attempt, action, rate_per_s, concurrency, lease_ms, queued_at
FROM ordo.limit_queue WHERE bucket = $1 ORDER BY id LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """A queued call whose turn has come: its execution may now request it."""

    execution_id: str
    step_id: str
    attempt: int
    action: str
    queued_at: datetime


@dataclass(frozen=True, slots=True)
class Waiting:
    """How many calls wait in one bucket (and of which action)."""

    bucket: str
    action: str
    count: int
    #: Seconds the oldest of them (the head) has waited.
    oldest_s: float = 0.0


def burst_of(rate_per_s: float) -> float:
    return max(1.0, rate_per_s * BURST_S)


def grant_burst_of(rate_per_s: float) -> float:
    """Grants may run ahead of the calls by `GRANT_BURST_S` (a turn takes a few round trips; the
    call tokens keep the calls themselves to the rate)."""
    return max(1.0, rate_per_s * GRANT_BURST_S)


def refill(tokens: float, elapsed_s: float, rate_per_s: float) -> float:
    """The tokens a bucket's grants hold after `elapsed_s` seconds of refilling, capped at its burst."""
    return min(grant_burst_of(rate_per_s), tokens + max(0.0, elapsed_s) * rate_per_s)


async def queue(
    conn: Queryable, waits: Sequence[tuple[str, str, str, int, str, float | None, int | None, int | None]]
) -> None:
    """Queue calls: (execution_id, bucket, step_id, attempt, action, rate_per_s, concurrency, lease_ms)."""
    await conn.execute(_QUEUE, *map(list, zip(*waits, strict=True)))


async def release(conn: Queryable, execution_ids: list[str], ended: Sequence[str] = ()) -> None:
    """The executions' limited calls are over: drop their queue rows (a cancel) and their slots.

    The start slot (`running|...`) stays with an execution that goes on; those `ended` give it back too.
    """
    await conn.execute("DELETE FROM ordo.limit_queue WHERE execution_id = ANY($1::uuid[])", execution_ids)
    await conn.execute(
        "DELETE FROM ordo.limit_slots WHERE execution_id = ANY($1::uuid[])"
        " AND (NOT starts_with(bucket, $2) OR execution_id = ANY($3::uuid[]))",
        execution_ids,
        RUNNING,
        list(ended),
    )


async def waiting(conn: Queryable) -> list[Waiting]:
    """Every bucket with calls waiting, and how many."""
    return [Waiting(r["bucket"], r["action"], r["waiting"], r["oldest_s"]) for r in await conn.fetch(_WAITING)]


async def grant(
    conn: Transactional, bucket: str, most: int, deliver: Callable[[list[Grant]], Awaitable[None]]
) -> list[Grant] | None:
    """Grant the calls at the head of `bucket`'s queue that its limits allow now (at most `most`).

    `deliver` hands the grants to their executions before the commit (see the
    module's crash windows). None when another worker holds the bucket.
    """
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO ordo.limit_buckets (bucket, tokens, refilled_at) VALUES ($1, 1, clock_timestamp())"
            " ON CONFLICT (bucket) DO NOTHING",
            bucket,
        )
        row = await conn.fetchrow(_LOCK_BUCKET, bucket)
        if row is None:
            return None
        now: datetime = row["now"]
        head = await conn.fetch(_HEAD, bucket, most)
        if not head:
            return []
        rate: float | None = head[0]["rate_per_s"]
        concurrency: int | None = head[0]["concurrency"]
        allowed = len(head)
        tokens = 0.0
        if rate is not None:
            tokens = refill(row["tokens"], (now - row["refilled_at"]).total_seconds(), rate)
            allowed = min(allowed, int(tokens))
        if concurrency is not None and allowed > 0:
            in_use: int = await conn.fetchval(
                "SELECT count(*) FROM ordo.limit_slots WHERE bucket = $1 AND lease_until > $2", bucket, now
            )
            allowed = min(allowed, concurrency - in_use)
        granted: list[Record] = head[: max(0, allowed)]
        if granted:
            await conn.execute("DELETE FROM ordo.limit_queue WHERE id = ANY($1::bigint[])", [r["id"] for r in granted])
            if concurrency is not None:
                await _take_slots(conn, bucket, now, granted)
        if rate is not None:
            await conn.execute(
                "UPDATE ordo.limit_buckets SET tokens = $2, refilled_at = $3 WHERE bucket = $1",
                bucket,
                tokens - len(granted),
                now,
            )
        grants = [Grant(r["execution_id"], r["step_id"], r["attempt"], r["action"], r["queued_at"]) for r in granted]
        if grants:
            await deliver(grants)
        return grants


async def _take_slots(conn: Queryable, bucket: str, now: datetime, granted: list[Record]) -> None:
    await conn.execute(
        "INSERT INTO ordo.limit_slots (execution_id, bucket, lease_until)"
        " SELECT e, $2, coalesce(u, 'infinity') FROM unnest($1::uuid[], $3::timestamptz[]) AS g(e, u)"
        " ON CONFLICT (execution_id, bucket) DO UPDATE SET lease_until = EXCLUDED.lease_until",
        [r["execution_id"] for r in granted],
        bucket,
        [
            None if r["lease_ms"] is None else now + timedelta(milliseconds=r["lease_ms"], seconds=LEASE_MARGIN_S)
            for r in granted
        ],
    )


async def in_flight(conn: Queryable, bucket: str) -> int:
    """The bucket's concurrency slots that count now."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM ordo.limit_slots WHERE bucket = $1 AND lease_until > clock_timestamp()", bucket
    )
    return count


async def take_call_tokens(conn: Queryable, bucket: str, rate_per_s: float, want: int) -> tuple[int, float]:
    """Take up to `want` rate tokens for calls about to be made: (how many were taken, and when none
    were, the seconds until one will be)."""
    row = await conn.fetchrow(
        "SELECT taken, wait FROM ordo.take_limit_tokens($1, $2, $3, $4)",
        bucket + CALLS,
        rate_per_s,
        burst_of(rate_per_s),
        want,
    )
    assert row is not None, "a function call returns one row"
    taken: int = row["taken"]
    wait: float = row["wait"]
    return taken, wait


async def relimit_gate(conn: Queryable, bucket: str, rate_per_s: float | None, concurrency: int | None) -> int:
    """The executions waiting at a start gate take its new limit (a config reload); how many rows."""
    status: str = await conn.execute(
        "UPDATE ordo.limit_queue SET rate_per_s = $2, concurrency = $3 WHERE bucket = $1",
        bucket,
        rate_per_s,
        concurrency,
    )
    return int(status.rsplit(" ", 1)[-1])


async def relimit_action(
    conn: Queryable, tenant: str, action: str, rate_per_s: float | None, concurrency: int | None
) -> int:
    """The tenant's calls of `action` waiting their turn take new limits (None: each keeps its own);
    how many rows. A bucket is "<action>@<major>|<tenant>[|<key>]"."""
    status: str = await conn.execute(
        "UPDATE ordo.limit_queue SET rate_per_s = coalesce($3, rate_per_s), concurrency = coalesce($4, concurrency)"
        " WHERE split_part(bucket, '|', 2) = $1 AND split_part(split_part(bucket, '|', 1), '@', 1) = $2",
        tenant,
        action,
        rate_per_s,
        concurrency,
    )
    return int(status.rsplit(" ", 1)[-1])
