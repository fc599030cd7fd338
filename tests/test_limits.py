"""Action limits (issue 18): rate and concurrency limits shared by every worker, waits that keep order.

The provider is a real local HTTP server reached by the webhook action; it
records when each call arrived, its idempotency key, and how many calls it
held at once. The assertions count calls in 1 s windows of the recorded
arrival times, never elapsed time.
"""

import asyncio
import time

import orjson
import pytest
from aiohttp import web
from harness import NO_PROBLEMS, assert_signals_recorded_while_limited, engine, ordo

from actions.sdk import ActionWorker, action
from bench.generator import trigger_event
from bench.provider import most_in_any_second
from hotpath.vocabulary import LIMIT_GRANTED, LIMIT_WAITING, WAIT_LIMIT


class Provider:
    """A third party behind a rate and a concurrency limit of its own: it only counts."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.keys: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        #: Seconds each call takes.
        self.delay = 0.0
        #: While set (not None), calls wait for it before they are answered.
        self.gate: asyncio.Event | None = None
        self._runner = None
        self.port = 0

    async def start(self) -> "Provider":
        app = web.Application()
        app.router.add_route("POST", "/send", self._send)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def _send(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await request.read()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_flight -= 1
        return web.json_response({"sent": True})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/send"

    def most_in_any_second(self) -> int:
        return most_in_any_second(self.arrivals)

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def provider():
    p = await Provider().start()
    yield p
    await p.stop()


def limited(url: str, limits: dict, *, then: list | None = None) -> dict:
    return {
        "id": "sms",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "send",
                "type": "action",
                "action": "webhook",
                "input": {"url": url, "body": {"to": "{{contact.first_name}}"}},
                "timeout": "10s",
                "limits": limits,
            },
            *(then or []),
        ],
    }


async def _completed(h, count: int, timeout: float = 120.0) -> None:
    await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=timeout)


async def test_a_rate_limit_is_never_exceeded_across_two_worker_processes_and_every_call_is_made_once(
    nats_server_url, pg_dsn, prefix, provider
):
    calls = 300
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(limited(provider.url, {"rate": "50/s"}))
        for index in range(2):
            h.spawn_worker(index, 2)
        events = [trigger_event("rate", i, tenant="acme", event_type="contact.created") for i in range(calls)]
        await h.publish_triggers(events)
        await _completed(h, calls)

        assert len(provider.keys) == calls and len(set(provider.keys)) == calls  # each call once, keys distinct
        assert provider.most_in_any_second() <= 50 * 1.05, provider.most_in_any_second()
        attempts = await h.db.fetchval(
            "SELECT count(*) FROM ordo.transitions WHERE kind = 'action_requested' AND (detail->>'attempt')::int > 1"
        )
        assert attempts == 0  # waiting used no attempt
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_queue") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_calls_waiting_on_a_limit_survive_a_worker_kill_and_are_all_made(
    nats_server_url, pg_dsn, prefix, provider
):
    calls = 120
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(limited(provider.url, {"rate": "30/s"}))
        workers = [h.spawn_worker(index, 2) for index in range(2)]
        events = [trigger_event("kill", i, tenant="acme", event_type="contact.created") for i in range(calls)]
        await h.publish_triggers(events)
        await h.wait_until("SELECT count(*) >= 30 FROM ordo.executions WHERE status = 'completed'", expect=True)
        h.kill(workers[0])  # mid-way: most calls wait in the queue, some are granted, one may be in flight
        h.spawn_worker(0, 2)
        await _completed(h, calls)

        # Every call was made; one the kill caught in flight may be made again, with the same key.
        assert len(set(provider.keys)) == calls and len(provider.keys) <= calls + 2
        assert provider.most_in_any_second() <= 30 * 1.05, provider.most_in_any_second()
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_queue") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_external_action_keeps_its_rate_and_concurrency_limits(nats_server_url, pg_dsn, prefix):
    calls, arrivals, keys = 80, [], []
    running = most_running = 0

    @action("test.sms", major=1)
    async def sms(ctx, input):
        nonlocal running, most_running
        arrivals.append(time.monotonic())
        keys.append(ctx.idempotency_key)
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.05)
        running -= 1
        return {"sent": True}

    definition = limited("unused", {"rate": "20/s", "concurrency": 2})
    definition["steps"][0].update(action="test.sms", input={"to": "{{contact.first_name}}"})
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(definition)
        for index in range(2):
            h.spawn_worker(index, 2)
        served = ActionWorker(nats_server_url, prefix=prefix, partitions=h.config.partitions, actions=[sms])
        stop = asyncio.Event()
        serving = asyncio.create_task(served.run(stop))
        try:
            events = [trigger_event("ext", i, tenant="acme", event_type="contact.created") for i in range(calls)]
            await h.publish_triggers(events)
            await _completed(h, calls)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
        assert len(keys) == calls and len(set(keys)) == calls
        assert most_in_any_second(arrivals) <= 20 * 1.05, most_in_any_second(arrivals)
        assert most_running <= 2
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_concurrency_limit_is_never_exceeded(nats_server_url, pg_dsn, prefix, provider):
    calls = 40
    provider.delay = 0.05
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(limited(provider.url, {"concurrency": 3}))
        for index in range(2):
            h.spawn_worker(index, 2)
        events = [trigger_event("conc", i, tenant="acme", event_type="contact.created") for i in range(calls)]
        await h.publish_triggers(events)
        await _completed(h, calls)
        assert len(set(provider.keys)) == calls
        assert provider.most_in_flight <= 3
        assert provider.most_in_flight == 3  # the limit was reached: the test could have failed
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_slots") == 0  # every slot given back
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_execution_waiting_on_a_limit_applies_its_signals_in_order(nats_server_url, pg_dsn, prefix, provider):
    # One slot: the first execution's call is held at the provider, so the second waits for the slot
    # while its signals arrive; they are recorded in the order sent, before its call is requested.
    provider.gate = asyncio.Event()
    then = [{"id": "go", "type": "wait_for_signal", "signal": "go"}]
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(limited(provider.url, {"concurrency": 1}, then=then))
        first, second = (trigger_event("order", i, tenant="acme", event_type="contact.created") for i in range(2))
        first_id = h.execution_id("acme", "sms", first["event_id"])
        second_id = h.execution_id("acme", "sms", second["event_id"])
        async with h.worker():
            await h.publish_triggers([first])
            await h.wait_until("SELECT count(*) FROM ordo.limit_slots", expect=1)
            await h.publish_triggers([second])
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE execution_id = $1::uuid AND waiting = $2",
                second_id,
                WAIT_LIMIT,
                expect=1,
            )
            for n in range(3):
                await h.signal(second_id, "note", {"n": n})
            await h.wait_until(
                "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal'",
                second_id,
                expect=3,
            )
            assert len(provider.keys) == 1  # the second call is not made while the first holds the slot
            provider.gate.set()
            for execution_id in (first_id, second_id):
                await h.signal_once_waiting(execution_id, "go")
            await _completed(h, 2)

        await assert_signals_recorded_while_limited(h.db, second_id)
        assert await h.ledger_problems() == NO_PROBLEMS


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ({"rate": 0}, "limits.rate"),
        ({"rate": "0/s"}, "limits.rate"),
        ({"rate": "50 per sec"}, "limits.rate"),
        ({"rate": "-5/s"}, "limits.rate"),
        ({"concurrency": 0}, "limits.concurrency"),
        ({"concurrency": -1}, "limits.concurrency"),
        ({"rate": "50/s", "burst": 10}, "burst"),
        ({}, "limits"),
    ],
)
def test_a_zero_negative_malformed_or_unknown_limit_is_refused_naming_the_step(tmp_path, limits, says):
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(limited("http://example.com/send", limits)))
    result = ordo("workflow", "validate", str(path))
    assert result.returncode == 1, result.stdout
    assert "steps[0] (id 'send')" in result.stderr and says in result.stderr, result.stderr


def test_a_well_formed_limit_is_valid(tmp_path):
    path = tmp_path / "good.json"
    limits = {"rate": "600/m", "concurrency": 5, "key": "{{contact.phone}}"}
    path.write_bytes(orjson.dumps(limited("http://example.com/send", limits)))
    result = ordo("workflow", "validate", str(path))
    assert result.returncode == 0, result.stderr


# -- the dispatcher's limit wait, compiled and pure ------------------------------------------


def _transitions_as_stored(transitions: list) -> list[dict]:
    return [
        {"seq": seq, "step_id": step_id, "kind": kind, "detail": detail, "at_ms": 0, "source_seq": None}
        for seq, step_id, kind, detail in transitions
    ]


def test_a_limited_step_waits_for_its_grant_and_a_retry_waits_again_without_a_deadline(impl):
    definition = limited(
        "http://example.com/send", {"rate": "50/s", "key": "{{contact.phone}}"}, then=[{"id": "done", "type": "end"}]
    )
    definition["steps"][0]["retry"] = {"max_attempts": 2, "initial_interval": "1s", "jitter": 0}
    program = impl.Program(definition)
    state = impl.ExecutionState("exec-1", subject={"phone": "+1555", "first_name": "Ada"}, tenant="acme")
    made = list(impl.advance(program, state, "start", None))
    assert [k for _, _, k, _ in made] == ["started", LIMIT_WAITING]
    bucket = "webhook@1|acme|+1555"
    assert [kind for kind, _ in state.effects] == ["limit_wait"]  # no call, and no deadline timer
    assert state.effects[0][1]["bucket"] == bucket and state.effects[0][1]["rate_per_s"] == 50.0
    assert (state.waiting, state.timer) == (WAIT_LIMIT, None)

    def apply(kind, payload):
        state.effects = []
        out = impl.advance(program, state, kind, payload, 1_000)
        made.extend(out)
        return [k for _, _, k, _ in out]

    assert apply("limit_granted", {"step_id": "send", "attempt": 2}) == []  # not its attempt: stale
    assert apply("signal", {"name": "note", "data": 1}) == ["signal"]
    assert apply("limit_granted", {"step_id": "send", "attempt": 1}) == [LIMIT_GRANTED, "action_requested"]
    action = next(data for kind, data in state.effects if kind == "action")
    assert action["rate_limit"] == {"bucket": bucket, "rate_per_s": 50.0}
    assert apply("limit_granted", {"step_id": "send", "attempt": 1}) == []  # a repeated grant changes nothing
    failure = {"code": "busy", "retryable": True, "message": "try later"}
    assert apply("action_result", {"step_id": "send", "attempt": 1, "ok": False, "error": failure}) == ["action_failed"]
    assert ("limit_release", None) in state.effects  # its slot goes back while it backs off
    assert apply("timer", {"timer_id": state.timer}) == [LIMIT_WAITING]  # the retry queues again
    assert (state.waiting, state.timer, state.attempt) == (WAIT_LIMIT, None, 2)
    assert apply("limit_granted", {"step_id": "send", "attempt": 2}) == [LIMIT_GRANTED, "action_requested"]
    assert apply("action_result", {"step_id": "send", "attempt": 2, "ok": True, "output": {}}) == [
        "action_completed",
        "completed",
    ]

    # Replay reads the grants back from the history and makes the same transitions.
    from daemon import replay

    inputs, incomplete = replay.inputs_of(_transitions_as_stored(made))
    again = replay.rerun(program, "exec-1", "acme", {"phone": "+1555", "first_name": "Ada"}, {}, inputs, impl=impl)
    assert not incomplete and not again.errors
    assert [t[2] for t in again.transitions] == [t[2] for t in made]


def test_a_cancel_while_waiting_on_a_limit_gives_back_its_place(impl):
    program = impl.Program(limited("http://example.com/send", {"concurrency": 2}))
    state = impl.ExecutionState("exec-1", tenant="acme")
    impl.advance(program, state, "start", None)
    assert state.effects[0][1]["bucket"] == "webhook@1|acme" and state.effects[0][1]["rate_per_s"] is None
    state.effects = []
    impl.advance(program, state, "cancel", {"reason": "operator"})
    assert ("limit_release", None) in state.effects and state.status == "cancelled"
