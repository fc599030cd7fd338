"""`ordo replay --import FILE`: judge a migration from another engine before the switch.

The other engine's executions are exported as JSON lines, one execution a line
(README, "Compare another engine's decisions"):

    {"execution": "legacy-42", "tenant": "acme", "workflow": "welcome",
     "trigger": {"event_id": "e-42", "type": "contact.created", "contact": {"id": "c-1", ...}, "data": {...}},
     "inputs": [{"kind": "action_result", "step": "send", "ok": true, "output": {...}},
                {"kind": "signal", "name": "approved", "data": {...}},
                {"kind": "event", "type": "email.opened", "event_id": "x", "data": {...}},
                {"kind": "timer"}, {"kind": "cancel", "reason": "..."}, {"kind": "retry"}],
     "decisions": [{"step": "greet", "kind": "set"}, {"step": "send", "kind": "action_requested"},
                   {"kind": "completed"}]}

The trigger starts a fresh execution of the workflow's Ordo definition (the
deployed version, `--version N`, or `--definition FILE`); the inputs are fed
to the dispatcher in order, as `ordo replay` feeds recorded ones (an input may
carry `at_ms`, the clock it arrived at; a timer input fires the timer the run
holds then; an action result without `attempt` answers the attempt in flight);
nothing is carried out. Ordo's decisions are its transitions less the ones
that only record an input (DECISIONS), and they are lined up with the line's
`decisions` one by one: a decision matches when its step and kind are equal
and every field of its `detail`, when the line gives one, equals Ordo's.

A line that is not such an execution (bad JSON, a field missing or of the
wrong type, an unknown input or decision kind) is reported with its number and
skipped; the rest are compared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from hotpath import ExecutionState, Program, advance
from hotpath.definition import validate
from hotpath.envelope import BadMessage, subject_of
from hotpath.vocabulary import (
    ACTION_REQUESTED,
    ACTION_RESULT,
    BRANCH,
    CANCEL,
    COMPLETED,
    EMITTED,
    EVENT,
    FAILED,
    GOTO,
    RETRY,
    SET,
    SIGNAL,
    STEP_FAILED,
    TIMER,
    WAITING,
)
from ledger import history, rollouts

from .replay import FirstDivergences, _about, _json, render_top

#: What Ordo decides, as opposed to what records an input it was given (started, signal,
#: action_completed, event_received, timer_fired, cancelled, ...): the transitions compared.
DECISIONS = frozenset((SET, BRANCH, GOTO, EMITTED, ACTION_REQUESTED, WAITING, STEP_FAILED, COMPLETED, FAILED))
INPUTS = (ACTION_RESULT, SIGNAL, EVENT, TIMER, CANCEL, RETRY)


class BadLine(ValueError):
    """A line that is not an exported execution; the message names what is wrong."""


@dataclass(slots=True)
class Imported:
    execution: str
    tenant: str
    workflow: str
    trigger: dict
    inputs: list[dict]
    decisions: list[dict]


@dataclass(slots=True)
class ImportedResult:
    line: int
    execution: str
    tenant: str
    workflow: str
    #: The version compared against; None for a definition from a file.
    version: int | None = None
    compared: int = 0
    #: The first decision where the two differ: {"index", "recorded", "ordo"} (None on a side that ended).
    first_divergence: dict | None = None
    #: Inputs the dispatcher refused: [{"input", "kind", "error"}].
    dispatch_errors: list = field(default_factory=list)
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.error is not None or self.dispatch_errors:
            return "error"
        return "identical" if self.first_divergence is None else "diverged"

    def to_dict(self) -> dict:
        return asdict(self) | {"outcome": self.outcome}


def _text(doc: dict, name: str, where: str = "") -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise BadLine(f"{where}{name!r} must be a non-empty string")
    return value


def parse_line(text: str | bytes) -> Imported:
    """One exported execution; BadLine says what is wrong with it."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadLine(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise BadLine(f"a line must be a JSON object, not {type(doc).__name__}")
    execution, tenant, workflow = (_text(doc, name) for name in ("execution", "tenant", "workflow"))
    trigger = doc.get("trigger")
    if type(trigger) is not dict:
        raise BadLine("'trigger' must be an object (the event that started the execution)")
    try:
        subject_of(trigger)
    except (KeyError, TypeError, BadMessage):
        raise BadLine("'trigger' names no subject: it needs a 'contact' object or a 'subject' with a type") from None
    inputs, decisions = doc.get("inputs", []), doc.get("decisions")
    if type(inputs) is not list:
        raise BadLine("'inputs' must be a list")
    if type(decisions) is not list:
        raise BadLine("'decisions' must be a list (what the other engine decided, in order)")
    for i, item in enumerate(inputs):
        if type(item) is not dict or item.get("kind") not in INPUTS:
            raise BadLine(f"input {i}: 'kind' must be one of {', '.join(INPUTS)}")
        if item["kind"] == ACTION_RESULT:
            _text(item, "step", f"input {i}: ")
            if type(item.get("ok")) is not bool:
                raise BadLine(f"input {i}: an action_result needs 'ok': true or false")
        elif item["kind"] == SIGNAL:
            _text(item, "name", f"input {i}: ")
        elif item["kind"] == EVENT:
            _text(item, "type", f"input {i}: ")
    for i, item in enumerate(decisions):
        if type(item) is not dict or item.get("kind") not in DECISIONS:
            raise BadLine(f"decision {i}: 'kind' must be one of {', '.join(sorted(DECISIONS))}")
        if type(item.get("step", "")) is not str or type(item.get("detail", {})) is not dict:
            raise BadLine(f"decision {i}: 'step' must be a string and 'detail' an object")
    return Imported(execution, tenant, workflow, trigger, inputs, decisions)


def _payload(item: dict, state) -> dict:
    """The dispatcher's payload for one imported input, on the state the run has reached."""
    kind = item["kind"]
    if kind == ACTION_RESULT:
        payload = {"step_id": item["step"], "attempt": item.get("attempt", state.attempt), "ok": item["ok"]}
        payload["output" if item["ok"] else "error"] = item.get("output" if item["ok"] else "error")
        return payload
    if kind == SIGNAL:
        return {"name": item["name"], "data": item.get("data")}
    if kind == EVENT:
        return {"v": 1, "event_id": item.get("event_id"), "type": item["type"], "data": item.get("data")}
    if kind == CANCEL:
        return {"reason": item.get("reason")}
    return {}


def run_imported(program, execution: Imported, engine=None) -> tuple[list[tuple[str, str, Any]], list[dict]]:
    """Ordo's decisions on the imported trigger and inputs: [(step, kind, detail)], and the refused inputs.

    `engine`: the dispatcher build (daemon/engines.py) that compiled `program`; None for this worker's own.
    """
    new_state, advance_ = (ExecutionState, advance) if engine is None else (engine.ExecutionState, engine.advance)
    tenant = execution.tenant
    subject_type, subject = subject_of(execution.trigger)
    state = new_state(execution.execution, subject=_json(subject), event=_json(execution.trigger), tenant=tenant)
    now_ms = int(execution.trigger.get("ts") or 0)
    out, errors = advance_(program, state, "start", None, now_ms), []
    for i, item in enumerate(execution.inputs):
        now_ms = max(now_ms, int(item.get("at_ms") or now_ms))
        kind = item["kind"]
        if kind == TIMER:
            if state.timer is None:
                errors.append({"input": i, "kind": kind, "error": "no timer is set at this point of Ordo's run"})
                continue
            payload: dict = {"timer_id": state.timer}
        elif kind == EVENT:
            payload = dict(_payload(item, state), tenant=tenant, **_about(subject_type, subject))
        else:
            payload = _json(_payload(item, state))
        try:
            out.extend(advance_(program, state, kind, payload, now_ms))
        except (ValueError, TypeError) as exc:
            errors.append({"input": i, "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
        state.effects.clear()
    return [(step, kind, _json(detail)) for _, step, kind, detail in out if kind in DECISIONS], errors


def compare_decisions(recorded: list[dict], ordo: list[tuple[str, str, Any]]) -> tuple[int, dict | None]:
    """(decisions that match, the first that does not as {"index", "recorded", "ordo"})."""
    for index in range(max(len(recorded), len(ordo))):
        theirs = recorded[index] if index < len(recorded) else None
        ours = ordo[index] if index < len(ordo) else None
        if theirs is not None and ours is not None:
            step, kind, detail = ours
            wanted = theirs.get("detail") or {}
            mine = detail if isinstance(detail, dict) else {}
            if (
                theirs.get("step", "") == step
                and theirs["kind"] == kind
                and all(mine.get(k) == v for k, v in wanted.items())
            ):
                continue
        return index, {
            "index": index,
            "recorded": theirs,
            "ordo": None if ours is None else {"step": ours[0], "kind": ours[1], "detail": ours[2]},
        }
    return len(recorded), None


class Definitions:
    """The Ordo definition each imported workflow is compared against, compiled once."""

    def __init__(self, conn, definition: dict | int | None, engine=None):
        self._conn = conn
        self._given = definition
        self._engine = engine
        self._programs: dict[tuple[str, str], tuple[Program | None, int | None, str | None]] = {}

    async def program(self, tenant: str, workflow: str) -> tuple[Program | None, int | None, str | None]:
        """(program, version, error)."""
        key = (tenant, workflow)
        if key not in self._programs:
            self._programs[key] = await self._load(tenant, workflow)
        return self._programs[key]

    async def _load(self, tenant: str, workflow: str) -> tuple[Program | None, int | None, str | None]:
        if isinstance(self._given, dict):
            definition, version = self._given, None
        else:
            version = (
                self._given
                if isinstance(self._given, int)
                else await rollouts.newest_version(self._conn, tenant, workflow)
            )
            definition = None if version is None else await history.definition(self._conn, tenant, workflow, version)
            if definition is None:
                which = f" v{version}" if isinstance(self._given, int) else ""
                return None, version, f"workflow {tenant}/{workflow}{which} is not deployed"
        try:
            validate(definition)
            return (Program if self._engine is None else self._engine.Program)(definition), version, None
        except Exception as exc:  # a candidate engine's failure too: this workflow's outcome, not the tool's
            return None, version, f"the definition does not compile: {type(exc).__name__}: {exc}"


async def replay_import(conn, lines, definition: dict | int | None = None, engine=None) -> dict:
    """Compare every exported execution in `lines` (an iterable of text lines) with Ordo's decisions.

    The summary: lines, compared, identical, diverged, errors, `malformed` ([{"line", "error"}],
    skipped), `top_divergences` (the decision where executions first diverged, most frequent
    first) and every execution's result.
    """
    definitions = Definitions(conn, definition, engine)
    results: list[ImportedResult] = []
    malformed: list[dict] = []
    points = FirstDivergences()
    number = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            execution = parse_line(text)
        except BadLine as exc:
            malformed.append({"line": number, "error": str(exc)})
            continue
        result = ImportedResult(number, execution.execution, execution.tenant, execution.workflow)
        results.append(result)
        program, result.version, result.error = await definitions.program(execution.tenant, execution.workflow)
        if program is None:
            continue
        try:
            ours, result.dispatch_errors = run_imported(program, execution, engine)
        except Exception as exc:  # a candidate engine that crashes: this execution's error
            result.error = f"the run raised {type(exc).__name__}: {exc}"
            continue
        result.compared, result.first_divergence = compare_decisions(execution.decisions, ours)
        first = result.first_divergence
        if first is not None:
            side = first["recorded"] or first["ordo"]
            points.add(side.get("step", ""), side["kind"], execution.execution)
    outcomes = Counter(r.outcome for r in results)
    return {
        "lines": number,
        "compared": len(results),
        "identical": outcomes["identical"],
        "diverged": outcomes["diverged"],
        "errors": outcomes["error"],
        "malformed": malformed,
        "top_divergences": points.top(),
        "results": [r.to_dict() for r in results],
    }


def _decision(entry: dict | None) -> str:
    if entry is None:
        return "(nothing)"
    detail = entry.get("detail")
    return f"{entry.get('step') or '-'} {entry['kind']}" + (f" {orjson.dumps(detail).decode()}" if detail else "")


def render_import(summary: dict) -> str:
    lines = [
        f"compared {summary['compared']} execution(s) of another engine ({summary['lines']} lines):"
        f" {summary['identical']} identical, {summary['diverged']} diverged, {summary['errors']} errors,"
        f" {len(summary['malformed'])} malformed line(s) skipped"
    ]
    for bad in summary["malformed"]:
        lines.append(f"  line {bad['line']}: MALFORMED, skipped: {bad['error']}")
    for r in summary["results"]:
        where = f"line {r['line']} {r['tenant']}/{r['workflow']} {r['execution']}"
        if r["error"] is not None:
            lines.append(f"  {where}: ERROR {r['error']}")
        for error in r["dispatch_errors"]:
            lines.append(f"  {where}: input {error['input']} ({error['kind']}) refused: {error['error']}")
        first = r["first_divergence"]
        if first is not None:
            lines.append(
                f"  {where}: DIVERGES at decision {first['index']}: they decided {_decision(first['recorded'])},"
                f" Ordo {_decision(first['ordo'])}"
            )
    lines.extend(render_top(summary["top_divergences"]))
    return "\n".join(lines)
