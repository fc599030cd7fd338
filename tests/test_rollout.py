"""Progressive rollout of a workflow version, with automatic advance and rollback (ledger/rollouts.py,
daemon/rollout_controller.py, the version choice in daemon/enrolment.py).

The version of a new execution under rollout is a function of its id (its cohort, 0 to 9,999) and the
stage's share, so these tests choose event ids by cohort to give the candidate exactly the executions
they mean to; a short dwell and a small sample keep the counts tiny.
"""

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson
import pytest
from harness import NO_PROBLEMS, WAITER, WELCOME, Harness, ordo

from daemon import advance, enrolment, metrics, rollout_tally
from daemon.definitions import cohort
from daemon.rollout_controller import judge
from daemon.rollout_shadow import dual_run
from daemon.rollout_tally import RolloutTally
from hotpath.vocabulary import CLOSED
from ledger import rollouts
from ledger.batcher import DispatchFailure
from ledger.rollouts import Plan, RolloutRefused, Thresholds

#: WELCOME with one more (harmless) value: a candidate that does what its baseline does, and a little more.
WELCOME_V2 = dict(WELCOME, steps=[{"id": "mark", "type": "set", "values": {"revision": 2}}, *WELCOME["steps"]])
#: WELCOME described otherwise: a candidate identical in behaviour, step for step.
SAME_V2 = dict(WELCOME, description="the same, redeployed")
#: A candidate that takes the other branch: German contacts get English.
BRANCHING_V2 = dict(
    WELCOME,
    steps=[
        WELCOME["steps"][0],
        {"id": "by-country", "type": "if", "condition": {"eq": ["{{contact.country}}", "FR"]}, "then": "german"},
        *WELCOME["steps"][2:],
    ],
)
#: A candidate that loops until its loop guard stops it.
LOOPING_V2 = dict(
    WELCOME,
    steps=[WELCOME["steps"][0], {"id": "again", "type": "goto", "target": "greet"}],
)
#: WAITER redeployed unchanged: its version 2.
WAITER_V2 = dict(WAITER, description="the same, redeployed")
#: A candidate that fails every execution about a contact marked flaky.
FLAKY_V2 = dict(
    WELCOME,
    steps=[
        {"id": "flaky", "type": "if", "condition": {"eq": ["{{contact.flaky}}", True]}, "then": "fail"},
        *WELCOME["steps"][:-1],
        {"id": "done", "type": "end"},
        {"id": "fail", "type": "end", "status": "failed", "reason": "flaky contact"},
    ],
)


def _event(event_id: str, flaky: bool = False) -> dict:
    contact = {"id": f"c-{event_id}", "first_name": "Ada", "country": "DE", "flaky": flaky}
    return {
        "v": 1,
        "event_id": event_id,
        "tenant": "acme",
        "type": "contact.created",
        "contact": contact,
        "data": {},
        "ts": int(time.time() * 1000),
    }


class Cohorts:
    """Event ids whose executions fall below a share of new executions, or at or above it."""

    def __init__(self, h: Harness, run: str, workflow_id: str = "welcome"):
        self._h = h
        self._workflow_id = workflow_id
        self._ids = (f"{run}-{i}" for i in itertools.count())

    def cohort(self, event_id: str) -> int:
        return cohort(self._h.execution_id("acme", self._workflow_id, event_id))

    def take(self, count: int, below: int | None = None, at_least: int | None = None) -> list[str]:
        found = []
        for event_id in self._ids:
            c = self.cohort(event_id)
            if (below is None or c < below) and (at_least is None or c >= at_least):
                found.append(event_id)
                if len(found) == count:
                    return found
        raise AssertionError("unreachable")


async def _versions(h: Harness) -> dict[str, int]:
    rows = await h.db.fetch("SELECT event_id, workflow_version FROM ordo.executions WHERE workflow_id = 'welcome'")
    return {r["event_id"]: r["workflow_version"] for r in rows}


async def _rollout(h: Harness) -> dict:
    (row,) = await rollouts.latest(h.db, "welcome")
    return dict(row)


async def _seen_by(worker, state: str, share: int) -> None:
    """Until the worker's registry has the rollout in `state` at `share` (it reads the ledger on a NOTIFY)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        latest = worker.registry.rollouts()
        if latest and latest[0]["state"] == state and latest[0]["share"] == share:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the worker did not see the rollout {state} at {share}: {latest}")


async def test_an_identical_candidate_shows_no_divergence_and_goes_through_every_stage_to_100_percent(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        assert await h.deploy(WELCOME) == 1
        assert await h.deploy(SAME_V2) == 2
        cohorts = Cohorts(h, "same")
        plan = Plan(
            "welcome",
            2,
            stages=(0, 100, 500, 2_500, 5_000, 10_000),
            min_dwell_s=0,
            min_sample=3,
            thresholds=Thresholds(max_failure_rate=0.01, max_divergence_rate=0.0),
            shadow_share=1_000,
        )
        async with h.worker() as worker:
            await rollouts.start(h.db, plan, "test")
            # Shadow only: the top 10% of cohorts run the candidate beside the baseline.
            await _seen_by(worker, "running", 0)
            shadowed = cohorts.take(3, at_least=9_000)
            await h.publish_triggers([_event(i) for i in shadowed])
            await h.wait_until("SELECT share FROM ordo.rollouts", expect=100)
            shares, sent = [0], [(0, [])]
            for _ in range(4):
                r = await _rollout(h)
                assert r["state"] == "running"
                shares.append(r["share"])
                await _seen_by(worker, "running", r["share"])
                # The stage's sample on the candidate, and as many on the baseline (above every share but 100%).
                ids = cohorts.take(3, below=r["share"]) + cohorts.take(3, at_least=5_000)
                sent.append((r["share"], ids))
                await h.publish_triggers([_event(i) for i in ids])
                await h.wait_until(
                    "SELECT state <> 'running' OR share <> $1 FROM ordo.rollouts", r["share"], expect=True
                )
            r = await _rollout(h)
            assert (r["state"], r["share"], shares) == ("completed", 10_000, [0, 100, 500, 2_500, 5_000])
            await _seen_by(worker, "completed", 10_000)
            last = cohorts.take(5)
            await h.publish_triggers([_event(i) for i in last])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=32)
        versions = await _versions(h)
        assert {versions[i] for i in shadowed} == {1}
        outcomes = await h.db.fetch("SELECT execution_id::text, outcome FROM ordo.shadow_runs")
        assert {r["outcome"] for r in outcomes} == {"identical"}
        assert {h.execution_id("acme", "welcome", i) for i in shadowed} <= {r["execution_id"] for r in outcomes}
        assert {versions[i] for i in last} == {2}
        # Every execution ran the version its cohort and its stage chose.
        for share, ids in sent[1:]:
            assert [versions[i] for i in ids] == [2, 2, 2, 1, 1, 1], (share, ids)
        logged = await rollouts.transitions(h.db, r["rollout_id"])
        assert [(t["action"], t["share_before"], t["share_after"], t["actor"]) for t in logged] == [
            ("started", 0, 0, "test"),
            ("advanced", 0, 100, "controller"),
            ("advanced", 100, 500, "controller"),
            ("advanced", 500, 2_500, "controller"),
            ("advanced", 2_500, 5_000, "controller"),
            ("completed", 5_000, 10_000, "controller"),
        ]
        detail = orjson.loads(logged[1]["detail"])
        assert detail["shadow"]["compared"] == 3 and detail["shadow"]["divergence_rate"] == 0
        detail = orjson.loads(logged[2]["detail"])
        assert detail["candidate"]["completed"] == 3 and detail["candidate"]["failure_rate"] == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_candidate_failing_one_execution_in_ten_is_rolled_back_at_its_first_stage(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(FLAKY_V2)
        cohorts = Cohorts(h, "flaky")
        plan = Plan("welcome", 2, stages=(100, 10_000), min_dwell_s=3600, min_sample=10)
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            candidate = cohorts.take(10, below=100)
            baseline = cohorts.take(30, at_least=100)
            # One in ten is flaky on either side: only the candidate fails it.
            events = [_event(i, flaky=n == 0) for n, i in enumerate(candidate)]
            events += [_event(i, flaky=n % 10 == 0) for n, i in enumerate(baseline)]
            await h.publish_triggers(events)
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back")
            await _seen_by(worker, "rolled_back", 0)
            # After the rollback, the candidate's cohort runs the baseline again.
            after = cohorts.take(5, below=100)
            await h.publish_triggers([_event(i) for i in after])
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status IN ('completed', 'failed')", expect=45
            )
        versions = await _versions(h)
        on_candidate = {event_id for event_id, version in versions.items() if version == 2}
        assert on_candidate == set(candidate)
        # No execution beyond the stage's share ever ran on the candidate.
        assert all(cohorts.cohort(event_id) < 100 for event_id in on_candidate)
        assert {versions[i] for i in after} == {1}
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        assert (rolled["action"], rolled["share_before"], rolled["share_after"]) == ("rolled_back", 100, 0)
        detail = orjson.loads(rolled["detail"])
        assert detail["metric"] == "failure_rate" and detail["threshold"] == 0.01
        assert detail["candidate"]["failure_rate"] == pytest.approx(0.1)
        assert detail["baseline"]["failure_rate"] == 0.0
        assert detail["failed_executions"] == [h.execution_id("acme", "welcome", candidate[0])]
        status = ordo("rollout", "status", "--workflow", "welcome", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert status.returncode == 0, status.stderr
        assert "rolled_back" in status.stdout and "failure rate 10.00%" in status.stdout


async def test_a_candidate_version_the_dispatcher_raises_on_at_enrolment_is_rolled_back(
    nats_server_url, pg_dsn, prefix, monkeypatch
):
    """The trigger is dead-lettered (`dispatch_error`) and counts as a started and failed execution of v2."""
    own_build = enrolment.advance

    def raising_on_v2(program, state, kind, payload, now_ms):
        if program.version == 2:
            raise RuntimeError("the dispatcher crashed on v2")
        return own_build(program, state, kind, payload, now_ms)

    monkeypatch.setattr(enrolment, "advance", raising_on_v2)
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(SAME_V2)
        cohorts = Cohorts(h, "crash-on-enrolment")
        plan = Plan("welcome", 2, stages=(100, 10_000), min_dwell_s=3600, min_sample=2)
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            candidate, baseline = cohorts.take(2, below=100), cohorts.take(2, at_least=100)
            await h.publish_triggers([_event(i) for i in candidate + baseline])
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters WHERE reason = 'dispatch_error'", expect=2)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=2)
            # Judged about every second: the candidate's two dispatch errors are its sample.
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back", timeout=15)
        assert await _versions(h) == {i: 1 for i in baseline}
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (detail["metric"], detail["candidate"]["failure_rate"]) == ("failure_rate", 1.0)
        assert (detail["candidate"]["started"], detail["candidate"]["failed"]) == (2, 2)
        assert (detail["baseline"]["completed"], detail["baseline"]["failed"]) == (2, 0)


async def test_a_rollback_on_dispatch_errors_names_the_candidates_executions_the_dispatcher_raised_on(
    nats_server_url, pg_dsn, prefix, monkeypatch
):
    """Raised on at enrolment (never recorded) or on a later message, they are listed with the failed
    executions and marked as dispatch errors; the baseline's dispatch errors are not listed."""
    crash_on_start: set[str] = set()
    own_start, own_advance = enrolment.advance, advance.advance

    def raising_on_start(program, state, kind, payload, now_ms):
        if state.execution_id in crash_on_start:
            raise RuntimeError("the dispatcher crashed on a start")
        return own_start(program, state, kind, payload, now_ms)

    def raising_on_crash(program, state, kind, payload, now_ms):
        if kind == "signal" and payload["name"] == "crash":
            raise RuntimeError("the dispatcher crashed on a signal")
        return own_advance(program, state, kind, payload, now_ms)

    monkeypatch.setattr(enrolment, "advance", raising_on_start)
    monkeypatch.setattr(advance, "advance", raising_on_crash)
    letters = "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'dispatch_error'"
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        await h.deploy(WAITER_V2)
        cohorts = Cohorts(h, "raised-on", "waiter")
        plan = Plan("waiter", 2, stages=(100, 10_000), min_dwell_s=3600, min_sample=2)

        def execution(event_id: str) -> str:
            return h.execution_id("acme", "waiter", event_id)

        async def crash(event_id: str) -> None:
            """A signal the dispatcher raises on, once the execution waits (for `done`)."""
            await h.wait_until("SELECT waiting FROM ordo.executions WHERE event_id = $1", event_id, expect="done")
            await h.signal(execution(event_id), "crash")

        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 100)
            base_start, base_signal, *base_done = cohorts.take(4, at_least=100)
            cand_start, cand_signal = cohorts.take(2, below=100)
            crash_on_start.update(execution(i) for i in (base_start, cand_start))
            # The baseline's dispatch errors first, before the candidate has a sample to be judged on.
            await h.publish_triggers([dict(_event(i), type="session.started") for i in (base_start, base_signal)])
            await h.publish_triggers([dict(_event(i), type="session.started") for i in base_done])
            await crash(base_signal)
            for event_id in base_done:
                await h.signal_once_waiting(execution(event_id), "done")
            await h.wait_until(letters, expect=2)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=2)
            await h.publish_triggers([dict(_event(i), type="session.started") for i in (cand_start, cand_signal)])
            await crash(cand_signal)
            await h.wait_until(letters, expect=4)
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back", timeout=15)
        # Each dispatch_error letter names its execution, the one raised on at enrolment too.
        named = await h.db.fetch("SELECT execution_id::text FROM ordo.dead_letters WHERE reason = 'dispatch_error'")
        assert sorted(r["execution_id"] for r in named) == sorted(
            execution(i) for i in (base_start, base_signal, cand_start, cand_signal)
        )
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (detail["candidate"]["failed"], detail["baseline"]["failed"]) == (2, 2)
        raised = sorted(execution(i) for i in (cand_start, cand_signal))
        assert sorted(detail["failed_executions"]) == raised
        assert sorted(detail["dispatch_error_executions"]) == raised
        status = ordo("rollout", "status", "--workflow", "waiter", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert status.returncode == 0, status.stderr
        assert all(f"{i} (dispatch_error)" in status.stdout for i in raised), status.stdout
        assert "ordo dlq list --reason dispatch_error" in status.stdout


def _letters_read(node: dict) -> int:
    """Rows the scans of a plan (EXPLAIN ANALYZE, JSON) read from ordo.dead_letters: returned or filtered out."""
    read = 0
    if node.get("Relation Name") == "dead_letters":
        read += (
            node["Actual Rows"] + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        )
    return read + sum(_letters_read(child) for child in node.get("Plans", []))


async def test_a_rollback_reads_its_workflows_dispatch_errors_not_the_whole_dead_letter_table(pg_dsn):
    """`dispatch_errored` runs on every rollback: on 20,000 letters of every reason, tenant and workflow,
    it reads the workflow's dispatch errors since the stage began, and no other letter."""
    import asyncpg

    from ledger.schema import migrate

    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        began = datetime.now(UTC) - timedelta(hours=1)
        # One letter in four a dispatch error; 5 tenants x 8 workflows; a third of them before the stage began.
        await conn.execute(
            """INSERT INTO ordo.dead_letters (at, reason, error, tenant, workflow_id, execution_id, subject, stream,
                   stream_seq, payload)
               SELECT $1::timestamptz + (i % 3 > 0)::int * interval '2 hours',
                      CASE WHEN i % 4 = 0 THEN 'dispatch_error' ELSE 'bad_input' END, 'x',
                      'tenant-' || (i / 4) % 5, 'workflow-' || (i / 20) % 8,
                      md5(i::text)::uuid, 'subject', 'stream', i, ''::bytea
               FROM generate_series(1, 20000) AS i""",
            began - timedelta(hours=1),
        )
        await conn.execute("VACUUM ANALYZE ordo.dead_letters")
        key = ("tenant-3", "workflow-5")
        wanted = await conn.fetchval(
            "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'dispatch_error' AND tenant = $1"
            " AND workflow_id = $2 AND at >= $3",
            *key,
            began,
        )
        assert wanted > 0
        assert len(await rollouts.dispatch_errored(conn, *key, began, 1000)) == wanted
        plan = orjson.loads(
            await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + rollouts._DISPATCH_ERRORED, *key, began, 1000)
        )
        assert _letters_read(plan[0]["Plan"]) == wanted
    finally:
        await conn.close()


async def test_the_version_chosen_is_the_same_on_every_worker_and_after_a_restart(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WELCOME_V2)
        cohorts = Cohorts(h, "same-everywhere")
        # A sample the test never reaches: the rollout holds at 50%.
        await rollouts.start(h.db, Plan("welcome", 2, stages=(5_000, 10_000), min_sample=10_000), "test")
        first = cohorts.take(40)
        async with h.worker(0, 2) as one, h.worker(1, 2) as two:
            await _seen_by(one, "running", 5_000)
            await _seen_by(two, "running", 5_000)
            await h.publish_triggers([_event(i) for i in first])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=40)
        # A worker started afresh chooses as they did.
        second = cohorts.take(40)
        async with h.worker() as again:
            await _seen_by(again, "running", 5_000)
            await h.publish_triggers([_event(i) for i in second])
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=80)
        versions = await _versions(h)
        expected = {i: 2 if cohorts.cohort(i) < 5_000 else 1 for i in first + second}
        assert versions == expected
        assert set(expected.values()) == {1, 2}


async def test_bad_rollouts_are_refused_with_one_line_and_change_nothing(nats_server_url, pg_dsn, prefix, tmp_path):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WELCOME_V2)
        env = {"ORDO_PG_DSN": pg_dsn, "ORDO_LOG_LEVEL": "warning"}

        async def ledger_rows():
            return [
                await h.db.fetchval("SELECT count(*) FROM ordo.rollouts"),
                await h.db.fetchval("SELECT count(*) FROM ordo.rollout_transitions"),
                await h.db.fetchval("SELECT count(*) FROM ordo.workflows"),
            ]

        def refused(*args: str) -> str:
            result = ordo("rollout", "start", "--workflow", "welcome", *args, env_extra=env)
            assert result.returncode == 1, (result.stdout, result.stderr)
            assert result.stderr.startswith("ordo: ") and result.stderr.count("\n") == 1, result.stderr
            return result.stderr

        assert "version 9 of workflow acme/welcome (the candidate) is not deployed (deployed: 1, 2)" in refused(
            "--to-version", "9"
        )
        assert (
            "no workflow 'nope' is deployed"
            in ordo("rollout", "start", "--workflow", "nope", "--to-version", "2", env_extra=env).stderr
        )
        invalid = tmp_path / "invalid.json"
        invalid.write_text(orjson.dumps(dict(WELCOME, steps=[{"id": "x", "type": "goto", "to": "nowhere"}])).decode())
        assert "the candidate fails validation" in refused("--definition", str(invalid))
        other_trigger = tmp_path / "other.json"
        other_trigger.write_text(orjson.dumps(dict(WELCOME, trigger={"event": "order.placed"})).decode())
        assert "triggered by another event" in refused("--definition", str(other_trigger))
        assert "the last stage must be 100%" in refused("--to-version", "2", "--stages", "1,5")
        assert await ledger_rows() == [0, 0, 2]

        started = ordo("rollout", "start", "--workflow", "welcome", "--to-version", "2", env_extra=env)
        assert started.returncode == 0, started.stderr
        assert "v1 -> v2  running  candidate share 1%" in started.stdout
        before = await ledger_rows()
        assert "has rollout 1 in progress already" in refused("--to-version", "2")
        with pytest.raises(RolloutRefused):
            await rollouts.start(h.db, Plan("welcome", 2, thresholds=Thresholds()), "test")
        assert await ledger_rows() == before

        paused = ordo("rollout", "pause", "--workflow", "welcome", "--reason", "holiday", env_extra=env)
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
        again = ordo("rollout", "pause", "--workflow", "welcome", env_extra=env)
        assert again.returncode == 1 and again.stderr == "ordo: rollout 1 is paused, not running\n"
        aborted = ordo("rollout", "abort", "--workflow", "welcome", env_extra=env)
        assert aborted.returncode == 0 and "aborted  candidate share 0%" in aborted.stdout, aborted.stderr
        logged = [(t["action"], t["reason"]) for t in await rollouts.transitions(h.db, 1)]
        assert logged == [("started", "started"), ("paused", "holiday"), ("aborted", "abort by the operator")]


async def test_a_candidate_that_takes_another_branch_is_caught_in_shadow_before_it_takes_any_traffic(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(BRANCHING_V2)
        plan = Plan(
            "welcome",
            2,
            stages=(0, 100, 10_000),
            min_dwell_s=0,
            min_sample=3,
            thresholds=Thresholds(max_divergence_rate=0.0),
            shadow_share=10_000,
        )
        ids = [f"branch-{i}" for i in range(3)]
        async with h.worker() as worker:
            started = await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 0)
            await h.publish_triggers([_event(i) for i in ids])
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="rolled_back")
        assert set((await _versions(h)).values()) == {1}
        contexts = await h.db.fetch("SELECT status, context FROM ordo.executions")
        assert {(r["status"], orjson.loads(r["context"])["locale"]) for r in contexts} == {("completed", "de")}
        runs = await h.db.fetch("SELECT * FROM ordo.shadow_runs ORDER BY execution_id")
        assert len(runs) == 3 and {r["outcome"] for r in runs} == {"diverged"}
        run = runs[0]
        assert run["step_id"] == "by-country"
        assert orjson.loads(run["primary_decision"])["detail"] == {"to": "german", "taken": "then"}
        assert orjson.loads(run["candidate_decision"])["detail"] == {"to": "english", "taken": "else"}
        (rolled,) = [t for t in await rollouts.transitions(h.db, started["rollout_id"]) if t["action"] != "started"]
        detail = orjson.loads(rolled["detail"])
        assert (rolled["action"], detail["metric"], detail["shadow"]["divergence_rate"]) == (
            "rolled_back",
            "divergence_rate",
            1.0,
        )
        assert sorted(detail["diverged_executions"]) == sorted(
            r["execution_id"] for r in await h.db.fetch("SELECT execution_id::text FROM ordo.shadow_runs")
        )
        status = ordo("rollout", "status", "--workflow", "welcome", env_extra={"ORDO_PG_DSN": pg_dsn})
        assert "diverged" in status.stdout and "by-country" in status.stdout, status.stdout


async def test_a_looping_shadow_candidate_changes_nothing_of_the_primary(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(LOOPING_V2)
        # Never judged (no threshold is crossed and the sample is never met): the shadow runs on and on.
        plan = Plan("welcome", 2, stages=(0, 10_000), min_sample=10_000, shadow_share=10_000)
        ids = [f"loop-{i}" for i in range(5)]
        async with h.worker() as worker:
            await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 0)
            await h.publish_triggers([_event(i) for i in ids])
            await h.wait_until("SELECT count(*) FROM ordo.shadow_runs", expect=5)
        histories = await h.db.fetch(
            "SELECT execution_id, array_agg(kind || ':' || step_id ORDER BY seq) AS steps FROM ordo.transitions "
            "GROUP BY execution_id"
        )
        expected = ["started:", "set:greet", "branch:by-country", "set:german", "completed:done"]
        assert len(histories) == 5 and all(r["steps"] == expected for r in histories), histories
        # The candidate diverged where it went back instead of branching; its loop, bounded by the
        # primary's max_steps, ended (else enrolment would still be spinning).
        runs = await h.db.fetch("SELECT outcome, seq, step_id, candidate_decision FROM ordo.shadow_runs")
        assert {(r["outcome"], r["seq"], r["step_id"]) for r in runs} == {("diverged", 3, "by-country")}
        assert {orjson.loads(r["candidate_decision"])["kind"] for r in runs} == {"goto"}
        assert await h.ledger_problems() == NO_PROBLEMS


def test_a_shadow_candidate_that_raises_is_an_error_of_the_shadow_run_only():
    primary = [(1, "", "started", {"workflow_id": "welcome", "version": 1})]

    class Raising:
        def matches(self, event, subject):
            raise RuntimeError("candidate crashed")

    run = dual_run(7, Raising(), "e-1", _event("raise"), primary, "completed", 0)
    assert (run.outcome, run.error) == ("error", "RuntimeError: candidate crashed")
    assert primary == [(1, "", "started", {"workflow_id": "welcome", "version": 1})]


async def test_a_waiting_execution_is_compared_in_shadow_over_its_whole_history_once_it_ends(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        await h.deploy(dict(WAITER, description="the same, redeployed"))
        plan = Plan("waiter", 2, stages=(0, 10_000), min_sample=10_000, shadow_share=10_000)
        ids = [f"wait-{i}" for i in range(2)]
        async with h.worker() as worker:
            await rollouts.start(h.db, plan, "test")
            await _seen_by(worker, "running", 0)
            await h.publish_triggers([dict(_event(i), type="session.started") for i in ids])
            await h.wait_until("SELECT count(*) FROM ordo.shadow_runs WHERE outcome = 'pending'", expect=2)
            for event_id in ids:
                await h.signal(h.execution_id("acme", "waiter", event_id), "done")
            await h.wait_until("SELECT count(*) FROM ordo.shadow_runs WHERE outcome = 'identical'", expect=2)
        compared = await h.db.fetch("SELECT compared FROM ordo.shadow_runs")
        # started, waiting, signal, set, completed: every transition of the primary, replayed.
        assert [r["compared"] for r in compared] == [5, 5]


async def test_a_rollout_superseded_by_a_plain_deploy_is_aborted(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WELCOME_V2)
        started = await rollouts.start(h.db, Plan("welcome", 2, min_sample=10_000), "test")
        async with h.worker() as worker:
            await _seen_by(worker, "running", 100)
            assert await h.deploy(SAME_V2) == 3
            await h.wait_until("SELECT state FROM ordo.rollouts", expect="aborted")
            await h.publish_triggers([_event("after")])
            await h.wait_until("SELECT workflow_version FROM ordo.executions", expect=3)
        logged = await rollouts.transitions(h.db, started["rollout_id"])
        assert [(t["action"], t["actor"]) for t in logged] == [("started", "test"), ("aborted", "controller")]
        assert logged[1]["reason"] == "superseded: version 3 was deployed and runs every new execution"


def _judged(**changes) -> dict:
    rollout = {
        "from_version": 1,
        "to_version": 2,
        "share": 100,
        "state": "running",
        "dwelt_s": 120.0,
        "min_dwell_s": 60.0,
        "min_sample": 10,
        "max_failure_rate": 0.01,
        "max_p99_ms": 50.0,
        "max_divergence_rate": None,
    }
    return dict(rollout, **changes)


def _counts(completed: int, failed: int) -> dict:
    return {"started": completed + failed, "completed": completed, "failed": failed}


def test_judging_weighs_the_candidate_against_the_baseline():
    even = {1: _counts(100, 2), 2: _counts(10, 0)}
    # A sample too small decides nothing, however bad it looks.
    assert judge(_judged(), {1: _counts(100, 0), 2: _counts(5, 4)}, {}) is None
    # As good as the baseline and dwelt long enough: advance; not dwelt, or paused: wait.
    assert judge(_judged(), even, {1: 20.0, 2: 60.0}).action == "advanced"
    assert judge(_judged(dwelt_s=10.0), even, {}) is None
    assert judge(_judged(state="paused"), even, {}) is None
    # A baseline that fails as often is no reason to roll back: the threshold is over the baseline.
    failing_both = {1: _counts(90, 10), 2: _counts(9, 1)}
    assert judge(_judged(), failing_both, {}).action == "advanced"
    # p99 action step latency: 71 ms against 20 ms is 51 ms more, over the 50 allowed, even while paused.
    verdict = judge(_judged(state="paused"), even, {1: 20.0, 2: 71.0})
    assert (verdict.action, verdict.detail["metric"], verdict.detail["candidate"]["p99_step_ms"]) == (
        "rolled_back",
        "p99_step_ms",
        71.0,
    )
    # Thresholds switched off are not checked.
    assert judge(_judged(max_p99_ms=None), even, {1: 20.0, 2: 900.0}).action == "advanced"


async def test_the_baseline_of_a_new_rollout_is_the_version_new_executions_run_now(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        await h.deploy(WELCOME_V2)
        first = await rollouts.start(h.db, Plan("welcome", 2), "test")
        assert (first["from_version"], first["to_version"]) == (1, 2)
        await rollouts.operate(h.db, "welcome", None, "abort", "test", "not today")
        # v2 was aborted: v1 runs every new execution, so v1 is what v3 rolls out from.
        await h.deploy(SAME_V2)
        second = await rollouts.start(h.db, Plan("welcome", 3), "test")
        assert (second["from_version"], second["to_version"]) == (1, 3)


def test_a_worker_counts_each_stage_by_version_from_what_it_commits():
    began = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    tally = RolloutTally()
    tally.set_rollouts(
        [
            {
                "rollout_id": 7,
                "tenant": "acme",
                "workflow_id": "welcome",
                "state": "running",
                "stage_started_at": began,
            },
            {
                "rollout_id": 3,
                "tenant": "acme",
                "workflow_id": "old",
                "state": "rolled_back",
                "stage_started_at": began,
            },
        ]
    )

    ids = (f"execution-{n}" for n in itertools.count())

    def change(workflow_id, version, created, *, new=False, status="running"):
        record = SimpleNamespace(
            execution_id=next(ids),
            tenant="acme",
            workflow_id=workflow_id,
            workflow_version=version,
            created_at=created,
            engine=None,
        )
        return SimpleNamespace(record=record, is_new=new, finished=status in CLOSED, status=status)

    later, before = began + timedelta(seconds=5), began - timedelta(seconds=5)
    ended = metrics.rollout_ended_total.labels("acme/welcome", "2", "failed")._value.get()

    def durations(version):
        return metrics.rollout_execution_seconds.labels("acme/welcome", version)._sum.get()

    timed = durations("2")
    for c in (
        change("welcome", 1, later, new=True),  # enrolled and still running
        change("welcome", 2, later, new=True, status="completed"),  # enrolled and ended in one commit
        change("welcome", 2, later, status="failed"),
        change("welcome", 2, later, status="cancelled"),  # ends, but is neither completed nor failed
        change("welcome", 1, before, status="failed"),  # created in the stage before: not this one's
        change("old", 2, later, new=True),  # its rollout is over
    ):
        tally.observe(c)
    rows = tally.take()
    assert sorted(rows) == [(7, began, 1, 1, 0, 0), (7, began, 2, 1, 1, 1)]
    assert tally.take() == []
    assert metrics.rollout_ended_total.labels("acme/welcome", "2", "failed")._value.get() == ended + 1
    # Their time from enrolment to end, per version: the two v2 executions that ended, created at `later`.
    assert durations("2") - timed >= 2 * (datetime.now(UTC) - later).total_seconds() - 1
    # Counts the ledger did not take go with the next round's.
    tally.give_back(rows)
    tally.observe(change("welcome", 1, later, status="completed"))
    assert sorted(tally.take()) == [(7, began, 1, 1, 1, 0), (7, began, 2, 1, 1, 1)]


def test_a_dispatch_error_counts_as_a_failure_of_its_executions_version_on_either_side():
    began = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    later, before = began + timedelta(seconds=5), began - timedelta(seconds=5)
    tally = RolloutTally()
    stage = {"rollout_id": 7, "tenant": "acme", "workflow_id": "welcome", "state": "running"}
    tally.set_rollouts([dict(stage, stage_started_at=began)])

    ids = (f"execution-{n}" for n in itertools.count())

    def raised(version, created, *, engine=None, enrolling=False, workflow_id="welcome"):
        return DispatchFailure(next(ids), "acme", workflow_id, version, engine, created, enrolling=enrolling)

    for failure in (
        raised(2, later, enrolling=True),  # on the candidate's first steps: never recorded, so started too
        raised(2, later),  # on a later step of an execution counted as started when it enrolled
        raised(1, later),  # the baseline's count as the baseline's
        raised(1, later, engine="module:fork"),  # an engine rollout's candidate, apart from its version
        raised(1, before),  # created in the stage before: not this one's
        raised(2, later, workflow_id="other"),  # no rollout
    ):
        tally.dispatch_failed(failure)
    assert sorted(tally.take()) == [
        (7, began, rollouts.CANDIDATE_ENGINE, 0, 0, 1),
        (7, began, 1, 0, 0, 1),
        (7, began, 2, 1, 0, 2),
    ]


def test_an_execution_counts_once_however_many_of_its_messages_the_dispatcher_raises_on(monkeypatch):
    """The judge weighs executions (failed / finished), not messages: an execution counts failed once in
    its stage, at its first dispatch error or failed end, and its later dispatch errors and end no more."""
    monkeypatch.setattr(rollout_tally, "FAILED_REMEMBERED", 3)
    began = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    later = began + timedelta(seconds=5)
    tally = RolloutTally()
    stage = {"rollout_id": 7, "tenant": "acme", "workflow_id": "welcome", "state": "running"}
    tally.set_rollouts([dict(stage, stage_started_at=began)])

    def raised(execution_id, version=2, *, enrolling=False):
        return DispatchFailure(execution_id, "acme", "welcome", version, None, later, enrolling=enrolling)

    def ended(execution_id, status):
        record = SimpleNamespace(
            execution_id=execution_id,
            tenant="acme",
            workflow_id="welcome",
            workflow_version=2,
            created_at=later,
            engine=None,
        )
        return SimpleNamespace(record=record, is_new=False, finished=True, status=status)

    for failure in (
        raised("a"),
        raised("a"),  # a second signal it raised on
        raised("b", enrolling=True),
        raised("b", enrolling=True),  # its trigger again (`ordo dlq retry`): started and failed once
        raised("c", version=1),
        raised("c", version=1),
    ):
        tally.dispatch_failed(failure)
    tally.observe(ended("a", "completed"))  # a timer took it on to its end: counted already
    tally.set_rollouts([dict(stage, stage_started_at=began)])  # a refresh of the same stage forgets nothing
    tally.dispatch_failed(raised("a"))
    assert sorted(tally.take()) == [(7, began, 1, 0, 0, 1), (7, began, 2, 1, 0, 2)]
    # Ended failed, then raised on when its step was retried: one failure.
    tally.observe(ended("e", "failed"))
    tally.dispatch_failed(raised("e"))
    assert tally.take() == [(7, began, 2, 0, 0, 1)]
    # Bounded: a stage remembers its last FAILED_REMEMBERED failed executions; "a" was the first of four.
    tally.dispatch_failed(raised("a"))
    assert tally.take() == [(7, began, 2, 0, 0, 1)]
    # The next stage counts its own executions afresh.
    tally.set_rollouts([dict(stage, stage_started_at=later)])
    tally.dispatch_failed(raised("b"))
    assert tally.take() == [(7, later, 2, 0, 0, 1)]
