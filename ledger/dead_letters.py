"""Reads of the dead-letter table for the operator tools, and the mark a retry leaves.

The batcher writes the letters as part of each commit; daemon/dlq.py decides
how a letter is shown and how it is retried.
"""

from asyncpg import Record

from ledger.connection import Queryable

_OPEN = """
SELECT id, at, reason, tenant, workflow_id, execution_id::text, step_id, stream, stream_seq, batch_index, error
FROM ordo.dead_letters
WHERE status = 'open' AND ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR tenant = $2)
ORDER BY id LIMIT $3
"""

_LETTER = "SELECT * FROM ordo.dead_letters WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"

_PICK = """
SELECT id, reason, execution_id::text, step_id, subject, payload
FROM ordo.dead_letters
WHERE status = 'open'
  AND ($1::bigint IS NULL OR id = $1)
  AND ($2::text IS NULL OR reason = $2)
  AND ($3::text IS NULL OR tenant = $3)
  AND ($4::text IS NULL OR (reason = 'step_failed' AND convert_from(payload, 'UTF8')::jsonb->>'action' = $4))
ORDER BY id
FOR UPDATE SKIP LOCKED
"""

_OPEN_OF_EXECUTION = """
SELECT id, at, reason, error, step_id, attempts FROM ordo.dead_letters
WHERE execution_id = $1::uuid AND status = 'open' ORDER BY id
"""

_RETRIED = "UPDATE ordo.dead_letters SET status = 'retried', retried_at = now() WHERE id = $1"


async def open_letters(conn: Queryable, reason: str | None, tenant: str | None, limit: int) -> list[Record]:
    """The first `limit` open letters, oldest first, of one reason and one tenant if given."""
    return await conn.fetch(_OPEN, reason, tenant, limit)


async def letter(conn: Queryable, letter_id: int, tenant: str | None) -> Record | None:
    """One letter, every column, or None (also when it is another tenant's)."""
    return await conn.fetchrow(_LETTER, letter_id, tenant)


async def pick_for_retry(
    conn: Queryable, letter_id: int | None, reason: str | None, tenant: str | None, action: str | None
) -> list[Record]:
    """The open letters to retry, locked until the caller's transaction ends (others skip them).

    `action` picks the failed steps of one action. Every filter that is None matches all.
    """
    return await conn.fetch(_PICK, letter_id, reason, tenant, action)


async def mark_retried(conn: Queryable, letter_id: int) -> None:
    """The letter was retried: it is no longer open, so it is not retried twice."""
    await conn.execute(_RETRIED, letter_id)


async def open_of_execution(conn: Queryable, execution_id: str) -> list[Record]:
    """The execution's open letters, oldest first: id, at, reason, error, step_id, attempts."""
    return await conn.fetch(_OPEN_OF_EXECUTION, execution_id)
