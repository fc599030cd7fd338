"""The step dispatcher, compiled and pure: one test body, two implementations,
plus a differential test that the two agree on random workflows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hotpath
from hotpath.definition import DefinitionError


def workflow(*steps, trigger=None, max_steps=None, **extra) -> dict:
    definition = {"id": "wf", "tenant": "acme", "version": 2, "trigger": trigger or {"event": "contact.created"}}
    if max_steps is not None:
        definition["limits"] = {"max_steps": max_steps}
    definition["steps"] = list(steps)
    definition.update(extra)
    return definition


def run(impl, definition, contact=None, event=None, context=None):
    program = impl.Program(definition)
    state = impl.ExecutionState("exec-1", subject=contact, event=event, context=context)
    return program, state, impl.advance(program, state, "start", None)


def kinds(transitions) -> list:
    return [(step_id, kind) for _, step_id, kind, _ in transitions]


def set_step(step_id, values, **more):
    return {"id": step_id, "type": "set", "values": values, **more}


def holds(impl, condition, contact=None, event=None, context=None) -> bool:
    """Evaluate a condition through an if step."""
    definition = workflow(
        {"id": "c", "type": "if", "condition": condition, "then": "yes", "else": "no"},
        {"id": "yes", "type": "end"},
        {"id": "no", "type": "end"},
    )
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
    assert (state.execution_id, state.status, state.pc, state.seq, state.steps, state.waiting) == (
        "e",
        "running",
        0,
        0,
        0,
        None,
    )
    assert state.context == {} and state.subject == {} and state.event == {}
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


def test_templates_raw_interpolated_and_null(impl):
    contact = {"name": "Ann", "age": 41, "tags": ["a", "b"], "nil": None}
    event = {"data": {"items": [{"sku": "X-1"}, {"sku": "Y-2"}]}}
    values = {
        "raw_int": "{{ contact.age }}",
        "raw_list": "{{contact.tags}}",
        "raw_null": "{{contact.nil}}",
        "greeting": "Hi {{contact.name}}, you are {{ contact.age }}!",
        "with_null": "[{{contact.nil}}]",
        "indexed": "{{event.data.items.1.sku}}",
        "literal": "no templates {here}",
        "nested": {"who": "{{contact.name}}", "list": ["{{contact.age}}", 1, None, True]},
        "number": 2.5,
    }
    _, state, _ = run(impl, workflow(set_step("s", values)), contact=contact, event=event)
    assert state.context == {
        "raw_int": 41,
        "raw_list": ["a", "b"],
        "raw_null": None,
        "greeting": "Hi Ann, you are 41!",
        "with_null": "[]",
        "indexed": "Y-2",
        "literal": "no templates {here}",
        "nested": {"who": "Ann", "list": [41, 1, None, True]},
        "number": 2.5,
    }
    # Raw values are copies: changing the context does not change the contact.
    state.context["raw_list"].append("c")
    assert contact["tags"] == ["a", "b"]


MISSING_CONTACT = {"name": "Ann", "nil": None, "tags": ["a"]}


@pytest.mark.parametrize(
    "template, text",
    [
        ("{{contact.first_nam}}", "{{contact.first_nam}}"),
        ("Hi {{ contact.first_nam }}!", "{{contact.first_nam}}"),
        ("{{contact.nil.deeper}}", "{{contact.nil.deeper}}"),  # through a null
        ("{{contact.name.first}}", "{{contact.name.first}}"),  # through a string
        ("{{contact.tags.5}}", "{{contact.tags.5}}"),  # out of range
        ({"deep": ["{{event.data.nope}}"]}, "{{event.data.nope}}"),
    ],
)
def test_a_missing_field_in_a_set_value_fails_the_step_and_dead_letters(impl, template, text):
    definition = workflow(
        set_step("before", {"a": 1}), set_step("greet", {"b": 2, "c": template}), set_step("after", {"d": 3})
    )
    _, state, out = run(impl, definition, contact=MISSING_CONTACT, event={"data": {}})
    error = {"code": "template_missing_field", "retryable": False, "message": f"{text} names a missing field"}
    assert out[-2:] == [
        (3, "greet", "step_failed", {"error": error, "attempts": 1}),
        (4, "greet", "failed", {"error": error["message"], "code": "template_missing_field"}),
    ]
    assert (state.status, state.pc) == ("failed", 1)
    assert state.context == {"a": 1, "b": 2}  # the values before the failing one stay assigned
    assert state.effects == [
        ("dead_letter", {"reason": "template_missing_field", "step_id": "greet", "error": error, "attempts": []})
    ]


@pytest.mark.parametrize(
    "grow, start",
    [
        ("{{context.x}}{{context.x}}", "ab"),  # a string that doubles on every visit
        (["{{context.x}}", "{{context.x}}"], 1),  # a tree that doubles on every visit
    ],
)
def test_a_value_that_doubles_in_a_loop_fails_before_it_eats_the_worker(impl, grow, start):
    """Within one advance the loop guard allows 100 visits: 2**100 must not be attempted."""
    from hotpath.definition import MAX_RENDERED_CHARS, MAX_RENDERED_NODES

    definition = workflow(
        set_step("init", {"x": start}), set_step("grow", {"x": grow}), {"id": "again", "type": "goto", "target": "grow"}
    )
    _, state, out = run(impl, definition)
    assert state.status == "failed"
    step_failed = [t for t in out if t[2] == "step_failed"]
    assert [t[1] for t in step_failed] == ["grow"]
    error = step_failed[0][3]["error"]
    assert error["code"] == "template_value_too_large" and not error["retryable"]
    assert "{{context.x}}" in error["message"]
    [(kind, letter)] = state.effects
    assert (kind, letter["reason"]) == ("dead_letter", "template_value_too_large")
    if isinstance(start, str):
        assert len(state.context["x"]) <= MAX_RENDERED_CHARS
    else:

        def nodes(value):
            return 1 + sum(nodes(v) for v in value) if isinstance(value, list) else 1

        assert nodes(state.context["x"]) <= 2 * MAX_RENDERED_NODES


def test_a_missing_field_in_an_action_input_takes_the_failure_branch(impl):
    definition = workflow(
        {
            "id": "send",
            "type": "action",
            "action": "sms.send",
            "input": {"body": "Hi {{contact.first_nam}}"},
            "on_failure": "fallback",
        },
        {"id": "done", "type": "end"},
        set_step("fallback", {"fell_back": True}),
    )
    _, state, out = run(impl, definition, contact=MISSING_CONTACT)
    assert kinds(out) == [("", "started"), ("send", "step_failed"), ("fallback", "set"), ("", "completed")]
    assert out[1][3]["error"]["code"] == "template_missing_field"
    assert "{{contact.first_nam}}" in out[1][3]["error"]["message"]
    assert state.status == "completed" and state.context == {"fell_back": True}
    assert state.effects == []  # no request went out, no dead letter: the branch handled it


def test_a_missing_field_in_an_action_input_without_a_branch_fails_the_execution(impl):
    definition = workflow({"id": "send", "type": "action", "action": "sms.send", "input": {"to": "{{contact.phone}}"}})
    _, state, out = run(impl, definition, contact=MISSING_CONTACT)
    assert kinds(out) == [("", "started"), ("send", "step_failed"), ("send", "failed")]
    assert state.status == "failed" and state.timer is None
    [(kind, letter)] = state.effects
    assert (kind, letter["reason"], letter["step_id"]) == ("dead_letter", "template_missing_field", "send")


def test_missing_fields_in_emit_data_and_wait_until_take_the_workflow_branch(impl):
    for step in (
        {"id": "tell", "type": "emit", "event": "x.happened", "data": {"v": "{{context.nope}}"}},
        {"id": "tell", "type": "wait", "until": "{{context.nope}}"},
    ):
        definition = workflow(
            step, {"id": "done", "type": "end"}, set_step("oops", {"handled": True}), on_failure="oops"
        )
        _, state, out = run(impl, definition)
        assert kinds(out) == [("", "started"), ("tell", "step_failed"), ("oops", "set"), ("", "completed")]
        assert out[1][3]["error"]["message"] == "{{context.nope}} names a missing field"
        assert state.effects == []


def test_conditions_see_a_missing_field_as_null(impl):
    assert holds(impl, {"exists": "contact.first_nam"}, contact=MISSING_CONTACT) is False
    assert holds(impl, {"eq": ["{{contact.first_nam}}", None]}, contact=MISSING_CONTACT) is True
    assert holds(impl, {"ne": ["{{contact.nil.deeper}}", "x"]}, contact=MISSING_CONTACT) is True
    assert holds(impl, {"eq": ["Hi {{contact.first_nam}}", "Hi "]}, contact=MISSING_CONTACT) is True
    program = impl.Program(
        workflow(
            {"id": "e", "type": "end"},
            trigger={"event": "contact.created", "filter": {"eq": ["{{contact.plan}}", "pro"]}},
        )
    )
    assert program.matches({"type": "contact.created", "contact": {}}) is False


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
    definition = workflow(
        {"id": "stop", "type": "end", "status": "failed", "reason": "blocked"}, set_step("never", {"x": 1})
    )
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
    assert impl.advance(program, state, "signal", {"name": "reply"}) == [
        (1, "", "signal", {"name": "reply", "data": None})
    ]
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


# -- actions, timers and events -------------------------------------------------------
import zlib  # noqa: E402


def drain(state) -> list:
    """The effects advance appended, cleared as the worker does after reading them."""
    effects = list(state.effects)
    state.effects.clear()
    return effects


def action(step_id="send", **more) -> dict:
    return {"id": step_id, "type": "action", "action": "sms.send", "input": {"to": "{{contact.phone}}"}, **more}


def failure(code="unavailable", retryable=True, message="try later") -> dict:
    return {"code": code, "retryable": retryable, "message": message}


def result(state, ok=True, step_id=None, attempt=None, **more) -> dict:
    """An action result for the attempt the execution waits on (unless told otherwise)."""
    payload = {"step_id": step_id or "send", "attempt": state.attempt if attempt is None else attempt, "ok": ok}
    payload.update(more)
    return payload


def begin(impl, definition, now_ms=1_000, **state_args):
    program = impl.Program(definition)
    state_args.setdefault("subject", {"phone": "+49"})
    state = impl.ExecutionState("exec-1", tenant="acme", **state_args)
    out = impl.advance(program, state, "start", None, now_ms)
    return program, state, out


def test_new_state_fields_and_round_trip(impl):
    state = impl.ExecutionState("e")
    assert (state.attempt, state.timer, state.visits, state.failures, state.tenant, state.effects) == (
        0,
        None,
        {},
        [],
        "",
        [],
    )
    fields = dict(
        status="waiting",
        pc=1,
        seq=4,
        steps=2,
        waiting="retry",
        attempt=2,
        timer="t",
        visits={"a": 1},
        failures=[{"attempt": 1, "error": {"code": "x"}}],
        tenant="acme",
    )
    copy = impl.ExecutionState("e", **fields)
    assert {name: getattr(copy, name) for name in fields} == fields
    copy.attempt, copy.timer, copy.tenant = 3, None, "other"
    assert (copy.attempt, copy.timer, copy.tenant) == (3, None, "other")


def test_program_on_failure_and_max_visits(impl):
    program = impl.Program(
        workflow(set_step("a", {"x": 1}), {"id": "oops", "type": "end"}, on_failure="oops", limits={"max_visits": 7})
    )
    assert (program.on_failure, program.max_visits) == (1, 7)
    program = impl.Program(workflow(set_step("a", {"x": 1})))
    assert (program.on_failure, program.max_visits) == (-1, 100)


def test_action_requested_then_completed(impl):
    definition = workflow(action(timeout="10s", version=2), set_step("after", {"id": "{{context.send.id}}"}))
    program, state, out = begin(impl, definition)
    assert out[1:] == [(2, "send", "action_requested", {"attempt": 1, "action": "sms.send"})]
    assert drain(state) == [
        (
            "action",
            {
                "step_id": "send",
                "attempt": 1,
                "action": "sms.send",
                "major": 2,
                "input": {"to": "+49"},
                "idempotency_key": "exec-1:send:1",
                "timeout_ms": 10_000,
            },
        ),
        ("set_timer", {"timer_id": state.timer, "fire_at_ms": 11_000, "purpose": "action_timeout", "step_id": "send"}),
    ]
    assert (state.status, state.waiting, state.attempt, state.visits) == ("waiting", "action", 1, {"send": 1})
    out = impl.advance(program, state, "action_result", result(state, output={"id": "m-1"}), 2_000)
    assert out == [
        (3, "send", "action_completed", {"attempt": 1, "output": {"id": "m-1"}}),
        (4, "after", "set", None),
        (5, "", "completed", None),
    ]
    assert drain(state) == [("clear_timer", None)]
    assert state.context == {"send": {"id": "m-1"}, "id": "m-1"}
    assert (state.status, state.timer, state.attempt, state.failures) == ("completed", None, 0, [])


def test_retry_delays_are_exact_without_jitter_and_exhaustion_dead_letters(impl):
    policy = {"max_attempts": 4, "initial_interval": "1s", "backoff_coefficient": 2, "max_interval": "3s", "jitter": 0}
    program, state, _ = begin(impl, workflow(action(retry=policy)))
    drain(state)
    keys, fire_at = [], []
    now = 1_000
    for attempt in (1, 2, 3):
        now += 500
        out = impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), now)
        assert out == [(state.seq, "send", "action_failed", {"attempt": attempt, "error": failure()})]
        ((kind, timer),) = drain(state)
        assert (kind, timer["purpose"], state.waiting) == ("set_timer", "retry", "retry")
        fire_at.append(timer["fire_at_ms"] - now)
        now = timer["fire_at_ms"]
        out = impl.advance(program, state, "timer", {"timer_id": timer["timer_id"]}, now)
        assert out == [(state.seq, "send", "action_requested", {"attempt": attempt + 1, "action": "sms.send"})]
        request, _ = drain(state)
        keys.append(request[1]["idempotency_key"])
    assert fire_at == [1_000, 2_000, 3_000]  # 1s, 2s, then capped at max_interval
    assert keys == ["exec-1:send:1"] * 3
    out = impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), now + 1)
    assert kinds(out) == [("send", "action_failed"), ("send", "step_failed"), ("send", "failed")]
    assert out[1][3] == {"error": failure(), "attempts": 4}
    assert out[2][3] == {"error": "try later", "code": "unavailable"}
    assert drain(state) == [
        ("clear_timer", None),
        (
            "dead_letter",
            {
                "reason": "step_failed",
                "step_id": "send",
                "error": failure(),
                "attempts": [{"attempt": n, "error": failure()} for n in (1, 2, 3, 4)],
            },
        ),
    ]
    assert (state.status, state.pc, state.visits, state.timer, state.waiting) == ("failed", 0, {"send": 1}, None, None)


def test_retry_delay_with_jitter_is_deterministic(impl):
    policy = {"initial_interval": "10s", "jitter": 0.5}
    delays = []
    for execution_id in ("exec-1", "exec-1", "exec-2"):
        program = impl.Program(workflow(action(retry=policy)))
        state = impl.ExecutionState(execution_id, subject={"phone": "1"})
        impl.advance(program, state, "start", None, 0)
        drain(state)
        impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 100)
        ((_, timer),) = drain(state)
        delays.append(timer["fire_at_ms"] - 100)
    fraction = zlib.crc32(b"exec-1:send:1") / 2**32
    assert delays[0] == delays[1] == int(10_000 * (1 - 0.5 * fraction))
    assert 5_000 <= delays[2] <= 10_000 and delays[2] != delays[0]


def test_action_timeout_is_a_retryable_failure(impl):
    program, state, _ = begin(impl, workflow(action(timeout="PT5S", retry={"jitter": 0})))
    timeout = drain(state)[1][1]
    out = impl.advance(program, state, "timer", {"timer_id": timeout["timer_id"]}, 6_000)
    error = {"code": "timeout", "retryable": True, "message": "no result within PT5S"}
    assert out == [(3, "send", "action_failed", {"attempt": 1, "error": error, "timer_id": timeout["timer_id"]})]
    ((_, retry),) = drain(state)  # no clear_timer: the timeout timer fired, the retry timer replaces it
    assert (retry["purpose"], retry["fire_at_ms"], state.timer) == ("retry", 7_000, retry["timer_id"])
    assert state.failures == [{"attempt": 1, "error": error}]


def test_stale_timers_are_ignored(impl):
    program, state, _ = begin(impl, workflow(action(retry={"jitter": 0})))
    timeout = drain(state)[1][1]["timer_id"]
    impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 2_000)
    retry = drain(state)[0][1]["timer_id"]
    assert retry != timeout
    before = (state.seq, state.status, state.waiting, state.timer)
    assert impl.advance(program, state, "timer", {"timer_id": timeout}, 40_000) == []
    assert impl.advance(program, state, "timer", {"timer_id": "nonsense"}, 40_000) == []
    assert (state.seq, state.status, state.waiting, state.timer) == before and state.effects == []
    impl.advance(program, state, "timer", {"timer_id": retry}, 3_000)
    assert impl.advance(program, state, "timer", {"timer_id": retry}, 3_000) == []  # fires once
    with pytest.raises(ValueError):
        impl.advance(program, state, "timer", {"id": retry})


def test_late_results_are_recorded_and_change_nothing(impl):
    program, state, _ = begin(impl, workflow(action(retry={"jitter": 0})))
    impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 2_000)
    drain(state)
    # Backing off: a result for attempt 1 is late, even a success.
    out = impl.advance(program, state, "action_result", result(state, ok=True, attempt=1, output=1), 2_100)
    assert out == [(state.seq, "send", "late_result", {"attempt": 1, "ok": True})]
    assert (state.waiting, state.attempt, state.effects, "send" in state.context) == ("retry", 1, [], False)
    impl.advance(program, state, "timer", {"timer_id": state.timer}, 3_000)
    drain(state)
    for late in (result(state, attempt=1), result(state, step_id="other")):
        seq = state.seq
        assert impl.advance(program, state, "action_result", late, 3_100) == [
            (seq + 1, late["step_id"], "late_result", {"attempt": late["attempt"], "ok": True})
        ]
    assert (state.status, state.waiting, state.attempt, state.effects) == ("waiting", "action", 2, [])
    impl.advance(program, state, "action_result", result(state), 3_200)
    out = impl.advance(program, state, "action_result", result(state, attempt=2), 3_300)
    assert kinds(out) == [("send", "late_result")] and state.status == "completed"
    with pytest.raises(ValueError):
        impl.advance(program, state, "action_result", {"step_id": "send", "ok": True})


@pytest.mark.parametrize("error", [failure(code="bad_request"), failure(code="invalid", retryable=False)])
def test_non_retryable_errors_fail_at_once(impl, error):
    program, state, _ = begin(impl, workflow(action(retry={"non_retryable": ["bad_request"], "max_attempts": 5})))
    drain(state)
    out = impl.advance(program, state, "action_result", result(state, ok=False, error=error), 2_000)
    assert kinds(out) == [("send", "action_failed"), ("send", "step_failed"), ("send", "failed")]
    assert out[1][3]["attempts"] == 1
    assert [kind for kind, _ in drain(state)] == ["clear_timer", "dead_letter"]


def test_step_on_failure_branch(impl):
    definition = workflow(
        action(retry={"max_attempts": 1}, on_failure="apologise"),
        set_step("thank", {"done": True}, next="end"),
        set_step("apologise", {"sorry": True}),
        {"id": "end", "type": "end"},
        on_failure="never",
    )
    definition["steps"].append(set_step("never", {"never": True}))
    program, state, _ = begin(impl, definition)
    drain(state)
    out = impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 2_000)
    assert kinds(out) == [
        ("send", "action_failed"),
        ("send", "step_failed"),
        ("apologise", "set"),
        ("end", "completed"),
    ]
    assert drain(state) == [("clear_timer", None)]  # no dead letter: the failure was handled
    assert state.context == {"sorry": True} and (state.attempt, state.failures) == (0, [])


def test_workflow_on_failure_branch(impl):
    definition = workflow(
        action(retry={"max_attempts": 1}),
        {"id": "handler", "type": "end", "status": "failed", "reason": "send failed"},
        on_failure="handler",
    )
    program, state, _ = begin(impl, definition)
    out = impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 2_000)
    assert kinds(out) == [("send", "action_failed"), ("send", "step_failed"), ("handler", "failed")]
    assert out[-1][3] == {"reason": "send failed"}
    assert "dead_letter" not in [kind for kind, _ in drain(state)]


def test_a_failing_workflow_failure_branch_does_not_loop(impl):
    definition = workflow(set_step("a", {"x": 1}), action("alert", retry={"max_attempts": 1}), on_failure="alert")
    program, state, _ = begin(impl, definition)
    out = impl.advance(
        program, state, "action_result", result(state, step_id="alert", ok=False, error=failure()), 2_000
    )
    assert kinds(out) == [("alert", "action_failed"), ("alert", "step_failed"), ("alert", "failed")]
    assert state.status == "failed"


def test_operator_retry_keeps_the_idempotency_key(impl):
    definition = workflow(set_step("a", {"x": 1}), action(retry={"max_attempts": 2, "jitter": 0}))
    program, state, _ = begin(impl, definition)
    first_key = drain(state)[0][1]["idempotency_key"]
    impl.advance(
        program, state, "action_result", result(state, step_id="send", ok=False, error=failure(retryable=False)), 2_000
    )
    assert state.status == "failed"
    drain(state)
    with pytest.raises(ValueError, match="not failed at an action step"):
        impl.advance(program, impl.ExecutionState("x"), "retry", {})
    out = impl.advance(program, state, "retry", {}, 9_000)
    assert out == [
        (state.seq - 1, "send", "retried", None),
        (state.seq, "send", "action_requested", {"attempt": 1, "action": "sms.send"}),
    ]
    request, timer = drain(state)
    assert request[1]["idempotency_key"] == first_key == "exec-1:send:1"
    assert (request[1]["attempt"], timer[1]["fire_at_ms"]) == (1, 39_000)
    assert (state.status, state.waiting, state.visits, state.failures) == ("waiting", "action", {"a": 1, "send": 1}, [])
    impl.advance(program, state, "action_result", result(state), 9_100)
    assert state.status == "completed" and state.context["send"] is None
    with pytest.raises(ValueError):
        impl.advance(program, state, "retry", {})


def test_operator_retry_refuses_other_failures(impl):
    program, state, _ = begin(impl, workflow({"id": "stop", "type": "end", "status": "failed"}))
    with pytest.raises(ValueError, match="not failed at an action step"):
        impl.advance(program, state, "retry", {})


def test_wait_for_a_duration(impl):
    program, state, out = begin(
        impl, workflow({"id": "pause", "type": "wait", "duration": "1h30m"}, set_step("after", {"x": 1}))
    )
    assert out[1:] == [(2, "pause", "waiting", {"until_ms": 1_000 + 5_400_000})]
    ((kind, timer),) = drain(state)
    assert (kind, timer["purpose"], timer["fire_at_ms"], state.waiting) == ("set_timer", "wait", 5_401_000, "timer")
    out = impl.advance(program, state, "timer", {"timer_id": timer["timer_id"]}, 5_401_050)
    assert out == [
        (3, "pause", "timer_fired", {"purpose": "wait", "timer_id": timer["timer_id"]}),
        (4, "after", "set", None),
        (5, "", "completed", None),
    ]
    assert (state.timer, state.effects) == (None, [])


@pytest.mark.parametrize(
    "until, context, expected",
    [
        ("2030-01-02T03:04:05Z", {}, 1_893_553_445_000),
        ("2030-01-02T04:04:05.250+01:00", {}, 1_893_553_445_250),
        ("2030-01-02T03:04:05", {}, 1_893_553_445_000),  # no offset: UTC
        ("{{context.when}}", {"when": "2030-01-02T03:04:05Z"}, 1_893_553_445_000),
        ("{{context.when}}", {"when": 1_893_553_445_123}, 1_893_553_445_123),
        (1_893_553_445_000, {}, 1_893_553_445_000),
    ],
)
def test_wait_until(impl, until, context, expected):
    program, state, out = begin(impl, workflow({"id": "pause", "type": "wait", "until": until}), context=context)
    assert out[-1] == (2, "pause", "waiting", {"until_ms": expected})
    assert drain(state)[0][1]["fire_at_ms"] == expected


def test_wait_until_that_is_not_a_time_fails_the_step(impl):
    steps = ({"id": "pause", "type": "wait", "until": "{{context.when}}"}, set_step("after", {"x": 1}))
    program, state, out = begin(impl, workflow(*steps), context={"when": "next tuesday"})
    assert kinds(out[1:]) == [("pause", "step_failed"), ("pause", "failed")]
    assert out[1][3]["error"]["code"] == "bad_time" and out[1][3]["attempts"] == 1
    assert out[2][3]["code"] == "bad_time"
    assert (state.status, state.effects) == ("failed", [])  # no dead letter for a wait
    branched = ({**steps[0], "on_failure": "after"}, steps[1])
    program, state, out = begin(impl, workflow(*branched), context={"when": None})
    assert kinds(out[1:]) == [("pause", "step_failed"), ("after", "set"), ("", "completed")]


EVENT_WAIT = workflow(
    {
        "id": "reply",
        "type": "wait_for_event",
        "event": "sms.received",
        "timeout": "3d",
        "filter": {"contains": ["{{event.data.text}}", "{{context.keyword}}"]},
        "on_timeout": "nudge",
    },
    set_step("thank", {"replied": "{{context.reply.text}}"}, next="end"),
    set_step("nudge", {"nudged": True}),
    {"id": "end", "type": "end"},
)


def test_wait_for_event_received(impl):
    program, state, out = begin(impl, EVENT_WAIT, context={"keyword": "YES"})
    assert out[1:] == [(2, "reply", "waiting", {"event": "sms.received"})]
    assert drain(state) == [
        ("wait_event", {"event_type": "sms.received", "step_id": "reply"}),
        (
            "set_timer",
            {
                "timer_id": state.timer,
                "fire_at_ms": 1_000 + 3 * 86_400_000,
                "purpose": "event_timeout",
                "step_id": "reply",
            },
        ),
    ]
    assert state.waiting == "event:sms.received"
    event = {"v": 1, "event_id": "ev-1", "tenant": "acme", "type": "sms.received", "contact": {"phone": "+49"}}
    assert impl.advance(program, state, "event", {**event, "type": "email.opened", "data": {"text": "YES"}}) == []
    assert impl.advance(program, state, "event", {**event, "data": {"text": "no"}}) == []  # the filter says no
    assert (state.seq, state.effects) == (2, [])
    out = impl.advance(program, state, "event", {**event, "data": {"text": "YES please"}}, 5_000)
    assert out == [
        (3, "reply", "event_received", {"event_id": "ev-1", "type": "sms.received", "data": {"text": "YES please"}}),
        (4, "thank", "set", None),
        (5, "end", "completed", None),
    ]
    assert drain(state) == [("clear_wait", None), ("clear_timer", None)]
    assert state.context == {"keyword": "YES", "reply": {"text": "YES please"}, "replied": "YES please"}
    assert impl.advance(program, state, "event", {**event, "data": {"text": "YES"}}) == []
    with pytest.raises(ValueError):
        impl.advance(program, state, "event", {"event_id": "no type"})


def test_wait_for_event_times_out(impl):
    program, state, _ = begin(impl, EVENT_WAIT)
    timer = drain(state)[1][1]["timer_id"]
    out = impl.advance(program, state, "timer", {"timer_id": timer}, 9_000)
    assert out == [
        (3, "reply", "timed_out", {"event": "sms.received", "timer_id": timer}),
        (4, "nudge", "set", None),
        (5, "end", "completed", None),
    ]
    assert drain(state) == [("clear_wait", None)]
    assert impl.advance(program, state, "event", {"type": "sms.received", "data": {"text": ""}}) == []


def test_wait_for_event_timeout_defaults_to_next(impl):
    definition = workflow(
        {"id": "reply", "type": "wait_for_event", "event": "x", "timeout": 500, "next": "b"},
        set_step("a", {"a": 1}),
        set_step("b", {"b": 1}),
    )
    program, state, _ = begin(impl, definition)
    assert drain(state)[1][1]["fire_at_ms"] == 1_500
    out = impl.advance(program, state, "timer", {"timer_id": state.timer}, 1_500)
    assert kinds(out) == [("reply", "timed_out"), ("b", "set"), ("", "completed")]


def test_switch(impl):
    definition = workflow(
        {
            "id": "route",
            "type": "switch",
            "cases": [
                {"when": {"eq": ["{{contact.country}}", "DE"]}, "next": "de"},
                {"when": {"in": ["{{contact.country}}", ["AT", "CH"]]}, "next": "dach"},
            ],
            "default": "other",
        },
        set_step("de", {"r": "de"}, next="end"),
        set_step("dach", {"r": "dach"}, next="end"),
        set_step("other", {"r": "other"}),
        {"id": "end", "type": "end"},
    )
    for country, to, case in (("DE", "de", 0), ("CH", "dach", 1), ("FR", "other", "default")):
        _, state, out = run(impl, definition, contact={"country": country})
        assert out[1] == (2, "route", "branch", {"to": to, "case": case})
        assert state.context == {"r": to}
    fallthrough = workflow(
        {"id": "route", "type": "switch", "cases": [{"when": {"eq": [1, 2]}, "next": "b"}]},
        set_step("a", {"a": 1}),
        set_step("b", {"b": 1}),
    )
    _, state, out = run(impl, fallthrough)
    assert out[1] == (2, "route", "branch", {"to": "a", "case": "default"})


def test_goto_and_the_visit_loop_guard(impl):
    definition = workflow(
        set_step("count", {"n": 1}), {"id": "again", "type": "goto", "target": "count"}, limits={"max_visits": 3}
    )
    _, state, out = run(impl, definition)
    assert out[1:3] == [(2, "count", "set", None), (3, "again", "goto", {"to": "count"})]
    assert kinds(out[1:]) == [("count", "set"), ("again", "goto")] * 3 + [("count", "failed")]
    assert out[-1][3] == {"error": "loop guard: step 'count' entered more than 3 times", "code": "loop_guard"}
    assert (state.status, state.visits, state.pc) == ("failed", {"count": 3, "again": 3}, 0)


def test_visits_count_across_advances(impl):
    definition = workflow(
        {"id": "w", "type": "wait_for_signal", "signal": "go"},
        {"id": "back", "type": "goto", "target": "w"},
        limits={"max_visits": 2},
    )
    program, state, _ = run(impl, definition)
    impl.advance(program, state, "signal", {"name": "go"})
    assert (state.status, state.visits) == ("waiting", {"w": 2, "back": 1})
    out = impl.advance(program, state, "signal", {"name": "go"})
    assert out[-1] == (
        8,
        "w",
        "failed",
        {"error": "loop guard: step 'w' entered more than 2 times", "code": "loop_guard"},
    )


def test_emit(impl):
    definition = workflow(
        {"id": "tell", "type": "emit", "event": "lead.qualified", "data": {"who": "{{contact.phone}}", "n": 1}},
        {"id": "w", "type": "wait_for_signal", "signal": "again"},
        {"id": "back", "type": "goto", "target": "tell"},
    )
    program, state, out = begin(impl, definition, now_ms=42)
    assert out[1] == (2, "tell", "emitted", {"event_id": "exec-1:tell:1", "type": "lead.qualified"})
    assert drain(state) == [
        (
            "emit",
            {
                "event": {
                    "v": 1,
                    "event_id": "exec-1:tell:1",
                    "tenant": "acme",
                    "type": "lead.qualified",
                    "contact": {"phone": "+49"},
                    "data": {"who": "+49", "n": 1},
                    "ts": 42,
                }
            },
        )
    ]
    # The id derives from the execution and the visit: the same on a replay, new on the next loop iteration.
    _, replayed, _ = begin(impl, definition, now_ms=42)
    assert drain(replayed)[0][1]["event"]["event_id"] == "exec-1:tell:1"
    impl.advance(program, state, "signal", {"name": "again"}, 50)
    assert drain(state)[0][1]["event"]["event_id"] == "exec-1:tell:2"


@pytest.mark.parametrize(
    "definition, effects",
    [
        (workflow(action()), [("clear_timer", None)]),
        (EVENT_WAIT, [("clear_timer", None), ("clear_wait", None)]),
        (workflow({"id": "pause", "type": "wait", "duration": "2d"}), [("clear_timer", None)]),
        (WAITING, []),
    ],
    ids=["action", "wait_for_event", "wait", "wait_for_signal"],
)
def test_cancel_clears_timers_and_waits(impl, definition, effects):
    program, state, _ = begin(impl, definition)
    drain(state)
    out = impl.advance(program, state, "cancel", {"reason": "operator"})
    assert out == [(state.seq, "", "cancelled", {"reason": "operator"})]
    assert drain(state) == effects
    assert (state.status, state.timer, state.waiting) == ("cancelled", None, None)
    assert impl.advance(program, state, "cancel", {}) == []
    assert impl.advance(program, state, "timer", {"timer_id": "any"}) == []


def test_cancel_a_running_execution_without_a_reason(impl):
    program = impl.Program(WAITING)
    state = impl.ExecutionState("e")
    assert impl.advance(program, state, "cancel", {}) == [(1, "", "cancelled", {"reason": None})]
    assert (state.status, state.effects) == ("cancelled", [])


def test_a_signal_does_not_resume_other_waits(impl):
    program, state, _ = begin(impl, workflow(action()))
    out = impl.advance(program, state, "signal", {"name": "action"})
    assert out == [(3, "send", "signal", {"name": "action", "data": None})]
    assert (state.status, state.waiting) == ("waiting", "action")


# -- the history holds every input (replay reads them back) -------------------------
def test_details_carry_the_inputs_as_copies(impl):
    """Output, event data and signal data are in the details, and the set step that runs right after
    (in the same advance, before the transitions are serialised) does not reach into them."""
    definition = workflow(
        action(),
        set_step("mark-send", {"send.seen": True}),
        {"id": "reply", "type": "wait_for_event", "event": "sms.received", "timeout": "1h"},
        set_step("mark-reply", {"reply.seen": True}),
        {"id": "ok", "type": "wait_for_signal", "signal": "ok"},
        set_step("mark-ok", {"ok.seen": True}),
    )
    program, state, _ = begin(impl, definition)
    out = impl.advance(program, state, "action_result", result(state, output={"id": "m-1"}), 2_000)
    assert out[0] == (3, "send", "action_completed", {"attempt": 1, "output": {"id": "m-1"}})
    event = {"v": 1, "event_id": "ev-1", "type": "sms.received", "contact": {}, "data": {"text": "hi"}}
    out = impl.advance(program, state, "event", event, 3_000)
    assert out[0] == (
        out[0][0],
        "reply",
        "event_received",
        {"event_id": "ev-1", "type": "sms.received", "data": {"text": "hi"}},
    )
    out = impl.advance(program, state, "signal", {"name": "ok", "data": {"by": "ops"}}, 4_000)
    assert out[0][2:] == ("signal", {"name": "ok", "data": {"by": "ops"}})
    assert state.status == "completed"
    assert [state.context[k] for k in ("send", "reply", "ok")] == [
        {"id": "m-1", "seen": True},
        {"text": "hi", "seen": True},
        {"by": "ops", "seen": True},
    ]


def test_a_failed_result_has_no_timer_id_and_null_output_is_recorded(impl):
    program, state, _ = begin(impl, workflow(action(retry={"jitter": 0})))
    out = impl.advance(program, state, "action_result", result(state, ok=False, error=failure()), 2_000)
    assert out == [(3, "send", "action_failed", {"attempt": 1, "error": failure()})]
    impl.advance(program, state, "timer", {"timer_id": state.timer}, 3_000)
    out = impl.advance(program, state, "action_result", result(state), 3_100)
    assert out[0] == (5, "send", "action_completed", {"attempt": 2, "output": None})


def test_timer_details_name_the_timer_that_fired(impl):
    program, state, _ = begin(
        impl,
        workflow(
            {"id": "pause", "type": "wait", "duration": "1m"},
            {"id": "reply", "type": "wait_for_event", "event": "x", "timeout": "1m"},
        ),
    )
    pause = state.timer
    out = impl.advance(program, state, "timer", {"timer_id": pause}, 61_000)
    assert out[0] == (3, "pause", "timer_fired", {"purpose": "wait", "timer_id": pause})
    reply = state.timer
    assert reply != pause
    out = impl.advance(program, state, "timer", {"timer_id": reply}, 121_000)
    assert out[0] == (5, "reply", "timed_out", {"event": "x", "timer_id": reply})


# -- trigger matching --------------------------------------------------------------
def test_matches_without_filter(impl):
    program = impl.Program(workflow({"id": "e", "type": "end"}))
    assert program.matches({"type": "contact.created", "contact": {}})
    assert not program.matches({"type": "contact.deleted"})
    assert not program.matches({})


def test_matches_with_filter(impl):
    trigger = {
        "event": "form.submitted",
        "filter": {
            "all": [
                {"eq": ["{{contact.country}}", "DE"]},
                {"gt": ["{{event.data.total}}", 100]},
                {"not": {"exists": "context.x"}},
            ]
        },
    }
    program = impl.Program(workflow({"id": "e", "type": "end"}, trigger=trigger))
    event = {"type": "form.submitted", "contact": {"country": "DE"}, "data": {"total": 150}}
    assert program.matches(event)
    assert not program.matches({**event, "data": {"total": 50}})
    assert not program.matches({**event, "contact": {"country": "FR"}})
    assert not program.matches({**event, "contact": None})
    assert not program.matches({**event, "type": "contact.created"})


# -- compiled and pure agree --------------------------------------------------------
# Named functions, not lambdas: hypothesis checks that `extend` uses its argument by
# reading its source, which it cannot do for a lambda spread over several lines.
def _json_containers(children):
    return st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=3)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(-5, 5, allow_nan=False)
    | st.sampled_from(["", "a", "DE", "vip"]),
    _json_containers,
    max_leaves=6,
)
PATHS = st.sampled_from(
    [
        "context.a",
        "context.b.c",
        "contact.n",
        "contact.tags",
        "contact.tags.0",
        "event.data.k",
        "event.data.items.1",
        "context.w",
        # Often or always missing: a value template fails its step, a condition sees null.
        "contact.nope",
        "event.data.k.x",
    ]
)
TEMPLATES = st.one_of(
    JSON,
    PATHS.map(lambda p: "{{" + p + "}}"),
    PATHS.map(lambda p: "v={{ " + p + " }}!"),
    st.lists(PATHS.map(lambda p: "{{" + p + "}}"), max_size=2),
)
OPERATORS = ["eq", "ne", "gt", "gte", "lt", "lte", "in", "contains"]


def _combined_conditions(children):
    return st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"all": c}),
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"any": c}),
        children.map(lambda c: {"not": c}),
    )


CONDITIONS = st.recursive(
    st.one_of(
        st.tuples(st.sampled_from(OPERATORS), TEMPLATES, TEMPLATES).map(lambda t: {t[0]: [t[1], t[2]]}),
        PATHS.map(lambda p: {"exists": p}),
    ),
    _combined_conditions,
    max_leaves=5,
)


@st.composite
def random_workflows(draw):
    count = draw(st.integers(1, 6))
    ids = [f"s{i}" for i in range(count)]
    target = st.sampled_from(ids)
    steps = []
    kinds_ = [
        "set",
        "set",
        "if",
        "if",
        "end",
        "wait_for_signal",
        "action",
        "action",
        "wait",
        "wait_for_event",
        "switch",
        "goto",
        "emit",
    ]
    for step_id in ids:
        kind = draw(st.sampled_from(kinds_))
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
        elif kind == "wait_for_signal":
            step["signal"] = draw(st.sampled_from(["go", "stop"]))
        elif kind == "action":
            step["action"] = "sms.send"
            step["input"] = {"v": draw(TEMPLATES)}
            step["timeout"] = draw(st.sampled_from(["1s", 2500, "PT1M"]))
            step["retry"] = {
                "max_attempts": draw(st.integers(1, 3)),
                "jitter": draw(st.sampled_from([0, 0.3, 1])),
                "backoff_coefficient": draw(st.sampled_from([1, 1.5, 3])),
                "non_retryable": ["bad"],
            }
            if draw(st.booleans()):
                step["on_failure"] = draw(target)
        elif kind == "wait":
            if draw(st.booleans()):
                step["duration"] = draw(st.sampled_from(["0s", "5m", "P1D", 10]))
            else:
                step["until"] = draw(st.sampled_from(["2030-01-01T00:00:00Z", "{{context.a}}", "{{event.data.k}}", 5]))
                if draw(st.booleans()):
                    step["on_failure"] = draw(target)
        elif kind == "wait_for_event":
            step["event"] = draw(st.sampled_from(["ping", "pong"]))
            step["timeout"] = draw(st.sampled_from(["1m", 30]))
            if draw(st.integers(0, 3)) == 0:
                step["filter"] = draw(CONDITIONS)
            if draw(st.booleans()):
                step["on_timeout"] = draw(target)
        elif kind == "switch":
            step["cases"] = [{"when": draw(CONDITIONS), "next": draw(target)} for _ in range(draw(st.integers(1, 2)))]
            if draw(st.booleans()):
                step["default"] = draw(target)
        elif kind == "goto":
            step["target"] = draw(target)
        else:
            step["event"] = "lead.qualified"
            step["data"] = {"v": draw(TEMPLATES)}
        if kind not in ("end", "goto") and draw(st.booleans()):
            step["next"] = draw(target)
        steps.append(step)
    extra = {"limits": {"max_steps": draw(st.integers(1, 20)), "max_visits": draw(st.integers(1, 5))}}
    if draw(st.booleans()):
        extra["on_failure"] = draw(target)
    return workflow(*steps, **extra)


EVENTS = st.one_of(
    st.tuples(st.just("signal"), st.sampled_from(["go", "stop", "other"]), JSON),
    st.tuples(
        st.just("action_result"),
        st.booleans(),
        st.sampled_from([0, 0, -1]),
        st.sampled_from(["x", "bad"]),
        st.booleans(),
        JSON,
    ),
    st.tuples(st.just("timer"), st.booleans()),
    st.tuples(st.just("timer"), st.just(True)),
    st.tuples(st.just("event"), st.sampled_from(["ping", "pong", "other"]), JSON),
    st.tuples(st.just("event"), st.just("awaited"), JSON),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("retry")),
)


def payload_for(program, state, event) -> tuple:
    """The (kind, payload) of a drawn event, addressed from the state (both states must be equal anyway)."""
    kind = event[0]
    if kind == "signal":
        return kind, {"name": event[1], "data": event[2]}
    if kind == "action_result":
        _, ok, offset, code, retryable, value = event
        step_id = program.step_ids[state.pc] if 0 <= state.pc < len(program.step_ids) else "s0"
        body = {"output": value} if ok else {"error": {"code": code, "retryable": retryable, "message": "m"}}
        return kind, {"step_id": step_id, "attempt": state.attempt + offset, "ok": ok, **body}
    if kind == "timer":
        return kind, {"timer_id": state.timer if event[1] and state.timer else "stale"}
    if kind == "event":
        awaited = state.waiting[6:] if str(state.waiting).startswith("event:") else "ping"
        event_type = awaited if event[1] == "awaited" else event[1]
        return kind, {"v": 1, "event_id": "ev", "type": event_type, "contact": {}, "data": {"k": event[2]}}
    return kind, {"reason": "r"} if kind == "cancel" else {}


def snapshot(state) -> tuple:
    return (
        state.status,
        state.pc,
        state.seq,
        state.steps,
        state.waiting,
        state.context,
        state.attempt,
        state.timer,
        state.visits,
        state.failures,
        state.effects,
    )


@settings(max_examples=400, deadline=None)
@given(
    definition=random_workflows(),
    contact=st.fixed_dictionaries({"n": JSON, "tags": st.lists(JSON, max_size=3)}),
    data=st.fixed_dictionaries({"k": JSON, "items": st.lists(JSON, max_size=3)}),
    events=st.lists(st.tuples(EVENTS, st.integers(0, 100_000)), max_size=10),
)
def test_compiled_and_pure_agree(impl, definition, contact, data, events):
    pure = dict(hotpath.implementations())["pure"]
    results = []
    for ns in (impl, pure):
        program = ns.Program(definition)
        state = ns.ExecutionState("e", subject=contact, event={"type": "contact.created", "data": data}, tenant="t")
        now = 1_000
        trail = [ns.advance(program, state, "start", None, now), list(state.effects)]
        for event, elapsed in events:
            now += elapsed
            kind, payload = payload_for(program, state, event)
            try:
                trail.append(ns.advance(program, state, kind, payload, now))
            except ValueError as exc:
                trail.append(("ValueError", str(exc)))
            trail.append(list(state.effects))
        results.append((trail, snapshot(state), program.matches({"type": "contact.created", "contact": contact})))
    assert results[0] == results[1]


# -- context types: the subject is named by its type ----------------------------------
def test_an_opportunity_workflow_names_its_subject_by_its_type(impl):
    definition = workflow(
        set_step("s", {"stage": "{{opportunity.stage}}", "line": "Deal {{opportunity.id}} is {{opportunity.stage}}"}),
        {"id": "won", "type": "if", "condition": {"eq": ["{{opportunity.stage}}", "won"]}, "then": "tell"},
        {"id": "lost", "type": "end", "status": "failed"},
        {"id": "tell", "type": "emit", "event": "deal.won", "data": {"stage": "{{opportunity.stage}}"}},
        {"id": "missing", "type": "set", "values": {"x": "{{opportunity.amount}}"}},
        subject="opportunity",
        trigger={"event": "opportunity.updated", "filter": {"exists": "opportunity.stage"}},
    )
    program = impl.Program(definition)
    assert program.subject_type == "opportunity"
    opportunity = {"id": "o-1", "stage": "won"}
    assert program.matches({"type": "opportunity.updated"}, opportunity)
    assert not program.matches({"type": "opportunity.updated"}, {"id": "o-1"})
    state = impl.ExecutionState("exec-1", subject=opportunity, tenant="acme")
    out = impl.advance(program, state, "start", None)
    assert state.context == {"stage": "won", "line": "Deal o-1 is won"}
    assert kinds(out)[-4:] == [
        ("won", "branch"),
        ("tell", "emitted"),
        ("missing", "step_failed"),
        ("missing", "failed"),
    ]
    emitted = next(data for kind, data in state.effects if kind == "emit")["event"]
    assert emitted["subject"] == {"type": "opportunity", "id": "o-1", "stage": "won"} and "contact" not in emitted
    # A typed subject is contract 1.2: a consumer that reads `v` knows to look for it.
    assert emitted["v"] == "1.2"
    assert out[-1][3]["error"] == "{{opportunity.amount}} names a missing field"


def test_a_contact_workflow_emits_about_its_contact_as_before(impl):
    definition = workflow({"id": "tell", "type": "emit", "event": "hi", "data": {}})
    _, state, _ = run(impl, definition, contact={"id": "c-1"})
    emitted = next(data for kind, data in state.effects if kind == "emit")["event"]
    assert emitted["contact"] == {"id": "c-1"} and "subject" not in emitted
    assert emitted["v"] == 1


def test_a_root_other_than_the_workflow_s_subject_type_is_an_unknown_root(impl):
    definition = workflow(set_step("s", {"x": "{{contact.id}}"}), subject="opportunity")
    with pytest.raises(DefinitionError, match=r"unknown root 'contact' \(expected context, opportunity or event\)"):
        impl.Program(definition)
