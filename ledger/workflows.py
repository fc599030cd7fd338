"""Workflow definitions in the ledger: deploy a version, load them for the workers.

Deploying is idempotent: the same content deploys once. A definition without a
`version` gets the next one; with one, it must be new or identical.
"""

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from asyncpg import Record

from hotpath.context_types import ContextType
from hotpath.definition import DefinitionError, validate
from ledger.connection import Queryable, Transactional

#: Workers LISTEN on this channel to reload definitions after a deploy.
DEPLOY_CHANNEL = "ordo_workflows"


def digest(definition: dict[str, Any]) -> str:
    """A content digest that ignores the version number."""
    body = {k: v for k, v in definition.items() if k != "version"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def ensure_tenant(conn: Queryable, tenant: str) -> None:
    await conn.execute("INSERT INTO ordo.tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING", tenant)


async def deploy(
    conn: Transactional, definition: dict[str, Any], context_types: Mapping[str, ContextType] | None = None
) -> tuple[int, bool]:
    """Validate and store a definition; returns (version, newly_deployed).

    Raises DefinitionError (pointing at the offending step) for an invalid one. With the
    registered `context_types`, a workflow about a type that is not one of them is invalid too.
    """
    validate(definition, context_types)
    tenant, workflow_id = definition["tenant"], definition["id"]
    body_digest = digest(definition)
    async with conn.transaction():
        await ensure_tenant(conn, tenant)
        # Serialise deploys of one workflow so that version numbers do not race.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{tenant}/{workflow_id}")
        rows = await conn.fetch(
            "SELECT version, digest FROM ordo.workflows WHERE tenant = $1 AND workflow_id = $2 ORDER BY version",
            tenant,
            workflow_id,
        )
        versions = {r["version"]: r["digest"] for r in rows}
        wanted = definition.get("version")
        if wanted is None:
            if rows and rows[-1]["digest"] == body_digest:
                return rows[-1]["version"], False
            wanted = (rows[-1]["version"] + 1) if rows else 1
        elif wanted in versions:
            if versions[wanted] == body_digest:
                return wanted, False
            raise DefinitionError(
                [
                    f"version {wanted} of workflow '{workflow_id}' is already deployed with other content; "
                    "deploy without 'version' to get the next one"
                ]
            )
        stored = dict(definition, version=wanted)
        await conn.execute(
            "INSERT INTO ordo.workflows (tenant, workflow_id, version, definition, digest) VALUES ($1, $2, $3, $4, $5)",
            tenant,
            workflow_id,
            wanted,
            orjson.dumps(stored).decode(),
            body_digest,
        )
        await conn.execute(f"NOTIFY {DEPLOY_CHANNEL}")
    return wanted, True


async def load_all(conn: Queryable) -> list[dict[str, Any]]:
    """Every stored definition (all versions), as stored."""
    rows = await conn.fetch("SELECT definition FROM ordo.workflows ORDER BY tenant, workflow_id, version")
    return [orjson.loads(r["definition"]) for r in rows]


async def tenants(conn: Queryable) -> set[str]:
    return {r["tenant"] for r in await conn.fetch("SELECT tenant FROM ordo.tenants")}


_VERSIONS = """
SELECT tenant, workflow_id, max(version) AS latest, count(*) AS versions
FROM ordo.workflows GROUP BY 1, 2 ORDER BY 1, 2
"""


async def versions(conn: Queryable) -> list[Record]:
    """Each deployed workflow (tenant, workflow_id): its latest version and how many it has (`ordo workflow list`)."""
    return await conn.fetch(_VERSIONS)
