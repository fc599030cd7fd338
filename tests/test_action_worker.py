"""External action workers on real NATS: pull, run, reply on the execution's subject, then ack.

The crash test kills a real `python -m actions.worker` process mid-request and
checks the at-least-once promise: the request runs again after ack_wait with
the same idempotency key, and the execution gets one result for the attempt.
"""

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time

import nats as nats_py
import orjson
import pytest
from aiohttp import web

from actions.contract import ActionError, decode_result, encode, request
from actions.sdk import ActionWorker, action
from daemon.config import Config
from daemon.topology import Topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTITIONS = 4


class Bus:
    """The test's NATS: streams under its own prefix, publishing requests, reading results."""

    def __init__(self, url: str, prefix: str):
        self.url = url
        self.prefix = prefix
        self.topology = Topology(Config(nats_url=url, prefix=prefix, partitions=PARTITIONS))
        self.nc = None
        self.js = None

    async def __aenter__(self):
        self.nc = await nats_py.connect(self.url)
        self.js = self.nc.jetstream(timeout=10)
        await self.topology.ensure(self.js)
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()

    def worker(self, actions, **settings) -> ActionWorker:
        settings.setdefault("ack_wait_s", 2.0)
        return ActionWorker(self.url, prefix=self.prefix, partitions=PARTITIONS, actions=actions, **settings)

    async def send(
        self,
        name: str,
        input: dict,
        *,
        execution_id: str | None = None,
        step_id: str = "step",
        attempt: int = 1,
        deadline_s: float = 30.0,
        major: int = 1,
        msg_id: str | None = None,
    ) -> dict:
        execution_id = execution_id or f"exec-{secrets.token_hex(4)}"
        doc = request(
            execution_id=execution_id,
            step_id=step_id,
            attempt=attempt,
            idempotency_key=f"{execution_id}:{step_id}:0",
            action=name,
            major=major,
            input=input,
            deadline=int((time.time() + deadline_s) * 1000),
            tenant="acme",
        )
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.js.publish(self.topology.action_subject(name, major), encode(doc), headers=headers)
        return doc

    async def results(self, execution_id: str, expect: int = 1, timeout: float = 15.0) -> list:
        """Every message on the execution's subject, once `expect` are there and no request is left.

        A worker acks (or terminates) a request only after JetStream has stored its result: with
        the actions stream empty, every result there will be is stored, extras included.
        """
        deadline = time.monotonic() + timeout
        while await self.pending_requests() or await self.stored(execution_id) < expect:
            assert time.monotonic() < deadline, (
                f"{await self.stored(execution_id)} results, {await self.pending_requests()} requests left"
            )
            await asyncio.sleep(0.02)
        stored = await self.stored(execution_id)
        if not stored:
            return []
        sub = await self.js.pull_subscribe(self.topology.exec_subject(execution_id), stream=self.topology.exec_stream)
        got = []
        try:
            while len(got) < stored:
                got += await sub.fetch(stored - len(got), timeout=5)
        finally:
            await sub.unsubscribe()
        return got

    async def stored(self, execution_id: str) -> int:
        """Messages on the execution's subject now."""
        subject = self.topology.exec_subject(execution_id)
        info = await self.js.stream_info(self.topology.exec_stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)

    async def pending_requests(self) -> int:
        return (await self.js.stream_info(self.topology.actions_stream)).state.messages


@pytest.fixture
async def bus(nats_server_url, prefix):
    async with Bus(nats_server_url, prefix) as b:
        yield b


class Running:
    """A worker running in this event loop; stopped (drained) on exit."""

    def __init__(self, worker: ActionWorker):
        self.worker = worker
        self.stop = asyncio.Event()
        self.task = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.worker.run(self.stop))
        ready = asyncio.create_task(self.worker.ready.wait())
        await asyncio.wait((ready, self.task), timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()
        assert self.worker.ready.is_set()
        return self.worker

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


calls: list = []


@action("test.echo", major=1)
async def echo(ctx, input):
    calls.append((ctx.idempotency_key, ctx.attempt))
    if input.get("fail"):
        raise ActionError("provider_down", True, "try later")
    if input.get("sleep"):
        await asyncio.sleep(input["sleep"])
    return {"echo": input, "key": ctx.idempotency_key, "tenant": ctx.tenant}


@pytest.fixture(autouse=True)
def _reset_calls():
    calls.clear()


# -- the round trip ------------------------------------------------------------------------


async def test_a_request_is_run_and_its_result_lands_on_the_execution_subject(bus):
    async with Running(bus.worker([echo])) as worker:
        doc = await bus.send("test.echo", {"n": 1}, attempt=3)
        got = await bus.results(doc["execution_id"])
    assert len(got) == 1
    msg = got[0]
    assert msg.subject == bus.topology.exec_subject(doc["execution_id"])
    assert msg.headers["Nats-Msg-Id"] == f"result:{doc['execution_id']}:step:3"
    result = decode_result(msg.data, 1 << 20)
    assert result == {
        "v": 1,
        "kind": "action_result",
        "execution_id": doc["execution_id"],
        "step_id": "step",
        "attempt": 3,
        "ok": True,
        "output": {"echo": {"n": 1}, "key": f"{doc['execution_id']}:step:0", "tenant": "acme"},
    }
    assert worker.counts["ok"] == 1
    assert await bus.pending_requests() == 0  # acked: gone from the work queue


async def test_an_action_error_is_a_result_too(bus):
    async with Running(bus.worker([echo])):
        doc = await bus.send("test.echo", {"fail": True})
        got = await bus.results(doc["execution_id"])
    result = orjson.loads(got[0].data)
    assert result["ok"] is False
    assert result["error"] == {"code": "provider_down", "retryable": True, "message": "try later"}
    assert await bus.pending_requests() == 0


async def test_a_request_past_its_deadline_is_answered_without_running(bus):
    doc = await bus.send("test.echo", {"n": 1}, deadline_s=-1)
    async with Running(bus.worker([echo])) as worker:
        got = await bus.results(doc["execution_id"])
    result = orjson.loads(got[0].data)
    assert result["ok"] is False
    assert (result["error"]["code"], result["error"]["retryable"]) == ("deadline_exceeded", True)
    assert calls == [] and worker.counts["error:deadline_exceeded"] == 1
    assert await bus.pending_requests() == 0


async def test_running_into_the_deadline_is_a_timeout(bus):
    async with Running(bus.worker([echo])):
        doc = await bus.send("test.echo", {"sleep": 5}, deadline_s=0.5)
        got = await bus.results(doc["execution_id"])
    assert orjson.loads(got[0].data)["error"]["code"] == "timeout"


async def test_malformed_requests_are_terminated_and_dead_lettered_and_never_block_others(bus):
    subject = bus.topology.action_subject("test.echo", 1)
    await bus.js.publish(subject, b"{not json")
    await bus.js.publish(subject, orjson.dumps({"v": 7, "execution_id": "x"}))
    await bus.js.publish(subject, orjson.dumps({"v": 1, "execution_id": "x", "step_id": "s", "attempt": 1}))
    dlq = await bus.js.pull_subscribe(f"{bus.prefix}.dlq.>", stream=bus.topology.dlq_stream)
    async with Running(bus.worker([echo])) as worker:
        doc = await bus.send("test.echo", {"n": 2})
        got = await bus.results(doc["execution_id"])
        assert orjson.loads(got[0].data)["ok"] is True
        letters = await dlq.fetch(3, timeout=5)
    assert worker.counts["rejected:malformed_json"] == 1
    assert worker.counts["rejected:unsupported_version"] == 1
    assert worker.counts["rejected:missing_field"] == 1
    assert sorted(m.headers["Ordo-Reason"] for m in letters) == [
        "malformed_json",
        "missing_field",
        "unsupported_version",
    ]
    assert any(m.data == b"{not json" for m in letters)
    assert await bus.pending_requests() == 0


async def test_a_repeated_request_publishes_one_result_per_attempt(bus):
    # What a worker dying between the result's publish and the request's ack
    # leads to: the request runs twice, the result is kept once.
    async with Running(bus.worker([echo])):
        doc = await bus.send("test.echo", {"n": 1}, execution_id="exec-dup", msg_id="a")
        await bus.send("test.echo", {"n": 1}, execution_id="exec-dup", msg_id="b")
        got = await bus.results("exec-dup", expect=1)
        for _ in range(50):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.05)
    assert calls == [(doc["idempotency_key"], 1)] * 2
    assert len(got) == 1


async def test_concurrency_is_bounded(bus):
    running, peak = 0, 0

    @action("test.count", major=1)
    async def count(ctx, input):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return {}

    docs = [await bus.send("test.count", {}) for _ in range(12)]
    async with Running(bus.worker([count, echo], concurrency=3)) as worker:
        for doc in docs:
            assert len(await bus.results(doc["execution_id"])) == 1
    assert peak <= 3 and worker.counts["ok"] == 12


async def test_a_long_action_keeps_its_request_past_ack_wait(bus):
    # In-progress acks hold the request while it runs: no redelivery, one run.
    async with Running(bus.worker([echo], ack_wait_s=1.0)):
        doc = await bus.send("test.echo", {"sleep": 3.0})
        got = await bus.results(doc["execution_id"])
    assert len(calls) == 1 and len(got) == 1
    assert await bus.pending_requests() == 0


async def test_a_stop_lets_the_requests_in_flight_finish(bus):
    running = Running(bus.worker([echo]))
    async with running:
        doc = await bus.send("test.echo", {"sleep": 1.0})
        while not calls:
            await asyncio.sleep(0.02)
    got = await bus.results(doc["execution_id"])
    assert orjson.loads(got[0].data)["ok"] is True
    assert await bus.pending_requests() == 0


# -- a worker process killed mid-request ------------------------------------------------------


class Provider:
    """An SMS provider that hangs on its first request (so the worker can be killed) and answers the rest."""

    def __init__(self):
        self.seen: list[dict] = []
        self.first = asyncio.Event()
        self.url = ""

    async def sms(self, request: web.Request) -> web.Response:
        self.seen.append(
            {
                "key": request.headers.get("Idempotency-Key"),
                "body": await request.json(),
                "attempt": request.headers.get("X-Ordo-Attempt"),
                "at": time.monotonic(),
            }
        )
        if len(self.seen) == 1:
            self.first.set()
            await asyncio.sleep(3600)
        return web.json_response({"id": f"sms-{len(self.seen)}"})


@pytest.fixture
async def provider():
    p = Provider()
    app = web.Application()
    app.router.add_post("/sms", p.sms)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    p.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield p
    await runner.cleanup()


def spawn(bus: Bus, provider: Provider, ack_wait: float) -> subprocess.Popen:
    env = dict(
        os.environ,
        ORDO_NATS_URL=bus.url,
        ORDO_PREFIX=bus.prefix,
        ORDO_PARTITIONS=str(PARTITIONS),
        ORDO_PROVIDER_URL=provider.url,
        ORDO_LOG_LEVEL="warning",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actions.worker",
            "--example",
            "messaging",
            "--action",
            "sms.send@1",
            "--ack-wait",
            str(ack_wait),
        ],
        env=env,
        cwd=ROOT,
    )


async def test_a_killed_worker_s_request_runs_again_with_the_same_key_and_completes_once(bus, provider):
    ack_wait = 1.5
    first = spawn(bus, provider, ack_wait)
    second = None
    try:
        doc = await bus.send(
            "sms.send", {"to": "+15550100", "body": "hello"}, execution_id="exec-kill", step_id="sms", deadline_s=60
        )
        await asyncio.wait_for(provider.first.wait(), 30)  # the side effect is under way
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        assert await bus.stored("exec-kill") == 0  # its call never returned: nothing was published
        second = spawn(bus, provider, ack_wait)
        got = await bus.results("exec-kill", expect=1, timeout=30)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert len(provider.seen) == 2
    assert provider.seen[0]["key"] == provider.seen[1]["key"] == doc["idempotency_key"] == "exec-kill:sms:0"
    assert provider.seen[0]["body"] == provider.seen[1]["body"] == {"to": "+15550100", "body": "hello"}
    assert provider.seen[1]["at"] - killed_at >= ack_wait * 0.8  # redelivered after ack_wait, not before
    assert len(got) == 1  # one result for the attempt
    result = decode_result(got[0].data, 1 << 20)
    assert result["ok"] is True and result["attempt"] == 1 and result["step_id"] == "sms"
    assert result["output"] == {"status": 200, "provider": {"id": "sms-2"}}
    assert await bus.pending_requests() == 0


async def test_the_cli_refuses_an_unknown_action():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actions.worker",
        "--action",
        "nope@1",
        cwd=ROOT,
        env=dict(os.environ, ORDO_NATS_URL="nats://127.0.0.1:1"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0 and b"no action nope@1" in err and b"webhook@1" in err
