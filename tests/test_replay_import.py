"""`ordo replay --import`: another engine's exported decisions compared with Ordo's (daemon/replay_import.py).

The "other engine" here is a function that decides as the deployed workflow
says, so its export matches Ordo's except where the test changes it on
purpose; the comparison must find exactly those changes, and report the
malformed lines by number while comparing the rest.
"""

import copy

import orjson
from harness import Harness, ordo

from daemon.replay_import import BadLine, parse_line

ONBOARD = {
    "id": "onboard",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "greet", "type": "set", "values": {"greeting": "Hi {{contact.first_name}}"}},
        {"id": "by-country", "type": "if", "condition": {"eq": ["{{contact.country}}", "DE"]}, "then": "german"},
        {"id": "english", "type": "set", "values": {"locale": "en"}, "next": "send"},
        {"id": "german", "type": "set", "values": {"locale": "de"}},
        {"id": "send", "type": "action", "action": "sms.send", "input": {"to": "{{contact.id}}"}, "timeout": "1h"},
        {"id": "pause", "type": "wait", "duration": "1d"},
        {"id": "approval", "type": "wait_for_signal", "signal": "approved"},
        {"id": "done", "type": "set", "values": {"approved": True}},
    ],
}


def legacy_export(i: int) -> dict:
    """What the legacy engine recorded for its execution i: a German contact for even i."""
    country = "DE" if i % 2 == 0 else "US"
    locale = "german" if country == "DE" else "english"
    return {
        "execution": f"legacy-{i}",
        "tenant": "acme",
        "workflow": "onboard",
        "trigger": {
            "event_id": f"e-{i}",
            "type": "contact.created",
            "ts": 1_790_000_000_000 + i,
            "contact": {"id": f"c-{i}", "first_name": "Ada", "country": country},
            "data": {},
        },
        "inputs": [
            {"kind": "action_result", "step": "send", "ok": True, "output": {"sid": f"sms-{i}"}},
            {"kind": "timer"},
            {"kind": "signal", "name": "approved", "data": {"by": "bob"}},
        ],
        "decisions": [
            {"step": "greet", "kind": "set"},
            {"step": "by-country", "kind": "branch", "detail": {"to": "german" if country == "DE" else "english"}},
            {"step": locale, "kind": "set"},
            {"step": "send", "kind": "action_requested", "detail": {"action": "sms.send"}},
            {"step": "pause", "kind": "waiting"},
            {"step": "approval", "kind": "waiting", "detail": {"signal": "approved"}},
            {"step": "done", "kind": "set"},
            {"kind": "completed"},
        ],
    }


def export_file(path) -> dict:
    """Twelve lines: ten executions, three of them changed on purpose, and two malformed lines."""
    executions = [legacy_export(i) for i in range(10)]
    # legacy-2 (German) went the English way: a different branch.
    executions[2]["decisions"][1]["detail"] = {"to": "english"}
    executions[2]["decisions"][2]["step"] = "english"
    # legacy-5 never paused: its wait is missing.
    del executions[5]["decisions"][4]
    # legacy-7 decided one thing more at its end.
    executions[7]["decisions"].append({"step": "notify", "kind": "emitted"})
    lines = [orjson.dumps(e).decode() for e in executions]
    lines.insert(4, '{"execution": "legacy-x", "tenant": "acme", ')  # line 5: cut short
    no_subject = copy.deepcopy(executions[0])
    del no_subject["trigger"]["contact"]
    lines.insert(9, orjson.dumps(no_subject).decode())  # line 10: a trigger about nobody
    path.write_text("\n".join(lines) + "\n")
    return {"legacy-2": (1, "by-country"), "legacy-5": (4, "pause"), "legacy-7": (8, None)}


async def test_an_imported_history_yields_exactly_its_deliberate_differences(nats_server_url, pg_dsn, prefix, tmp_path):
    changed = export_file(tmp_path / "legacy.jsonl")
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(ONBOARD)
        run = ordo("replay", "--import", str(tmp_path / "legacy.jsonl"), "--json", env_extra=h.env())
        assert run.returncode == 2, run.stderr  # a malformed line: the comparison is not whole
        summary = orjson.loads(run.stdout)
        assert (summary["lines"], summary["compared"]) == (12, 10)
        assert (summary["identical"], summary["diverged"], summary["errors"]) == (7, 3, 0)
        assert [bad["line"] for bad in summary["malformed"]] == [5, 10]
        assert "not JSON" in summary["malformed"][0]["error"]
        assert "'trigger' names no subject" in summary["malformed"][1]["error"]

        diverged = {r["execution"]: r for r in summary["results"] if r["outcome"] == "diverged"}
        assert diverged.keys() == changed.keys()
        for execution, (index, ordo_step) in changed.items():
            first = diverged[execution]["first_divergence"]
            assert first["index"] == index, (execution, first)
            assert (first["ordo"] or {}).get("step") == ordo_step, (execution, first)
        assert diverged["legacy-2"]["first_divergence"]["ordo"]["detail"]["to"] == "german"
        assert diverged["legacy-7"]["first_divergence"]["recorded"] == {"step": "notify", "kind": "emitted"}
        # Every other execution matched all eight of its decisions, in Ordo's words.
        assert {r["compared"] for r in summary["results"] if r["outcome"] == "identical"} == {8}

        text = ordo("replay", "--import", str(tmp_path / "legacy.jsonl"), env_extra=h.env())
        assert "line 5: MALFORMED, skipped: not JSON" in text.stdout
        assert "legacy-2: DIVERGES at decision 1: they decided by-country branch" in text.stdout

        # Against a version that is not deployed, each execution is an error, not a divergence.
        missing = ordo(
            "replay", "--import", str(tmp_path / "legacy.jsonl"), "--version", "9", "--json", env_extra=h.env()
        )
        assert missing.returncode == 2
        assert {r["error"] for r in orjson.loads(missing.stdout)["results"]} == {
            "workflow acme/onboard v9 is not deployed"
        }


def test_a_line_that_is_not_an_exported_execution_says_what_is_wrong():
    good = legacy_export(1)
    assert parse_line(orjson.dumps(good)).execution == "legacy-1"
    cases = [
        ("[1]", "a line must be a JSON object, not list"),
        (orjson.dumps({**good, "tenant": ""}), "'tenant' must be a non-empty string"),
        (orjson.dumps({**good, "inputs": [{"kind": "webhook"}]}), "input 0: 'kind' must be one of"),
        (orjson.dumps({**good, "inputs": [{"kind": "action_result", "step": "send"}]}), "needs 'ok'"),
        (orjson.dumps({**good, "decisions": [{"kind": "started"}]}), "decision 0: 'kind' must be one of"),
        (orjson.dumps({k: v for k, v in good.items() if k != "decisions"}), "'decisions' must be a list"),
    ]
    for text, says in cases:
        try:
            parse_line(text)
        except BadLine as exc:
            assert says in str(exc), (text, str(exc))
        else:
            raise AssertionError(f"{text!r} was taken")
