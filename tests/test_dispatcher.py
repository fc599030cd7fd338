"""The step dispatcher, compiled and pure: one test body, two implementations,
plus a differential test that the two agree on random workflows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hotpath
from hotpath.definition import DefinitionError


@pytest.fixture(scope="module", params=hotpath.implementations(), ids=["compiled", "pure"])
def impl(request):
    name, namespace = request.param
    if namespace is None:
        if hotpath.NO_EXTENSIONS:
            pytest.skip(hotpath.COMPILED_UNAVAILABLE)
        pytest.fail(f"{name}: {hotpath.COMPILED_UNAVAILABLE}")
    return namespace


def workflow(*steps, trigger=None, max_steps=None, **extra) -> dict:
    definition = {"id": "wf", "tenant": "acme", "version": 2, "trigger": trigger or {"event": "contact.created"}}
    if max_steps is not None:
        definition["limits"] = {"max_steps": max_steps}
    definition["steps"] = list(steps)
    definition.update(extra)
    return definition


def run(impl, definition, contact=None, event=None, context=None):
    program = impl.Program(definition)
    state = impl.ExecutionState("exec-1", contact=contact, event=event, context=context)
    return program, state, impl.advance(program, state, "start", None)


def kinds(transitions) -> list:
    return [(step_id, kind) for _, step_id, kind, _ in transitions]


def set_step(step_id, values, **more):
    return {"id": step_id, "type": "set", "values": values, **more}


def holds(impl, condition, contact=None, event=None, context=None) -> bool:
    """Evaluate a condition through an if step."""
    definition = workflow({"id": "c", "type": "if", "condition": condition, "then": "yes", "else": "no"},
                          {"id": "yes", "type": "end"}, {"id": "no", "type": "end"})
    _, _, out = run(impl, definition, contact=contact, event=event, context=context)
    return out[-1][1] == "yes"


# -- basics ----------------------------------------------------------------------
def test_program_attributes(impl):
    program = impl.Program(workflow(set_step("a", {"x": 1}), {"id": "b", "type": "end"}, max_steps=7))
    assert (program.workflow_id, program.version, program.tenant) == ("wf", 2, "acme")
    assert (program.trigger_event, program.max_steps, program.step_ids) == ("contact.created", 7, ("a", "b"))
    assert impl.Program(workflow({"id": "e", "type": "end"})).max_steps == 1000


def test_program_rejects_bad_definitions(impl):
    with pytest.raises(DefinitionError) as info:
        impl.Program(workflow({"id": "c", "type": "if", "condition": {"eq": [1, 1]}, "then": "nope"}))
    assert info.value.errors == ["steps[0] (id 'c'): 'then' points at unknown step 'nope'"]
    with pytest.raises(DefinitionError):
        impl.Program(workflow(set_step("a", {"x": "{{nobody.x}}"})))
    with pytest.raises(DefinitionError):
        impl.Program(workflow({"id": "c", "type": "if", "condition": {"maybe": [1, 1]}}))


def test_state_defaults(impl):
    state = impl.ExecutionState("e")
    assert (state.execution_id, state.status, state.pc, state.seq, state.steps, state.waiting) == ("e", "running", 0, 0, 0, None)
    assert state.context == {} and state.contact == {} and state.event == {}
    state.status = "cancelled"
    state.pc = 3
    assert (state.status, state.pc) == ("cancelled", 3)


def test_linear_set_workflow(impl):
    definition = workflow(set_step("a", {"x": 1}), set_step("b", {"y": "two"}), set_step("c", {"z": [3]}))
    _, state, out = run(impl, definition)
    assert out == [
        (1, "", "started", {"workflow_id": "wf", "version": 2}),
        (2, "a", "set", None),
        (3, "b", "set", None),
        (4, "c", "set", None),
        (5, "", "completed", None),
    ]
    assert state.context == {"x": 1, "y": "two", "z": [3]}
    assert (state.status, state.pc, state.seq, state.steps) == ("completed", 3, 5, 3)


def test_templates_raw_interpolated_and_missing(impl):
    contact = {"name": "Ann", "age": 41, "tags": ["a", "b"], "nil": None}
    event = {"data": {"items": [{"sku": "X-1"}, {"sku": "Y-2"}]}}
    values = {
        "raw_int": "{{ contact.age }}",
        "raw_list": "{{contact.tags}}",
        "raw_missing": "{{contact.nope.deeper}}",
        "greeting": "Hi {{contact.name}}, you are {{ contact.age }}!",
        "with_missing": "[{{contact.nope}}][{{contact.nil}}]",
        "indexed": "{{event.data.items.1.sku}}",
        "out_of_range": "{{event.data.items.5.sku}}",
        "literal": "no templates {here}",
        "nested": {"who": "{{contact.name}}", "list": ["{{contact.age}}", 1, None, True]},
        "number": 2.5,
    }
    _, state, _ = run(impl, workflow(set_step("s", values)), contact=contact, event=event)
    assert state.context == {
        "raw_int": 41,
        "raw_list": ["a", "b"],
        "raw_missing": None,
        "greeting": "Hi Ann, you are 41!",
        "with_missing": "[][]",
        "indexed": "Y-2",
        "out_of_range": None,
        "literal": "no templates {here}",
        "nested": {"who": "Ann", "list": [41, 1, None, True]},
        "number": 2.5,
    }
    # Raw values are copies: changing the context does not change the contact.
    state.context["raw_list"].append("c")
    assert contact["tags"] == ["a", "b"]


def test_nested_set_paths_and_context_templates(impl):
    definition = workflow(
        set_step("a", {"order.total": 10, "order.items.count": 2}),
        set_step("b", {"order.copy": "{{context.order.total}}", "flat": "x"}),
        set_step("c", {"flat.inner": 1}),  # a non-dict parent is replaced by a dict
    )
    _, state, _ = run(impl, definition, context={"order": {"id": 7}})
    assert state.context == {"order": {"id": 7, "total": 10, "items": {"count": 2}, "copy": 10}, "flat": {"inner": 1}}


def test_literal_containers_are_not_shared_between_executions(impl):
    program = impl.Program(workflow(set_step("a", {"box": {"items": []}})))
    first = impl.ExecutionState("1")
    impl.advance(program, first, "start", None)
    first.context["box"]["items"].append(1)
    second = impl.ExecutionState("2")
    impl.advance(program, second, "start", None)
    assert second.context == {"box": {"items": []}}


# -- conditions ------------------------------------------------------------------
CONTACT = {"country": "DE", "age": 30, "score": 2.5, "tags": ["vip", "new"], "email": "a@b.c", "flag": True, "zero": 0}


@pytest.mark.parametrize(
    "condition, expected",
    [
        ({"eq": ["{{contact.country}}", "DE"]}, True),
        ({"eq": ["{{contact.country}}", "FR"]}, False),
        ({"eq": ["{{contact.age}}", 30.0]}, True),
        ({"eq": ["{{contact.flag}}", 1]}, False),  # a boolean is not a number
        ({"eq": ["{{contact.zero}}", False]}, False),
        ({"eq": ["{{contact.missing}}", None]}, True),
        ({"ne": ["{{contact.country}}", "FR"]}, True),
        ({"ne": ["{{contact.age}}", "30"]}, True),
        ({"gt": ["{{contact.age}}", 18]}, True),
        ({"gt": ["{{contact.age}}", 30]}, False),
        ({"gte": ["{{contact.age}}", 30]}, True),
        ({"lt": ["{{contact.score}}", 3]}, True),
        ({"lte": ["{{contact.score}}", 2.5]}, True),
        ({"lt": ["{{contact.country}}", "FR"]}, True),  # strings order with strings
        ({"gt": ["{{contact.age}}", "18"]}, False),  # type mismatch: false, never raises
        ({"lt": ["{{contact.age}}", "18"]}, False),
        ({"gt": ["{{contact.missing}}", 1]}, False),  # None: false
        ({"lte": ["{{contact.missing}}", None]}, False),
        ({"gt": ["{{contact.flag}}", 0]}, False),  # booleans are not ordered
        ({"gt": ["{{contact.tags}}", ["a"]]}, False),
        ({"in": ["{{contact.country}}", ["DE", "AT"]]}, True),
        ({"in": ["{{contact.country}}", ["FR"]]}, False),
        ({"in": ["{{contact.country}}", "{{contact.tags}}"]}, False),
        ({"in": ["vip", "{{contact.tags}}"]}, True),
        ({"in": ["{{contact.age}}", "DE"]}, False),  # second operand not a list
        ({"contains": ["{{contact.tags}}", "vip"]}, True),
        ({"contains": ["{{contact.tags}}", "old"]}, False),
        ({"contains": ["{{contact.email}}", "@b"]}, True),
        ({"contains": ["{{contact.email}}", 1]}, False),
        ({"contains": ["{{contact.age}}", 3]}, False),
        ({"exists": "contact.email"}, True),
        ({"exists": "{{contact.email}}"}, True),
        ({"exists": "contact.missing"}, False),
        ({"exists": "contact.zero"}, True),
        ({"not": {"exists": "contact.missing"}}, True),
        ({"all": [{"exists": "contact.email"}, {"eq": ["{{contact.country}}", "DE"]}]}, True),
        ({"all": [{"exists": "contact.email"}, {"eq": ["{{contact.country}}", "FR"]}]}, False),
        ({"any": [{"eq": [1, 2]}, {"eq": ["{{contact.zero}}", 0]}]}, True),
        ({"any": [{"eq": [1, 2]}, {"eq": [3, 4]}]}, False),
        ({"eq": ["{{context.seen}}", "yes"]}, True),
        ({"eq": ["{{event.type}}", "contact.created"]}, True),
        ({"eq": ["country={{contact.country}}", "country=DE"]}, True),
    ],
)
def test_condition_operators(impl, condition, expected):
    event = {"type": "contact.created", "contact": CONTACT}
    assert holds(impl, condition, contact=CONTACT, event=event, context={"seen": "yes"}) is expected


# -- control flow ----------------------------------------------------------------
def test_if_branches(impl):
    definition = workflow(
        {"id": "check", "type": "if", "condition": {"gt": ["{{contact.age}}", 17]}, "then": "adult", "else": "minor"},
        set_step("minor", {"group": "minor"}, next="done"),
        set_step("adult", {"group": "adult"}),
        {"id": "done", "type": "end"},
    )
    _, state, out = run(impl, definition, contact={"age": 20})
    assert out[1] == (2, "check", "branch", {"to": "adult", "taken": "then"})
    assert state.context == {"group": "adult"}
    _, state, out = run(impl, definition, contact={"age": 12})
    assert out[1] == (2, "check", "branch", {"to": "minor", "taken": "else"})
    assert kinds(out[2:]) == [("minor", "set"), ("done", "completed")]
    assert state.context == {"group": "minor"}


def test_if_missing_branch_falls_through(impl):
    definition = workflow(
        set_step("first", {"a": 1}),
        {"id": "check", "type": "if", "condition": {"eq": [1, 2]}, "then": "first"},
        set_step("after", {"b": 2}),
    )
    _, state, out = run(impl, definition)
    assert out[2] == (3, "check", "branch", {"to": "after", "taken": "else"})
    assert state.status == "completed"


def test_if_falling_off_the_end(impl):
    definition = workflow({"id": "check", "type": "if", "condition": {"eq": [1, 1]}})
    _, state, out = run(impl, definition)
    assert out[1:] == [(2, "check", "branch", {"to": "", "taken": "then"}), (3, "", "completed", None)]


def test_if_fallthrough_uses_next(impl):
    definition = workflow(
        {"id": "check", "type": "if", "condition": {"eq": [1, 1]}, "else": "skipped", "next": "target"},
        set_step("skipped", {"skipped": True}),
        set_step("target", {"target": True}),
    )
    _, state, out = run(impl, definition)
    assert out[1] == (2, "check", "branch", {"to": "target", "taken": "then"})
    assert state.context == {"target": True}


def test_next_jumps(impl):
    definition = workflow(
        set_step("a", {"a": 1}, next="c"),
        set_step("b", {"b": 1}),
        set_step("c", {"c": 1}),
    )
    _, state, out = run(impl, definition)
    assert kinds(out) == [("", "started"), ("a", "set"), ("c", "set"), ("", "completed")]
    assert state.context == {"a": 1, "c": 1} and state.steps == 2


def test_end_with_failed_status_and_reason(impl):
    definition = workflow({"id": "stop", "type": "end", "status": "failed", "reason": "blocked"}, set_step("never", {"x": 1}))
    _, state, out = run(impl, definition)
    assert out[1:] == [(2, "stop", "failed", {"reason": "blocked"})]
    assert (state.status, state.pc, state.steps) == ("failed", 0, 1)
    _, state, out = run(impl, workflow({"id": "stop", "type": "end"}))
    assert out[1:] == [(2, "stop", "completed", None)]
    assert state.status == "completed"


def test_loop_guard_on_a_backward_next(impl):
    definition = workflow(set_step("spin", {"n": 1}, next="spin"), max_steps=5)
    _, state, out = run(impl, definition)
    assert kinds(out) == [("", "started")] + [("spin", "set")] * 5 + [("spin", "failed")]
    assert out[-1] == (7, "spin", "failed", {"error": "loop guard: more than 5 steps in one run", "code": "loop_guard"})
    assert (state.status, state.steps, state.seq) == ("failed", 5, 7)


def test_loop_guard_counts_per_advance_call(impl):
    definition = workflow(
        set_step("a", {"x": 1}),
        set_step("b", {"x": 2}),
        {"id": "w", "type": "wait_for_signal", "signal": "go"},
        set_step("c", {"x": 3}),
        max_steps=3,
    )
    program, state, out = run(impl, definition)
    assert state.status == "waiting"  # exactly max_steps steps is allowed
    impl.advance(program, state, "signal", {"name": "go"})
    assert (state.status, state.steps) == ("completed", 4)


# -- signals ---------------------------------------------------------------------
WAITING = workflow(
    set_step("before", {"x": 1}),
    {"id": "wait-reply", "type": "wait_for_signal", "signal": "reply"},
    set_step("after", {"got": "{{context.wait-reply.text}}"}),
)


def test_wait_for_signal_then_matching_signal(impl):
    program, state, out = run(impl, WAITING)
    assert out[-1] == (3, "wait-reply", "waiting", {"signal": "reply"})
    assert (state.status, state.waiting, state.pc, state.steps) == ("waiting", "reply", 1, 2)
    out = impl.advance(program, state, "signal", {"name": "reply", "data": {"text": "yes"}})
    assert out == [
        (4, "wait-reply", "signal", {"name": "reply", "data": {"text": "yes"}}),
        (5, "after", "set", None),
        (6, "", "completed", None),
    ]
    assert state.context == {"x": 1, "wait-reply": {"text": "yes"}, "got": "yes"}
    assert (state.status, state.waiting, state.seq, state.steps) == ("completed", None, 6, 3)


def test_non_matching_signal_is_recorded_and_changes_nothing_else(impl):
    program, state, _ = run(impl, WAITING)
    out = impl.advance(program, state, "signal", {"name": "other", "data": 5})
    assert out == [(4, "wait-reply", "signal", {"name": "other", "data": 5})]
    assert (state.status, state.waiting, state.pc, state.seq) == ("waiting", "reply", 1, 4)
    assert "wait-reply" not in state.context


def test_signal_to_a_running_execution_has_no_step(impl):
    program = impl.Program(WAITING)
    state = impl.ExecutionState("e")
    assert impl.advance(program, state, "signal", {"name": "reply"}) == [(1, "", "signal", {"name": "reply", "data": None})]
    assert (state.status, state.seq, state.steps) == ("running", 1, 0)


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_signals_after_close_return_nothing(impl, status):
    program, state, _ = run(impl, WAITING)
    state.status = status
    before = state.seq
    assert impl.advance(program, state, "signal", {"name": "reply", "data": 1}) == []
    assert state.seq == before


def test_signal_after_completion(impl):
    program, state, _ = run(impl, workflow(set_step("a", {"x": 1})))
    assert state.status == "completed"
    assert impl.advance(program, state, "signal", {"name": "anything"}) == []


def test_start_twice_raises(impl):
    program, state, _ = run(impl, WAITING)
    with pytest.raises(ValueError):
        impl.advance(program, state, "start", None)


def test_unknown_event_kind_and_bad_signal_payload(impl):
    program, state, _ = run(impl, WAITING)
    with pytest.raises(ValueError, match="'tick'"):
        impl.advance(program, state, "tick", {})
    with pytest.raises(ValueError):
        impl.advance(program, state, "signal", {"data": 1})


def test_pc_outside_the_program_is_refused(impl):
    program = impl.Program(WAITING)
    state = impl.ExecutionState("e", status="waiting", pc=9, seq=3, waiting="reply")
    with pytest.raises(ValueError, match="pc"):
        impl.advance(program, state, "signal", {"name": "reply"})


# -- trigger matching --------------------------------------------------------------
def test_matches_without_filter(impl):
    program = impl.Program(workflow({"id": "e", "type": "end"}))
    assert program.matches({"type": "contact.created", "contact": {}})
    assert not program.matches({"type": "contact.deleted"})
    assert not program.matches({})


def test_matches_with_filter(impl):
    trigger = {
        "event": "form.submitted",
        "filter": {"all": [{"eq": ["{{contact.country}}", "DE"]}, {"gt": ["{{event.data.total}}", 100]}, {"not": {"exists": "context.x"}}]},
    }
    program = impl.Program(workflow({"id": "e", "type": "end"}, trigger=trigger))
    event = {"type": "form.submitted", "contact": {"country": "DE"}, "data": {"total": 150}}
    assert program.matches(event)
    assert not program.matches({**event, "data": {"total": 50}})
    assert not program.matches({**event, "contact": {"country": "FR"}})
    assert not program.matches({**event, "contact": None})
    assert not program.matches({**event, "type": "contact.created"})


# -- compiled and pure agree --------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-5, 5, allow_nan=False) | st.sampled_from(["", "a", "DE", "vip"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=3),
    max_leaves=6,
)
PATHS = st.sampled_from(
    ["context.a", "context.b.c", "contact.n", "contact.tags", "contact.tags.0", "event.data.k", "event.data.items.1", "context.w"]
)
TEMPLATES = st.one_of(
    JSON,
    PATHS.map(lambda p: "{{" + p + "}}"),
    PATHS.map(lambda p: "v={{ " + p + " }}!"),
    st.lists(PATHS.map(lambda p: "{{" + p + "}}"), max_size=2),
)
OPERATORS = ["eq", "ne", "gt", "gte", "lt", "lte", "in", "contains"]
CONDITIONS = st.recursive(
    st.one_of(
        st.tuples(st.sampled_from(OPERATORS), TEMPLATES, TEMPLATES).map(lambda t: {t[0]: [t[1], t[2]]}),
        PATHS.map(lambda p: {"exists": p}),
    ),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"all": c}),
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"any": c}),
        children.map(lambda c: {"not": c}),
    ),
    max_leaves=5,
)


@st.composite
def random_workflows(draw):
    count = draw(st.integers(1, 6))
    ids = [f"s{i}" for i in range(count)]
    target = st.sampled_from(ids)
    steps = []
    for step_id in ids:
        kind = draw(st.sampled_from(["set", "set", "if", "if", "end", "wait_for_signal"]))
        step = {"id": step_id, "type": kind}
        if kind == "set":
            keys = draw(st.lists(st.sampled_from(["a", "b.c", "a.x", "w"]), min_size=1, max_size=3, unique=True))
            step["values"] = {key: draw(TEMPLATES) for key in keys}
        elif kind == "if":
            step["condition"] = draw(CONDITIONS)
            for branch in ("then", "else"):
                if draw(st.booleans()):
                    step[branch] = draw(target)
        elif kind == "end":
            step["status"] = draw(st.sampled_from(["completed", "failed"]))
            if draw(st.booleans()):
                step["reason"] = "why"
        else:
            step["signal"] = draw(st.sampled_from(["go", "stop"]))
        if kind != "end" and draw(st.booleans()):
            step["next"] = draw(target)
        steps.append(step)
    return workflow(*steps, max_steps=draw(st.integers(1, 12)))


def snapshot(state) -> tuple:
    return (state.status, state.pc, state.seq, state.steps, state.waiting, state.context)


@settings(max_examples=300, deadline=None)
@given(
    definition=random_workflows(),
    contact=st.fixed_dictionaries({"n": JSON, "tags": st.lists(JSON, max_size=3)}),
    data=st.fixed_dictionaries({"k": JSON, "items": st.lists(JSON, max_size=3)}),
    signals=st.lists(st.tuples(st.sampled_from(["go", "stop", "other"]), JSON), max_size=4),
)
def test_compiled_and_pure_agree(impl, definition, contact, data, signals):
    pure = dict(hotpath.implementations())["pure"]
    results = []
    for ns in (impl, pure):
        program = ns.Program(definition)
        state = ns.ExecutionState("e", contact=contact, event={"type": "contact.created", "data": data})
        trail = [ns.advance(program, state, "start", None)]
        for name, value in signals:
            trail.append(ns.advance(program, state, "signal", {"name": name, "data": value}))
        results.append((trail, snapshot(state), program.matches({"type": "contact.created", "contact": contact})))
    assert results[0] == results[1]
