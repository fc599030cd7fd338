"""Break the servers under load: restart nats-server, restart (and crash) Postgres,
terminate the ledger's backends mid-COPY, and a seeded soak of all of them plus
kill -9 of workers. Each test ends with the ledger's invariants and an exact
check that every expected execution exists once, completed, with its signals in
publish order.

The servers that get restarted are the test's OWN (EmbeddedNats / EmbeddedPostgres
in tmp_path), never the session's. Counts and durations are CI-sized; run the full
ones with ``ORDO_FAULT_SCALE=full pytest -n 0 tests/test_chaos.py -s`` (the soak then runs
for 5 minutes; `-s` shows the numbers each test prints).
"""

import asyncio
import random
import time
import uuid
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
import pytest
from harness import (
    LOADED,
    NO_PROBLEMS,
    QUICK_LEASES,
    WAITER,
    Fleet,
    Harness,
    Load,
    PostgresRelay,
    fault_scale,
    welcome_workflow,
    with_host,
)

from bench.commit_paths import TriggerMessage, finished_enrolment
from bench.generator import trigger_event
from daemon.lanes import lane_of
from daemon.servers import EmbeddedNats, EmbeddedPostgres
from ledger.batcher import EXEC_COLUMNS, ExecutionChange, LedgerBatcher, Unit
from ledger.connection import when_lost
from ledger.schema import migrate


@asynccontextmanager
async def _own_nats(tmp_path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def _own_postgres(tmp_path):
    server = EmbeddedPostgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute('CREATE DATABASE "ordo_chaos"')
        finally:
            await conn.close()
        yield server, server.dsn.rsplit("/", 1)[0] + "/ordo_chaos"
    finally:
        await asyncio.to_thread(server.stop)


async def _wait_for(load: Load, fleet: Fleet | None, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while await load.completed() < at_least:
        assert time.monotonic() < deadline, f"no progress to {at_least}"
        if fleet is not None:
            fleet.respawn_exited()
        await asyncio.sleep(0.05)


# -- 1. nats-server restarts ----------------------------------------------------------


async def test_nats_server_restarts_under_load_lose_and_duplicate_nothing(tmp_path, pg_dsn, prefix):
    restarts = fault_scale(ci=2, full=10)
    welcome = fault_scale(ci=3000, full=20000)
    async with _own_nats(tmp_path) as server:
        async with Harness(server.url, pg_dsn, prefix, **LOADED) as h:
            load = Load(h, "nrs", welcome, waiters=20)
            await load.prepare()
            await load.publish()
            fleet = Fleet(h, 2)
            fleet.start()
            started = time.monotonic()
            try:
                for k in range(restarts):
                    await _wait_for(load, fleet, len(load.waiter_events) + (k + 1) * welcome // (restarts + 1))
                    # stop + start on the same port and store (JetStream file store, fsync always)
                    await asyncio.to_thread(server.restart)
                finished = await load.wait_completed(fleet)
            finally:
                fleet.stop()
            numbers = await load.verify()
        print(
            f"nats restarts: {restarts} survived, worker exits {fleet.exits}, {numbers}, "
            f"{numbers['executions'] / (finished - started):.0f} executions/s"
        )
        assert fleet.exits == [], f"workers exited on a NATS restart: {fleet.exits}"


async def test_consumers_a_nats_restart_lost_resume_after_the_ledgers_floor_and_watermark(tmp_path, pg_dsn, prefix):
    """Lane and partition consumers keep their state in memory, so a nats-server restart loses
    them. With the worker restarted too, nothing in memory says where a lane had settled: its
    new consumer resumes after the floor the worker recorded in the ledger, not from the
    stream's start. With the worker running through the restart, it creates its consumers
    again. Every trigger and signal, before and after, is applied once."""
    from daemon import metrics

    def created_again(kind: str) -> float:
        return metrics.consumers_created_again.labels(kind)._value.get()

    async with _own_nats(tmp_path) as server:
        async with Harness(server.url, pg_dsn, prefix) as h:
            await h.deploy(welcome_workflow("acme"))
            await h.deploy(WAITER)
            lane = lane_of("acme", h.topology.lanes)
            stream = h.topology.trigger_stream_of(lane)
            await h.publish_triggers([trigger_event("before", i, tenant="acme") for i in range(50)])
            last = (await h.js.stream_info(stream)).state.last_seq
            async with h.worker(**QUICK_LEASES) as worker:
                await h.wait_until("SELECT count(*) FROM ordo.executions", expect=50)
                consumer = worker.intake.lanes.running[lane].consumer.consumer
                assert (await h.js.consumer_info(stream, consumer)).config.mem_storage
                await h.wait_until(
                    "SELECT settled FROM ordo.lane_floors WHERE deployment = $1 AND lane = $2",
                    h.topology.prefix,
                    lane,
                    expect=last,
                )
            await asyncio.to_thread(server.restart)
            for name in [stream, h.topology.exec_stream]:
                assert not await h.js.consumers_info(name)  # in memory: gone with the server

            await h.publish_triggers([trigger_event("after", i, tenant="acme") for i in range(50)])
            async with h.worker(**QUICK_LEASES) as worker:
                await h.wait_until("SELECT count(*) FROM ordo.executions", expect=100)
                consumer = worker.intake.lanes.running[lane].consumer.consumer
                assert (await h.js.consumer_info(stream, consumer)).config.opt_start_seq == last + 1
                waiters = [trigger_event("w", i, tenant="acme", event_type="session.started") for i in range(5)]
                await h.publish_triggers(waiters)
                await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=5)
                lanes_before, partitions_before = created_again("lane"), created_again("partition")
                await asyncio.to_thread(server.restart)  # the worker runs on through it
                for event in waiters:
                    await h.signal(h.execution_id("acme", "waiter", event["event_id"]), "done")
                await h.publish_triggers([trigger_event("later", i, tenant="acme") for i in range(10)])
                await h.wait_until(
                    "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=115, timeout=60
                )
                assert created_again("lane") > lanes_before and created_again("partition") > partitions_before
                assert worker.fatal is None
            assert await h.db.fetchval("SELECT count(DISTINCT event_id) FROM ordo.executions") == 115
            assert await h.ledger_problems() == NO_PROBLEMS


# -- 2. Postgres restarts and crashes -------------------------------------------------


async def test_postgres_restart_and_crash_under_load_lose_and_duplicate_nothing(tmp_path, prefix, nats_server_url):
    welcome = fault_scale(ci=3000, full=20000)
    async with _own_postgres(tmp_path) as (server, dsn):
        async with Harness(nats_server_url, dsn, prefix, **LOADED) as h:
            load = Load(h, "prs", welcome, waiters=20)
            await load.prepare()
            await load.publish()
            fleet = Fleet(h, 2)
            fleet.start()
            started = time.monotonic()
            faults = []
            try:
                await _wait_for(load, fleet, len(load.waiter_events) + welcome // 3)
                await asyncio.to_thread(server.restart)  # fast shutdown, start on the same port and cluster
                faults.append("restart")
                await _wait_for(load, fleet, len(load.waiter_events) + 2 * welcome // 3, timeout=90)
                await asyncio.to_thread(server.kill)  # SIGKILL: crash recovery from the WAL
                await asyncio.sleep(0.5)
                await asyncio.to_thread(server.start)
                faults.append("kill -9 + start")
                finished = await load.wait_completed(fleet)
            finally:
                fleet.stop()
            numbers = await load.verify()
        print(
            f"postgres faults: {faults} survived; worker exits (respawned by the test): {fleet.exits}; "
            f"{numbers}, {numbers['executions'] / (finished - started):.0f} executions/s"
        )


# -- 3. pg_terminate_backend during COPY ------------------------------------------------


async def _terminate(killer: asyncpg.Connection, database: str, keep: list[int], *, copy_only: bool) -> int:
    condition = "query ILIKE 'COPY%' AND state = 'active'" if copy_only else "true"
    return await killer.fetchval(
        f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 "
        f"AND pid <> ALL($2::int[]) AND {condition}",
        database,
        keep,
    )


async def test_terminating_the_ledger_backends_during_copy_commits_all_or_nothing(
    nats_server_url, pg_dsn, prefix, pg_server_dsn
):
    seconds = fault_scale(ci=5, full=60)
    welcome = fault_scale(ci=4000, full=40000)
    database = pg_dsn.rsplit("/", 1)[1]
    async with Harness(nats_server_url, pg_dsn, prefix, **LOADED) as h:
        load = Load(h, "term", welcome, waiters=20)
        await load.prepare()
        killer = await asyncpg.connect(pg_server_dsn)
        fleet = Fleet(h, 2)
        fleet.start()
        # The load keeps coming for the whole window, so that there are COPYs to hit.
        publisher = asyncio.create_task(load.publish(over_s=seconds))
        started = time.monotonic()
        copies = everything = 0
        try:
            await _wait_for(load, fleet, len(load.waiter_events) + 100)
            keep = [h.db.get_server_pid(), killer.get_server_pid()]
            rounds = 0
            while time.monotonic() - started < seconds:
                rounds += 1
                copies += await _terminate(killer, database, keep, copy_only=True)
                if rounds % 20 == 0:  # every ~1 s: every backend of the workers (pools, listeners too)
                    everything += await _terminate(killer, database, keep, copy_only=False)
                fleet.respawn_exited()
                await asyncio.sleep(0.05)  # COPYs of small batches are short: look often
            await publisher
            finished = await load.wait_completed(fleet)
        finally:
            publisher.cancel()
            fleet.stop()
            await killer.close()
        numbers = await load.verify()
    print(
        f"pg_terminate_backend: {copies} COPY backends and {everything} other worker backends terminated "
        f"in {seconds}s; worker exits (respawned by the test): {fleet.exits}; {numbers}; "
        f"{numbers['executions'] / (finished - started):.0f} executions/s"
    )
    assert copies + everything > 0, "no backend was terminated: the test did not test anything"


def _finished_enrolment(n: int, pad: str, *, effect: bool = False) -> ExecutionChange:
    """bench.commit_paths' enrolment that ends in its first commit (a lone COPY's; with `effect`, a
    transaction's), its context padded with `pad`, its id the same for the same `n` (a delivery again)."""
    return finished_enrolment(n, effect=effect, context={"pad": pad}, execution_id=str(uuid.UUID(int=n + 1)))


def _units(changes: list[ExecutionChange]) -> list[Unit]:
    return [Unit(TriggerMessage(n), [c]) for n, c in enumerate(changes)]


async def test_enrolments_that_need_only_their_rows_commit_as_one_copy_outside_a_transaction(pg_dsn):
    """A batch of enrolments that end in their first commit and ask for nothing else is one COPY in
    autocommit (no BEGIN, txid_current() or COMMIT); one that asks for more is a transaction. Both
    commit every execution once, and a batch delivered again commits none of them twice."""
    db = await asyncpg.connect(pg_dsn)
    batcher = LedgerBatcher(pg_dsn, max_rows=100_000, max_ms=0)
    in_transaction: list[bool] = []

    def look(phase: str) -> None:
        if phase == "before_commit":
            assert batcher._conn is not None
            in_transaction.append(batcher._conn.is_in_transaction())

    batcher.fault_hook = look
    try:
        await migrate(db)
        alone = [_finished_enrolment(n, "") for n in range(10)]
        result = await batcher.commit(_units(alone), {}, {})
        assert result.accepted == {c.execution_id for c in alone} and in_transaction == [False]

        again = [_finished_enrolment(n, "") for n in range(10)]  # the same triggers, delivered again
        result = await batcher.commit(_units(again), {}, {})
        assert result.accepted == set() and all(c.duplicate for c in again)
        assert in_transaction[1:] == [False, True]  # the COPY refused on the key, then the merge

        effects = [_finished_enrolment(n, "", effect=n == 10) for n in range(10, 20)]  # one asks for more
        result = await batcher.commit(_units(effects), {}, {})
        assert result.accepted == {c.execution_id for c in effects} and in_transaction[3:] == [True]
        assert await db.fetchval("SELECT count(*) FROM ordo.executions") == 20
    finally:
        await batcher.close()
        await db.close()


async def test_a_lone_copy_whose_answer_is_lost_after_it_committed_keeps_its_result(pg_dsn):
    """The lone COPY committed, but the worker saw an error: the retry finds all its rows and keeps its
    result. Committed again, each enrolment would be refused as a duplicate and not counted as enrolled."""
    db = await asyncpg.connect(pg_dsn)
    batcher = LedgerBatcher(pg_dsn, max_rows=100_000, max_ms=0)
    failed: list[str] = []

    def answer_lost(phase: str) -> None:
        if phase == "after_commit" and not failed:
            failed.append(phase)
            raise TimeoutError("injected: the COPY's answer was lost")

    batcher.fault_hook = answer_lost
    try:
        await migrate(db)
        changes = [_finished_enrolment(n, "") for n in range(10)]
        result = await batcher.commit(_units(changes), {}, {})
        assert failed and result.attempts == 2
        assert result.accepted == {c.execution_id for c in changes}
        assert not any(c.duplicate for c in changes)
        assert await db.fetchval("SELECT count(*) FROM ordo.executions") == len(changes)
    finally:
        await batcher.close()
        await db.close()


@pytest.mark.parametrize("effect", [False, True], ids=["lone COPY", "in a transaction"])
async def test_a_backend_terminated_while_its_copy_waits_for_the_socket_is_a_lost_connection(pg_dsn, effect):
    """asyncpg's COPY waits, with no timeout, for the socket to take more data. Here the COPY
    cannot go on: its first row's key is another transaction's uncommitted enrolment, its backend
    waits for that one and stops reading, and the batcher's writes fill the socket. Its backend
    terminated then, the commit must be retried on a new connection, not wait for good, and commit
    once: as a lone COPY, and as a transaction's."""
    db = await asyncpg.connect(pg_dsn)
    blocker = await asyncpg.connect(pg_dsn)
    batcher = LedgerBatcher(pg_dsn, max_rows=100_000, max_ms=0)
    commit = None
    try:
        await migrate(db)
        # ~16 MB to COPY: more than the socket buffers of both ends hold (~5 MB here).
        changes = [_finished_enrolment(n, "x" * 8000, effect=effect) for n in range(2000)]
        held = blocker.transaction()
        await held.start()
        await blocker.copy_records_to_table(
            "executions", schema_name="ordo", records=[changes[0].row], columns=EXEC_COLUMNS
        )
        commit = asyncio.create_task(batcher.commit(_units(changes), {}, {}))
        deadline = time.monotonic() + 10
        while (
            copying := await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'COPY%'"
                " AND wait_event_type = 'Lock'"
            )
        ) is None:
            assert time.monotonic() < deadline, "the batcher's COPY never waited for the held enrolment"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the batcher's writes fill the socket meanwhile
        assert await db.fetchval("SELECT pg_terminate_backend($1)", copying)
        await held.rollback()
        await _retried_and_committed_once(commit, changes, db, timeout=15)
    finally:
        if commit is not None and not commit.done():
            commit.cancel()
            await asyncio.wait([commit])
        await batcher.close()
        await blocker.close()
        await db.close()


async def _retried_and_committed_once(commit: asyncio.Task, changes: list, db, timeout: float) -> None:
    """The commit whose connection was lost ended (not a measure of speed: only that it ends), retried
    on a new connection, with every change committed once."""
    await asyncio.wait([commit], timeout=timeout)  # not wait_for: its cancellation would end the wait
    assert commit.done(), "the commit still waits on its lost connection"
    result = commit.result()
    assert result.accepted == {c.execution_id for c in changes}
    assert result.attempts > 1
    assert await db.fetchval("SELECT count(*) FROM ordo.executions") == len(changes)


async def test_a_commit_whose_connection_is_cut_without_a_word_mid_copy_is_retried_on_a_new_one(pg_dsn):
    """A path to Postgres cut without a word (a host gone, a NAT dropping the flow) sends no FIN or RST.
    A COPY under way then waits for the socket with no timeout of asyncpg's, and the kernel would retry
    for ~15 minutes: here, through a relay that stops passing bytes mid-COPY and whose kernel, its
    buffers full, answers with a zero window. With a short `tcp_timeout_s` the kernel gives the
    connection up (TCP_USER_TIMEOUT covers a zero window that lasts), and the commit is retried on a
    new connection and commits once.

    The relay's kernel is not silent, only full: now and then it opens its window a little (as it
    frees memory), which starts the kernel's count again, and the connection is not given up. A
    truly silent path (a link down) was checked by hand. So the cut is tried up to five times; with
    no timeout on the socket (the code before) none of them is ever given up."""
    for _ in range(5):
        if await _cut_mid_copy(pg_dsn):
            return
    raise AssertionError("a connection cut mid-COPY was not given up in five tries")


async def _cut_mid_copy(pg_dsn: str) -> bool:
    """One cut mid-COPY; False if its connection was not given up within a few timeouts' time."""
    db = await asyncpg.connect(pg_dsn)
    upstream = urlsplit(pg_dsn)
    relay = PostgresRelay("127.0.0.1", upstream.hostname or "127.0.0.1", upstream.port or 5432)
    await relay.start()
    batcher = LedgerBatcher(with_host(pg_dsn, relay.host, relay.port), max_rows=100_000, max_ms=0, tcp_timeout_s=2)
    conn = commit = None
    cut_backend = 0
    try:
        await migrate(db)
        # ~16 MB to COPY: more than the socket buffers of both ends hold.
        changes = [_finished_enrolment(n, "x" * 8000) for n in range(2000)]
        conn = await batcher.connect()
        cut_backend = conn.get_server_pid()
        lost = asyncio.Event()
        when_lost(conn, lambda _conn: lost.set())
        relay.cut(after_bytes=1 << 20)  # a MB into the commit: in its COPY
        commit = asyncio.create_task(batcher.commit(_units(changes), {}, {}))
        try:
            await asyncio.wait_for(lost.wait(), 10)  # five timeouts: not a measure of speed
        except TimeoutError:
            return False
        # Its backend still waits for the rest of the COPY, the rows it inserted locked: across a real
        # cut, Postgres's own keepalive would end it; here the relay answers for the client.
        await db.fetchval("SELECT pg_terminate_backend($1)", cut_backend)
        cut_backend = 0  # ended: its pid is not to be terminated again (it may be another's by then)
        await _retried_and_committed_once(commit, changes, db, timeout=30)
        return True
    finally:
        if commit is not None and not commit.done():
            if conn is not None:
                conn.terminate()  # or the cancelled commit's ROLLBACK waits for the command timeout
            commit.cancel()
            await asyncio.wait([commit])
        if cut_backend:  # a try given up on: its backend holds the rows it inserted until it ends
            await db.fetchval("SELECT pg_terminate_backend($1)", cut_backend)
        await batcher.close()
        await relay.stop()
        await db.close()


# -- 4. seeded soak ------------------------------------------------------------------------


async def test_seeded_fault_soak(tmp_path, pg_dsn, prefix, pg_server_dsn):
    seed = 20240604
    seconds = fault_scale(ci=20, full=300)
    rng = random.Random(seed)
    database = pg_dsn.rsplit("/", 1)[1]
    welcome = fault_scale(ci=6000, full=100000)
    async with _own_nats(tmp_path) as server:
        async with Harness(server.url, pg_dsn, prefix, **LOADED) as h:
            load = Load(h, "soak", welcome, waiters=30, trigger_batch=50)
            await load.prepare()
            killer = await asyncpg.connect(pg_server_dsn)
            fleet = Fleet(h, 2)
            fleet.start()
            # Published over the whole soak, through the faults (the harness's client reconnects).
            publisher = asyncio.create_task(load.publish(over_s=seconds))
            started = time.monotonic()
            faults = {"terminate_backends": 0, "kill_9_worker": 0, "nats_restart": 0}
            try:
                while time.monotonic() - started < seconds:
                    await asyncio.sleep(rng.uniform(0.3, 1.5))
                    fleet.respawn_exited()
                    fault = rng.choices(list(faults), weights=[5, 3, 1])[0]
                    if fault == "terminate_backends":
                        await _terminate(
                            killer,
                            database,
                            [h.db.get_server_pid(), killer.get_server_pid()],
                            copy_only=rng.random() < 0.5,
                        )
                    elif fault == "kill_9_worker":
                        fleet.kill_one(rng)
                    else:
                        await asyncio.to_thread(server.stop)
                        await asyncio.sleep(rng.uniform(0.1, 1.0))
                        await asyncio.to_thread(server.start)
                    faults[fault] += 1
                await publisher
                finished = await load.wait_completed(fleet, timeout=180)
            finally:
                publisher.cancel()
                fleet.stop()
                await killer.close()
            numbers = await load.verify()
        throughput = numbers["executions"] / (finished - started)
        print(
            f"soak (seed {seed}, {seconds}s of faults): {faults}; worker exits (respawned): {len(fleet.exits)}; "
            f"{numbers}; {throughput:.0f} executions/s"
        )
