"""`ordo replay`: re-run an execution's recorded inputs through the dispatcher and diff the decisions.

The ledger's history holds every input that changed an execution: the trigger
(the execution row's event and subject), signals (name and data), action
results (output or error), events (data), timer fires (the transition names
the timer), cancels and operator retries. `inputs_of()` reads them back, in
order, off the transitions; `rerun()` feeds them to a fresh ExecutionState
with the dispatcher (no I/O: effects are collected on the state and dropped);
`compare()` lines the new transitions up with the recorded ones by seq.

`replay()` does this for one execution against its own definition version,
another version or a candidate definition; `replay_sample()` for a random
sample of finished executions, summarised. A dual-run rollout uses the same
functions: a candidate that diverges from what production decided is caught
before it decides anything for real.

What it cannot reproduce: inputs that changed nothing were never recorded (a
stale timer, an event the execution did not wait for, a signal after the end),
so a candidate that would have reacted to them cannot be shown to; an event's
fields other than its type, id and data (its `ts`, say) are not in the history,
so a wait_for_event filter on them is evaluated without them; histories
written before the details carried outputs and event data replay with None
in their place (`incomplete_history` says so).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import orjson

from hotpath import ExecutionState, Program, advance
from hotpath.definition import DefinitionError, validate
from hotpath.durations import parse_duration
from ledger import history, rollouts
from ledger.executions import RUNTIME_DEFAULTS, subject_from

from .engines import EngineError
from .engines import engine as engine_named

#: Transitions that an input made first; every other transition follows one of these in the same advance.
_HEADS = frozenset(
    (
        "started",
        "signal",
        "action_completed",
        "action_failed",
        "late_result",
        "event_received",
        "timer_fired",
        "timed_out",
        "cancelled",
        "limit_granted",
        "retried",
    )
)


@dataclass(slots=True)
class Input:
    """One recorded input: the dispatcher event kind, its payload (None for a timer: the replayed
    state names the timer), the seq of the transition it made first and that transition's time."""

    kind: str
    payload: dict | None
    seq: int
    at_ms: int
    now_ms: int = 0


@dataclass(slots=True)
class Divergence:
    seq: int
    recorded: dict | None  # {"step", "kind", "detail"}; None when the replay made more transitions
    replayed: dict | None  # None when the replay made fewer


@dataclass(slots=True)
class ReplayResult:
    execution_id: str
    workflow_id: str
    recorded_version: int
    #: The version replayed against; None for a definition that was not deployed (a file).
    replayed_version: int | None
    inputs: int = 0
    recorded: int = 0
    replayed: int = 0
    #: Transitions equal at the same seq, and the first seq where they are not.
    matching: int = 0
    first_divergence: Divergence | None = None
    #: Inputs the dispatcher refused in the new run: [{"seq", "kind", "error"}].
    dispatch_errors: list = field(default_factory=list)
    #: Timers the new run fires at the recorded moment although they would be due at another one
    #: (a changed duration, timeout or back-off): [{"seq", "timer_id", "recorded_due_ms", "replayed_due_ms"}].
    #: The transitions do not show it (the fire is fed when it was recorded), so it is listed here.
    timer_shifts: list = field(default_factory=list)
    #: Replayed against its own version: the fields of the final state that differ from the ledger's row.
    state_differs: list | None = None
    incomplete_history: bool = False
    #: Could not replay at all (no such execution, no definition, a definition that does not compile).
    error: str | None = None
    #: The dispatcher build replayed on (daemon/engines.py); None for this worker's own.
    engine: str | None = None

    @property
    def differing(self) -> int:
        """Seqs where the two runs differ (a transition only one of them made counts too)."""
        return max(self.recorded, self.replayed) - self.matching

    @property
    def identical(self) -> bool:
        return self.outcome == "identical"

    @property
    def outcome(self) -> str:
        if self.error is not None or self.dispatch_errors:
            return "error"
        return "identical" if self.first_divergence is None and not self.timer_shifts else "diverged"

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc.update(identical=self.identical, outcome=self.outcome, differing=self.differing)
        return doc


def _json(value):
    """The value as the ledger would give it back (tuples become lists, and so on)."""
    return orjson.loads(orjson.dumps(value))


# -- the recorded inputs -----------------------------------------------------------


def inputs_of(transitions: list[dict]) -> tuple[list[Input], bool]:
    """The inputs that made these transitions, in order, and whether the history lacks some of their data.

    `transitions` are dicts with seq, step_id, kind, at_ms, detail, source_seq (ordered by seq).
    """
    inputs, incomplete = [], False
    previous = None
    for t in transitions:
        kind, step_id, seq, at_ms = t["kind"], t["step_id"], t["seq"], t["at_ms"]
        d = t["detail"] if isinstance(t["detail"], dict) else {}
        follows_grant, previous = previous == "limit_granted", kind
        if kind in ("action_requested", "limit_waiting") and (d.get("attempt") or 0) > 1 and not follows_grant:
            # Only a retry back-off's timer requests an attempt above 1 (an operator retry restarts at 1).
            inputs.append(Input("timer", None, seq, at_ms))
            continue
        if kind not in _HEADS:
            continue
        if kind == "started":
            inputs.append(Input("start", None, seq, at_ms))
        elif kind == "signal":
            inputs.append(Input("signal", {"name": d.get("name"), "data": d.get("data")}, seq, at_ms))
        elif kind == "action_completed":
            incomplete |= "output" not in d
            inputs.append(
                Input(
                    "action_result",
                    {"step_id": step_id, "attempt": d.get("attempt"), "ok": True, "output": d.get("output")},
                    seq,
                    at_ms,
                )
            )
        elif kind == "action_failed":
            error = d.get("error") or {}
            # A timeout is a timer's doing: its detail names the timer. (No stream position says
            # it: the results of in-process actions are applied without one too.)
            if "timer_id" in d:
                inputs.append(Input("timer", None, seq, at_ms))
            else:
                inputs.append(
                    Input(
                        "action_result",
                        {"step_id": step_id, "attempt": d.get("attempt"), "ok": False, "error": error},
                        seq,
                        at_ms,
                    )
                )
        elif kind == "late_result":
            # It changed nothing; its output was never needed, so it was never kept.
            inputs.append(
                Input(
                    "action_result",
                    {"step_id": step_id, "attempt": d.get("attempt"), "ok": d.get("ok") is True},
                    seq,
                    at_ms,
                )
            )
        elif kind == "event_received":
            incomplete |= "data" not in d
            inputs.append(
                Input(
                    "event",
                    {"v": 1, "event_id": d.get("event_id"), "type": d.get("type"), "data": d.get("data")},
                    seq,
                    at_ms,
                )
            )
        elif kind in ("timer_fired", "timed_out"):
            inputs.append(Input("timer", None, seq, at_ms))
        elif kind == "cancelled":
            inputs.append(Input("cancel", {"reason": d.get("reason")}, seq, at_ms))
        elif kind == "retried":
            inputs.append(Input("retry", {}, seq, at_ms))
        elif kind == "limit_granted":
            inputs.append(Input("limit_granted", {"step_id": step_id, "attempt": d.get("attempt")}, seq, at_ms))
    return inputs, incomplete


def _wait_durations(definition: dict) -> dict:
    """{step id: duration ms} of the definition's wait steps that wait a duration (not `until`)."""
    durations = {}
    for step in definition.get("steps") or ():
        if isinstance(step, dict) and step.get("type") == "wait" and "duration" in step and "until" not in step:
            try:
                durations[step["id"]] = parse_duration(step["duration"])
            except (ValueError, TypeError):
                pass
    return durations


def clock_of(inputs: list[Input], transitions: list[dict], recorded_definition: dict) -> None:
    """Set each input's now_ms: the dispatcher's clock when it was applied, as near as the ledger tells.

    How exact: the transition's `at` is the worker's wall clock, read right before its engine
    clock, so in production the two agree to the millisecond (the truncation to ms may differ by 1).
    An injected clock (tests, a clock moved ahead) is not in `at`, so two things pin it where the
    transitions depend on it: a duration wait records until_ms = now_ms + duration, which gives
    that advance's now_ms exactly (the only transition detail that reads the clock), and a timer
    cannot fire before it was due, so a timer input's clock is at least its fire time in the
    replay (see rerun). The clock never goes back between inputs. Timer ids do not read the
    clock at all: they are built from step, visit, attempt, purpose and seq.
    """
    durations = _wait_durations(recorded_definition)
    heads = {i.seq: i for i in inputs}
    current = None
    for t in transitions:
        if t["seq"] in heads:
            current = heads[t["seq"]]
            current.now_ms = t["at_ms"]
        d = t["detail"]
        if (
            current is not None
            and t["kind"] == "waiting"
            and isinstance(d, dict)
            and "until_ms" in d
            and t["step_id"] in durations
        ):
            current.now_ms = d["until_ms"] - durations[t["step_id"]]


# -- the new run ---------------------------------------------------------------------


@dataclass(slots=True)
class Rerun:
    transitions: list
    state: object
    errors: list
    effects: list
    #: {input seq: (timer id, fire_at_ms)} for each timer input the run fired: when it was due.
    fired: dict


def _about(subject_type: str, subject: dict) -> dict:
    """What a routed event carries of its subject: `contact` for a contact, else a typed `subject`."""
    if subject_type == "contact":
        return {"contact": _json(subject)}
    return {"subject": {"type": subject_type, **_json(subject)}}


def rerun(program, execution_id: str, tenant: str, subject: dict, event: dict, inputs: list[Input], impl=None) -> Rerun:
    """Apply the inputs to a fresh execution; nothing is carried out (effects are only collected).

    `impl` is a hotpath namespace (see `hotpath.implementations()`); the active one by default.
    """
    new_state, advance_ = (ExecutionState, advance) if impl is None else (impl.ExecutionState, impl.advance)
    state = new_state(execution_id, subject=_json(subject), event=_json(event), tenant=tenant)
    transitions, errors, effects, fired = [], [], [], {}
    fire_at: dict = {}  # timer id -> fire_at_ms, from the replay's own set_timer effects
    last_ms = None
    for item in inputs:
        now_ms = item.now_ms
        if item.kind == "timer":
            if state.timer is None:
                # The new run holds no timer here: nothing for this fire to do (a divergence shows up
                # as the transitions it no longer makes).
                continue
            payload = {"timer_id": state.timer}
            due = fire_at.get(state.timer)
            fired[item.seq] = (state.timer, due)
            now_ms = max(now_ms, due if due is not None else now_ms)
        elif item.kind == "event":
            payload = dict(item.payload, tenant=tenant, **_about(program.subject_type, subject))
        else:
            payload = _json(item.payload)
        if last_ms is not None:
            now_ms = max(now_ms, last_ms)
        last_ms = now_ms
        try:
            out = advance_(program, state, item.kind, payload, now_ms)
        except (ValueError, TypeError) as exc:
            errors.append({"seq": item.seq, "kind": item.kind, "error": f"{type(exc).__name__}: {exc}"})
            out = []
        transitions.extend(out)
        for kind, data in state.effects:
            if kind == "set_timer":
                fire_at[data["timer_id"]] = data["fire_at_ms"]
        effects.extend(state.effects)
        state.effects.clear()
    return Rerun(transitions, state, errors, effects, fired)


def _comparable(kind: str, detail):
    # `started` names the version it ran on: another version is not a different decision.
    if kind == "started" and isinstance(detail, dict):
        return {k: v for k, v in detail.items() if k != "version"}
    return detail


def compare(recorded: list[dict], replayed: list) -> tuple[int, Divergence | None]:
    """(transitions equal at the same seq, the first seq where they differ)."""
    new = {seq: (step_id, kind, _json(detail)) for seq, step_id, kind, detail in replayed}
    old = {t["seq"]: (t["step_id"], t["kind"], t["detail"]) for t in recorded}
    matching, first = 0, None
    for seq in sorted(old.keys() | new.keys()):
        a, b = old.get(seq), new.get(seq)
        if a is not None and b is not None and a[:2] == b[:2] and _comparable(a[1], a[2]) == _comparable(b[1], b[2]):
            matching += 1
        elif first is None:
            first = Divergence(
                seq,
                None if a is None else {"step": a[0], "kind": a[1], "detail": a[2]},
                None if b is None else {"step": b[0], "kind": b[1], "detail": b[2]},
            )
    return matching, first


def _state_differs(state, row) -> list:
    runtime = orjson.loads(row["runtime"])
    replayed = {
        "status": state.status,
        "seq": state.seq,
        "pc": state.pc,
        "waiting": state.waiting,
        "context": _json(state.context),
        **{k: _json(getattr(state, k)) for k in ("attempt", "timer", "visits", "failures")},
    }
    stored = {
        "status": row["status"],
        "seq": row["seq"],
        "pc": row["pc"],
        "waiting": row["waiting"],
        "context": orjson.loads(row["context"]),
        # A field at its default is not stored, nor any of a completed execution's
        # (ledger.executions.runtime_of).
        **{k: runtime.get(k, default) for k, default in RUNTIME_DEFAULTS.items()},
    }
    if row["status"] == "completed":
        stored = {k: v for k, v in stored.items() if k not in RUNTIME_DEFAULTS}
    return sorted(k for k in replayed if k in stored and replayed[k] != stored[k])


# -- from the ledger -------------------------------------------------------------------


def _program(definition: dict, engine=None):
    validate(definition)
    return (Program if engine is None else engine.Program)(definition)


async def replay(
    conn, execution_id: str, definition: dict | int | None = None, engine=None, engine_name: str | None = None
) -> ReplayResult:
    """Re-run one execution's recorded inputs against `definition` and compare the decisions.

    `definition`: None for the version it ran on, an int for another deployed version of its
    workflow, or a definition (dict) that need not be deployed. `engine`: the dispatcher build to
    run them through (daemon/engines.py, called `engine_name`); None for the one the execution ran
    on (the candidate engine it was enrolled on under an engine rollout, else this worker's own).
    """
    row = await history.trigger_and_state(conn, execution_id)
    if row is None:
        return ReplayResult(execution_id, "", 0, None, error=f"no execution {execution_id}")
    if engine is None:
        engine_name = await rollouts.engine_of(conn, execution_id)
        if engine_name is not None:
            try:
                engine = engine_named(engine_name)
            except EngineError as exc:
                return ReplayResult(execution_id, row["workflow_id"], row["workflow_version"], None, error=str(exc))
    tenant, workflow_id, recorded_version = row["tenant"], row["workflow_id"], row["workflow_version"]
    result = ReplayResult(execution_id, workflow_id, recorded_version, None, engine=engine_name)
    recorded_definition = await history.definition(conn, tenant, workflow_id, recorded_version)
    if definition is None or isinstance(definition, int):
        result.replayed_version = recorded_version if definition is None else definition
        candidate = (
            recorded_definition
            if definition is None
            else await history.definition(conn, tenant, workflow_id, definition)
        )
        if candidate is None:
            result.error = f"workflow {tenant}/{workflow_id} v{result.replayed_version} is not deployed"
            return result
    else:
        candidate = definition
    try:
        program = _program(candidate, engine)
    except (DefinitionError, ValueError, TypeError, KeyError) as exc:
        result.error = f"the definition does not compile: {exc}"
        return result
    except Exception as exc:  # a candidate engine's own failure is this replay's outcome
        result.error = f"engine {engine_name} failed to compile the definition: {type(exc).__name__}: {exc}"
        return result
    transitions = [
        {
            "seq": r["seq"],
            "step_id": r["step_id"],
            "kind": r["kind"],
            "at_ms": r["at_ms"],
            "detail": orjson.loads(r["detail"]) if r["detail"] else None,
            "source_seq": r["source_seq"],
        }
        for r in await history.transitions_ms(conn, execution_id)
    ]
    inputs, result.incomplete_history = inputs_of(transitions)
    clock_of(inputs, transitions, recorded_definition or {})
    event = orjson.loads(row["event"])
    subject = subject_from(row["subject"], event)
    try:
        run = rerun(program, execution_id, tenant, subject, event, inputs, impl=engine)
    except Exception as exc:  # as above: a candidate that crashes is reported, not the tool's crash
        result.error = f"the replay raised {type(exc).__name__}: {exc}"
        return result
    result.inputs, result.recorded, result.replayed = len(inputs), len(transitions), len(run.transitions)
    result.matching, result.first_divergence = compare(transitions, run.transitions)
    result.dispatch_errors = run.errors
    if result.replayed_version == recorded_version:
        result.state_differs = _state_differs(run.state, row)
    elif recorded_definition is not None:
        # When each timer was due in the recorded run: the same inputs through its own version.
        try:
            recorded_run = rerun(
                _program(recorded_definition),
                execution_id,
                tenant,
                subject,
                event,
                inputs,
            )
        except (DefinitionError, ValueError, TypeError, KeyError):
            recorded_run = None
        for seq, (timer_id, due) in run.fired.items():
            before = recorded_run.fired.get(seq) if recorded_run is not None else None
            if before is not None and before[1] != due:
                result.timer_shifts.append(
                    {"seq": seq, "timer_id": timer_id, "recorded_due_ms": before[1], "replayed_due_ms": due}
                )
    return result


async def replay_sample(
    conn,
    tenant: str | None,
    workflow_id: str,
    n: int,
    definition: dict | int | None = None,
    *,
    seed: int | None = None,
    engine=None,
    engine_name: str | None = None,
) -> dict:
    """Replay `n` finished executions of a workflow picked at random, and summarise the divergence.

    `tenant` None takes every tenant's workflow of that id; `seed` makes the pick repeatable.

    The summary: replayed, identical, diverged, errors, and `top_divergences`, the (step, kind)
    where executions first diverged, most frequent first (the recorded side's, or the replayed
    side's where the recorded history had ended).
    """
    picked = await history.finished_sample(conn, workflow_id, tenant, n, seed)
    outcomes: Counter = Counter()
    points = FirstDivergences()
    results = []
    for execution_id in sorted(picked):
        result = await replay(conn, execution_id, definition, engine, engine_name)
        results.append(result)
        outcomes[result.outcome] += 1
        first = result.first_divergence
        if first is not None:
            side = first.recorded or first.replayed
            points.add(side["step"], side["kind"], execution_id)
    return {
        "workflow_id": workflow_id,
        "tenant": tenant,
        "engine": engine_name,
        "replayed": len(results),
        "identical": outcomes["identical"],
        "diverged": outcomes["diverged"],
        "errors": outcomes["error"],
        "top_divergences": points.top(),
        "results": [r.to_dict() for r in results],
    }


class FirstDivergences:
    """Where executions first diverged, counted by (step, kind), each with an example execution."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._examples: dict = {}

    def add(self, step: str, kind: str, execution: str) -> None:
        self._counts[(step, kind)] += 1
        self._examples.setdefault((step, kind), execution)

    def top(self, n: int = 10) -> list[dict]:
        """The `n` most frequent: [{"step", "kind", "executions", "example"}]."""
        return [
            {"step": step, "kind": kind, "executions": count, "example": self._examples[(step, kind)]}
            for (step, kind), count in self._counts.most_common(n)
        ]


# -- as text ---------------------------------------------------------------------------


def _side(entry: dict | None) -> str:
    if entry is None:
        return "(nothing)"
    detail = "" if entry["detail"] is None else " " + orjson.dumps(entry["detail"]).decode()
    return f"{entry['step'] or '-'} {entry['kind']}{detail}"


def _span_ms(ms: int | None) -> str:
    if ms is None:
        return "at an unknown time"
    return f"{abs(ms) / 1000:g}s {'later' if ms > 0 else 'earlier'}"


def render(result: ReplayResult) -> str:
    against = f"v{result.replayed_version}" if result.replayed_version is not None else "the given definition"
    if result.engine is not None:
        against += f" on engine {result.engine}"
    head = f"replay {result.execution_id} ({result.workflow_id} v{result.recorded_version}) against {against}"
    if result.error is not None:
        return f"{head}\n  ERROR {result.error}"
    lines = [
        head,
        f"  {result.inputs} inputs, {result.recorded} transitions recorded, {result.replayed} replayed,"
        f" {result.matching} equal, {result.differing} differ",
    ]
    if result.identical:
        lines.append("  identical: the new run makes the same decisions")
    first = result.first_divergence
    if first is not None:
        lines.append(f"  DIVERGES at seq {first.seq}")
        lines.append(f"    recorded  {_side(first.recorded)}")
        lines.append(f"    replayed  {_side(first.replayed)}")
    for shift in result.timer_shifts:
        moved = _span_ms(shift["replayed_due_ms"] - shift["recorded_due_ms"])
        lines.append(
            f"  TIMER MOVES at seq {shift['seq']}: {shift['timer_id']} would be due {moved} (replayed as recorded)"
        )
    for error in result.dispatch_errors:
        lines.append(f"  dispatch error at input seq {error['seq']} ({error['kind']}): {error['error']}")
    if result.state_differs:
        lines.append(f"  final state differs from the ledger's in: {', '.join(result.state_differs)}")
    if result.incomplete_history:
        lines.append("  note: this history predates recorded outputs/event data; those replayed as null")
    return "\n".join(lines)


def render_summary(summary: dict) -> str:
    lines = [
        f"replayed {summary['replayed']} finished execution(s) of {summary['workflow_id']}"
        + (f" on engine {summary['engine']}" if summary.get("engine") else "")
        + ":"
        f" {summary['identical']} identical, {summary['diverged']} diverged, {summary['errors']} errors"
    ]
    lines.extend(render_top(summary["top_divergences"]))
    return "\n".join(lines)


def render_top(top: list[dict]) -> list[str]:
    """FirstDivergences.top() as lines of text."""
    return [
        f"  {point['executions']:>5} first diverge at {point['step'] or '-'} {point['kind']}  (e.g. {point['example']})"
        for point in top
    ]
