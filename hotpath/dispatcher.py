"""The step dispatcher, pure-Python twin of `hotpath._dispatcher` (same API, same behaviour).

`advance(program, state, kind, payload, now_ms=0)` applies one event to one
execution: it mutates `state` in place, returns the transitions it made, each
`(seq, step_id, kind, detail)` with `seq` contiguous, and appends to
`state.effects` what the worker must do once those transitions have committed
(request an action, set or clear the execution's timer, register or drop an
event wait, emit an event, dead-letter a failed step). It is a pure state
machine (no I/O, no clock: time is `now_ms`; no randomness: retry jitter is a
hash) so that the ledger can replay an execution through it and get the same
transitions and effects again.

Event kinds and payloads:
  "start" None; "signal" {"name", "data"?}; "action_result" {"step_id", "attempt",
  "ok", "output"?, "error"?}; "timer" {"timer_id"}; "event" a trigger event;
  "cancel" {"reason"?}; "retry" {} (operator retry of a failed action step).

The transitions an input makes first carry the input itself, so that the
history alone replays the run (`daemon/replay.py`): "signal" {name, data},
"action_completed" {attempt, output}, "action_failed" {attempt, error} (plus
"timer_id" when a timeout made it), "late_result" {attempt, ok},
"event_received" {event_id, type, data}, "timer_fired" and "timed_out" the
"timer_id", "cancelled" {reason}. Data in a detail is a copy, never an alias of
the context, which later steps of the same advance may write into.

Templates: in a condition a missing field is null; in a value (set, action
input, emit data, wait until) it fails the step with `template_missing_field`
(the rules are written down in `hotpath.definition`, next to the template form).

The words of all of these (kinds, statuses, error codes, message texts) are
kept in `hotpath.vocabulary`, which the compiled twin imports too.
"""

from __future__ import annotations

from typing import Any, TypeVar

from hotpath.context_types import CONTACT, SUBJECT_CONTRACT
from hotpath.definition import (
    MAX_RENDERED_CHARS,
    MAX_RENDERED_NODES,
    NO_STEP,
    TEMPLATE_ERRORS,
    ActionStep,
    Condition,
    EmitStep,
    EndStep,
    GotoStep,
    IfStep,
    SetStep,
    Step,
    SwitchStep,
    Template,
    WaitForEventStep,
    WaitForSignalStep,
    WaitStep,
    interp_text,
    resolve,
    template_text,
)
from hotpath.durations import parse_instant, retry_delay_ms
from hotpath.vocabulary import (
    ACTION_COMPLETED,
    ACTION_FAILED,
    ACTION_REQUESTED,
    ACTION_RESULT,
    BRANCH,
    CANCEL,
    CANCELLED,
    CLOSED,
    COMPLETED,
    EFFECT_ACTION,
    EFFECT_CLEAR_TIMER,
    EFFECT_CLEAR_WAIT,
    EFFECT_DEAD_LETTER,
    EFFECT_EMIT,
    EFFECT_LIMIT_RELEASE,
    EFFECT_LIMIT_WAIT,
    EFFECT_SET_TIMER,
    EFFECT_WAIT_EVENT,
    EMITTED,
    EVENT,
    EVENT_RECEIVED,
    FAILED,
    GOTO,
    LATE_RESULT,
    LIMIT_GRANTED,
    LIMIT_WAITING,
    NOT_FAILED_AT_ACTION,
    PURPOSE_ACTION_TIMEOUT,
    PURPOSE_EVENT_TIMEOUT,
    PURPOSE_RETRY,
    PURPOSE_WAIT,
    REASON_STEP_FAILED,
    RETRIED,
    RETRY,
    RUNNING,
    SET,
    SIGNAL,
    START,
    START_GATED,
    STARTED,
    STEP_FAILED,
    TIMED_OUT,
    TIMER,
    TIMER_FIRED,
    WAIT_ACTION,
    WAIT_EVENT,
    WAIT_LIMIT,
    WAIT_RETRY,
    WAIT_START,
    WAIT_TIMER,
    WAITING,
    Effect,
    MissingField,
    TemplateError,
    Transition,
    ValueTooLarge,
    action_timed_out,
    already_started,
    bad_action_result,
    bad_event,
    bad_limit_grant,
    bad_signal,
    bad_timer,
    bad_until,
    limit_bucket,
    no_error_object,
    pc_outside_steps,
    program_repr,
    start_gates,
    state_repr,
    timer_without_wait,
    too_many_steps,
    too_many_visits,
    unknown_condition,
    unknown_event_kind,
    unknown_step,
    unknown_template_node,
)

# What lookup() returns for a missing field (None is a present null).
_MISSING = object()
#: The values templates and conditions read: {"context": ..., "subject": ..., "event": ...}.
Roots = dict[str, Any]
_StepT = TypeVar("_StepT", bound=Step)


class Program:
    """A workflow definition compiled for the dispatcher (DefinitionError if it cannot run)."""

    __slots__ = (
        "workflow_id",
        "version",
        "tenant",
        "trigger_event",
        "subject_type",
        "max_steps",
        "max_visits",
        "max_running",
        "gates",
        "on_failure",
        "step_ids",
        "_filter",
        "_steps",
    )

    def __init__(self, definition: object, enrolment_rate_per_s: float | None = None):
        """`enrolment_rate_per_s`: the tenant's enrolment rate (from the config), a start gate of every
        new execution besides the definition's `limits.max_running`."""
        resolved = resolve(definition)
        self.workflow_id = resolved.workflow_id
        self.version = resolved.version
        self.tenant = resolved.tenant
        self.trigger_event = resolved.trigger_event
        self.subject_type = resolved.subject_type
        self.max_steps = resolved.max_steps
        self.max_visits = resolved.max_visits
        self.max_running = resolved.max_running
        # What a new execution passes before its first step (empty: it starts at once).
        self.gates = start_gates(resolved.tenant, resolved.workflow_id, enrolment_rate_per_s, resolved.max_running)
        self.on_failure = resolved.on_failure  # workflow-level failure branch: a step index, or -1
        self.step_ids = tuple(step.id for step in resolved.steps)
        self._filter = resolved.trigger_filter
        self._steps = resolved.steps

    def matches(self, event: object, subject: object = None) -> bool:
        """Whether a trigger event enrols its subject: its type and the trigger filter.

        `subject` is the event's subject record (`hotpath.envelope.subject_of`); None reads its `contact`.
        """
        if not isinstance(event, dict) or event.get("type") != self.trigger_event:
            return False
        if self._filter is None:
            return True
        if subject is None:
            subject = event.get("contact")
        return holds(self._filter, {"context": {}, "subject": subject, "event": event})

    def __repr__(self) -> str:
        return program_repr(self.tenant, self.workflow_id, self.version, len(self.step_ids))


class ExecutionState:
    """One execution's mutable state; the dispatcher reads and writes it in place.

    The worker persists every attribute but `effects` and passes them back as
    constructor keywords:
      status    running | waiting | completed | failed | cancelled
      pc        index of the step to run next, or of the step being waited on / that failed
      seq       the last transition seq written
      steps     steps executed over the execution's life
      waiting   while status == "waiting": the awaited signal's name (wait_for_signal),
                "action" (a result), "retry" (a back-off), "timer" (a wait step) or
                "event:<type>" (wait_for_event)
      attempt   the current attempt of the action step at pc (1-based), or the start gate
                waited at ("start"); 0 elsewhere
      timer     the id of the one timer the execution waits on, or None
      visits    {step id: times entered}; the action idempotency key and emitted
                event ids use it, and limits.max_visits bounds it; "#start" once the
                execution entered start gates (its slot is given back when it ends)
      failures  the failed attempts of the current action step visit,
                [{"attempt", "error"}], reset when the step is left or retried
      subject   the record the execution is about (a contact, an opportunity, ...: the
                program's subject_type); templates name it by that type
      tenant    the execution's tenant (set by the caller; emitted events carry it)
      effects   appended to by advance; the caller reads and clears it (not persisted)
    """

    __slots__ = (
        "execution_id",
        "status",
        "pc",
        "seq",
        "context",
        "subject",
        "event",
        "steps",
        "waiting",
        "attempt",
        "timer",
        "visits",
        "failures",
        "tenant",
        "effects",
    )

    def __init__(
        self,
        execution_id: str,
        status: str = RUNNING,
        pc: int = 0,
        seq: int = 0,
        context: dict[str, Any] | None = None,
        subject: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
        steps: int = 0,
        waiting: str | None = None,
        attempt: int = 0,
        timer: str | None = None,
        visits: dict[str, int] | None = None,
        failures: list[dict[str, Any]] | None = None,
        tenant: str = "",
        effects: list[Effect] | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.status = status
        self.pc = pc
        self.seq = seq
        self.context = {} if context is None else context
        self.subject = {} if subject is None else subject
        self.event = {} if event is None else event
        self.steps = steps
        self.waiting = waiting
        self.attempt = attempt
        self.timer = timer
        self.visits = {} if visits is None else visits
        self.failures = [] if failures is None else failures
        self.tenant = tenant
        self.effects = [] if effects is None else effects

    def __repr__(self) -> str:
        return state_repr(self.execution_id, self.status, self.pc, self.seq)


# -- advancing -----------------------------------------------------------------
def advance(program: Program, state: ExecutionState, kind: str, payload: Any, now_ms: int = 0) -> list[Transition]:
    """Apply one event to `state`; return the transitions made (effects go to state.effects)."""
    out: list[Transition] = []
    if kind == START:
        if state.seq != 0:
            raise ValueError(already_started(state.execution_id, state.seq))
        _emit(state, out, "", STARTED, {"workflow_id": program.workflow_id, "version": program.version})
        if program.gates:
            state.visits[START_GATED] = 1
            state.attempt = 1
            _wait_at_gate(program, state, out)
        else:
            _run(program, state, out, now_ms)
    elif kind == SIGNAL:
        if state.status in CLOSED:
            return out
        name, data = _signal_fields(payload)
        step = None
        if state.status == WAITING:
            _check_pc(program, state)
            step = program._steps[state.pc]
        # The detail holds a copy: a later set step may write into context[step.id].
        _emit(state, out, step.id if step else "", SIGNAL, {"name": name, "data": copy_json(data)})
        if type(step) is WaitForSignalStep and name == state.waiting:
            state.context[step.id] = data
            state.waiting = None
            state.status = RUNNING
            state.pc = step.next
            _run(program, state, out, now_ms)
    elif kind == ACTION_RESULT:
        _on_action_result(program, state, out, payload, now_ms)
    elif kind == TIMER:
        _on_timer(program, state, out, payload, now_ms)
    elif kind == EVENT:
        _on_event(program, state, out, payload, now_ms)
    elif kind == CANCEL:
        _on_cancel(program, state, out, payload)
    elif kind == RETRY:
        _on_retry(program, state, out, now_ms)
    elif kind == LIMIT_GRANTED:
        _on_limit_granted(program, state, out, payload, now_ms)
    else:
        raise ValueError(unknown_event_kind(kind))
    if START_GATED in state.visits and state.status in CLOSED:
        # Its start slot (or its place at a gate) is given back, once: the mark goes with it.
        del state.visits[START_GATED]
        state.effects.append((EFFECT_LIMIT_RELEASE, None))
    return out


def _check_pc(program: Program, state: ExecutionState) -> None:
    steps = len(program._steps)
    if not 0 <= state.pc <= steps or (state.status == WAITING and state.pc == steps):
        raise ValueError(pc_outside_steps(state.execution_id, state.pc))


def _signal_fields(payload: Any) -> tuple[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise ValueError(bad_signal(payload))
    return payload["name"], payload.get("data")


def _emit(state: ExecutionState, out: list[Transition], step_id: str, kind: str, detail: Any) -> None:
    state.seq += 1
    out.append((state.seq, step_id, kind, detail))


def _waiting_step(program: Program, state: ExecutionState, step_type: type[_StepT]) -> _StepT | None:
    """The step at pc when the execution waits there and it is a `step_type`, else None."""
    if state.status != WAITING:
        return None
    _check_pc(program, state)
    step = program._steps[state.pc]
    return step if isinstance(step, step_type) else None


def _resume(program: Program, state: ExecutionState, out: list[Transition], pc: int, now_ms: int) -> None:
    state.status = RUNNING
    state.waiting = None
    state.pc = pc
    _run(program, state, out, now_ms)


# -- timers, waits and actions ---------------------------------------------------
def _set_timer(state: ExecutionState, step_id: str, purpose: str, fire_at_ms: int) -> None:
    # The seq makes the id unique also across an operator retry's new attempt series.
    timer_id = f"{step_id}:{state.visits.get(step_id, 0)}:{state.attempt}:{purpose}:{state.seq}"
    state.timer = timer_id
    state.effects.append(
        (EFFECT_SET_TIMER, {"timer_id": timer_id, "fire_at_ms": fire_at_ms, "purpose": purpose, "step_id": step_id})
    )


def _clear_timer(state: ExecutionState) -> None:
    if state.timer is not None:
        state.timer = None
        state.effects.append((EFFECT_CLEAR_TIMER, None))


def _request(program: Program, state: ExecutionState, out: list[Transition], step: ActionStep, now_ms: int) -> bool:
    """Ask for attempt `state.attempt` of an action and wait for its result or its timeout.

    True when its input names a missing field and the step's failure branch was taken.
    """
    roots = {"context": state.context, "subject": state.subject, "event": state.event}
    try:
        rendered = render(step.input, roots)
    except TemplateError as exc:
        _release_limit(state, step)
        return _template_failed(program, state, out, step, exc)
    _emit(state, out, step.id, ACTION_REQUESTED, {"attempt": state.attempt, "action": step.action})
    request = {
        "step_id": step.id,
        "attempt": state.attempt,
        "action": step.action,
        "major": step.major,
        "input": rendered,
        "idempotency_key": f"{state.execution_id}:{step.id}:{state.visits.get(step.id, 0)}",
        "timeout_ms": step.timeout_ms,
    }
    if step.limits is not None and step.limits.rate_per_s is not None:
        # The call itself takes a rate token when it is made (daemon/effects.py): exact at the provider.
        request["rate_limit"] = {"bucket": _bucket(state, step), "rate_per_s": step.limits.rate_per_s}
    state.effects.append((EFFECT_ACTION, request))
    _set_timer(state, step.id, PURPOSE_ACTION_TIMEOUT, now_ms + step.timeout_ms)
    state.status = WAITING
    state.waiting = WAIT_ACTION
    return False


def _wait_for_limit(state: ExecutionState, out: list[Transition], step: ActionStep) -> None:
    """Queue attempt `state.attempt` behind the step's limits; a grant (`_on_limit_granted`) requests it.

    The wait is not an attempt and has no deadline: the action's timeout starts when the call is
    requested. The queue entry is a ledger row, written with this commit.
    """
    limits = step.limits
    assert limits is not None
    bucket = _bucket(state, step)
    _emit(state, out, step.id, LIMIT_WAITING, {"attempt": state.attempt, "bucket": bucket})
    state.effects.append(
        (
            EFFECT_LIMIT_WAIT,
            {
                "step_id": step.id,
                "attempt": state.attempt,
                "bucket": bucket,
                "action": step.action,
                "rate_per_s": limits.rate_per_s,
                "concurrency": limits.concurrency,
                "lease_ms": step.timeout_ms,
            },
        )
    )
    state.status = WAITING
    state.waiting = WAIT_LIMIT


def _bucket(state: ExecutionState, step: ActionStep) -> str:
    assert step.limits is not None
    key = None
    if step.limits.key is not None:
        roots = {"context": state.context, "subject": state.subject, "event": state.event}
        key = render(step.limits.key, roots, False)
    return limit_bucket(step.action, step.major, state.tenant, key)


def _release_limit(state: ExecutionState, step: ActionStep) -> None:
    """The step's call is over (or will not be made): give back its slot or its place in the queue."""
    if step.limits is not None:
        state.effects.append((EFFECT_LIMIT_RELEASE, None))


def _wait_at_gate(program: Program, state: ExecutionState, out: list[Transition]) -> None:
    """Queue the new execution at start gate `state.attempt` (a ledger row written with this commit)."""
    gate = program.gates[state.attempt - 1]
    _emit(state, out, START_GATED, LIMIT_WAITING, {"attempt": state.attempt, "bucket": gate["bucket"]})
    state.effects.append((EFFECT_LIMIT_WAIT, {"step_id": START_GATED, "attempt": state.attempt, **gate}))
    state.status = WAITING
    state.waiting = WAIT_START


def _on_gate_granted(program: Program, state: ExecutionState, out: list[Transition], now_ms: int) -> None:
    """Its turn at a start gate: on to the next gate, or to the first step (the gates read now: a
    reload may have changed them meanwhile)."""
    _emit(state, out, START_GATED, LIMIT_GRANTED, {"attempt": state.attempt})
    if state.attempt < len(program.gates):
        state.attempt += 1
        _wait_at_gate(program, state, out)
        return
    state.attempt = 0
    _resume(program, state, out, 0, now_ms)


def _on_limit_granted(
    program: Program, state: ExecutionState, out: list[Transition], payload: Any, now_ms: int
) -> None:
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("step_id"), str)
        or type(payload.get("attempt")) is not int
    ):
        raise ValueError(bad_limit_grant(payload))
    if state.waiting == WAIT_START and state.status == WAITING:
        if payload["step_id"] == START_GATED and payload["attempt"] == state.attempt:
            _on_gate_granted(program, state, out, now_ms)
        return  # else stale: changes nothing
    step = _waiting_step(program, state, ActionStep)
    if (
        step is None
        or state.waiting != WAIT_LIMIT
        or step.id != payload["step_id"]
        or state.attempt != payload["attempt"]
    ):
        return  # stale (the execution moved on, or a repeated grant): changes nothing
    _emit(state, out, step.id, LIMIT_GRANTED, {"attempt": state.attempt})
    if _request(program, state, out, step, now_ms):
        _run(program, state, out, now_ms)


def _template_failed(
    program: Program, state: ExecutionState, out: list[Transition], step: Step, exc: TemplateError
) -> bool:
    return _step_failed(program, state, out, step, exc.as_error(), 1)


def _on_action_result(
    program: Program, state: ExecutionState, out: list[Transition], payload: Any, now_ms: int
) -> None:
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("step_id"), str)
        or type(payload.get("attempt")) is not int
        or type(payload.get("ok")) is not bool
    ):
        raise ValueError(bad_action_result(payload))
    step_id, attempt, ok = payload["step_id"], payload["attempt"], payload["ok"]
    step = _waiting_step(program, state, ActionStep)
    if step is None or state.waiting != WAIT_ACTION or step.id != step_id or state.attempt != attempt:
        # Late (after a timeout or a retry) or for another step: recorded, changes nothing.
        _emit(state, out, step_id, LATE_RESULT, {"attempt": attempt, "ok": ok})
        return
    _release_limit(state, step)
    if ok:
        output = payload.get("output")
        state.context[step.id] = output
        # The output is an input of the run: replay reads it back from the detail (a copy, see signal).
        _emit(state, out, step.id, ACTION_COMPLETED, {"attempt": attempt, "output": copy_json(output)})
        _clear_timer(state)
        state.attempt = 0
        state.failures = []
        _resume(program, state, out, step.next, now_ms)
    else:
        _action_failed(program, state, out, step, _error_of(payload.get("error")), now_ms)


def _error_of(error: object) -> dict[str, Any]:
    if isinstance(error, dict):
        return error
    return no_error_object(error)


def _action_failed(
    program: Program,
    state: ExecutionState,
    out: list[Transition],
    step: ActionStep,
    error: dict[str, Any],
    now_ms: int,
    timer_id: str | None = None,
) -> None:
    attempt = state.attempt
    detail = {"attempt": attempt, "error": error}
    if timer_id is not None:  # a timeout: the timer that fired, not a result, is the input
        detail["timer_id"] = timer_id
    _emit(state, out, step.id, ACTION_FAILED, detail)
    state.failures.append({"attempt": attempt, "error": error})
    code = error.get("code")
    if error.get("retryable", True) is True and code not in step.non_retryable and attempt < step.max_attempts:
        delay = retry_delay_ms(
            state.execution_id, step.id, attempt, step.initial_ms, step.coefficient, step.max_interval_ms, step.jitter
        )
        _set_timer(state, step.id, PURPOSE_RETRY, now_ms + delay)  # replaces the action timeout
        state.waiting = WAIT_RETRY
        return
    _clear_timer(state)
    if _step_failed(program, state, out, step, error, attempt):
        _run(program, state, out, now_ms)


def _on_timer(program: Program, state: ExecutionState, out: list[Transition], payload: Any, now_ms: int) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get("timer_id"), str):
        raise ValueError(bad_timer(payload))
    if state.timer is None or payload["timer_id"] != state.timer:
        return  # stale: replaced, cleared, or already fired
    _check_pc(program, state)
    step = program._steps[state.pc] if state.status == WAITING else None
    waiting = state.waiting
    timer_id = state.timer
    if type(step) is ActionStep and waiting == WAIT_ACTION:
        state.timer = None
        _release_limit(state, step)
        _action_failed(program, state, out, step, action_timed_out(step.timeout_text), now_ms, timer_id)
    elif type(step) is ActionStep and waiting == WAIT_RETRY:
        state.timer = None
        state.attempt += 1
        if step.limits is not None:
            _wait_for_limit(state, out, step)
        elif _request(program, state, out, step, now_ms):
            _run(program, state, out, now_ms)
    elif type(step) is WaitStep and waiting == WAIT_TIMER:
        state.timer = None
        _emit(state, out, step.id, TIMER_FIRED, {"purpose": PURPOSE_WAIT, "timer_id": timer_id})
        _resume(program, state, out, step.next, now_ms)
    elif type(step) is WaitForEventStep and waiting == WAIT_EVENT + step.event:
        state.timer = None
        _emit(state, out, step.id, TIMED_OUT, {"event": step.event, "timer_id": timer_id})
        state.effects.append((EFFECT_CLEAR_WAIT, None))
        _resume(program, state, out, step.on_timeout, now_ms)
    else:
        raise ValueError(timer_without_wait(state.execution_id, state.timer, waiting))


def _on_event(program: Program, state: ExecutionState, out: list[Transition], payload: Any, now_ms: int) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise ValueError(bad_event(payload))
    step = _waiting_step(program, state, WaitForEventStep)
    if step is None or state.waiting != WAIT_EVENT + payload["type"]:
        return  # not for us: nothing recorded
    if step.filter is not None:
        roots = {"context": state.context, "subject": state.subject, "event": payload}
        if not holds(step.filter, roots):
            return
    data = payload.get("data")
    state.context[step.id] = data
    _emit(
        state,
        out,
        step.id,
        EVENT_RECEIVED,
        {"event_id": payload.get("event_id"), "type": payload["type"], "data": copy_json(data)},
    )
    state.effects.append((EFFECT_CLEAR_WAIT, None))
    _clear_timer(state)
    _resume(program, state, out, step.next, now_ms)


def _on_cancel(program: Program, state: ExecutionState, out: list[Transition], payload: Any) -> None:
    if state.status in CLOSED:
        return
    reason = payload.get("reason") if isinstance(payload, dict) else None
    _emit(state, out, "", CANCELLED, {"reason": reason})
    _clear_timer(state)
    if state.status == WAITING and isinstance(state.waiting, str) and state.waiting.startswith(WAIT_EVENT):
        state.effects.append((EFFECT_CLEAR_WAIT, None))
    if state.status == WAITING and state.waiting in (WAIT_LIMIT, WAIT_ACTION):
        step = _waiting_step(program, state, ActionStep)
        if step is not None:
            _release_limit(state, step)
    state.status = CANCELLED
    state.waiting = None


def _on_retry(program: Program, state: ExecutionState, out: list[Transition], now_ms: int) -> None:
    steps = program._steps
    step = steps[state.pc] if 0 <= state.pc < len(steps) else None
    if state.status != FAILED or type(step) is not ActionStep:
        raise ValueError(NOT_FAILED_AT_ACTION)
    state.status = RUNNING
    state.attempt = 0
    state.failures = []
    _emit(state, out, step.id, RETRIED, None)
    # The same step visit again (visits unchanged): the idempotency key stays the same.
    state.steps += 1
    state.attempt = 1
    if step.limits is not None:
        _wait_for_limit(state, out, step)
    elif _request(program, state, out, step, now_ms):
        _run(program, state, out, now_ms)


def _step_failed(
    program: Program, state: ExecutionState, out: list[Transition], step: Step, error: dict[str, Any], attempts: int
) -> bool:
    """A step failed for good: take its on_failure branch, else the workflow's, else fail the execution.

    True when a branch was taken (the execution is running again at its target).
    """
    _emit(state, out, step.id, STEP_FAILED, {"error": error, "attempts": attempts})
    target = getattr(step, "on_failure", NO_STEP)  # set and emit steps have none of their own
    if target < 0 and program.on_failure != state.pc:  # a failing failure branch does not re-enter itself
        target = program.on_failure
    if target >= 0:
        state.attempt = 0
        state.failures = []
        state.status = RUNNING
        state.waiting = None
        state.pc = target
        return True
    _emit(state, out, step.id, FAILED, {"error": error.get("message"), "code": error.get("code")})
    state.status = FAILED
    state.waiting = None
    code = error.get("code")
    if type(step) is ActionStep or code in TEMPLATE_ERRORS:
        state.effects.append(
            (
                EFFECT_DEAD_LETTER,
                {
                    "reason": code if code in TEMPLATE_ERRORS else REASON_STEP_FAILED,
                    "step_id": step.id,
                    "error": error,
                    "attempts": list(state.failures),
                },
            )
        )
    return False


# -- running ---------------------------------------------------------------------
def _loop_guard(state: ExecutionState, out: list[Transition], step_id: str, detail: dict[str, Any]) -> None:
    _emit(state, out, step_id, FAILED, detail)
    state.status = FAILED


def _run(program: Program, state: ExecutionState, out: list[Transition], now_ms: int = 0) -> None:
    steps = program._steps
    visits = state.visits
    ran = 0
    if state.status == RUNNING:
        _check_pc(program, state)
    while state.status == RUNNING:
        if state.pc == len(steps):
            _emit(state, out, "", COMPLETED, None)
            state.status = COMPLETED
            _clear_timer(state)
            return
        step = steps[state.pc]
        if ran == program.max_steps:
            return _loop_guard(state, out, step.id, too_many_steps(program.max_steps))
        visit = visits.get(step.id, 0) + 1
        if visit > program.max_visits:
            return _loop_guard(state, out, step.id, too_many_visits(step.id, program.max_visits))
        visits[step.id] = visit
        ran += 1
        state.steps += 1
        roots = {"context": state.context, "subject": state.subject, "event": state.event}
        if type(step) is SetStep:
            try:
                for path, template in step.assignments:
                    _assign(state.context, path, render(template, roots))
            except TemplateError as exc:
                _template_failed(program, state, out, step, exc)
                continue  # at the failure branch, or failed
            _emit(state, out, step.id, SET, None)
            state.pc = step.next
        elif type(step) is IfStep:
            taken = "then" if holds(step.condition, roots) else "else"
            state.pc = step.then if taken == "then" else step.else_
            _emit(state, out, step.id, BRANCH, {"to": _id_at(steps, state.pc), "taken": taken})
        elif type(step) is SwitchStep:
            case: str | int = "default"
            state.pc = step.default
            for index, (condition, target) in enumerate(step.cases):
                if holds(condition, roots):
                    state.pc, case = target, index
                    break
            _emit(state, out, step.id, BRANCH, {"to": _id_at(steps, state.pc), "case": case})
        elif type(step) is GotoStep:
            state.pc = step.target
            _emit(state, out, step.id, GOTO, {"to": _id_at(steps, state.pc)})
        elif type(step) is EndStep:
            _emit(state, out, step.id, step.status, None if step.reason is None else {"reason": step.reason})
            state.status = step.status
            _clear_timer(state)
        elif type(step) is WaitForSignalStep:
            _emit(state, out, step.id, WAITING, {"signal": step.signal})
            state.status = WAITING
            state.waiting = step.signal
        elif type(step) is ActionStep:
            state.attempt = 1
            state.failures = []
            if step.limits is None:
                _request(program, state, out, step, now_ms)  # waiting, or at the failure branch, or failed
            else:
                _wait_for_limit(state, out, step)
        elif type(step) is WaitStep:
            if step.until is None:
                until_ms = now_ms + step.duration_ms
            else:
                try:
                    until_ms = parse_instant(render(step.until, roots))
                except TemplateError as exc:
                    _template_failed(program, state, out, step, exc)
                    continue
                except ValueError as exc:
                    _step_failed(program, state, out, step, bad_until(exc), 1)
                    continue  # at the failure branch, or failed
            _emit(state, out, step.id, WAITING, {"until_ms": until_ms})
            _set_timer(state, step.id, PURPOSE_WAIT, until_ms)
            state.status = WAITING
            state.waiting = WAIT_TIMER
        elif type(step) is WaitForEventStep:
            _emit(state, out, step.id, WAITING, {"event": step.event})
            state.effects.append((EFFECT_WAIT_EVENT, {"event_type": step.event, "step_id": step.id}))
            _set_timer(state, step.id, PURPOSE_EVENT_TIMEOUT, now_ms + step.timeout_ms)
            state.status = WAITING
            state.waiting = WAIT_EVENT + step.event
        elif type(step) is EmitStep:
            try:
                data = render(step.data, roots)
            except TemplateError as exc:
                _template_failed(program, state, out, step, exc)
                continue
            event_id = f"{state.execution_id}:{step.id}:{visit}"
            state.effects.append(
                (
                    EFFECT_EMIT,
                    {
                        "event": {
                            # A typed subject is trigger contract 1.2; a contact is 1.0.
                            "v": 1 if program.subject_type == CONTACT else SUBJECT_CONTRACT,
                            "event_id": event_id,
                            "tenant": state.tenant,
                            "type": step.event,
                            **_emitted_subject(program, state),
                            "data": data,
                            "ts": now_ms,
                        }
                    },
                )
            )
            _emit(state, out, step.id, EMITTED, {"event_id": event_id, "type": step.event})
            state.pc = step.next
        else:  # pragma: no cover - resolve() only produces the types above
            raise TypeError(unknown_step(step))


def _emitted_subject(program: Program, state: ExecutionState) -> dict[str, Any]:
    """An emitted event is about the execution's subject: `contact` for a contact, else a typed `subject`."""
    if program.subject_type == CONTACT:
        return {"contact": copy_json(state.subject)}
    return {"subject": {"type": program.subject_type, **copy_json(state.subject)}}


def _id_at(steps: tuple[Step, ...], pc: int) -> str:
    return steps[pc].id if pc < len(steps) else ""


def _assign(context: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """context[a][b][c] = value for path (a, b, c), creating (or replacing non-dict) parents."""
    target = context
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


# -- templates -----------------------------------------------------------------
def lookup(node: Template, roots: Roots) -> Any:
    """The value at a ("path", slot, segments, root) node, or _MISSING when any part is missing."""
    value = roots[node[1]]
    segments = node[2]
    for key, index in segments:
        if isinstance(value, dict):
            value = value.get(key, _MISSING)
            if value is _MISSING:
                return _MISSING
        elif isinstance(value, list) and 0 <= index < len(value):
            value = value[index]
        else:
            return _MISSING
    return value


def copy_json(value: Any) -> Any:
    """A copy of nested dicts and lists, so context never aliases event, contact or program data."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


def _copy_bounded(value: Any, node: Template) -> Any:
    """copy_json(value), refused past MAX_RENDERED_NODES dicts, lists and values."""
    budget = [MAX_RENDERED_NODES]

    def copy(item: Any) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueTooLarge.nodes(template_text(node))
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, list):
            return [copy(v) for v in item]
        return item

    return copy(value)


def render(node: Template, roots: Roots, strict: bool = True) -> Any:
    """The template's value; a missing field raises MissingField when strict (a value), else is None."""
    tag = node[0]
    if tag == "lit":
        return node[1]
    if tag == "path":
        value = lookup(node, roots)
        if value is _MISSING:
            if strict:
                raise MissingField(template_text(node))
            return None
        return _copy_bounded(value, node)
    if tag == "interp":
        parts = []
        for part in node[1]:
            if isinstance(part, str):
                parts.append(part)
            else:
                value = lookup(part, roots)
                if value is _MISSING:
                    if strict:
                        raise MissingField(template_text(part))
                    value = None
                parts.append("" if value is None else str(value))
        text = "".join(parts)
        if len(text) > MAX_RENDERED_CHARS:
            raise ValueTooLarge.chars(interp_text(node), len(text))
        return text
    if tag == "dict":
        return {key: render(item, roots, strict) for key, item in node[1]}
    if tag == "list":
        return [render(item, roots, strict) for item in node[1]]
    raise TypeError(unknown_template_node(node))  # pragma: no cover


# -- conditions ----------------------------------------------------------------
def same(a: object, b: object) -> bool:
    """JSON equality: like ==, except that a boolean only equals a boolean (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _orderable(a: object, b: object) -> bool:
    """Numbers with numbers, strings with strings; anything else (None, bools, mixed) is not ordered."""
    if isinstance(a, str):
        return isinstance(b, str)
    return (type(a) is int or type(a) is float) and (type(b) is int or type(b) is float)


def holds(cond: Condition, roots: Roots) -> bool:
    op = cond[0]
    if op == "all":
        return all(holds(c, roots) for c in cond[1])
    if op == "any":
        return any(holds(c, roots) for c in cond[1])
    if op == "not":
        return not holds(cond[1], roots)
    if op == "exists":
        return render(cond[1], roots, False) is not None
    a, b = render(cond[1], roots, False), render(cond[2], roots, False)
    if op == "eq":
        return same(a, b)
    if op == "ne":
        return not same(a, b)
    if op == "in":
        return isinstance(b, list) and any(same(a, v) for v in b)
    if op == "contains":
        if isinstance(a, str):
            return isinstance(b, str) and b in a
        return isinstance(a, list) and any(same(v, b) for v in a)
    if not _orderable(a, b):
        return False
    # bool(): the operands are Any to a type checker, though numbers and strings compare to a bool.
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    if op == "lte":
        return bool(a <= b)
    raise TypeError(unknown_condition(cond))  # pragma: no cover
