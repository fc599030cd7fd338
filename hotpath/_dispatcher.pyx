# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The step dispatcher, compiled (same API and behaviour as `hotpath.dispatcher`).

The resolved definition from `hotpath.definition.resolve` (the same one the
pure twin interprets) is lowered into cdef nodes: steps with a C-int kind and
C-int targets, templates with C arrays of list indexes, conditions with a
C-int operator. The run loop keeps pc/seq/step counts in C locals and writes
them back to the state when it stops (also when it raises); the steps that
park the execution (action, wait, wait_for_event) and the event handlers work
on the state directly, as the pure twin does, since they run once per wait.
The module docstring of `hotpath.dispatcher` lists the event kinds and effects;
their words and every message text come from `hotpath.vocabulary`, as the twin's do.
"""

from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_Check
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from hotpath import vocabulary
from hotpath.context_types import CONTACT, SUBJECT_CONTRACT
from hotpath.definition import (
    MAX_RENDERED_CHARS,
    MAX_RENDERED_NODES,
    TEMPLATE_ERRORS,
    ActionStep,
    EmitStep,
    EndStep,
    GotoStep,
    IfStep,
    SetStep,
    SwitchStep,
    WaitForEventStep,
    WaitForSignalStep,
    WaitStep,
    interp_text,
    resolve,
    template_text,
)
from hotpath.durations import parse_instant, retry_delay_ms
from hotpath.vocabulary import (
    NOT_FAILED_AT_ACTION,
    MissingField,
    TemplateError,
    ValueTooLarge,
    action_timed_out,
    already_started,
    bad_action_result,
    bad_event,
    bad_limit_grant,
    bad_signal,
    bad_timer,
    bad_until,
    limit_bucket,
    no_error_object,
    pc_outside_steps,
    start_gates,
    program_repr,
    state_repr,
    timer_without_wait,
    too_many_steps,
    too_many_visits,
    unknown_event_kind,
    unknown_step,
    unknown_template_node,
)

cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL

cdef enum TemplateTag:
    T_LIT, T_PATH, T_INTERP, T_DICT, T_LIST

cdef enum Root:
    R_CONTEXT, R_SUBJECT, R_EVENT

cdef enum Op:
    OP_ALL, OP_ANY, OP_NOT, OP_EXISTS, OP_EQ, OP_NE, OP_GT, OP_GTE, OP_LT, OP_LTE, OP_IN, OP_CONTAINS

cdef enum StepKind:
    S_SET, S_IF, S_END, S_WAIT_FOR_SIGNAL, S_ACTION, S_WAIT, S_WAIT_FOR_EVENT, S_SWITCH, S_GOTO, S_EMIT

cdef dict _ROOTS = {"context": R_CONTEXT, "subject": R_SUBJECT, "event": R_EVENT}
cdef dict _OPS = {
    "all": OP_ALL, "any": OP_ANY, "not": OP_NOT, "exists": OP_EXISTS,
    "eq": OP_EQ, "ne": OP_NE, "gt": OP_GT, "gte": OP_GTE, "lt": OP_LT, "lte": OP_LTE,
    "in": OP_IN, "contains": OP_CONTAINS,
}
cdef dict _NO_CONTEXT = {}  # the context trigger filters see; conditions never write to it
# What _lookup returns for a missing field (None is a present null).
cdef object _MISSING = object()

# The words of `hotpath.vocabulary` as typed C globals: compared and stored without a module lookup.
cdef str START = vocabulary.START
cdef str SIGNAL = vocabulary.SIGNAL
cdef str ACTION_RESULT = vocabulary.ACTION_RESULT
cdef str TIMER = vocabulary.TIMER
cdef str EVENT = vocabulary.EVENT
cdef str CANCEL = vocabulary.CANCEL
cdef str RETRY = vocabulary.RETRY
cdef str LIMIT_GRANTED = vocabulary.LIMIT_GRANTED

cdef str RUNNING = vocabulary.RUNNING
cdef str WAITING = vocabulary.WAITING
cdef str COMPLETED = vocabulary.COMPLETED
cdef str FAILED = vocabulary.FAILED
cdef str CANCELLED = vocabulary.CANCELLED
cdef str WAIT_ACTION = vocabulary.WAIT_ACTION
cdef str WAIT_RETRY = vocabulary.WAIT_RETRY
cdef str WAIT_TIMER = vocabulary.WAIT_TIMER
cdef str WAIT_EVENT = vocabulary.WAIT_EVENT
cdef str WAIT_LIMIT = vocabulary.WAIT_LIMIT
cdef str WAIT_START = vocabulary.WAIT_START
cdef str START_GATED = vocabulary.START_GATED

cdef str STARTED = vocabulary.STARTED
cdef str SET = vocabulary.SET
cdef str BRANCH = vocabulary.BRANCH
cdef str GOTO = vocabulary.GOTO
cdef str EMITTED = vocabulary.EMITTED
cdef str ACTION_REQUESTED = vocabulary.ACTION_REQUESTED
cdef str ACTION_COMPLETED = vocabulary.ACTION_COMPLETED
cdef str ACTION_FAILED = vocabulary.ACTION_FAILED
cdef str LATE_RESULT = vocabulary.LATE_RESULT
cdef str LIMIT_WAITING = vocabulary.LIMIT_WAITING
cdef str TIMER_FIRED = vocabulary.TIMER_FIRED
cdef str TIMED_OUT = vocabulary.TIMED_OUT
cdef str EVENT_RECEIVED = vocabulary.EVENT_RECEIVED
cdef str RETRIED = vocabulary.RETRIED
cdef str STEP_FAILED = vocabulary.STEP_FAILED

cdef str EFFECT_ACTION = vocabulary.EFFECT_ACTION
cdef str EFFECT_SET_TIMER = vocabulary.EFFECT_SET_TIMER
cdef str EFFECT_CLEAR_TIMER = vocabulary.EFFECT_CLEAR_TIMER
cdef str EFFECT_WAIT_EVENT = vocabulary.EFFECT_WAIT_EVENT
cdef str EFFECT_CLEAR_WAIT = vocabulary.EFFECT_CLEAR_WAIT
cdef str EFFECT_EMIT = vocabulary.EFFECT_EMIT
cdef str EFFECT_DEAD_LETTER = vocabulary.EFFECT_DEAD_LETTER
cdef str EFFECT_LIMIT_WAIT = vocabulary.EFFECT_LIMIT_WAIT
cdef str EFFECT_LIMIT_RELEASE = vocabulary.EFFECT_LIMIT_RELEASE
cdef str PURPOSE_ACTION_TIMEOUT = vocabulary.PURPOSE_ACTION_TIMEOUT
cdef str PURPOSE_RETRY = vocabulary.PURPOSE_RETRY
cdef str PURPOSE_WAIT = vocabulary.PURPOSE_WAIT
cdef str PURPOSE_EVENT_TIMEOUT = vocabulary.PURPOSE_EVENT_TIMEOUT
cdef str REASON_STEP_FAILED = vocabulary.REASON_STEP_FAILED


# -- templates -----------------------------------------------------------------
cdef class _Template:
    cdef TemplateTag tag
    cdef object value          # T_LIT
    cdef Root root             # T_PATH
    cdef tuple keys            # T_PATH: segment keys; T_DICT: the dict's keys
    cdef Py_ssize_t* indexes   # T_PATH: segment as list index, or -1
    cdef Py_ssize_t depth      # T_PATH: number of segments
    cdef str text              # T_PATH, T_INTERP: the template as written, for its errors
    cdef tuple parts           # T_INTERP: str or _Template; T_DICT/T_LIST: _Template

    def __dealloc__(self):
        PyMem_Free(self.indexes)


cdef _Template _lower_template(tuple node):
    cdef _Template t = _Template.__new__(_Template)
    cdef Py_ssize_t i
    tag = node[0]
    if tag == "lit":
        t.tag = T_LIT
        t.value = node[1]
    elif tag == "path":
        t.tag = T_PATH
        t.root = _ROOTS[node[1]]
        segments = node[2]
        t.depth = len(segments)
        t.text = template_text(node)
        t.keys = tuple([key for key, _ in segments])
        t.indexes = <Py_ssize_t*>PyMem_Malloc((t.depth + 1) * sizeof(Py_ssize_t))
        if t.indexes == NULL:
            raise MemoryError()
        for i in range(t.depth):
            t.indexes[i] = segments[i][1]
    elif tag == "interp":
        t.tag = T_INTERP
        t.text = interp_text(node)
        t.parts = tuple([p if isinstance(p, str) else _lower_template(p) for p in node[1]])
    elif tag == "dict":
        t.tag = T_DICT
        t.keys = tuple([key for key, _ in node[1]])
        t.parts = tuple([_lower_template(item) for _, item in node[1]])
    elif tag == "list":
        t.tag = T_LIST
        t.parts = tuple([_lower_template(item) for item in node[1]])
    else:
        raise TypeError(unknown_template_node(node))
    return t


cdef object _lookup(_Template t, object context, object subject, object event):
    """The value at a path template, or _MISSING when any part is missing."""
    cdef Py_ssize_t i, index
    cdef PyObject* found
    if t.root == R_CONTEXT:
        value = context
    elif t.root == R_SUBJECT:
        value = subject
    else:
        value = event
    for i in range(t.depth):
        if PyDict_Check(value):
            found = PyDict_GetItemWithError(value, <object>PyTuple_GET_ITEM(t.keys, i))
            if found == NULL:
                return _MISSING
            value = <object>found
        elif PyList_Check(value):
            index = t.indexes[i]
            if index < 0 or index >= len(<list>value):
                return _MISSING
            value = (<list>value)[index]
        else:
            return _MISSING
    return value


cdef object _copy_json(object value):
    """A copy of nested dicts and lists, so context never aliases event, subject or program data."""
    if PyDict_Check(value):
        return {k: _copy_json(v) for k, v in (<dict>value).items()}
    if PyList_Check(value):
        return [_copy_json(v) for v in <list>value]
    return value


cdef object _copy_bounded(object value, Py_ssize_t* budget, _Template t):
    """_copy_json(value), refused past MAX_RENDERED_NODES dicts, lists and values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueTooLarge.nodes(t.text)
    if PyDict_Check(value):
        return {k: _copy_bounded(v, budget, t) for k, v in (<dict>value).items()}
    if PyList_Check(value):
        return [_copy_bounded(v, budget, t) for v in <list>value]
    return value


cdef object _render(_Template t, object context, object subject, object event, bint strict):
    """The template's value; a missing field raises MissingField when strict (a value), else is None."""
    cdef Py_ssize_t i, n, budget
    cdef list pieces
    if t.tag == T_LIT:
        return t.value
    if t.tag == T_PATH:
        value = _lookup(t, context, subject, event)
        if value is _MISSING:
            if strict:
                raise MissingField(t.text)
            return None
        if not PyDict_Check(value) and not PyList_Check(value):
            return value
        budget = MAX_RENDERED_NODES
        return _copy_bounded(value, &budget, t)
    if t.tag == T_INTERP:
        n = PyTuple_GET_SIZE(t.parts)
        pieces = [None] * n
        for i in range(n):
            part = <object>PyTuple_GET_ITEM(t.parts, i)
            if type(part) is _Template:
                value = _lookup(<_Template>part, context, subject, event)
                if value is _MISSING:
                    if strict:
                        raise MissingField((<_Template>part).text)
                    value = None
                pieces[i] = "" if value is None else str(value)
            else:
                pieces[i] = part
        text = "".join(pieces)
        if len(text) > MAX_RENDERED_CHARS:
            raise ValueTooLarge.chars(t.text, len(text))
        return text
    if t.tag == T_DICT:
        result = {}
        for i in range(PyTuple_GET_SIZE(t.parts)):
            result[<object>PyTuple_GET_ITEM(t.keys, i)] = _render(
                <_Template>PyTuple_GET_ITEM(t.parts, i), context, subject, event, strict)
        return result
    return [_render(<_Template>item, context, subject, event, strict) for item in t.parts]


# -- conditions ----------------------------------------------------------------
cdef class _Condition:
    cdef Op op
    cdef tuple children        # OP_ALL / OP_ANY
    cdef _Condition child      # OP_NOT
    cdef _Template a, b        # OP_EXISTS uses a


cdef _Condition _lower_condition(tuple node):
    cdef _Condition c = _Condition.__new__(_Condition)
    c.op = _OPS[node[0]]
    if c.op == OP_ALL or c.op == OP_ANY:
        c.children = tuple([_lower_condition(child) for child in node[1]])
    elif c.op == OP_NOT:
        c.child = _lower_condition(node[1])
    elif c.op == OP_EXISTS:
        c.a = _lower_template(node[1])
    else:
        c.a = _lower_template(node[1])
        c.b = _lower_template(node[2])
    return c


cdef bint _same(object a, object b) except -1:
    """JSON equality: like ==, except that a boolean only equals a boolean (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


cdef inline bint _is_number(object x):
    return type(x) is int or type(x) is float


cdef bint _holds(_Condition c, object context, object subject, object event) except -1:
    cdef _Condition child
    if c.op == OP_ALL:
        for child in c.children:
            if not _holds(child, context, subject, event):
                return False
        return True
    if c.op == OP_ANY:
        for child in c.children:
            if _holds(child, context, subject, event):
                return True
        return False
    if c.op == OP_NOT:
        return not _holds(c.child, context, subject, event)
    # A condition asks a question: a missing field there is null.
    a = _render(c.a, context, subject, event, False)
    if c.op == OP_EXISTS:
        return a is not None
    b = _render(c.b, context, subject, event, False)
    if c.op == OP_EQ:
        return _same(a, b)
    if c.op == OP_NE:
        return not _same(a, b)
    if c.op == OP_IN:
        if not PyList_Check(b):
            return False
        for v in <list>b:
            if _same(a, v):
                return True
        return False
    if c.op == OP_CONTAINS:
        if isinstance(a, str):
            return isinstance(b, str) and b in a
        if not PyList_Check(a):
            return False
        for v in <list>a:
            if _same(v, b):
                return True
        return False
    # Ordering: numbers with numbers, strings with strings; anything else is false.
    if isinstance(a, str):
        if not isinstance(b, str):
            return False
    elif not (_is_number(a) and _is_number(b)):
        return False
    if c.op == OP_GT:
        return a > b
    if c.op == OP_GTE:
        return a >= b
    if c.op == OP_LT:
        return a < b
    return a <= b


# -- program and state -----------------------------------------------------------
cdef class _Step:
    cdef StepKind kind
    cdef str id
    cdef Py_ssize_t next       # where to go after (all but if, end, goto)
    cdef Py_ssize_t then, else_
    cdef tuple paths           # set: per assignment, the context key path
    cdef tuple values          # set: per assignment, the _Template
    cdef _Condition condition  # if
    cdef str status            # end
    cdef object reason         # end
    cdef str signal            # wait_for_signal
    cdef str action            # action: name, major, input and policy
    cdef object major
    cdef _Template input
    cdef object timeout_ms     # action, wait_for_event
    cdef str timeout_text
    cdef object max_attempts
    cdef object initial_ms
    cdef object coefficient
    cdef object max_interval_ms
    cdef object jitter
    cdef tuple non_retryable
    cdef object limits         # action: the definition's ActionLimits, or None
    cdef _Template limit_key   # action: the limits' key template, or None
    cdef Py_ssize_t on_failure  # action, wait: -1 when not set (and for every other type)
    cdef object duration_ms    # wait
    cdef _Template until       # wait: None when it waits a duration
    cdef str event             # wait_for_event, emit
    cdef str wait_key          # wait_for_event: "event:<type>"
    cdef _Condition filter     # wait_for_event: None when not set
    cdef Py_ssize_t on_timeout  # wait_for_event
    cdef tuple cases           # switch: _Condition per case
    cdef tuple targets         # switch: step index per case
    cdef Py_ssize_t default    # switch
    cdef Py_ssize_t target     # goto
    cdef _Template data        # emit


cdef _Step _lower_step(object step):
    cdef _Step s = _Step.__new__(_Step)
    s.id = step.id
    s.on_failure = -1  # set by the step types that have one
    if type(step) is SetStep:
        s.kind = S_SET
        s.next = step.next
        s.paths = tuple([path for path, _ in step.assignments])
        s.values = tuple([_lower_template(template) for _, template in step.assignments])
    elif type(step) is IfStep:
        s.kind = S_IF
        s.condition = _lower_condition(step.condition)
        s.then = step.then
        s.else_ = step.else_
    elif type(step) is EndStep:
        s.kind = S_END
        s.status = step.status
        s.reason = step.reason
    elif type(step) is WaitForSignalStep:
        s.kind = S_WAIT_FOR_SIGNAL
        s.next = step.next
        s.signal = step.signal
    elif type(step) is ActionStep:
        s.kind = S_ACTION
        s.next = step.next
        s.action = step.action
        s.major = step.major
        s.input = _lower_template(step.input)
        s.timeout_ms = step.timeout_ms
        s.timeout_text = step.timeout_text
        s.max_attempts = step.max_attempts
        s.initial_ms = step.initial_ms
        s.coefficient = step.coefficient
        s.max_interval_ms = step.max_interval_ms
        s.jitter = step.jitter
        s.non_retryable = step.non_retryable
        s.on_failure = step.on_failure
        s.limits = step.limits
        s.limit_key = None if step.limits is None or step.limits.key is None else _lower_template(step.limits.key)
    elif type(step) is WaitStep:
        s.kind = S_WAIT
        s.next = step.next
        s.duration_ms = step.duration_ms
        s.until = None if step.until is None else _lower_template(step.until)
        s.on_failure = step.on_failure
    elif type(step) is WaitForEventStep:
        s.kind = S_WAIT_FOR_EVENT
        s.next = step.next
        s.event = step.event
        s.wait_key = WAIT_EVENT + step.event
        s.filter = None if step.filter is None else _lower_condition(step.filter)
        s.timeout_ms = step.timeout_ms
        s.on_timeout = step.on_timeout
    elif type(step) is SwitchStep:
        s.kind = S_SWITCH
        s.cases = tuple([_lower_condition(condition) for condition, _ in step.cases])
        s.targets = tuple([target for _, target in step.cases])
        s.default = step.default
    elif type(step) is GotoStep:
        s.kind = S_GOTO
        s.target = step.target
    elif type(step) is EmitStep:
        s.kind = S_EMIT
        s.next = step.next
        s.event = step.event
        s.data = _lower_template(step.data)
    else:
        raise TypeError(unknown_step(step))
    return s


cdef class Program:
    """A workflow definition compiled for the dispatcher (DefinitionError if it cannot run)."""

    cdef readonly str workflow_id
    cdef readonly object version
    cdef readonly str tenant
    cdef readonly str trigger_event
    cdef readonly str subject_type
    cdef readonly Py_ssize_t max_steps
    cdef readonly Py_ssize_t max_visits
    cdef readonly object max_running
    cdef readonly tuple gates
    cdef readonly Py_ssize_t on_failure  # workflow-level failure branch: a step index, or -1
    cdef readonly tuple step_ids
    cdef _Condition _filter
    cdef tuple _steps

    def __init__(self, definition, enrolment_rate_per_s=None):
        """`enrolment_rate_per_s`: the tenant's enrolment rate (from the config), a start gate of every
        new execution besides the definition's `limits.max_running`."""
        resolved = resolve(definition)
        self.workflow_id = resolved.workflow_id
        self.version = resolved.version
        self.tenant = resolved.tenant
        self.trigger_event = resolved.trigger_event
        self.subject_type = resolved.subject_type
        self.max_steps = resolved.max_steps
        self.max_visits = resolved.max_visits
        self.max_running = resolved.max_running
        # What a new execution passes before its first step (empty: it starts at once).
        self.gates = start_gates(resolved.tenant, resolved.workflow_id, enrolment_rate_per_s, resolved.max_running)
        self.on_failure = resolved.on_failure
        self.step_ids = tuple([step.id for step in resolved.steps])
        self._filter = None if resolved.trigger_filter is None else _lower_condition(resolved.trigger_filter)
        self._steps = tuple([_lower_step(step) for step in resolved.steps])

    def matches(self, event, subject=None):
        """Whether a trigger event enrols its subject: its type and the trigger filter.

        `subject` is the event's subject record (`hotpath.envelope.subject_of`); None reads its `contact`.
        """
        if not PyDict_Check(event) or event.get("type") != self.trigger_event:
            return False
        if self._filter is None:
            return True
        if subject is None:
            subject = event.get("contact")
        return _holds(self._filter, _NO_CONTEXT, subject, event)

    def __repr__(self):
        return program_repr(self.tenant, self.workflow_id, self.version, len(self.step_ids))


cdef class ExecutionState:
    """One execution's mutable state; the dispatcher reads and writes it in place.

    The worker persists every attribute but `effects` and passes them back as
    constructor keywords:
      status    running | waiting | completed | failed | cancelled
      pc        index of the step to run next, or of the step being waited on / that failed
      seq       the last transition seq written
      steps     steps executed over the execution's life
      waiting   while status == "waiting": the awaited signal's name (wait_for_signal),
                "action" (a result), "retry" (a back-off), "timer" (a wait step) or
                "event:<type>" (wait_for_event)
      attempt   the current attempt of the action step at pc (1-based), or the start gate
                waited at ("start"); 0 elsewhere
      timer     the id of the one timer the execution waits on, or None
      visits    {step id: times entered}; the action idempotency key and emitted
                event ids use it, and limits.max_visits bounds it; "#start" once the
                execution entered start gates (its slot is given back when it ends)
      failures  the failed attempts of the current action step visit,
                [{"attempt", "error"}], reset when the step is left or retried
      tenant    the execution's tenant (set by the caller; emitted events carry it)
      effects   appended to by advance; the caller reads and clears it (not persisted)
    """

    cdef public object execution_id
    cdef public object status
    cdef public long long pc
    cdef public long long seq
    cdef public object context
    cdef public object subject
    cdef public object event
    cdef public long long steps
    cdef public object waiting
    cdef public long long attempt
    cdef public object timer
    cdef public object visits
    cdef public object failures
    cdef public object tenant
    cdef public object effects

    def __init__(self, execution_id, status=RUNNING, pc=0, seq=0, context=None, subject=None,
                 event=None, steps=0, waiting=None, attempt=0, timer=None, visits=None, failures=None,
                 tenant="", effects=None):
        self.execution_id = execution_id
        self.status = status
        self.pc = pc
        self.seq = seq
        self.context = {} if context is None else context
        self.subject = {} if subject is None else subject
        self.event = {} if event is None else event
        self.steps = steps
        self.waiting = waiting
        self.attempt = attempt
        self.timer = timer
        self.visits = {} if visits is None else visits
        self.failures = [] if failures is None else failures
        self.tenant = tenant
        self.effects = [] if effects is None else effects

    def __repr__(self):
        return state_repr(self.execution_id, self.status, self.pc, self.seq)


# -- advancing -----------------------------------------------------------------
def advance(Program program, ExecutionState state, kind, payload, now_ms=0):
    """Apply one event to `state`; return the transitions made (effects go to state.effects)."""
    cdef list out = []
    cdef _Step step
    if kind == START:
        if state.seq != 0:
            raise ValueError(already_started(state.execution_id, state.seq))
        state.seq += 1
        out.append((state.seq, "", STARTED, {"workflow_id": program.workflow_id, "version": program.version}))
        if program.gates:
            state.visits[START_GATED] = 1
            state.attempt = 1
            _wait_at_gate(program, state, out)
        else:
            _run(program, state, out, now_ms)
    elif kind == SIGNAL:
        status = state.status
        if status == COMPLETED or status == FAILED or status == CANCELLED:
            return out
        if not PyDict_Check(payload) or not isinstance(payload.get("name"), str):
            raise ValueError(bad_signal(payload))
        name = payload["name"]
        data = payload.get("data")
        step = None
        if status == WAITING:
            _check_pc(program, state)
            step = <_Step>program._steps[state.pc]
        state.seq += 1
        # The detail holds a copy: a later set step may write into context[step.id].
        out.append((state.seq, step.id if step is not None else "", SIGNAL, {"name": name, "data": _copy_json(data)}))
        if step is not None and step.kind == S_WAIT_FOR_SIGNAL and name == state.waiting:
            state.context[step.id] = data
            state.waiting = None
            state.status = RUNNING
            state.pc = step.next
            _run(program, state, out, now_ms)
    elif kind == ACTION_RESULT:
        _on_action_result(program, state, out, payload, now_ms)
    elif kind == TIMER:
        _on_timer(program, state, out, payload, now_ms)
    elif kind == EVENT:
        _on_event(program, state, out, payload, now_ms)
    elif kind == CANCEL:
        _on_cancel(program, state, out, payload)
    elif kind == RETRY:
        _on_retry(program, state, out, now_ms)
    elif kind == LIMIT_GRANTED:
        _on_limit_granted(program, state, out, payload, now_ms)
    else:
        raise ValueError(unknown_event_kind(kind))
    if START_GATED in state.visits:
        status = state.status
        if status == COMPLETED or status == FAILED or status == CANCELLED:
            # Its start slot (or its place at a gate) is given back, once: the mark goes with it.
            del state.visits[START_GATED]
            state.effects.append((EFFECT_LIMIT_RELEASE, None))
    return out


cdef int _check_pc(Program program, ExecutionState state) except -1:
    # A state loaded from elsewhere must not index outside the steps (no bounds checks here).
    if not 0 <= state.pc <= len(program._steps) or (state.status == WAITING and state.pc == len(program._steps)):
        raise ValueError(pc_outside_steps(state.execution_id, state.pc))
    return 0


cdef inline int _emit(ExecutionState state, list out, object step_id, object kind, object detail) except -1:
    state.seq += 1
    out.append((state.seq, step_id, kind, detail))
    return 0


cdef _Step _waiting_step(Program program, ExecutionState state, StepKind kind):
    """The step at pc when the execution waits there and it is of `kind`, else None."""
    if state.status != WAITING:
        return None
    _check_pc(program, state)
    cdef _Step step = <_Step>program._steps[state.pc]
    return step if step.kind == kind else None


cdef dict _emitted_subject(Program program, object subject):
    """An emitted event is about the execution's subject: `contact` for a contact, else a typed `subject`."""
    if program.subject_type == CONTACT:
        return {"contact": _copy_json(subject)}
    return {"subject": {"type": program.subject_type, **_copy_json(subject)}}


cdef int _resume(Program program, ExecutionState state, list out, Py_ssize_t pc, object now_ms) except -1:
    state.status = RUNNING
    state.waiting = None
    state.pc = pc
    return _run(program, state, out, now_ms)


# -- timers, waits and actions ---------------------------------------------------
cdef int _set_timer(ExecutionState state, str step_id, str purpose, object fire_at_ms) except -1:
    # The seq makes the id unique also across an operator retry's new attempt series.
    timer_id = f"{step_id}:{state.visits.get(step_id, 0)}:{state.attempt}:{purpose}:{state.seq}"
    state.timer = timer_id
    state.effects.append(
        (EFFECT_SET_TIMER, {"timer_id": timer_id, "fire_at_ms": fire_at_ms, "purpose": purpose, "step_id": step_id})
    )
    return 0


cdef inline int _clear_timer(ExecutionState state) except -1:
    if state.timer is not None:
        state.timer = None
        state.effects.append((EFFECT_CLEAR_TIMER, None))
    return 0


cdef bint _request(Program program, ExecutionState state, list out, _Step step, object now_ms) except -1:
    """Ask for attempt `state.attempt` of an action and wait for its result or its timeout.

    True when its input names a missing field and the step's failure branch was taken.
    """
    try:
        rendered = _render(step.input, state.context, state.subject, state.event, True)
    except TemplateError as exc:
        _release_limit(state, step)
        return _template_failed(program, state, out, step, exc)
    _emit(state, out, step.id, ACTION_REQUESTED, {"attempt": state.attempt, "action": step.action})
    request = {
        "step_id": step.id,
        "attempt": state.attempt,
        "action": step.action,
        "major": step.major,
        "input": rendered,
        "idempotency_key": f"{state.execution_id}:{step.id}:{state.visits.get(step.id, 0)}",
        "timeout_ms": step.timeout_ms,
    }
    if step.limits is not None and step.limits.rate_per_s is not None:
        # The call itself takes a rate token when it is made (daemon/effects.py): exact at the provider.
        request["rate_limit"] = {"bucket": _bucket(state, step), "rate_per_s": step.limits.rate_per_s}
    state.effects.append((EFFECT_ACTION, request))
    _set_timer(state, step.id, PURPOSE_ACTION_TIMEOUT, now_ms + step.timeout_ms)
    state.status = WAITING
    state.waiting = WAIT_ACTION
    return False


cdef int _wait_for_limit(ExecutionState state, list out, _Step step) except -1:
    """Queue attempt `state.attempt` behind the step's limits; a grant (`_on_limit_granted`) requests it."""
    limits = step.limits
    bucket = _bucket(state, step)
    _emit(state, out, step.id, LIMIT_WAITING, {"attempt": state.attempt, "bucket": bucket})
    state.effects.append((EFFECT_LIMIT_WAIT, {
        "step_id": step.id,
        "attempt": state.attempt,
        "bucket": bucket,
        "action": step.action,
        "rate_per_s": limits.rate_per_s,
        "concurrency": limits.concurrency,
        "lease_ms": step.timeout_ms,
    }))
    state.status = WAITING
    state.waiting = WAIT_LIMIT
    return 0


cdef str _bucket(ExecutionState state, _Step step):
    key = None
    if step.limit_key is not None:
        key = _render(step.limit_key, state.context, state.subject, state.event, False)
    return limit_bucket(step.action, step.major, state.tenant, key)


cdef inline int _release_limit(ExecutionState state, _Step step) except -1:
    """The step's call is over (or will not be made): give back its slot or its place in the queue."""
    if step.limits is not None:
        state.effects.append((EFFECT_LIMIT_RELEASE, None))
    return 0


cdef int _wait_at_gate(Program program, ExecutionState state, list out) except -1:
    """Queue the new execution at start gate `state.attempt` (a ledger row written with this commit)."""
    gate = program.gates[state.attempt - 1]
    _emit(state, out, START_GATED, LIMIT_WAITING, {"attempt": state.attempt, "bucket": gate["bucket"]})
    state.effects.append((EFFECT_LIMIT_WAIT, {"step_id": START_GATED, "attempt": state.attempt, **gate}))
    state.status = WAITING
    state.waiting = WAIT_START
    return 0


cdef int _on_gate_granted(Program program, ExecutionState state, list out, object now_ms) except -1:
    """Its turn at a start gate: on to the next gate, or to the first step (the gates read now: a
    reload may have changed them meanwhile)."""
    _emit(state, out, START_GATED, LIMIT_GRANTED, {"attempt": state.attempt})
    if state.attempt < len(program.gates):
        state.attempt += 1
        return _wait_at_gate(program, state, out)
    state.attempt = 0
    return _resume(program, state, out, 0, now_ms)


cdef int _on_limit_granted(Program program, ExecutionState state, list out, object payload, object now_ms) except -1:
    if (
        not PyDict_Check(payload)
        or not isinstance(payload.get("step_id"), str)
        or type(payload.get("attempt")) is not int
    ):
        raise ValueError(bad_limit_grant(payload))
    if state.waiting == WAIT_START and state.status == WAITING:
        if payload["step_id"] == START_GATED and payload["attempt"] == state.attempt:
            _on_gate_granted(program, state, out, now_ms)
        return 0  # else stale: changes nothing
    cdef _Step step = _waiting_step(program, state, S_ACTION)
    if (
        step is None
        or state.waiting != WAIT_LIMIT
        or step.id != payload["step_id"]
        or state.attempt != payload["attempt"]
    ):
        return 0  # stale (the execution moved on, or a repeated grant): changes nothing
    _emit(state, out, step.id, LIMIT_GRANTED, {"attempt": state.attempt})
    if _request(program, state, out, step, now_ms):
        _run(program, state, out, now_ms)
    return 0


cdef bint _template_failed(Program program, ExecutionState state, list out, _Step step, object exc) except -1:
    return _step_failed(program, state, out, step, exc.as_error(), 1)


cdef int _on_action_result(Program program, ExecutionState state, list out, object payload, object now_ms) except -1:
    if (
        not PyDict_Check(payload)
        or not isinstance(payload.get("step_id"), str)
        or type(payload.get("attempt")) is not int
        or type(payload.get("ok")) is not bool
    ):
        raise ValueError(bad_action_result(payload))
    step_id = payload["step_id"]
    attempt = payload["attempt"]
    ok = payload["ok"]
    cdef _Step step = _waiting_step(program, state, S_ACTION)
    if step is None or state.waiting != WAIT_ACTION or step.id != step_id or state.attempt != attempt:
        # Late (after a timeout or a retry) or for another step: recorded, changes nothing.
        _emit(state, out, step_id, LATE_RESULT, {"attempt": attempt, "ok": ok})
        return 0
    _release_limit(state, step)
    if ok:
        output = payload.get("output")
        state.context[step.id] = output
        # The output is an input of the run: replay reads it back from the detail (a copy, see signal).
        _emit(state, out, step.id, ACTION_COMPLETED, {"attempt": attempt, "output": _copy_json(output)})
        _clear_timer(state)
        state.attempt = 0
        state.failures = []
        return _resume(program, state, out, step.next, now_ms)
    error = payload.get("error")
    if not PyDict_Check(error):
        error = no_error_object(error)
    return _action_failed(program, state, out, step, error, now_ms, None)


cdef int _action_failed(Program program, ExecutionState state, list out, _Step step, dict error, object now_ms,
                        object timer_id) except -1:
    attempt = state.attempt
    detail = {"attempt": attempt, "error": error}
    if timer_id is not None:  # a timeout: the timer that fired, not a result, is the input
        detail["timer_id"] = timer_id
    _emit(state, out, step.id, ACTION_FAILED, detail)
    state.failures.append({"attempt": attempt, "error": error})
    code = error.get("code")
    if error.get("retryable", True) is True and code not in step.non_retryable and attempt < step.max_attempts:
        delay = retry_delay_ms(
            state.execution_id, step.id, attempt, step.initial_ms, step.coefficient, step.max_interval_ms, step.jitter
        )
        _set_timer(state, step.id, PURPOSE_RETRY, now_ms + delay)  # replaces the action timeout
        state.waiting = WAIT_RETRY
        return 0
    _clear_timer(state)
    if _step_failed(program, state, out, step, error, attempt):
        _run(program, state, out, now_ms)
    return 0


cdef int _on_timer(Program program, ExecutionState state, list out, object payload, object now_ms) except -1:
    if not PyDict_Check(payload) or not isinstance(payload.get("timer_id"), str):
        raise ValueError(bad_timer(payload))
    if state.timer is None or payload["timer_id"] != state.timer:
        return 0  # stale: replaced, cleared, or already fired
    _check_pc(program, state)
    cdef _Step step = <_Step>program._steps[state.pc] if state.status == WAITING else None
    waiting = state.waiting
    timer_id = state.timer
    if step is not None and step.kind == S_ACTION and waiting == WAIT_ACTION:
        state.timer = None
        _release_limit(state, step)
        return _action_failed(program, state, out, step, action_timed_out(step.timeout_text), now_ms, timer_id)
    if step is not None and step.kind == S_ACTION and waiting == WAIT_RETRY:
        state.timer = None
        state.attempt += 1
        if step.limits is not None:
            return _wait_for_limit(state, out, step)
        if _request(program, state, out, step, now_ms):
            _run(program, state, out, now_ms)
        return 0
    if step is not None and step.kind == S_WAIT and waiting == WAIT_TIMER:
        state.timer = None
        _emit(state, out, step.id, TIMER_FIRED, {"purpose": PURPOSE_WAIT, "timer_id": timer_id})
        return _resume(program, state, out, step.next, now_ms)
    if step is not None and step.kind == S_WAIT_FOR_EVENT and waiting == step.wait_key:
        state.timer = None
        _emit(state, out, step.id, TIMED_OUT, {"event": step.event, "timer_id": timer_id})
        state.effects.append((EFFECT_CLEAR_WAIT, None))
        return _resume(program, state, out, step.on_timeout, now_ms)
    raise ValueError(timer_without_wait(state.execution_id, state.timer, waiting))


cdef int _on_event(Program program, ExecutionState state, list out, object payload, object now_ms) except -1:
    if not PyDict_Check(payload) or not isinstance(payload.get("type"), str):
        raise ValueError(bad_event(payload))
    cdef _Step step = _waiting_step(program, state, S_WAIT_FOR_EVENT)
    if step is None or state.waiting != WAIT_EVENT + payload["type"]:
        return 0  # not for us: nothing recorded
    if step.filter is not None and not _holds(step.filter, state.context, state.subject, payload):
        return 0
    data = payload.get("data")
    state.context[step.id] = data
    _emit(state, out, step.id, EVENT_RECEIVED,
          {"event_id": payload.get("event_id"), "type": payload["type"], "data": _copy_json(data)})
    state.effects.append((EFFECT_CLEAR_WAIT, None))
    _clear_timer(state)
    return _resume(program, state, out, step.next, now_ms)


cdef int _on_cancel(Program program, ExecutionState state, list out, object payload) except -1:
    status = state.status
    if status == COMPLETED or status == FAILED or status == CANCELLED:
        return 0
    reason = payload.get("reason") if PyDict_Check(payload) else None
    _emit(state, out, "", CANCELLED, {"reason": reason})
    _clear_timer(state)
    if status == WAITING and isinstance(state.waiting, str) and state.waiting.startswith(WAIT_EVENT):
        state.effects.append((EFFECT_CLEAR_WAIT, None))
    cdef _Step step
    if status == WAITING and (state.waiting == WAIT_LIMIT or state.waiting == WAIT_ACTION):
        step = _waiting_step(program, state, S_ACTION)
        if step is not None:
            _release_limit(state, step)
    state.status = CANCELLED
    state.waiting = None
    return 0


cdef int _on_retry(Program program, ExecutionState state, list out, object now_ms) except -1:
    cdef tuple steps = program._steps
    if (
        state.status != FAILED
        or not 0 <= state.pc < len(steps)
        or (<_Step>steps[state.pc]).kind != S_ACTION
    ):
        raise ValueError(NOT_FAILED_AT_ACTION)
    cdef _Step step = <_Step>steps[state.pc]
    state.status = RUNNING
    state.attempt = 0
    state.failures = []
    _emit(state, out, step.id, RETRIED, None)
    # The same step visit again (visits unchanged): the idempotency key stays the same.
    state.steps += 1
    state.attempt = 1
    if step.limits is not None:
        return _wait_for_limit(state, out, step)
    if _request(program, state, out, step, now_ms):
        _run(program, state, out, now_ms)
    return 0


cdef bint _step_failed(Program program, ExecutionState state, list out, _Step step, dict error,
                       object attempts) except -1:
    """A step failed for good: take its on_failure branch, else the workflow's, else fail the execution.

    True when a branch was taken (the execution is running again at its target).
    """
    _emit(state, out, step.id, STEP_FAILED, {"error": error, "attempts": attempts})
    cdef Py_ssize_t target = step.on_failure
    if target < 0 and program.on_failure != state.pc:  # a failing failure branch does not re-enter itself
        target = program.on_failure
    if target >= 0:
        state.attempt = 0
        state.failures = []
        state.status = RUNNING
        state.waiting = None
        state.pc = target
        return True
    _emit(state, out, step.id, FAILED, {"error": error.get("message"), "code": error.get("code")})
    state.status = FAILED
    state.waiting = None
    code = error.get("code")
    if step.kind == S_ACTION or code in TEMPLATE_ERRORS:
        state.effects.append((EFFECT_DEAD_LETTER, {
            "reason": code if code in TEMPLATE_ERRORS else REASON_STEP_FAILED,
            "step_id": step.id,
            "error": error,
            "attempts": list(state.failures),
        }))
    return False


cdef bint _park(Program program, ExecutionState state, list out, _Step step, object now_ms) except -1:
    """Enter an action, wait or wait_for_event step; True when the run goes on (a failure branch)."""
    if step.kind == S_ACTION:
        state.attempt = 1
        state.failures = []
        if step.limits is None:
            return _request(program, state, out, step, now_ms)
        _wait_for_limit(state, out, step)
        return False
    if step.kind == S_WAIT:
        if step.until is None:
            until_ms = now_ms + step.duration_ms
        else:
            try:
                until_ms = parse_instant(_render(step.until, state.context, state.subject, state.event, True))
            except TemplateError as exc:
                return _template_failed(program, state, out, step, exc)
            except ValueError as exc:
                return _step_failed(program, state, out, step, bad_until(exc), 1)
        _emit(state, out, step.id, WAITING, {"until_ms": until_ms})
        _set_timer(state, step.id, PURPOSE_WAIT, until_ms)
        state.status = WAITING
        state.waiting = WAIT_TIMER
        return False
    # S_WAIT_FOR_EVENT
    _emit(state, out, step.id, WAITING, {"event": step.event})
    state.effects.append((EFFECT_WAIT_EVENT, {"event_type": step.event, "step_id": step.id}))
    _set_timer(state, step.id, PURPOSE_EVENT_TIMEOUT, now_ms + step.timeout_ms)
    state.status = WAITING
    state.waiting = step.wait_key
    return False


cdef inline void _assign(dict context, tuple path, object value) except *:
    """context[a][b][c] = value for path (a, b, c), creating (or replacing non-dict) parents."""
    cdef Py_ssize_t i, last = PyTuple_GET_SIZE(path) - 1
    cdef dict target = context
    cdef PyObject* found
    for i in range(last):
        key = <object>PyTuple_GET_ITEM(path, i)
        found = PyDict_GetItemWithError(target, key)
        if found == NULL or not PyDict_Check(<object>found):
            child = {}
            target[key] = child
            target = child
        else:
            target = <dict>found
    target[<object>PyTuple_GET_ITEM(path, last)] = value


cdef int _run(Program program, ExecutionState state, list out, object now_ms) except -1:
    cdef tuple steps = program._steps
    cdef Py_ssize_t n = PyTuple_GET_SIZE(steps)
    cdef Py_ssize_t ran = 0, i, pc = state.pc
    cdef long long seq = state.seq, executed = state.steps, visit
    cdef _Step step
    cdef _Template template
    cdef dict context = state.context
    cdef dict visits = state.visits
    cdef PyObject* found
    cdef bint goes_on
    subject = state.subject
    event = state.event
    if state.status != RUNNING:
        return 0
    _check_pc(program, state)
    try:
        while True:
            try:
                while True:
                    if pc == n:
                        seq += 1
                        out.append((seq, "", COMPLETED, None))
                        state.status = COMPLETED
                        _clear_timer(state)
                        return 0
                    step = <_Step>PyTuple_GET_ITEM(steps, pc)
                    if ran == program.max_steps:
                        seq += 1
                        out.append((seq, step.id, FAILED, too_many_steps(program.max_steps)))
                        state.status = FAILED
                        return 0
                    found = PyDict_GetItemWithError(visits, step.id)
                    visit = 1 if found == NULL else <long long>(<object>found) + 1
                    if visit > program.max_visits:
                        seq += 1
                        out.append((seq, step.id, FAILED, too_many_visits(step.id, program.max_visits)))
                        state.status = FAILED
                        return 0
                    visits[step.id] = visit
                    ran += 1
                    executed += 1
                    if step.kind == S_SET:
                        for i in range(PyTuple_GET_SIZE(step.values)):
                            template = <_Template>PyTuple_GET_ITEM(step.values, i)
                            path = <tuple>PyTuple_GET_ITEM(step.paths, i)
                            if template.tag == T_LIT:
                                value = template.value
                            else:
                                value = _render(template, context, subject, event, True)
                            if PyTuple_GET_SIZE(path) == 1:
                                context[<object>PyTuple_GET_ITEM(path, 0)] = value
                            else:
                                _assign(context, path, value)
                        seq += 1
                        out.append((seq, step.id, SET, None))
                        pc = step.next
                    elif step.kind == S_IF:
                        if _holds(step.condition, context, subject, event):
                            pc = step.then
                            taken = "then"
                        else:
                            pc = step.else_
                            taken = "else"
                        seq += 1
                        out.append((seq, step.id, BRANCH, {
                            "to": (<_Step>PyTuple_GET_ITEM(steps, pc)).id if pc < n else "",
                            "taken": taken,
                        }))
                    elif step.kind == S_SWITCH:
                        pc = step.default
                        case = "default"
                        for i in range(PyTuple_GET_SIZE(step.cases)):
                            if _holds(<_Condition>PyTuple_GET_ITEM(step.cases, i), context, subject, event):
                                pc = <Py_ssize_t>(<object>PyTuple_GET_ITEM(step.targets, i))
                                case = i
                                break
                        seq += 1
                        out.append((seq, step.id, BRANCH, {
                            "to": (<_Step>PyTuple_GET_ITEM(steps, pc)).id if pc < n else "",
                            "case": case,
                        }))
                    elif step.kind == S_GOTO:
                        pc = step.target
                        seq += 1
                        out.append((seq, step.id, GOTO, {
                            "to": (<_Step>PyTuple_GET_ITEM(steps, pc)).id if pc < n else "",
                        }))
                    elif step.kind == S_EMIT:
                        event_id = f"{state.execution_id}:{step.id}:{visit}"
                        state.effects.append((EFFECT_EMIT, {"event": {
                            # A typed subject is trigger contract 1.2; a contact is 1.0.
                            "v": 1 if program.subject_type == CONTACT else SUBJECT_CONTRACT,
                            "event_id": event_id,
                            "tenant": state.tenant,
                            "type": step.event,
                            **_emitted_subject(program, subject),
                            "data": _render(step.data, context, subject, event, True),
                            "ts": now_ms,
                        }}))
                        seq += 1
                        out.append((seq, step.id, EMITTED, {"event_id": event_id, "type": step.event}))
                        pc = step.next
                    elif step.kind == S_END:
                        seq += 1
                        detail = None if step.reason is None else {"reason": step.reason}
                        out.append((seq, step.id, step.status, detail))
                        state.status = step.status
                        _clear_timer(state)
                        return 0
                    elif step.kind == S_WAIT_FOR_SIGNAL:
                        seq += 1
                        out.append((seq, step.id, WAITING, {"signal": step.signal}))
                        state.status = WAITING
                        state.waiting = step.signal
                        return 0
                    else:  # action, wait, wait_for_event: these work on the state itself
                        state.pc = pc
                        state.seq = seq
                        goes_on = _park(program, state, out, step, now_ms)
                        pc = state.pc
                        seq = state.seq
                        if not goes_on:
                            return 0
            except TemplateError as exc:
                # A set or emit value names a missing field (_park handles actions and waits).
                state.pc = pc
                state.seq = seq
                goes_on = _template_failed(program, state, out, step, exc)
                pc = state.pc
                seq = state.seq
                if not goes_on:
                    return 0
    finally:
        state.pc = pc
        state.seq = seq
        state.steps = executed
