"""Reads of the event waits (`ordo.event_waits`): which executions wait for which event.

The batcher writes and deletes the rows as part of each commit; this only
reads them back.

A wait belongs to its execution's deployment (migration 013): an event is
routed only to the executions of the deployment whose trigger stream it came
from. The trigger path names its deployment through its connection's
`ordo.deployment` setting (the worker's pool sets it, daemon/worker.py), which
is what `waiting` reads when it is not given one.
"""

from asyncpg import Record

from ledger.connection import Queryable

_WAITING = """
SELECT w.execution_id::text, k.i
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
     AS k(tenant, subject_type, subject_id, event_type, i)
JOIN ordo.event_waits w USING (tenant, subject_type, subject_id, event_type)
WHERE w.deployment = coalesce($6, current_setting('ordo.deployment'))
"""

_OF_EXECUTION = "SELECT event_type, step_id FROM ordo.event_waits WHERE execution_id = $1::uuid"


async def waiting(
    conn: Queryable,
    tenants: list[str],
    subject_types: list[str],
    subject_ids: list[str],
    event_types: list[str],
    deployment: str | None = None,
) -> list[Record]:
    """The deployment's executions waiting for any of these (tenant, subject type, subject id, event type)
    keys, in one query; the deployment is the connection's `ordo.deployment` setting unless given.

    Each row unpacks as (execution_id, i), `i` the index of the key it waits for.
    """
    keys = list(range(len(tenants)))
    return await conn.fetch(_WAITING, tenants, subject_types, subject_ids, event_types, keys, deployment)


# The rows of before migration 013 that it could not give a deployment: as ledger/timers.py's.
_ADOPT = """
UPDATE ordo.event_waits SET deployment = $1
WHERE deployment = '' AND NOT EXISTS (SELECT FROM ordo.partitions WHERE deployment NOT IN ('', $1))
"""


async def adopt(conn: Queryable, deployment: str) -> None:
    """Take the event waits of no deployment when `deployment` is the only one on the ledger."""
    await conn.execute(_ADOPT, deployment)


async def of_execution(conn: Queryable, execution_id: str) -> Record | None:
    """The event the execution waits for (event_type, step_id), or None."""
    return await conn.fetchrow(_OF_EXECUTION, execution_id)
