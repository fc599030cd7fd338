"""A run's executions in the ledger: those whose trigger event ids start with `<run_id>-`.

`ordo dev --demo` and the bench publish a run's trigger events with such ids
and measure on what has committed, the ledger being the record of truth: an
execution counts when its final state is in Postgres, and its latency runs
from its trigger's intended send time (`ts`, epoch ms) to the commit that
finished it.
"""

from dataclasses import dataclass

from asyncpg import Record

from ledger.connection import Queryable

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


async def count_finished(conn: Queryable, tenant: str, run_id: str) -> int:
    """Executions of run `run_id` that have reached a final state in the ledger."""
    finished: int = await conn.fetchval(_FINISHED, tenant, _event_ids(run_id))
    return finished


async def finish_times(conn: Queryable, tenant: str, run_id: str) -> list[Record]:
    """(finished_at in epoch s, trigger ts in epoch ms, steps) of every finished execution of the run."""
    return await conn.fetch(_FINISH_TIMES, tenant, _event_ids(run_id))


async def summarise(conn: Queryable, tenant: str, run_id: str, started_wall: float) -> RunSummary:
    """The run as committed; `started_wall` (epoch s) is when its first event was published."""
    r = await conn.fetchrow(_SUMMARY, tenant, _event_ids(run_id))
    assert r is not None, "an aggregate without GROUP BY answers one row"
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


# -- what a run costs the ledger's storage ------------------------------------------------
# The bench reads these before and after its measured window: WAL written (pg_stat_wal is
# Postgres 14+, else the WAL position, which gives bytes only), the checkpoints that began
# (each makes the next change to every page a full-page image), and the size of every
# table of the ledger with its indexes.

_VIEW_EXISTS = "SELECT to_regclass($1) IS NOT NULL"

_WAL_STATS = """
SELECT wal_bytes::bigint AS bytes, wal_records AS records, wal_fpi AS fpi,
       pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS lsn_bytes
FROM pg_stat_wal
"""

_WAL_LSN = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS lsn_bytes"

# pg_stat_checkpointer from Postgres 17; pg_stat_bgwriter kept the counts before.
_CHECKPOINTS_17 = "SELECT (num_timed + num_requested)::bigint FROM pg_stat_checkpointer"
_CHECKPOINTS = "SELECT (checkpoints_timed + checkpoints_req)::bigint FROM pg_stat_bgwriter"

# A partition (migration 008's days) counts under its table's name.
_LEDGER_SIZES = """
SELECT coalesce(p.relname, c.relname) AS name, sum(pg_table_size(c.oid)) AS table_bytes,
       sum(pg_indexes_size(c.oid)) AS index_bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = i.inhparent
WHERE n.nspname = 'ordo' AND c.relkind = 'r'
GROUP BY 1
ORDER BY 1
"""

_BACKENDS_NAMED = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"


@dataclass(frozen=True)
class WalCounters:
    """The WAL the whole cluster (every database on the server) has written so far.

    `source` says where the numbers come from: "pg_stat_wal" (bytes, records
    and full-page images, as the backends have reported them: a backend
    reports when it goes idle or exits) or "pg_current_wal_lsn" (bytes only,
    the WAL position). `lsn_bytes` is the WAL position either way.
    """

    source: str
    bytes: int
    records: int | None
    fpi: int | None
    lsn_bytes: int
    #: Checkpoints started since the statistics were reset.
    checkpoints: int


@dataclass(frozen=True)
class TableSize:
    """One ledger table's heap (with TOAST and maps) and its indexes, in bytes."""

    name: str
    table_bytes: int
    index_bytes: int


async def wal_counters(conn: Queryable) -> WalCounters:
    """The cluster's WAL counters now (pg_stat_wal on Postgres 14+, else the WAL position)."""
    if await conn.fetchval(_VIEW_EXISTS, "pg_catalog.pg_stat_checkpointer"):
        checkpoints = int(await conn.fetchval(_CHECKPOINTS_17))
    else:
        checkpoints = int(await conn.fetchval(_CHECKPOINTS))
    if await conn.fetchval(_VIEW_EXISTS, "pg_catalog.pg_stat_wal"):
        r = await conn.fetchrow(_WAL_STATS)
        assert r is not None, "pg_stat_wal has one row"
        return WalCounters(
            source="pg_stat_wal",
            bytes=int(r["bytes"]),
            records=int(r["records"]),
            fpi=int(r["fpi"]),
            lsn_bytes=int(r["lsn_bytes"]),
            checkpoints=checkpoints,
        )
    lsn_bytes = int(await conn.fetchval(_WAL_LSN))
    return WalCounters(
        source="pg_current_wal_lsn",
        bytes=lsn_bytes,
        records=None,
        fpi=None,
        lsn_bytes=lsn_bytes,
        checkpoints=checkpoints,
    )


async def ledger_sizes(conn: Queryable) -> list[TableSize]:
    """Every table of the ledger (schema `ordo`) with its size now, by name."""
    rows = await conn.fetch(_LEDGER_SIZES)
    return [TableSize(r["name"], int(r["table_bytes"]), int(r["index_bytes"])) for r in rows]


async def backends_named(conn: Queryable, application_name: str) -> int:
    """Server processes serving connections with this application_name (gone once their stats are in)."""
    return int(await conn.fetchval(_BACKENDS_NAMED, application_name))


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

_WORKFLOW_STAGE_TIMES = """
SELECT (event->>'ts')::float8 AS ts, extract(epoch FROM created_at)::float8 AS taken,
       extract(epoch FROM finished_at)::float8 AS finished
FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2 AND finished_at IS NOT NULL
"""

_WORKFLOW_LAST_COMMIT = """
SELECT extract(epoch FROM max(finished_at))::float8 FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
"""

_WORKFLOW_ENROLMENT = """
SELECT count(*) AS n, extract(epoch FROM max(created_at))::float8 AS last
FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
"""


async def workflow_progress(conn: Queryable, tenant: str, workflow_id: str) -> Record:
    """The workflow's executions now: `finished`, `waiting` and `total`."""
    row = await conn.fetchrow(_WORKFLOW_PROGRESS, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row


async def workflow_finish_times(conn: Queryable, tenant: str, workflow_id: str) -> list[Record]:
    """(finished_at in epoch s, trigger ts in epoch ms, steps) of every finished execution of the workflow."""
    return await conn.fetch(_WORKFLOW_FINISH_TIMES, tenant, workflow_id)


async def workflow_stage_times(conn: Queryable, tenant: str, workflow_id: str) -> list[Record]:
    """(trigger ts in epoch ms, taken and finished in epoch s) of every finished execution of the workflow:
    `taken` is when a worker took its trigger (created_at), `finished` when its commit ran."""
    return await conn.fetch(_WORKFLOW_STAGE_TIMES, tenant, workflow_id)


async def workflow_last_commit(conn: Queryable, tenant: str, workflow_id: str) -> float | None:
    """When the workflow's last execution finished (epoch s, the ledger's clock), or None if none has."""
    last: float | None = await conn.fetchval(_WORKFLOW_LAST_COMMIT, tenant, workflow_id)
    return last


async def workflow_enrolment(conn: Queryable, tenant: str, workflow_id: str) -> Record:
    """How many executions the workflow has (`n`) and when the last was created (`last`, epoch s)."""
    row = await conn.fetchrow(_WORKFLOW_ENROLMENT, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row
