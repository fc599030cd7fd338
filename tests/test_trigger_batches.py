"""Trigger batch messages (contract 1.1): many events in one stored message, each enrolled as if alone."""

import asyncio
import time

import nats.js.api as jsapi
import orjson
from harness import NO_PROBLEMS, WELCOME, Harness

from bench.generator import batch_message, trigger_event
from daemon import metrics
from daemon.dlq import list_letters, show_letter


def _good(i: int) -> dict:
    return trigger_event("batch", i, tenant="acme", event_type="contact.created")


async def test_each_event_of_a_batch_is_enrolled_once_and_a_bad_one_is_dead_lettered_alone(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        no_event_id = _good(900)
        del no_event_id["event_id"]
        no_type = _good(901)
        del no_type["type"]
        stranger = trigger_event("batch", 902, tenant="nobody", event_type="contact.created")
        nul = _good(903)  # Postgres refuses a NUL in jsonb: only this event's unit fails its commit
        nul["contact"]["first_name"] = "nul\u0000byte"
        future = {**_good(904), "v": 2}
        good = [_good(i) for i in range(40)]
        events = (
            good[:10]
            + [no_event_id]
            + good[10:20]
            + [no_type, "not an event", stranger]
            + good[20:30]
            + [nul, future]
            + good[30:]
        )
        bad = {
            10: "missing_field",
            21: "missing_field",
            22: "not_an_object",
            23: "unknown_tenant",
            34: "commit_error",
            35: "unsupported_version",
        }
        received = metrics.triggers_received._value.get()
        subject, body, msg_id = batch_message(h.topology, events)
        seq = await h.publish_raw(subject, body, msg_id)
        # A message that is bad as a whole is dead-lettered whole.
        whole = orjson.dumps({"v": "1.1", "events": {"not": "a list"}})
        whole_seq = await h.publish_raw(subject, whole, "whole-bad")

        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(good))
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=len(bad) + 1)
            # Acked once every event of it has committed: nothing left pending.
            await h.wait_triggers_drained()

        assert metrics.triggers_received._value.get() - received == len(events) + 1
        started = {r["event_id"] for r in await h.db.fetch("SELECT event_id FROM ordo.executions")}
        assert started == {e["event_id"] for e in good}
        letters = await h.db.fetch("SELECT * FROM ordo.dead_letters WHERE stream_seq = $1 ORDER BY batch_index", seq)
        assert {r["batch_index"]: r["reason"] for r in letters} == bad
        for letter in letters:
            # Each letter carries its event alone (with the batch's `v` if it had none): retried, it is a trigger.
            event = events[letter["batch_index"]]
            assert orjson.loads(bytes(letter["payload"])) == ({"v": "1.1", **event} if type(event) is dict else event)
        by_index = {r["batch_index"]: r for r in letters}
        assert "'events[10].event_id'" in by_index[10]["error"]
        assert "'events[21].type'" in by_index[21]["error"]
        assert "events[22] is a JSON str" in by_index[22]["error"]
        # An operator sees which event of which message: `ordo dlq list` and `show` name its index.
        stream = h.topology.triggers_stream
        listed = "\n".join(await list_letters(h.db, h.topology))
        assert all(f"{stream}:{seq}[{i}]" in listed for i in bad), listed
        shown = await show_letter(h.db, h.topology, by_index[22]["id"])
        assert "batch_index   22" in shown and 'payload       "not an event"' in shown, shown
        whole_letter = await h.db.fetchrow("SELECT * FROM ordo.dead_letters WHERE stream_seq = $1", whole_seq)
        assert whole_letter["batch_index"] is None and whole_letter["reason"] == "wrong_type"
        assert bytes(whole_letter["payload"]) == whole

        # The DLQ stream holds a copy of each, the batch's named by index.
        sub = await h.js.pull_subscribe(f"{h.config.prefix}.dlq.>", durable=None, stream=h.topology.dlq_stream)
        copies = await sub.fetch(len(bad) + 1, timeout=5)
        sources = sorted(m.headers["Ordo-Source"] for m in copies)
        assert sources == sorted([f"{stream}:{seq}[{i}]" for i in bad] + [f"{stream}:{whole_seq}"])
        assert await h.ledger_problems() == NO_PROBLEMS


async def _until_intake_stopped(
    h: Harness, worker, received: float, events_per_message: int, timeout: float = 30.0
) -> float:
    """Events the worker has taken once it can take no more while nothing commits.

    With no commit, nothing is released from the window: once it is full (in flight +
    fetch_batch > max_ack_pending) no new pull request opens. When the request that filled
    it has ended (the consumer has none waiting) and the worker has taken every message the
    server delivered (num_ack_pending, as none is acked), what it took is all it will take.
    """
    config = worker.config
    deadline = time.monotonic() + timeout
    while True:
        taken = metrics.triggers_received._value.get() - received
        if taken + config.fetch_batch > config.max_ack_pending:
            # acme's lane (the other lanes keep their probes open: num_waiting is theirs too).
            info = await h.js.consumer_info(h.topology.triggers_stream, await h.tenant_lane_consumer("acme"))
            if info.num_waiting == 0 and info.num_ack_pending * events_per_message == taken:
                return taken
        assert time.monotonic() < deadline, f"the worker's intake did not stop ({taken} events taken)"
        await asyncio.sleep(0.05)


async def test_the_in_flight_window_counts_the_events_of_a_batch_not_its_messages(nats_server_url, pg_dsn, prefix):
    """Bounded memory: 60 batches of 50 events against a window of 120 while the ledger is locked.

    A pull is bounded in messages and bytes, not events: the triggers' pulls are sized in bytes
    for the room left in the window, never below what one message may hold (4 x
    max_message_bytes, here 64 KiB, plus 64 KiB)."""
    async with Harness(
        nats_server_url, pg_dsn, prefix, max_ack_pending=120, fetch_batch=100, max_message_bytes=16384
    ) as h:
        await h.deploy(WELCOME)
        events = [_good(i) for i in range(3000)]
        for start in range(0, len(events), 50):
            await h.publish_raw(*batch_message(h.topology, events[start : start + 50]))
        received = metrics.triggers_received._value.get()
        lock = h.db.transaction()
        await lock.start()
        # Commits wait on the lock: what the worker takes in stays in flight.
        await h.db.execute("LOCK TABLE ordo.executions IN ACCESS EXCLUSIVE MODE")
        async with h.worker() as worker:
            taken = await _until_intake_stopped(h, worker, received, events_per_message=50)
            await lock.rollback()
            # The window and at most a pull of 128 KiB (about 550 of these events) past it:
            # not everything, as when a pull was 2,048 messages or 8 MiB whatever they held.
            assert 0 < taken < 1000, taken
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(events))
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_pull_stops_at_its_byte_limit_and_the_next_one_goes_on(nats_server_url, pg_dsn, prefix):
    """fetch_max_bytes: a pull of big batch messages ends at its bytes; that end is no refusal."""
    from daemon.pull import PullConsumer

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        t = h.topology
        sizes = []
        for start in range(0, 200, 20):
            subject, body, msg_id = batch_message(t, [_good(i) for i in range(start, start + 20)])
            sizes.append(len(body))
            await h.publish_raw(subject, body, msg_id)
        await h.js.add_consumer(
            t.triggers_stream, jsapi.ConsumerConfig(durable_name="pulls", ack_policy=jsapi.AckPolicy.EXPLICIT)
        )
        consumer = PullConsumer(h.nc, t.triggers_stream, "pulls", expires=0.5, max_bytes=3 * max(sizes) + 1024)
        await consumer.subscribe()
        taken = []
        for _ in range(10):
            got = await consumer.take(100)
            assert len(got) <= 3 and not consumer.refused
            taken += got
            if len(taken) == len(sizes):
                break
        assert [d.stream_seq for d in taken] == list(range(1, len(sizes) + 1))
