"""Executions as the worker holds them: static facts plus the dispatcher's state.

`ExecutionRecord.change()` turns the dispatcher's output into the rows the
batcher commits; `load()` reads records back for the messages of a round.

`change()` is also where the context is serialised for the ledger, so that is
where `max_context_bytes` is enforced at no extra cost: an advance that grows
the context past the limit fails the execution instead (see `_too_large`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
from asyncpg import Record

from hotpath import ExecutionState
from hotpath.envelope import is_stored_position, subject_of
from hotpath.vocabulary import STARTED, Effect, Transition
from ledger.connection import Queryable

from .batcher import DeadLetter, ExecutionChange
from .partitioning import day_at, days_per_real_day, may_be_enrolled_the_day_before

if TYPE_CHECKING:
    from hotpath import _dispatcher, dispatcher

    #: An execution's state: the compiled class or its pure twin, whichever hotpath selected
    #: (`hotpath.ExecutionState` is that choice, made at import, so the checker sees Any).
    State: TypeAlias = _dispatcher.ExecutionState | dispatcher.ExecutionState

CLOSED = frozenset(("completed", "failed", "cancelled"))

#: Dispatcher state persisted in executions.runtime (jsonb), with the value a new ExecutionState has.
RUNTIME_DEFAULTS: dict[str, object] = {"attempt": 0, "timer": None, "visits": {}, "failures": []}
RUNTIME_FIELDS = tuple(RUNTIME_DEFAULTS)
#: The runtime key of the ids of the last events routed to an execution that it took (ExecutionRecord.has_taken).
RECEIVED = "received"
#: The runtime key of where the stream stored its trigger (ExecutionRecord.enrolled_after).
TRIGGER_STORED = "trigger_stored"
#: How many of them are kept: a copy routed again comes within the span a lane takes again after a
#: restart, a few seconds of its events, so what an execution took meanwhile is far fewer.
RECEIVED_KEPT = 16
#: Effects the worker carries out after the commit; the others are ledger rows.
AFTER_COMMIT = frozenset(("action", "emit"))
#: Transitions that write into the context (the step that grew it is the last of these).
_WRITES_CONTEXT = frozenset(("set", "action_completed", "signal", "event_received"))


#: One ordo.history row, in HISTORY_COLUMNS order: execution_id, first_seq, at, source_seq, steps (JSON text),
#: ledger_day (its execution's partition key).
HistoryRow: TypeAlias = tuple[str, int, datetime, int | None, str, date]


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _steps(transitions: Sequence[Transition]) -> list[tuple[Any, ...]]:
    """The steps of a history row: [step_id, kind], or [step_id, kind, detail] when there is a detail."""
    return [(step_id, kind) if detail is None else (step_id, kind, detail) for _, step_id, kind, detail in transitions]


def history_rows(
    execution_id: str, transitions: Sequence[Transition], at: datetime, source_seq: int | None, ledger_day: date
) -> list[HistoryRow]:
    """One commit's transitions of an execution, (seq, step_id, kind, detail) each, as one ordo.history row.

    They are consecutive seqs, so the row keeps the first and the steps in
    order: [step_id, kind], or [step_id, kind, detail] when there is a detail.
    """
    if not transitions:
        return []
    first, last = transitions[0][0], transitions[-1][0]
    if last - first + 1 != len(transitions):
        raise ValueError(
            f"transitions of {execution_id} are not consecutive: seqs {first} to {last}, {len(transitions)}"
        )
    return [(execution_id, first, at, source_seq, _json(_steps(transitions)), ledger_day)]


def enrolment_steps(transitions: Sequence[Transition], workflow_id: str, version: int) -> str | None:
    """The `enrolment_steps` of an execution that ends in the commit that enrols it (migration 016):
    its transitions, seqs 1..n, in history's encoding, the first `started` written ["", "started"]
    when its detail names the row's own workflow and version (as the view reads it back).

    None when they do not start at seq 1 with a `started`, or it has no detail (that would read
    back with one): they go to ordo.history.
    """
    if not transitions or transitions[0][0] != 1 or transitions[0][2] != STARTED or transitions[0][3] is None:
        return None
    steps = _steps(transitions)
    if transitions[0][3] == {"workflow_id": workflow_id, "version": version}:
        steps[0] = (transitions[0][1], STARTED)
    return _json(steps)


class ExecutionRecord:
    """An execution's identity (fixed at enrolment) and its current state."""

    __slots__ = (
        "execution_id",
        "tenant",
        "workflow_id",
        "workflow_version",
        "subject_type",
        "subject_id",
        "event_id",
        "partition",
        "created_at",
        "ledger_day",
        "last_stream_seq",
        "loaded_seq",
        "loaded_timer",
        "loaded_context",
        "state",
        "event_json",
        "engine",
        "deployment",
        "received",
        "trigger_stored",
    )

    def __init__(
        self,
        execution_id: str,
        tenant: str,
        workflow_id: str,
        workflow_version: int,
        subject_id: str,
        event_id: str,
        partition: int,
        created_at: datetime,
        last_stream_seq: int,
        state: State,
        event_json: str | None = None,
        loaded_context: str = "{}",
        subject_type: str = "contact",
        ledger_day: date | None = None,
        engine: str | None = None,
        deployment: str | None = None,
        received: list[str] | None = None,
        trigger_stored: list[Any] | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.tenant = tenant
        self.workflow_id = workflow_id
        self.workflow_version = workflow_version
        #: The subject it is about: its context type and id (event waits are keyed on both).
        self.subject_type = subject_type
        self.subject_id = subject_id
        self.event_id = event_id
        self.partition = partition
        self.created_at = created_at
        #: Its partition key (ledger/partitions.py): set at enrolment from the trigger, read back with the
        #: row, and said by every update, so that Postgres reads one partition. None: the UTC day of created_at.
        self.ledger_day = ledger_day or day_at(created_at or datetime.now(UTC))
        self.last_stream_seq = last_stream_seq
        #: The seq as stored; an update commits only if the ledger still has it.
        self.loaded_seq = state.seq
        #: The timer as stored (to know when the ledger's row must go).
        self.loaded_timer = state.timer
        #: The context as stored (JSON text): what a too-large context leaves in place.
        self.loaded_context = loaded_context
        self.state = state
        self.event_json = event_json
        #: The engine it was enrolled on under an engine rollout (daemon/engines.py); None: the worker's own.
        self.engine = engine
        #: The deployment whose row this is (migration 021): a worker applies nothing to another's
        #: (daemon/advance.py). None: this worker's own (it enrols it now), or a row of before 021.
        self.deployment = deployment
        #: The ids of the last RECEIVED_KEPT events routed to it that it took, oldest first (`took_event`).
        self.received = received or []
        #: Where the triggers stream stored the event that enrolled it, [stream, token, seq, ns], kept until it
        #: completes when its workflow waits for events (`enrolled_after`); None: not kept.
        self.trigger_stored = trigger_stored

    def enrolled_after(self, stored: list[Any] | None) -> bool:
        """An event stored there (a routed event's [stream, token, seq, ns]) came before the trigger that
        enrolled it, in the same lane.

        Such an event was routed only because its trigger was taken again (the
        span after a lane's last recorded floor, when nats-server and the worker
        restart together): the first time, this execution did not exist yet,
        and it must not take the event now. Both the sequence and the time must
        say so: a stream created again starts its sequences again, and a
        server's clock may step back. Only one lane's order counts, and only
        through one tenant token: another stream (a lane moved by
        trigger_streams) or another token (maybe another lane: an event whose
        tenant is not its subject's) compares nothing.
        """
        mine = self.trigger_stored
        if stored is None or mine is None or stored[:2] != mine[:2]:
            return False
        return bool(stored[2] < mine[2] and stored[3] < mine[3])

    def has_taken(self, event_id: str) -> bool:
        """The event with this id enrolled it, or is one of the last events routed to it that it took.

        A trigger event taken from its lane again (a redelivery after a worker or
        server restart, a publisher's retry) is routed again to an execution that
        waits for its type once more; JetStream drops the copy only within the
        execution stream's duplicate window (120 s), so the execution must.
        """
        return event_id == self.event_id or event_id in self.received

    def took_event(self, event_id: str) -> None:
        """A routed event advanced it: kept (with its runtime) so that a copy routed again is not taken."""
        self.received = [*self.received[-(RECEIVED_KEPT - 1) :], event_id]

    def change(
        self,
        transitions: Sequence[Transition],
        now: datetime,
        effects: Iterable[Effect] = (),
        source_seq: int | None = None,
        max_context_bytes: int = 0,
    ) -> ExecutionChange:
        """The rows this advance commits, and the ledger effects it carries.

        With `max_context_bytes` set, a context whose JSON is larger fails the
        execution instead (`_too_large`).
        """
        state = self.state
        context = _json(state.context)
        if max_context_bytes and len(context) > max_context_bytes:
            return self._too_large(transitions, now, source_seq, context, max_context_bytes)
        change = self._change(context, transitions, now, source_seq)
        for kind, data in effects:
            if kind == "set_timer":
                fire_at = datetime.fromtimestamp(data["fire_at_ms"] / 1000.0, tz=UTC)
                change.timer = (data["timer_id"], fire_at, data["purpose"], data["step_id"])
            elif kind == "wait_event":
                change.wait = (self.tenant, self.subject_type, self.subject_id, data["event_type"], data["step_id"])
                change.drop_wait = False
            elif kind == "clear_wait":
                change.wait, change.drop_wait = None, True
            elif kind == "dead_letter":
                change.letters.append(self._step_letter(data))
            elif kind == "limit_release":
                change.limit_release, change.limit_wait = True, None
            elif kind == "limit_wait":
                change.limit_wait = (
                    data["bucket"],
                    data["step_id"],
                    data["attempt"],
                    data["action"],
                    data["rate_per_s"],
                    data["concurrency"],
                    data["lease_ms"],
                )
                change.after_commit.append((kind, data))  # counted by the worker (daemon/effects.py)
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
        if self.loaded_timer is not None and state.timer != self.loaded_timer:
            change.replaced_timer = self.loaded_timer
        return change

    def committed(self, change: ExecutionChange) -> None:
        """`change` (computed on this record) has committed: the record now stands for the stored row.

        A worker may keep it and advance it again without reading the row back.
        """
        self.loaded_seq = self.state.seq
        self.loaded_timer = self.state.timer
        self.loaded_context = change.context_json

    def _change(
        self, context: str, transitions: Sequence[Transition], now: datetime, source_seq: int | None
    ) -> ExecutionChange:
        state = self.state
        is_new = self.loaded_seq == 0
        rows = history_rows(self.execution_id, transitions, now, source_seq, self.ledger_day)
        # Ended in the commit that enrols it: its transitions go into its row (migration 016), read
        # back at created_at with no source_seq, so only when they are that.
        in_row = (
            enrolment_steps(transitions, self.workflow_id, self.workflow_version)
            if is_new and state.status in CLOSED and source_seq is None and now == self.created_at
            else None
        )
        row = (
            self.execution_id,
            self.tenant,
            self.workflow_id,
            self.workflow_version,
            self.subject_type,
            self.subject_id,
            self.event_id,
            self.partition,
            state.status,
            state.seq,
            state.pc,
            state.steps,
            state.waiting,
            self.last_stream_seq,
            context,
            stored_subject(state) if is_new else None,
            stored_event(state.event, self.tenant, self.event_id, self.event_json) if is_new else "{}",
            self.created_at,
            _json(self._runtime()),
            self.ledger_day,
            in_row,
        )
        change = ExecutionChange(
            self.execution_id, self.partition, row, rows, self.loaded_seq, state.status in CLOSED, record=self
        )
        change.transitions = len(transitions)
        change.history_in_row = in_row is not None
        if is_new:
            event = state.event
            ts = event.get("ts") if isinstance(event, dict) else None
            change.check_day_before = may_be_enrolled_the_day_before(self.ledger_day, ts)
            change.engine = self.engine
        if change.finished:
            ts = state.event.get("ts") if isinstance(state.event, dict) else None
            change.trigger_ts_ms = ts if isinstance(ts, (int, float)) else None
        return change

    def _runtime(self) -> dict[str, Any]:
        """What the `runtime` column holds: the dispatcher's state (`runtime_of`), and what tells the
        events it must not take, kept as long as that is (a failed execution may be retried)."""
        runtime = runtime_of(self.state)
        if self.state.status != "completed":
            if self.received:
                runtime[RECEIVED] = self.received
            if self.trigger_stored is not None:
                runtime[TRIGGER_STORED] = self.trigger_stored
        return runtime

    def _too_large(
        self, transitions: Sequence[Transition], now: datetime, source_seq: int | None, context: str, limit: int
    ) -> ExecutionChange:
        """The advance grew the context past `limit`: fail the execution, keep the last stored context.

        The advance's transitions are recorded (they carry its inputs, so
        nothing is lost and replay sees what happened) up to an end it may have
        reached, which the failure replaces; its effects (action requests,
        emits, timers, waits, a step's dead letter) are dropped, and the
        too-large context goes into a `context_too_large` dead letter. Taking
        a failure branch would mean running the dispatcher again after the
        fact, so the execution simply fails.
        """
        state = self.state
        kept = [t for t in transitions if t[2] not in CLOSED]
        largest = max(state.context.items(), key=lambda item: len(_json(item[1])), default=(None, None))
        writers = list(dict.fromkeys(t[1] for t in kept if t[2] in _WRITES_CONTEXT and t[1]))
        # Sizes are not measured per step (that would cost every step): the step that
        # grew it is the one whose output is the largest entry, else the first writer.
        grown_by = largest[0] if largest[0] in writers else (writers[0] if writers else "")
        error = (
            f"context is {len(context)} bytes, over the limit of {limit} (max_context_bytes), after step {grown_by!r}"
        )
        if len(writers) > 1:
            error += f" (steps that wrote to it: {', '.join(map(repr, writers))})"
        if largest[0] is not None:
            error += f"; its largest entry is {largest[0]!r} ({len(_json(largest[1]))} bytes)"
        seq = (kept[-1][0] if kept else self.loaded_seq) + 1
        kept.append((seq, grown_by, "failed", {"error": error, "code": "context_too_large"}))
        state.seq = seq
        state.status = "failed"
        state.waiting = None
        state.timer = None
        state.context = orjson.loads(self.loaded_context)
        change = self._change(self.loaded_context, kept, now, source_seq)
        change.drop_timer = self.loaded_timer is not None
        change.replaced_timer = self.loaded_timer
        change.drop_wait = True
        change.limit_release = True  # it ended: a queue row, an action's slot or its start slot go back
        change.letters.append(
            DeadLetter(
                reason="context_too_large",
                error=error,
                subject="",
                stream="",
                stream_seq=seq,
                payload=context.encode(),
                tenant=self.tenant,
                workflow_id=self.workflow_id,
                execution_id=self.execution_id,
                step_id=grown_by or None,
            )
        )
        return change

    def _step_letter(self, data: dict[str, Any]) -> DeadLetter:
        error = data.get("error") or {}
        return DeadLetter(
            reason=data.get("reason", "step_failed"),
            error=f"step {data.get('step_id')!r} failed: {error.get('code', '')}: {error.get('message', '')}",
            subject="",
            stream="",
            stream_seq=self.state.seq,
            payload=_json(data).encode(),
            tenant=self.tenant,
            workflow_id=self.workflow_id,
            execution_id=self.execution_id,
            step_id=data.get("step_id"),
            attempts=_json(data.get("attempts") or []),
        )


def take_effects(state: State) -> list[Effect] | tuple[()]:
    """The effects the dispatcher left on the state, removed from it (an empty tuple, not a new list, for none)."""
    effects = state.effects
    if not effects:
        return ()
    taken = list(effects)
    effects.clear()
    return taken


def runtime_of(state: State) -> dict[str, Any]:
    """The dispatcher's state to persist, without the fields at their defaults (0, None, {}, []).

    Every execution row carries it, so a W1 execution's row is shorter (WAL and
    table alike); `restore_runtime` leaves a missing field at the default a new
    ExecutionState has. A completed execution keeps none: no step of it runs
    again (a failed one may, resumed from its dead letter, and keeps its visits,
    attempts and failures), and its history says what each step did.
    """
    if state.status == "completed":
        return {}
    return {name: value for name in RUNTIME_FIELDS if (value := getattr(state, name))}


def stored_subject(state: State) -> str | None:
    """What the `subject` column holds for a new execution: NULL when the subject is the one its
    trigger event names (`subject_of`, as enrolment took it), which a load derives again; its JSON
    otherwise. Every execution a trigger enrolled is the first kind: its row stops repeating the
    contact its event carries (~70 bytes of a W1 row, and of its WAL)."""
    event = state.event
    try:
        derived = subject_of(event)[1]
    except (KeyError, TypeError, AttributeError):
        return _json(state.subject)
    return None if derived is state.subject or derived == state.subject else _json(state.subject)


def stored_event(event: Any, tenant: str, event_id: str, as_received: str | None = None) -> str:
    """What the `event` column holds for a new execution: its trigger event less `tenant` and
    `event_id` where they are the row's own columns' values (~47 bytes of a W1 row, and of its WAL;
    migration 016), which a read puts back (`event_from`). `as_received`: the event's JSON as it
    came, kept as is when there is nothing to leave out."""
    if type(event) is not dict or (event.get("tenant") != tenant and event.get("event_id") != event_id):
        return as_received or _json(event)
    return _json({key: value for key, value in event.items() if not _in_columns(key, value, tenant, event_id)})


def _in_columns(key: str, value: object, tenant: str, event_id: str) -> bool:
    return (key == "tenant" and value == tenant) or (key == "event_id" and value == event_id)


def event_from(stored: str, tenant: str, event_id: str) -> Any:
    """An execution's trigger event from its row: the `event` column with what `stored_event` left out put back."""
    event = orjson.loads(stored)
    if type(event) is dict:
        event.setdefault("tenant", tenant)
        event.setdefault("event_id", event_id)
    return event


def subject_from(stored: str | None, event: dict[str, Any]) -> dict[str, Any]:
    """An execution's subject from its row: the `subject` column, or when that is NULL its event's (stored_subject)."""
    if stored is None:
        return subject_of(event)[1]
    subject: dict[str, Any] = orjson.loads(stored)
    return subject


def restore_runtime(state: State, runtime: dict[str, Any]) -> None:
    for name in RUNTIME_FIELDS:
        if name in runtime:
            setattr(state, name, runtime[name])


_LOAD = """
SELECT execution_id::text, tenant, workflow_id, workflow_version, subject_type, subject_id, event_id, partition,
       status, seq, pc, steps, waiting, last_stream_seq, context, subject, event, created_at, runtime, ledger_day,
       engine, deployment
FROM ordo.executions WHERE execution_id = ANY($1::uuid[]) AND ledger_day >= $2
"""


def _recent_days() -> timedelta:
    """A message names its execution by id alone, and each day partition has its own primary key to
    probe: a load looks in the days since yesterday first (most executions a message is for are
    that young, and retention carries older open ones forward into today), then everywhere.
    Where ledger days are short (`ledger_day`), "since yesterday" is a real day's worth of them."""
    return timedelta(days=days_per_real_day())


class UnreadableRecord:
    """A stored execution that cannot be turned back into a state (a hand edit, a corrupt row)."""

    __slots__ = ("execution_id", "error")

    def __init__(self, execution_id: str, error: str) -> None:
        self.execution_id = execution_id
        self.error = error


#: An execution id as the ledger writes it; anything else cannot name an execution.
_EXECUTION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def load(conn: Queryable, execution_ids: Iterable[str | None]) -> dict[str, ExecutionRecord | UnreadableRecord]:
    """The committed records of these executions (missing ids are absent).

    Ids that are not execution ids are absent too (a message may carry any
    string), and a row that cannot be read is an `UnreadableRecord`: one bad
    id or row must not fail the whole round's read.
    """
    records: dict[str, ExecutionRecord | UnreadableRecord] = {}
    wanted = [eid for eid in execution_ids if isinstance(eid, str) and _EXECUTION_ID.match(eid)]
    if not wanted:
        return records
    rows = await conn.fetch(_LOAD, wanted, day_at(datetime.now(UTC)) - _recent_days())
    if len(rows) < len(wanted):
        found = {r["execution_id"] for r in rows}
        rows += await conn.fetch(_LOAD, [eid for eid in wanted if eid not in found], date.min)
    for r in rows:
        try:
            records[r["execution_id"]] = _record(r)
        except (ValueError, TypeError, AttributeError) as exc:
            records[r["execution_id"]] = UnreadableRecord(r["execution_id"], f"{type(exc).__name__}: {exc}")
    return records


def _record(r: Record) -> ExecutionRecord:
    event = event_from(r["event"], r["tenant"], r["event_id"])
    state: State = ExecutionState(
        r["execution_id"],
        status=r["status"],
        pc=r["pc"],
        seq=r["seq"],
        context=orjson.loads(r["context"]),
        subject=subject_from(r["subject"], event),
        event=event,
        steps=r["steps"],
        waiting=r["waiting"],
    )
    runtime = orjson.loads(r["runtime"])
    if type(runtime) is not dict:
        raise TypeError(f"runtime is a JSON {type(runtime).__name__}, an object is required")
    restore_runtime(state, runtime)
    state.tenant = r["tenant"]
    received = runtime.get(RECEIVED, [])
    if type(received) is not list or not all(type(event_id) is str for event_id in received):
        raise TypeError(f"runtime's {RECEIVED!r} is not a list of event ids")
    trigger_stored = runtime.get(TRIGGER_STORED)
    if trigger_stored is not None and not is_stored_position(trigger_stored):
        raise TypeError(f"runtime's {TRIGGER_STORED!r} is not [stream, token, seq, ns]")
    return ExecutionRecord(
        r["execution_id"],
        r["tenant"],
        r["workflow_id"],
        r["workflow_version"],
        r["subject_id"],
        r["event_id"],
        r["partition"],
        r["created_at"],
        r["last_stream_seq"],
        state,
        loaded_context=r["context"],
        subject_type=r["subject_type"],
        ledger_day=r["ledger_day"],
        engine=r["engine"],
        deployment=r["deployment"],
        received=received,
        trigger_stored=trigger_stored,
    )


# -- whose execution it is -----------------------------------------------------------------------

#: SQL: the deployment that enrolled the execution row `e` (migration 021). A row written before
#: that names none: it is the ledger's deployment if the ledger has only one, as migration 013
#: settled the timers and waits of before, and NULL where several share it (no one can tell whose
#: it was). ledger/dead_letters.py tells a failed step's letter by it too.
DEPLOYMENT_OF_ROW = """coalesce(e.deployment, (SELECT min(p.deployment) FROM ordo.partitions p WHERE p.deployment <> ''
                                      HAVING count(DISTINCT p.deployment) = 1))"""

_DEPLOYMENT = f"SELECT {DEPLOYMENT_OF_ROW} AS deployment FROM ordo.executions e WHERE e.execution_id = $1::uuid"


async def deployment_of(conn: Queryable, execution_id: str) -> tuple[bool, str | None]:
    """(whether the execution exists, the deployment it belongs to: None when that cannot be told)."""
    if not _EXECUTION_ID.match(execution_id):
        return False, None
    row = await conn.fetchrow(_DEPLOYMENT, execution_id)
    return (False, None) if row is None else (True, row["deployment"])
