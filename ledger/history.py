"""An execution's history read back for the operator tools (`ordo inspect`, `ordo replay`).

Read-only: the row as last committed, its transitions in seq order, the
definition it ran on, samples of finished executions to replay, and the
finished executions of past days for the archive (`ordo ledger export`).
The worker's own reads are in ledger/executions.py.
"""

from datetime import date
from typing import Any

import orjson
from asyncpg import Record

from ledger.connection import Queryable

_EXECUTION = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, subject_type, subject_id, event_id, partition,
       status, seq, pc, steps, waiting, runtime, context, created_at, updated_at, finished_at
FROM ordo.executions WHERE execution_id = $1::uuid
"""
_TRANSITIONS = """
SELECT seq, step_id, kind, at, detail, source_seq
FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq
"""
# The trigger event with what the row stores only in its columns put back (migration 016,
# ledger/executions.py `stored_event`); the event's own keys win where it kept them.
_EVENT = "jsonb_build_object('tenant', tenant, 'event_id', event_id) || event"
_TRIGGER_AND_STATE = f"""
SELECT execution_id::text, tenant, workflow_id, workflow_version, status, seq, pc, waiting,
       context, subject, {_EVENT} AS event, runtime
FROM ordo.executions WHERE execution_id = $1::uuid
"""
_TRANSITIONS_MS = """
SELECT seq, step_id, kind, (extract(epoch FROM at) * 1000)::bigint AS at_ms, detail, source_seq
FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq
"""
_DEFINITION = "SELECT definition FROM ordo.workflows WHERE tenant = $1 AND workflow_id = $2 AND version = $3"
# Picked by Postgres (the ids of a busy workflow's executions do not all travel): at random, or
# in a pseudo-random order fixed by a seed so that a sample can be taken again.
_FINISHED = """
SELECT execution_id::text FROM ordo.executions
WHERE workflow_id = $1 AND ($2::text IS NULL OR tenant = $2)
  AND status IN ('completed', 'failed', 'cancelled')
ORDER BY CASE WHEN $3::text IS NULL THEN random()::text ELSE md5(execution_id::text || $3) END
LIMIT $4
"""


async def execution(conn: Queryable, execution_id: str) -> Record | None:
    """The execution's row as an operator reads it (identity, status, state, times), or None."""
    return await conn.fetchrow(_EXECUTION, execution_id)


async def transitions(conn: Queryable, execution_id: str) -> list[Record]:
    """The execution's transitions in seq order: seq, step_id, kind, at, detail (JSON text), source_seq."""
    return await conn.fetch(_TRANSITIONS, execution_id)


async def trigger_and_state(conn: Queryable, execution_id: str) -> Record | None:
    """What a replay starts from and ends at: the trigger (subject, event) and the stored state, or None."""
    return await conn.fetchrow(_TRIGGER_AND_STATE, execution_id)


async def transitions_ms(conn: Queryable, execution_id: str) -> list[Record]:
    """The execution's transitions in seq order, with `at` as epoch milliseconds (`at_ms`) in place of `at`."""
    return await conn.fetch(_TRANSITIONS_MS, execution_id)


async def definition(conn: Queryable, tenant: str, workflow_id: str, version: int) -> dict[str, Any] | None:
    """One deployed version of a workflow's definition, or None if it was never deployed."""
    raw = await conn.fetchval(_DEFINITION, tenant, workflow_id, version)
    return None if raw is None else orjson.loads(raw)


async def finished_sample(
    conn: Queryable, workflow_id: str, tenant: str | None, n: int, seed: int | None = None
) -> list[str]:
    """The ids of up to `n` finished executions of a workflow (of any tenant for None), picked at random.

    The same `seed` picks the same sample again.
    """
    seed_text = None if seed is None else str(seed)
    return [r[0] for r in await conn.fetch(_FINISHED, workflow_id, tenant, seed_text, n)]


# Every column, whichever migrations added them, the event as `trigger_and_state` reads it.
_WHOLE_ROW = f"""
SELECT (json_populate_record(e, json_build_object('event', {_EVENT}))).*
FROM ordo.executions e WHERE execution_id = $1::uuid
"""


async def execution_as_stored(conn: Queryable, execution_id: str) -> Record | None:
    """Every column of the execution's row as stored, its trigger event whole (`ordo execution show`), or None."""
    return await conn.fetchrow(_WHOLE_ROW, execution_id)


# -- the archive of finished executions (`ordo ledger export`) --------------------------------

# One day partition (a name from the catalog, ledger/partitioning.py) at a time, in its primary key's
# order from just after the last id of the previous page: each page is an index range scan.
_FINISHED_BEFORE = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, subject_type, subject_id, event_id, partition,
       status, seq, pc, steps, waiting, runtime, context, created_at, updated_at, finished_at, ledger_day
FROM ordo.{partition}
WHERE ledger_day < $1 AND status IN ('completed', 'failed', 'cancelled') AND execution_id > $2::uuid
ORDER BY execution_id
LIMIT $3
"""
# The history of a page of them, each execution's day said, so that Postgres reads only those days:
# their ordo.history rows, and the transitions kept in their own rows (migration 016).
_TRANSITIONS_OF = """
WITH k AS (SELECT * FROM unnest($1::uuid[], $2::date[]) AS k(execution_id, ledger_day))
SELECT h.execution_id::text, (h.first_seq + s.position - 1)::int AS seq, s.step ->> 0 AS step_id,
       s.step ->> 1 AS kind, h.at, (s.step -> 2)::jsonb AS detail, h.source_seq
FROM ordo.history h
JOIN k USING (execution_id, ledger_day)
CROSS JOIN LATERAL json_array_elements(h.steps) WITH ORDINALITY AS s(step, position)
WHERE h.ledger_day < $3
UNION ALL
SELECT t.execution_id::text, t.seq, t.step_id, t.kind, t.at, t.detail, t.source_seq
FROM ordo.enrolment_transitions t
JOIN k USING (execution_id, ledger_day)
WHERE t.ledger_day < $3
ORDER BY 1, 2
"""
_OPEN_LETTERS_OF = """
SELECT execution_id::text, id, at, reason, error, step_id, attempts FROM ordo.dead_letters
WHERE execution_id = ANY($1::uuid[]) AND status = 'open' ORDER BY id
"""


async def finished_before(conn: Queryable, partition: str, before: date, after: str | None, limit: int) -> list[Record]:
    """Up to `limit` finished executions of the days before `before` in one partition of ordo.executions
    (its name), in execution_id order from just after `after` (None: from the first): the rows
    `execution` reads, and ledger_day."""
    if not partition.replace("_", "").isalnum():
        raise ValueError(f"{partition!r} is not the name of a partition of ordo.executions")
    query = _FINISHED_BEFORE.format(partition=partition)
    return await conn.fetch(query, before, after or "00000000-0000-0000-0000-000000000000", limit)


async def transitions_of(conn: Queryable, executions: list[Record], before: date) -> list[Record]:
    """The transitions of these executions (rows of `finished_before`), by execution then seq, with
    the columns `transitions` reads and execution_id."""
    ids = [r["execution_id"] for r in executions]
    days = [r["ledger_day"] for r in executions]
    return await conn.fetch(_TRANSITIONS_OF, ids, days, before)


async def open_letters_of(conn: Queryable, execution_ids: list[str]) -> list[Record]:
    """The open dead letters of these executions, oldest first, with the columns of
    `dead_letters.open_of_execution` and execution_id."""
    return await conn.fetch(_OPEN_LETTERS_OF, execution_ids)
