"""Kill, stop and restart real worker processes; the ledger must not notice."""

import asyncio
import signal
import time
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
from harness import (
    NO_PROBLEMS,
    QUICK_LEASES,
    WAITER,
    WELCOME,
    Harness,
    PostgresRelay,
    fault_scale,
    with_host,
    worker_metric,
)

from bench.generator import trigger_event
from daemon.enrolment import event_message
from daemon.lanes import lane_of
from daemon.listener import Listener
from daemon.servers import free_port
from hotpath import ExecutionState
from ledger import workflows
from ledger.executions import ExecutionRecord


async def _ack_pending(h: Harness, partition: int) -> int:
    """Messages the partition's current consumer has delivered and not had acked; 0 while
    a worker that just claimed the partition is creating its consumer at the watermark."""
    from nats.js.errors import NotFoundError

    try:
        consumer = await h.partition_consumer(partition)
        return (await h.js.consumer_info(h.topology.exec_stream, consumer)).num_ack_pending
    except NotFoundError:
        return 0


async def _advanced(port: int) -> float:
    """Messages the worker serving /metrics on `port` has dispatched."""
    return await worker_metric(port, "ordo_advance_seconds_count")


async def _completed(h: Harness) -> int:
    return await h.db.fetchval("SELECT count(*) FROM ordo.executions WHERE status = 'completed'")


async def _wait_progress(h: Harness, proc, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await _completed(h)
        if done >= at_least:
            return done
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        await asyncio.sleep(0.02)
    raise AssertionError(f"no progress to {at_least} executions")


async def test_kill_9_mid_batch_again_and_again_loses_and_duplicates_nothing(nats_server_url, pg_dsn, prefix):
    kills = fault_scale(ci=5, full=50)
    step = 150
    async with Harness(nats_server_url, pg_dsn, prefix, ack_wait_s=2.0, **QUICK_LEASES) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        waiters = [trigger_event("crash-w", i, tenant="acme", event_type="session.started") for i in range(20)]
        waiter_ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in waiters]
        async with h.worker():
            await h.publish_triggers(waiters)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=20)
        base = await _completed(h)

        count = kills * step + 1000
        events = [trigger_event("crash", i, tenant="acme", event_type="contact.created") for i in range(count)]
        await h.publish_triggers(events)
        ticks = 10
        for i in range(ticks):
            for execution_id in waiter_ids:
                await h.signal(execution_id, "tick", {"i": i}, signal_id=f"tick-{i}")
        for execution_id in waiter_ids:
            await h.signal(execution_id, "done", None, signal_id="done")

        # Small batches and a slow flush so that a kill lands inside a batch.
        for k in range(kills):
            proc = h.spawn_worker(batch_max_ms=15.0, fetch_batch=50)
            await _wait_progress(h, proc, base + (k + 1) * step)
            h.kill(proc)
        async with h.worker():
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'",
                expect=count + len(waiters),
                timeout=120,
            )

        rows = await h.db.fetch("SELECT event_id FROM ordo.executions WHERE workflow_id = 'welcome'")
        assert sorted(r["event_id"] for r in rows) == sorted(e["event_id"] for e in events)
        assert await h.ledger_problems() == NO_PROBLEMS
        for execution_id in waiter_ids:
            details = await h.db.fetch(
                "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal' ORDER BY seq",
                execution_id,
            )
            names = [orjson.loads(d["detail"]) for d in details]
            assert [n["data"]["i"] for n in names[:-1]] == list(range(ticks))
            assert names[-1]["name"] == "done"
        print(
            f"kill -9: {kills} kills survived; {count} enrolments and {len(waiters)} executions with "
            f"{ticks + 1} ordered signals each: none lost, duplicated or out of order"
        )


async def test_sigterm_drains_commits_acks_and_exits_zero(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        events = [trigger_event("drain", i, tenant="acme", event_type="contact.created") for i in range(3000)]
        await h.publish_triggers(events)
        proc = h.spawn_worker(batch_max_ms=10.0, fetch_batch=100)
        await _wait_progress(h, proc, 300)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        # Drained: nothing the worker took is left unacked on the server.
        info = await h.js.consumer_info(h.topology.triggers_stream, await h.tenant_lane_consumer("acme"))
        assert info.num_ack_pending == 0
        done_at_stop = await _completed(h)
        assert done_at_stop + info.num_pending == len(events)
        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(events))
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_message_held_unacked_past_a_crash_is_applied_before_its_successor(nats_server_url, pg_dsn, prefix):
    """k is fetched by a worker that dies before committing it; k+1 arrives; a new
    worker starts long before AckWait (30 s) would redeliver k. k+1 must not go first."""
    import asyncpg

    from daemon.topology import partition_of

    async with Harness(nats_server_url, pg_dsn, prefix, ack_wait_s=30.0, **QUICK_LEASES) as h:
        await h.deploy(WAITER)
        start = trigger_event("held", 1, tenant="acme", event_type="session.started")
        execution_id = h.execution_id("acme", "waiter", start["event_id"])
        async with h.worker():
            await h.publish_triggers([start])
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", execution_id, expect="waiting"
            )
        partition = partition_of(execution_id, h.config.partitions)
        proc = h.spawn_worker()
        blocker = await asyncpg.connect(h.config.pg_dsn)
        try:
            async with blocker.transaction():
                # Commits of worker A block on this lock: k is fetched, dispatched, never committed.
                await blocker.execute("LOCK TABLE ordo.transitions IN SHARE ROW EXCLUSIVE MODE")
                await h.signal(execution_id, "tick", {"i": 0}, signal_id="k")
                deadline = time.monotonic() + 20
                while await _ack_pending(h, partition) < 1:
                    assert time.monotonic() < deadline, "worker A never took k"
                    await asyncio.sleep(0.05)
                h.kill(proc)
        finally:
            await blocker.close()
        await h.signal(execution_id, "tick", {"i": 1}, signal_id="k+1")
        async with h.worker():
            await h.wait_until(
                "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal'",
                execution_id,
                expect=2,
                timeout=20,
            )
        details = await h.db.fetch(
            "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal' ORDER BY seq",
            execution_id,
        )
        assert [orjson.loads(d["detail"])["data"]["i"] for d in details] == [0, 1]
        assert await h.ledger_problems() == NO_PROBLEMS


async def _owners(h: Harness) -> dict:
    rows = await h.db.fetch("SELECT owner, count(*) AS n FROM ordo.partitions WHERE owner IS NOT NULL GROUP BY owner")
    return {r["owner"]: r["n"] for r in rows}


async def test_a_worker_that_joins_takes_its_fair_share(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix, partitions=8, lease_ttl_s=3.0, lease_renew_s=0.3) as h:
        await h.deploy(WAITER)
        async with h.worker(0, 2) as first:
            assert len(first.ownership.owned) == 8
            async with h.worker(1, 2) as second:
                deadline = time.monotonic() + 20
                while sorted((await _owners(h)).values()) != [4, 4]:
                    assert time.monotonic() < deadline, await _owners(h)
                    await asyncio.sleep(0.1)
                assert len(first.ownership.owned) == len(second.ownership.owned) == 4
                # Work flows through both owners.
                events = [trigger_event("share", i, tenant="acme", event_type="session.started") for i in range(40)]
                await h.publish_triggers(events)
                await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=40)
                for e in events:
                    await h.signal(h.execution_id("acme", "waiter", e["event_id"]), "done", {})
                await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=40)
        # Clean exits give every partition back at once.
        assert await _owners(h) == {}
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_stalled_owner_loses_its_partitions_and_its_late_commit_is_fenced(nats_server_url, pg_dsn, prefix):
    """SIGSTOP a worker holding an uncommitted batch for longer than its lease; another
    worker takes over and applies the message; SIGCONT: the old commit is refused."""
    from daemon.topology import partition_of

    async with Harness(nats_server_url, pg_dsn, prefix, **QUICK_LEASES) as h:
        await h.deploy(WAITER)
        start = trigger_event("stall", 1, tenant="acme", event_type="session.started")
        execution_id = h.execution_id("acme", "waiter", start["event_id"])
        async with h.worker():
            await h.publish_triggers([start])
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", execution_id, expect="waiting"
            )
        partition = partition_of(execution_id, h.config.partitions)
        since = time.time()
        port = free_port()
        # Worker A holds what it dispatched for 4 s before committing: room to stop it mid-batch.
        old = h.spawn_worker(batch_max_ms=4000.0, metrics_port=port)
        await h.wait_claimed(since)
        dispatched = await _advanced(port)
        await h.signal(execution_id, "tick", {"i": 0}, signal_id="k")
        deadline = time.monotonic() + 10
        while await _ack_pending(h, partition) < 1:
            assert time.monotonic() < deadline, "worker A never took the message"
            await asyncio.sleep(0.02)
        # Until A has dispatched it into the batch that waits 4 s (a fetched message A had not
        # dispatched yet would be re-read after SIGCONT and settled as applied): its dispatcher
        # times each message it advances, after handing the unit to the batcher.
        while await _advanced(port) == dispatched:
            assert time.monotonic() < deadline, "worker A never dispatched the message"
            await asyncio.sleep(0.02)
        with h.stopped(old):
            stopped_at = time.time()
            async with h.worker():
                await h.wait_until(
                    "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal'",
                    execution_id,
                    expect=1,
                    timeout=30,
                )
                taken_at = await h.db.fetchval(
                    "SELECT extract(epoch FROM claimed_at) FROM ordo.partitions WHERE partition = $1", partition
                )
                print(f"failover: partition {partition} claimed {float(taken_at) - stopped_at:.2f} s after SIGSTOP")
                # A wakes up, its 4 s batch comes due and its commit meets a newer epoch.
                code = await h.resume(old)
        assert code == 3, "the old owner must stop on a fenced commit"
        applied = await h.db.fetchval(
            "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal'", execution_id
        )
        assert applied == 1
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_recreated_execution_stream_does_not_inherit_the_old_watermark(nats_server_url, pg_dsn, prefix):
    """Sequences restart in a new stream; a watermark of the old one must not skip its first messages."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        starts = [trigger_event("recreate", i, tenant="acme", event_type="session.started") for i in range(6)]
        ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in starts]
        async with h.worker():
            await h.publish_triggers(starts)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=6)
            for execution_id in ids[:3]:
                for i in range(5):
                    await h.signal(execution_id, "tick", {"i": i}, signal_id=f"t{i}")
                await h.signal(execution_id, "done", {}, signal_id="done")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=3)
        assert await h.db.fetchval("SELECT max(watermark) FROM ordo.partitions") > 0
        await h.js.delete_stream(h.topology.exec_stream)
        await h.topology.ensure(h.js)
        for execution_id in ids[3:]:
            await h.signal(execution_id, "done", {}, signal_id="done")
        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=6)
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_acks_that_cannot_be_written_mean_redelivery_not_a_dead_worker(nats_server_url, pg_dsn, prefix):
    """NATS refuses the acks of a committed batch (its reconnect buffer is full): the
    worker keeps running, the messages come back after AckWait and are deduped."""
    import nats.errors

    from daemon import metrics

    count = 50
    unsent_before = metrics.acks_not_sent._value.get()
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        async with h.worker(ack_wait_s=2.0) as worker:
            real_publish = worker._nc.publish
            refused = 0

            async def publish(subject, payload=b"", *args, **kwargs):
                nonlocal refused
                if payload == b"+ACK" and not refused:  # the first batch's acks
                    refused += 1
                    raise nats.errors.OutboundBufferLimitError
                return await real_publish(subject, payload, *args, **kwargs)

            worker._nc.publish = publish
            await h.publish_triggers([trigger_event("welcome", i, tenant="acme") for i in range(count)])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count)
            # Redelivered after AckWait, deduplicated by the ledger, and acked this time.
            triggers = await h.triggers_info()
            deadline = asyncio.get_running_loop().time() + 30
            while triggers["num_ack_pending"] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
                triggers = await h.triggers_info()
            assert triggers["num_ack_pending"] == 0
            assert worker.fatal is None and not worker.stopping.is_set()
        assert refused and metrics.acks_not_sent._value.get() > unsent_before
        assert await h.db.fetchval("SELECT count(*) FROM ordo.transitions WHERE kind = 'started'") == count
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_partition_whose_consumer_cannot_be_set_up_yet_is_retried_not_fatal(nats_server_url, pg_dsn, prefix):
    """Setting up a claimed partition's consumer times out (NATS restarting): the worker
    keeps its lease, tries again on the next ownership round, and then serves it."""
    import nats.errors

    count = 40
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker(**QUICK_LEASES) as worker:
            real_resume = worker.topology.resume_partition
            failures = 0

            async def resume(js, partition, epoch, watermark):
                nonlocal failures
                if failures < 3:
                    failures += 1
                    raise nats.errors.TimeoutError
                return await real_resume(js, partition, epoch, watermark)

            worker.topology.resume_partition = resume
            # Hand the partitions back and claim them again: the claims go through the flaky set-up.
            async with worker._pool.acquire() as conn:
                for p in sorted(worker.ownership.owned):
                    worker._stop_partition(p)
                    fetcher = worker._fetchers.pop(p)
                    await asyncio.gather(fetcher, return_exceptions=True)
                    worker.progress.pop(p, None)
                    worker._closing.discard(p)
                    await worker.ownership.release(conn, p)
            events = [trigger_event("waiter", i, tenant="acme", event_type="session.started") for i in range(count)]
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=count)
            for event in events:
                await h.signal(h.execution_id("acme", "waiter", event["event_id"]), "done")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count)
            assert failures == 3 and worker.fatal is None and not worker._unstarted
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_consumers_jetstream_lost_under_their_worker_are_created_again_where_their_work_had_settled(
    nats_server_url, pg_dsn, prefix
):
    """Every consumer of a running worker's partitions and lanes is deleted (by hand, or lost
    with a server's state): before, their pulls were refused for as long as the worker held
    them, and nothing published afterwards was ever taken. Now each is created again, the lane
    after where it had settled (not from the stream's start), and every trigger and signal,
    before and after, is applied exactly once."""
    from daemon import metrics

    def created_again(kind: str) -> float:
        return metrics.consumers_created_again.labels(kind)._value.get()

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        lanes_before, partitions_before = created_again("lane"), created_again("partition")
        first = [trigger_event("before", i, tenant="acme", event_type="session.started") for i in range(20)]
        second = [trigger_event("after", i, tenant="acme", event_type="session.started") for i in range(20)]
        ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in first + second]
        async with h.worker(**QUICK_LEASES) as worker:
            await h.publish_triggers(first)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=20)
            for execution_id in ids[:10]:
                await h.signal(execution_id, "done")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=10)
            lane = worker.intake.lanes.running[lane_of("acme", h.topology.lanes)]
            last = (await h.js.stream_info(lane.consumer.stream)).state.last_seq
            deadline = time.monotonic() + 30
            while lane.settled < last:  # the worker has measured its lane settled up to the 20 triggers
                assert time.monotonic() < deadline, f"lane {lane.index} settled {lane.settled}, not {last}"
                await asyncio.sleep(0.1)
            for stream in [*h.topology.trigger_stream_names(), h.topology.exec_stream]:
                for info in await h.js.consumers_info(stream):
                    await h.js.delete_consumer(stream, info.name)

            await h.publish_triggers(second)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=30, timeout=60)
            for execution_id in ids[10:]:
                await h.signal(execution_id, "done")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=40, timeout=60)
            again = await h.js.consumer_info(lane.consumer.stream, lane.consumer.consumer)
            assert again.config.opt_start_seq == last + 1  # after what it had settled, not the stream's start
            assert created_again("lane") > lanes_before and created_again("partition") > partitions_before
            assert worker.fatal is None
        assert await h.db.fetchval("SELECT count(*) FROM ordo.executions") == 40
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_consumer_deleted_by_a_new_owner_is_not_created_again_by_the_worker_that_lost_it(
    nats_server_url, pg_dsn, prefix
):
    """Another worker claimed partition 0 (a newer epoch in the ledger) and deleted the old
    epoch's consumers, and this worker has not noticed yet: it must not bring them back, or
    it would take the new owner's messages again beside it."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker(**QUICK_LEASES) as worker:
            epoch = worker.ownership.owned[0]
            lanes = [lane for lane in worker.intake.lanes.running.values() if lane.partition == 0]
            await h.db.execute(
                "UPDATE ordo.partitions SET owner = 'another', epoch = epoch + 1,"
                " lease_until = now() + interval '1 hour' WHERE deployment = $1 AND partition = 0",
                h.topology.prefix,
            )
            await h.js.delete_consumer(h.topology.exec_stream, h.topology.partition_consumer(0, epoch))
            for lane in lanes:
                await h.js.delete_consumer(lane.consumer.stream, lane.consumer.consumer)
            await worker.partitions._create_again([(0, epoch)], lanes)
            names = {
                info.name
                for stream in [*h.topology.trigger_stream_names(), h.topology.exec_stream]
                for info in await h.js.consumers_info(stream)
            }
            assert h.topology.partition_consumer(0, epoch) not in names
            assert lanes and not names & {lane.consumer.consumer for lane in lanes}


async def test_a_worker_that_lost_a_partition_takes_nothing_from_the_new_owners_consumer(
    nats_server_url, pg_dsn, prefix
):
    """Each ownership (epoch) of a partition has its own consumer. With one name for all, a
    worker that lost the partition and had not noticed yet pulled from the new owner's
    consumer; what it took came back to the new owner only after AckWait, behind younger
    messages of the same executions, which then counted it as applied: a lost signal."""
    import uuid

    from daemon.pull import PullConsumer
    from daemon.topology import partition_of

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        t = h.topology
        await t.resume_partition(h.js, 0, 1, 0)
        old = PullConsumer(h.nc, t.exec_stream, t.partition_consumer(0, 1), expires=0.5)
        await old.subscribe()
        await t.resume_partition(h.js, 0, 2, 0)  # another worker claims partition 0
        new = PullConsumer(h.nc, t.exec_stream, t.partition_consumer(0, 2), expires=0.5)
        await new.subscribe()
        execution_id = next(
            x for x in (str(uuid.uuid4()) for _ in range(1000)) if partition_of(x, h.config.partitions) == 0
        )
        seq = await h.signal(execution_id, "tick", {"i": 0}, signal_id="t0")

        assert await old.take(10) == []
        assert old.refused  # its consumer is gone: the fetch loop pauses instead of spinning
        assert [d.stream_seq for d in await new.take(10)] == [seq]
        names = [c.name for c in await h.js.consumers_info(t.exec_stream)]
        assert names == [t.partition_consumer(0, 2)]


async def test_a_message_whose_execution_changed_since_it_was_loaded_is_applied_again_in_its_place(
    nats_server_url, pg_dsn, prefix, monkeypatch
):
    """A unit found stale at commit (the ledger moved on since its load) keeps its execution's
    place in the ring and is applied again on a fresh load. NAKed with its key released, the
    next signal of the execution overtook it: here 'second' came while it still waited for
    'first', and 'first' came back only afterwards."""
    from ledger import executions

    steps = {
        "id": "two-signals",
        "tenant": "acme",
        "trigger": {"event": "session.started"},
        "steps": [
            {"id": "a", "type": "wait_for_signal", "signal": "first"},
            {"id": "b", "type": "wait_for_signal", "signal": "second"},
            {"id": "done", "type": "set", "values": {"ok": True}},
        ],
    }
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(steps)
        event = trigger_event("stale", 0, tenant="acme", event_type="session.started")
        execution_id = h.execution_id("acme", "two-signals", event["event_id"])
        async with h.worker():
            await h.publish_triggers([event])
            await h.wait_until("SELECT status FROM ordo.executions", expect="waiting")
        await h.signal(execution_id, "first", signal_id="s1")
        await h.signal(execution_id, "second", signal_id="s2")

        real_load = executions.load
        made_stale = []

        async def load_once_stale(conn, ids):
            records = await real_load(conn, ids)
            if execution_id in records and not made_stale:
                records[execution_id].loaded_seq -= 1  # as if loaded before a change the ledger has now
                made_stale.append(execution_id)
            return records

        monkeypatch.setattr(executions, "load", load_once_stale)
        async with h.worker():
            await h.wait_until("SELECT status FROM ordo.executions", expect="completed", timeout=30)
        assert made_stale
        assert await h.ledger_problems() == NO_PROBLEMS


async def _serves_every_partition(h: Harness, worker, tag: str, count: int = 40) -> None:
    """Executions spread over all partitions start, wait for a signal and complete."""
    events = [trigger_event(tag, i, tenant="acme", event_type="session.started") for i in range(count)]
    await h.publish_triggers(events)
    await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=count, timeout=30)
    for event in events:
        await h.signal(h.execution_id("acme", "waiter", event["event_id"]), "done", {})
    await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=30)
    assert worker.fatal is None


async def test_a_partition_lost_and_claimed_again_is_served_again(nats_server_url, pg_dsn, prefix):
    """Another worker takes partition 0 (its epoch moves on) and gives it back; the worker claims
    it again in a later round and serves it under the new epoch. Before, a lost partition stayed
    `closing` for good: its new claim was never started, and its executions stalled while the
    worker kept renewing the lease."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker(**QUICK_LEASES) as worker:
            first = worker.ownership.owned[0]
            await _taken_over(h, 0)
            await _until(lambda: 0 not in worker.ownership.owned, "the worker never noticed the loss")
            await h.db.execute(
                "UPDATE ordo.partitions SET owner = NULL, lease_until = NULL WHERE deployment = $1 AND partition = 0",
                h.config.prefix,
            )
            await _until(lambda: worker.ownership.owned.get(0, first) > first + 1, "partition 0 never claimed again")
            await _serves_every_partition(h, worker, "reclaimed")
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_partition_given_back_while_it_is_being_started_is_not_started(nats_server_url, pg_dsn, prefix):
    """A partition above the fair share is given back while its start still waits on JetStream
    (its trigger lanes' consumers): the start must not go on to open a fetch loop for a partition
    no longer held, whose progress the release has dropped. Before, that loop's first message
    raised KeyError and stopped the worker ("a partition fetch loop failed: KeyError(3)")."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker(**QUICK_LEASES) as worker:
            partitions, topology = worker.partitions, worker.topology
            p = max(worker.ownership.owned)
            # Give p back by hand, as the test of a flaky set-up does, so that the next round claims it again.
            partitions.stop(p)
            await asyncio.gather(worker._fetchers.pop(p), return_exceptions=True)
            await worker.intake.lanes.drain(p, timeout=5)
            worker.progress.pop(p, None)
            worker._closing.discard(p)
            async with worker._pool.acquire() as conn:
                await worker.ownership.release(conn, p)
            # Its next start waits while setting up its lanes' consumers.
            real_resume_lane, lanes_of_p = topology.resume_lane, set(topology.lanes_of(p))
            held = asyncio.Event()
            starting = asyncio.Event()

            async def resume_lane(js, lane, epoch, after_seq=0):
                if lane in lanes_of_p and not held.is_set():
                    starting.set()
                    await held.wait()
                return await real_resume_lane(js, lane, epoch, after_seq)

            topology.resume_lane = resume_lane
            await asyncio.wait_for(starting.wait(), 10)
            # Above the fair share now (say): given back while the start waits, and taken by another
            # worker, so that this one does not claim it again at once.
            await partitions._release(p)
            assert p not in worker.ownership.owned
            await _taken_over(h, p)
            held.set()
            await asyncio.wait_for(asyncio.shield(partitions._starter), 10)
            assert p not in worker._fetchers, "a fetch loop was opened for a partition given back"
            await h.db.execute(
                "UPDATE ordo.partitions SET owner = NULL, lease_until = NULL WHERE deployment = $1 AND partition = $2",
                h.config.prefix,
                p,
            )
            await _until(lambda: worker.ownership.owned.get(p) is not None, f"partition {p} never claimed again")
            await _serves_every_partition(h, worker, "restarted")
        assert await h.ledger_problems() == NO_PROBLEMS


async def _terminate_listener(h: Harness) -> int:
    """Terminate the backend of the worker's LISTEN connection (deploys, rollouts, timers set
    elsewhere), as an admin or a Postgres restart would, and wait until it is gone; returns its pid."""
    pid = await h.db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    assert pid is not None, "no backend listens"
    assert await h.db.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    return pid


async def test_a_listening_connection_cut_without_a_word_is_found_and_opened_again(pg_dsn):
    """No error tells a listening connection cut without a word (nothing is sent on it): asked to
    answer after a quiet spell, it does not, and it is opened again, and what was missed caught up."""
    heard, caught_up = [], asyncio.Event()

    async def catch_up() -> None:
        caught_up.set()

    db = await asyncpg.connect(pg_dsn)
    upstream = urlsplit(pg_dsn)
    relay = PostgresRelay("127.0.0.1", upstream.hostname or "127.0.0.1", upstream.port or 5432)
    await relay.start()
    try:
        listener = Listener(
            with_host(pg_dsn, relay.host, relay.port),
            {"ordo_test_cut": lambda *args: heard.append(args[-1])},
            catch_up,
            check_every_s=0.5,
            check_timeout_s=1.0,
        )
        await listener.open()
        running = asyncio.create_task(listener.run())
        try:
            await db.execute("NOTIFY ordo_test_cut, 'before'")
            await _until(lambda: heard == ["before"], "the listener did not hear what it listens for")
            relay.cut()
            await db.execute("NOTIFY ordo_test_cut, 'while cut'")
            await asyncio.wait_for(caught_up.wait(), 30)  # found lost, opened again, caught up
            await db.execute("NOTIFY ordo_test_cut, 'after'")
            await _until(lambda: heard[-1:] == ["after"], "the listener opened again does not hear")
            assert heard == ["before", "after"]
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await listener.close()
    finally:
        await relay.stop()
        await db.close()


async def test_a_worker_whose_listening_connection_was_terminated_still_hears_of_deploys(
    nats_server_url, pg_dsn, prefix
):
    """Deploys, rollout changes and timers set elsewhere reach a worker as NOTIFYs on one connection.
    Its backend terminated, the worker must listen again: before, it never did, and ran the
    versions it knew until it was restarted (there is no periodic reload of the definitions)."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker() as worker:
            await _terminate_listener(h)
            assert await h.deploy(dict(WAITER, name="v2")) == 2
            await _until(
                lambda: worker.registry.version("acme", "waiter", 2) is not None,
                "the worker never heard of version 2",
            )
            assert worker.fatal is None


async def test_reloads_that_overlap_leave_the_newest_definitions_loaded(nats_server_url, pg_dsn, prefix, monkeypatch):
    """Each deploy's NOTIFY starts a reload. A reload that read its snapshot before a deploy and
    finishes after the deploy's own reload must not leave the older definitions loaded."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker() as worker:
            reads, first_read, first_may_finish = [], asyncio.Event(), asyncio.Event()
            load_all = workflows.load_all

            async def first_read_held(conn):
                rows = await load_all(conn)
                reads.append(rows)
                if len(reads) == 1:  # its snapshot taken: v1 only
                    first_read.set()
                    await first_may_finish.wait()
                return rows

            monkeypatch.setattr(workflows, "load_all", first_read_held)
            first = asyncio.create_task(worker.reload_definitions())
            await first_read.wait()
            assert await h.deploy(dict(WAITER, name="v2")) == 2  # its NOTIFY starts a reload of its own
            deadline = time.monotonic() + 2  # time for that one to read v2 and load it, if it may
            while len(reads) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            first_may_finish.set()
            await first
            await _until(lambda: len(reads) >= 2, "the deploy's reload never read the definitions")
            await _until(
                lambda: worker.registry.version("acme", "waiter", 2) is not None,
                "version 2 is not loaded: the reload that read the older snapshot finished last",
            )


async def test_a_reload_on_a_deploy_that_fails_is_logged(nats_server_url, pg_dsn, prefix, monkeypatch, caplog):
    """A deploy's NOTIFY starts a reload nobody awaits: one that fails must say so, not leave the worker
    on its old definitions with nothing said (asyncio reports an unawaited task's error only when the
    task is garbage collected)."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker() as worker:

            async def unreadable(conn):
                raise ValueError("a definitions row this worker cannot read")

            monkeypatch.setattr(workflows, "load_all", unreadable)
            assert await h.deploy(dict(WAITER, name="v2")) == 2
            await _until(
                lambda: any(getattr(r, "reason", None) == "background_task" for r in caplog.records),
                "the failed reload was not logged",
            )
            failed = [r for r in caplog.records if getattr(r, "reason", None) == "background_task"]
            assert "reloading the workflow definitions on a deploy failed" in failed[0].getMessage()
            assert "a definitions row this worker cannot read" in failed[0].error
            assert worker.registry.version("acme", "waiter", 2) is None


async def test_a_worker_whose_ledger_goes_away_as_it_leaves_still_closes(
    nats_server_url, pg_dsn, prefix, monkeypatch, caplog
):
    """On a clean stop the worker hands its partitions back; if the ledger is gone just then, the
    leases lapse instead, and the worker still closes its connections and stops without an error."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        async with h.worker() as worker:

            async def ledger_gone(conn):
                raise asyncpg.ConnectionDoesNotExistError("the ledger went away as the worker left")

            monkeypatch.setattr(worker.ownership, "leave", ledger_gone)
        assert worker.batcher._conn is None  # closed: close() ran after the failed hand-back
        assert any(getattr(r, "reason", None) == "partition_release" for r in caplog.records)


async def test_what_was_deployed_while_the_worker_could_not_listen_is_loaded_once_it_listens_again(
    nats_server_url, pg_dsn, prefix
):
    """A deploy made while the listening connection is down is told to no one: the worker reloads
    the definitions once it listens again, and from then on hears the deploys themselves."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker() as worker:
            listener, reopen, may_reopen = worker.listener, worker.listener.open, asyncio.Event()

            async def open_when_allowed():
                await may_reopen.wait()
                await reopen()

            listener.open = open_when_allowed  # deaf until the test says
            old_pid = await _terminate_listener(h)
            assert await h.deploy(dict(WAITER, name="v2")) == 2
            await asyncio.sleep(0.5)
            assert worker.registry.version("acme", "waiter", 2) is None  # nothing told it
            may_reopen.set()
            await _until(
                lambda: worker.registry.version("acme", "waiter", 2) is not None,
                "version 2, deployed while the worker could not listen, was never loaded",
            )
            assert listener.connection.get_server_pid() != old_pid
            # The catch-up has read the definitions: only a NOTIFY heard can bring version 3 in.
            assert await h.deploy(dict(WAITER, name="v3")) == 3
            await _until(
                lambda: worker.registry.version("acme", "waiter", 3) is not None,
                "the worker listens again but did not hear of version 3",
            )
            assert worker.fatal is None
        # Closed on stopping, and not opened again.
        await h.wait_until(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            expect=0,
            timeout=10,
        )


async def _taken_over(h: Harness, partition: int) -> None:
    """Another worker claims the partition, as daemon/partitions.py does: a new epoch, and its
    consumers (of the partition and of its trigger lanes) in place of the earlier epochs'."""
    epoch = await h.db.fetchval(
        "UPDATE ordo.partitions SET epoch = epoch + 1, owner = 'another', lease_until = now() + interval '1 h'"
        " WHERE deployment = $1 AND partition = $2 RETURNING epoch",
        h.config.prefix,
        partition,
    )
    await h.topology.resume_partition(h.js, partition, epoch, 0)
    for lane in h.topology.lanes_of(partition):
        await h.topology.resume_lane(h.js, lane, epoch)


async def _until(condition, failure: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.05)


async def test_a_partition_whose_release_loses_its_connection_is_not_left_stalled(
    nats_server_url, pg_dsn, prefix, monkeypatch, caplog
):
    """Above the fair share, a partition is stopped, settles, and is given back; the UPDATE that gives
    it back loses its connection (its backend terminated). The release is retried, and the partition,
    claimed again once the share allows, is started and served. Before, the release task died with
    the connection (nothing but asyncio's "Task exception was never retrieved"), the partition stayed
    closing for good, and after the worker claimed it again every round skipped its start while
    renewing its lease: a silent stall of its executions that no other worker could take over."""
    import asyncpg

    from ledger import leases

    real_release = leases.release
    cut: list[int] = []

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        killer = await asyncpg.connect(h.config.pg_dsn)

        async def release_on_a_lost_connection(conn, deployment, worker, partition, epoch):
            if not cut:  # the first release only: its backend is terminated before the UPDATE is sent
                cut.append(partition)
                pid = conn.get_server_pid()
                await killer.execute("SELECT pg_terminate_backend($1)", pid)
                while await killer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                    await asyncio.sleep(0.01)
            return await real_release(conn, deployment, worker, partition, epoch)

        monkeypatch.setattr(leases, "release", release_on_a_lost_connection)
        try:
            async with h.worker(**QUICK_LEASES) as worker:
                assert len(worker.ownership.owned) == 4
                # Another worker joins (its heartbeat is all a fair share counts): the share falls to 2,
                # and partitions 3 and 2 are given back, the first of them on a connection that is lost.
                await h.db.execute(
                    "INSERT INTO ordo.workers (deployment, name, heartbeat_at)"
                    " VALUES ($1, 'another', now() + interval '1 h')",
                    h.config.prefix,
                )
                await _until(lambda: cut and len(worker.ownership.owned) == 2, "the surplus was never given back")
                # It leaves before taking any: the worker's share is all 4 again, and it claims them back.
                await h.db.execute(
                    "DELETE FROM ordo.workers WHERE deployment = $1 AND name = 'another'", h.config.prefix
                )
                p = cut[0]
                await _until(lambda: p in worker._fetchers, f"partition {p} was never started again")
                await _serves_every_partition(h, worker, "released")
        finally:
            await killer.close()
        retried = [r for r in caplog.records if getattr(r, "reason", None) == "ledger_connection"]
        assert any("release" in r.getMessage() for r in retried), "the lost connection was not logged"
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_partition_that_cannot_be_let_go_stops_the_worker(nats_server_url, pg_dsn, prefix, caplog):
    """Letting go of a partition above the fair share fails for a reason no retry mends (here the
    drain of its trigger lanes raises): the failure is logged and stops the worker, whose leases then
    lapse for others to claim. Before, the task died unnoticed, leaving the partition owned, renewed
    every round, closing, and never to be given back or served again."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        with pytest.raises(RuntimeError, match="the drain broke"):
            async with h.worker(**QUICK_LEASES) as worker:

                async def drain(partition, timeout):
                    raise RuntimeError("the drain broke")

                worker.intake.lanes.drain = drain
                await h.db.execute(
                    "INSERT INTO ordo.workers (deployment, name, heartbeat_at)"
                    " VALUES ($1, 'another', now() + interval '1 h')",
                    h.config.prefix,
                )
                await _until(worker.stopping.is_set, "the worker went on without the partitions it could not let go")
        failed = [r for r in caplog.records if getattr(r, "reason", None) == "partition_let_go"]
        assert failed and "the drain broke" in failed[0].error


# Three page views of one contact: the first enrols it, the next two are waited for.
VIEWS = {
    "id": "views",
    "tenant": "acme",
    "trigger": {"event": "page.viewed"},
    "steps": [
        {"id": "second", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h"},
        {"id": "third", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h"},
        {"id": "seen", "type": "set", "values": {"views": 3}},
    ],
}


def _views_of_one_contact(run_id: str) -> list[dict]:
    views = [trigger_event(run_id, i, tenant="acme", event_type="page.viewed") for i in range(3)]
    for view in views:
        view["contact"] = {"id": "c-0"}
    return views


async def _events_taken(h: Harness, execution_id: str) -> list[str]:
    """The ids of the events the execution took, in order."""
    rows = await h.db.fetch(
        "SELECT detail->>'event_id' AS event_id FROM ordo.transitions"
        " WHERE execution_id = $1::uuid AND kind = 'event_received' ORDER BY seq",
        execution_id,
    )
    return [r["event_id"] for r in rows]


async def test_an_event_routed_again_after_the_duplicate_window_is_not_taken_twice(nats_server_url, pg_dsn, prefix):
    """A trigger taken from its lane again (after a worker and server restart, the span since the lane's
    last recorded floor; or a publisher's retry) is routed again to an execution that waits for its type
    once more. JetStream drops the copy only within the execution stream's 120 s duplicate window; after
    it, the copy (here published under another msg id) reaches the execution, which must not take it:
    neither the event that enrolled it nor one it took already, also once read back from its row."""
    views = _views_of_one_contact("again")
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        execution_id = h.execution_id("acme", "views", views[0]["event_id"])
        subject = h.topology.exec_subject(execution_id)
        waiting_at = "SELECT step_id FROM ordo.event_waits WHERE execution_id = $1::uuid"

        async def routed_again(view: dict) -> None:
            body, msg_id = event_message(execution_id, view)
            await h.publish_raw(subject, body, f"{msg_id}:after-the-window")

        await h.deploy(VIEWS)
        async with h.worker():
            await h.publish_triggers(views[:1])
            await h.wait_until(waiting_at, execution_id, expect="second")
            await routed_again(views[0])
            await h.publish_triggers(views[1:2])
            await h.wait_until(waiting_at, execution_id, expect="third", timeout=20)
        async with h.worker():  # the execution is read back from its row
            await routed_again(views[1])
            await h.publish_triggers(views[2:])
            await h.wait_status(execution_id, "completed")
        assert await _events_taken(h, execution_id) == [views[1]["event_id"], views[2]["event_id"]]
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_triggers_taken_again_after_a_lost_lane_reach_only_executions_that_took_none_of_them(
    nats_server_url, pg_dsn, prefix
):
    """A lane whose consumer JetStream lost (a server restart) resumes after the floor the ledger
    recorded, which may lag: the triggers settled since come again, and are routed to the executions
    now waiting for their type. Here the floor is gone altogether, so the lane takes every trigger
    again. The first view enrolled X; the second moved X on and enrolled Y. Neither may take a view
    again: X took both (one enrolled it), and Y did not exist when the first was stored."""
    views = _views_of_one_contact("lost-lane")
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        x, y = (h.execution_id("acme", "views", view["event_id"]) for view in views[:2])
        waiting_at = "SELECT step_id FROM ordo.event_waits WHERE execution_id = $1::uuid"
        await h.deploy(VIEWS)
        async with h.worker():
            await h.publish_triggers(views[:1])
            await h.wait_until(waiting_at, x, expect="second")
            await h.publish_triggers(views[1:2])
            await h.wait_until(waiting_at, y, expect="second")
            await h.wait_until(waiting_at, x, expect="third")
            await h.wait_triggers_drained()
            lane = lane_of("acme", h.topology.lanes)
            stream, consumer = h.topology.trigger_stream_of(lane), await h.tenant_lane_consumer("acme")
        await h.js.delete_consumer(stream, consumer)
        await h.db.execute("DELETE FROM ordo.lane_floors WHERE deployment = $1", h.config.prefix)

        async with h.worker():
            await h.publish_triggers(views[2:])
            await h.wait_status(x, "completed")
            await h.wait_until(waiting_at, y, expect="third")
        assert await _events_taken(h, x) == [views[1]["event_id"], views[2]["event_id"]]
        assert await _events_taken(h, y) == [views[2]["event_id"]]
        assert await h.ledger_problems() == NO_PROBLEMS


@pytest.mark.parametrize(
    ("event", "before"),
    [
        (["ORDO_TRIGGERS", "acme", 4, 40], True),  # earlier in the same lane
        (["ORDO_TRIGGERS", "acme", 6, 60], False),  # later
        (["ORDO_TRIGGERS", "beta", 4, 40], False),  # another lane of the stream (its subject's tenant token)
        (["ORDO_TRIGGERS_1", "acme", 4, 40], False),  # another stream (trigger_streams moved the lane)
        (["ORDO_TRIGGERS", "acme", 4, 60], False),  # an earlier seq stored later: the stream was created again
        (None, False),  # routed without a place (by an older worker, an operator)
    ],
)
def test_an_execution_refuses_only_events_its_own_lane_stored_before_its_trigger(event, before):
    """An event whose tenant is not its subject's is filed in another lane than its tenant's other
    events, where the seq says nothing about order: refusing it would lose it."""
    record = ExecutionRecord(
        "x",
        "acme",
        "views",
        1,
        "c-0",
        "v-0",
        0,
        None,
        0,
        ExecutionState("x"),
        trigger_stored=["ORDO_TRIGGERS", "acme", 5, 50],
    )
    assert record.enrolled_after(event) is before
