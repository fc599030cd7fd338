"""Executions as the worker holds them: static facts plus the dispatcher's state.

`ExecutionRecord.change()` turns the dispatcher's output into the rows the
batcher commits; `load()` reads records back for the messages of a round.
"""

from datetime import datetime

import asyncpg
import orjson

from hotpath import ExecutionState

from .batcher import ExecutionChange

CLOSED = frozenset(("completed", "failed", "cancelled"))


def _json(value) -> str:
    return orjson.dumps(value).decode()


class ExecutionRecord:
    """An execution's identity (fixed at enrolment) and its current state."""

    __slots__ = (
        "execution_id", "tenant", "workflow_id", "workflow_version", "contact_id", "event_id",
        "partition", "created_at", "last_stream_seq", "loaded_seq", "state", "event_json",
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
        self.state = state
        self.event_json = event_json

    def change(self, transitions: list, now: datetime) -> ExecutionChange:
        state = self.state
        eid = self.execution_id
        is_new = self.loaded_seq == 0
        row = (
            eid, self.tenant, self.workflow_id, self.workflow_version, self.contact_id, self.event_id,
            self.partition, state.status, state.seq, state.pc, state.steps, state.waiting,
            self.last_stream_seq, _json(state.context),
            _json(state.contact) if is_new else "{}",
            (self.event_json or _json(state.event)) if is_new else "{}",
            self.created_at,
        )
        rows = [
            (eid, seq, step_id, kind, now, None if detail is None else _json(detail))
            for seq, step_id, kind, detail in transitions
        ]
        return ExecutionChange(eid, self.partition, row, rows, self.loaded_seq, state.status in CLOSED)


_LOAD = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, contact_id, event_id, partition,
       status, seq, pc, steps, waiting, last_stream_seq, context, contact, event, created_at
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
        records[r["execution_id"]] = ExecutionRecord(
            r["execution_id"], r["tenant"], r["workflow_id"], r["workflow_version"], r["contact_id"],
            r["event_id"], r["partition"], r["created_at"], r["last_stream_seq"], state,
        )
    return records
