"""A run's executions in the ledger: those whose trigger event ids start with `<run_id>-`.

`ordo dev --demo` and the bench publish a run's trigger events with such ids
and measure on what has committed, the ledger being the record of truth: an
execution counts when its final state is in Postgres, and its latency runs
from its trigger's intended send time (`ts`, epoch ms) to the commit that
finished it.
"""

from dataclasses import dataclass

import asyncpg

_FINISHED = """
SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')) AS finished
FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
"""

_SUMMARY = """
WITH runs AS (
    SELECT status, steps, created_at, finished_at,
           extract(epoch FROM finished_at) * 1000.0 - (event->>'ts')::float8 AS latency_ms
    FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
)
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) AS executions,
       coalesce(sum(steps), 0) AS steps,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99,
       max(latency_ms) AS max,
       extract(epoch FROM max(finished_at))::float8 AS last_commit
FROM runs
"""

_FINISH_TIMES = """
SELECT extract(epoch FROM finished_at)::float8 AS finished, (event->>'ts')::float8 AS ts, steps
FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2 AND finished_at IS NOT NULL
"""


def _event_ids(run_id: str) -> str:
    return f"{run_id}-%"


@dataclass(frozen=True)
class RunSummary:
    """A run's executions, throughput and latency, as committed."""

    executions: int
    completed: int
    failed: int
    steps: int
    #: From the run's first publish to its last commit.
    seconds: float
    executions_per_s: float
    steps_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


async def count_finished(conn, tenant: str, run_id: str) -> int:
    """Executions of run `run_id` that have reached a final state in the ledger."""
    return (await conn.fetchrow(_FINISHED, tenant, _event_ids(run_id)))["finished"]


async def finish_times(conn, tenant: str, run_id: str) -> list:
    """(finished_at in epoch s, trigger ts in epoch ms, steps) of every finished execution of the run."""
    return await conn.fetch(_FINISH_TIMES, tenant, _event_ids(run_id))


async def summarise(conn, tenant: str, run_id: str, started_wall: float) -> RunSummary:
    """The run as committed; `started_wall` (epoch s) is when its first event was published."""
    r = await conn.fetchrow(_SUMMARY, tenant, _event_ids(run_id))
    last_commit = float(r["last_commit"]) if r["last_commit"] is not None else None
    seconds = max(last_commit - started_wall, 1e-6) if last_commit is not None else 0.0
    return RunSummary(
        executions=r["executions"],
        completed=r["completed"],
        failed=r["failed"],
        steps=int(r["steps"]),
        seconds=seconds,
        executions_per_s=r["executions"] / seconds if seconds else 0.0,
        steps_per_s=int(r["steps"]) / seconds if seconds else 0.0,
        p50_ms=float(r["p50"] or 0),
        p95_ms=float(r["p95"] or 0),
        p99_ms=float(r["p99"] or 0),
        max_ms=float(r["max"] or 0),
    )


# A scenario with a workflow of its own (the bench's w2..w6) reads its run by
# workflow id, through the (tenant, workflow_id, status) index.
_WORKFLOW_PROGRESS = """
SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')) AS finished,
       count(*) FILTER (WHERE status = 'waiting') AS waiting,
       count(*) AS total
FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
"""

_WORKFLOW_FINISH_TIMES = """
SELECT extract(epoch FROM finished_at)::float8 AS finished, (event->>'ts')::float8 AS ts, steps
FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2 AND finished_at IS NOT NULL
"""

_WORKFLOW_LAST_COMMIT = """
SELECT extract(epoch FROM max(finished_at))::float8 FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
"""

_WORKFLOW_ENROLMENT = """
SELECT count(*) AS n, extract(epoch FROM max(created_at))::float8 AS last
FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
"""


async def workflow_progress(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, workflow_id: str) -> asyncpg.Record:
    """The workflow's executions now: `finished`, `waiting` and `total`."""
    row = await conn.fetchrow(_WORKFLOW_PROGRESS, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row


async def workflow_finish_times(
    conn: asyncpg.Connection | asyncpg.Pool, tenant: str, workflow_id: str
) -> list[asyncpg.Record]:
    """(finished_at in epoch s, trigger ts in epoch ms, steps) of every finished execution of the workflow."""
    return await conn.fetch(_WORKFLOW_FINISH_TIMES, tenant, workflow_id)


async def workflow_last_commit(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, workflow_id: str) -> float | None:
    """When the workflow's last execution finished (epoch s, the ledger's clock), or None if none has."""
    last: float | None = await conn.fetchval(_WORKFLOW_LAST_COMMIT, tenant, workflow_id)
    return last


async def workflow_enrolment(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, workflow_id: str) -> asyncpg.Record:
    """How many executions the workflow has (`n`) and when the last was created (`last`, epoch s)."""
    row = await conn.fetchrow(_WORKFLOW_ENROLMENT, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row
