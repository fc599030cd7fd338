"""The step dispatcher, pure-Python twin of `hotpath._dispatcher` (same API, same behaviour).

`advance(program, state, kind, payload)` applies one event ("start" or
"signal") to one execution: it mutates `state` in place and returns the
transitions it made, each `(seq, step_id, kind, detail)` with `seq`
contiguous from 1. It is a pure state machine (no I/O, no clock, no
randomness) so that the ledger can replay an execution through it and get the
same transitions again.
"""

from __future__ import annotations

from hotpath.definition import EndStep, IfStep, SetStep, WaitForSignalStep, resolve

CLOSED = ("completed", "failed", "cancelled")


class Program:
    """A workflow definition compiled for the dispatcher (DefinitionError if it cannot run)."""

    __slots__ = ("workflow_id", "version", "tenant", "trigger_event", "max_steps", "step_ids", "_filter", "_steps")

    def __init__(self, definition: dict):
        resolved = resolve(definition)
        self.workflow_id = resolved.workflow_id
        self.version = resolved.version
        self.tenant = resolved.tenant
        self.trigger_event = resolved.trigger_event
        self.max_steps = resolved.max_steps
        self.step_ids = tuple(step.id for step in resolved.steps)
        self._filter = resolved.trigger_filter
        self._steps = resolved.steps

    def matches(self, event: dict) -> bool:
        """Whether a trigger event enrols a contact: its type and the trigger filter."""
        if not isinstance(event, dict) or event.get("type") != self.trigger_event:
            return False
        if self._filter is None:
            return True
        return holds(self._filter, {"context": {}, "contact": event.get("contact"), "event": event})

    def __repr__(self) -> str:
        return f"<Program {self.tenant}/{self.workflow_id} v{self.version} steps={len(self.step_ids)}>"


class ExecutionState:
    """One execution's mutable state; the dispatcher reads and writes it in place."""

    __slots__ = ("execution_id", "status", "pc", "seq", "context", "contact", "event", "steps", "waiting")

    def __init__(
        self,
        execution_id: str,
        status: str = "running",
        pc: int = 0,
        seq: int = 0,
        context: dict | None = None,
        contact: dict | None = None,
        event: dict | None = None,
        steps: int = 0,
        waiting: str | None = None,
    ):
        self.execution_id = execution_id
        self.status = status  # running | waiting | completed | failed | cancelled
        self.pc = pc  # index of the next step to run
        self.seq = seq  # last transition seq written
        self.context = {} if context is None else context
        self.contact = {} if contact is None else contact
        self.event = {} if event is None else event
        self.steps = steps  # steps executed over the execution's life
        self.waiting = waiting  # name of the awaited signal while status == "waiting"

    def __repr__(self) -> str:
        return f"<ExecutionState {self.execution_id} {self.status} pc={self.pc} seq={self.seq}>"


# -- advancing -----------------------------------------------------------------
def advance(program: Program, state: ExecutionState, kind: str, payload) -> list:
    """Apply one event to `state`; return the transitions made."""
    out: list = []
    if kind == "start":
        if state.seq != 0:
            raise ValueError(f"execution {state.execution_id} has already started (seq {state.seq})")
        _emit(state, out, "", "started", {"workflow_id": program.workflow_id, "version": program.version})
        _run(program, state, out)
    elif kind == "signal":
        if state.status in CLOSED:
            return out
        name, data = _signal_fields(payload)
        step = None
        if state.status == "waiting":
            _check_pc(program, state)
            step = program._steps[state.pc]
        _emit(state, out, step.id if step else "", "signal", {"name": name, "data": data})
        if step is not None and name == state.waiting:
            state.context[step.id] = data
            state.waiting = None
            state.status = "running"
            state.pc = step.next
            _run(program, state, out)
    else:
        raise ValueError(f"unknown event kind {kind!r} (expected 'start' or 'signal')")
    return out


def _check_pc(program: Program, state: ExecutionState) -> None:
    steps = len(program._steps)
    if not 0 <= state.pc <= steps or (state.status == "waiting" and state.pc == steps):
        raise ValueError(f"execution {state.execution_id} has pc {state.pc} outside the program's steps")


def _signal_fields(payload) -> tuple:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise ValueError(f"a signal payload needs a 'name' string, got {payload!r}")
    return payload["name"], payload.get("data")


def _emit(state: ExecutionState, out: list, step_id: str, kind: str, detail) -> None:
    state.seq += 1
    out.append((state.seq, step_id, kind, detail))


def _run(program: Program, state: ExecutionState, out: list) -> None:
    steps = program._steps
    ran = 0
    if state.status == "running":
        _check_pc(program, state)
    while state.status == "running":
        if state.pc == len(steps):
            _emit(state, out, "", "completed", None)
            state.status = "completed"
            return
        step = steps[state.pc]
        if ran == program.max_steps:
            error = f"loop guard: more than {program.max_steps} steps in one run"
            _emit(state, out, step.id, "failed", {"error": error, "code": "loop_guard"})
            state.status = "failed"
            return
        ran += 1
        state.steps += 1
        roots = {"context": state.context, "contact": state.contact, "event": state.event}
        if type(step) is SetStep:
            for path, template in step.assignments:
                _assign(state.context, path, render(template, roots))
            _emit(state, out, step.id, "set", None)
            state.pc = step.next
        elif type(step) is IfStep:
            taken = "then" if holds(step.condition, roots) else "else"
            state.pc = step.then if taken == "then" else step.else_
            to = steps[state.pc].id if state.pc < len(steps) else ""
            _emit(state, out, step.id, "branch", {"to": to, "taken": taken})
        elif type(step) is EndStep:
            _emit(state, out, step.id, step.status, None if step.reason is None else {"reason": step.reason})
            state.status = step.status
        elif type(step) is WaitForSignalStep:
            _emit(state, out, step.id, "waiting", {"signal": step.signal})
            state.status = "waiting"
            state.waiting = step.signal
        else:  # pragma: no cover - resolve() only produces the types above
            raise TypeError(f"unknown step {step!r}")


def _assign(context: dict, path: tuple, value) -> None:
    """context[a][b][c] = value for path (a, b, c), creating (or replacing non-dict) parents."""
    target = context
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


# -- templates -----------------------------------------------------------------
def lookup(node: tuple, roots: dict):
    """The value at a ("path", root, segments) node, or None when any part is missing."""
    _, root, segments = node
    value = roots[root]
    for key, index in segments:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and 0 <= index < len(value):
            value = value[index]
        else:
            return None
    return value


def copy_json(value):
    """A copy of nested dicts and lists, so context never aliases event, contact or program data."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


def render(node: tuple, roots: dict):
    tag = node[0]
    if tag == "lit":
        return node[1]
    if tag == "path":
        return copy_json(lookup(node, roots))
    if tag == "interp":
        parts = []
        for part in node[1]:
            if isinstance(part, str):
                parts.append(part)
            else:
                value = lookup(part, roots)
                parts.append("" if value is None else str(value))
        return "".join(parts)
    if tag == "dict":
        return {key: render(item, roots) for key, item in node[1]}
    if tag == "list":
        return [render(item, roots) for item in node[1]]
    raise TypeError(f"unknown template node {node!r}")  # pragma: no cover


# -- conditions ----------------------------------------------------------------
def same(a, b) -> bool:
    """JSON equality: like ==, except that a boolean only equals a boolean (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _orderable(a, b) -> bool:
    """Numbers with numbers, strings with strings; anything else (None, bools, mixed) is not ordered."""
    if isinstance(a, str):
        return isinstance(b, str)
    return (type(a) is int or type(a) is float) and (type(b) is int or type(b) is float)


def holds(cond: tuple, roots: dict) -> bool:
    op = cond[0]
    if op == "all":
        return all(holds(c, roots) for c in cond[1])
    if op == "any":
        return any(holds(c, roots) for c in cond[1])
    if op == "not":
        return not holds(cond[1], roots)
    if op == "exists":
        return render(cond[1], roots) is not None
    a, b = render(cond[1], roots), render(cond[2], roots)
    if op == "eq":
        return same(a, b)
    if op == "ne":
        return not same(a, b)
    if op == "in":
        return isinstance(b, list) and any(same(a, v) for v in b)
    if op == "contains":
        if isinstance(a, str):
            return isinstance(b, str) and b in a
        return isinstance(a, list) and any(same(v, b) for v in a)
    if not _orderable(a, b):
        return False
    if op == "gt":
        return a > b
    if op == "gte":
        return a >= b
    if op == "lt":
        return a < b
    if op == "lte":
        return a <= b
    raise TypeError(f"unknown condition {cond!r}")  # pragma: no cover
