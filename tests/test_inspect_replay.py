"""`ordo inspect` and `ordo replay` on real executions: an action that is retried, a wait on the
(injected) clock and an event, run by a real worker on real NATS and Postgres; then the
history read back, re-run through the dispatcher, and diffed against other definitions.
Also the replay machinery on its own, over both dispatcher implementations."""

import copy

import orjson
from harness import NO_PROBLEMS, Clock, engine, ordo

from bench.generator import trigger_event
from daemon import inspect as inspection
from daemon import replay as replaying


def follow_up(url: str) -> dict:
    return {
        "id": "follow-up",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "welcome",
                "type": "action",
                "action": "webhook",
                "input": {"url": url, "body": {"name": "{{contact.first_name}}"}},
                "retry": {"max_attempts": 3, "initial_interval": "10s", "backoff_coefficient": 2, "jitter": 0},
            },
            {"id": "pause", "type": "wait", "duration": "1h"},
            {
                "id": "reply",
                "type": "wait_for_event",
                "event": "contact.replied",
                "timeout": "1d",
                "on_timeout": "nudge",
            },
            {
                "id": "replied",
                "type": "if",
                "condition": {"exists": "{{context.reply.text}}"},
                "then": "thank",
                "else": "nudge",
            },
            {"id": "thank", "type": "set", "values": {"thanked": "{{context.reply.text}}"}, "next": "done"},
            {"id": "nudge", "type": "set", "values": {"nudged": True}},
            {"id": "done", "type": "end"},
        ],
    }


async def _waiting_for_reply(h, execution_id: str) -> None:
    await h.wait_until(
        "SELECT count(*) FROM ordo.event_waits WHERE execution_id = $1::uuid", execution_id, expect=1, timeout=30
    )


async def test_inspect_and_replay_an_execution_with_a_retry_a_wait_and_an_event(
    nats_server_url, pg_dsn, prefix, target
):
    definition = follow_up(target.url("welcome"))
    target.script["welcome"] = [503, 200]
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(definition)
        start = trigger_event("ir", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "follow-up", start["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([start])
            await h.wait_timer(execution_id, "retry")
            clock.advance(10_500)  # the 10 s back-off passes: attempt 2 succeeds
            await h.wait_timer(execution_id, "wait")
            clock.advance(3600_000 + 1000)
            await _waiting_for_reply(h, execution_id)

            # Waiting: inspect shows what it waits for, and for how long.
            waiting = await inspection.inspect(h.db, execution_id)
            assert (waiting["status"], waiting["waiting"]) == ("waiting", "event:contact.replied")
            timer = waiting["timer"]
            assert (timer["purpose"], timer["step"]) == ("event_timeout", "reply")
            assert timer["timer_id"] == waiting["runtime"]["timer"]
            assert waiting["event_wait"] == {"event_type": "contact.replied", "step": "reply"}
            text = inspection.render(waiting)
            assert "pending    timer event_timeout at step 'reply'" in text
            assert "pending    event 'contact.replied' at step 'reply'" in text

            reply = trigger_event(
                "ir-reply", 1, tenant="acme", event_type="contact.replied", data={"text": "sounds good"}
            )
            reply["contact"] = start["contact"]
            await h.publish_triggers([reply])
            await h.wait_status(execution_id, "completed")

        assert len(target.named("welcome")) == 2
        doc = await inspection.inspect(h.db, execution_id)
        assert orjson.loads(orjson.dumps(doc)) == doc  # what --json prints
        timeline = [(t["seq"], t["step"], t["kind"], t["attempt"]) for t in doc["transitions"]]
        assert timeline == [
            (1, "", "started", None),
            (2, "welcome", "action_requested", 1),
            (3, "welcome", "action_failed", 1),
            (4, "welcome", "action_requested", 2),
            (5, "welcome", "action_completed", 2),
            (6, "pause", "waiting", None),
            (7, "pause", "timer_fired", None),
            (8, "reply", "waiting", None),
            (9, "reply", "event_received", None),
            (10, "replied", "branch", None),
            (11, "thank", "set", None),
            (12, "done", "completed", None),
        ]
        by_seq = {t["seq"]: t for t in doc["transitions"]}
        assert by_seq[3]["error"] == "http_503: " + by_seq[3]["detail"]["error"]["message"]
        assert "timer_id" not in by_seq[3]["detail"]  # the action's own answer, not its deadline timer
        output = by_seq[5]["detail"]["output"]
        assert by_seq[5]["output_digest"] == inspection.digest(output) and len(by_seq[5]["output_digest"]) == 12
        assert by_seq[9]["detail"]["data"] == {"text": "sounds good"}
        assert by_seq[9]["input_digest"] == inspection.digest({"text": "sounds good"})
        assert by_seq[7]["source_seq"] is None and by_seq[7]["detail"]["timer_id"].startswith("pause:")
        assert (doc["status"], doc["timer"], doc["event_wait"], doc["dead_letters"]) == ("completed", None, None, [])
        assert doc["context"]["thanked"] == "sounds good"
        text = inspection.render(doc)
        print(text)  # what `ordo inspect` shows (pytest -s)
        assert "pending    nothing" in text and "ERROR http_503" in text
        assert f"out:{by_seq[5]['output_digest']}" in text and "\n    12  " in text

        # The same version: every decision again, and the same final state.
        same = await replaying.replay(h.db, execution_id)
        assert same.outcome == "identical", replaying.render(same)
        assert (same.inputs, same.recorded, same.replayed, same.matching) == (6, 12, 12, 12)
        assert same.state_differs == [] and not same.incomplete_history
        assert "identical" in replaying.render(same)

        # Another branch condition, deployed as v2: the run parts at the branch (seq 10).
        flipped = copy.deepcopy(definition)
        flipped["steps"][3]["condition"] = {"not": {"exists": "{{context.reply.text}}"}}
        assert await h.deploy(flipped) == 2
        other = await replaying.replay(h.db, execution_id, 2)
        assert other.outcome == "diverged" and other.replayed_version == 2
        first = other.first_divergence
        assert first.seq == 10 and (other.matching, other.differing) == (10, 2)  # thank/nudge differ, done does not
        assert first.recorded == {"step": "replied", "kind": "branch", "detail": {"to": "thank", "taken": "then"}}
        assert first.replayed == {"step": "replied", "kind": "branch", "detail": {"to": "nudge", "taken": "else"}}
        assert "DIVERGES at seq 10" in replaying.render(other)

        # An extra set step (not deployed): the run parts right after the action completes (seq 6).
        extra = copy.deepcopy(definition)
        extra["steps"].insert(1, {"id": "mark", "type": "set", "values": {"welcomed": True}})
        shifted = await replaying.replay(h.db, execution_id, extra)
        assert shifted.first_divergence.seq == 6 and shifted.replayed_version is None
        assert shifted.first_divergence.recorded["kind"] == "waiting"
        assert shifted.first_divergence.replayed == {"step": "mark", "kind": "set", "detail": None}

        # A longer wait: the clock is pinned from the recorded wait, so only until_ms moves (seq 6).
        longer = copy.deepcopy(definition)
        longer["steps"][1]["duration"] = "2h"
        later = await replaying.replay(h.db, execution_id, longer)
        recorded_until = later.first_divergence.recorded["detail"]["until_ms"]
        assert later.first_divergence.seq == 6
        assert later.first_divergence.replayed["detail"] == {"until_ms": recorded_until + 3600_000}
        # ...and its timer, fed at the recorded moment, is listed as due an hour later.
        (shift,) = later.timer_shifts
        assert (shift["seq"], shift["replayed_due_ms"] - shift["recorded_due_ms"]) == (7, 3600_000)
        assert shift["timer_id"].startswith("pause:") and "TIMER MOVES at seq 7" in replaying.render(later)
        assert other.timer_shifts == [] and same.timer_shifts == []

        missing = await replaying.replay(h.db, execution_id, 7)
        assert missing.outcome == "error" and "v7 is not deployed" in missing.error
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_replay_sample_summarises_the_divergence(nats_server_url, pg_dsn, prefix, target):
    definition = follow_up(target.url("welcome"))
    target.script["welcome"] = [503, 200]  # the first call fails once: one execution retries
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(definition)
        starts = [trigger_event("rs", i, tenant="acme", event_type="contact.created") for i in range(4)]
        ids = [h.execution_id("acme", "follow-up", s["event_id"]) for s in starts]
        async with h.worker(clock_ms=clock):
            await h.publish_triggers(starts)
            await h.wait_until("SELECT count(*) FROM ordo.timers WHERE purpose = 'retry'", expect=1)
            clock.advance(10_500)
            await h.wait_until("SELECT count(*) FROM ordo.timers WHERE purpose = 'wait'", expect=4)
            clock.advance(3600_000 + 1000)
            await h.wait_until("SELECT count(*) FROM ordo.event_waits", expect=4)
            # Three reply; the fourth times out a day later and is nudged without the branch.
            for i, start in enumerate(starts[:3]):
                reply = trigger_event(
                    "rs-reply", i, tenant="acme", event_type="contact.replied", data={"text": f"yes {i}"}
                )
                reply["contact"] = start["contact"]
                await h.publish_triggers([reply])
            for execution_id in ids[:3]:
                await h.wait_status(execution_id, "completed")
            clock.advance(86_400_000 + 1000)
            await h.wait_status(ids[3], "completed")

        same = await replaying.replay_sample(h.db, "acme", "follow-up", 10)
        assert (same["replayed"], same["identical"], same["diverged"], same["errors"]) == (4, 4, 0, 0)
        assert same["top_divergences"] == []

        flipped = copy.deepcopy(definition)
        flipped["steps"][3]["condition"] = {"not": {"exists": "{{context.reply.text}}"}}
        summary = await replaying.replay_sample(h.db, "acme", "follow-up", 10, flipped)
        assert (summary["replayed"], summary["identical"], summary["diverged"], summary["errors"]) == (4, 1, 3, 0)
        (point,) = summary["top_divergences"]
        assert (point["step"], point["kind"], point["executions"]) == ("replied", "branch", 3)
        assert point["example"] in ids[:3]
        assert "3 diverged" in replaying.render_summary(summary)

        # A sample of 2 replays 2; another tenant's workflow has no finished executions.
        assert (await replaying.replay_sample(h.db, None, "follow-up", 2, seed=1))["replayed"] == 2
        assert (await replaying.replay_sample(h.db, "other", "follow-up", 5))["replayed"] == 0


# -- the machinery without servers, over both dispatcher implementations ---------------------------


def _record(impl, definition, feed):
    """Run `feed` (kind, payload-or-callable, now_ms) like the worker does; the ledger's rows back."""
    program = impl.Program(definition)
    state = impl.ExecutionState("e-1", subject={"id": "c"}, event={"type": "contact.created"}, tenant="acme")
    rows = []
    for kind, payload, now_ms in feed:
        payload = payload(state) if callable(payload) else payload
        out = impl.advance(program, state, kind, payload, now_ms)
        source_seq = None if kind in ("start", "timer") else now_ms  # any stream seq will do
        rows += [
            {
                "seq": seq,
                "step_id": step_id,
                "kind": k,
                "at_ms": now_ms,
                "source_seq": source_seq,
                "detail": None if detail is None else orjson.loads(orjson.dumps(detail)),
            }
            for seq, step_id, k, detail in out
        ]
        state.effects.clear()
    return program, state, rows


def test_every_input_kind_is_read_back_and_replays_identically(impl):
    definition = {
        "id": "wf",
        "tenant": "acme",
        "version": 1,
        "trigger": {"event": "contact.created"},
        "steps": [
            {
                "id": "send",
                "type": "action",
                "action": "sms.send",
                "input": {},
                "timeout": "5s",
                "retry": {"max_attempts": 3, "jitter": 0},
            },
            {"id": "ok", "type": "wait_for_signal", "signal": "ok"},
            {"id": "reply", "type": "wait_for_event", "event": "x", "timeout": "1m", "next": "charge"},
            {"id": "charge", "type": "action", "action": "sms.send", "input": {}},
        ],
    }
    timer = lambda state: {"timer_id": state.timer}  # noqa: E731
    feed = [
        ("start", None, 1_000),
        ("timer", timer, 7_000),  # the 5 s timeout of attempt 1: a timer-made action_failed
        ("timer", timer, 9_000),  # the back-off: attempt 2
        ("action_result", {"step_id": "send", "attempt": 1, "ok": True, "output": 1}, 9_100),  # late
        ("action_result", {"step_id": "send", "attempt": 2, "ok": True, "output": {"id": "m"}}, 9_200),
        ("signal", {"name": "ok", "data": {"by": "ops"}}, 10_000),
        ("event", {"v": 1, "event_id": "ev", "type": "x", "contact": {"id": "c"}, "data": [1, 2]}, 11_000),
        (
            "action_result",
            {
                "step_id": "charge",
                "attempt": 1,
                "ok": False,
                "error": {"code": "bad", "retryable": False, "message": "no"},
            },
            12_000,
        ),
        ("retry", {}, 13_000),
        ("cancel", {"reason": "enough"}, 14_000),
    ]
    _, state, rows = _record(impl, definition, feed)
    assert state.status == "cancelled"
    inputs, incomplete = replaying.inputs_of(rows)
    assert [i.kind for i in inputs] == [kind for kind, _, _ in feed] and not incomplete
    replaying.clock_of(inputs, rows, definition)
    assert [i.now_ms for i in inputs] == [now for _, _, now in feed]
    run = replaying.rerun(
        impl.Program(definition), "e-1", "acme", {"id": "c"}, {"type": "contact.created"}, inputs, impl=impl
    )
    assert run.errors == []
    assert replaying.compare(rows, run.transitions) == (len(rows), None)
    assert (run.state.status, run.state.context, run.state.visits) == (state.status, state.context, state.visits)
    assert any(kind == "action" for kind, _ in run.effects)  # collected, never carried out


def test_a_history_without_outputs_is_flagged(impl):
    rows = [
        {"seq": 1, "step_id": "", "kind": "started", "at_ms": 0, "source_seq": None, "detail": {}},
        {
            "seq": 2,
            "step_id": "a",
            "kind": "action_requested",
            "at_ms": 0,
            "source_seq": None,
            "detail": {"attempt": 1},
        },
        {"seq": 3, "step_id": "a", "kind": "action_completed", "at_ms": 5, "source_seq": 9, "detail": {"attempt": 1}},
    ]
    inputs, incomplete = replaying.inputs_of(rows)
    assert incomplete and inputs[1].payload == {"step_id": "a", "attempt": 1, "ok": True, "output": None}


# -- the command line ------------------------------------------------------------------------


async def test_the_command_line(nats_server_url, pg_dsn, prefix, target, tmp_path):
    definition = follow_up(target.url("welcome"))
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(definition)
        start = trigger_event("cli", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "follow-up", start["event_id"])
        async with h.worker(clock_ms=clock):
            await h.publish_triggers([start])
            await h.wait_timer(execution_id, "wait")
            clock.advance(3600_000 + 1000)
            await _waiting_for_reply(h, execution_id)
            clock.advance(86_400_000 + 1000)
            await h.wait_status(execution_id, "completed")
    env = {"ORDO_PG_DSN": pg_dsn}
    shown = ordo("inspect", execution_id, env_extra=env)
    assert shown.returncode == 0 and "pending    nothing" in shown.stdout and "timed_out" in shown.stdout
    doc = orjson.loads(ordo("inspect", execution_id, "--json", env_extra=env).stdout)
    assert [t["kind"] for t in doc["transitions"]][-3:] == ["timed_out", "set", "completed"]
    assert ordo("inspect", "00000000-0000-0000-0000-000000000000", env_extra=env).returncode == 1

    same = ordo("replay", execution_id, env_extra=env)
    assert same.returncode == 0 and "identical" in same.stdout
    shorter = dict(definition, steps=[dict(s, timeout="2d") if s["id"] == "reply" else s for s in definition["steps"]])
    path = tmp_path / "candidate.json"
    path.write_bytes(orjson.dumps(shorter))
    other = ordo("replay", execution_id, "--definition", str(path), "--json", env_extra=env)
    assert other.returncode == 1, other.stderr
    result = orjson.loads(other.stdout)
    # The same decisions, but the event timeout would be due a day later: a divergence in time only.
    assert result["outcome"] == "diverged" and result["first_divergence"] is None
    (shift,) = result["timer_shifts"]
    assert (shift["seq"], shift["replayed_due_ms"] - shift["recorded_due_ms"]) == (7, 86_400_000)
    sample = ordo("replay", "--sample", "5", "--workflow", "follow-up", "--tenant", "acme", env_extra=env)
    assert sample.returncode == 0 and "1 identical, 0 diverged, 0 errors" in sample.stdout
    assert ordo("replay", env_extra=env).returncode != 0
