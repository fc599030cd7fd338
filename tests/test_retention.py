"""Day partitions of the ledger: made ahead, rescued from DEFAULT, dropped by retention, archived.

Retention runs on a test clock (`now` 30 days ahead): the day the executions
were enrolled is then 30 days old, and `--keep 14d` drops it. Nothing that is
still open may be lost to it: it is carried forward into the day of `now`,
with its history, and finishes there when its timer, its signal or its
action's result comes.
"""

import asyncio
import re
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from harness import NO_PROBLEMS, WAITER, WELCOME, Clock, Harness, engine, ordo

from bench.commit_paths import TriggerMessage
from bench.generator import trigger_event
from daemon import metrics
from daemon.config import Config
from daemon.export import export, read_archived
from daemon.inspect import inspect, render
from daemon.upkeep import ledger_day_s, retention_keep
from hotpath import ExecutionState
from ledger import partitioning, run_checks
from ledger.batcher import LedgerBatcher, Unit
from ledger.check import check
from ledger.executions import ExecutionRecord
from ledger.schema import migrate

DAY_MS = 86_400_000

SLEEPER = {
    "id": "sleeper",
    "tenant": "acme",
    "trigger": {"event": "sleeper.start"},
    "steps": [
        {"id": "nap", "type": "wait", "duration": "30d"},
        {"id": "woke", "type": "set", "values": {"woke": True}},
    ],
}


async def _days(db, table: str) -> dict[str, date | None]:
    return {p.name: p.low for p in await partitioning.partitions(db, table)}


async def _run_one(h: Harness, definition: dict, event_type: str, status: str) -> str:
    """Deploy `definition`, enrol one execution of it, and run a worker until it is `status`; its id."""
    await h.deploy(definition)
    event = trigger_event(definition["id"], 0, tenant="acme", event_type=event_type)
    execution_id = h.execution_id("acme", definition["id"], event["event_id"])
    async with h.worker():
        await h.publish_triggers([event])
        await h.wait_status(execution_id, status)
    return execution_id


async def _place(db, execution_id: str) -> tuple:
    """(the execution's partition, its day, the partitions of its history rows)."""
    row = await db.fetchrow(
        "SELECT tableoid::regclass::text, ledger_day FROM ordo.executions WHERE execution_id = $1::uuid", execution_id
    )
    history = await db.fetch(
        "SELECT DISTINCT tableoid::regclass::text FROM ordo.history WHERE execution_id = $1::uuid", execution_id
    )
    return row[0], row[1], sorted(r[0] for r in history)


async def test_an_execution_waiting_30_days_survives_retention_and_then_completes(nats_server_url, pg_dsn, prefix):
    clock = Clock()
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        for definition in (WELCOME, WAITER, SLEEPER):
            await h.deploy(definition)
        finished = [trigger_event("done", i, tenant="acme", event_type="contact.created") for i in range(20)]
        sleeper = trigger_event("sleep", 0, tenant="acme", event_type="sleeper.start")
        waiter = trigger_event("wait", 0, tenant="acme", event_type="session.started")
        sleeper_id = h.execution_id("acme", "sleeper", sleeper["event_id"])
        waiter_id = h.execution_id("acme", "waiter", waiter["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([*finished, sleeper, waiter])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=20)
            await h.wait_timer(sleeper_id, "wait")
            await h.wait_status(waiter_id, "waiting")
            enrolled_day = (await _place(h.db, sleeper_id))[1]
            before = {r[0]: r[1] for r in await h.db.fetch("SELECT execution_id::text, seq FROM ordo.transitions")}

            # Thirty days on, keeping 14: the day they were enrolled goes, what waits stays.
            now = datetime.now(UTC) + timedelta(days=30)
            done = await partitioning.retention(h.db, timedelta(days=14), now)

            later = now.date()
            assert set(done.dropped) >= {"executions_legacy", "history_legacy"}
            assert done.carried == 2
            for execution_id in (sleeper_id, waiter_id):
                assert await _place(h.db, execution_id) == (
                    f"ordo.executions_{later:%Y%m%d}",
                    later,
                    [f"ordo.history_{later:%Y%m%d}"],
                )
            assert await h.db.fetchval("SELECT count(*) FROM ordo.executions WHERE status = 'completed'") == 0
            assert await h.db.fetchval("SELECT count(*) FROM ordo.history") == 2
            assert all(p.low is None or p.low > enrolled_day for p in await partitioning.partitions(h.db, "history"))
            # Every transition of the open executions is still there.
            kept = {r[0] for r in await h.db.fetch("SELECT execution_id::text FROM ordo.transitions")}
            assert kept == {sleeper_id, waiter_id}

            # Their timer and their signal come: each finishes on the row in its new day.
            clock.advance(30 * DAY_MS)
            await h.wait_status(sleeper_id, "completed")
            await h.signal(waiter_id, "done")
            await h.wait_status(waiter_id, "completed")
        for execution_id in (sleeper_id, waiter_id):
            seqs = [
                r[0]
                for r in await h.db.fetch(
                    "SELECT seq FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq", execution_id
                )
            ]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > before[execution_id]
            assert (await _place(h.db, execution_id))[1] == later
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_action_result_held_in_memory_under_the_old_day_is_applied_again_on_the_moved_row(
    nats_server_url, pg_dsn, prefix, target
):
    """The worker keeps an execution in memory while its action runs (daemon/resident.py). Retention
    carries the execution forward meanwhile: the result's update, computed on the kept record, names
    the old day and finds no row there. It is refused as stale and applied again on the row read
    back from the ledger, in its new day."""
    workflow = {
        "id": "held",
        "tenant": "acme",
        "trigger": {"event": "held.go"},
        "steps": [
            {"id": "call", "type": "action", "action": "webhook", "timeout": "60s", "input": {"url": target.url("c")}},
            {"id": "after", "type": "set", "values": {"ok": True}},
        ],
    }
    gate = asyncio.Event()
    target.hold_first["c"] = gate
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow)
        event = trigger_event("held", 0, tenant="acme", event_type="held.go")
        execution_id = h.execution_id("acme", "held", event["event_id"])
        stale_before = metrics.stale_applied_again._value.get()
        async with h.worker() as worker:
            await h.publish_triggers([event])
            await h.wait_until(
                "SELECT waiting FROM ordo.executions WHERE execution_id = $1::uuid", execution_id, expect="action"
            )
            while not target.named("c"):
                await asyncio.sleep(0.02)
            assert len(worker.resident) == 1

            now = datetime.now(UTC) + timedelta(days=30)
            done = await partitioning.retention(h.db, timedelta(days=14), now)
            assert done.carried == 1
            gate.set()
            await h.wait_status(execution_id, "completed")
        assert metrics.stale_applied_again._value.get() - stale_before == 1
        assert len(target.named("c")) == 1
        assert await _place(h.db, execution_id) == (
            f"ordo.executions_{now.date():%Y%m%d}",
            now.date(),
            [f"ordo.history_{now.date():%Y%m%d}"],
        )
        kinds = [
            r[0]
            for r in await h.db.fetch(
                "SELECT kind FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq", execution_id
            )
        ]
        assert kinds == ["started", "action_requested", "action_completed", "set", "completed"]
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_workers_make_partitions_ahead_and_maintain_moves_rows_out_of_default(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        today = datetime.now(UTC).date()
        last = today + timedelta(days=partitioning.DAYS_AHEAD)
        for table in partitioning.TABLES:
            await h.db.execute(f"DROP TABLE ordo.{table}_{last:%Y%m%d}")
        # A row of a day nobody made a partition for: kept in DEFAULT, not refused.
        far = today + timedelta(days=40)
        await h.db.execute(
            """INSERT INTO ordo.executions (execution_id, tenant, workflow_id, workflow_version, subject_id, event_id,
                   partition, status, seq, pc, steps, waiting, last_stream_seq, context, subject, event, created_at,
                   ledger_day, finished_at)
               VALUES ('00000000-0000-0000-0000-000000000009', 'acme', 'w', 1, 'c', 'e', 0, 'completed', 1, 0, 0,
                   NULL, 0, '{}', '{}', '{}', now(), $1, now())""",
            far,
        )
        await h.db.execute(
            "INSERT INTO ordo.history (execution_id, first_seq, at, steps, ledger_day) "
            """VALUES ('00000000-0000-0000-0000-000000000009', 1, now(), '[["", "started"]]', $1)""",
            far,
        )
        assert await partitioning.default_rows(h.db) == {"executions": 1, "history": 1}

        async with h.worker():
            for table in partitioning.TABLES:
                name = f"{table}_{last:%Y%m%d}"
                await h.wait_until(
                    "SELECT count(*) FROM pg_class WHERE relname = $1 AND relnamespace = 'ordo'::regnamespace",
                    name,
                    expect=1,
                )
            await h.wait_until("SELECT count(*) FROM ordo.executions_default", expect=0)
        assert await partitioning.default_rows(h.db) == {"executions": 0, "history": 0}
        assert f"executions_{far:%Y%m%d}" in await _days(h.db, "executions")
        assert (
            await h.db.fetchval("SELECT tableoid::regclass::text FROM ordo.history WHERE ledger_day = $1", far)
            == f"ordo.history_{far:%Y%m%d}"
        )
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_export_archives_finished_executions_that_inspect_reads_back(nats_server_url, pg_dsn, prefix, tmp_path):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        events = [trigger_event("archive", i, tenant="acme", event_type="contact.created") for i in range(1500)]
        waiter = trigger_event("open", 0, tenant="acme", event_type="session.started")
        async with h.worker():
            await h.publish_triggers([*events, waiter])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=1500)
            await h.wait_status(h.execution_id("acme", "waiter", waiter["event_id"]), "waiting")
        out = str(tmp_path / "ledger.jsonl.gz")
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        # More than one page of them; the one still waiting is not archived.
        assert await export(h.db, tomorrow, out) == 1500
        assert await export(h.db, datetime.now(UTC).date() - timedelta(days=1), str(tmp_path / "none.jsonl.gz")) == 0
        for event in (events[0], events[-1]):
            execution_id = h.execution_id("acme", "welcome", event["event_id"])
            archived = read_archived(out, execution_id)
            assert archived == await inspect(h.db, execution_id)
            assert "completed" in render(archived)
        assert read_archived(out, h.execution_id("acme", "waiter", waiter["event_id"])) is None


async def test_retention_refuses_to_keep_less_than_a_day(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        try:
            await partitioning.retention(conn, timedelta(hours=12), datetime.now(UTC))
        except ValueError as exc:
            assert "at least one ledger day of history" in str(exc)
        else:
            raise AssertionError("retention kept 12 hours")
    finally:
        await conn.close()


async def test_the_ledger_commands_maintain_export_and_keep_what_is_recent(nats_server_url, pg_dsn, prefix, tmp_path):
    """`ordo ledger ...` as an operator runs it, on today's clock: nothing is old enough to drop."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        execution_id = await _run_one(h, WELCOME, "contact.created", "completed")
        env = {"ORDO_PG_DSN": pg_dsn}
        maintained = ordo("ledger", "maintain", "--ahead", "9", env_extra=env)
        assert maintained.returncode == 0, maintained.stderr
        ninth = datetime.now(UTC).date() + timedelta(days=9)
        assert f"executions_{ninth:%Y%m%d}" in maintained.stdout
        kept = ordo("ledger", "retention", "--keep", "14d", env_extra=env)
        assert kept.returncode == 0, kept.stderr
        assert "dropped: nothing" in kept.stdout
        too_short = ordo("ledger", "retention", "--keep", "2h", env_extra=env)
        assert too_short.returncode != 0 and "at least one ledger day (1d)" in too_short.stderr
        out = str(tmp_path / "archive.jsonl.gz")
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        exported = ordo("ledger", "export", "--before", tomorrow.isoformat(), "--out", out, env_extra=env)
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.startswith("1 finished execution(s)")
        shown = ordo("inspect", execution_id, "--from-file", out)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == render(await inspect(h.db, execution_id)) + "\n"
        assert await h.db.fetchval("SELECT count(*) FROM ordo.executions") == 1


async def test_a_trigger_published_again_the_next_day_enrols_nobody_twice(pg_dsn):
    """Past JetStream's duplicate window a publisher's retry is a new message; after midnight UTC its
    day, the partition key, is the next one, and the primary key (execution_id, ledger_day) cannot
    see the first enrolment. The commit looks for it in the day before and counts the retry a duplicate."""
    conn = await asyncpg.connect(pg_dsn)
    batcher = LedgerBatcher(pg_dsn, max_rows=1000, max_ms=0)
    try:
        await migrate(conn)
        execution_id = "00000000-0000-0000-0000-00000000000a"
        today = datetime.now(UTC).date()
        results = []
        for seq, day in ((1, today), (2, today + timedelta(days=1))):
            # Published first a minute before midnight UTC, and again a few minutes after it.
            event = {"event_id": "e", "ts": f"{today.isoformat()}T23:59:00Z"}
            state = ExecutionState(execution_id, subject={"id": "c"}, event=event, tenant="acme")
            record = ExecutionRecord(
                execution_id, "acme", "w", 1, "c", "e", 0, datetime.now(UTC), 0, state, ledger_day=day
            )
            state.status, state.seq = "completed", 2  # as the dispatcher leaves a one-commit execution
            change = record.change([(1, "", "started", None), (2, "", "completed", None)], datetime.now(UTC))
            committed = await batcher.commit([Unit(TriggerMessage(seq), [change])], {}, {})
            results.append((committed.accepted, change.duplicate))
        assert results == [({execution_id}, False), (set(), True)]
        assert await conn.fetchval("SELECT count(*) FROM ordo.executions") == 1
        assert await conn.fetchval("SELECT ledger_day FROM ordo.history") == today
        assert set((await check(conn)).values()) == {0}
    finally:
        await batcher.close()
        await conn.close()


async def test_workers_with_retention_keep_drop_old_days_and_keep_what_waits(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        waiter = trigger_event("kept", 0, tenant="acme", event_type="session.started")
        waiter_id = h.execution_id("acme", "waiter", waiter["event_id"])
        async with h.worker():
            await h.publish_triggers(
                [trigger_event("gone", i, tenant="acme", event_type="contact.created") for i in range(5)]
            )
            await h.publish_triggers([waiter])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=5)
            await h.wait_status(waiter_id, "waiting")
        # A month later, by the workers' clock: their upkeep applies retention_keep at start-up.
        clock = Clock()
        clock.advance(30 * DAY_MS)
        later = datetime.fromtimestamp(clock() / 1000, tz=UTC).date()
        async with h.worker(clock_ms=clock, retention_keep="14d"):
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=0)
            assert (await _place(h.db, waiter_id))[1:] == (later, [f"ordo.history_{later:%Y%m%d}"])
            await h.signal(waiter_id, "done")
            await h.wait_status(waiter_id, "completed")
        assert await h.ledger_problems() == NO_PROBLEMS


def test_a_bad_retention_keep_is_an_error_that_names_it():
    for value, message in (
        ("2h", "at least one ledger day (1d)"),
        ("fortnight", "retention_keep: 'fortnight' is not a duration"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            retention_keep(Config(retention_keep=value))
    assert retention_keep(Config(retention_keep="14d")) == timedelta(days=14)
    assert retention_keep(Config()) is None


def test_a_bad_ledger_day_is_an_error_that_names_it():
    """The setting is parsed in daemon/upkeep.py; its range is the ledger's (partitioning.checked_day_length)."""
    for value, message in (
        ("30s", "ledger_day must be between 1m and 1d, not '30s'"),
        ("2d", "ledger_day must be between 1m and 1d, not '2d'"),
        # Said to the millisecond, as given: not in whole seconds (250ms was '0s', and 1d1ms passed as 1d).
        ("250ms", "ledger_day must be between 1m and 1d, not '250ms'"),
        ("59999ms", "ledger_day must be between 1m and 1d, not '59s999ms'"),
        ("86400001ms", "ledger_day must be between 1m and 1d, not '1d1ms'"),
        ("fortnight", "ledger_day: 'fortnight' is not a duration"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ledger_day_s(Config(ledger_day=value))
    assert ledger_day_s(Config(ledger_day="1m")) == 60
    assert ledger_day_s(Config()) == partitioning.DAY_S


def test_only_a_trigger_from_around_midnight_is_looked_for_on_the_day_before():
    day = date(2026, 12, 6)
    noon = datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert not partitioning.may_be_enrolled_the_day_before(day, noon.timestamp() * 1000)
    assert not partitioning.may_be_enrolled_the_day_before(day, "2026-12-06T01:00:01Z")
    assert partitioning.may_be_enrolled_the_day_before(day, "2026-12-06T00:59:00Z")  # a publisher's clock ahead
    assert partitioning.may_be_enrolled_the_day_before(day, int((noon - timedelta(days=1)).timestamp() * 1000))
    assert partitioning.may_be_enrolled_the_day_before(day, "yesterday")
    assert partitioning.may_be_enrolled_the_day_before(day, None)


def test_short_ledger_days_cut_time_into_consecutive_dates():
    """A soak's one-minute ledger days: every instant in exactly one day, days in order, each a minute."""
    try:
        partitioning.use_day_length(60)
        noon = datetime(2026, 12, 6, 12, 0, 30, tzinfo=UTC)
        day = partitioning.day_at(noon)
        assert partitioning.day_of(int(noon.timestamp()) * 1_000_000_000) == day
        assert partitioning.start_of(day) == datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
        assert partitioning.day_at(noon + timedelta(seconds=30)) == day + timedelta(days=1)
        assert partitioning.days_per_real_day() == 1440
        # The publisher's skew shrinks with the day: only a trigger from its first 2.5 s is looked for.
        assert partitioning.may_be_enrolled_the_day_before(day, "2026-12-06T12:00:02Z")
        assert not partitioning.may_be_enrolled_the_day_before(day, "2026-12-06T12:00:03Z")
        for seconds in (59, 86_401):
            try:
                partitioning.use_day_length(seconds)
            except ValueError as exc:
                assert "between 1m and 1d" in str(exc)
            else:
                raise AssertionError(f"a ledger day of {seconds} s was taken")
    finally:
        partitioning.use_day_length(partitioning.DAY_S)
    assert partitioning.day_at(noon) == date(2026, 12, 6)


async def test_with_one_minute_days_retention_drops_minutes_and_keeps_what_waits(nats_server_url, pg_dsn, prefix):
    """What a soak relies on: with `ledger_day = "1m"` and a keep of minutes, the finished executions'
    minutes are dropped (and counted), while a waiting execution is carried forward and finishes."""
    assert retention_keep(Config(ledger_day="1m", retention_keep="5m")) == timedelta(minutes=5)
    try:
        async with Harness(nats_server_url, pg_dsn, prefix) as h:
            for definition in (WELCOME, WAITER):
                await h.deploy(definition)
            finished = [trigger_event("done", i, tenant="acme", event_type="contact.created") for i in range(20)]
            waiter = trigger_event("wait", 0, tenant="acme", event_type="session.started")
            waiter_id = h.execution_id("acme", "waiter", waiter["event_id"])
            async with h.worker(ledger_day="1m"):
                await h.publish_triggers([*finished, waiter])
                await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=20)
                await h.wait_status(waiter_id, "waiting")
                enrolled = (await _place(h.db, waiter_id))[1]
                assert enrolled == partitioning.day_at(datetime.now(UTC)) or enrolled > date(3000, 1, 1)

                now = datetime.now(UTC) + timedelta(minutes=10)
                done = await partitioning.retention(h.db, timedelta(minutes=5), now)

                today = partitioning.day_at(now)
                assert done.dropped_executions == 20
                assert (await run_checks.retained_run(h.db))["dropped"] == 20
                assert done.carried == 1
                assert await _place(h.db, waiter_id) == (
                    f"ordo.executions_{today:%Y%m%d}",
                    today,
                    [f"ordo.history_{today:%Y%m%d}"],
                )
                assert all(p.low is None or p.low > enrolled for p in await partitioning.partitions(h.db, "executions"))
                await h.signal(waiter_id, "done")
                await h.wait_status(waiter_id, "completed")
            assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
            assert await h.ledger_problems() == NO_PROBLEMS
    finally:
        partitioning.use_day_length(partitioning.DAY_S)


async def test_a_carry_skips_an_execution_a_commit_is_changing_instead_of_waiting_for_it(
    nats_server_url, pg_dsn, prefix
):
    """Retention's carry takes the executions it can lock at once: one whose row a commit holds is left
    for a later pass (never waited for: a carry that waits for a commit while the commit waits for the
    carry is the deadlock a 30-minute soak met). Once the commit is done, it is carried."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        waiter_id = await _run_one(h, WAITER, "session.started", "waiting")
        part, day, (history,) = await _place(h.db, waiter_id)
        today = day + timedelta(days=3)
        await partitioning.maintain(h.db, today, ahead=0)
        uid = await h.db.fetchval("SELECT execution_id FROM ordo.executions WHERE execution_id = $1::uuid", waiter_id)
        committer = await asyncpg.connect(pg_dsn)
        try:
            commit = committer.transaction()
            await commit.start()
            await committer.execute("SELECT 1 FROM ordo.executions WHERE execution_id = $1::uuid FOR UPDATE", waiter_id)
            async with h.db.transaction():
                moved, rows = await asyncio.wait_for(
                    partitioning._carry(
                        h.db, part.split(".")[1], history.split(".")[1], [uid], partitioning._OPEN, today
                    ),
                    30,
                )
            assert (moved, rows) == (set(), 0)
            assert (await _place(h.db, waiter_id))[1] == day
            await commit.rollback()
        finally:
            await committer.close()
        async with h.db.transaction():
            moved, rows = await partitioning._carry(
                h.db, part.split(".")[1], history.split(".")[1], [uid], partitioning._OPEN, today
            )
        assert moved == {uid} and rows > 0
        assert await _place(h.db, waiter_id) == (
            f"ordo.executions_{today:%Y%m%d}",
            today,
            [f"ordo.history_{today:%Y%m%d}"],
        )


async def test_a_commit_rolled_back_by_a_deadlock_is_committed_again_not_dead_lettered(nats_server_url, pg_dsn, prefix):
    """Postgres rolls back one of two deadlocked transactions; when that is a worker's commit, nothing is
    wrong with its messages: the whole commit is tried again (not split up as if a message were poison,
    and no message dead-lettered). A trigger here rolls back the first three enrolling transactions with
    the deadlock's own error code."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.db.execute(
            """CREATE SEQUENCE ordo.test_conflicts;
               CREATE FUNCTION ordo.test_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF nextval('ordo.test_conflicts') <= 3 THEN  -- a sequence is not rolled back
                       RAISE EXCEPTION 'deadlock detected (a test)' USING ERRCODE = '40P01';
                   END IF;
                   RETURN NEW;
               END $$;
               CREATE TRIGGER test_conflict BEFORE INSERT ON ordo.executions
                   FOR EACH ROW EXECUTE FUNCTION ordo.test_conflict();"""
        )
        events = [trigger_event("c", i, tenant="acme", event_type="contact.created") for i in range(5)]
        async with h.worker():
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=5)
        assert await h.db.fetchval("SELECT last_value FROM ordo.test_conflicts") > 3
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
        assert await h.ledger_problems() == NO_PROBLEMS
