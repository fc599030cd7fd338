"""An execution's spans, built after commit from its committed transitions and their times.

No span is held open across messages: each commit of a traced execution
yields the spans that this commit closed, with their start and end read from
the transitions (every transition carries the time of the advance that made
it). A step visit (a run of consecutive transitions of one step) closes when
the execution moves on to another step or ends; its action calls and waits
close with it. The root span (the execution) closes when the execution ends;
the enrolment span with the first commit. The trace's shape:

    execution <workflow>            root; a child of the trigger's span when one came with it
      enrol                         enrolment to its first commit
      step <id>                     one per visit of a step
        action <name>@<major>       each attempt: request to result (its id is what the request carries)
        wait                        a wait, wait_for_signal or wait_for_event: its start to its end

Pure: no I/O, no OpenTelemetry (daemon/tracing.py hands these to the exporter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hotpath.vocabulary import ACTION_COMPLETED, ACTION_REQUESTED, FAILED, STEP_FAILED

from .trace_context import span_id

#: The transition kind that starts a wait (wait, wait_for_signal, wait_for_event).
WAITING = "waiting"


@dataclass(slots=True)
class Span:
    name: str
    span_id: int
    #: The parent span's id; None for the root (or the trigger's span id when it came with one).
    parent_id: int | None
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: "internal", "client" (an action call) or "consumer" (the execution, consuming its trigger).
    kind: str = "internal"


@dataclass(slots=True)
class Transition:
    seq: int
    step_id: str
    kind: str
    at_ns: int
    detail: Any = None


@dataclass(slots=True)
class Execution:
    """What the spans name besides the transitions."""

    execution_id: str
    tenant: str
    workflow_id: str
    workflow_version: int
    #: The parent of the root span: the trigger's span, or None.
    trigger_span_id: int | None
    created_ns: int


def closed_spans(
    execution: Execution,
    transitions: list[Transition],
    first_seq: int,
    *,
    finished: bool,
    status: str,
    commit_ns: int,
) -> list[Span]:
    """The spans closed by the commit whose transitions start at `first_seq` (the ones up to the end of
    `transitions`, which hold the execution's whole history up to this commit, in seq order)."""
    eid = execution.execution_id
    root_id = span_id(eid, "root")
    spans: list[Span] = []
    if first_seq == 1:
        spans.append(
            Span("enrol", span_id(eid, "enrol"), root_id, execution.created_ns, max(execution.created_ns, commit_ns))
        )
    visits = _visits(transitions)
    for visit in visits:
        following = _after(transitions, visit[-1])
        if following is not None:
            closed_here = following.seq >= first_seq
        else:  # the last visit closes only when the execution ends
            closed_here = finished and visit[-1].seq >= first_seq
        if closed_here:
            spans.extend(_visit_spans(eid, root_id, visit, following))
    if finished:
        start = execution.created_ns
        root = Span(
            f"execution {execution.workflow_id}",
            root_id,
            execution.trigger_span_id,
            start,
            max(start, commit_ns),
            {
                "ordo.execution_id": eid,
                "ordo.tenant": execution.tenant,
                "ordo.workflow_id": execution.workflow_id,
                "ordo.workflow_version": execution.workflow_version,
                "ordo.status": status,
            },
            kind="consumer",
        )
        if status == FAILED:
            root.error = "execution failed"
        spans.append(root)
    return spans


def _visits(transitions: list[Transition]) -> list[list[Transition]]:
    """Runs of consecutive transitions of one step (the execution's own, step id "", are in none)."""
    visits: list[list[Transition]] = []
    current: list[Transition] = []
    for transition in transitions:
        if current and transition.step_id == current[-1].step_id:
            current.append(transition)
            continue
        if current:
            visits.append(current)
        current = [transition] if transition.step_id else []
    if current:
        visits.append(current)
    return visits


def _after(transitions: list[Transition], transition: Transition) -> Transition | None:
    index = transition.seq - transitions[0].seq + 1
    if 0 <= index < len(transitions) and transitions[index].seq == transition.seq + 1:
        return transitions[index]
    return next((t for t in transitions if t.seq > transition.seq), None)


def _visit_spans(eid: str, root_id: int, visit: list[Transition], following: Transition | None) -> list[Span]:
    first, last = visit[0], visit[-1]
    step_span = Span(
        f"step {first.step_id}",
        span_id(eid, "step", first.seq),
        root_id,
        first.at_ns,
        last.at_ns,
        # One attribute: each costs the exporter's encoder as much as a third of a span (the name has the id).
        {"ordo.seq": first.seq},
    )
    spans = [step_span]
    for index, transition in enumerate(visit):
        # What ended it: the step's next transition, else the execution's (a cancel, say), else open.
        end = visit[index + 1] if index + 1 < len(visit) else following
        if transition.kind == ACTION_REQUESTED:
            spans.append(_call_span(eid, step_span, transition, end))
        elif transition.kind == WAITING:
            spans.append(_wait_span(eid, step_span, transition, end))
        elif transition.kind == STEP_FAILED:
            step_span.error = _error_text(transition.detail) or "step failed"
    return spans


def _call_span(eid: str, step: Span, request: Transition, end: Transition | None) -> Span:
    detail = request.detail if isinstance(request.detail, dict) else {}
    action = detail.get("action", "")
    span = Span(
        f"action {action}",
        span_id(eid, "call", request.seq),
        step.span_id,
        request.at_ns,
        end.at_ns if end is not None else step.end_ns,
        {"ordo.action": action, "ordo.attempt": detail.get("attempt", 0), "ordo.request_seq": request.seq},
        kind="client",
    )
    if end is None:
        span.attributes["ordo.outcome"] = "no_result"
    else:
        span.attributes["ordo.outcome"] = end.kind
        if end.kind != ACTION_COMPLETED:
            span.error = _error_text(end.detail) or end.kind
    return span


def _wait_span(eid: str, step: Span, waiting: Transition, end: Transition | None) -> Span:
    attributes: dict[str, Any] = {"ordo.ended_by": end.kind if end is not None else "nothing"}
    if isinstance(waiting.detail, dict):
        for key, value in waiting.detail.items():
            if isinstance(value, (str, int, float, bool)):
                attributes[f"ordo.wait.{key}"] = value
    return Span(
        "wait",
        span_id(eid, "wait", waiting.seq),
        step.span_id,
        waiting.at_ns,
        end.at_ns if end is not None else step.end_ns,
        attributes,
    )


def _error_text(detail: Any) -> str | None:
    if isinstance(detail, dict):
        error = detail.get("error")
        if isinstance(error, dict):
            return f"{error.get('code', '')}: {error.get('message', '')}".rstrip(": ")
    return None
