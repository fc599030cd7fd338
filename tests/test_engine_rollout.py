"""A live rollout of a candidate engine: the same workflow version on another dispatcher build.

`ordo rollout start --engine NAME` (ledger/rollouts.py, daemon/definitions.py `on_engine`): each
new execution's engine is chosen from its id and the stage, recorded with its enrolment
(`executions.engine`, migration 017) and used for every later step, on any worker and after a
restart. The candidates here are real modules on the path, as a build shipped beside Ordo's
would be: the pure twin re-exported (identical in behaviour), test_engines.py's fork that records
a taken branch as a `goto`, a fork that marks every `set` it runs, and one that raises.
"""

import os

import orjson
import pytest
from harness import NO_PROBLEMS, WAITER, WELCOME, Harness, ordo
from test_engines import CANDIDATE as BRANCH_AS_GOTO
from test_rollout import Cohorts, _event, _rollout, _seen_by

from daemon.definitions import cohort
from daemon.engines import adopt
from hotpath import implementations
from ledger import rollouts
from ledger.rollouts import Plan, RolloutRefused, Thresholds

SAME = '''
"""Ordo's pure twin, shipped as a candidate build: it decides as the compiled one does."""
from hotpath.dispatcher import ExecutionState, Program, advance  # noqa: F401
'''

#: A fork whose every `set` says it ran here: which build ran a later step shows in the ledger.
MARKING = '''
"""The pure twin, marking the detail of every `set` transition it makes."""
from hotpath import dispatcher as pure

Program = pure.Program
ExecutionState = pure.ExecutionState


def advance(program, state, kind, payload, now_ms):
    out = pure.advance(program, state, kind, payload, now_ms)
    return [(seq, step, k, dict(d or {}, by="marking") if k == "set" else d) for seq, step, k, d in out]
'''

RAISING = '''
"""A candidate build that crashes on every input."""
from hotpath import dispatcher as pure

Program = pure.Program
ExecutionState = pure.ExecutionState


def advance(program, state, kind, payload, now_ms):
    raise RuntimeError("candidate engine crashed")
'''

#: A fork that starts an execution as Ordo's build does, then crashes on every message of it.
RAISING_LATER = '''
"""A candidate build that crashes on every message after the first step of an execution."""
from hotpath import dispatcher as pure

Program = pure.Program
ExecutionState = pure.ExecutionState


def advance(program, state, kind, payload, now_ms):
    if kind != "start":
        raise RuntimeError(f"candidate engine crashed on a {kind}")
    return pure.advance(program, state, kind, payload, now_ms)
'''

#: WELCOME's history on Ordo's own build, for a German contact.
WELCOME_HISTORY = ["started:", "set:greet", "branch:by-country", "set:german", "completed:done"]


@pytest.fixture
def candidates(tmp_path, monkeypatch):
    """The candidate engine modules, importable here and by the worker processes this test spawns."""
    for name, source in (
        ("same_engine", SAME),
        ("goto_engine", BRANCH_AS_GOTO),
        ("marking_engine", MARKING),
        ("raising_engine", RAISING),
        ("later_raising_engine", RAISING_LATER),
    ):
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


async def _engines(h: Harness, workflow_id: str = "welcome") -> dict[str, str | None]:
    rows = await h.db.fetch("SELECT event_id, engine FROM ordo.executions WHERE workflow_id = $1", workflow_id)
    return {r["event_id"]: r["engine"] for r in rows}


async def _histories(h: Harness) -> dict[str, list[str]]:
    rows = await h.db.fetch(
        "SELECT e.event_id, array_agg(t.kind || ':' || t.step_id ORDER BY t.seq) AS steps "
        "FROM ordo.transitions t JOIN ordo.executions e USING (execution_id) GROUP BY e.event_id"
    )
    return {r["event_id"]: r["steps"] for r in rows}


async def test_an_engine_identical_in_behaviour_shows_no_divergence_and_rolls_out_to_100_percent(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        cohorts = Cohorts(h, "same-engine")
        plan = Plan(
            "welcome",
            None,
            stages=(0, 5_000, 10_000),
            min_dwell_s=0,
            min_sample=3,
            thresholds=Thresholds(max_failure_rate=0.0, max_divergence_rate=0.0),
            shadow_share=1_000,
            engine="module:same_engine",
        )
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            assert (started["from_version"], started["to_version"], started["engine"]) == (1, 1, "module:same_engine")
            await _seen_by(worker, "running", 0)
            shadowed = cohorts.take(3, at_least=9_000)
            await h.publish_triggers([_event(i) for i in shadowed])
            await h.wait_until("SELECT share FROM ordo.rollouts", expect=5_000)
            await _seen_by(worker, "running", 5_000)
            on_candidate, on_baseline = cohorts.take(3, below=5_000), cohorts.take(3, at_least=5_000)
            await h.publish_triggers([_event(i) for i in on_candidate + on_baseline])
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="completed")
            await _seen_by(worker, "completed", 10_000)
            last = cohorts.take(3, at_least=5_000)
            await h.publish_triggers([_event(i) for i in last])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=12)
        engines = await _engines(h)
        assert {engines[i] for i in shadowed + on_baseline} == {None}
        assert {engines[i] for i in on_candidate + last} == {"module:same_engine"}
        # The same decisions on either build, step for step.
        assert set(map(tuple, (await _histories(h)).values())) == {tuple(WELCOME_HISTORY)}
        assert {r["outcome"] for r in await h.db.fetch("SELECT outcome FROM ordo.shadow_runs")} == {"identical"}
        logged = await rollouts.transitions(h.db, started["rollout_id"])
        assert [(t["action"], t["share_after"]) for t in logged] == [
            ("started", 0),
            ("advanced", 5_000),
            ("completed", 10_000),
        ]
        detail = orjson.loads(logged[2]["detail"])
        assert (detail["candidate"]["engine"], detail["candidate"]["completed"]) == ("module:same_engine", 3)
        assert detail["baseline"]["completed"] == 3 and detail["candidate"]["failure_rate"] == 0
        status = ordo("rollout", "status", "--workflow", "welcome", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert "v1 -> v1@module:same_engine  completed" in status.stdout, status.stdout
        assert "candidate v1@module:same_engine: started 0" in status.stdout, status.stdout  # the 100% stage's
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_an_engine_that_decides_otherwise_is_caught_in_shadow_and_rolled_back_within_its_share(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        cohorts = Cohorts(h, "goto-engine")
        plan = Plan(
            "welcome",
            None,
            stages=(100, 10_000),
            min_dwell_s=3600,
            min_sample=3,
            thresholds=Thresholds(max_divergence_rate=0.0),
            shadow_share=10_000,
            engine="module:goto_engine",
        )
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            # The 1% stage's own executions first, then the baseline's, which all run the fork in shadow.
            on_candidate = cohorts.take(2, below=100)
            await h.publish_triggers([_event(i) for i in on_candidate])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE engine IS NOT NULL", expect=2)
            on_baseline = cohorts.take(4, at_least=100)
            await h.publish_triggers([_event(i) for i in on_baseline])
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back")
            await _seen_by(worker, "rolled_back", 0)
            after = cohorts.take(2, below=100)
            await h.publish_triggers([_event(i) for i in after])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=8)
        engines = await _engines(h)
        ran_on_fork = {event_id for event_id, engine in engines.items() if engine == "module:goto_engine"}
        # No execution beyond the stage's 1% ran on the candidate engine, and none after the rollback.
        assert ran_on_fork == set(on_candidate)
        assert all(cohorts.cohort(i) < 100 for i in ran_on_fork)
        assert {engines[i] for i in on_baseline + after} == {None}
        histories = await _histories(h)
        assert {i: histories[i][2] for i in on_candidate} == {i: "goto:by-country" for i in on_candidate}
        assert all(histories[i] == WELCOME_HISTORY for i in on_baseline + after)
        runs = await h.db.fetch("SELECT outcome, step_id, primary_decision, candidate_decision FROM ordo.shadow_runs")
        assert len(runs) == 4 and {(r["outcome"], r["step_id"]) for r in runs} == {("diverged", "by-country")}
        assert {orjson.loads(r["candidate_decision"])["kind"] for r in runs} == {"goto"}
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (rolled["action"], rolled["share_after"], detail["metric"]) == ("rolled_back", 0, "divergence_rate")


async def test_the_engine_of_an_execution_is_the_same_on_every_worker_and_after_a_restart(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        # A sample never reached: the rollout holds at 50%.
        plan = Plan("waiter", None, stages=(5_000, 10_000), min_sample=10_000, engine="module:marking_engine")
        await rollouts.start(h.db, plan, "test")
        ids = [f"restart-{i}" for i in range(24)]
        on_engine = {i for i in ids if cohort(h.execution_id("acme", "waiter", i)) < 5_000}
        assert 0 < len(on_engine) < len(ids)
        first, second = h.spawn_worker(0, 2), h.spawn_worker(1, 2)
        await h.publish_triggers([dict(_event(i), type="session.started") for i in ids])
        await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=len(ids))
        # Both workers die with every execution waiting; a new one takes all the partitions over.
        h.kill(first)
        h.kill(second)
        async with h.worker() as again:
            await _seen_by(again, "running", 5_000)
            for event_id in ids:
                await h.signal(h.execution_id("acme", "waiter", event_id), "done")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(ids))
        engines = await _engines(h, "waiter")
        assert engines == {i: "module:marking_engine" if i in on_engine else None for i in ids}
        # The step after the wait ran, on the new worker, on the engine each execution was enrolled on.
        rows = await h.db.fetch(
            "SELECT e.event_id, t.detail FROM ordo.transitions t JOIN ordo.executions e USING (execution_id) "
            "WHERE t.kind = 'set' AND t.step_id = 'finish'"
        )
        marked = {r["event_id"] for r in rows if r["detail"] and orjson.loads(r["detail"]).get("by") == "marking"}
        assert len(rows) == len(ids) and marked == on_engine
        # A replay runs each on its own engine, and finds what was recorded.
        replayed = ordo("replay", "--sample", "24", "--workflow", "waiter", "--json", env_extra={"ORDO_PG_DSN": pg_dsn})
        summary = orjson.loads(replayed.stdout)
        assert (summary["replayed"], summary["identical"]) == (24, 24), replayed.stdout + replayed.stderr


async def test_a_candidate_engine_that_raises_changes_nothing_of_the_primary(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        plan = Plan(
            "welcome",
            None,
            stages=(0, 10_000),
            min_dwell_s=0,
            min_sample=3,
            thresholds=Thresholds(max_divergence_rate=0.0),
            shadow_share=10_000,
            engine="module:raising_engine",
        )
        ids = [f"raise-{i}" for i in range(4)]
        async with h.worker() as worker:
            await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 0)
            await h.publish_triggers([_event(i) for i in ids])
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=4)
        assert await _histories(h) == {i: WELCOME_HISTORY for i in ids}
        assert set((await _engines(h)).values()) == {None}
        runs = await h.db.fetch("SELECT outcome, error FROM ordo.shadow_runs")
        assert {(r["outcome"], r["error"]) for r in runs} == {("error", "RuntimeError: candidate engine crashed")}
        assert len(runs) == 4
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_candidate_engine_that_raises_on_traffic_fails_only_its_own_executions_and_is_rolled_back(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        cohorts = Cohorts(h, "raise-live")
        plan = Plan(
            "welcome", None, stages=(100, 10_000), min_dwell_s=3600, min_sample=2, engine="module:raising_engine"
        )
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            on_candidate, on_baseline = cohorts.take(2, below=100), cohorts.take(4, at_least=100)
            await h.publish_triggers([_event(i) for i in on_candidate + on_baseline])
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back")
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=6)
        rows = await h.db.fetch("SELECT event_id, execution_id::text, status, engine FROM ordo.executions")
        assert {r["event_id"]: (r["status"], r["engine"]) for r in rows} == {
            **{i: ("failed", "module:raising_engine") for i in on_candidate},
            **{i: ("completed", None) for i in on_baseline},
        }
        histories = await _histories(h)
        assert all(histories[i] == ["started:", "failed:"] for i in on_candidate)
        assert all(histories[i] == WELCOME_HISTORY for i in on_baseline)
        (failed,) = {
            r["detail"] for r in await h.db.fetch("SELECT detail::text FROM ordo.transitions WHERE kind = 'failed'")
        }
        assert orjson.loads(failed) == {
            "error": "engine 'module:raising_engine' raised RuntimeError: candidate engine crashed",
            "code": "engine_error",
        }
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (detail["metric"], detail["candidate"]["failure_rate"]) == ("failure_rate", 1.0)
        ids = {r["event_id"]: r["execution_id"] for r in rows}
        assert sorted(detail["failed_executions"]) == sorted(ids[i] for i in on_candidate)
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_candidate_engine_that_raises_on_a_later_step_counts_it_as_failed_and_is_rolled_back(
    nats_server_url, pg_dsn, prefix, candidates
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        cohorts = Cohorts(h, "raise-later", "waiter")
        plan = Plan(
            "waiter", None, stages=(100, 10_000), min_dwell_s=3600, min_sample=2, engine="module:later_raising_engine"
        )
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            on_candidate, on_baseline = cohorts.take(2, below=100), cohorts.take(2, at_least=100)
            await h.publish_triggers([dict(_event(i), type="session.started") for i in on_candidate + on_baseline])
            for event_id in on_candidate + on_baseline:
                await h.signal_once_waiting(h.execution_id("acme", "waiter", event_id), "done")
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters WHERE reason = 'dispatch_error'", expect=2)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=2)
            # Judged about every second: the candidate's two dispatch errors are its sample.
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back", timeout=15)
        rows = await h.db.fetch("SELECT event_id, status, engine FROM ordo.executions")
        # The candidate's executions wait where they were (`ordo dlq retry` applies the signal again).
        assert {r["event_id"]: (r["status"], r["engine"]) for r in rows} == {
            **{i: ("waiting", "module:later_raising_engine") for i in on_candidate},
            **{i: ("completed", None) for i in on_baseline},
        }
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (detail["metric"], detail["candidate"]["failure_rate"]) == ("failure_rate", 1.0)
        assert (detail["candidate"]["started"], detail["candidate"]["failed"]) == (2, 2)
        assert (detail["baseline"]["completed"], detail["baseline"]["failed"]) == (2, 0)
        # Listed as failed, and as dispatch errors: their signals are dead letters.
        raised = sorted(h.execution_id("acme", "waiter", i) for i in on_candidate)
        assert sorted(detail["failed_executions"]) == sorted(detail["dispatch_error_executions"]) == raised


async def test_an_execution_the_candidate_engine_raises_on_again_and_again_is_one_failed_execution(
    nats_server_url, pg_dsn, prefix, candidates
):
    """Three signals the candidate raises on, of one execution, are one failure in a sample of one."""
    letters = "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'dispatch_error'"
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        cohorts = Cohorts(h, "raise-again", "waiter")
        plan = Plan(
            "waiter", None, stages=(100, 10_000), min_dwell_s=3600, min_sample=2, engine="module:later_raising_engine"
        )

        def execution(event_id: str) -> str:
            return h.execution_id("acme", "waiter", event_id)

        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            first, second = cohorts.take(2, below=100)
            await h.publish_triggers([dict(_event(first), type="session.started")])
            for _ in range(3):
                await h.signal_once_waiting(execution(first), "done")
            await h.wait_until(letters, expect=3)
            # Not a sample of two yet: the candidate keeps its share, and the next one runs on it too.
            await h.publish_triggers([dict(_event(second), type="session.started")])
            await h.signal_once_waiting(execution(second), "done")
            await h.wait_until(letters, expect=4, timeout=15)
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back", timeout=15)
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (detail["candidate"]["started"], detail["candidate"]["failed"]) == (2, 2)
        assert sorted(detail["dispatch_error_executions"]) == sorted(map(execution, (first, second)))


async def test_engine_rollouts_that_cannot_be_are_refused_with_one_line_and_change_nothing(
    nats_server_url, pg_dsn, prefix, candidates, tmp_path
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(dict(WELCOME, description="v2"))
        env = {"ORDO_PG_DSN": pg_dsn, "ORDO_LOG_LEVEL": "warning"}
        (tmp_path / "broken_engine.py").write_text("raise ImportError('no such dispatcher here')\n")
        (tmp_path / "picky_engine.py").write_text(
            "from hotpath.dispatcher import ExecutionState, advance  # noqa: F401\n\n"
            "class Program:\n    def __init__(self, definition):\n"
            "        raise ValueError('if steps are not supported')\n"
        )

        async def ledger_rows():
            return [
                await h.db.fetchval("SELECT count(*) FROM ordo.rollouts"),
                await h.db.fetchval("SELECT count(*) FROM ordo.rollout_transitions"),
            ]

        def refused(*args: str) -> str:
            result = ordo("rollout", "start", "--workflow", "welcome", *args, env_extra=env)
            assert result.returncode == 1, (result.stdout, result.stderr)
            assert result.stderr.startswith("ordo: ") and result.stderr.count("\n") == 1, result.stderr
            return result.stderr

        assert "no engine 'nope'" in refused("--engine", "nope")
        assert "cannot import broken_engine: ImportError: no such dispatcher here" in refused(
            "--engine", "module:broken_engine"
        )
        assert "engine 'module:picky_engine' cannot compile version 2: ValueError" in refused(
            "--engine", "module:picky_engine"
        )
        assert "roll out one change at a time" in refused("--engine", "pure", "--to-version", "2")
        assert await ledger_rows() == [0, 0]

        started = ordo("rollout", "start", "--workflow", "welcome", "--engine", "module:same_engine", env_extra=env)
        assert started.returncode == 0, started.stderr
        assert "v2 -> v2@module:same_engine  running  candidate share 1%" in started.stdout
        before = await ledger_rows()
        assert "has rollout 1 in progress already" in refused("--engine", "pure")
        assert "has rollout 1 in progress already" in refused("--to-version", "1")
        with pytest.raises(RolloutRefused):
            await rollouts.start(h.db, Plan("welcome", None, engine="pure"), "test")
        assert await ledger_rows() == before
        assert (await _rollout(h))["engine"] == "module:same_engine"


@pytest.mark.parametrize("into", [name for name, build in implementations() if build is not None])
def test_a_state_read_back_moves_to_the_engine_that_runs_it_field_for_field(into):
    build = dict(implementations())[into]
    for _, origin in implementations():
        if origin is None:
            continue
        state = origin.ExecutionState(
            "e-1",
            status="waiting",
            pc=2,
            seq=7,
            context={"a": 1},
            subject={"id": "c-1"},
            event={"type": "t"},
            steps=3,
            waiting="action",
            attempt=2,
            timer="t-1",
            visits={"send": 1},
            failures=[{"attempt": 1}],
            tenant="acme",
        )
        moved = adopt(state, build)
        assert type(moved) is build.ExecutionState
        fields = ("execution_id", "status", "pc", "seq", "context", "subject", "event", "steps", "waiting")
        fields += ("attempt", "timer", "visits", "failures", "tenant", "effects")
        assert [getattr(moved, f) for f in fields] == [getattr(state, f) for f in fields]
        assert (moved is state) == (origin.ExecutionState is build.ExecutionState)
