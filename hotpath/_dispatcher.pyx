# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The step dispatcher, compiled (same API and behaviour as `hotpath.dispatcher`).

The resolved definition from `hotpath.definition.resolve` (the same one the
pure twin interprets) is lowered into cdef nodes: steps with a C-int kind and
C-int targets, templates with C arrays of list indexes, conditions with a
C-int operator. The run loop keeps pc/seq/step counts in C locals and writes
them back to the state when it stops (also when it raises).
"""

from cpython.dict cimport PyDict_Check
from cpython.list cimport PyList_Check
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from hotpath.definition import EndStep, IfStep, SetStep, WaitForSignalStep, resolve

cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL

cdef enum TemplateTag:
    T_LIT, T_PATH, T_INTERP, T_DICT, T_LIST

cdef enum Root:
    R_CONTEXT, R_CONTACT, R_EVENT

cdef enum Op:
    OP_ALL, OP_ANY, OP_NOT, OP_EXISTS, OP_EQ, OP_NE, OP_GT, OP_GTE, OP_LT, OP_LTE, OP_IN, OP_CONTAINS

cdef enum StepKind:
    S_SET, S_IF, S_END, S_WAIT_FOR_SIGNAL

cdef dict _ROOTS = {"context": R_CONTEXT, "contact": R_CONTACT, "event": R_EVENT}
cdef dict _OPS = {
    "all": OP_ALL, "any": OP_ANY, "not": OP_NOT, "exists": OP_EXISTS,
    "eq": OP_EQ, "ne": OP_NE, "gt": OP_GT, "gte": OP_GTE, "lt": OP_LT, "lte": OP_LTE,
    "in": OP_IN, "contains": OP_CONTAINS,
}
cdef dict _NO_CONTEXT = {}  # the context trigger filters see; conditions never write to it


# -- templates -----------------------------------------------------------------
cdef class _Template:
    cdef TemplateTag tag
    cdef object value          # T_LIT
    cdef Root root             # T_PATH
    cdef tuple keys            # T_PATH: segment keys; T_DICT: the dict's keys
    cdef Py_ssize_t* indexes   # T_PATH: segment as list index, or -1
    cdef Py_ssize_t depth      # T_PATH: number of segments
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
        t.keys = tuple([key for key, _ in segments])
        t.indexes = <Py_ssize_t*>PyMem_Malloc((t.depth + 1) * sizeof(Py_ssize_t))
        if t.indexes == NULL:
            raise MemoryError()
        for i in range(t.depth):
            t.indexes[i] = segments[i][1]
    elif tag == "interp":
        t.tag = T_INTERP
        t.parts = tuple([p if isinstance(p, str) else _lower_template(p) for p in node[1]])
    elif tag == "dict":
        t.tag = T_DICT
        t.keys = tuple([key for key, _ in node[1]])
        t.parts = tuple([_lower_template(item) for _, item in node[1]])
    elif tag == "list":
        t.tag = T_LIST
        t.parts = tuple([_lower_template(item) for item in node[1]])
    else:
        raise TypeError(f"unknown template node {node!r}")
    return t


cdef object _lookup(_Template t, object context, object contact, object event):
    """The value at a path template, or None when any part is missing."""
    cdef Py_ssize_t i, index
    cdef PyObject* found
    if t.root == R_CONTEXT:
        value = context
    elif t.root == R_CONTACT:
        value = contact
    else:
        value = event
    for i in range(t.depth):
        if PyDict_Check(value):
            found = PyDict_GetItemWithError(value, <object>PyTuple_GET_ITEM(t.keys, i))
            if found == NULL:
                return None
            value = <object>found
        elif PyList_Check(value):
            index = t.indexes[i]
            if index < 0 or index >= len(<list>value):
                return None
            value = (<list>value)[index]
        else:
            return None
    return value


cdef object _copy_json(object value):
    """A copy of nested dicts and lists, so context never aliases event, contact or program data."""
    if PyDict_Check(value):
        return {k: _copy_json(v) for k, v in (<dict>value).items()}
    if PyList_Check(value):
        return [_copy_json(v) for v in <list>value]
    return value


cdef object _render(_Template t, object context, object contact, object event):
    cdef Py_ssize_t i, n
    cdef list pieces
    if t.tag == T_LIT:
        return t.value
    if t.tag == T_PATH:
        return _copy_json(_lookup(t, context, contact, event))
    if t.tag == T_INTERP:
        n = PyTuple_GET_SIZE(t.parts)
        pieces = [None] * n
        for i in range(n):
            part = <object>PyTuple_GET_ITEM(t.parts, i)
            if type(part) is _Template:
                value = _lookup(<_Template>part, context, contact, event)
                pieces[i] = "" if value is None else str(value)
            else:
                pieces[i] = part
        return "".join(pieces)
    if t.tag == T_DICT:
        result = {}
        for i in range(PyTuple_GET_SIZE(t.parts)):
            result[<object>PyTuple_GET_ITEM(t.keys, i)] = _render(
                <_Template>PyTuple_GET_ITEM(t.parts, i), context, contact, event)
        return result
    return [_render(<_Template>item, context, contact, event) for item in t.parts]


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


cdef bint _holds(_Condition c, object context, object contact, object event) except -1:
    cdef _Condition child
    if c.op == OP_ALL:
        for child in c.children:
            if not _holds(child, context, contact, event):
                return False
        return True
    if c.op == OP_ANY:
        for child in c.children:
            if _holds(child, context, contact, event):
                return True
        return False
    if c.op == OP_NOT:
        return not _holds(c.child, context, contact, event)
    a = _render(c.a, context, contact, event)
    if c.op == OP_EXISTS:
        return a is not None
    b = _render(c.b, context, contact, event)
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
    cdef Py_ssize_t next       # set, wait_for_signal: where to go after
    cdef Py_ssize_t then, else_
    cdef tuple paths           # set: per assignment, the context key path
    cdef tuple values          # set: per assignment, the _Template
    cdef _Condition condition  # if
    cdef str status            # end
    cdef object reason         # end
    cdef str signal            # wait_for_signal


cdef _Step _lower_step(object step):
    cdef _Step s = _Step.__new__(_Step)
    s.id = step.id
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
    else:
        raise TypeError(f"unknown step {step!r}")
    return s


cdef class Program:
    """A workflow definition compiled for the dispatcher (DefinitionError if it cannot run)."""

    cdef readonly str workflow_id
    cdef readonly object version
    cdef readonly str tenant
    cdef readonly str trigger_event
    cdef readonly Py_ssize_t max_steps
    cdef readonly tuple step_ids
    cdef _Condition _filter
    cdef tuple _steps

    def __init__(self, definition):
        resolved = resolve(definition)
        self.workflow_id = resolved.workflow_id
        self.version = resolved.version
        self.tenant = resolved.tenant
        self.trigger_event = resolved.trigger_event
        self.max_steps = resolved.max_steps
        self.step_ids = tuple([step.id for step in resolved.steps])
        self._filter = None if resolved.trigger_filter is None else _lower_condition(resolved.trigger_filter)
        self._steps = tuple([_lower_step(step) for step in resolved.steps])

    def matches(self, event):
        """Whether a trigger event enrols a contact: its type and the trigger filter."""
        if not PyDict_Check(event) or event.get("type") != self.trigger_event:
            return False
        if self._filter is None:
            return True
        return _holds(self._filter, _NO_CONTEXT, event.get("contact"), event)

    def __repr__(self):
        return f"<Program {self.tenant}/{self.workflow_id} v{self.version} steps={len(self.step_ids)}>"


cdef class ExecutionState:
    """One execution's mutable state; the dispatcher reads and writes it in place."""

    cdef public object execution_id
    cdef public object status      # running | waiting | completed | failed | cancelled
    cdef public long long pc       # index of the next step to run
    cdef public long long seq      # last transition seq written
    cdef public object context
    cdef public object contact
    cdef public object event
    cdef public long long steps    # steps executed over the execution's life
    cdef public object waiting     # name of the awaited signal while status == "waiting"

    def __init__(self, execution_id, status="running", pc=0, seq=0, context=None, contact=None,
                 event=None, steps=0, waiting=None):
        self.execution_id = execution_id
        self.status = status
        self.pc = pc
        self.seq = seq
        self.context = {} if context is None else context
        self.contact = {} if contact is None else contact
        self.event = {} if event is None else event
        self.steps = steps
        self.waiting = waiting

    def __repr__(self):
        return f"<ExecutionState {self.execution_id} {self.status} pc={self.pc} seq={self.seq}>"


# -- advancing -----------------------------------------------------------------
def advance(Program program, ExecutionState state, kind, payload):
    """Apply one event to `state`; return the transitions made."""
    cdef list out = []
    cdef _Step step
    if kind == "start":
        if state.seq != 0:
            raise ValueError(f"execution {state.execution_id} has already started (seq {state.seq})")
        state.seq += 1
        out.append((state.seq, "", "started", {"workflow_id": program.workflow_id, "version": program.version}))
        _run(program, state, out)
    elif kind == "signal":
        status = state.status
        if status == "completed" or status == "failed" or status == "cancelled":
            return out
        if not PyDict_Check(payload) or not isinstance(payload.get("name"), str):
            raise ValueError(f"a signal payload needs a 'name' string, got {payload!r}")
        name = payload["name"]
        data = payload.get("data")
        step = None
        if status == "waiting":
            _check_pc(program, state)
            step = <_Step>program._steps[state.pc]
        state.seq += 1
        out.append((state.seq, step.id if step is not None else "", "signal", {"name": name, "data": data}))
        if step is not None and name == state.waiting:
            state.context[step.id] = data
            state.waiting = None
            state.status = "running"
            state.pc = step.next
            _run(program, state, out)
    else:
        raise ValueError(f"unknown event kind {kind!r} (expected 'start' or 'signal')")
    return out


cdef int _check_pc(Program program, ExecutionState state) except -1:
    # A state loaded from elsewhere must not index outside the steps (no bounds checks here).
    if not 0 <= state.pc <= len(program._steps) or (state.status == "waiting" and state.pc == len(program._steps)):
        raise ValueError(f"execution {state.execution_id} has pc {state.pc} outside the program's steps")
    return 0


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


cdef int _run(Program program, ExecutionState state, list out) except -1:
    cdef tuple steps = program._steps
    cdef Py_ssize_t n = PyTuple_GET_SIZE(steps)
    cdef Py_ssize_t ran = 0, i, pc = state.pc
    cdef long long seq = state.seq, executed = state.steps
    cdef _Step step
    cdef _Template template
    cdef dict context = state.context
    contact = state.contact
    event = state.event
    if state.status != "running":
        return 0
    _check_pc(program, state)
    try:
        while True:
            if pc == n:
                seq += 1
                out.append((seq, "", "completed", None))
                state.status = "completed"
                return 0
            step = <_Step>PyTuple_GET_ITEM(steps, pc)
            if ran == program.max_steps:
                seq += 1
                error = f"loop guard: more than {program.max_steps} steps in one run"
                out.append((seq, step.id, "failed", {"error": error, "code": "loop_guard"}))
                state.status = "failed"
                return 0
            ran += 1
            executed += 1
            if step.kind == S_SET:
                for i in range(PyTuple_GET_SIZE(step.values)):
                    template = <_Template>PyTuple_GET_ITEM(step.values, i)
                    path = <tuple>PyTuple_GET_ITEM(step.paths, i)
                    value = template.value if template.tag == T_LIT else _render(template, context, contact, event)
                    if PyTuple_GET_SIZE(path) == 1:
                        context[<object>PyTuple_GET_ITEM(path, 0)] = value
                    else:
                        _assign(context, path, value)
                seq += 1
                out.append((seq, step.id, "set", None))
                pc = step.next
            elif step.kind == S_IF:
                if _holds(step.condition, context, contact, event):
                    pc = step.then
                    taken = "then"
                else:
                    pc = step.else_
                    taken = "else"
                seq += 1
                out.append((seq, step.id, "branch", {
                    "to": (<_Step>PyTuple_GET_ITEM(steps, pc)).id if pc < n else "",
                    "taken": taken,
                }))
            elif step.kind == S_END:
                seq += 1
                out.append((seq, step.id, step.status, None if step.reason is None else {"reason": step.reason}))
                state.status = step.status
                return 0
            else:  # S_WAIT_FOR_SIGNAL
                seq += 1
                out.append((seq, step.id, "waiting", {"signal": step.signal}))
                state.status = "waiting"
                state.waiting = step.signal
                return 0
    finally:
        state.pc = pc
        state.seq = seq
        state.steps = executed
