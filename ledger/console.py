"""The operator console's reads and its audit trail (`ordo console`, daemon/console/).

Executions are searched newest first and paged by keyset on (created_at,
execution_id), so page 1,000 costs what page 1 does. A search is scoped to
a list of tenants (the one a tenant token is bound to, or those asked for)
and runs once per tenant on the index `executions_by_created` (tenant,
created_at, execution_id) of migration 012; the per-tenant pages are merged.
A search over every tenant walks `ordo.tenants` the same way, since
Postgres cannot skip through the index's leading column by itself.

The SQL of a search is put together from fixed fragments, one per filter
that is set; values are always parameters. A statement per combination
plans with the filters it really has, where one statement with
`($n IS NULL OR ...)` for every filter would be planned for none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from asyncpg import Record

from ledger.connection import Queryable
from ledger.dead_letters import DEPLOYMENT_OF_LETTER, EXECUTION_OF_LETTER, WHY_RETRY_LEAVES_OPEN, belongs_to

#: The execution statuses a search can ask for.
STATUSES = ("running", "waiting", "completed", "failed", "cancelled")

#: The most letters one group retry takes (`group_letter_ids`' limit): what is left stays open for the next.
#: The dead-letter page's Retry button says how many of a group one click retries; the change takes that many.
GROUP_RETRY_LIMIT = 1000


@dataclass(frozen=True)
class ExecutionSearch:
    """What an executions search asks for; a field left None matches everything.

    `tenants` None means every tenant (an operator's search); `execution_ids`
    narrows to those ids (how a search by trigger event id arrives: the ids
    that event enrolled are derived from it, daemon/topology.py).
    """

    tenants: tuple[str, ...] | None = None
    workflow_id: str | None = None
    status: str | None = None
    subject_type: str | None = None
    subject_id: str | None = None
    execution_ids: tuple[str, ...] | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None


#: A page ends at the (created_at, execution_id) of its last row: the next page starts below it.
Cursor = tuple[datetime, str]

_COLUMNS = (
    "e.execution_id, e.tenant, e.workflow_id, e.workflow_version, e.status, e.waiting,"
    " e.pc, e.subject_type, e.subject_id, e.event_id, e.created_at, e.updated_at, e.finished_at"
)

# The id as text (only once sorted: text does not sort as uuid does under every collation), and the
# step at pc, looked up in the version the execution runs (None past the last step).
_OUTER = (
    "p.execution_id::text AS execution_id, p.tenant, p.workflow_id, p.workflow_version, p.status, p.waiting,"
    " p.pc, p.subject_type, p.subject_id, p.event_id, p.created_at, p.updated_at, p.finished_at,"
    " (SELECT w.definition -> 'steps' -> p.pc ->> 'id' FROM ordo.workflows w"
    " WHERE w.tenant = p.tenant AND w.workflow_id = p.workflow_id AND w.version = p.workflow_version) AS step"
)


def _conditions(search: ExecutionSearch, after: Cursor | None, args: list[Any]) -> list[str]:
    """The WHERE clauses of a search (bar the tenant), their values appended to `args`."""

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = []
    if search.workflow_id is not None:
        where.append(f"e.workflow_id = {arg(search.workflow_id)}")
    if search.status is not None:
        where.append(f"e.status = {arg(search.status)}")
    if search.subject_id is not None:
        where.append(f"e.subject_id = {arg(search.subject_id)}")
        where.append(f"e.subject_type = {arg(search.subject_type or 'contact')}")
    if search.execution_ids is not None:
        where.append(f"e.execution_id = ANY({arg(list(search.execution_ids))}::uuid[])")
    if search.created_from is not None:
        where.append(f"e.created_at >= {arg(search.created_from)}")
    if search.created_to is not None:
        where.append(f"e.created_at < {arg(search.created_to)}")
    if after is not None:
        where.append(f"(e.created_at, e.execution_id) < ({arg(after[0])}, {arg(after[1])}::uuid)")
    return where


def search_sql(search: ExecutionSearch, after: Cursor | None, limit: int) -> tuple[str, list[Any]]:
    """The statement and arguments of one page of a search (what `search_executions` runs; EXPLAIN it to measure)."""
    args: list[Any] = []
    where = _conditions(search, after, args)
    order = "ORDER BY e.created_at DESC, e.execution_id DESC"
    args.append(limit)
    limit_arg = f"${len(args)}"
    if search.execution_ids is not None:
        # A handful of primary-key lookups: no need to go tenant by tenant.
        if search.tenants is not None:
            args.append(list(search.tenants))
            where.append(f"e.tenant = ANY(${len(args)}::text[])")
        inner = f"SELECT {_COLUMNS} FROM ordo.executions e WHERE {' AND '.join(where)} {order} LIMIT {limit_arg}"
        return f"SELECT {_OUTER} FROM ({inner}) p ORDER BY p.created_at DESC, p.execution_id DESC", args
    if search.tenants is None:
        tenants = "SELECT tenant FROM ordo.tenants"
    else:
        args.append(list(search.tenants))
        tenants = f"SELECT unnest(${len(args)}::text[]) AS tenant"
    where.insert(0, "e.tenant = t.tenant")
    per_tenant = f"SELECT {_COLUMNS} FROM ordo.executions e WHERE {' AND '.join(where)} {order} LIMIT {limit_arg}"
    sql = (
        f"SELECT {_OUTER} FROM ("
        f"SELECT x.* FROM ({tenants}) t CROSS JOIN LATERAL ({per_tenant}) x"
        f" ORDER BY x.created_at DESC, x.execution_id DESC LIMIT {limit_arg}"
        ") p ORDER BY p.created_at DESC, p.execution_id DESC"
    )
    return sql, args


async def search_executions(
    conn: Queryable, search: ExecutionSearch, after: Cursor | None = None, limit: int = 50
) -> list[Record]:
    """One page of executions, newest first, below the cursor `after` if given.

    Each row: execution_id, tenant, workflow_id, workflow_version, status,
    waiting, pc, step (the id of the step at pc), subject_type, subject_id,
    event_id, created_at, updated_at, finished_at.
    """
    sql, args = search_sql(search, after, limit)
    return await conn.fetch(sql, *args)


_WORKFLOW_KEYS = """
SELECT DISTINCT tenant, workflow_id FROM ordo.workflows
WHERE $1::text[] IS NULL OR tenant = ANY($1::text[])
ORDER BY 1, 2
"""


async def workflow_keys(conn: Queryable, tenants: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """Every (tenant, workflow_id) ever deployed, of these tenants (all for None)."""
    rows = await conn.fetch(_WORKFLOW_KEYS, None if tenants is None else list(tenants))
    return [(r["tenant"], r["workflow_id"]) for r in rows]


_EXECUTION_TENANT = "SELECT tenant FROM ordo.executions WHERE execution_id = $1::uuid"


async def execution_tenant(conn: Queryable, execution_id: str) -> str | None:
    """The tenant of an execution, or None if there is no such execution."""
    tenant: str | None = await conn.fetchval(_EXECUTION_TENANT, execution_id)
    return tenant


# -- dead letters ----------------------------------------------------------------------

# A failed step's letter carries the action request it failed on (JSON); other letters carry
# whatever payload was refused, which need not even be text: only the first is read.
_ACTION = "CASE WHEN d.reason = 'step_failed' THEN convert_from(d.payload, 'UTF8')::jsonb ->> 'action' END"

# Deployments that share the ledger share its letters. Which are the console's deployment's ($2), its
# retry's to take, is ledger/dead_letters.py's rule; every deployment's are read only when asked ($3),
# each then with the deployment whose it is. Of the deployment's, those a group retry takes (`_GROUP_LETTERS`)
# are counted apart: the rest it leaves open, and a count of all would offer to retry them too.
_LETTER_GROUPS = f"""
SELECT reason, action, tenant, deployment, ours, count(*) AS letters,
       count(*) FILTER (WHERE ours AND retriable) AS retriable, min(at) AS first_at, max(at) AS last_at
FROM (SELECT d.reason, {_ACTION} AS action, d.tenant, d.at, {belongs_to("$2::text")} AS ours,
             {WHY_RETRY_LEAVES_OPEN} IS NULL AS retriable,
             CASE WHEN $3::boolean THEN {DEPLOYMENT_OF_LETTER} END AS deployment
      FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
      WHERE d.status = 'open' AND ($1::text[] IS NULL OR d.tenant = ANY($1::text[]))) letter
WHERE ours OR $3::boolean
GROUP BY reason, action, tenant, deployment, ours
ORDER BY count(*) DESC, reason, action, tenant, deployment
"""

# The open letters of one (reason, action, tenant) group that are the console's deployment's: what the page
# counts in the group, and what a group retry takes (another deployment's are that one's to retry).
_IN_GROUP = f"""d.status = 'open' AND d.reason = $1 AND {_ACTION} IS NOT DISTINCT FROM $2::text
  AND d.tenant IS NOT DISTINCT FROM $3::text AND {belongs_to("$5::text")}"""

# A group retry takes, up to its limit, those that a retry would not leave open: taken, the oldest that cannot
# be retried (no subject to republish to) would fill the limit at every group retry, and the rest never be retried.
_GROUP_LETTERS = f"""
SELECT d.id FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
WHERE {_IN_GROUP} AND {WHY_RETRY_LEAVES_OPEN} IS NULL
ORDER BY d.id LIMIT $4
"""

# The others, which it leaves open: the first few, each with why, and how many there are in all.
_GROUP_LETTERS_LEFT_OPEN = f"""
SELECT id, why, count(*) OVER () AS letters FROM (
  SELECT d.id, {WHY_RETRY_LEAVES_OPEN} AS why FROM ordo.dead_letters d {EXECUTION_OF_LETTER} WHERE {_IN_GROUP}
) letter
WHERE why IS NOT NULL
ORDER BY id LIMIT $4
"""

_LETTERS = f"""
SELECT * FROM (
  SELECT d.id, d.at, d.reason, {_ACTION} AS action, d.tenant, d.workflow_id, d.execution_id::text AS execution_id,
         d.step_id, d.error, d.status, {belongs_to("$4::text")} AS ours,
         CASE WHEN $5::boolean THEN {DEPLOYMENT_OF_LETTER} END AS deployment
  FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
  WHERE d.status = 'open' AND ($1::text[] IS NULL OR d.tenant = ANY($1::text[]))
    AND ($2::text IS NULL OR d.reason = $2)) letter
WHERE ours OR $5::boolean
ORDER BY id DESC LIMIT $3
"""

_LETTER_TENANT = "SELECT tenant FROM ordo.dead_letters WHERE id = $1"

# Whose each of some letters is: the console's deployment's ($2), or which other's, by the same rule.
_WHOSE_LETTERS = f"""
SELECT d.id, {belongs_to("$2::text")} AS ours, {DEPLOYMENT_OF_LETTER} AS deployment
FROM ordo.dead_letters d {EXECUTION_OF_LETTER}
WHERE d.id = ANY($1::bigint[])
"""


async def letter_groups(
    conn: Queryable, tenants: tuple[str, ...] | None, deployment: str, *, all_deployments: bool = False
) -> list[Record]:
    """Open dead letters of the deployment counted by (reason, action, tenant), the largest group first;
    with `all_deployments`, every deployment's, counted by whose they are too.

    Each row: reason, action (a failed step's action, else None), tenant, deployment (with
    `all_deployments`, whose the letters are; None: that cannot be told), ours (the deployment's to
    retry), letters, retriable (how many of them a retry of the group takes, as `group_letter_ids` picks
    them, bar its limit; 0 for another deployment's), first_at, last_at.
    """
    return await conn.fetch(_LETTER_GROUPS, None if tenants is None else list(tenants), deployment, all_deployments)


async def group_letter_ids(
    conn: Queryable, deployment: str, reason: str, action: str | None, tenant: str | None, limit: int
) -> list[int]:
    """The ids of a group's open letters that are the deployment's and that a retry would not leave open,
    oldest first (None matches a letter without action or tenant): another deployment's are not its to retry,
    and neither they nor those it cannot retry take up the limit."""
    return [r["id"] for r in await conn.fetch(_GROUP_LETTERS, reason, action, tenant, limit, deployment)]


async def group_letters_left_open(
    conn: Queryable, deployment: str, reason: str, action: str | None, tenant: str | None, limit: int
) -> tuple[int, list[str]]:
    """How many of a group's open letters of the deployment a retry would leave open (`group_letter_ids`
    leaves them out), and the first `limit` of them, oldest first, each as `ordo dlq retry` says it."""
    rows = await conn.fetch(_GROUP_LETTERS_LEFT_OPEN, reason, action, tenant, limit, deployment)
    return (rows[0]["letters"] if rows else 0), [f"{r['id']}: {r['why']}" for r in rows]


async def open_letters(
    conn: Queryable,
    tenants: tuple[str, ...] | None,
    deployment: str,
    reason: str | None,
    limit: int,
    *,
    all_deployments: bool = False,
) -> list[Record]:
    """The newest open letters of the deployment (of every deployment with `all_deployments`, each with
    its deployment as `letter_groups` has it, and `ours`), of these tenants (all for None), of one reason
    if given."""
    tenants_or_all = None if tenants is None else list(tenants)
    return await conn.fetch(_LETTERS, tenants_or_all, reason, limit, deployment, all_deployments)


async def whose_letters(conn: Queryable, letter_ids: list[int], deployment: str) -> dict[int, Record]:
    """Per letter of these that exists: ours (the deployment's to retry) and deployment (whose it is; None:
    that cannot be told), as `open_letters` has them."""
    return {r["id"]: r for r in await conn.fetch(_WHOSE_LETTERS, letter_ids, deployment)}


async def letter_tenant(conn: Queryable, letter_id: int) -> tuple[bool, str | None]:
    """(whether the letter exists, its tenant)."""
    row = await conn.fetchrow(_LETTER_TENANT, letter_id)
    return (False, None) if row is None else (True, row["tenant"])


# -- workflows ---------------------------------------------------------------------------

_WORKFLOW_VERSIONS = """
SELECT tenant, workflow_id, version, digest, deployed_at, jsonb_array_length(definition -> 'steps') AS steps
FROM ordo.workflows
WHERE $1::text[] IS NULL OR tenant = ANY($1::text[])
ORDER BY tenant, workflow_id, version DESC
"""

_DEFINITIONS = """
SELECT version, definition FROM ordo.workflows
WHERE tenant = $1 AND workflow_id = $2 AND version = ANY($3::int[])
"""


async def workflow_versions(conn: Queryable, tenants: tuple[str, ...] | None) -> list[Record]:
    """Every deployed version of every workflow of these tenants (all for None), newest version first.

    Each row: tenant, workflow_id, version, digest, deployed_at, steps (how many).
    """
    return await conn.fetch(_WORKFLOW_VERSIONS, None if tenants is None else list(tenants))


async def definitions(conn: Queryable, tenant: str, workflow_id: str, versions: list[int]) -> dict[int, Any]:
    """The definitions of these versions of one workflow that are deployed, by version."""
    rows = await conn.fetch(_DEFINITIONS, tenant, workflow_id, versions)
    return {r["version"]: orjson.loads(r["definition"]) for r in rows}


_OPEN_PER_VERSION = """
SELECT workflow_version AS version,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'waiting') AS waiting
FROM ordo.executions
WHERE tenant = $1 AND workflow_id = $2 AND status IN ('running', 'waiting')
GROUP BY workflow_version
"""


async def open_per_version(conn: Queryable, tenant: str, workflow_id: str) -> dict[int, Record]:
    """Per version of one workflow: its executions still running and waiting (a version with none is absent).

    On the index (tenant, workflow_id, status): it reads the open executions only, never the finished.
    """
    return {r["version"]: r for r in await conn.fetch(_OPEN_PER_VERSION, tenant, workflow_id)}


# -- the audit trail -----------------------------------------------------------------------

_AUDIT_BEGIN = """
INSERT INTO ordo.console_audit (who, token_tenant, action, execution_id, dead_letter_id, detail)
VALUES ($1, $2, $3, $4::uuid, $5, $6::jsonb) RETURNING id
"""
_AUDIT_END = "UPDATE ordo.console_audit SET outcome = $2 WHERE id = $1"
_AUDIT = """
SELECT id, at, who, token_tenant, action, execution_id::text AS execution_id, dead_letter_id, detail, outcome
FROM ordo.console_audit
WHERE $1::text IS NULL OR token_tenant = $1
ORDER BY id DESC LIMIT $2
"""


async def audit_begin(
    conn: Queryable,
    who: str,
    token_tenant: str | None,
    action: str,
    execution_id: str | None,
    dead_letter_id: int | None,
    detail: dict[str, Any],
) -> int:
    """Record a change about to be made (before it is made, so a crash in between leaves a trace); its id."""
    audit_id: int = await conn.fetchval(
        _AUDIT_BEGIN, who, token_tenant, action, execution_id, dead_letter_id, orjson.dumps(detail).decode()
    )
    return audit_id


async def audit_end(conn: Queryable, audit_id: int, outcome: str) -> None:
    """Record how a change ended: 'ok' or the error."""
    await conn.execute(_AUDIT_END, audit_id, outcome)


async def audit_trail(conn: Queryable, token_tenant: str | None, limit: int) -> list[Record]:
    """The newest changes, all of them or those made with a token of one tenant."""
    return await conn.fetch(_AUDIT, token_tenant, limit)


# -- measuring the search at scale (bench/console_search.py) ---------------------------------

_SYNTHETIC = """
INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, subject_type, subject_id, event_id,
                             partition, status, seq, pc, steps, waiting, context, subject, event, runtime,
                             created_at, updated_at, finished_at, ledger_day)
SELECT md5('console-bench-' || i)::uuid, 'tenant-' || (i % $3), 'workflow-' || (i % $4), 1, 'contact',
       'c-' || (i / 3), 'e-' || i, i % 16,
       CASE WHEN i % 97 = 0 THEN 'failed' WHEN i % 11 = 0 THEN 'waiting' ELSE 'completed' END,
       3, 1, 3, CASE WHEN i % 11 = 0 AND i % 97 <> 0 THEN 'done' END, '{}', '{}', '{}', '{}',
       $5::timestamptz + (i * $6::float8) * interval '1 second',
       $5::timestamptz + (i * $6::float8) * interval '1 second',
       CASE WHEN i % 11 = 0 AND i % 97 <> 0 THEN NULL ELSE $5::timestamptz + (i * $6::float8) * interval '1 second' END,
       (($5::timestamptz + (i * $6::float8) * interval '1 second') AT TIME ZONE 'UTC')::date
FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS i
"""


async def add_synthetic_executions(
    conn: Queryable, first: int, count: int, tenants: int, workflows: int, start: datetime, spacing_s: float
) -> None:
    """Executions `first` .. `first + count - 1` of a synthetic ledger, for measuring searches only.

    Execution i belongs to tenant-(i % tenants) and workflow-(i % workflows),
    was created `start + i * spacing_s`, is about contact c-(i / 3); 1 in 97
    failed, about 1 in 11 waits for signal `done`, the rest completed.
    """
    await conn.execute(_SYNTHETIC, first, count, tenants, workflows, start, spacing_s)


async def analyze(conn: Queryable) -> None:
    """Fresh planner statistics of the executions table (after a bulk load)."""
    await conn.execute("ANALYZE ordo.executions")
