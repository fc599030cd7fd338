"""The numbers a rollout is judged on, counted where the executions commit.

For each workflow with a rollout in progress, the worker counts the executions
of the current stage (created at or after the stage began) that its commits
enrol and end, per version, and counts as failed those its dispatcher raised
on (dead-lettered `dispatch_error`). The rollout controller adds the counts to the
ledger once a round (`ledger.rollouts.add_stage_counts`), where the judge,
`ordo rollout status` and the console sum them; the ended ones are also the
`ordo_rollout_ended_total` metric, and their time from enrolment to end
`ordo_rollout_execution_seconds`. Counting costs an execution of a workflow
without a rollout one dictionary look-up, and only when it starts or ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from ledger.batcher import DispatchFailure
from ledger.rollouts import CANDIDATE_ENGINE

from . import metrics

_IN_PROGRESS = ("running", "paused")


class _Execution(Protocol):
    """What the tally reads of an execution: its record (ledger.executions) or a DispatchFailure."""

    @property
    def tenant(self) -> str: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def workflow_version(self) -> int: ...
    @property
    def engine(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class _Stage:
    rollout_id: int
    started_at: datetime


class RolloutTally:
    def __init__(self) -> None:
        #: (tenant, workflow_id) -> the stage of its rollout in progress.
        self._stages: dict[tuple[str, str], _Stage] = {}
        #: (rollout_id, stage_started_at, version) -> [started, completed, failed] not yet in the ledger.
        self._counts: dict[tuple[int, datetime, int], list[int]] = {}

    def set_rollouts(self, rollouts) -> None:
        """Follow the rollouts (each workflow's most recent, as the controller reads them)."""
        self._stages = {
            (r["tenant"], r["workflow_id"]): _Stage(r["rollout_id"], r["stage_started_at"])
            for r in rollouts
            if r["state"] in _IN_PROGRESS
        }

    def _counts_of(self, execution: _Execution) -> list[int] | None:
        """The current stage's counts the execution adds to; None when its workflow has no rollout
        in progress or it was enrolled before the stage began."""
        stage = self._stages.get((execution.tenant, execution.workflow_id))
        if stage is None or execution.created_at < stage.started_at:
            return None
        # An engine rollout's candidate runs its baseline's version: it is counted apart (ledger.rollouts.sides).
        side = execution.workflow_version if execution.engine is None else CANDIDATE_ENGINE
        key = (stage.rollout_id, stage.started_at, side)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0, 0, 0]
        return counts

    def observe(self, change) -> None:
        """A committed change that enrolled or ended an execution (ledger.batcher.ExecutionChange)."""
        record = change.record
        counts = self._counts_of(record)
        if counts is None:
            return
        if change.is_new:
            counts[0] += 1
        if change.finished and change.status in ("completed", "failed"):
            counts[1 if change.status == "completed" else 2] += 1
            workflow = f"{record.tenant}/{record.workflow_id}"
            label = str(record.workflow_version) + ("" if record.engine is None else f"@{record.engine}")
            metrics.rollout_ended_total.labels(workflow, label, change.status).inc()
            took = (datetime.now(UTC) - record.created_at).total_seconds()
            metrics.rollout_execution_seconds.labels(workflow, label).observe(max(took, 0.0))

    def dispatch_failed(self, failure: DispatchFailure) -> None:
        """A committed `dispatch_error` dead letter: a failure of its execution's version.

        The dispatcher that raised left the execution where it was, unended, and the judge weighs
        ended executions only: uncounted, a candidate that crashes on a later step would never be
        rolled back (or, crashing on some executions, would advance on the others). One that raised
        on enrolment counts as started too, as a candidate engine's `engine_error` does
        (daemon/engines.py). Each message the dispatcher raises on counts once.
        """
        counts = self._counts_of(failure)
        if counts is None:
            return
        if failure.enrolling:
            counts[0] += 1
        counts[2] += 1

    def take(self) -> list[tuple[int, datetime, int, int, int, int]]:
        """The counts since the last take, as rows for `ledger.rollouts.add_stage_counts`."""
        counts, self._counts = self._counts, {}
        return [(*key, *values) for key, values in counts.items()]

    def give_back(self, rows: list[tuple[int, datetime, int, int, int, int]]) -> None:
        """Counts that could not be written: they go with the next round's."""
        for rollout_id, since, version, *values in rows:
            counts = self._counts.setdefault((rollout_id, since, version), [0, 0, 0])
            for i, value in enumerate(values):
                counts[i] += value
