"""Migration 016's compact writes: what an execution that ends in its enrolling commit writes, and
that every reader (`ordo inspect`, `replay`, `check`, `execution show`, export) sees it whole.

An execution enrolled and ended in one commit keeps its transitions in its own row
(`enrolment_steps`) instead of a row of ordo.history; every new execution's stored event leaves
out the tenant and event id its row's columns hold; the by-workflow index holds no completed
execution. A ledger written before 016 migrates forward, reads as it did, and runs on.
"""

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from harness import NO_PROBLEMS, WAITER, WELCOME, Harness, ordo

from bench.generator import trigger_event
from daemon import replay as replaying
from daemon.export import export, read_archived
from daemon.inspect import inspect, render
from daemon.topology import partition_of
from ledger import console, history, rollouts
from ledger.schema import migrate, migrations


async def _ledger_before_016(conn: asyncpg.Connection) -> None:
    """The schema as it was when 016 was written (001..015 and 018), recorded as applied."""
    await conn.execute(
        "CREATE SCHEMA ordo; CREATE TABLE ordo.schema_migrations (version int PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, name, sql in migrations():
        if version < 16 or version == 18:
            await conn.execute(sql)
            await conn.execute("INSERT INTO ordo.schema_migrations (version, name) VALUES ($1, $2)", version, name)


_ROW_BEFORE_016 = """
INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, subject_type, subject_id, event_id,
    partition, status, seq, pc, steps, waiting, last_stream_seq, context, subject, event, created_at, updated_at,
    finished_at, runtime, ledger_day)
VALUES ($1::uuid, 'acme', $2, 1, 'contact', $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, NULL, $12, $13, $13,
    $14, $15, ($13 AT TIME ZONE 'UTC')::date)
"""
_HISTORY_BEFORE_016 = """
INSERT INTO ordo.history (execution_id, first_seq, at, source_seq, steps, ledger_day)
VALUES ($1::uuid, 1, $2, NULL, $3, ($2 AT TIME ZONE 'UTC')::date)
"""


async def _write_as_before_016(conn: asyncpg.Connection, h: Harness, event: dict, workflow: str) -> str:
    """An execution as the engine wrote it under migration 015, for `event` into WELCOME (ended in
    one commit: a history row, the whole event) or WAITER (waiting for its signal)."""
    execution_id = h.execution_id("acme", workflow, event["event_id"])
    at = datetime.now(UTC)
    if workflow == "welcome":
        state = ("completed", 5, 4, 4, None, '{"locale": "de", "greeting": "Hi Ada"}', at, "{}")
        steps = [
            ["", "started", {"workflow_id": "welcome", "version": 1}],
            ["greet", "set"],
            ["by-country", "branch", {"to": "german", "taken": "then"}],
            ["german", "set"],
            ["done", "completed"],
        ]
    else:
        state = ("waiting", 2, 0, 1, "done", "{}", None, '{"visits": {"wait": 1}}')
        steps = [["", "started", {"workflow_id": "waiter", "version": 1}], ["wait", "waiting", {"signal": "done"}]]
    status, seq, pc, count, waiting, context, finished_at, runtime = state
    partition = partition_of(execution_id, h.config.partitions)
    await conn.execute(
        _ROW_BEFORE_016,
        execution_id,
        workflow,
        event["contact"]["id"],
        event["event_id"],
        partition,
        status,
        seq,
        pc,
        count,
        waiting,
        context,
        orjson.dumps(event).decode(),
        at,
        finished_at,
        runtime,
    )
    await conn.execute(_HISTORY_BEFORE_016, execution_id, at, orjson.dumps(steps).decode())
    return execution_id


async def _transitions(db, execution_id: str) -> list[tuple]:
    return [tuple(r) for r in await history.transitions(db, execution_id)]


async def test_a_ledger_written_before_016_migrates_forward_reads_as_before_and_runs_on(
    nats_server_url, pg_dsn, prefix
):
    h = Harness(nats_server_url, pg_dsn, prefix)  # its ids and partitions, before it migrates anything
    conn = await asyncpg.connect(pg_dsn)
    try:
        await _ledger_before_016(conn)
        await conn.execute("INSERT INTO ordo.tenants (tenant) VALUES ('acme')")
        ended = trigger_event("old-done", 0, tenant="acme", event_type="contact.created")
        open_ = trigger_event("old-open", 0, tenant="acme", event_type="session.started")
        ended_id = await _write_as_before_016(conn, h, ended, "welcome")
        open_id = await _write_as_before_016(conn, h, open_, "waiter")
        before = {eid: await _transitions(conn, eid) for eid in (ended_id, open_id)}
        shown_before = await history.execution_as_stored(conn, ended_id)
    finally:
        await conn.close()

    migrated = ordo("migrate", env_extra={"ORDO_PG_DSN": pg_dsn})
    assert migrated.returncode == 0, migrated.stderr
    assert "016_compact_ledger.sql" in migrated.stdout

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        # What 015 wrote reads back as it was: its history rows, its whole event.
        for execution_id, transitions in before.items():
            assert await _transitions(h.db, execution_id) == transitions
        shown = await history.execution_as_stored(h.db, ended_id)
        assert {key: shown[key] for key in shown_before.keys()} == dict(shown_before)
        assert shown["enrolment_steps"] is None
        assert orjson.loads((await history.trigger_and_state(h.db, ended_id))["event"]) == ended
        old = await replaying.replay(h.db, ended_id)
        assert old.outcome == "identical", replaying.render(old)

        # ...and the engine runs on: the waiting one finishes (its history goes on from seq 3), a new
        # one ends in its enrolling commit and is written the new way.
        new = trigger_event("new-done", 0, tenant="acme", event_type="contact.created")
        new_id = h.execution_id("acme", "welcome", new["event_id"])
        async with h.worker():
            await h.signal(open_id, "done", {})
            await h.publish_triggers([new])
            await h.wait_status(open_id, "completed")
            await h.wait_status(new_id, "completed")
        assert [t[0] for t in await _transitions(h.db, open_id)] == [1, 2, 3, 4, 5]
        assert await h.db.fetchval("SELECT count(*) FROM ordo.history WHERE execution_id = $1::uuid", new_id) == 0
        # The new one reads like the old one of the same workflow and event shape, bar ids and times.
        old_doc, new_doc = await inspect(h.db, ended_id), await inspect(h.db, new_id)
        steps = [(t["seq"], t["step"], t["kind"], t["detail"]) for t in old_doc["transitions"]]
        assert [(t["seq"], t["step"], t["kind"], t["detail"]) for t in new_doc["transitions"]] == steps

        checked = ordo("check", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_execution_that_ends_where_it_enrols_writes_one_row_that_every_reader_reads_whole(
    nats_server_url, pg_dsn, prefix, tmp_path
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        ended = trigger_event("one-commit", 0, tenant="acme", event_type="contact.created")
        waits = trigger_event("two-commits", 0, tenant="acme", event_type="session.started")
        ended_id = h.execution_id("acme", "welcome", ended["event_id"])
        waits_id = h.execution_id("acme", "waiter", waits["event_id"])
        async with h.worker():
            await h.publish_triggers([ended, waits])
            await h.wait_status(ended_id, "completed")
            await h.wait_status(waits_id, "waiting")

            # Ended in its enrolling commit: its row holds the steps, ordo.history nothing.
            row = await h.db.fetchrow(
                "SELECT enrolment_steps, event, created_at FROM ordo.executions WHERE execution_id = $1::uuid",
                ended_id,
            )
            assert orjson.loads(row["enrolment_steps"])[0] == ["", "started"]
            assert await h.db.fetchval("SELECT count(*) FROM ordo.history WHERE execution_id = $1::uuid", ended_id) == 0
            # Still waiting: its enrolment is a history row, as before, and its row holds no steps.
            waiting = await h.db.fetchrow(
                "SELECT enrolment_steps, (SELECT count(*) FROM ordo.history WHERE execution_id = $1::uuid) AS rows "
                "FROM ordo.executions WHERE execution_id = $1::uuid",
                waits_id,
            )
            assert (waiting["enrolment_steps"], waiting["rows"]) == (None, 1)
            # Both events leave out what the row's columns hold.
            for execution_id in (ended_id, waits_id):
                stored = orjson.loads(
                    await h.db.fetchval("SELECT event FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
                )
                assert "tenant" not in stored and "event_id" not in stored and stored["contact"]
            # The waiting one's event is whole again when the engine loads it for its signal.
            await h.signal(waits_id, "done", {})
            await h.wait_status(waits_id, "completed")

        # ordo.transitions: the started detail named, the commit's time, no stream sequence.
        transitions = await history.transitions(h.db, ended_id)
        assert [(t["seq"], t["kind"]) for t in transitions] == [
            (1, "started"),
            (2, "set"),
            (3, "branch"),
            (4, "set"),
            (5, "completed"),
        ]
        assert orjson.loads(transitions[0]["detail"]) == {"workflow_id": "welcome", "version": 1}
        assert {t["at"] for t in transitions} == {row["created_at"]}
        assert {t["source_seq"] for t in transitions} == {None}
        # The trigger event as it was published, to replay and to `ordo execution show`.
        assert orjson.loads((await history.trigger_and_state(h.db, ended_id))["event"]) == ended
        shown = ordo("execution", "show", ended_id, "--json", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert shown.returncode == 0, shown.stderr
        assert orjson.loads(orjson.loads(shown.stdout)["event"]) == ended
        for execution_id in (ended_id, waits_id):
            replayed = await replaying.replay(h.db, execution_id)
            assert replayed.outcome == "identical", replaying.render(replayed)
        # The archive holds what inspect shows, wherever the transitions were stored.
        out = str(tmp_path / "ledger.jsonl.gz")
        assert await export(h.db, datetime.now(UTC).date() + timedelta(days=1), out) == 2
        for execution_id in (ended_id, waits_id):
            doc = await inspect(h.db, execution_id)
            assert read_archived(out, execution_id) == doc
            assert "completed" in render(doc)
        assert await h.ledger_problems() == NO_PROBLEMS


def _rows_read(node: dict) -> int:
    """Rows the scans of a plan (EXPLAIN ANALYZE, JSON) read from ordo.executions: returned or filtered out."""
    read = 0
    if node.get("Relation Name", "").startswith("executions"):
        read += (
            node["Actual Rows"] + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        )
    return read + sum(_rows_read(child) for child in node.get("Plans", []))


async def _read_by(conn: asyncpg.Connection, sql: str, *args) -> int:
    plan = orjson.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args))
    return _rows_read(plan[0]["Plan"])


async def test_open_and_failed_executions_of_a_workflow_are_read_on_an_index_that_holds_no_completed_ones(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        # 1 in 97 failed, 1 in 11 waiting, the rest completed (ledger/console.py).
        start = datetime.now(UTC) - timedelta(hours=1)
        await console.add_synthetic_executions(conn, 0, 20_000, 20, 50, start, 0.1)
        await conn.execute("VACUUM ANALYZE ordo.executions")
        entries = await conn.fetchval(
            "SELECT sum(c.reltuples) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'ordo.executions_by_workflow'::regclass"
        )
        assert entries == await conn.fetchval("SELECT count(*) FROM ordo.executions WHERE status <> 'completed'")
        # What reads a workflow's open or failed executions reads none of its completed ones.
        key = ("tenant-3", "workflow-3")
        not_completed = await conn.fetchval(
            "SELECT count(*) FROM ordo.executions WHERE (tenant, workflow_id) = ($1, $2) AND status <> 'completed'",
            *key,
        )
        assert 0 < sum(r["waiting"] for r in (await console.open_per_version(conn, *key)).values()) < not_completed
        assert await _read_by(conn, console._OPEN_PER_VERSION, *key) <= not_completed
        assert len(await rollouts.failed_executions(conn, *key, 1, start, 1000)) > 0
        failed = (
            "SELECT execution_id FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2"
            " AND workflow_version = 1 AND created_at >= $3 AND status = 'failed'"
        )
        assert await _read_by(conn, failed, *key, start) <= not_completed
    finally:
        await conn.close()
