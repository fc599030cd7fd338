"""Versioned SQL migrations of the `ordo` schema, applied idempotently.

Each file `migrations/NNN_name.sql` runs once, in its own transaction, under an
advisory lock so that several workers starting together migrate once.
"""

from importlib import resources

from ledger.connection import Queryable, Transactional

#: Any fixed number: the advisory lock that serialises concurrent migrations.
_MIGRATION_LOCK = 0x6F72646F


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    found = []
    for entry in resources.files("ledger").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: Transactional) -> list[str]:
    """Apply the migrations that are missing; returns the names applied."""
    applied = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS ordo;
            CREATE TABLE IF NOT EXISTS ordo.schema_migrations (
                version     int PRIMARY KEY,
                name        text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM ordo.schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO ordo.schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def schema_version(conn: Queryable) -> int:
    exists = await conn.fetchval("SELECT to_regclass('ordo.schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM ordo.schema_migrations")
    return version


async def require_current(conn: Queryable) -> None:
    """Refuse to run against a ledger that is not migrated (a clear message, not a SQL error)."""
    have, want = await schema_version(conn), migrations()[-1][0]
    if have < want:
        raise RuntimeError(f"the ledger schema is at version {have}, this engine needs {want}: run `ordo migrate`")
