"""Reads of the dead-letter table for the operator tools, and the mark a retry leaves.

The batcher writes the letters as part of each commit; daemon/dlq.py decides
how a letter is shown and how it is retried. Whose letter it is, where
deployments share the ledger, is told here in one SQL rule (`belongs_to`)
that `ordo dlq list`, `show` and `retry` all read, and the console's
dead-letter page too (ledger/console.py joins the same fragments). Which of
its own letters a retry would leave open, and why, is told here in SQL too
(`WHY_RETRY_LEAVES_OPEN`), for a pick of many letters to leave them out.
"""

from asyncpg import Record

from ledger.connection import Queryable
from ledger.executions import DEPLOYMENT_OF_ROW

# A failed step's execution `e`, to tell whose letter it is: looked up by its key, letter by letter
# (LIMIT 1 keeps the planner from joining every execution of the ledger to the letters instead).
EXECUTION_OF_LETTER = """
LEFT JOIN LATERAL (SELECT x.execution_id, x.deployment FROM ordo.executions x
                   WHERE x.execution_id = d.execution_id AND d.reason = 'step_failed' LIMIT 1) e ON true
"""


def belongs_to(deployment: str) -> str:
    """SQL: whether the letter `d` belongs to the deployment `deployment` (SQL) names: its to list and retry.

    Deployments that share a ledger share this table, and a retry goes onto the retrying deployment's
    subjects. A failed step is its execution's deployment's (`e`, joined by `EXECUTION_OF_LETTER`; none
    when the execution is gone); a message is the deployment's whose subjects it was taken from; a letter
    that names no subject is every deployment's.
    """
    return f"""(CASE WHEN d.reason = 'step_failed' AND d.execution_id IS NOT NULL
                     THEN e.execution_id IS NOT NULL AND {DEPLOYMENT_OF_ROW} = {deployment}
                     ELSE d.subject = '' OR starts_with(d.subject, {deployment} || '.') END) IS TRUE"""


# The one deployment whose letter it is, by the same rule over the deployments the ledger knows; NULL
# when that cannot be told (a failed step of a gone or unassigned execution, a letter of no subject).
DEPLOYMENT_OF_LETTER = f"""
(SELECT min(k.deployment) FROM (SELECT DISTINCT deployment FROM ordo.partitions WHERE deployment <> '') k
 WHERE {belongs_to("k.deployment")} HAVING count(*) = 1)
"""

# Why daemon/dlq.py's `retry` would leave a letter `d` of the deployment's open, in the words of its line (NULL: it
# would retry it): a message with no subject to republish it to, or one for another deployment's execution with
# no subject to send it to (the execution is gone, or its deployment cannot be told or has no partitions). It
# tests what `retry` tests, in its order; `retry` still tests it itself when it sends. A pick of many letters
# leaves these out, or the oldest of them would fill its limit again at every retry and the rest never be taken;
# the console's count of what a group retry takes leaves them out too (ledger/console.py).
# (The lateral join's `e` is the letter's execution, for DEPLOYMENT_OF_ROW: it hides EXECUTION_OF_LETTER's `e`.)
WHY_RETRY_LEAVES_OPEN = f"""
(CASE WHEN d.reason = 'step_failed' AND d.execution_id IS NOT NULL THEN NULL
      WHEN d.reason = 'other_deployment' THEN
        (SELECT CASE WHEN home.execution_id IS NULL
                     THEN format('left open: no execution %s to send it to', d.execution_id)
                     WHEN coalesce(home.deployment, '') = ''
                     THEN format('left open: execution %s belongs to a deployment the ledger cannot name '
                                 '(enrolled before migration 021 by one of several): assign it, then retry',
                                 d.execution_id)
                     WHEN NOT EXISTS (SELECT FROM ordo.partitions k WHERE k.deployment = home.deployment)
                     THEN format('left open: execution %s belongs to deployment %L, which has no partitions',
                                 d.execution_id, home.deployment)
                END
         FROM (SELECT) one
         LEFT JOIN LATERAL (SELECT e.execution_id, {DEPLOYMENT_OF_ROW} AS deployment
                            FROM ordo.executions e WHERE e.execution_id = d.execution_id) home ON true)
      WHEN d.subject = '' THEN 'nothing to retry it with (no subject)'
 END)
"""

_OPEN = f"""
SELECT d.id, d.at, d.reason, d.tenant, d.workflow_id, d.execution_id::text, d.step_id, d.stream, d.stream_seq,
       d.batch_index, d.error, {DEPLOYMENT_OF_LETTER} AS deployment
FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
WHERE d.status = 'open' AND ($1::text IS NULL OR d.reason = $1) AND ($2::text IS NULL OR d.tenant = $2)
  AND ($4::text IS NULL OR {belongs_to("$4::text")})
ORDER BY d.id LIMIT $3
"""

_LETTER = f"""
SELECT d.*, {belongs_to("$3::text")} AS ours, {DEPLOYMENT_OF_LETTER} AS deployment
FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
WHERE d.id = $1 AND ($2::text IS NULL OR d.tenant = $2)
"""

_PICK = f"""
SELECT d.id, d.reason, d.execution_id::text, d.step_id, d.subject, d.payload, {belongs_to("$5::text")} AS ours
FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
WHERE d.status = 'open'
  AND ($1::bigint IS NULL OR d.id = $1)
  AND ($2::text IS NULL OR d.reason = $2)
  AND ($3::text IS NULL OR d.tenant = $3)
  AND ($4::text IS NULL OR (d.reason = 'step_failed' AND convert_from(d.payload, 'UTF8')::jsonb->>'action' = $4))
ORDER BY d.id
FOR UPDATE OF d SKIP LOCKED
"""

_OPEN_OF_EXECUTION = """
SELECT id, at, reason, error, step_id, attempts FROM ordo.dead_letters
WHERE execution_id = $1::uuid AND status = 'open' ORDER BY id
"""

_RETRIED = "UPDATE ordo.dead_letters SET status = 'retried', retried_at = now() WHERE id = $1"


async def open_letters(
    conn: Queryable, deployment: str | None, reason: str | None, tenant: str | None, limit: int
) -> list[Record]:
    """The first `limit` open letters, oldest first, of one deployment (None: of every deployment), one
    reason and one tenant if given; each with the deployment whose it is (None: that cannot be told)."""
    return await conn.fetch(_OPEN, reason, tenant, limit, deployment)


async def letter(conn: Queryable, letter_id: int, deployment: str, tenant: str | None) -> Record | None:
    """One letter, every column, or None (also when it is another tenant's); with `ours`, whether it is
    the deployment's, and the deployment whose it is (None: that cannot be told), as `open_letters` has."""
    return await conn.fetchrow(_LETTER, letter_id, tenant, deployment)


async def pick_for_retry(
    conn: Queryable, deployment: str, letter_id: int | None, reason: str | None, tenant: str | None, action: str | None
) -> list[Record]:
    """The open letters to retry, locked until the caller's transaction ends (others skip them), each
    with `ours`: whether it is the deployment's to retry.

    `action` picks the failed steps of one action. Every filter that is None matches all.
    """
    return await conn.fetch(_PICK, letter_id, reason, tenant, action, deployment)


async def mark_retried(conn: Queryable, letter_id: int) -> None:
    """The letter was retried: it is no longer open, so it is not retried twice."""
    await conn.execute(_RETRIED, letter_id)


async def open_of_execution(conn: Queryable, execution_id: str) -> list[Record]:
    """The execution's open letters, oldest first: id, at, reason, error, step_id, attempts."""
    return await conn.fetch(_OPEN_OF_EXECUTION, execution_id)
