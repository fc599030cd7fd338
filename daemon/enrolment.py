"""Trigger events in: new executions out, and events for executions that wait.

A trigger event enrols its subject (a contact, an opportunity, ...) into every
deployed workflow of the tenant about that subject type whose trigger
matches. The new execution's id is derived from (tenant, workflow, event id)
and its first steps run right here, with no hop through JetStream: nothing
else can address an execution before its first commit, and a duplicate
delivery of the trigger loses on the ledger's primary key.

The same event may be what running executions wait for (`wait_for_event`):
those are looked up for a whole fetched batch in one query and the event is
published onto each waiting execution's subject, where it is ordered with
the execution's other messages.

A trigger whose `data` alone is larger than `max_context_bytes` enrols no one:
it is dead-lettered as `context_too_large` (every execution it started would
carry it and fail). Likewise a trigger whose subject is of a type that is not
registered (`unknown_subject_type`) or fails its type's schema
(`invalid_subject`); only triggers that some workflow is triggered by are
checked so.

A workflow under rollout (daemon/definitions.py) enrols each new execution
into the version its id and the rollout's stage choose; the execution keeps
that version (`workflow_version`) to its end; a share of those on the
baseline also run the candidate beside, in shadow (daemon/rollout_shadow.py).
Under an engine rollout the entry chosen may be the version on the candidate
engine (`entry.build`): the execution runs on that build and records its name
(`engine`), which every later message of it runs on; a candidate engine that
raises on a new execution fails it (`engine_error`), which the rollout judges.

A trigger message may be a batch of events ({v, events: [...]}): each event is
enrolled in a unit of its own (`BatchPart`), as if it had come alone.
"""

import logging
import time
from datetime import datetime
from typing import Literal

import orjson

from hotpath import ExecutionState, advance
from hotpath.envelope import BadEvent, BadMessage, decode_triggers, subject_key, subject_of
from ledger import event_waits
from ledger.batcher import DispatchFailure, Unit
from ledger.executions import ExecutionRecord, take_effects
from ledger.partitioning import day_of

from . import logs, metrics
from .config import Config
from .engines import crash_safe_start
from .rollout_shadow import dual_run
from .topology import Topology, execution_id_for, partition_of
from .trace_context import EVENT_KEY, trigger_traceparent

log = logging.getLogger("ordo.enrolment")


class BatchPart:
    """One event of a trigger batch message; it stands for the message in a unit of its own.

    Each event of a batch commits, or is dead-lettered, on its own, so one bad
    event never holds its batch-mates back. The message is acked once the last
    of its parts has committed; a redelivery before that enrols nobody twice
    (the ledger's primary key). A dead letter of a part carries the event alone.
    """

    __slots__ = ("delivery", "batch_index", "data", "_left")
    kind: Literal["trigger_part"] = "trigger_part"
    key = None
    partition = -1
    #: Not acked on its own: its message is, once its last part has committed (`settle`).
    reply = None

    def __init__(self, delivery, batch_index: int, data: bytes, left: list):
        self.delivery = delivery
        self.batch_index = batch_index
        self.data = data
        self._left = left  # [parts of the message not yet settled], shared by its parts

    @property
    def subject(self) -> str:
        return self.delivery.subject

    @property
    def stream(self) -> str:
        return self.delivery.stream

    @property
    def stream_seq(self) -> int:
        return self.delivery.stream_seq

    @property
    def delivered(self) -> int:
        return self.delivery.delivered

    @property
    def timestamp_ns(self) -> int:
        return self.delivery.timestamp_ns

    @property
    def headers(self) -> dict | None:
        return self.delivery.headers

    def settle(self) -> bool:
        """This part has committed; True when it was the message's last."""
        self._left[0] -= 1
        return self._left[0] == 0


def decode(delivery, max_bytes: int, published_tenant: str | None = None) -> tuple[list, list]:
    """(source, event) for each trigger event of the message, and the units that dead-letter bad ones.

    The source is the delivery itself for a single event, a `BatchPart` for
    each event of a batch.

    `published_tenant`: the tenant token of the subject the message was published to. A single
    event of another tenant is dead-lettered (`tenant_mismatch`): the token filed it under that
    tenant's lane, where it would take the other tenant's turns and weight and pass its own
    tenant's other events out of order. A batch may be published under any subject (contract 1.1)
    and is filed under its subject's tenant whatever its events' tenants.
    """
    try:
        items = decode_triggers(delivery.data, max_bytes)
    except BadMessage as exc:
        unit = Unit(delivery)
        unit.dead_letter(exc.reason, str(exc))
        return [], [unit]
    if type(items) is dict:
        tenant = items["tenant"]
        if published_tenant is not None and tenant != published_tenant:
            unit = Unit(delivery)
            unit.dead_letter(
                "tenant_mismatch",
                f"an event of tenant {tenant!r} published to {delivery.subject!r}, tenant {published_tenant!r}'s"
                f" subject: publish it to {tenant!r}'s (<prefix>.triggers.<tenant>.<event_type>)",
                tenant=tenant,
            )
            return [], [unit]
        return [(delivery, items)], []
    left = [len(items)]
    events, bad = [], []
    for index, item in enumerate(items):
        if type(item) is BadEvent:
            unit = Unit(BatchPart(delivery, index, item.payload, left))
            unit.dead_letter(item.reason, str(item))
            bad.append(unit)
        else:
            events.append((BatchPart(delivery, index, orjson.dumps(item), left), item))
    return events, bad


async def waiting_for(conn, events: list[dict]) -> list[tuple[str, int]]:
    """(execution id, the event's index) for every execution waiting for one of these events, in the
    events' order.

    An execution waits for an event about its own subject: the same type and id (an opportunity's
    event never wakes a contact's execution that has the same id).
    """
    if not events:
        return []
    keys = [subject_key(e) for e in events]
    columns = (
        [e["tenant"] for e in events],
        [subject_type for subject_type, _ in keys],
        [subject_id for _, subject_id in keys],
        [e["type"] for e in events],
    )
    # In the events' (stream) order: an execution's events are routed to it in that order.
    rows = sorted(await event_waits.waiting(conn, *columns), key=lambda row: row["i"])
    return [(execution_id, i) for execution_id, i in rows]


def stored_position(source, topology: Topology) -> list:
    """Where the triggers stream stored a trigger (a delivery, or an event of a batch message), the
    same on every redelivery: [stream, the tenant token of its subject, seq, ns]. The token names
    the lane it was filed under, whose order the seq is (a stream holds several lanes, and an
    event whose tenant is not its subject's is in another lane than its tenant's other events)."""
    return [source.stream, topology.published_tenant(source.subject), source.stream_seq, source.timestamp_ns]


def event_message(execution_id: str, event: dict, stored: list | None = None) -> tuple[bytes, str]:
    """The exec-subject message that hands `event` to a waiting execution, and its msg id; `stored`:
    where its trigger was stored (`stored_position`), so that an execution enrolled by a later
    trigger refuses it (ExecutionRecord.enrolled_after)."""
    body = {"v": 1, "kind": "event", "execution_id": execution_id, "event": event}
    if stored is not None:
        body["stored"] = stored
    return orjson.dumps(body), f"event:{event['event_id']}:{execution_id}"


def enrol(
    registry,
    topology: Topology,
    source,
    event: dict,
    now: datetime,
    now_ms: int,
    max_context_bytes: int = Config.max_context_bytes,
) -> Unit:
    """A new execution per matching workflow, each run until it suspends or ends.

    `source` is the delivery of a single event, or the `BatchPart` of an event
    of a batch; its `data` is the event's JSON either way.
    """
    unit = Unit(source)
    keep_raw = True
    traceparent = trigger_traceparent(source.headers, event)
    if traceparent is not None and event.get(EVENT_KEY) != traceparent:
        # Kept with the execution's event, so every later commit's spans find the trace it continues.
        event, keep_raw = {**event, EVENT_KEY: traceparent}, False
    tenant = event["tenant"]
    if not registry.knows_tenant(tenant):
        unit.dead_letter("unknown_tenant", f"tenant {tenant!r} is not known to this engine", tenant=tenant)
        return unit
    candidates = registry.candidates(tenant, event["type"])
    # Only a body larger than the limit can hold data larger than it: measure just those.
    if candidates and max_context_bytes and len(source.data) > max_context_bytes:
        size = len(orjson.dumps(event.get("data")))
        if size > max_context_bytes:
            unit.dead_letter(
                "context_too_large",
                f"trigger data is {size} bytes, over the limit of {max_context_bytes} (max_context_bytes)",
                tenant=tenant,
            )
            return unit
    subject_type, subject = subject_of(event)
    # The partition key: the day the stream stored the trigger, the same on every redelivery.
    ledger_day = day_of(source.timestamp_ns)
    if candidates and _subject_refused(registry, unit, tenant, subject_type, subject):
        return unit
    matched = False
    for entry in candidates:
        split, shadowed, execution_id = entry.split, False, None
        if split is not None:  # under rollout: the execution's id decides its version (and its shadow)
            execution_id = execution_id_for(tenant, entry.workflow_id, event["event_id"])
            entry, shadowed = split.choose(execution_id)
        if entry.subject_type != subject_type:
            continue
        if entry.program is None:
            unit.dead_letter("invalid_definition", entry.error, tenant=tenant, workflow_id=entry.workflow_id)
            continue
        try:
            if not entry.program.matches(event, subject):
                continue
            matched = True
            if execution_id is None:
                execution_id = execution_id_for(tenant, entry.workflow_id, event["event_id"])
            build = entry.build  # None but on an engine rollout's candidate: the worker's own build
            state = (ExecutionState if build is None else build.ExecutionState)(
                execution_id, subject=subject, event=event, tenant=tenant
            )
            record = ExecutionRecord(
                execution_id,
                tenant,
                entry.workflow_id,
                entry.version,
                str(subject["id"]),
                event["event_id"],
                partition_of(execution_id, topology.partitions),
                now,
                0,
                state,
                event_json=source.data.decode() if keep_raw else None,
                subject_type=subject_type,
                ledger_day=ledger_day,
                engine=entry.engine,
                trigger_stored=stored_position(source, topology) if entry.waits_for_events else None,
            )
            started = time.perf_counter()
            if build is None:
                transitions = advance(entry.program, state, "start", None, now_ms)
            else:
                transitions = crash_safe_start(entry, record, now_ms)
                state = record.state  # a fresh one if the engine crashed: none of its effects is carried out
            metrics.advance_timings.add(time.perf_counter() - started)
        except Exception as exc:  # a definition the dispatcher cannot run: poison, not fatal
            # The letter names the execution it would have enrolled, so a rollback can list it.
            raised_on = execution_id or execution_id_for(tenant, entry.workflow_id, event["event_id"])
            log.exception(
                "dispatch failed for %s/%s",
                tenant,
                entry.workflow_id,
                extra=logs.execution(
                    raised_on, tenant, workflow_id=entry.workflow_id, **logs.failure("dispatch_error", exc)
                ),
            )
            unit.dead_letter(
                "dispatch_error",
                f"{type(exc).__name__}: {exc}",
                tenant=tenant,
                workflow_id=entry.workflow_id,
                execution_id=raised_on,
            )
            unit.dispatch_failures.append(
                DispatchFailure(raised_on, tenant, entry.workflow_id, entry.version, entry.engine, now, enrolling=True)
            )
            continue
        effects = take_effects(state)
        unit.changes.append(record.change(transitions, now, effects, max_context_bytes=max_context_bytes))
        if split is not None:
            metrics.rollout_started(entry.tenant, entry.workflow_id, entry.rollout_label).inc()
            if shadowed:
                split.shadow_results.add(
                    dual_run(
                        split.rollout_id,
                        split.shadow_program,
                        execution_id,
                        event,
                        transitions,
                        state.status,
                        now_ms,
                        split.candidate.build,
                    )
                )
    if not matched and not unit.dead_letters:
        metrics.triggers_unmatched.inc()
    return unit


def _subject_refused(registry, unit: Unit, tenant: str, subject_type: str, subject: dict) -> bool:
    """Dead-letter the trigger when its subject's type is not registered or the subject fails its schema."""
    context_type = registry.context_types.get(subject_type)
    if context_type is None:
        registered = ", ".join(sorted(registry.context_types)) or "none"
        unit.dead_letter(
            "unknown_subject_type",
            f"subject type {subject_type!r} is not a registered context type (registered: {registered})",
            tenant=tenant,
        )
        return True
    problem = context_type.problem(subject)
    if problem is not None:
        unit.dead_letter(
            "invalid_subject", f"{subject_type} {subject.get('id')!r} fails its schema: {problem}", tenant=tenant
        )
        return True
    return False
