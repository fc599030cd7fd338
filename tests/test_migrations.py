"""A ledger written by an older schema migrates forward (`ordo migrate`) and checks clean.

Each test builds the ledger as an older release left it, with rows in it, by
applying only the migrations up to that release, then runs today's `migrate`
and reads the rows back through today's schema.
"""

from datetime import UTC, datetime

import asyncpg
import orjson

from ledger import check as ledger_check
from ledger.schema import migrate, migrations

EXECUTION_ID = "00000000-0000-0000-0000-000000000001"


async def _ledger_as_of(conn: asyncpg.Connection, last: int) -> None:
    """The schema as migrations 1..`last` made it, recorded as applied."""
    await conn.execute(
        "CREATE SCHEMA ordo; CREATE TABLE ordo.schema_migrations (version int PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, name, sql in migrations():
        if version > last:
            break
        await conn.execute(sql)
        await conn.execute("INSERT INTO ordo.schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def test_a_ledger_populated_under_migration_005_migrates_forward_and_checks_clean(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _ledger_as_of(conn, 5)
        await conn.execute(
            """INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, contact_id, event_id,
                   partition, status, seq, pc, steps, waiting, last_stream_seq, context, contact, event, created_at,
                   runtime, updated_at)
               VALUES ($1::uuid, 'acme', 'w', 1, 'c-1', 'e-1', 0, 'waiting', 3, 0, 1, 'event:x', 0, '{}',
                   '{"id": "c-1"}', '{}', now(), '{}', now())""",
            EXECUTION_ID,
        )
        await conn.execute(
            """INSERT INTO ordo.transitions (execution_id, seq, step_id, kind, at, detail, source_seq) VALUES
                   ($1::uuid, 1, '', 'started', '2026-01-01T00:00:00Z', NULL, NULL),
                   ($1::uuid, 2, 'greet', 'set', '2026-01-01T00:00:00Z', '{"values": {"a": 1}}', NULL),
                   ($1::uuid, 3, 'w', 'waiting', '2026-01-01T00:00:01Z', NULL, 17)""",
            EXECUTION_ID,
        )
        before = [tuple(r) for r in await conn.fetch("SELECT * FROM ordo.transitions ORDER BY seq")]
        await conn.execute(
            "INSERT INTO ordo.event_waits (execution_id, tenant, contact_id, event_type, step_id) "
            "VALUES ($1::uuid, 'acme', 'c-1', 'x', 'w')",
            EXECUTION_ID,
        )
        await conn.execute(
            "INSERT INTO ordo.timers (execution_id, partition, timer_id, fire_at, purpose, step_id) "
            "VALUES ($1::uuid, 0, 't', now() + interval '1 day', 'event_timeout', 'w')",
            EXECUTION_ID,
        )

        # Every migration after 005 applies, in order (the list grows as migrations are added).
        assert await migrate(conn) == [name for version, name, _ in migrations() if version > 5]

        row = await conn.fetchrow("SELECT subject_type, subject_id, subject FROM ordo.executions")
        assert (row["subject_type"], row["subject_id"], orjson.loads(row["subject"])) == (
            "contact",
            "c-1",
            {"id": "c-1"},
        )
        wait = await conn.fetchrow("SELECT tenant, subject_type, subject_id, event_type FROM ordo.event_waits")
        assert tuple(wait) == ("acme", "contact", "c-1", "x")
        # The transitions read back as they were written, now from ordo.history through the view.
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM ordo.transitions ORDER BY seq")] == before
        assert await conn.fetchval("SELECT count(*) FROM ordo.history") == 3
        assert set((await ledger_check.check(conn)).values()) == {0}
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_a_ledger_populated_under_migration_007_migrates_to_day_partitions_and_checks_clean(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _ledger_as_of(conn, 7)
        finished = "00000000-0000-0000-0000-000000000002"
        for execution_id, status, seq, finished_at in (
            (EXECUTION_ID, "waiting", 2, None),
            (finished, "completed", 2, datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)),
        ):
            await conn.execute(
                """INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, subject_id,
                       event_id, partition, status, seq, pc, steps, waiting, last_stream_seq, context, subject, event,
                       created_at, runtime, updated_at, finished_at)
                   VALUES ($1::uuid, 'acme', 'w', 1, 'c-1', $1, 0, $2, $3, 0, 1, NULL, 0, '{}', '{"id": "c-1"}', '{}',
                       '2026-01-01T00:00:00Z', '{}', now(), $4::timestamptz)""",
                execution_id,
                status,
                seq,
                finished_at,
            )
            await conn.execute(
                """INSERT INTO ordo.history (execution_id, first_seq, at, source_seq, steps)
                   VALUES ($1::uuid, 1, '2026-01-01T00:00:00Z', NULL, '[["", "started"], ["greet", "set"]]')""",
                execution_id,
            )
        before = [tuple(r) for r in await conn.fetch("SELECT * FROM ordo.transitions ORDER BY execution_id, seq")]
        # The migrations numbered after 008 ran first on this ledger (they were merged before it): 012
        # indexes ordo.executions, and 008 must carry that index over to the partitioned table.
        for version, name, sql in migrations():
            if version > 8:
                await conn.execute(sql)
                await conn.execute("INSERT INTO ordo.schema_migrations (version, name) VALUES ($1, $2)", version, name)

        assert await migrate(conn) == ["008_time_partitions.sql"]

        # The rows stay where they were, in the legacy partitions, dated the day of the migration.
        today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        placed = await conn.fetch("SELECT tableoid::regclass::text, ledger_day FROM ordo.executions")
        assert {tuple(r) for r in placed} == {("ordo.executions_legacy", today)}
        placed = await conn.fetch("SELECT DISTINCT tableoid::regclass::text, ledger_day FROM ordo.history")
        assert [tuple(r) for r in placed] == [("ordo.history_legacy", today)]
        assert [tuple(r) for r in await conn.fetch("SELECT * FROM ordo.transitions ORDER BY execution_id, seq")] == (
            before
        )
        # The next days have partitions of their own.
        tomorrow = await conn.fetchval("SELECT $1::date + 1", today)
        partition = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'ordo.executions'::regclass AND c.relname = $1",
            f"executions_{tomorrow:%Y%m%d}",
        )
        assert partition == f"executions_{tomorrow:%Y%m%d}"
        indexes = {
            r[0]
            for r in await conn.fetch(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = $1::regclass",
                f"ordo.executions_{tomorrow:%Y%m%d}",
            )
        }
        assert {
            f"ordo.executions_{tomorrow:%Y%m%d}_{n}" for n in ("pkey", "tenant_created_at_execution_id_idx")
        } <= indexes
        assert len(indexes) == 5  # the primary key, by workflow, by subject, by created, the open ones
        assert set((await ledger_check.check(conn)).values()) == {0}
        assert await migrate(conn) == []
    finally:
        await conn.close()
