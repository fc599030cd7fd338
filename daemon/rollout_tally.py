"""The numbers a rollout is judged on, counted where the executions commit.

For each workflow with a rollout in progress, the worker counts the executions
of the current stage (created at or after the stage began) that its commits
enrol and end, per version, and counts as failed those its dispatcher raised
on (dead-lettered `dispatch_error`); an execution fails once, however often
it raised. The rollout controller adds the counts to the ledger once a round
(`ledger.rollouts.add_stage_counts`), where the judge, `ordo rollout status`
and the console sum them; the ended ones are also the
`ordo_rollout_ended_total` metric, and their time from enrolment to end
`ordo_rollout_execution_seconds`. Counting costs an execution of a workflow
without a rollout one dictionary look-up, and only when it starts or ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from ledger.batcher import DispatchFailure
from ledger.rollouts import CANDIDATE_ENGINE

from . import metrics

_IN_PROGRESS = ("running", "paused")
#: Executions of a stage the tally remembers as counted failed, at most (the latest ones).
FAILED_REMEMBERED = 10_000


class _Execution(Protocol):
    """What the tally reads of an execution: its record (ledger.executions) or a DispatchFailure."""

    @property
    def execution_id(self) -> str: ...
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


@dataclass(slots=True)
class _Stage:
    rollout_id: int
    started_at: datetime
    #: Its executions counted failed, the latest FAILED_REMEMBERED (an ordered set, oldest first).
    failed: dict[str, None] = field(default_factory=dict)

    def first_failure(self, execution_id: str) -> bool:
        """Whether the execution was not counted failed yet; from now on it is."""
        if execution_id in self.failed:
            return False
        self.failed[execution_id] = None
        if len(self.failed) > FAILED_REMEMBERED:
            del self.failed[next(iter(self.failed))]
        return True


class RolloutTally:
    def __init__(self) -> None:
        #: (tenant, workflow_id) -> the stage of its rollout in progress.
        self._stages: dict[tuple[str, str], _Stage] = {}
        #: (rollout_id, stage_started_at, version) -> [started, completed, failed] not yet in the ledger.
        self._counts: dict[tuple[int, datetime, int], list[int]] = {}

    def set_rollouts(self, rollouts) -> None:
        """Follow the rollouts (each workflow's most recent, as the controller reads them); a stage
        still current keeps what it remembers."""
        stages = {}
        for r in rollouts:
            if r["state"] not in _IN_PROGRESS:
                continue
            key = (r["tenant"], r["workflow_id"])
            stage = self._stages.get(key)
            if stage is None or (stage.rollout_id, stage.started_at) != (r["rollout_id"], r["stage_started_at"]):
                stage = _Stage(r["rollout_id"], r["stage_started_at"])
            stages[key] = stage
        self._stages = stages

    def _stage_of(self, execution: _Execution) -> _Stage | None:
        """The stage the execution counts in; None when its workflow has no rollout in progress or it
        was enrolled before the stage began."""
        stage = self._stages.get((execution.tenant, execution.workflow_id))
        if stage is None or execution.created_at < stage.started_at:
            return None
        return stage

    def _counts_of(self, stage: _Stage, execution: _Execution) -> list[int]:
        """The stage's counts of the execution's side."""
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
        stage = self._stage_of(record)
        if stage is None:
            return
        # One counted failed already (at a dispatch error) is not counted again: not as started when a
        # retry of its trigger enrols it, not when it ends.
        counted = record.execution_id in stage.failed
        counts = self._counts_of(stage, record)
        if change.is_new and not counted:
            counts[0] += 1
        if change.finished and change.status in ("completed", "failed"):
            if change.status == "completed" and not counted:
                counts[1] += 1
            elif change.status == "failed" and stage.first_failure(record.execution_id):
                counts[2] += 1
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
        (daemon/engines.py).

        An execution fails once: the failure rate is of executions, so one that raises on every
        signal (or that ended failed and raises on its retry) must not look like many. Each stage
        remembers its last FAILED_REMEMBERED failed executions, which bounds its memory; one counted
        on another worker, before a restart or too long ago counts again (a rare excess, never a
        missed failure).
        """
        stage = self._stage_of(failure)
        if stage is None or not stage.first_failure(failure.execution_id):
            return
        counts = self._counts_of(stage, failure)
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
