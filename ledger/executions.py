"""Executions as the worker holds them: static facts plus the dispatcher's state.

`ExecutionRecord.change()` turns the dispatcher's output into the rows the
batcher commits; `load()` reads records back for the messages of a round.
"""

from datetime import datetime, timezone

import asyncpg
import orjson

from hotpath import ExecutionState

from .batcher import DeadLetter, ExecutionChange

CLOSED = frozenset(("completed", "failed", "cancelled"))

#: Dispatcher state persisted in executions.runtime (jsonb).
RUNTIME_FIELDS = ("attempt", "timer", "visits", "failures")
#: Effects the worker carries out after the commit; the others are ledger rows.
AFTER_COMMIT = frozenset(("action", "emit"))


def _json(value) -> str:
    return orjson.dumps(value).decode()


class ExecutionRecord:
    """An execution's identity (fixed at enrolment) and its current state."""

    __slots__ = (
        "execution_id", "tenant", "workflow_id", "workflow_version", "contact_id", "event_id",
        "partition", "created_at", "last_stream_seq", "loaded_seq", "loaded_timer", "state", "event_json",
    )

    def __init__(self, execution_id, tenant, workflow_id, workflow_version, contact_id, event_id,
                 partition, created_at, last_stream_seq, state, event_json=None):
        self.execution_id = execution_id
        self.tenant = tenant
        self.workflow_id = workflow_id
        self.workflow_version = workflow_version
        self.contact_id = contact_id
        self.event_id = event_id
        self.partition = partition
        self.created_at = created_at
        self.last_stream_seq = last_stream_seq
        #: The seq as stored; an update commits only if the ledger still has it.
        self.loaded_seq = state.seq
        #: The timer as stored (to know when the ledger's row must go).
        self.loaded_timer = state.timer
        self.state = state
        self.event_json = event_json

    def change(self, transitions: list, now: datetime, effects=(), source_seq: int | None = None) -> ExecutionChange:
        """The rows this advance commits, and the ledger effects it carries."""
        state = self.state
        eid = self.execution_id
        is_new = self.loaded_seq == 0
        row = (
            eid, self.tenant, self.workflow_id, self.workflow_version, self.contact_id, self.event_id,
            self.partition, state.status, state.seq, state.pc, state.steps, state.waiting,
            self.last_stream_seq, _json(state.context),
            _json(state.contact) if is_new else "{}",
            (self.event_json or _json(state.event)) if is_new else "{}",
            self.created_at, _json(runtime_of(state)),
        )
        rows = [
            (eid, seq, step_id, kind, now, None if detail is None else _json(detail), source_seq)
            for seq, step_id, kind, detail in transitions
        ]
        change = ExecutionChange(eid, self.partition, row, rows, self.loaded_seq, state.status in CLOSED)
        if change.finished:
            ts = state.event.get("ts") if isinstance(state.event, dict) else None
            change.trigger_ts_ms = ts if isinstance(ts, (int, float)) else None
        for kind, data in effects:
            if kind == "set_timer":
                fire_at = datetime.fromtimestamp(data["fire_at_ms"] / 1000.0, tz=timezone.utc)
                change.timer = (data["timer_id"], fire_at, data["purpose"], data["step_id"])
            elif kind == "wait_event":
                change.wait = (self.tenant, self.contact_id, data["event_type"], data["step_id"])
                change.drop_wait = False
            elif kind == "clear_wait":
                change.wait, change.drop_wait = None, True
            elif kind == "dead_letter":
                change.letters.append(self._step_letter(data))
            elif kind in AFTER_COMMIT:
                if kind == "action":
                    # Attempts restart at 1 after an operator retry; the seq of
                    # this commit tells requests (and their results) apart.
                    data["request_seq"] = state.seq
                change.after_commit.append((kind, data))
        # One timer per execution: drop the stored one when the state has none
        # left (cleared, or it fired); a set_timer replaces it in place.
        if change.timer is None and self.loaded_timer is not None and state.timer is None:
            change.drop_timer = True
        return change

    def _step_letter(self, data: dict) -> DeadLetter:
        error = data.get("error") or {}
        return DeadLetter(
            reason=data.get("reason", "step_failed"),
            error=f"step {data.get('step_id')!r} failed: {error.get('code', '')}: {error.get('message', '')}",
            subject="", stream="", stream_seq=self.state.seq, payload=_json(data).encode(),
            tenant=self.tenant, workflow_id=self.workflow_id, execution_id=self.execution_id,
            step_id=data.get("step_id"), attempts=_json(data.get("attempts") or []),
        )


def take_effects(state) -> list:
    """The effects the dispatcher left on the state, removed from it."""
    effects = state.effects
    if not effects:
        return ()
    taken = list(effects)
    effects.clear()
    return taken


def runtime_of(state) -> dict:
    return {name: getattr(state, name) for name in RUNTIME_FIELDS}


def restore_runtime(state, runtime: dict) -> None:
    for name in RUNTIME_FIELDS:
        if name in runtime:
            setattr(state, name, runtime[name])


_LOAD = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, contact_id, event_id, partition,
       status, seq, pc, steps, waiting, last_stream_seq, context, contact, event, created_at, runtime
FROM ordo.executions WHERE execution_id = ANY($1::uuid[])
"""


async def load(conn: asyncpg.Connection, execution_ids: list[str]) -> dict:
    """The committed records of these executions (missing ids are absent)."""
    records = {}
    for r in await conn.fetch(_LOAD, execution_ids):
        state = ExecutionState(
            r["execution_id"],
            status=r["status"],
            pc=r["pc"],
            seq=r["seq"],
            context=orjson.loads(r["context"]),
            contact=orjson.loads(r["contact"]),
            event=orjson.loads(r["event"]),
            steps=r["steps"],
            waiting=r["waiting"],
        )
        restore_runtime(state, orjson.loads(r["runtime"]))
        state.tenant = r["tenant"]
        records[r["execution_id"]] = ExecutionRecord(
            r["execution_id"], r["tenant"], r["workflow_id"], r["workflow_version"], r["contact_id"],
            r["event_id"], r["partition"], r["created_at"], r["last_stream_seq"], state,
        )
    return records
