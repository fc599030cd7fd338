"""Reads of the event waits (`ordo.event_waits`): which executions wait for which event.

The batcher writes and deletes the rows as part of each commit; this only
reads them back.
"""

from asyncpg import Record

from ledger.connection import Queryable

_WAITING = """
SELECT w.execution_id::text, k.i
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
     AS k(tenant, subject_type, subject_id, event_type, i)
JOIN ordo.event_waits w USING (tenant, subject_type, subject_id, event_type)
"""

_OF_EXECUTION = "SELECT event_type, step_id FROM ordo.event_waits WHERE execution_id = $1::uuid"


async def waiting(
    conn: Queryable, tenants: list[str], subject_types: list[str], subject_ids: list[str], event_types: list[str]
) -> list[Record]:
    """The executions waiting for any of these (tenant, subject type, subject id, event type) keys, in one query.

    Each row unpacks as (execution_id, i), `i` the index of the key it waits for.
    """
    return await conn.fetch(_WAITING, tenants, subject_types, subject_ids, event_types, list(range(len(tenants))))


async def of_execution(conn: Queryable, execution_id: str) -> Record | None:
    """The event the execution waits for (event_type, step_id), or None."""
    return await conn.fetchrow(_OF_EXECUTION, execution_id)
