"""The words of the hot path, written once for both of its implementations.

The pure twins (`hotpath.dispatcher`, `hotpath.ring`) and the compiled modules
(`hotpath._dispatcher`, `hotpath._ring`) must say the same thing word for word:
the ledger stores these words, replay reads them back, and the tests compare the
two implementations' transitions, effects and error texts. So the kinds, the
statuses, the codes, the template exceptions and the text of every message live
here, and both implementations import them from here.
"""

from __future__ import annotations

from typing import Any

from hotpath.definition import (
    MAX_RENDERED_CHARS,
    MAX_RENDERED_NODES,
    TEMPLATE_MISSING_FIELD,
    TEMPLATE_VALUE_TOO_LARGE,
)

#: What advance() returns, one per transition: (seq, step_id, kind, detail).
Transition = tuple[int, str, str, Any]
#: What advance() appends to state.effects: (kind, detail).
Effect = tuple[str, Any]

# -- what advance() is given: event kinds -----------------------------------------
START = "start"
SIGNAL = "signal"  # also the transition that records a signal
ACTION_RESULT = "action_result"
TIMER = "timer"
EVENT = "event"
CANCEL = "cancel"
RETRY = "retry"
LIMIT_GRANTED = "limit_granted"  # also the transition that records the grant
EVENT_KINDS = (START, SIGNAL, ACTION_RESULT, TIMER, EVENT, CANCEL, RETRY, LIMIT_GRANTED)

# -- an execution's status (the last four are also transitions) -------------------
RUNNING = "running"
WAITING = "waiting"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
CLOSED = (COMPLETED, FAILED, CANCELLED)

# What a waiting execution waits for (state.waiting), besides a signal's name.
WAIT_ACTION, WAIT_RETRY, WAIT_TIMER, WAIT_EVENT = "action", "retry", "timer", "event:"
# An action step with limits waits for its turn (a grant) before its call is requested.
WAIT_LIMIT = "limit"
# A new execution behind start gates (a tenant's enrolment rate, a workflow's max_running) waits
# its turn before its first step; state.attempt is then the gate it waits at (1-based).
WAIT_START = "start"
# The start gates' step id in their transitions, queue rows and grants (never a step's: not an
# identifier), and the mark in state.visits of an execution that entered them: when it ends, its
# start slot and any queue row are given back (EFFECT_LIMIT_RELEASE).
START_GATED = "#start"

# -- what advance() records: transition kinds --------------------------------------
STARTED = "started"
SET = "set"
BRANCH = "branch"
GOTO = "goto"
EMITTED = "emitted"
ACTION_REQUESTED = "action_requested"
ACTION_COMPLETED = "action_completed"
ACTION_FAILED = "action_failed"
LATE_RESULT = "late_result"
TIMER_FIRED = "timer_fired"
TIMED_OUT = "timed_out"
EVENT_RECEIVED = "event_received"
RETRIED = "retried"
STEP_FAILED = "step_failed"
LIMIT_WAITING = "limit_waiting"

# -- what the worker does once the transitions have committed: effect kinds -------
EFFECT_ACTION = "action"
EFFECT_SET_TIMER = "set_timer"
EFFECT_CLEAR_TIMER = "clear_timer"
EFFECT_WAIT_EVENT = "wait_event"
EFFECT_CLEAR_WAIT = "clear_wait"
EFFECT_EMIT = "emit"
EFFECT_DEAD_LETTER = "dead_letter"
# Queue the call of a limited step in the ledger (written with the commit), and give
# back its place or its slot when the step is left.
EFFECT_LIMIT_WAIT = "limit_wait"
EFFECT_LIMIT_RELEASE = "limit_release"

# The purpose of a timer (set_timer effect, timer_fired transition).
PURPOSE_ACTION_TIMEOUT = "action_timeout"
PURPOSE_RETRY = "retry"
PURPOSE_WAIT = "wait"
PURPOSE_EVENT_TIMEOUT = "event_timeout"

# -- error codes and dead-letter reasons -------------------------------------------
# The template codes are defined in `hotpath.definition`, next to the template rules.
CODE_TIMEOUT = "timeout"
CODE_UNKNOWN = "unknown"
CODE_BAD_TIME = "bad_time"
CODE_LOOP_GUARD = "loop_guard"
REASON_STEP_FAILED = "step_failed"


# -- templates that cannot be rendered ------------------------------------------
class TemplateError(Exception):
    """A value template cannot be rendered (caught where the step runs, which then fails)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_error(self) -> dict[str, Any]:
        """The step's error: never retried, since the same data renders the same way again."""
        return {"code": self.code, "retryable": False, "message": self.message}


class MissingField(TemplateError):
    """A value template names a field that is not there."""

    def __init__(self, text: str) -> None:
        super().__init__(TEMPLATE_MISSING_FIELD, f"{text} names a missing field")


class ValueTooLarge(TemplateError):
    """A rendered value over MAX_RENDERED_CHARS characters or MAX_RENDERED_NODES nodes."""

    def __init__(self, text: str, what: str) -> None:
        super().__init__(TEMPLATE_VALUE_TOO_LARGE, f"{text} renders {what}")

    @classmethod
    def nodes(cls, text: str) -> ValueTooLarge:
        return cls(text, f"a value of over {MAX_RENDERED_NODES} nodes")

    @classmethod
    def chars(cls, text: str, length: int) -> ValueTooLarge:
        return cls(text, f"{length} characters, over {MAX_RENDERED_CHARS}")


# -- a step's errors and the loop guard ------------------------------------------
def action_timed_out(timeout_text: str) -> dict[str, Any]:
    """The error of an action attempt that got no result within its timeout (retryable)."""
    return {"code": CODE_TIMEOUT, "retryable": True, "message": f"no result within {timeout_text}"}


def no_error_object(error: object) -> dict[str, Any]:
    """The error of a failed action result that carries no error object."""
    message = f"the action failed without an error object: {error!r}"
    return {"code": CODE_UNKNOWN, "retryable": False, "message": message}


def bad_until(exc: Exception) -> dict[str, Any]:
    """The error of a wait step whose rendered 'until' is not a time."""
    return {"code": CODE_BAD_TIME, "retryable": False, "message": f"'until' {exc}"}


def too_many_steps(max_steps: int) -> dict[str, Any]:
    """The detail of the "failed" transition when one run exceeds limits.max_steps."""
    return {"error": f"loop guard: more than {max_steps} steps in one run", "code": CODE_LOOP_GUARD}


def too_many_visits(step_id: str, max_visits: int) -> dict[str, Any]:
    """The detail of the "failed" transition when a step is entered more than limits.max_visits times."""
    return {"error": f"loop guard: step '{step_id}' entered more than {max_visits} times", "code": CODE_LOOP_GUARD}


# -- inputs advance() refuses (ValueError) ---------------------------------------
NOT_FAILED_AT_ACTION = "execution is not failed at an action step"


def limit_bucket(action: str, major: int, tenant: str, key: Any) -> str:
    """The name of the limits a call counts against: per action, per tenant, and per rendered key if any."""
    bucket = f"{action}@{major}|{tenant}"
    return bucket if key is None else f"{bucket}|{key}"


def enrolment_bucket(tenant: str) -> str:
    """The start gate a tenant's new executions share under its enrolment rate (never an action's: no '@')."""
    return f"enrolments|{tenant}"


def running_bucket(tenant: str, workflow_id: str) -> str:
    """The start gate whose slots are a workflow's running executions (its `max_running`)."""
    return f"running|{tenant}|{workflow_id}"


#: What a gate's queue rows name as their action (a metric label), by the kind of gate.
GATE_ENROLMENT, GATE_RUNNING = "(enrolment)", "(max_running)"


def start_gates(
    tenant: str, workflow_id: str, enrolment_rate_per_s: float | None, max_running: int | None
) -> tuple[dict[str, Any], ...]:
    """The gates a new execution passes in order before its first step: each a limit_wait effect's
    fields but step_id and attempt. A running slot is held until the execution ends (no lease)."""
    gates: list[dict[str, Any]] = []
    if enrolment_rate_per_s:
        gates.append(
            {
                "bucket": enrolment_bucket(tenant),
                "action": GATE_ENROLMENT,
                "rate_per_s": enrolment_rate_per_s,
                "concurrency": None,
                "lease_ms": None,
            }
        )
    if max_running:
        gates.append(
            {
                "bucket": running_bucket(tenant, workflow_id),
                "action": GATE_RUNNING,
                "rate_per_s": None,
                "concurrency": max_running,
                "lease_ms": None,
            }
        )
    return tuple(gates)


def bad_limit_grant(payload: Any) -> str:
    return f"a limit grant needs a string 'step_id' and an integer 'attempt', got {payload!r}"


def unknown_event_kind(kind: object) -> str:
    return f"unknown event kind {kind!r} (expected one of {', '.join(EVENT_KINDS)})"


def already_started(execution_id: object, seq: int) -> str:
    return f"execution {execution_id} has already started (seq {seq})"


def pc_outside_steps(execution_id: object, pc: int) -> str:
    return f"execution {execution_id} has pc {pc} outside the program's steps"


def timer_without_wait(execution_id: object, timer: object, waiting: object) -> str:
    return f"execution {execution_id} has timer {timer!r} but waits on {waiting!r}"


def bad_signal(payload: object) -> str:
    return f"a signal payload needs a 'name' string, got {payload!r}"


def bad_action_result(payload: object) -> str:
    return f"an action result needs 'step_id', 'attempt' and 'ok', got {payload!r}"


def bad_timer(payload: object) -> str:
    return f"a timer payload needs a 'timer_id' string, got {payload!r}"


def bad_event(payload: object) -> str:
    return f"an event payload needs a 'type' string, got {payload!r}"


# -- what resolve() never produces (TypeError) -----------------------------------
def unknown_step(step: object) -> str:
    return f"unknown step {step!r}"


def unknown_template_node(node: object) -> str:
    return f"unknown template node {node!r}"


def unknown_condition(condition: object) -> str:
    return f"unknown condition {condition!r}"


# -- the ordering ring -------------------------------------------------------------
def bad_capacity(capacity: object) -> str:
    return f"capacity must be an integer >= 1, got {capacity!r}"


# -- reprs ---------------------------------------------------------------------------
def program_repr(tenant: str, workflow_id: str, version: object, steps: int) -> str:
    return f"<Program {tenant}/{workflow_id} v{version} steps={steps}>"


def state_repr(execution_id: object, status: object, pc: int, seq: int) -> str:
    return f"<ExecutionState {execution_id} {status} pc={pc} seq={seq}>"


def ring_repr(capacity: int, held: int, in_flight: int, ready: int) -> str:
    return f"<OrderingRing capacity={capacity} held={held} in_flight={in_flight} ready={ready}>"
