"""Trigger events in: new executions out, and events for executions that wait.

A trigger event enrols its contact into every deployed workflow of the tenant
whose trigger matches. The new execution's id is derived from (tenant,
workflow, event id) and its first steps run right here, with no hop through
JetStream: nothing else can address an execution before its first commit,
and a duplicate delivery of the trigger loses on the ledger's primary key.

The same event may be what running executions wait for (`wait_for_event`):
those are looked up for a whole fetched batch in one query and the event is
published onto each waiting execution's subject, where it is ordered with
the execution's other messages.

A trigger whose `data` alone is larger than `max_context_bytes` enrols no one:
it is dead-lettered as `context_too_large` (every execution it started would
carry it and fail).
"""

import logging
import time
from datetime import datetime

import orjson

from hotpath import ExecutionState, advance
from hotpath.envelope import BadMessage, decode_trigger
from ledger.batcher import Unit
from ledger.executions import ExecutionRecord, take_effects

from . import logs, metrics
from .config import Config
from .topology import Topology, execution_id_for, partition_of

log = logging.getLogger("ordo.enrolment")

_WAITING_FOR = """
SELECT w.execution_id::text, k.i
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS k(tenant, contact_id, event_type, i)
JOIN ordo.event_waits w USING (tenant, contact_id, event_type)
"""


def decode(delivery, max_bytes: int) -> tuple[dict | None, Unit | None]:
    """The trigger event, or a unit that dead-letters the message."""
    try:
        return decode_trigger(delivery.data, max_bytes), None
    except BadMessage as exc:
        unit = Unit(delivery)
        unit.dead_letter(exc.reason, str(exc))
        return None, unit


async def waiting_for(conn, events: list[dict]) -> list[tuple[str, dict]]:
    """(execution id, event) for every execution waiting for one of these events."""
    if not events:
        return []
    columns = ([e["tenant"] for e in events], [str(e["contact"]["id"]) for e in events],
               [e["type"] for e in events], list(range(len(events))))
    return [(execution_id, events[i]) for execution_id, i in await conn.fetch(_WAITING_FOR, *columns)]


def event_message(execution_id: str, event: dict) -> tuple[bytes, str]:
    """The exec-subject message that hands `event` to a waiting execution, and its msg id."""
    body = {"v": 1, "kind": "event", "execution_id": execution_id, "event": event}
    return orjson.dumps(body), f"event:{event['event_id']}:{execution_id}"


def enrol(registry, topology: Topology, delivery, event: dict, now: datetime, now_ms: int,
          max_context_bytes: int = Config.max_context_bytes) -> Unit:
    """A new execution per matching workflow, each run until it suspends or ends."""
    unit = Unit(delivery)
    tenant = event["tenant"]
    if not registry.knows_tenant(tenant):
        unit.dead_letter("unknown_tenant", f"tenant {tenant!r} is not known to this engine", tenant=tenant)
        return unit
    candidates = registry.candidates(tenant, event["type"])
    # Only a body larger than the limit can hold data larger than it: measure just those.
    if candidates and max_context_bytes and len(delivery.data) > max_context_bytes:
        size = len(orjson.dumps(event.get("data")))
        if size > max_context_bytes:
            unit.dead_letter("context_too_large", f"trigger data is {size} bytes, over the limit of "
                             f"{max_context_bytes} (max_context_bytes)", tenant=tenant)
            return unit
    matched = False
    for entry in candidates:
        if entry.program is None:
            unit.dead_letter("invalid_definition", entry.error, tenant=tenant, workflow_id=entry.workflow_id)
            continue
        try:
            if not entry.program.matches(event):
                continue
            matched = True
            execution_id = execution_id_for(tenant, entry.workflow_id, event["event_id"])
            state = ExecutionState(execution_id, contact=event["contact"], event=event, tenant=tenant)
            record = ExecutionRecord(
                execution_id, tenant, entry.workflow_id, entry.version, str(event["contact"]["id"]),
                event["event_id"], partition_of(execution_id, topology.partitions), now, 0, state,
                event_json=delivery.data.decode(),
            )
            started = time.perf_counter()
            transitions = advance(entry.program, state, "start", None, now_ms)
            metrics.advance_seconds.observe(time.perf_counter() - started)
        except Exception as exc:  # a definition the dispatcher cannot run: poison, not fatal
            log.exception("dispatch failed for %s/%s", tenant, entry.workflow_id,
                          extra=logs.execution(execution_id_for(tenant, entry.workflow_id, event["event_id"]),
                                               tenant, workflow_id=entry.workflow_id,
                                               **logs.failure("dispatch_error", exc)))
            unit.dead_letter("dispatch_error", f"{type(exc).__name__}: {exc}", tenant=tenant,
                             workflow_id=entry.workflow_id)
            continue
        effects = take_effects(state)
        unit.changes.append(record.change(transitions, now, effects, max_context_bytes=max_context_bytes))
    if not matched and not unit.dead_letters:
        metrics.triggers_unmatched.inc()
    return unit
