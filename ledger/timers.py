"""Reads of the durable timers (`ordo.timers`, one row per waiting execution).

The batcher writes and deletes the rows as part of each commit; this only
reads them back.
"""

from asyncpg import Record

from ledger.connection import Queryable

_DUE = """
SELECT execution_id::text, timer_id, (extract(epoch FROM fire_at) * 1000)::bigint, partition
FROM ordo.timers
WHERE partition = ANY($1::int[]) AND fire_at <= to_timestamp($2 / 1000.0)
ORDER BY fire_at
LIMIT $3
"""

_OF_EXECUTION = "SELECT timer_id, fire_at, purpose, step_id FROM ordo.timers WHERE execution_id = $1::uuid"


async def due(conn: Queryable, partitions: list[int], before_ms: int, limit: int) -> list[Record]:
    """The first `limit` timers of these partitions due by `before_ms`, earliest first.

    Each row unpacks as (execution_id, timer_id, fire_at_ms, partition).
    """
    return await conn.fetch(_DUE, partitions, before_ms, limit)


async def of_execution(conn: Queryable, execution_id: str) -> Record | None:
    """The execution's pending timer (timer_id, fire_at, purpose, step_id), or None."""
    return await conn.fetchrow(_OF_EXECUTION, execution_id)
