"""OpenTelemetry traces of executions (issue 19, "Traces"): real NATS, Postgres and OTLP over HTTP.

The collector is a real local HTTP server that decodes the OTLP/HTTP protobuf
export requests with opentelemetry-proto, as a collector does; the webhook's
receiver is another. The tracing tests need the `otel` extra (the test extra
installs it); the last tests check that the engine runs without it.
"""

import asyncio
import os
import subprocess
import sys
import time
import uuid

import orjson
import pytest
from aiohttp import web
from harness import ROOT, WAITER, engine

from actions.sdk import ActionWorker, action
from bench.generator import trigger_event
from daemon import config, tracing
from daemon.trace_context import (
    execution_trace_id,
    format_traceparent,
    parse_traceparent,
    sampled,
    span_id,
    trigger_traceparent,
)
from daemon.trace_spans import Execution, Transition, closed_spans
from hotpath import dispatcher

try:
    import opentelemetry.exporter.otlp.proto.http  # noqa: F401 - what a traced worker exports with
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
except ImportError:
    trace_service = None

needs_otel = pytest.mark.skipif(
    trace_service is None,
    reason="the OpenTelemetry packages are not installed: pip install -e '.[otel]' (the test extra has them)",
)

TRACED = {
    "id": "traced",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "greet", "type": "set", "values": {"greeting": "Hi {{contact.first_name}}"}},
        {"id": "call", "type": "action", "action": "webhook", "input": {"url": "URL"}, "timeout": "10s"},
        {"id": "pause", "type": "wait", "duration": "200ms"},
        {"id": "done", "type": "set", "values": {"finished": True}},
    ],
}

EXTERNAL = {
    "id": "external",
    "tenant": "acme",
    "trigger": {"event": "order.placed"},
    "steps": [{"id": "text", "type": "action", "action": "sms.send", "input": {"to": "+15550100"}, "timeout": "30s"}],
}


class Collector:
    """An OTLP/HTTP collector on 127.0.0.1 (POST /v1/traces) and a webhook receiver (/hook)."""

    def __init__(self):
        self.exports = 0
        self.spans: list[dict] = []
        self.hooks: list[dict] = []
        self.runner = None
        self.port = 0

    async def start(self) -> "Collector":
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = trace_service.ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.exports += 1
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "error": span.status.code == 2,
                            "service": resource.get("service.name"),
                        }
                    )
        body = trace_service.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def _hook(self, request: web.Request) -> web.Response:
        self.hooks.append({"headers": dict(request.headers), "body": await request.read()})
        return web.json_response({"ok": True})

    def trace(self, trace_id: str) -> list[dict]:
        return [s for s in self.spans if s["trace_id"] == trace_id]

    async def wait_for(self, trace_id: str, name: str, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if any(s["name"] == name for s in spans):
                return spans
            await asyncio.sleep(0.05)
        raise AssertionError(f"no span {name!r} in trace {trace_id} after {timeout}s: {self.trace(trace_id)}")

    async def stop(self) -> None:
        await self.runner.cleanup()


def observations(counter) -> float:
    """A prometheus Counter's value in this process (the in-process workers count into it)."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
async def collector():
    c = await Collector().start()
    yield c
    await c.stop()


def _traced(url: str) -> dict:
    definition = orjson.loads(orjson.dumps(TRACED))
    definition["steps"][1]["input"]["url"] = url
    return definition


async def _publish(h, event: dict, traceparent: str | None = None) -> None:
    headers = {"Nats-Msg-Id": f"{event['tenant']}:{event['event_id']}"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    await h.js.publish(h.topology.trigger_subject(event["tenant"], event["type"]), orjson.dumps(event), headers=headers)


def _check_tree(spans: list[dict], trace_id: str, root_parent: str) -> dict:
    """The shape of one execution's trace; returns its spans by name."""
    assert {s["trace_id"] for s in spans} == {trace_id}
    ids = [s["span_id"] for s in spans]
    assert len(ids) == len(set(ids)), f"a span was exported twice: {[s['name'] for s in spans]}"
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {
        "execution traced",
        "enrol",
        "step greet",
        "step call",
        "action webhook",
        "step pause",
        "wait",
        "step done",
    }, sorted(by_name)
    root = by_name["execution traced"]
    assert root["parent_id"] == root_parent
    assert root["attributes"]["ordo.status"] == "completed"
    for name in ("enrol", "step greet", "step call", "step pause", "step done"):
        assert by_name[name]["parent_id"] == root["span_id"], name
    assert by_name["action webhook"]["parent_id"] == by_name["step call"]["span_id"]
    assert by_name["wait"]["parent_id"] == by_name["step pause"]["span_id"]
    for span in spans:  # every parent is in the trace (the root's is the trigger's, outside it)
        assert span is root or span["parent_id"] in ids, span["name"]
        assert span["start"] <= span["end"], span["name"]
        assert root["start"] <= span["start"] and span["end"] <= root["end"], span["name"]
        assert span["service"] == "ordo"
    # The wait lasted its 200 ms, within its step; the steps follow each other.
    wait = by_name["wait"]
    assert wait["end"] - wait["start"] >= 150_000_000
    assert by_name["step call"]["end"] <= by_name["step pause"]["start"] <= by_name["step done"]["start"]
    return by_name


@needs_otel
async def test_a_traced_execution_is_one_tree_of_spans_and_its_webhook_carries_the_trace(
    nats_server_url, pg_dsn, prefix, collector
):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(_traced(f"{collector.endpoint}/hook"))
        plain = trigger_event("tr", 1, tenant="acme")
        continued = trigger_event("tr", 2, tenant="acme")
        upstream_trace, upstream_span = uuid.uuid4().hex, os.urandom(8).hex()
        async with h.worker(trace_sample=1.0, otlp_endpoint=collector.endpoint):
            await _publish(h, plain)
            await _publish(h, continued, f"00-{upstream_trace}-{upstream_span}-01")
            for event in (plain, continued):
                await h.wait_status(h.execution_id("acme", "traced", event["event_id"]), "completed")
            plain_id = h.execution_id("acme", "traced", plain["event_id"])
            plain_trace = f"{execution_trace_id(plain_id):032x}"
            await collector.wait_for(plain_trace, "execution traced")
            await collector.wait_for(upstream_trace, "execution traced")

        # Without a traceparent the trace id is the execution id; the root has no parent.
        assert plain_trace == plain_id.replace("-", "")
        spans = _check_tree(collector.trace(plain_trace), plain_trace, root_parent="")
        # With one, the execution's root is a child of the trigger's span, in its trace.
        _check_tree(collector.trace(upstream_trace), upstream_trace, root_parent=upstream_span)

        # The webhook call carried the action call span's context, so the receiver's spans join it.
        assert len(collector.hooks) == 2
        sent = {parse_traceparent(hook["headers"]["traceparent"]) for hook in collector.hooks}
        call = spans["action webhook"]
        assert (int(plain_trace, 16), int(call["span_id"], 16)) in sent
        assert {trace for trace, _ in sent} == {int(plain_trace, 16), int(upstream_trace, 16)}
        assert call["attributes"]["ordo.outcome"] == "action_completed"


@needs_otel
async def test_an_external_action_gets_its_call_spans_traceparent_over_jetstream(
    nats_server_url, pg_dsn, prefix, collector
):
    seen = []

    @action("sms.send", major=1)
    async def send_sms(ctx, input):
        seen.append(ctx.traceparent)  # what a provider's SDK would continue
        return {"sent": True}

    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(EXTERNAL)
        event = trigger_event("ext", 1, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "external", event["event_id"])
        trace = f"{execution_trace_id(execution_id):032x}"
        provider = ActionWorker.from_config(h.config, [send_sms])
        stop = asyncio.Event()
        serving = asyncio.create_task(provider.run(stop))
        try:
            async with h.worker(trace_sample=1.0, otlp_endpoint=collector.endpoint):
                await _publish(h, event)
                await h.wait_status(execution_id, "completed")
                spans = await collector.wait_for(trace, "execution external")
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
    [traceparent] = seen
    by_name = {s["name"]: s for s in spans}
    call, step = by_name["action sms.send"], by_name["step text"]
    # The request's JetStream header named the call's span, in the execution's trace; the result's commit
    # (another message, the history read back) exported that span under its step.
    assert parse_traceparent(traceparent) == (int(trace, 16), int(call["span_id"], 16))
    assert traceparent == format_traceparent(int(trace, 16), int(call["span_id"], 16))
    assert call["parent_id"] == step["span_id"] and step["parent_id"] == by_name["execution external"]["span_id"]
    assert call["attributes"]["ordo.outcome"] == "action_completed"
    assert call["attributes"]["ordo.request_seq"] > 0


ANNOUNCER = {
    "id": "announcer",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [{"id": "announce", "type": "emit", "event": "contact.announced", "data": {"by": "announcer"}}],
}
FOLLOWER = {
    "id": "follower",
    "tenant": "acme",
    "trigger": {"event": "contact.announced"},
    "steps": [{"id": "note", "type": "set", "values": {"noted": True}}],
}


@needs_otel
async def test_an_emitted_event_carries_the_trace_on_to_the_executions_it_enrols(
    nats_server_url, pg_dsn, prefix, collector
):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(ANNOUNCER)
        await h.deploy(FOLLOWER)
        event = trigger_event("chain", 1, tenant="acme")
        announcer = h.execution_id("acme", "announcer", event["event_id"])
        trace = f"{execution_trace_id(announcer):032x}"
        async with h.worker(trace_sample=1.0, otlp_endpoint=collector.endpoint):
            await _publish(h, event)
            await collector.wait_for(trace, "execution announcer")
            spans = await collector.wait_for(trace, "execution follower")
    by_name = {s["name"]: s for s in spans}
    # One trace: the follower's execution is a child of the step that emitted the event enrolling it.
    assert by_name["execution follower"]["parent_id"] == by_name["step announce"]["span_id"]
    assert by_name["step note"]["parent_id"] == by_name["execution follower"]["span_id"]


def _split_by_sampling(h, workflow_id: str, prefix: str, rate: float, each: int, **event) -> tuple[list, list]:
    """Trigger events whose executions are sampled at `rate`, and as many whose executions are not."""
    sampled_events, unsampled_events = [], []
    for i in range(1_000):
        e = trigger_event(prefix, i, tenant="acme", **event)
        kind = sampled_events if sampled(h.execution_id("acme", workflow_id, e["event_id"]), rate) else unsampled_events
        if len(kind) < each:
            kind.append(e)
        if len(sampled_events) == len(unsampled_events) == each:
            return sampled_events, unsampled_events
    raise AssertionError("no split found")


@needs_otel
async def test_an_unsampled_execution_makes_no_span_and_sends_no_traceparent(
    nats_server_url, pg_dsn, prefix, collector
):
    seen: dict[str, str] = {}

    @action("sms.send", major=1)
    async def send_sms(ctx, input):
        seen[ctx.execution_id] = ctx.traceparent  # "" when the request came without the header
        return {"sent": True}

    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(_traced(f"{collector.endpoint}/hook"))
        await h.deploy(EXTERNAL)
        hooked = _split_by_sampling(h, "traced", "hook", 0.5, 3)
        texted = _split_by_sampling(h, "external", "text", 0.5, 3, event_type="order.placed")
        runs = [("traced", e) for e in hooked[0] + hooked[1]] + [("external", e) for e in texted[0] + texted[1]]
        ids = {e["event_id"]: h.execution_id("acme", workflow, e["event_id"]) for workflow, e in runs}
        roots = {ids[e["event_id"]]: "execution traced" for e in hooked[0]}
        roots |= {ids[e["event_id"]]: "execution external" for e in texted[0]}
        traced_ids = set(roots)
        built = observations(tracing.spans_exported)
        provider = ActionWorker.from_config(h.config, [send_sms])
        stop = asyncio.Event()
        serving = asyncio.create_task(provider.run(stop))
        try:
            async with h.worker(trace_sample=0.5, otlp_endpoint=collector.endpoint) as worker:
                for _, event in runs:
                    await _publish(h, event)
                for execution_id in ids.values():
                    await h.wait_status(execution_id, "completed")
                for execution_id, root in roots.items():  # exported on the worker's own schedule
                    await collector.wait_for(f"{execution_trace_id(execution_id):032x}", root)
                # Every unsampled commit returned before building anything: no span left the worker for them.
                assert observations(tracing.spans_exported) - built == 8 * 3 + 4 * 3
                assert worker.settlement.tracing is not None
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)

    traces = {s["trace_id"] for s in collector.spans}
    assert traces == {f"{execution_trace_id(i):032x}" for i in traced_ids}
    # The webhook's HTTP request and the external action's JetStream message: a header only when sampled.
    hook_headers = {hook["headers"]["X-Ordo-Execution"]: hook["headers"] for hook in collector.hooks}
    assert set(hook_headers) == {ids[e["event_id"]] for e in hooked[0] + hooked[1]}
    assert set(seen) == {ids[e["event_id"]] for e in texted[0] + texted[1]}
    for execution_id, headers in hook_headers.items():
        assert ("traceparent" in {k.lower() for k in headers}) == (execution_id in traced_ids), execution_id
    for execution_id, traceparent in seen.items():
        assert bool(traceparent) == (execution_id in traced_ids), execution_id


@needs_otel
async def test_sampling_zero_sends_nothing(nats_server_url, pg_dsn, prefix, collector):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(_traced(f"{collector.endpoint}/hook"))
        events = [trigger_event("off", i, tenant="acme") for i in range(5)]
        async with h.worker(trace_sample=0.0, otlp_endpoint=collector.endpoint) as worker:
            assert worker.settlement.tracing is None
            for event in events:
                await _publish(h, event)
            for event in events:
                await h.wait_status(h.execution_id("acme", "traced", event["event_id"]), "completed")
        assert collector.exports == 0 and collector.spans == []
        assert len(collector.hooks) == 5
        assert not any("traceparent" in {k.lower() for k in hook["headers"]} for hook in collector.hooks)


@needs_otel
async def test_a_collector_that_is_away_loses_spans_never_executions(nats_server_url, pg_dsn, prefix, collector):
    nowhere = await Collector().start()  # a port that was bound a moment ago and is closed now
    await nowhere.stop()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(_traced(f"{collector.endpoint}/hook"))
        events = [trigger_event("away", i, tenant="acme") for i in range(3)]
        built, lost = observations(tracing.spans_exported), observations(tracing.spans_dropped)
        async with h.worker(trace_sample=1.0, otlp_endpoint=nowhere.endpoint):
            for event in events:
                await _publish(h, event)
            for event in events:
                await h.wait_status(h.execution_id("acme", "traced", event["event_id"]), "completed")
        # The calls still carried their trace context, and the worker drained (the harness waits for it).
        assert len(collector.hooks) == 3
        assert all(parse_traceparent(hook["headers"].get("traceparent")) for hook in collector.hooks)
        # Every span built was counted as lost: 8 for each execution.
        assert observations(tracing.spans_exported) - built == 24
        assert observations(tracing.spans_dropped) - lost == 24


@needs_otel
async def test_two_workers_trace_the_same_executions_each_as_one_tree(nats_server_url, pg_dsn, prefix, collector):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        events = [trigger_event("two", i, tenant="acme", event_type="session.started") for i in range(16)]
        ids = [h.execution_id("acme", "waiter", event["event_id"]) for event in events]
        settings = dict(trace_sample=0.5, otlp_endpoint=collector.endpoint)
        async with h.worker(0, 2, **settings), h.worker(1, 2, **settings):
            await h.wait_claimed(0)
            for event in events:  # enrolled by whichever worker takes the trigger
                await _publish(h, event)
            for execution_id in ids:
                await h.wait_status(execution_id, "waiting")
            for execution_id in ids:  # applied by the partition's owner
                await h.signal(execution_id, "done")
            for execution_id in ids:
                await h.wait_status(execution_id, "completed")
        roots = {s["attributes"]["ordo.execution_id"] for s in collector.spans if s["name"] == "execution waiter"}
        assert roots == {i for i in ids if sampled(i, 0.5)}
        assert 0 < len(roots) < len(ids)
        for execution_id in roots:
            trace = collector.trace(f"{execution_trace_id(execution_id):032x}")
            by_name = {s["name"]: s for s in trace}
            assert len(by_name) == len(trace) == 5, sorted(s["name"] for s in trace)
            root = by_name["execution waiter"]
            assert by_name["wait"]["parent_id"] == by_name["step wait"]["span_id"]
            assert by_name["wait"]["attributes"]["ordo.ended_by"] == "signal"
            for name in ("enrol", "step wait", "step finish"):
                assert by_name[name]["parent_id"] == root["span_id"], name


_DECISIONS = """
import sys
from daemon.trace_context import sampled
ids = sys.stdin.read().split()
print("".join("1" if sampled(i, 0.1) else "0" for i in ids))
"""


def test_the_sampling_decision_is_the_same_in_every_worker_process():
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"execution-{i}")) for i in range(4000)]
    decisions = set()
    for seed in ("1", "2"):  # two worker processes, each with its own str hash seed
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT)
        out = subprocess.run(
            [sys.executable, "-c", _DECISIONS], input=" ".join(ids), env=env, capture_output=True, text=True, check=True
        )
        decisions.add(out.stdout.strip())
    [decided] = decisions
    assert decided == "".join("1" if sampled(i, 0.1) else "0" for i in ids)
    assert 300 <= decided.count("1") <= 500  # about a tenth
    # A higher rate keeps every execution a lower one sampled (raising it never drops a trace).
    assert all(sampled(i, 0.2) for i, d in zip(ids, decided, strict=True) if d == "1")
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)


_WITHOUT_OTEL = """
import runpy, sys
for name in ("opentelemetry", "opentelemetry.sdk", "opentelemetry.exporter", "google.protobuf"):
    sys.modules[name] = None  # as if the otel extra were not installed
sys.argv = ["ordo", "run", "--worker-index", "0", "--workers", "1"]
runpy.run_module("daemon", run_name="__main__")
"""


async def test_a_worker_runs_without_opentelemetry_while_tracing_is_off(nats_server_url, pg_dsn, prefix):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(TRACED | {"steps": [TRACED["steps"][0], TRACED["steps"][3]]})
        event = trigger_event("bare", 1, tenant="acme")
        proc = subprocess.Popen([sys.executable, "-c", _WITHOUT_OTEL], env=h.env(), cwd=ROOT)
        h.processes.append(proc)
        await _publish(h, event)
        await h.wait_status(h.execution_id("acme", "traced", event["event_id"]), "completed")
        assert proc.poll() is None


async def test_a_worker_asked_to_trace_without_opentelemetry_stops_and_names_the_extra(nats_server_url, pg_dsn, prefix):
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WITHOUT_OTEL,
            env=h.env(trace_sample=0.5),
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0
        assert "pip install 'ordo[otel]'" in stderr.decode()


# -- the spans of each commit, from the dispatcher's own transitions (pure) -------------------------------------

RETRIED = {
    "id": "retried",
    "tenant": "acme",
    "version": 1,
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "greet", "type": "set", "values": {"a": 1}},
        {
            "id": "call",
            "type": "action",
            "action": "webhook",
            "input": {"url": "http://example.invalid/"},
            "timeout": "10s",
            "retry": {"max_attempts": 3, "initial_interval": "100ms"},
        },
        {"id": "approval", "type": "wait_for_signal", "signal": "go"},
        {"id": "done", "type": "set", "values": {"b": 2}},
    ],
}


def _commits() -> list[tuple[list, str]]:
    """The retried workflow's commits, one advance each: (transitions with their time in ms, status after)."""
    program = dispatcher.Program(RETRIED)
    state = dispatcher.ExecutionState("e-1", event={"event_id": "1", "data": {}}, subject={"id": "c"}, tenant="acme")
    commits = []

    def advance(kind, payload, now_ms):
        transitions = dispatcher.advance(program, state, kind, payload, now_ms)
        effects, state.effects = state.effects, []
        commits.append(([(t, now_ms) for t in transitions], state.status))
        return effects

    advance("start", None, 1_000)
    failed = {"code": "unavailable", "retryable": True, "message": "503"}
    effects = advance("action_result", {"step_id": "call", "attempt": 1, "ok": False, "error": failed}, 2_000)
    [retry] = [data["timer_id"] for kind, data in effects if kind == "set_timer"]
    advance("timer", {"timer_id": retry}, 2_100)
    advance("action_result", {"step_id": "call", "attempt": 2, "ok": True, "output": {}}, 3_000)
    advance("signal", {"name": "go", "signal_id": "s-1", "data": {}}, 9_000)
    return commits


def test_each_span_closes_in_exactly_one_commit_with_the_times_of_its_transitions():
    execution = Execution("e-1", "acme", "retried", 1, None, 1_000 * 1_000_000)
    history: list[Transition] = []
    closed_by_commit = []
    for transitions, status in _commits():
        first_seq = transitions[0][0][0]
        for (seq, step_id, kind, detail), at_ms in transitions:
            history.append(Transition(seq, step_id, kind, at_ms * 1_000_000, detail))
        commit_ns = (transitions[-1][1] + 5) * 1_000_000
        closed_by_commit.append(
            closed_spans(
                execution, list(history), first_seq, finished=status == "completed", status=status, commit_ns=commit_ns
            )
        )
    names = [[span.name for span in spans] for spans in closed_by_commit]
    assert names == [
        ["enrol", "step greet"],  # the action step is open: it waits for its result
        [],  # a failed attempt: the step goes on (a back-off, then attempt 2)
        [],
        ["step call", "action webhook", "action webhook"],  # the result closes the step and both calls
        ["step approval", "wait", "step done", "execution retried"],
    ]
    spans = {(s.name, s.start_ns): s for commit in closed_by_commit for s in commit}
    ms = 1_000_000
    root = spans[("execution retried", 1_000 * ms)]
    step = spans[("step call", 1_000 * ms)]
    assert root.parent_id is None and root.end_ns == 9_005 * ms and root.attributes["ordo.status"] == "completed"
    assert step.parent_id == root.span_id and step.end_ns == 3_000 * ms
    first, second = spans[("action webhook", 1_000 * ms)], spans[("action webhook", 2_100 * ms)]
    assert (first.end_ns, second.end_ns) == (2_000 * ms, 3_000 * ms)
    assert first.parent_id == second.parent_id == step.span_id
    assert first.error == "unavailable: 503" and second.error is None
    assert [first.attributes["ordo.attempt"], second.attributes["ordo.attempt"]] == [1, 2]
    # The call's span id is what its request carried: named by the request's seq.
    assert first.span_id == span_id("e-1", "call", first.attributes["ordo.request_seq"])
    wait = spans[("wait", 3_000 * ms)]
    assert wait.parent_id == spans[("step approval", 3_000 * ms)].span_id and wait.end_ns == 9_000 * ms
    assert wait.attributes["ordo.ended_by"] == "signal" and wait.attributes["ordo.wait.signal"] == "go"


def test_a_valid_traceparent_is_read_and_an_invalid_one_ignored():
    parent = format_traceparent(0xABC, 0xDEF)
    assert parse_traceparent(parent) == (0xABC, 0xDEF)
    for bad in ("", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "01-abc", "00-xyz", None, 7):
        assert parse_traceparent(bad) is None, bad
    # What a trigger continues: its header's, else its event's, lowercase and trimmed; an invalid one is none.
    upstream = format_traceparent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)
    for sent in (upstream, upstream.upper(), f" {upstream}\n", upstream.encode()):
        assert trigger_traceparent({"traceparent": sent}, {}) == upstream, sent
        assert trigger_traceparent(None, {"traceparent": sent}) == upstream, sent
    assert trigger_traceparent({"traceparent": "00-xyz"}, {"traceparent": upstream}) == upstream
    zero_span = upstream[:36] + "0" * 16 + "-01"
    for bad in (zero_span, "00-" + "0" * 32 + upstream[35:], upstream[:-1], upstream + "0", "ff" + upstream[2:], 7):
        assert trigger_traceparent({"traceparent": bad}, {}) is None, bad
    assert trigger_traceparent({"Nats-Msg-Id": "x"}, {}) is None and trigger_traceparent(None, {}) is None


def test_a_sample_rate_outside_0_to_1_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv("ORDO_TRACE_SAMPLE", "1.5")
    with pytest.raises(ValueError, match="trace_sample must be between 0 and 1"):
        config.load()
    monkeypatch.setenv("ORDO_TRACE_SAMPLE", "0.25")
    assert config.load().trace_sample == 0.25
