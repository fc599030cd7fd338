"""End to end on real NATS JetStream and real Postgres: enrolment, dedupe, ordering."""

import asyncio
import random
import time

import asyncpg
import orjson
from harness import NO_PROBLEMS, WAITER, WELCOME, Harness, observations

from bench.generator import trigger_event
from daemon import metrics
from daemon.topology import trigger_msg_id


def _counter(counter, label: str) -> float:
    return counter.labels(label)._value.get()


BIG_ORDER = {
    "id": "big-order",
    "tenant": "acme",
    "trigger": {"event": "order.placed", "filter": {"gte": ["{{event.data.amount}}", 100]}},
    "steps": [{"id": "flag", "type": "set", "values": {"vip": True, "amount": "{{event.data.amount}}"}}],
}


def _events(run_id: str, count: int) -> list[dict]:
    """contact.created, order.placed (half of them big) and page.viewed (matches nothing)."""
    events = []
    for i in range(count):
        kind = ("contact.created", "order.placed", "page.viewed")[i % 3]
        events.append(trigger_event(run_id, i, tenant="acme", event_type=kind, data={"amount": (i * 7) % 200}))
    return events


def _expected(h: Harness, events: list[dict]) -> set[tuple[str, str]]:
    expected = set()
    for e in events:
        if e["type"] == "contact.created":
            expected.add(("welcome", e["event_id"]))
        elif e["type"] == "order.placed" and e["data"]["amount"] >= 100:
            expected.add(("big-order", e["event_id"]))
    return expected


async def test_two_thousand_triggers_with_duplicates_enrol_exactly_once(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(BIG_ORDER)
        events = _events("e2e", 2000)
        rng = random.Random(7)
        duplicates = rng.sample(events, 200)
        await h.publish_triggers(events)
        # Half the duplicates are exact re-publishes (JetStream's duplicate
        # window drops them); the other half slip past it with another
        # Nats-Msg-Id, so the ledger's unique key has to absorb them.
        for i, event in enumerate(duplicates):
            msg_id = trigger_msg_id(event) if i % 2 else f"{event['event_id']}-again"
            await h.publish_raw(h.topology.trigger_subject("acme", event["type"]), orjson.dumps(event), msg_id)
        expected = _expected(h, events)
        enrolling = {event_id for _, event_id in expected}
        other_msg_id = [e for i, e in enumerate(duplicates) if i % 2 == 0]
        slipped_past_jetstream = sum(1 for e in other_msg_id if e["event_id"] in enrolling)
        deduplicated_before = metrics.deduplicated._value.get()
        ended_before = observations(metrics.end_to_end_seconds)
        advanced_before = observations(metrics.advance_seconds)

        async with h.worker(0, 2), h.worker(1, 2):
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(expected))
            # Let every duplicate and non-matching trigger settle as well.
            await h.wait_triggers_drained()

        # The ledger, not JetStream, absorbed the duplicates with another msg id.
        assert metrics.deduplicated._value.get() - deduplicated_before == slipped_past_jetstream
        # Every execution that ended counted once in the end-to-end latency.
        assert observations(metrics.end_to_end_seconds) - ended_before == len(expected)
        # Each enrolment ran the dispatcher once (duplicates run it too, then lose on the key).
        assert observations(metrics.advance_seconds) - advanced_before >= len(expected)
        rows = await h.db.fetch("SELECT workflow_id, event_id, status, seq FROM ordo.executions")
        assert {(r["workflow_id"], r["event_id"]) for r in rows} == expected
        assert len(rows) == len(expected), "an execution exists twice"
        assert {r["status"] for r in rows} == {"completed"}
        assert await h.ledger_problems() == NO_PROBLEMS
        german = await h.db.fetchval(
            "SELECT count(*) FROM ordo.executions WHERE workflow_id = 'welcome' AND context->>'locale' = 'de'"
        )
        assert german == sum(1 for e in events if e["type"] == "contact.created" and e["contact"]["country"] == "DE")
        # Every transition of the welcome workflow, in order, for one execution.
        kinds = await h.db.fetch(
            "SELECT step_id, kind FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq",
            h.execution_id("acme", "welcome", "e2e-3"),  # a US contact
        )
        assert [(k["step_id"], k["kind"]) for k in kinds] == [
            ("", "started"),
            ("greet", "set"),
            ("by-country", "branch"),
            ("english", "set"),
            ("done", "completed"),
        ]
        # It ran to its end in one commit: its own row holds all five, ordo.history none (migration 016).
        history = await h.db.fetch(
            "SELECT first_seq FROM ordo.history WHERE execution_id = $1::uuid",
            h.execution_id("acme", "welcome", "e2e-3"),
        )
        assert history == []
        in_row = await h.db.fetchval(
            "SELECT json_array_length(enrolment_steps) FROM ordo.executions WHERE execution_id = $1::uuid",
            h.execution_id("acme", "welcome", "e2e-3"),
        )
        assert in_row == 5
        # Completed, it keeps no runtime (no step of it runs again), and its subject is its
        # event's contact, which the row does not store twice (migration 015).
        row = await h.db.fetchrow(
            "SELECT runtime, subject, event FROM ordo.executions WHERE execution_id = $1::uuid",
            h.execution_id("acme", "welcome", "e2e-3"),
        )
        assert orjson.loads(row["runtime"]) == {}
        assert row["subject"] is None and orjson.loads(row["event"])["contact"]["id"]


async def test_signals_are_applied_in_publish_order_per_execution(nats_server_url, pg_dsn, prefix):
    """Many executions, signals interleaved across them, redeliveries in the middle."""
    async with Harness(nats_server_url, pg_dsn, prefix, ack_wait_s=1.0) as h:
        await h.deploy(WAITER)
        executions = 40
        ticks = 25
        events = [trigger_event("ord", i, tenant="acme", event_type="session.started") for i in range(executions)]
        ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in events]
        async with h.worker():
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=executions)
        # Publish with no worker running, interleaved across executions in a
        # shuffled execution order each round; the per-execution order is i.
        rng = random.Random(3)
        for i in range(ticks):
            order = list(range(executions))
            rng.shuffle(order)
            for n in order:
                await h.signal(ids[n], "tick", {"i": i}, signal_id=f"tick-{i}")
        for n in range(executions):
            await h.signal(ids[n], "done", {"ok": True}, signal_id="done")

        # Hold the ledger's transitions table locked for longer than AckWait
        # (1 s) while the worker has signals in flight: JetStream redelivers
        # them while their originals wait to commit. The redelivered copies
        # must queue behind their originals and then commit nothing.
        redelivered_before = _counter(metrics.redeliveries, h.topology.exec_stream)
        duplicates_before = _counter(metrics.exec_messages, "duplicate")
        async with h.worker():
            blocker = await asyncpg.connect(h.config.pg_dsn)
            try:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE ordo.transitions IN SHARE ROW EXCLUSIVE MODE")
                    # Locked until the worker has taken redelivered copies of what waits on the lock.
                    deadline = time.monotonic() + 30
                    while _counter(metrics.redeliveries, h.topology.exec_stream) == redelivered_before:
                        assert time.monotonic() < deadline, "nothing was redelivered while the commits waited"
                        await asyncio.sleep(0.05)
            finally:
                await blocker.close()
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=executions)
        assert _counter(metrics.redeliveries, h.topology.exec_stream) > redelivered_before
        assert _counter(metrics.exec_messages, "duplicate") > duplicates_before

        for execution_id in ids:
            rows = await h.db.fetch(
                "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal' ORDER BY seq",
                execution_id,
            )
            applied = [orjson.loads(r["detail"]) for r in rows]
            assert [d["data"]["i"] for d in applied[:-1]] == list(range(ticks)), execution_id
            assert applied[-1]["name"] == "done"
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_backlog_on_every_partition_at_once_fits_the_ordering_ring(nats_server_url, pg_dsn, prefix):
    """A pull request opens while in_flight + fetch_batch <= max_ack_pending, and then every open
    request (the triggers' and one per partition) may deliver a whole batch: a worker that starts on
    a backlog in every partition must have a ring for all of it, not stop on an overflow."""
    from daemon.topology import partition_of

    async with Harness(nats_server_url, pg_dsn, prefix, partitions=8) as h:
        await h.deploy(WAITER)
        executions = 240
        events = [trigger_event("ring", i, tenant="acme", event_type="session.started") for i in range(executions)]
        ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in events]
        assert {partition_of(x, 8) for x in ids} == set(range(8))
        async with h.worker():
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=executions)
        for execution_id in ids:
            await h.signal(execution_id, "done", {"ok": True}, signal_id="done")
        # The smallest ring the worker allows, and open requests that together outweigh max_ack_pending.
        async with h.worker(fetch_batch=25, max_ack_pending=50, ring_capacity=1) as worker:
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=executions)
            assert not worker.stopping.is_set()
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_atomic_batches_of_triggers_enrol_like_single_publishes(nats_server_url, pg_dsn, prefix):
    """A Triggers service may publish atomic batches (one fsync per batch); each event is still one message."""
    from bench.generator import publish_events, supports_atomic_batches

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        assert await supports_atomic_batches(h.js, h.topology)
        events = [trigger_event("atomic", i, tenant="acme", event_type="contact.created") for i in range(450)]
        # An exact duplicate inside a later batch: JetStream's msg-id window drops it.
        events.append(dict(events[3]))
        assert await publish_events(h.js, h.topology, iter(events), atomic_batch=100) == 451
        info = await h.js.stream_info(h.topology.triggers_stream)
        assert info.state.messages == 450
        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=450)
        assert await h.ledger_problems() == NO_PROBLEMS
