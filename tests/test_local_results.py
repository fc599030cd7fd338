"""In-process action results applied where the action ran, on state kept in memory.

The worker that runs an in-process action owns its execution, so the result
goes straight to the ordering ring and commits with the next batch (no
JetStream hop), on the record kept since the request committed (no ledger
read). These tests kill, stop and move workers around that path and then
check the ledger.
"""

import asyncio
import time

import orjson
from harness import NO_PROBLEMS, Harness, worker_metric

from bench.generator import trigger_event
from daemon import metrics
from daemon.servers import free_port

QUICK_LEASES = {"lease_ttl_s": 2.0, "lease_renew_s": 0.3}


def _one_call(url: str, timeout: str = "2s") -> dict:
    return {
        "id": "one-call",
        "tenant": "acme",
        "trigger": {"event": "order.placed"},
        "steps": [
            {
                "id": "notify",
                "type": "action",
                "action": "webhook",
                "timeout": timeout,
                "input": {"url": url},
                "retry": {"max_attempts": 3, "initial_interval": "100ms"},
            },
            {"id": "done", "type": "set", "values": {"ok": True}},
        ],
    }


def _noop_steps(workflow_id: str, count: int, then: list | None = None) -> dict:
    steps = [
        {"id": f"a{i}", "type": "action", "action": "noop", "input": {"n": i}, "timeout": "30s"}
        for i in range(1, count + 1)
    ]
    return {
        "id": workflow_id,
        "tenant": "acme",
        "trigger": {"event": f"{workflow_id}.go"},
        "steps": steps + (then or []),
    }


async def _condition(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _kinds(h: Harness, execution_id: str) -> list[tuple[str, str]]:
    rows = await h.db.fetch(
        "SELECT step_id, kind FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq", execution_id
    )
    return [(r["step_id"], r["kind"]) for r in rows]


def _action_history(steps: int) -> list[tuple[str, str]]:
    history = [("", "started")]
    for i in range(1, steps + 1):
        history += [(f"a{i}", "action_requested"), (f"a{i}", "action_completed")]
    return history


async def test_a_worker_killed_between_a_local_result_and_its_commit_re_runs_the_action_once_with_its_key(
    nats_server_url, pg_dsn, prefix, target
):
    """kill -9 while the action's result waits in the batcher: it was never published, so it is
    lost with the worker; the step's deadline timer re-runs the action on the next owner, with
    the same idempotency key, and the step completes once."""
    async with Harness(nats_server_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8", **QUICK_LEASES) as h:
        await h.deploy(_one_call(target.url("notify")))
        event = trigger_event("kill", 0, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "one-call", event["event_id"])
        since = time.time()
        port = free_port()
        # Each batch waits 1.5 s before it commits: the result sits uncommitted long enough to kill the worker.
        worker = h.spawn_worker(batch_max_ms=1500.0, metrics_port=port)
        await h.wait_claimed(since)
        await h.publish_triggers([event])
        deadline = time.monotonic() + 30
        while await worker_metric(port, 'ordo_local_results_total{outcome="local"}') < 1:
            assert time.monotonic() < deadline, "the call's result never reached the worker's ring"
            await asyncio.sleep(0.02)
        h.kill(worker)
        assert await _kinds(h, execution_id) == [("", "started"), ("notify", "action_requested")]
        async with h.worker():
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid",
                execution_id,
                expect="completed",
                timeout=30,
            )
        keys = [call["key"] for call in target.named("notify")]
        assert len(keys) == 2 and len(set(keys)) == 1, keys
        kinds = [kind for _, kind in await _kinds(h, execution_id)]
        assert kinds.count("action_completed") == 1
        assert kinds[:4] == ["started", "action_requested", "action_failed", "action_requested"]
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_signals_sent_while_actions_run_locally_are_applied_in_order_and_once_under_redelivery(
    nats_server_url, pg_dsn, prefix, target
):
    """Signals published while an execution's in-process actions run take turns with the local
    results (the ring key), each applied once and in publish order, while acks are dropped
    (so messages come back), publishes and commits fail, and commits land in doubt."""
    steps, count, notes = 3, 40, 3
    target.delay["slow"] = 0.1  # each call takes 100 ms: the notes arrive while the actions run
    workflow = {
        "id": "noted",
        "tenant": "acme",
        "trigger": {"event": "noted.go"},
        "steps": [
            {
                "id": f"a{i}",
                "type": "action",
                "action": "webhook",
                "timeout": "30s",
                "input": {"url": target.url("slow")},
            }
            for i in range(1, steps + 1)
        ]
        + [
            {"id": "finish", "type": "wait_for_signal", "signal": "finish"},
            {"id": "done", "type": "set", "values": {"ok": True}},
        ],
    }
    async with Harness(nats_server_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8", ack_wait_s=1.0) as h:
        await h.deploy(workflow)
        events = [trigger_event("note", i, tenant="acme", event_type="noted.go") for i in range(count)]
        ids = [h.execution_id("acme", "noted", e["event_id"]) for e in events]
        async with h.worker(inject_faults="seed=11,nats=0.2,pg=0.1"):
            await h.publish_triggers(events)
            # A signal for an execution not enrolled yet is dead-lettered (unknown_execution): wait for them all.
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=count, timeout=60)
            for n in range(notes):
                for execution_id in ids:
                    await h.signal(execution_id, "note", {"n": n}, signal_id=f"note-{n}")
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE waiting = 'finish'", expect=count, timeout=60
            )
            for execution_id in ids:
                await h.signal(execution_id, "finish", signal_id="finish")
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=60
            )
        during = 0
        for execution_id in ids:
            rows = await h.db.fetch(
                "SELECT step_id, kind, detail->'data'->>'n' AS n FROM ordo.transitions"
                " WHERE execution_id = $1::uuid ORDER BY seq",
                execution_id,
            )
            notes_seen = [int(r["n"]) for r in rows if r["kind"] == "signal" and r["n"] is not None]
            assert notes_seen == list(range(notes)), (execution_id, [tuple(r) for r in rows])
            rest = [(r["step_id"], r["kind"]) for r in rows if r["kind"] != "signal"]
            assert rest[: 1 + 2 * steps] == [("", "started")] + [
                (f"a{i}", kind) for i in range(1, steps + 1) for kind in ("action_requested", "action_completed")
            ]
            during += sum(1 for r in rows if r["kind"] == "signal" and r["step_id"].startswith("a"))
        assert during > 0, "no note arrived while an action ran: the test did not test the interleaving"
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_trigger_delivered_again_in_the_commit_that_ends_its_execution_starts_nothing(
    nats_server_url, pg_dsn, prefix, target
):
    """A trigger comes back (its ack was lost, or it was published again past the duplicate
    window) and commits in the same batch as the signal that ends its execution. The merge
    refuses the enrolment (the execution exists) and accepts the signal's update: the
    enrolment is a duplicate all the same. Its first call must not run again, its deadline
    timer must not be written over the execution's, and nothing may come back for the ended
    execution (that was an `execution_closed` dead letter: the call's result, applied on the
    duplicate's state kept in memory, was refused as stale and applied again on the ended one)."""
    workflow = {
        "id": "once-more",
        "tenant": "acme",
        "trigger": {"event": "once.go"},
        "steps": [
            {"id": "a1", "type": "action", "action": "webhook", "timeout": "30s", "input": {"url": target.url("a1")}},
            {"id": "finish", "type": "wait_for_signal", "signal": "finish"},
            {"id": "done", "type": "set", "values": {"ok": True}},
        ],
    }
    async with Harness(nats_server_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8") as h:
        await h.deploy(workflow)
        event = trigger_event("again", 0, tenant="acme", event_type="once.go")
        execution_id = h.execution_id("acme", "once-more", event["event_id"])
        deduplicated_before = metrics.deduplicated._value.get()
        # Each batch waits 300 ms for company: the trigger and the signal below commit together.
        async with h.worker(batch_max_ms=300.0) as worker:
            await h.publish_triggers([event])
            await h.wait_until(
                "SELECT waiting FROM ordo.executions WHERE execution_id = $1::uuid", execution_id, expect="finish"
            )
            subject = h.topology.trigger_subject("acme", "once.go")
            await h.publish_raw(subject, orjson.dumps(event), msg_id=f"{event['event_id']}-again")
            await h.signal(execution_id, "finish", signal_id="finish")
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", execution_id, expect="completed"
            )
            await h.wait_triggers_drained()
            # Whatever the commit started (a call, its result) has run and settled.
            await _condition(lambda: worker.effects.pending == 0 and worker.window.in_flight == 0, "a quiet worker")
        assert len(target.named("a1")) == 1
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers WHERE execution_id = $1::uuid", execution_id) == 0
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
        assert metrics.deduplicated._value.get() - deduplicated_before == 1
        assert await _kinds(h, execution_id) == [
            ("", "started"),
            ("a1", "action_requested"),
            ("a1", "action_completed"),
            ("finish", "waiting"),
            ("finish", "signal"),
            ("done", "set"),
            ("", "completed"),
        ]
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_stalled_owner_whose_local_action_finishes_after_takeover_is_fenced(
    nats_server_url, pg_dsn, prefix, target
):
    """SIGSTOP the owner while its in-process call is in flight, past its lease; the new owner's
    deadline timer re-runs the call and records its result. SIGCONT: the old owner's result is
    applied on the state it kept and its commit is refused (exit 3). The new owner's result is
    the one recorded."""
    gate = asyncio.Event()
    target.hold_first["notify"] = gate
    async with Harness(nats_server_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8", **QUICK_LEASES) as h:
        await h.deploy(_one_call(target.url("notify"), timeout="5s"))
        event = trigger_event("stall", 0, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "one-call", event["event_id"])
        since = time.time()
        # It renews its leases every 20 s, so after SIGCONT it has not yet noticed that it lost them.
        # It holds no timer due later than 0.5 s ahead, so the step's 5 s deadline timer is not in
        # its memory either: the held call's result is the only thing it can try to commit.
        old = h.spawn_worker(lease_renew_s=20.0, timer_horizon_s=0.5)
        await h.wait_claimed(since)
        await h.publish_triggers([event])
        await _condition(lambda: len(target.named("notify")) == 1, "the held call")
        with h.stopped(old):
            async with h.worker():
                await h.wait_until(
                    "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid",
                    execution_id,
                    expect="completed",
                    timeout=30,
                )
                gate.set()  # the held call answers: the old owner sees it when it runs again
                code = await h.resume(old)
        assert code == 3, "the old owner must stop on a fenced commit"
        completed = await h.db.fetch(
            "SELECT (detail->>'attempt')::int AS attempt FROM ordo.transitions"
            " WHERE execution_id = $1::uuid AND kind = 'action_completed'",
            execution_id,
        )
        assert [r["attempt"] for r in completed] == [2]
        assert len({call["key"] for call in target.named("notify")}) == 1
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_kept_executions_never_go_stale_while_partitions_move_under_load(nats_server_url, pg_dsn, prefix):
    """Executions of five in-process actions, while a second worker joins (the first gives back
    half of its partitions) and the first then drains and leaves: every history is exact, the
    ledger check finds nothing, and most dispatches found their execution in memory."""
    steps, count = 5, 400
    async with Harness(nats_server_url, pg_dsn, prefix, **QUICK_LEASES) as h:
        await h.deploy(_noop_steps("moving", steps))
        events = [trigger_event("move", i, tenant="acme", event_type="moving.go") for i in range(count)]
        ids = [h.execution_id("acme", "moving", e["event_id"]) for e in events]
        from_memory = metrics.read_resident._value.get()
        done = "SELECT count(*) FROM ordo.executions WHERE status = 'completed'"
        first = h.worker(0, 2)
        await first.__aenter__()
        try:
            await h.publish_triggers(events[: count // 2])
            async with h.worker(1, 2) as second:
                await h.publish_triggers(events[count // 2 :])
                await _condition(lambda: second.ownership.owned, "the second worker's share", timeout=20)
                await first.__aexit__(None, None, None)
                first = None
                await h.wait_until(done, expect=count, timeout=60)
        finally:
            if first is not None:
                await first.__aexit__(None, None, None)
        for execution_id in ids:
            assert await _kinds(h, execution_id) == _action_history(steps) + [("", "completed")]
        assert await h.ledger_problems() == NO_PROBLEMS
        assert metrics.read_resident._value.get() - from_memory > count * (steps - 1) // 2


# -- the parts, without servers -----------------------------------------------------------------


def _record(execution_id: str, partition: int):
    from hotpath import ExecutionState
    from ledger.executions import ExecutionRecord

    return ExecutionRecord(execution_id, "acme", "w", 1, "c", "e", partition, None, 0, ExecutionState(execution_id))


def test_a_kept_execution_is_taken_once_dropped_with_its_partition_and_the_oldest_goes_first():
    from daemon.resident import ResidentExecutions

    kept = ResidentExecutions(capacity=3)
    for i, partition in enumerate((0, 1, 1)):
        kept.keep(_record(f"e{i}", partition))
    assert kept.take("e0").execution_id == "e0"
    assert kept.take("e0") is None  # taken: its message is being applied
    kept.drop_partition(1)
    assert len(kept) == 0
    for i in range(4):
        kept.keep(_record(f"f{i}", 0))
    assert kept.take("f0") is None and kept.take("f3") is not None


def test_a_timer_that_a_commit_replaced_does_not_fire_from_memory():
    from daemon.timers import DueTimers

    timers = DueTimers()
    timers.own(0)
    timers.add("e1", "a:1:1:action_timeout:2", 1_000, 0)
    timers.add("e2", "a:1:1:action_timeout:2", 1_000, 0)
    timers.cancel("e1", "a:1:1:action_timeout:2")
    assert [fire.key for fire in timers.pop_due(2_000, 10)] == ["e2"]
