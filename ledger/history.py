"""An execution's history read back for the operator tools (`ordo inspect`).

Read-only: the row as last committed and its transitions in seq order. The
worker's own reads are in ledger/executions.py.
"""

_EXECUTION = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, contact_id, event_id, partition,
       status, seq, pc, steps, waiting, runtime, context, created_at, updated_at, finished_at
FROM ordo.executions WHERE execution_id = $1::uuid
"""
_TRANSITIONS = """
SELECT seq, step_id, kind, at, detail, source_seq
FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq
"""


async def execution(conn, execution_id: str):
    """The execution's row as an operator reads it (identity, status, state, times), or None."""
    return await conn.fetchrow(_EXECUTION, execution_id)


async def transitions(conn, execution_id: str) -> list:
    """The execution's transitions in seq order: seq, step_id, kind, at, detail (JSON text), source_seq."""
    return await conn.fetch(_TRANSITIONS, execution_id)
