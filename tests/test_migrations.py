"""A ledger written by an older schema migrates forward (`ordo migrate`) and checks clean.

Each test builds the ledger as an older release left it, with rows in it, by
applying only the migrations up to that release, then runs today's `migrate`
and reads the rows back through today's schema.
"""

from datetime import UTC, datetime

import asyncpg
import orjson
from harness import ordo

from ledger import check as ledger_check
from ledger import event_waits, leases, timers
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
        # The migrations numbered after 008 up to 015 ran first on this ledger (they were merged before
        # it): 012 indexes ordo.executions, and 008 must carry that index over to the partitioned table.
        # 016 on builds on the day partitions.
        for version, name, sql in migrations():
            if 8 < version < 16:
                await conn.execute(sql)
                await conn.execute("INSERT INTO ordo.schema_migrations (version, name) VALUES ($1, $2)", version, name)

        assert await migrate(conn) == [name for version, name, _ in migrations() if version == 8 or version >= 16]

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


async def _two_waiting_executions_as_of_012(conn: asyncpg.Connection, deployments: list[str]) -> None:
    """A ledger at 012 whose partitions 0..3 are each of `deployments`' ('' : of before 011), with two
    executions waiting for an event (a wait and its timeout timer each) in partitions 0 and 1."""
    await _ledger_as_of(conn, 12)
    for deployment in deployments:
        await conn.execute(
            "INSERT INTO ordo.partitions (deployment, partition) SELECT $1, generate_series(0, 3)", deployment
        )
    for partition, execution_id in enumerate((EXECUTION_ID, "00000000-0000-0000-0000-000000000002")):
        await conn.execute(
            """INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, subject_id,
                   event_id, partition, status, seq, pc, steps, waiting, last_stream_seq, context, subject, event,
                   created_at, runtime, updated_at, ledger_day)
               VALUES ($1::uuid, 'acme', 'w', 1, 'c-1', $1, $2, 'waiting', 2, 0, 1, 'event:x', 0, '{}',
                   '{"id": "c-1"}', '{}', now(), '{}', now(), (now() AT TIME ZONE 'UTC')::date)""",
            execution_id,
            partition,
        )
        await conn.execute(
            """INSERT INTO ordo.history (execution_id, first_seq, at, source_seq, steps, ledger_day)
               VALUES ($1::uuid, 1, now(), NULL, '[["", "started"], ["w", "waiting"]]',
                   (now() AT TIME ZONE 'UTC')::date)""",
            execution_id,
        )
        await conn.execute(
            "INSERT INTO ordo.event_waits (execution_id, tenant, subject_type, subject_id, event_type, step_id) "
            "VALUES ($1::uuid, 'acme', 'contact', 'c-1', 'x', 'w')",
            execution_id,
        )
        await conn.execute(
            "INSERT INTO ordo.timers (execution_id, partition, timer_id, fire_at, purpose, step_id) "
            "VALUES ($1::uuid, $2, 't', now() + interval '1 day', 'event_timeout', 'w')",
            execution_id,
            partition,
        )


async def _deployments_of_waits(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    timers = await conn.fetch("SELECT DISTINCT deployment FROM ordo.timers")
    waits = await conn.fetch("SELECT DISTINCT deployment FROM ordo.event_waits")
    return [(t["deployment"], w["deployment"]) for t, w in zip(timers, waits, strict=True)]


async def test_the_timers_and_waits_of_a_ledger_at_012_become_its_one_deployments_and_check_clean(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _two_waiting_executions_as_of_012(conn, ["ordo"])
        assert (await migrate(conn))[0] == "013_waits_per_deployment.sql"  # and the later ones
        assert await _deployments_of_waits(conn) == [("ordo", "ordo")]
        # The deployment's walk reads them (on the rebuilt index), another deployment's does not.
        after = {p: timers.START for p in range(4)}
        far = 4_000_000_000 * 1_000_000
        assert len(await timers.due(conn, "ordo", after, far, 100)) == 2
        assert await timers.due(conn, "staging", after, far, 100) == []
        keys = (["acme"], ["contact"], ["c-1"], ["x"])
        assert len(await event_waits.waiting(conn, *keys, deployment="ordo")) == 2
        assert await event_waits.waiting(conn, *keys, deployment="staging") == []
        assert set((await ledger_check.check(conn)).values()) == {0}
        checked = ordo("check", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "waits_no_deployment" in checked.stdout
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_the_timers_and_waits_of_before_011_are_adopted_with_its_partitions_by_the_first_deployment(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _two_waiting_executions_as_of_012(conn, [""])  # no deployment has started since 011
        await migrate(conn)
        assert await _deployments_of_waits(conn) == [("", "")]
        assert set((await ledger_check.check(conn)).values()) == {0}  # not lost: the first to start adopts them
        # As a worker starts (daemon/worker.py): its partitions, then the waits, if it is the only deployment.
        await leases.create_partitions(conn, "ordo", 4)
        await leases.create_partitions(conn, "staging", 4)
        for deployment in ("staging", "ordo"):
            await timers.adopt(conn, deployment)
            await event_waits.adopt(conn, deployment)
        assert await _deployments_of_waits(conn) == [("", "")]  # two deployments now: whose were they?
        assert (await ledger_check.check(conn))["waits_no_deployment"] == 4
        await conn.execute("DELETE FROM ordo.partitions WHERE deployment = 'staging'")
        await timers.adopt(conn, "ordo")
        await event_waits.adopt(conn, "ordo")
        assert await _deployments_of_waits(conn) == [("ordo", "ordo")]
        assert set((await ledger_check.check(conn)).values()) == {0}
    finally:
        await conn.close()


async def test_the_timers_and_waits_of_a_ledger_that_several_deployments_shared_are_counted_by_check(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _two_waiting_executions_as_of_012(conn, ["ordo", "staging"])
        await migrate(conn)
        assert await _deployments_of_waits(conn) == [("", "")]
        assert (await ledger_check.check(conn))["waits_no_deployment"] == 4
    finally:
        await conn.close()
