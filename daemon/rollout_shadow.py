"""Shadow (dual-run): the candidate of a rollout runs beside the primary, on the same inputs, deciding nothing.

For a share of the new executions that run the baseline, enrolment also runs
the candidate's program on a copy of the trigger, on a state of its own,
right after the primary's first steps: its effects (action requests, timers,
emits) are collected on that state and dropped, so nothing it decides is
carried out; its transitions are compared with the primary's, one by one.
The candidate is another version, or, in an engine rollout, the same version
on the candidate engine (its own Program, ExecutionState and advance).
The primary is never touched: it ran first, on its own objects, and whatever
the candidate does (raise, or loop until its loop guard, bounded by the
primary's own `max_steps`) ends in the shadow run's outcome, never in the
primary's unit.

An execution that ends within its first steps (w1's) is compared whole there.
One that goes on waiting (an action, a timer, an event) is `pending` while
the two agree so far: once the primary has ended, the rollout controller
replays its whole recorded history (every action result, timer fire, event
and signal) through the candidate with `ordo replay`'s machinery
(daemon/replay.py) and stores the outcome.

Results go into a bounded buffer that the rollout controller writes to the
ledger each round: a shadow run is an observation, so under pressure one is
dropped (counted), never the primary's work held back.
"""

import logging
from types import SimpleNamespace
from typing import Any

import orjson

from hotpath import ExecutionState, Program, advance
from hotpath.envelope import subject_of
from hotpath.vocabulary import CLOSED, STARTED
from ledger.rollouts import ShadowRun

from . import metrics
from .replay import ReplayResult

log = logging.getLogger("ordo.shadow")

#: Shadow runs held for the ledger at most; beyond, new ones are dropped and counted.
MAX_BUFFERED = 10_000


class ShadowResults:
    """Shadow runs waiting to be written to the ledger by the rollout controller (bounded)."""

    def __init__(self, limit: int = MAX_BUFFERED):
        self._runs: list[ShadowRun] = []
        self._limit = limit

    def add(self, run: ShadowRun) -> None:
        if len(self._runs) >= self._limit:
            metrics.shadow_outcomes["dropped"].inc()
            return
        self._runs.append(run)
        metrics.shadow_outcomes[run.outcome].inc()

    def take(self) -> list[ShadowRun]:
        runs, self._runs = self._runs, []
        return runs

    def __len__(self) -> int:
        return len(self._runs)


def _decision(transition) -> dict[str, Any]:
    seq, step_id, kind, detail = transition
    return {"seq": seq, "step": step_id, "kind": kind, "detail": detail}


def _same(a, b) -> bool:
    """Two transitions make the same decision; `started` names its version, which is not one."""
    if a[1] != b[1] or a[2] != b[2]:
        return False
    if a[2] == STARTED and isinstance(a[3], dict) and isinstance(b[3], dict):
        return {k: v for k, v in a[3].items() if k != "version"} == {k: v for k, v in b[3].items() if k != "version"}
    return a[3] == b[3]


def first_divergence(primary: list, candidate: list) -> tuple[int, int | None]:
    """(transitions equal at the same place, the index of the first that differs or None)."""
    for i, (a, b) in enumerate(zip(primary, candidate, strict=False)):
        if not _same(a, b):
            return i, i
    if len(primary) != len(candidate):
        return min(len(primary), len(candidate)), min(len(primary), len(candidate))
    return len(primary), None


def dual_run(
    rollout_id: int,
    candidate: Program,
    execution_id: str,
    event: dict,
    primary: list,
    primary_status: str,
    now_ms: int,
    build: SimpleNamespace | None = None,
) -> ShadowRun:
    """Run `candidate` on a copy of the trigger and compare its first transitions with the primary's.

    `primary` are the primary's transitions of its first advance and `primary_status` its status after;
    `build` is the candidate engine that compiled `candidate` (daemon/engines.py), None for the worker's own.
    """
    try:
        # Its own copy of the inputs: nothing the candidate does can reach the primary's objects.
        event = orjson.loads(orjson.dumps(event))
        subject_type, subject = subject_of(event)
        if not candidate.matches(event, subject):
            first = _decision(primary[0]) if primary else None
            return ShadowRun(
                rollout_id, execution_id, "diverged", 0, 1, "", first, {"kind": "not_enrolled", "detail": None}
            )
        new_state, run = (ExecutionState, advance) if build is None else (build.ExecutionState, build.advance)
        state = new_state(execution_id, subject=subject, event=event, tenant=event["tenant"])
        transitions = run(candidate, state, "start", None, now_ms)
    except Exception as exc:  # the candidate's failure is the shadow run's outcome, never the primary's
        return ShadowRun(rollout_id, execution_id, "error", 0, error=f"{type(exc).__name__}: {exc}")
    compared, at = first_divergence(primary, transitions)
    if at is not None:
        return ShadowRun(
            rollout_id,
            execution_id,
            "diverged",
            compared,
            at + 1,
            (primary[at] if at < len(primary) else transitions[at])[1],
            _decision(primary[at]) if at < len(primary) else None,
            _decision(transitions[at]) if at < len(transitions) else None,
        )
    return ShadowRun(rollout_id, execution_id, "identical" if primary_status in CLOSED else "pending", compared)


def from_replay(rollout_id: int, execution_id: str, result: ReplayResult) -> ShadowRun:
    """A pending shadow run's outcome from the replay of the primary's whole history through the candidate."""
    if result.outcome == "error":
        errors = result.error or "; ".join(e["error"] for e in result.dispatch_errors)
        return ShadowRun(rollout_id, execution_id, "error", result.matching, error=errors)
    first = result.first_divergence
    if first is None:
        if result.timer_shifts:
            shift = result.timer_shifts[0]
            return ShadowRun(
                rollout_id,
                execution_id,
                "diverged",
                result.matching,
                shift["seq"],
                None,
                {"kind": "timer_due", "detail": {"due_ms": shift["recorded_due_ms"]}},
                {"kind": "timer_due", "detail": {"due_ms": shift["replayed_due_ms"]}},
            )
        return ShadowRun(rollout_id, execution_id, "identical", result.matching)
    step = (first.recorded or first.replayed or {}).get("step")
    return ShadowRun(
        rollout_id, execution_id, "diverged", result.matching, first.seq, step, first.recorded, first.replayed
    )


def bounded(definition: dict, max_steps: int, program_class=Program):
    """The candidate's program for shadow runs: at most `max_steps` steps per input (the primary's bound).

    `program_class` is the candidate engine's Program for an engine rollout (daemon/engines.py).
    """
    limits = dict(definition.get("limits") or {})
    limits["max_steps"] = min(limits.get("max_steps", max_steps), max_steps)
    return program_class(dict(definition, limits=limits))
