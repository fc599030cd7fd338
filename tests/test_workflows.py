"""The workflow language end to end: actions, waits, events, retries, timers, cancel.

Real NATS, real Postgres, a real local HTTP server as the webhook target, and
an injected clock so that "wait 2 days" passes when the test says so.
"""

import asyncio

import orjson
from aiohttp import web
from harness import NO_PROBLEMS, Clock, Harness, engine, fault_scale, observations

from bench.generator import trigger_event
from daemon import metrics
from daemon.topology import partition_of

DAY_MS = 24 * 3600 * 1000


async def _status(h: Harness, execution_id: str) -> str | None:
    return await h.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)


async def _kinds(h: Harness, execution_id: str) -> list[tuple[str, str]]:
    rows = await h.db.fetch(
        "SELECT step_id, kind FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq", execution_id
    )
    return [(r["step_id"], r["kind"]) for r in rows]


#: A timer that says when a worker has looked at the timers due by a moment of the test's clock.
MARKER = {
    "id": "marker",
    "tenant": "acme",
    "trigger": {"event": "marker.set"},
    "steps": [{"id": "tick", "type": "wait", "duration": "5s"}],
}


async def _set_marker(h: Harness, n: int) -> str:
    """A marker execution whose 5 s wait is stored; returns its id. Move the clock 5 s or more
    (but at least one timer load interval, 1 s) and wait until it completes: by then the worker
    has loaded the timers due by the new time (the first timer tick after an advance loads,
    before it pops) and popped every one of them that fell due, observing its lateness, in the
    tick that popped the marker or before (pop_due takes all that are due)."""
    event = trigger_event("marker", n, tenant="acme", event_type="marker.set")
    execution_id = h.execution_id("acme", "marker", event["event_id"])
    await h.publish_triggers([event])
    await h.wait_timer(execution_id, "wait")
    return execution_id


async def test_action_wait_event_branches_and_webhook(nats_server_url, pg_dsn, prefix, target):
    follow_up = {
        "id": "follow-up",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "welcome",
                "type": "action",
                "action": "webhook",
                "input": {"url": target.url("welcome"), "body": {"name": "{{contact.first_name}}"}},
            },
            {"id": "pause", "type": "wait", "duration": "2d"},
            {
                "id": "reply",
                "type": "wait_for_event",
                "event": "contact.replied",
                "timeout": "3d",
                "on_timeout": "nudge",
            },
            {
                "id": "replied",
                "type": "if",
                "condition": {"exists": "{{context.reply.text}}"},
                "then": "thank",
                "else": "nudge",
            },
            {
                "id": "thank",
                "type": "action",
                "action": "webhook",
                "input": {"url": target.url("thank"), "body": {"text": "{{context.reply.text}}"}},
                "next": "done",
            },
            {"id": "nudge", "type": "action", "action": "webhook", "input": {"url": target.url("nudge")}},
            {"id": "done", "type": "end"},
        ],
    }
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(follow_up)
        replies, silent = (trigger_event("fu", i, tenant="acme", event_type="contact.created") for i in (1, 2))
        a = h.execution_id("acme", "follow-up", replies["event_id"])
        b = h.execution_id("acme", "follow-up", silent["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([replies, silent])
            for execution_id in (a, b):
                await h.wait_timer(execution_id, "wait")
            assert len(target.named("welcome")) == 2
            # Two days later both wait for a reply; only one contact replies.
            clock.advance(2 * DAY_MS + 1000)
            for execution_id in (a, b):
                await h.wait_timer(execution_id, "event_timeout")
            reply = trigger_event(
                "fu-reply", 1, tenant="acme", event_type="contact.replied", data={"text": "sounds good"}
            )
            reply["contact"] = replies["contact"]
            await h.publish_triggers([reply])
            await h.wait_status(a, "completed")
            assert await _status(h, b) == "waiting"
            clock.advance(3 * DAY_MS + 1000)
            await h.wait_status(b, "completed")

        assert [c["body"] for c in target.named("thank")] == [{"text": "sounds good"}]
        assert len(target.named("nudge")) == 1
        kinds_a = await _kinds(h, a)
        assert [k for _, k in kinds_a] == [
            "started",
            "action_requested",
            "action_completed",
            "waiting",
            "timer_fired",
            "waiting",
            "event_received",
            "branch",
            "action_requested",
            "action_completed",
            "completed",
        ]
        kinds_b = await _kinds(h, b)
        assert ("reply", "timed_out") in kinds_b and ("nudge", "action_completed") in kinds_b
        # Nothing is left waiting: no timer row, no event wait.
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await h.db.fetchval("SELECT count(*) FROM ordo.event_waits") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_flaky_webhook_is_retried_with_backoff_and_one_idempotency_key(nats_server_url, pg_dsn, prefix, target):
    flaky = {
        "id": "flaky",
        "tenant": "acme",
        "trigger": {"event": "order.placed"},
        "steps": [
            {
                "id": "charge",
                "type": "action",
                "action": "webhook",
                "input": {"url": target.url("charge")},
                "retry": {"max_attempts": 5, "initial_interval": "10s", "backoff_coefficient": 2, "jitter": 0},
            },
        ],
    }
    target.script["charge"] = [503, 503, 200]
    clock = Clock()
    retried_before = metrics.actions.labels("webhook", "retryable")._value.get()
    ok_before = metrics.actions.labels("webhook", "ok")._value.get()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(flaky)
        await h.deploy(MARKER)
        event = trigger_event("flaky", 1, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "flaky", event["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([event])
            await h.wait_timer(execution_id, "retry")
            assert len(target.named("charge")) == 1
            # The first back-off is 10 s: 9 s later nothing has been retried. The marker,
            # due by then, fires; the retry, had it been due, would have fired with it.
            marker = await _set_marker(h, 1)
            fired = observations(metrics.timer_lateness)  # each fire observes its lateness
            clock.advance(9_000)
            await h.wait_status(marker, "completed")
            assert observations(metrics.timer_lateness) == fired + 1, "the retry fired before its back-off"
            assert len(target.named("charge")) == 1
            clock.advance(1_500)
            await h.wait_until("SELECT count(*) FROM ordo.transitions WHERE kind = 'action_failed'", expect=2)
            # The second back-off is 20 s.
            marker = await _set_marker(h, 2)
            fired = observations(metrics.timer_lateness)
            clock.advance(19_000)
            await h.wait_status(marker, "completed")
            assert observations(metrics.timer_lateness) == fired + 1, "the retry fired before its back-off"
            assert len(target.named("charge")) == 2
            clock.advance(1_500)
            await h.wait_status(execution_id, "completed")
        calls = target.named("charge")
        assert len(calls) == 3
        assert len({c["key"] for c in calls}) == 1 and calls[0]["key"].startswith(execution_id)
        kinds = [k for _, k in await _kinds(h, execution_id)]
        assert kinds.count("action_requested") == 3 and kinds.count("action_completed") == 1
        assert metrics.actions.labels("webhook", "retryable")._value.get() - retried_before == 2
        assert metrics.actions.labels("webhook", "ok")._value.get() - ok_before == 1
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_burst_of_slow_in_process_calls_waits_in_jetstream_not_past_its_deadlines(
    nats_server_url, pg_dsn, prefix, target
):
    """Many more calls than slots: intake pauses, so no call is queued past its deadline and made twice."""
    slow = {
        "id": "slow",
        "tenant": "acme",
        "trigger": {"event": "order.placed"},
        "steps": [
            {
                "id": "notify",
                "type": "action",
                "action": "webhook",
                "timeout": "2s",
                "input": {"url": target.url("notify")},
            }
        ],
    }
    target.delay["notify"] = 0.05
    count = 600  # at 8 calls in flight and 50 ms a call: 3.75 s of work, far more than the 2 s deadline
    async with Harness(
        nats_server_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8", action_concurrency=8, fetch_batch=32
    ) as h:
        await h.deploy(slow)
        async with h.worker():
            await h.publish_triggers(
                [trigger_event("slow", i, tenant="acme", event_type="order.placed") for i in range(count)]
            )
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=60
            )
        keys = [c["key"] for c in target.named("notify")]
        assert len(keys) == count and len(set(keys)) == count
        assert await h.db.fetchval("SELECT count(*) FROM ordo.transitions WHERE kind = 'action_failed'") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_timer_of_an_unreadable_execution_is_tried_again_a_minute_later_not_at_every_load(
    nats_server_url, pg_dsn, prefix
):
    """The fire applies nothing and the timer row stays; it used to come back with every load
    (each second) for as long as the row was broken. After a repair it fires and the execution goes on."""
    pause = {
        "id": "pause",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "wait", "type": "wait", "duration": "1h"},
            {"id": "after", "type": "set", "values": {"woke": True}},
        ],
    }
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(pause)
        await h.deploy(MARKER)
        event = trigger_event("unreadable", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "pause", event["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([event])
            await h.wait_status(execution_id, "waiting")
            runtime = await h.db.fetchval(
                "SELECT runtime::text FROM ordo.executions WHERE execution_id = $1::uuid", execution_id
            )
            await h.db.execute("UPDATE ordo.executions SET runtime = '[1]' WHERE execution_id = $1::uuid", execution_id)
            deferred = metrics.timers_deferred._value.get()
            fired = observations(metrics.timer_lateness)  # each fire observes its lateness
            clock.advance(3600_000 + 1000)
            for _ in range(200):
                if metrics.timers_deferred._value.get() > deferred:
                    break
                await asyncio.sleep(0.05)
            # A timer load after the deferral would have brought it back (its row stays), and
            # the tick after that load fired it again: the marker comes in with such a load.
            marker = await _set_marker(h, 1)
            clock.advance(6_000)  # the marker falls due; the deferred fire is a minute away
            await h.wait_status(marker, "completed")
            assert observations(metrics.timer_lateness) == fired + 2  # its one fire and the marker's
            assert metrics.timers_deferred._value.get() == deferred + 1
            assert (
                await h.db.fetchval("SELECT count(*) FROM ordo.timers WHERE execution_id = $1::uuid", execution_id) == 1
            )
            assert await _status(h, execution_id) == "waiting"

            await h.db.execute(
                "UPDATE ordo.executions SET runtime = $2::jsonb WHERE execution_id = $1::uuid", execution_id, runtime
            )
            clock.advance(61_000)
            await h.wait_status(execution_id, "completed")
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_400_is_not_retried_fails_to_the_dead_letters_and_an_operator_retry_resumes(
    nats_server_url, pg_dsn, prefix, target
):
    from daemon.dlq import retry

    strict = {
        "id": "strict",
        "tenant": "acme",
        "trigger": {"event": "order.placed"},
        "steps": [
            {"id": "charge", "type": "action", "action": "webhook", "input": {"url": target.url("charge")}},
            {"id": "after", "type": "set", "values": {"charged": True}},
        ],
    }
    target.script["charge"] = [400, 200]
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(strict)
        event = trigger_event("strict", 1, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "strict", event["event_id"])
        async with h.worker():
            await h.publish_triggers([event])
            await h.wait_status(execution_id, "failed")
            letter = await h.db.fetchrow("SELECT * FROM ordo.dead_letters WHERE reason = 'step_failed'")
            assert letter["step_id"] == "charge" and str(letter["execution_id"]) == execution_id
            assert "http_400" in letter["error"]
            assert len(orjson.loads(letter["attempts"])) == 1
            assert len(target.named("charge")) == 1
            retried = (await retry(h.db, h.js, h.topology, letter_id=letter["id"])).lines
            assert len(retried) == 1
            await h.wait_status(execution_id, "completed")
        calls = target.named("charge")
        assert len(calls) == 2 and calls[0]["key"] == calls[1]["key"]
        assert await h.db.fetchval("SELECT status FROM ordo.dead_letters WHERE id = $1", letter["id"]) == "retried"
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_timers_survive_a_restart_and_fire_once(nats_server_url, pg_dsn, prefix):
    waits = {
        "id": "waits",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "pause", "type": "wait", "duration": "1h"},
            {"id": "after", "type": "set", "values": {"woke": True}},
        ],
    }
    clock = Clock()
    count = 30
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(waits)
        await h.deploy(MARKER)
        events = [trigger_event("tw", i, tenant="acme", event_type="contact.created") for i in range(count)]
        async with h.worker(clock_ms=clock):
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.timers", expect=count)
        # The worker is gone; the timers are in the ledger. An hour later a new worker fires them.
        clock.advance(3600_000 + 1000)
        async with h.worker(clock_ms=clock):
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count)
        # A third worker finds nothing left to fire: once it owns every partition, the marker it
        # fires comes in with a load that would have brought back any timer left.
        fires = observations(metrics.timer_lateness)
        async with h.worker(clock_ms=clock):
            marker = await _set_marker(h, 1)
            clock.advance(6_000)
            await h.wait_status(marker, "completed")
        assert observations(metrics.timer_lateness) == fires + 1  # the marker's fire only
        fired = await h.db.fetchval(
            "SELECT count(*) FROM ordo.transitions WHERE kind = 'timer_fired' AND step_id = 'pause'"
        )
        assert fired == count
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_many_timers_due_in_the_same_second_all_fire_in_order(nats_server_url, pg_dsn, prefix):
    """Each execution waits twice; all first waits are due in the same second."""
    count = fault_scale(ci=3000, full=100_000)
    twice = {
        "id": "twice",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "first", "type": "wait", "duration": "10m"},
            {"id": "second", "type": "wait", "duration": "1m"},
        ],
    }
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(twice)
        events = [trigger_event("burst", i, tenant="acme", event_type="contact.created") for i in range(count)]
        async with h.worker(clock_ms=clock):
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.timers", expect=count, timeout=120)
            clock.advance(10 * 60_000 + 1000)
            await h.wait_until("SELECT count(*) FROM ordo.timers WHERE step_id = 'second'", expect=count, timeout=180)
            clock.advance(60_000 + 1000)
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=180
            )
        out_of_order = await h.db.fetchval(
            "SELECT count(*) FROM (SELECT execution_id, array_agg(step_id ORDER BY seq) AS steps"
            " FROM ordo.transitions WHERE kind = 'timer_fired' GROUP BY execution_id) t"
            " WHERE steps <> ARRAY['first', 'second']"
        )
        assert out_of_order == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_events_for_a_waiting_execution_apply_in_order_and_once(nats_server_url, pg_dsn, prefix):
    collect = {
        "id": "collect",
        "tenant": "acme",
        "trigger": {"event": "session.started"},
        "steps": [
            {"id": "first", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h"},
            {"id": "second", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h"},
            {"id": "third", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h"},
        ],
    }
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(collect)
        start = trigger_event("ev", 0, tenant="acme", event_type="session.started")
        execution_id = h.execution_id("acme", "collect", start["event_id"])
        async with h.worker() as worker:
            await h.publish_triggers([start])
            await h.wait_until("SELECT count(*) FROM ordo.event_waits", expect=1)
            views = []
            for i in range(3):
                view = trigger_event("view", i, tenant="acme", event_type="page.viewed", data={"page": i})
                view["contact"] = start["contact"]
                views.append(view)
            # Each view goes out twice (a redelivery in effect); they are routed one at a time.
            for view in views:
                await h.publish_raw(h.topology.trigger_subject("acme", "page.viewed"), orjson.dumps(view))
                await h.publish_raw(
                    h.topology.trigger_subject("acme", "page.viewed"),
                    orjson.dumps(view),
                    msg_id=view["event_id"] + "-again",
                )
                # Both copies routed, and what they put on the execution's subject applied.
                await h.wait_triggers_drained()
                await h.wait_partition_drained(partition_of(execution_id, h.config.partitions))
            await h.wait_status(execution_id, "completed")
            del worker
        context = orjson.loads(
            await h.db.fetchval("SELECT context FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
        )
        assert [context[s]["page"] for s in ("first", "second", "third")] == [0, 1, 2]
        received = [k for _, k in await _kinds(h, execution_id) if k == "event_received"]
        assert len(received) == 3


async def test_a_goto_loop_without_an_exit_fails_with_a_loop_guard_error(nats_server_url, pg_dsn, prefix):
    loop = {
        "id": "loop",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "limits": {"max_visits": 20},
        "steps": [{"id": "spin", "type": "set", "values": {"x": 1}}, {"id": "again", "type": "goto", "target": "spin"}],
    }
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(loop)
        event = trigger_event("loop", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "loop", event["event_id"])
        async with h.worker():
            await h.publish_triggers([event])
            await h.wait_status(execution_id, "failed")
        detail = await h.db.fetchval(
            "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'failed'", execution_id
        )
        assert orjson.loads(detail)["code"] == "loop_guard"


async def test_cancel_drops_the_timer_and_the_wait(nats_server_url, pg_dsn, prefix):
    waiting = {
        "id": "waiting",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [{"id": "reply", "type": "wait_for_event", "event": "contact.replied", "timeout": "7d"}],
    }
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(waiting)
        event = trigger_event("cancel", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "waiting", event["event_id"])
        async with h.worker():
            await h.publish_triggers([event])
            await h.wait_until("SELECT count(*) FROM ordo.event_waits", expect=1)
            await h.publish_raw(
                h.topology.exec_subject(execution_id),
                orjson.dumps({"v": 1, "kind": "cancel", "execution_id": execution_id, "reason": "unsubscribed"}),
            )
            await h.wait_status(execution_id, "cancelled")
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await h.db.fetchval("SELECT count(*) FROM ordo.event_waits") == 0


async def test_an_external_action_worker_killed_mid_request_completes_the_step_once(
    nats_server_url, pg_dsn, prefix, target
):
    """sms.send runs in an external worker process; it dies while the provider is answering."""
    import subprocess
    import sys

    from harness import ROOT

    texting = {
        "id": "texting",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "text",
                "type": "action",
                "action": "sms.send",
                "input": {"to": "+4915100000", "body": "Hi {{contact.first_name}}"},
                "timeout": "2m",
            }
        ],
    }
    hold = asyncio.Event()
    first_call = asyncio.Event()

    async def slow_provider(request):  # the first call hangs until the worker has been killed
        body = await request.json()
        target.calls.append({"name": "sms", "key": request.headers.get("Idempotency-Key"), "body": body})
        if len(target.named("sms")) == 1:
            first_call.set()
            await hold.wait()
        return web.json_response({"id": f"msg-{len(target.calls)}"})

    app = web.Application()
    app.router.add_post("/sms", slow_provider)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    provider = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(texting)
        env = dict(h.env(), ORDO_PROVIDER_URL=provider)
        command = [sys.executable, "-m", "actions.worker", "--example", "messaging", "--ack-wait", "1.5"]
        event = trigger_event("sms", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "texting", event["event_id"])
        try:
            async with h.worker():
                first = subprocess.Popen(command, env=env, cwd=ROOT)
                h.processes.append(first)
                await h.publish_triggers([event])
                await asyncio.wait_for(first_call.wait(), 30)
                h.kill(first)
                hold.set()
                second = subprocess.Popen(command, env=env, cwd=ROOT)
                h.processes.append(second)
                await h.wait_status(execution_id, "completed", timeout=60)
        finally:
            await runner.cleanup()
        calls = target.named("sms")
        assert len(calls) == 2, "the request was redelivered to the new worker"
        assert calls[0]["key"] == calls[1]["key"] == f"{execution_id}:text:1"
        kinds = [k for _, k in await _kinds(h, execution_id)]
        assert kinds.count("action_completed") == 1
        assert await h.ledger_problems() == NO_PROBLEMS
