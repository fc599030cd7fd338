"""`ordo replay --engine`: recorded executions replayed on another dispatcher build (daemon/engines.py).

The candidate in the second test is a real module on the path, as a build
shipped beside Ordo's would be: Ordo's pure dispatcher with one deliberate
change in its step semantics, which the replay must show on every execution
it touches and nowhere else.
"""

import os

import orjson
import pytest
from harness import WELCOME, Harness, ordo

from bench.generator import trigger_event
from daemon.engines import EngineError, engine, names

CANDIDATE = '''
"""A fork of the step semantics: an `if` whose condition holds is recorded as a `goto`."""
from hotpath import dispatcher as pure

Program = pure.Program
ExecutionState = pure.ExecutionState


def advance(program, state, kind, payload, now_ms):
    out = pure.advance(program, state, kind, payload, now_ms)
    return [
        (seq, step, "goto" if k == "branch" and (d or {}).get("taken") == "then" else k, d)
        for seq, step, k, d in out
    ]
'''


async def _finished_welcomes(h, count: int) -> None:
    await h.deploy(WELCOME)
    events = [trigger_event("eng", i, tenant="acme", event_type="contact.created") for i in range(count)]
    for i, event in enumerate(events):  # half German (the `then` branch), half not
        event["contact"]["country"] = "DE" if i % 2 == 0 else "US"
    async with h.worker():
        await h.publish_triggers(events)
        await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count)


async def test_a_candidate_build_is_judged_on_recorded_executions_before_it_takes_traffic(
    nats_server_url, pg_dsn, prefix, tmp_path
):
    (tmp_path / "candidate_engine.py").write_text(CANDIDATE)
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await _finished_welcomes(h, 8)
        env = dict(h.env(), PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        sample = ("replay", "--sample", "8", "--workflow", "welcome", "--json")

        # Ordo's own builds decide alike: the pure twin replays what production decided.
        for name in names()[:2]:
            same = ordo(*sample, "--engine", name, env_extra=env)
            assert same.returncode == 0, same.stdout + same.stderr
            summary = orjson.loads(same.stdout)
            assert (summary["engine"], summary["identical"], summary["replayed"]) == (name, 8, 8)

        fork = ordo(*sample, "--engine", "module:candidate_engine", env_extra=env)
        assert fork.returncode == 1, fork.stdout + fork.stderr
        summary = orjson.loads(fork.stdout)
        # The four German contacts took the `then` branch: exactly those diverge, at that step.
        assert (summary["identical"], summary["diverged"], summary["errors"]) == (4, 4, 0)
        assert [(p["step"], p["kind"], p["executions"]) for p in summary["top_divergences"]] == [
            ("by-country", "branch", 4)
        ]
        first = next(r for r in summary["results"] if r["outcome"] == "diverged")["first_divergence"]
        assert (first["recorded"]["kind"], first["replayed"]["kind"]) == ("branch", "goto")

        text = ordo(
            "replay", "--sample", "8", "--workflow", "welcome", "--engine", "module:candidate_engine", env_extra=env
        )
        assert "on engine module:candidate_engine: 4 identical, 4 diverged" in text.stdout


def test_an_engine_that_cannot_be_used_is_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(EngineError, match="no engine 'nope': one of .*pure.*or module:PACKAGE.MODULE"):
        engine("nope")
    with pytest.raises(EngineError, match="cannot import no_such_module_here: ModuleNotFoundError"):
        engine("module:no_such_module_here")
    (tmp_path / "half_an_engine.py").write_text("Program = object\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EngineError, match="half_an_engine lacks ExecutionState, advance"):
        engine("module:half_an_engine")
    assert engine("pure").Program.__module__ == "hotpath.dispatcher"
    refused = ordo("replay", "--sample", "1", "--workflow", "welcome", "--engine", "nope")
    assert refused.returncode == 1 and "ordo: no engine 'nope'" in refused.stderr
