"""Start gates and per-tenant limits (issue 18): a workflow's max_running, a tenant's enrolment
rate, and limits per tenant from the config, reloaded by SIGHUP.

The provider is a real local HTTP server reached by the webhook action. What
ran at once and how fast executions started are read from the ledger's
history (the grant that started each execution, and its end), never from
elapsed time.
"""

import asyncio
import os

import orjson
import pytest
from harness import NO_PROBLEMS, assert_signals_recorded_while_limited, engine, ordo
from test_limits import Provider

from bench.generator import trigger_event
from bench.provider import most_in_any_second
from daemon import metrics, operator_messages, tenant_limits
from hotpath.vocabulary import LIMIT_GRANTED, LIMIT_WAITING, START_GATED, WAIT_START


@pytest.fixture
async def provider():
    p = await Provider().start()
    yield p
    await p.stop()


def workflow(url: str, limits: dict | None = None, *, then: list | None = None) -> dict:
    definition = {
        "id": "onboard",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "send",
                "type": "action",
                "action": "webhook",
                "input": {"url": url, "body": {"to": "{{contact.first_name}}"}},
                "timeout": "30s",
            },
            *(then or []),
        ],
    }
    if limits is not None:
        definition["limits"] = limits
    return definition


def events(run: str, count: int) -> list[dict]:
    return [trigger_event(run, i, tenant="acme", event_type="contact.created") for i in range(count)]


async def _completed(h, count: int, timeout: float = 120.0) -> None:
    await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=timeout)


async def _starts_and_ends(h) -> dict[str, tuple[float, float]]:
    """Each execution's start (the grant at its last gate) and end, in epoch seconds, from its history."""
    rows = await h.db.fetch(
        """SELECT execution_id::text AS id,
                  max(extract(epoch FROM at)) FILTER (WHERE kind = $1 AND step_id = $2) AS started,
                  max(extract(epoch FROM at)) FILTER (WHERE kind = 'completed') AS ended
           FROM ordo.transitions GROUP BY execution_id""",
        LIMIT_GRANTED,
        START_GATED,
    )
    return {r["id"]: (float(r["started"]), float(r["ended"])) for r in rows}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end at the instant of a start closes first)."""
    points = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = running = 0
    for _, step in points:
        running += step
        most = max(most, running)
    return most


async def test_max_running_2_runs_10_executions_never_more_than_2_at_once_in_enrolment_order(
    nats_server_url, pg_dsn, prefix, provider
):
    provider.delay = 0.3  # long beside a grant's way to its execution: turns are seen in their order
    triggers = events("run", 10)
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow(provider.url, {"max_running": 2}))
        async with h.worker():
            await h.publish_triggers(triggers)
            await _completed(h, 10)
        spans = await _starts_and_ends(h)
        ids = [h.execution_id("acme", "onboard", e["event_id"]) for e in triggers]
        assert sorted(spans) == sorted(ids)  # all 10 started and completed
        assert most_at_once(list(spans.values())) == 2  # never more than 2, and the limit was reached
        assert provider.most_in_flight == 2
        # They took their turns in the order they were enrolled (the triggers' order: one lane, one
        # worker). Two slots freed at once are granted together, and those two executions apply their
        # grants side by side: none starts before one enrolled more than one place ahead of it.
        started = sorted(ids, key=lambda i: spans[i][0])
        assert all(set(started[:k]) <= set(ids[: k + 1]) for k in range(len(ids))), (started, ids)
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_slots") == 0  # every slot given back
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_queue") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_execution_waiting_its_start_turn_records_signals_in_order_and_a_cancel_gives_its_place_back(
    nats_server_url, pg_dsn, prefix, provider
):
    provider.gate = asyncio.Event()
    then = [{"id": "go", "type": "wait_for_signal", "signal": "go"}]
    first, second, third = events("order", 3)
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow(provider.url, {"max_running": 1}, then=then))
        first_id, second_id, third_id = (
            h.execution_id("acme", "onboard", e["event_id"]) for e in (first, second, third)
        )
        async with h.worker():
            await h.publish_triggers([first, second, third])
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE waiting = $1", WAIT_START, expect=2
            )  # the first runs (its call held at the provider); two wait their turn
            for n in range(3):
                await h.signal(second_id, "note", {"n": n})
            await operator_messages.send(h.js, h.db, h.topology, operator_messages.cancel(third_id, "test"))
            await h.wait_status(third_id, "cancelled")
            assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_queue") == 1  # the third's place is gone
            assert len(provider.keys) == 1
            provider.gate.set()
            for execution_id in (first_id, second_id):
                await h.signal_once_waiting(execution_id, "go")
            await _completed(h, 2)

        await assert_signals_recorded_while_limited(h.db, second_id)
        assert len(provider.keys) == 2  # the cancelled one never ran
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_slots") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_tenants_enrolment_rate_delays_its_executions_loses_none_and_says_how_far_behind(
    nats_server_url, pg_dsn, prefix, provider
):
    count, rate = 30, 5
    behind = metrics.tenant_enrolment_behind.labels("acme")
    behind.set(0)
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow(provider.url))
        async with h.worker(tenant_limits=f"acme enrolments={rate}/s"):
            await h.publish_triggers(events("rate", count))
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=count)  # all enrolled at once
            # The head of the queue ages while the rest wait: the gauge reports it.
            for _ in range(200):
                if behind._value.get() > 0:
                    break
                await asyncio.sleep(0.05)
            assert behind._value.get() > 0
            await _completed(h, count)
        starts = sorted(start for start, _ in (await _starts_and_ends(h)).values())
        assert len(starts) == count  # nothing lost
        # At most the rate plus the one token a bucket starts with, in any 1 s window.
        assert most_in_any_second(starts) <= rate + 1, most_in_any_second(starts)
        assert len(provider.keys) == count and len(set(provider.keys)) == count
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_queue") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_sighup_changes_a_tenants_limits_without_a_restart_and_a_malformed_entry_changes_nothing(
    nats_server_url, pg_dsn, prefix, provider, tmp_path, monkeypatch
):
    from daemon.service import _Service

    provider.gate = asyncio.Event()
    config_file = tmp_path / "ordo.toml"
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow(provider.url))
        async with h.worker() as worker:
            service = _Service(worker.config, worker, str(config_file))
            for name in [n for n in os.environ if n.startswith("ORDO_")]:
                monkeypatch.delenv(name)  # the file alone is under test
            config_file.write_text('tenant_limits = "acme workflow=onboard max_running=1"\n')
            await service._reload()
            await h.publish_triggers(events("hup", 4))
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE waiting = $1", WAIT_START, expect=3)
            assert len(provider.keys) == 1  # one runs; three wait under the limit the reload set

            config_file.write_text('tenant_limits = "acme workflow=onboard max_running=zero"\n')
            await service._reload()
            assert worker.registry.tenant_limits.max_running == {("acme", "onboard"): 1}  # nothing changed

            config_file.write_text('tenant_limits = "acme workflow=onboard max_running=3"\n')
            await service._reload()
            # Those already waiting take the new limit: two more start, one still waits.
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE waiting = $1", WAIT_START, expect=1)
            for _ in range(200):
                if provider.in_flight == 3:
                    break
                await asyncio.sleep(0.05)
            assert provider.in_flight == 3
            provider.gate.set()
            await _completed(h, 4)
        assert provider.most_in_flight == 3
        assert await h.db.fetchval("SELECT count(*) FROM ordo.limit_slots") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_tenants_action_limit_from_the_config_replaces_the_definitions(
    nats_server_url, pg_dsn, prefix, provider
):
    provider.delay = 0.05
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow(provider.url))  # no limits in the definition
        async with h.worker(tenant_limits="acme action=webhook concurrency=2"):
            await h.publish_triggers(events("act", 12))
            await _completed(h, 12)
        assert provider.most_in_flight == 2
        assert await h.ledger_problems() == NO_PROBLEMS


# -- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_running", [0, -1, "5", 2.5, True])
def test_a_zero_or_malformed_max_running_is_refused_naming_the_field(tmp_path, max_running):
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(workflow("http://example.com/send", {"max_running": max_running})))
    result = ordo("workflow", "validate", str(path))
    assert result.returncode == 1, result.stdout
    assert "limits.max_running" in result.stderr, result.stderr


def test_a_well_formed_max_running_is_valid(tmp_path):
    path = tmp_path / "good.json"
    path.write_bytes(orjson.dumps(workflow("http://example.com/send", {"max_running": 100})))
    result = ordo("workflow", "validate", str(path))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("acme enrolments=fast", "entry 'acme enrolments=fast': enrolments must be"),
        ("acme enrolments=0/s", "entry 'acme enrolments=0/s'"),
        ("acme workflow=onboard max_running=0", "max_running must be an integer >= 1"),
        ("acme action=sms.send burst=3", "unknown field(s) 'burst'"),
        ("acme action=sms.send", "it sets nothing"),
        ("acme; bigco enrolments=5/s", "entry 'acme'"),
        ("enrolments=5/s", "must start with the tenant"),
        ("acme action=sms.send workflow=w rate=5/s", "not both"),
    ],
)
def test_a_malformed_tenant_limit_is_refused_naming_the_entry(text, says):
    with pytest.raises(ValueError, match="tenant_limits") as refused:
        tenant_limits.parse(text)
    assert says in str(refused.value), refused.value


def test_tenant_limits_apply_to_the_tenants_definitions_only():
    limits = tenant_limits.parse(
        "acme enrolments=2/m\nacme action=webhook rate=50/s\nacme workflow=onboard max_running=7; bigco enrolments=1/s"
    )
    assert limits.enrolment_rate("acme") == pytest.approx(2 / 60)
    applied = limits.applied(workflow("http://x", {"max_steps": 10}))
    assert applied["limits"] == {"max_steps": 10, "max_running": 7}
    assert applied["steps"][0]["limits"] == {"rate": "50/s"}
    other = workflow("http://x") | {"tenant": "bigco"}
    assert limits.applied(other) is other


# -- the start gates in the dispatcher, compiled and pure ------------------------------------


def _stored(transitions: list) -> list[dict]:
    return [
        {"seq": seq, "step_id": step_id, "kind": kind, "detail": detail, "at_ms": 0, "source_seq": None}
        for seq, step_id, kind, detail in transitions
    ]


def test_a_new_execution_passes_its_gates_in_order_then_runs_and_gives_its_slot_back_when_it_ends(impl):
    program = impl.Program(workflow("http://example.com/send", {"max_running": 3}), 10.0)
    assert [g["bucket"] for g in program.gates] == ["enrolments|acme", "running|acme|onboard"]
    state = impl.ExecutionState("exec-1", subject={"first_name": "Ada"}, tenant="acme")
    made = list(impl.advance(program, state, "start", None))
    assert [(s, k) for _, s, k, _ in made] == [("", "started"), (START_GATED, LIMIT_WAITING)]
    assert state.effects == [
        (
            "limit_wait",
            {
                "step_id": START_GATED,
                "attempt": 1,
                "bucket": "enrolments|acme",
                "action": "(enrolment)",
                "rate_per_s": 10.0,
                "concurrency": None,
                "lease_ms": None,
            },
        )
    ]
    assert (state.status, state.waiting, state.attempt) == ("waiting", WAIT_START, 1)

    def apply(kind, payload):
        state.effects = []
        out = impl.advance(program, state, kind, payload, 1_000)
        made.extend(out)
        return [k for _, _, k, _ in out]

    assert apply("limit_granted", {"step_id": START_GATED, "attempt": 2}) == []  # not its gate: stale
    assert apply("limit_granted", {"step_id": "send", "attempt": 1}) == []
    assert apply("signal", {"name": "note"}) == ["signal"]  # recorded in order, changes nothing
    assert apply("limit_granted", {"step_id": START_GATED, "attempt": 1}) == [LIMIT_GRANTED, LIMIT_WAITING]
    assert state.effects[0][1]["bucket"] == "running|acme|onboard" and state.effects[0][1]["concurrency"] == 3
    assert apply("limit_granted", {"step_id": START_GATED, "attempt": 2}) == [LIMIT_GRANTED, "action_requested"]
    assert apply("limit_granted", {"step_id": START_GATED, "attempt": 2}) == []  # a repeat changes nothing
    assert ("limit_release", None) not in state.effects  # the start slot stays while it runs
    assert apply("action_result", {"step_id": "send", "attempt": 1, "ok": True, "output": {}}) == [
        "action_completed",
        "completed",
    ]
    assert ("limit_release", None) in state.effects and START_GATED not in state.visits

    # Replay reads the grants back from the history and makes the same transitions.
    from daemon import replay

    inputs, incomplete = replay.inputs_of(_stored(made))
    again = replay.rerun(program, "exec-1", "acme", {"first_name": "Ada"}, {}, inputs, impl=impl)
    assert not incomplete and not again.errors
    assert [t[1:3] for t in again.transitions] == [t[1:3] for t in made]


def test_a_cancel_at_a_start_gate_gives_its_place_back_and_a_workflow_without_gates_pays_nothing(impl):
    program = impl.Program(workflow("http://example.com/send", {"max_running": 1}))
    state = impl.ExecutionState("exec-1", tenant="acme")
    impl.advance(program, state, "start", None)
    state.effects = []
    impl.advance(program, state, "cancel", {"reason": "operator"})
    assert state.effects == [("limit_release", None)] and state.status == "cancelled"

    free = impl.Program(workflow("http://example.com/send"))
    assert free.gates == () and free.max_running is None
    state = impl.ExecutionState("exec-2", subject={"first_name": "Ada"}, tenant="acme")
    assert [k for _, _, k, _ in impl.advance(free, state, "start", None)] == ["started", "action_requested"]
    assert state.visits == {"send": 1}
