"""One message (or one due timer) applied to one execution.

The ordering ring guarantees the caller holds the only in-flight message of
this execution and that the record was read after its previous message
committed; this module decides what the message does: nothing (a redelivery
of a committed message, a stale timer), a dead letter (an execution that does
not exist, has ended or is another deployment's, a definition that cannot
run), or the dispatcher's transitions and effects as one change for the
batcher (which fails the execution instead when its context outgrows
`max_context_bytes`).
"""

import logging
import time
from datetime import datetime

from hotpath import advance
from ledger.batcher import DispatchFailure, Unit
from ledger.executions import CLOSED, ExecutionRecord, UnreadableRecord, take_effects

from . import logs, metrics
from .config import Config
from .engines import adopt
from .work_items import WorkItem

log = logging.getLogger("ordo.advance")

#: Kinds an operator may send to an execution that has ended.
_FOR_ENDED = frozenset(("retry",))
#: How long a timer of an execution whose row cannot be read waits before it is tried again.
UNREADABLE_TIMER_RETRY_MS = 60_000


def payload_of(doc: dict):
    """What the dispatcher needs of an exec-subject message, by kind."""
    kind = doc["kind"]
    if kind == "signal":
        return {"name": doc["name"], "data": doc.get("data")}
    if kind == "event":
        return doc["event"]
    if kind == "cancel":
        return {"reason": doc.get("reason")}
    if kind == "retry":
        return {}
    return doc  # action_result: step_id, attempt, ok, output | error


def apply(
    registry,
    record: ExecutionRecord | None,
    source: WorkItem,
    doc: dict,
    now: datetime,
    now_ms: int,
    max_context_bytes: int = Config.max_context_bytes,
    *,
    deployment: str,
) -> Unit | None:
    """The unit this message commits; None when it is a redelivery of a committed one.

    `source` is a stream message, a timer fire or an in-process action's result
    (daemon/work_items.py), holding its execution's ring key. `deployment` is
    this worker's (its prefix): an execution of another is not applied.
    """
    unit = Unit(source)
    is_timer = source.kind == "timer"
    # A stream message has a position; a timer fire or a local action result does not.
    from_stream = source.kind == "message"
    if record is None:
        if is_timer:
            unit.stale_timers.append((source.key, source.timer_id))
            return unit
        unit.dead_letter("unknown_execution", f"no execution {doc['execution_id']!r}")
        return unit
    if type(record) is UnreadableRecord:
        # Its messages are dead-lettered (retry them once the row is repaired); a timer keeps
        # its row and is tried again a while later, not at every load.
        if is_timer:
            unit.retry_timer_after_ms = UNREADABLE_TIMER_RETRY_MS
        else:
            unit.dead_letter("unreadable_execution", f"execution {record.execution_id} cannot be read: {record.error}")
        return unit
    if record.deployment and record.deployment != deployment:
        return _other_deployment(unit, record, source, deployment)
    if from_stream and source.stream_seq <= record.last_stream_seq:
        return None  # committed before: a redelivery, nothing to apply
    state = record.state
    kind = doc["kind"]
    if state.status in CLOSED and kind not in _FOR_ENDED:
        if is_timer:
            unit.stale_timers.append((source.key, source.timer_id))
            return unit
        if kind == "event":
            return unit  # a routed copy of a trigger event, late: the trigger itself is intact
        unit.dead_letter(
            "execution_closed",
            f"execution {record.execution_id} is {state.status}",
            tenant=record.tenant,
            workflow_id=record.workflow_id,
        )
        return unit
    event_id = doc["event"]["event_id"] if kind == "event" else None
    if event_id is not None and (record.has_taken(event_id) or record.enrolled_after(doc.get("stored"))):
        return unit  # routed again after a restart: an event it took already, or one from before it
    run = advance
    if record.engine is None:
        entry = registry.version(record.tenant, record.workflow_id, record.workflow_version)
    else:  # enrolled on an engine rollout's candidate: every step of it runs on that engine
        entry = registry.on_engine(record.tenant, record.workflow_id, record.workflow_version, record.engine)
        if entry is not None and entry.build is not None:
            state = record.state = adopt(state, entry.build)
            run = entry.build.advance
    if entry is None or entry.program is None:
        error = entry.error if entry else f"workflow {record.workflow_id} v{record.workflow_version} is not deployed"
        unit.dead_letter("invalid_definition", error, tenant=record.tenant, workflow_id=record.workflow_id)
        return unit
    try:
        started = time.perf_counter()
        transitions = run(entry.program, state, kind, payload_of(doc), now_ms)
        metrics.advance_timings.add(time.perf_counter() - started)
    except Exception as exc:
        steps = entry.program.step_ids
        log.exception(
            "dispatch failed for execution %s",
            record.execution_id,
            extra=logs.execution(
                record.execution_id,
                record.tenant,
                steps[state.pc] if 0 <= state.pc < len(steps) else None,
                workflow_id=record.workflow_id,
                **logs.failure("dispatch_error", exc),
            ),
        )
        unit.dead_letter(
            "dispatch_error", f"{type(exc).__name__}: {exc}", tenant=record.tenant, workflow_id=record.workflow_id
        )
        unit.dispatch_failures.append(
            DispatchFailure(
                record.execution_id,
                record.tenant,
                record.workflow_id,
                record.workflow_version,
                record.engine,
                record.created_at,
                enrolling=False,
            )
        )
        return unit
    if kind == "action_result":
        _count_action_result(entry, doc, transitions)
    effects = take_effects(state)
    for effect_kind, data in effects:
        if effect_kind == "dead_letter" and entry.step_actions:
            data["action"] = entry.step_actions.get(data.get("step_id"))
    if not transitions:
        # Not for this execution's current state (a stale timer, an event it
        # does not wait for): nothing to record.
        if is_timer:
            unit.stale_timers.append((source.key, source.timer_id))
        return unit
    if event_id is not None:
        record.took_event(event_id)
    if from_stream:
        record.last_stream_seq = source.stream_seq
        unit.changes.append(record.change(transitions, now, effects, source.stream_seq, max_context_bytes))
    else:
        unit.changes.append(record.change(transitions, now, effects, max_context_bytes=max_context_bytes))
    return unit


def _other_deployment(unit: Unit, record: ExecutionRecord, source: WorkItem, deployment: str) -> Unit:
    """Dead-letter a message for another deployment's execution (`other_deployment`), applying nothing.

    Deployments that share a ledger share its executions, so one that reached this deployment's
    subjects without `ordo` (which refuses it) would otherwise advance the other's row under this
    one's fencing and out of its order. This comes before the redelivery check: the row's last
    stream seq counts in the other deployment's stream. A row that names no deployment (written
    before migration 021) is this worker's: its own timers and results must go on applying, and
    telling whose it is would cost a query per load (see `ledger.executions.deployment_of`).
    """
    unit.dead_letter(
        "other_deployment",
        f"execution {record.execution_id} belongs to deployment {record.deployment!r}, "
        f"not to this one ({deployment!r})",
        tenant=record.tenant,
        workflow_id=record.workflow_id,
    )
    if source.kind == "timer":  # a row of this deployment's that it should never have set: it goes
        unit.stale_timers.append((source.key, source.timer_id))
    return unit


def _count_action_result(entry, doc: dict, transitions: list) -> None:
    """ordo_actions_total{action, outcome}: ok, retryable (a retry follows), error (final), late."""
    action = (entry.step_actions or {}).get(doc.get("step_id"), "unknown")
    kinds = {t[2] for t in transitions}
    if "late_result" in kinds:
        outcome = "late"
    elif doc.get("ok"):
        outcome = "ok"
    elif "step_failed" in kinds:
        outcome = "error"
    else:
        outcome = "retryable"
    metrics.action_outcome(action, outcome).inc()
