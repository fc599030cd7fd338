"""The workers' part in rollouts: follow their stage, and judge them.

Every worker re-reads the rollouts from the ledger (on a NOTIFY at once, and
every `interval_s` besides) into its workflow registry, so all of them give a
new execution the same version; and exports each rollout's share and whether
it was rolled back (an alert gauge).

Judging runs in the workers too, in one of them at a time (a transaction
that holds an advisory lock): automatic rollback must not depend on an extra
process someone has to keep alive, and whichever workers run can do it. A
round compares, for each rollout in progress, the candidate with the baseline
over the executions started in the current stage, read from the ledger:

- once the candidate has `min_sample` finished executions, a failure rate or
  a p99 action step latency worse than the baseline's by more than the
  rollout's threshold rolls it back to 0% at once (paused or not), recording
  the metric, both values, the threshold and the failed executions (those
  the dispatcher raised on marked as such: their messages are dead letters);
- once `min_sample` shadow runs have an outcome, a divergence rate (diverged
  or failed shadow runs) above the threshold does the same;
- once the stage has also lasted `min_dwell_s` (and the rollout is not
  paused), it advances to the next stage; reaching 100% completes it. The
  sample of a 0% stage (shadow only) is its shadow runs;
- a rollout whose workflow got a newer version by a plain deploy (which
  takes every new execution, as any deploy does) is aborted as superseded.

Each round also writes the worker's shadow runs to the ledger, and replays
the pending ones whose execution has ended through the candidate.

An engine rollout is judged alike: its baseline is the version on the
workers' own build, its candidate the same version on the candidate engine
(counted apart, `ledger.rollouts.sides`), and its pending shadow runs are
replayed on the candidate engine.
"""

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ledger import rollouts

from . import logs, metrics
from .definitions import WorkflowRegistry, cohort
from .engines import EngineError, engine
from .replay import replay
from .rollout_shadow import from_replay
from .rollout_tally import RolloutTally

log = logging.getLogger("ordo.rollouts")

#: Seconds between two reads of the rollouts by a worker (a NOTIFY makes one at once).
WATCH_INTERVAL_S = 1.0
#: Pending shadow runs replayed per rollout per round, at most.
REPLAYS_PER_ROUND = 200
#: The candidate's failed executions a rollback lists, at most.
FAILED_LISTED = 100
#: Executions with a dispatch_error letter a rollback reads to find the candidate's among (of either side).
DISPATCH_ERRORS_READ = 1_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision on a rollout: the move (advanced, rolled_back), why, and the values it was made on."""

    action: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def _rates(counts) -> dict[str, Any]:
    if counts is None:
        return {"started": 0, "completed": 0, "failed": 0, "failure_rate": 0.0}
    finished = counts["completed"] + counts["failed"]
    return {
        "started": counts["started"],
        "completed": counts["completed"],
        "failed": counts["failed"],
        "failure_rate": counts["failed"] / finished if finished else 0.0,
    }


def judge(rollout, counts: dict, p99_ms: dict[int, float], shadow: dict[str, int] | None = None) -> Verdict | None:
    """What to do with a rollout in progress given its stage's numbers; None: wait for more.

    `counts` and `p99_ms` are by version (ledger.rollouts.stage_counts, step_p99_ms; an engine rollout's
    candidate under `ledger.rollouts.CANDIDATE_ENGINE`), `shadow` the stage's
    shadow runs by outcome (ledger.rollouts.shadow_counts); `rollout` has `dwelt_s`, the seconds its
    stage has lasted.
    """
    baseline_key, candidate_key = rollouts.sides(rollout)
    candidate, baseline = _rates(counts.get(candidate_key)), _rates(counts.get(baseline_key))
    for values, version, key in (
        (candidate, rollout["to_version"], candidate_key),
        (baseline, rollout["from_version"], baseline_key),
    ):
        values["version"] = version
        values["p99_step_ms"] = p99_ms.get(key)
    if rollout.get("engine") is not None:
        candidate["engine"] = rollout["engine"]
    shadow = shadow or {}
    diverged = shadow.get("diverged", 0) + shadow.get("error", 0)
    compared = diverged + shadow.get("identical", 0)
    shadowed = {
        "compared": compared,
        "diverged": diverged,
        "pending": shadow.get("pending", 0),
        "divergence_rate": diverged / compared if compared else 0.0,
    }
    sample = candidate["completed"] + candidate["failed"]
    numbers = {
        "candidate": candidate,
        "baseline": baseline,
        "shadow": shadowed,
        "sample": sample,
        "dwelt_s": round(rollout["dwelt_s"], 3),
    }
    limit = rollout["max_divergence_rate"]
    if limit is not None and compared >= rollout["min_sample"] and shadowed["divergence_rate"] > limit:
        return Verdict(
            "rolled_back",
            f"divergence rate {shadowed['divergence_rate']:.2%} in shadow ({diverged} of {compared} runs; "
            f"at most {limit:.2%})",
            dict(numbers, metric="divergence_rate", threshold=limit),
        )
    if rollout["share"] == 0:  # shadow only: its runs are the sample
        if compared < rollout["min_sample"] or rollout["state"] != "running":
            return None
        if rollout["dwelt_s"] < rollout["min_dwell_s"]:
            return None
        return Verdict(
            "advanced", f"{compared} shadow runs over {rollout['dwelt_s']:.0f} s within the thresholds", numbers
        )
    if sample < rollout["min_sample"]:
        return None
    limit = rollout["max_failure_rate"]
    if limit is not None and candidate["failure_rate"] - baseline["failure_rate"] > limit:
        return Verdict(
            "rolled_back",
            f"failure rate {candidate['failure_rate']:.2%} against the baseline's {baseline['failure_rate']:.2%} "
            f"(at most {limit:.2%} more)",
            dict(numbers, metric="failure_rate", threshold=limit),
        )
    limit = rollout["max_p99_ms"]
    if limit is not None and candidate["p99_step_ms"] is not None:
        base = baseline["p99_step_ms"] or 0.0
        if candidate["p99_step_ms"] - base > limit:
            return Verdict(
                "rolled_back",
                f"p99 step latency {candidate['p99_step_ms']:.1f} ms against the baseline's {base:.1f} ms "
                f"(at most {limit:g} ms more)",
                dict(numbers, metric="p99_step_ms", threshold=limit),
            )
    if rollout["state"] != "running" or rollout["dwelt_s"] < rollout["min_dwell_s"]:
        return None
    return Verdict("advanced", f"{sample} executions over {rollout['dwelt_s']:.0f} s within the thresholds", numbers)


async def failed_of_candidate(conn, rollout) -> tuple[list[str], list[str]]:
    """The candidate's executions of the stage that failed, and those of them the dispatcher raised on.

    Failed are those that ended failed and those with a `dispatch_error` dead letter (they wait unended,
    or were never enrolled), as the judge counts them: at most FAILED_LISTED, either kind taken in
    turn so that neither hides the other.
    """
    args = (rollout["tenant"], rollout["workflow_id"])
    since, candidate = rollout["stage_started_at"], rollouts.sides(rollout)[1]
    ended = await rollouts.failed_executions(
        conn, *args, rollout["to_version"], since, FAILED_LISTED, engine=rollout["engine"]
    )
    raised = []
    for execution_id, row in await rollouts.dispatch_errored(conn, *args, since, DISPATCH_ERRORS_READ):
        if row is None:  # raised on enrolment, never recorded: its cohort chose its side (Split.choose)
            on_candidate = cohort(execution_id) < rollout["share"]
        else:
            side = row["workflow_version"] if row["engine"] is None else rollouts.CANDIDATE_ENGINE
            on_candidate = side == candidate and row["created_at"] >= since
        if on_candidate:
            raised.append(execution_id)
    taken_in_turn = (i for pair in itertools.zip_longest(ended, raised) for i in pair if i is not None)
    failed = list(itertools.islice(dict.fromkeys(taken_in_turn), FAILED_LISTED))
    raised_on = set(raised)
    return failed, [i for i in failed if i in raised_on]


class RolloutController:
    """One worker's loop over the rollouts: refresh its registry, and judge them when it holds the lock."""

    def __init__(
        self,
        registry: WorkflowRegistry,
        on_pool,
        stopping: asyncio.Event,
        interval_s=WATCH_INTERVAL_S,
        tally: RolloutTally | None = None,
    ):
        self.registry = registry
        #: This worker's counts of the stages' executions, added to the ledger each round.
        self.tally = RolloutTally() if tally is None else tally
        self._on_pool = on_pool
        self._stopping = stopping
        self._interval_s = interval_s
        self._wake = asyncio.Event()

    def changed(self, *_) -> None:
        """A NOTIFY on the rollouts' channel: read them now."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                runs = self.registry.shadow_results.take()
                if runs:
                    await self._on_pool(partial(rollouts.record_shadow_runs, runs=runs), "shadow runs")
                await self.add_counts()
                await self._on_pool(self.judge_round, "rollouts")
                await self._on_pool(self.refresh, "rollouts")
            except Exception as exc:  # a failed round must not stop the worker: the next one tries again
                log.exception("rollout round failed", extra=logs.failure("rollout_round", exc))
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass

    async def add_counts(self) -> None:
        """Add what this worker counted since the last round to the ledger (kept for the next on failure)."""
        counts = self.tally.take()
        if not counts:
            return
        try:
            await self._on_pool(partial(rollouts.add_stage_counts, counts=counts), "rollout counts")
        except BaseException:
            self.tally.give_back(counts)
            raise

    async def refresh(self, conn) -> None:
        latest = await rollouts.latest_per_workflow(conn)
        self.registry.set_rollouts(latest)
        self.tally.set_rollouts(latest)
        for r in latest:
            workflow = f"{r['tenant']}/{r['workflow_id']}"
            metrics.rollout_share.labels(workflow).set(r["share"] / rollouts.ALL)
            metrics.rollout_rolled_back.labels(workflow).set(1 if r["state"] == "rolled_back" else 0)

    async def judge_round(self, conn) -> None:
        """Judge every rollout in progress, if no other worker is doing it now."""
        async with conn.transaction():
            if not await rollouts.lead(conn):
                return
            for rollout in await rollouts.judged_for_update(conn):
                await self._judge_one(conn, rollout)

    async def _replay_pending(self, conn, rollout) -> None:
        """Replay through the candidate the whole history of shadowed executions that have ended since."""
        build, name = None, rollout["engine"]
        if name is not None:
            try:
                build = engine(name)
            except EngineError as exc:
                log.error("rollout %s: %s", rollout["rollout_id"], exc, extra=logs.failure("engine_unavailable", exc))
                return  # pending until a worker that has the engine replays them
        for execution_id in await rollouts.pending_shadow_runs(conn, rollout["rollout_id"], REPLAYS_PER_ROUND):
            result = await replay(conn, execution_id, rollout["to_version"], build, name)
            await rollouts.settle_shadow_run(conn, from_replay(rollout["rollout_id"], execution_id, result))

    async def _judge_one(self, conn, rollout) -> None:
        args = (rollout["tenant"], rollout["workflow_id"])
        newest = await rollouts.newest_version(conn, *args)
        if newest is not None and newest > max(rollout["from_version"], rollout["to_version"]):
            # A plain deploy of a newer version took every new execution: the rollout has nothing left to judge.
            reason = f"superseded: version {newest} was deployed and runs every new execution"
            await rollouts.move(conn, rollout, "aborted", reason, {"newest_version": newest})
            metrics.rollout_decisions.labels("aborted").inc()
            log.warning("rollout %s of %s/%s %s", rollout["rollout_id"], *args, reason)
            return
        versions, since = (rollout["from_version"], rollout["to_version"]), rollout["stage_started_at"]
        # A shadow-only stage has no candidate executions: its sample is its shadow runs.
        counts = await rollouts.stage_counts(conn, rollout["rollout_id"], since) if rollout["share"] > 0 else {}
        p99 = await rollouts.step_p99_ms(conn, *args, versions, since) if rollout["max_p99_ms"] is not None else {}
        shadow = None
        if rollout["shadow_share"] > 0:
            await self._replay_pending(conn, rollout)
            shadow = await rollouts.shadow_counts(conn, rollout["rollout_id"], since)
        verdict = judge(rollout, counts, p99, shadow)
        if verdict is None:
            return
        if verdict.detail.get("metric") == "divergence_rate":
            verdict.detail["diverged_executions"] = [
                r["execution_id"] for r in await rollouts.shadow_divergences(conn, rollout["rollout_id"], 100)
            ]
        elif verdict.action == "rolled_back":
            failed, raised = await failed_of_candidate(conn, rollout)
            verdict.detail["failed_executions"] = failed
            verdict.detail["dispatch_error_executions"] = raised
        await rollouts.move(conn, rollout, verdict.action, verdict.reason, verdict.detail)
        done = "completed" if verdict.action == "advanced" and rollout["stage"] + 2 == len(rollout["stages"]) else None
        metrics.rollout_decisions.labels(done or verdict.action).inc()
        level = logging.ERROR if verdict.action == "rolled_back" else logging.INFO
        log.log(
            level,
            "rollout %s of %s/%s %s -> %s %s: %s",
            rollout["rollout_id"],
            *args,
            rollouts.side_label(rollout, candidate=False),
            rollouts.side_label(rollout, candidate=True),
            done or verdict.action,
            verdict.reason,
            extra=logs.execution(None, rollout["tenant"], workflow_id=rollout["workflow_id"]),
        )
