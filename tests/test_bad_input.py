"""Bad input gets a clear error, a metric and a dead-letter entry; good input keeps flowing."""

import orjson
from harness import NO_PROBLEMS, WAITER, WELCOME, Harness

from bench.generator import trigger_event
from daemon import metrics

MAX_BYTES = 4096


def _good(i: int) -> dict:
    return trigger_event("good", i, tenant="acme", event_type="contact.created")


def _bad_triggers() -> list[tuple[str, bytes, str]]:
    """(expected reason, body, a phrase the error must contain)."""
    missing_event_id = _good(9000)
    del missing_event_id["event_id"]
    wrong_contact = _good(9001)
    wrong_contact["contact"] = "not-an-object"
    future = _good(9002)
    future["v"] = 2
    stranger = trigger_event("bad", 1, tenant="nobody", event_type="contact.created")
    huge = _good(9003)
    huge["data"] = {"blob": "x" * (MAX_BYTES * 2)}
    broken_wf = trigger_event("bad", 2, tenant="acme", event_type="broken.thing")
    nul = _good(9004)
    nul["contact"]["first_name"] = "nul\u0000byte"
    mismatch = _good(9005)  # acme's event, published to globex's subject (below)
    return [
        ("malformed_json", b'{"v": 1, "event_id": ', "not valid JSON"),
        ("invalid_utf8", b'{"v": 1, "event_id": "\xff\xfe"}', "UTF-8"),
        ("not_an_object", b"[1, 2, 3]", "object is required"),
        ("unsupported_version", orjson.dumps(future), "contract version 2"),
        ("missing_field", orjson.dumps(missing_event_id), "'event_id'"),
        ("wrong_type", orjson.dumps(wrong_contact), "'contact'"),
        ("oversized", orjson.dumps(huge), "the limit is 4096"),
        ("unknown_tenant", orjson.dumps(stranger), "'nobody'"),
        ("tenant_mismatch", orjson.dumps(mismatch), "an event of tenant 'acme' published to"),
        ("invalid_definition", orjson.dumps(broken_wf), "points at unknown step"),
        # Postgres refuses a NUL in jsonb: the batch is split until this one is
        # alone, it is dead-lettered, and its batch-mates commit.
        ("commit_error", orjson.dumps(nul), "\\u0000"),
    ]


async def test_bad_triggers_are_dead_lettered_and_good_ones_complete(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix, max_message_bytes=MAX_BYTES) as h:
        await h.deploy(WELCOME)
        # A definition that cannot load, stored behind deploy's back (as a
        # hand edit or an older engine's schema would leave it).
        broken = {
            "id": "broken",
            "tenant": "acme",
            "version": 1,
            "trigger": {"event": "broken.thing"},
            "steps": [{"id": "a", "type": "if", "condition": {"exists": "{{contact.id}}"}, "then": "nope"}],
        }
        await h.db.execute(
            "INSERT INTO ordo.workflows (tenant, workflow_id, version, definition, digest) VALUES ($1,$2,1,$3,'x')",
            "acme",
            "broken",
            orjson.dumps(broken).decode(),
        )
        bad = _bad_triggers()
        before = {reason: metrics.dead_letters.labels(reason)._value.get() for reason, _, _ in bad}
        good = 0
        subject = h.topology.trigger_subject("acme", "contact.created")
        # Each to its tenant's subject, but for the event published to another tenant's.
        subject_of = {
            "unknown_tenant": h.topology.trigger_subject("nobody", "contact.created"),
            "tenant_mismatch": h.topology.trigger_subject("globex", "contact.created"),
        }
        for n, (reason, body, _) in enumerate(bad):
            for _ in range(20):
                await h.publish_raw(subject, orjson.dumps(_good(good)))
                good += 1
            await h.publish_raw(subject_of.get(reason, subject), body, msg_id=f"bad-{n}")
        for _ in range(20):
            await h.publish_raw(subject, orjson.dumps(_good(good)))
            good += 1

        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=good)
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=len(bad))

        letters = {r["reason"]: r for r in await h.db.fetch("SELECT * FROM ordo.dead_letters")}
        for reason, body, phrase in bad:
            assert reason in letters, f"no dead letter for {reason}"
            letter = letters[reason]
            assert phrase in letter["error"], (reason, letter["error"])
            assert bytes(letter["payload"]) == body, reason
            assert letter["stream"] == h.topology.triggers_stream
            assert metrics.dead_letters.labels(reason)._value.get() == before[reason] + 1, reason
        assert letters["invalid_definition"]["workflow_id"] == "broken"
        assert letters["unknown_tenant"]["tenant"] == "nobody"
        # Named after its own tenant, whose operators see it; the letter keeps the subject it came on.
        assert letters["tenant_mismatch"]["tenant"] == "acme"
        assert letters["tenant_mismatch"]["subject"] == subject_of["tenant_mismatch"]

        # The DLQ stream holds a copy of each, labelled with its reason.
        sub = await h.js.pull_subscribe(f"{h.config.prefix}.dlq.>", durable=None, stream=h.topology.dlq_stream)
        copies = await sub.fetch(len(bad), timeout=5)
        assert sorted(m.headers["Ordo-Reason"] for m in copies) == sorted(r for r, _, _ in bad)
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_bad_messages_for_executions_are_dead_lettered(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WAITER)
        async with h.worker():
            await h.publish_triggers(
                [
                    trigger_event("x", 1, tenant="acme", event_type="contact.created"),
                    trigger_event("x", 2, tenant="acme", event_type="session.started"),
                ]
            )
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=2)
            finished = h.execution_id("acme", "welcome", "x-1")
            waiting = h.execution_id("acme", "waiter", "x-2")
            ghost = h.execution_id("acme", "welcome", "never-published")
            await h.publish_raw(h.topology.exec_subject(waiting), b"{nope")
            await h.publish_raw(
                h.topology.exec_subject(waiting), orjson.dumps({"v": 1, "kind": "teleport", "execution_id": waiting})
            )
            await h.signal(ghost, "tick", {"i": 0})
            await h.signal(finished, "tick", {"i": 0})
            await h.signal(waiting, "done", {"ok": True})
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=4)
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", waiting, expect="completed"
            )
        reasons = {r["reason"]: r for r in await h.db.fetch("SELECT * FROM ordo.dead_letters")}
        assert set(reasons) == {"malformed_json", "unknown_kind", "unknown_execution", "execution_closed"}
        assert "teleport" in reasons["unknown_kind"]["error"]
        assert str(reasons["execution_closed"]["execution_id"]) == finished
        assert str(reasons["unknown_execution"]["execution_id"]) == ghost
        assert await h.ledger_problems() == NO_PROBLEMS


CONTEXT_LIMIT = 2048

GROWER = {
    "id": "grower",
    "tenant": "acme",
    "trigger": {"event": "grow.me"},
    "steps": [
        {
            "id": "copy",
            "type": "set",
            "values": {"a": "{{event.data.blob}}", "b": "{{event.data.blob}}", "c": "{{event.data.blob}}"},
        },
        {"id": "done", "type": "set", "values": {"done": True}},
    ],
}
LOOKUP = {
    "id": "lookup",
    "tenant": "acme",
    "trigger": {"event": "lookup.me"},
    "steps": [
        {"id": "fetch", "type": "action", "action": "crm.lookup", "input": {"id": "{{contact.id}}"}, "timeout": "1h"},
        {"id": "done", "type": "set", "values": {"done": True}},
    ],
}


def _grow(i: int, blob_bytes: int, event_type: str = "grow.me") -> dict:
    return trigger_event("grow", i, tenant="acme", event_type=event_type, data={"blob": "x" * blob_bytes})


def _result(execution_id: str, output: dict) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "kind": "action_result",
            "execution_id": execution_id,
            "step_id": "fetch",
            "attempt": 1,
            "ok": True,
            "output": output,
        }
    )


async def test_a_context_that_outgrows_the_limit_fails_its_execution(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix, max_context_bytes=CONTEXT_LIMIT) as h:
        await h.deploy(GROWER)
        await h.deploy(LOOKUP)
        before = metrics.dead_letters.labels("context_too_large")._value.get()
        # Three copies of a 1000-byte blob outgrow 2048 bytes; of a 100-byte one they do not.
        # A 3000-byte blob is over the limit by itself: that trigger enrols no one.
        events = [_grow(i, 100) for i in range(20)] + [_grow(100, 1000), _grow(101, 3000)]
        events += [_grow(200 + i, 10, "lookup.me") for i in range(2)]
        async with h.worker():
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=20)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=2)
            small, big = (h.execution_id("acme", "lookup", f"grow-{200 + i}") for i in range(2))
            await h.publish_raw(h.topology.exec_subject(small), _result(small, {"blob": "y" * 100}))
            await h.publish_raw(h.topology.exec_subject(big), _result(big, {"blob": "y" * 3000}))
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=21)
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=3)

        grown = h.execution_id("acme", "grower", "grow-100")
        failed = {
            str(r["execution_id"]): r
            for r in await h.db.fetch(
                "SELECT execution_id, context, runtime FROM ordo.executions WHERE status = 'failed'"
            )
        }
        assert set(failed) == {grown, big}
        assert orjson.loads(failed[grown]["context"]) == {}  # the last stored context stays
        assert orjson.loads(failed[big]["context"]) == {}
        assert orjson.loads(failed[big]["runtime"]).get("timer") is None  # no timer is stored as none at all
        for execution_id, step in ((grown, "copy"), (big, "fetch")):
            last = await h.db.fetchrow(
                "SELECT step_id, kind, detail FROM ordo.transitions WHERE execution_id = $1::uuid"
                " ORDER BY seq DESC LIMIT 1",
                execution_id,
            )
            detail = orjson.loads(last["detail"])
            assert (last["step_id"], last["kind"], detail["code"]) == (step, "failed", "context_too_large")
            assert f"over the limit of {CONTEXT_LIMIT}" in detail["error"] and f"after step '{step}'" in detail["error"]
        letters = {str(r["execution_id"]): r for r in await h.db.fetch("SELECT * FROM ordo.dead_letters")}
        assert all(r["reason"] == "context_too_large" for r in letters.values())
        assert letters[grown]["step_id"] == "copy" and "context is 3" in letters[grown]["error"]
        assert orjson.loads(bytes(letters[grown]["payload"]))["a"] == "x" * 1000  # the too-large context, kept
        assert "trigger data is" in letters["None"]["error"]
        assert not await h.db.fetchval("SELECT count(*) FROM ordo.executions WHERE event_id = 'grow-101'")
        assert metrics.dead_letters.labels("context_too_large")._value.get() == before + 3
        assert await h.ledger_problems() == NO_PROBLEMS


TYPO = {
    "id": "typo",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "check", "type": "if", "condition": {"exists": "contact.first_nam"}, "then": "send", "else": "send"},
        {"id": "send", "type": "action", "action": "log", "input": {"message": "Hi {{contact.first_nam}}"}},
    ],
}


async def test_a_value_naming_a_missing_field_fails_its_step_with_a_clear_error(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(TYPO)
        async with h.worker():
            await h.publish_triggers([_good(i) for i in range(5)])
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=5)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'failed'", expect=5)
        letters = await h.db.fetch("SELECT * FROM ordo.dead_letters")
        assert {(r["reason"], r["step_id"], r["workflow_id"]) for r in letters} == {
            ("template_missing_field", "send", "typo")
        }
        assert all("{{contact.first_nam}} names a missing field" in r["error"] for r in letters)
        # The condition on the same missing field read it as null and went on.
        kinds = [
            r["kind"]
            for r in await h.db.fetch(
                "SELECT kind FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq",
                h.execution_id("acme", "typo", "good-0"),
            )
        ]
        assert kinds == ["started", "branch", "step_failed", "failed"]
        assert await h.ledger_problems() == NO_PROBLEMS
