"""Break the servers under load: restart nats-server, restart (and crash) Postgres,
terminate the ledger's backends mid-COPY, and a seeded soak of all of them plus
kill -9 of workers. Each test ends with the ledger's invariants and an exact
check that every expected execution exists once, completed, with its signals in
publish order.

The servers that get restarted are the test's OWN (EmbeddedNats / EmbeddedPostgres
in tmp_path), never the session's. Counts and durations are CI-sized; run the full
ones with ``ORDO_FAULT_SCALE=full pytest tests/test_chaos.py -s`` (the soak then runs
for 5 minutes; `-s` shows the numbers each test prints).
"""

import asyncio
import random
import time
from contextlib import asynccontextmanager

import asyncpg
import orjson
import pytest

from bench.generator import batch_message, trigger_event
from daemon.servers import EmbeddedNats, EmbeddedPostgres
from harness import NO_PROBLEMS, Harness, fault_scale
from test_pipeline import WAITER, WELCOME

QUICK_LEASES = {"lease_ttl_s": 2.0, "lease_renew_s": 0.3}
#: Small batches so that faults land inside batches, and a short AckWait so that
#: messages a dead connection or process held come back quickly.
LOADED = {"ack_wait_s": 2.0, "batch_max_ms": 10.0, "fetch_batch": 50, **QUICK_LEASES}
TICKS = 8


class Fleet:
    """Worker processes kept alive: one that exits is respawned, and its exit is recorded."""

    def __init__(self, h: Harness, workers: int = 2, **settings):
        self.h = h
        self.workers = workers
        self.settings = settings
        self.procs: dict = {}
        self.exits: list = []  # (worker index, exit code)
        self.kills = 0

    def start(self) -> None:
        for i in range(self.workers):
            self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def respawn_exited(self) -> None:
        for i, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                self.exits.append((i, code))
                self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def kill_one(self, rng: random.Random) -> None:
        i = rng.randrange(self.workers)
        self.h.kill(self.procs[i])
        self.kills += 1
        self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
                proc.wait()


async def _db(h: Harness) -> asyncpg.Connection:
    """The harness's connection, reconnected if a Postgres restart broke it."""
    for _ in range(100):
        if h.db is not None and not h.db.is_closed():
            try:
                await h.db.fetchval("SELECT 1")
                return h.db
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pass
        try:
            h.db = await asyncpg.connect(h.config.pg_dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
    raise AssertionError("cannot reach the ledger")


async def _count(h: Harness, sql: str, *args) -> int:
    for _ in range(50):
        try:
            return await (await _db(h)).fetchval(sql, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("cannot read the ledger")


async def _retrying(publish, *args, **kwargs):
    """Publish as a Triggers service does while nats-server restarts: retry until
    JetStream acks (each message has a fixed Nats-Msg-Id, so a retry that was in
    fact stored the first time is dropped by the duplicate window)."""
    for attempt in range(200):
        try:
            return await publish(*args, **kwargs)
        except Exception:  # timeouts, no responders, connection reconnecting
            await asyncio.sleep(0.1)
    raise AssertionError("could not publish for 20 s")


class Load:
    """WAITER executions with TICKS ordered signals each, plus WELCOME enrolments."""

    def __init__(self, h: Harness, run_id: str, welcome: int, waiters: int, trigger_batch: int = 0):
        self.h = h
        self.run_id = run_id
        #: > 0: every other round of WELCOME triggers goes out in trigger batch messages of this many events.
        self.trigger_batch = trigger_batch
        self.waiter_events = [trigger_event(f"{run_id}-w", i, tenant="acme", event_type="session.started")
                              for i in range(waiters)]
        self.waiter_ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in self.waiter_events]
        self.events = [trigger_event(run_id, i, tenant="acme", event_type="contact.created") for i in range(welcome)]
        self.total = len(self.events) + len(self.waiter_events)

    async def prepare(self) -> None:
        """Deploy; enrol the waiters with an in-process worker until they wait."""
        await self.h.deploy(WELCOME)
        await self.h.deploy(WAITER)
        async with self.h.worker():
            await self.h.publish_triggers(self.waiter_events)
            await self.h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'",
                                    expect=len(self.waiter_events))

    async def publish(self, over_s: float = 0.0) -> None:
        """Triggers and signal rounds interleaved, spread over `over_s` seconds (at once by default)."""
        rounds = TICKS + 1
        chunk = -(-len(self.events) // rounds)
        for i in range(rounds):
            events = self.events[i * chunk:(i + 1) * chunk]
            if self.trigger_batch and i % 2:
                await self._publish_batches(events)
            else:
                await self._publish_triggers(events)
            for execution_id in self.waiter_ids:
                if i < TICKS:
                    await _retrying(self.h.signal, execution_id, "tick", {"i": i}, signal_id=f"tick-{i}")
                else:
                    await _retrying(self.h.signal, execution_id, "done", None, signal_id="done")
            if over_s:
                await asyncio.sleep(over_s / rounds)

    async def _publish_triggers(self, events: list[dict]) -> None:
        """Like the generator (Nats-Msg-Id = event id, a window of PubAcks), retrying what failed."""
        topology = self.h.topology
        while events:
            failed = []
            for start in range(0, len(events), 256):
                window = events[start:start + 256]
                results = await asyncio.gather(*(
                    self.h.js.publish(topology.trigger_subject(e["tenant"], e["type"]), orjson.dumps(e),
                                      headers={"Nats-Msg-Id": e["event_id"]}) for e in window),
                    return_exceptions=True)
                failed += [e for e, r in zip(window, results) if isinstance(r, BaseException)]
            events = failed
            if failed:
                await asyncio.sleep(0.1)

    async def _publish_batches(self, events: list[dict]) -> None:
        for start in range(0, len(events), self.trigger_batch):
            subject, body, msg_id = batch_message(self.h.topology, events[start:start + self.trigger_batch])
            await _retrying(self.h.js.publish, subject, body, headers={"Nats-Msg-Id": msg_id})

    async def completed(self) -> int:
        return await _count(self.h, "SELECT count(*) FROM ordo.executions WHERE status = 'completed'")

    async def wait_completed(self, fleet: Fleet | None = None, timeout: float = 120.0) -> float:
        """Until every execution completed (respawning exited workers); returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        done = 0
        while time.monotonic() < deadline:
            if fleet is not None:
                fleet.respawn_exited()
            done = await self.completed()
            if done == self.total:
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise AssertionError(f"{done} of {self.total} executions completed after {timeout}s")

    async def verify(self) -> dict:
        """Exactly once, completed, in order; returns the counts for the report."""
        db = await _db(self.h)
        rows = await db.fetch("SELECT event_id, status FROM ordo.executions WHERE workflow_id = 'welcome'")
        got = sorted(r["event_id"] for r in rows)
        expected = sorted(e["event_id"] for e in self.events)
        lost = len(set(expected) - set(got))
        duplicated = len(got) - len(set(got))
        assert got == expected, f"{lost} lost, {duplicated} duplicated welcome executions"
        assert {r["status"] for r in rows} == {"completed"}
        out_of_order = 0
        seen = []
        for execution_id in self.waiter_ids:
            details = await db.fetch(
                "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal' ORDER BY seq",
                execution_id)
            signals = [orjson.loads(d["detail"]) for d in details]
            if [s["data"]["i"] for s in signals[:-1]] != list(range(TICKS)) or signals[-1]["name"] != "done":
                out_of_order += 1
                letters = await db.fetch("SELECT reason, stream_seq FROM ordo.dead_letters WHERE execution_id = $1::uuid",
                                         execution_id)
                seen.append((execution_id, [(s.get("name"), (s.get("data") or {}).get("i")) for s in signals],
                             [tuple(r) for r in letters]))
        assert out_of_order == 0, f"{out_of_order} waiters saw their signals lost, doubled or out of order: {seen}"
        problems = await self.h.ledger_problems()
        assert problems == NO_PROBLEMS
        return {"executions": self.total, "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}


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
        print(f"nats restarts: {restarts} survived, worker exits {fleet.exits}, {numbers}, "
              f"{numbers['executions'] / (finished - started):.0f} executions/s")
        assert fleet.exits == [], f"workers exited on a NATS restart: {fleet.exits}"


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
        print(f"postgres faults: {faults} survived; worker exits (respawned by the test): {fleet.exits}; "
              f"{numbers}, {numbers['executions'] / (finished - started):.0f} executions/s")


# -- 3. pg_terminate_backend during COPY ------------------------------------------------


async def _terminate(killer: asyncpg.Connection, database: str, keep: list[int], *, copy_only: bool) -> int:
    condition = "query ILIKE 'COPY%' AND state = 'active'" if copy_only else "true"
    return await killer.fetchval(
        f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 "
        f"AND pid <> ALL($2::int[]) AND {condition}", database, keep)


async def test_terminating_the_ledger_backends_during_copy_commits_all_or_nothing(nats_server_url, pg_dsn, prefix,
                                                                                   pg_server_dsn):
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
    print(f"pg_terminate_backend: {copies} COPY backends and {everything} other worker backends terminated "
          f"in {seconds}s; worker exits (respawned by the test): {fleet.exits}; {numbers}; "
          f"{numbers['executions'] / (finished - started):.0f} executions/s")
    assert copies + everything > 0, "no backend was terminated: the test did not test anything"


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
                        await _terminate(killer, database, [h.db.get_server_pid(), killer.get_server_pid()],
                                         copy_only=rng.random() < 0.5)
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
        print(f"soak (seed {seed}, {seconds}s of faults): {faults}; worker exits (respawned): {len(fleet.exits)}; "
              f"{numbers}; {throughput:.0f} executions/s")
