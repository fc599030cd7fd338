"""Workflow definitions: the published schema and `validate`'s error reports."""

from __future__ import annotations

import copy

import pytest
from jsonschema import Draft202012Validator

from hotpath.definition import DefinitionError, load_schema, resolve, validate

VALID = {
    "id": "welcome",
    "tenant": "acme",
    "version": 3,
    "name": "Welcome new contacts",
    "description": "Greets, waits for a reply, ends.",
    "trigger": {
        "event": "contact.created",
        "filter": {"all": [{"exists": "contact.email"}, {"ne": ["{{contact.country}}", "US"]}]},
    },
    "limits": {"max_steps": 50},
    "steps": [
        {
            "id": "greet",
            "type": "set",
            "values": {"greeting": "Hello {{contact.first_name}}", "meta.source": "{{event.data}}"},
        },
        {
            "id": "check",
            "type": "if",
            "condition": {"in": ["{{contact.country}}", ["DE", "AT"]]},
            "then": "wait-reply",
            "else": "done",
        },
        {"id": "wait-reply", "type": "wait_for_signal", "signal": "reply", "next": "done"},
        {"id": "done", "type": "end"},
        {"id": "give-up", "type": "end", "status": "failed", "reason": "no reply"},
    ],
}


def errors_of(definition) -> list[str]:
    with pytest.raises(DefinitionError) as info:
        validate(definition)
    assert str(info.value) == "; ".join(info.value.errors)
    return info.value.errors


def with_step(index: int, **changes) -> dict:
    definition = copy.deepcopy(VALID)
    step = definition["steps"][index]
    for key, value in changes.items():
        if value is None:
            step.pop(key, None)
        else:
            step[key] = value
    return definition


def test_schema_is_package_data_and_a_valid_2020_12_schema():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]["step"]["properties"]["type"]["enum"]) == {
        "set",
        "if",
        "end",
        "wait_for_signal",
        "action",
        "wait",
        "wait_for_event",
        "switch",
        "goto",
        "emit",
    }


@pytest.mark.parametrize(
    "definition",
    [
        VALID,
        {"id": "minimal", "tenant": "t", "trigger": {"event": "x"}, "steps": [{"id": "only", "type": "end"}]},
        {
            "id": "every-operator",
            "tenant": "t",
            "trigger": {"event": "form.submitted"},
            "steps": [
                {
                    "id": "c",
                    "type": "if",
                    "condition": {
                        "any": [
                            {"not": {"exists": "{{contact.phone}}"}},
                            {"eq": [1, 1]},
                            {"gt": ["{{event.data.total}}", 10]},
                            {"gte": [1, 1]},
                            {"lt": [1, 2]},
                            {"lte": [1, 2]},
                            {"in": ["{{contact.country}}", "{{context.allowed}}"]},
                            {"contains": ["{{contact.tags}}", "vip"]},
                        ]
                    },
                },
            ],
        },
    ],
    ids=["full", "minimal", "every-operator"],
)
def test_valid_definitions_pass(definition):
    validate(definition)
    resolve(definition)


def test_version_is_optional():
    definition = copy.deepcopy(VALID)
    del definition["version"]
    validate(definition)
    assert resolve(definition).version == 0  # not deployed yet


def test_missing_required_property_points_at_step():
    assert errors_of(with_step(0, values=None)) == ["steps[0] (id 'greet'): 'values' is a required property"]


def test_unknown_target_points_at_step():
    errors = errors_of(with_step(1, then="nope"))
    assert errors == ["steps[1] (id 'check'): 'then' points at unknown step 'nope'"]


@pytest.mark.parametrize("field", ["else", "next"])
def test_unknown_else_and_next_targets(field):
    errors = errors_of(with_step(1, **{field: "missing"}))
    assert errors == [f"steps[1] (id 'check'): '{field}' points at unknown step 'missing'"]


def test_duplicate_step_id():
    errors = errors_of(with_step(4, id="done"))
    assert errors == ["steps[4] (id 'done'): duplicate step id 'done' (first used by steps[3])"]


def test_unknown_step_type():
    (error,) = errors_of(with_step(3, type="teleport"))
    assert error.startswith("steps[3] (id 'done').type: 'teleport' is not one of")


def test_additional_property_on_a_step():
    (error,) = errors_of(with_step(3, signal="reply"))
    assert error.startswith("steps[3] (id 'done'): Additional properties are not allowed ('signal' was unexpected)")


def test_bad_step_id_pattern():
    (error,) = errors_of(with_step(4, id="Give-Up!"))
    assert error.startswith("steps[4] (id 'Give-Up!').id: 'Give-Up!' does not match")


def test_unknown_condition_operator():
    (error,) = errors_of(with_step(1, condition={"approximately": [1, 2]}))
    assert error.startswith("steps[1] (id 'check').condition: 'approximately' is not one of")


def test_operand_pair_shape():
    (error,) = errors_of(with_step(1, condition={"eq": ["{{contact.x}}"]}))
    assert error.startswith("steps[1] (id 'check').condition.eq: ")


def test_template_with_unknown_root():
    errors = errors_of(with_step(0, values={"x": "Hi {{ user.name }}"}))
    assert errors == [
        "steps[0] (id 'greet'): template 'Hi {{ user.name }}' uses unknown root 'user'"
        " (expected context, contact or event)"
    ]


def test_condition_path_with_unknown_root():
    (error,) = errors_of(with_step(1, condition={"exists": "account.email"}))
    assert error.startswith("steps[1] (id 'check'): template 'account.email' uses unknown root 'account'")


def test_trigger_filter_errors_point_at_the_filter():
    definition = copy.deepcopy(VALID)
    definition["trigger"]["filter"] = {"eq": ["{{who.x}}", 1]}
    assert errors_of(definition) == [
        "trigger.filter: template '{{who.x}}' uses unknown root 'who' (expected context, contact or event)"
    ]


def test_top_level_errors():
    errors = errors_of({"id": "Bad Id", "tenant": "t", "trigger": {}, "steps": [], "limits": {"max_steps": 0}})
    assert any(e.startswith("id: 'Bad Id' does not match") for e in errors)
    assert "trigger: 'event' is a required property" in errors
    assert any(e.startswith("steps: [] should be non-empty") for e in errors)
    assert any(e.startswith("limits.max_steps: 0 is less than the minimum") for e in errors)


def test_all_errors_are_reported_at_once():
    definition = copy.deepcopy(VALID)
    definition["steps"][0].pop("values")
    definition["steps"][1]["then"] = "nope"
    definition["steps"][2]["next"] = "nowhere"
    definition["steps"][4]["id"] = "done"
    errors = errors_of(definition)
    assert len(errors) == 4, errors
    assert "steps[0] (id 'greet'): 'values' is a required property" in errors
    assert "steps[1] (id 'check'): 'then' points at unknown step 'nope'" in errors
    assert "steps[2] (id 'wait-reply'): 'next' points at unknown step 'nowhere'" in errors
    assert "steps[4] (id 'done'): duplicate step id 'done' (first used by steps[3])" in errors


def test_resolve_alone_reports_malformed_parts():
    """Program() runs resolve without the schema; it must still refuse malformed steps."""
    with pytest.raises(DefinitionError) as info:
        resolve(with_step(1, condition={"approximately": [1, 2]}, then="nope"))
    assert info.value.errors == [
        "steps[1] (id 'check'): unknown condition operator 'approximately' "
        "(expected one of all, any, not, exists, eq, ne, gt, gte, lt, lte, in, contains)",
        "steps[1] (id 'check'): 'then' points at unknown step 'nope'",
    ]


def test_definition_error_is_a_value_error():
    error = DefinitionError(["a", "b"])
    assert isinstance(error, ValueError)
    assert error.errors == ["a", "b"] and str(error) == "a; b"
    assert DefinitionError("one").errors == ["one"]


# -- actions, waits, events, switch, goto, emit -------------------------------------
EVERY_STEP = {
    "id": "every-step",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "limits": {"max_steps": 100, "max_visits": 5},
    "on_failure": "alert",
    "steps": [
        {
            "id": "send",
            "type": "action",
            "action": "sms.send",
            "version": 2,
            "input": {"to": "{{contact.phone}}", "text": "Hi {{contact.first_name}}"},
            "timeout": "10s",
            "retry": {
                "max_attempts": 5,
                "initial_interval": "PT2S",
                "backoff_coefficient": 1.5,
                "max_interval": "1h30m",
                "jitter": 0,
                "non_retryable": ["invalid_number"],
            },
            "on_failure": "alert",
        },
        {"id": "pause", "type": "wait", "duration": "2d"},
        {"id": "until", "type": "wait", "until": "{{context.send.deliver_at}}", "on_failure": "reply"},
        {"id": "fixed", "type": "wait", "until": "2030-01-01T09:00:00+01:00"},
        {
            "id": "reply",
            "type": "wait_for_event",
            "event": "sms.received",
            "timeout": "P3D",
            "on_timeout": "route",
            "filter": {"contains": ["{{event.data.text}}", "YES"]},
        },
        {
            "id": "route",
            "type": "switch",
            "cases": [{"when": {"exists": "context.reply"}, "next": "tell"}],
            "default": "again",
        },
        {"id": "again", "type": "goto", "target": "pause"},
        {
            "id": "tell",
            "type": "emit",
            "event": "lead.qualified",
            "data": {"phone": "{{contact.phone}}"},
            "next": "done",
        },
        {"id": "alert", "type": "action", "action": "webhook"},
        {"id": "done", "type": "end"},
    ],
}


def test_every_new_step_type_validates_and_resolves():
    validate(EVERY_STEP)
    resolved = resolve(EVERY_STEP)
    send, pause, until, fixed, reply, route, again, tell, alert, _ = resolved.steps
    assert (resolved.on_failure, resolved.max_visits) == (8, 5)
    assert (send.action, send.major, send.timeout_ms, send.timeout_text, send.max_attempts) == (
        "sms.send",
        2,
        10_000,
        "10s",
        5,
    )
    assert (send.initial_ms, send.coefficient, send.max_interval_ms, send.jitter) == (2_000, 1.5, 5_400_000, 0.0)
    assert (send.non_retryable, send.on_failure, send.next) == (("invalid_number",), 8, 1)
    assert (
        alert.timeout_ms,
        alert.max_attempts,
        alert.initial_ms,
        alert.coefficient,
        alert.max_interval_ms,
        alert.jitter,
    ) == (30_000, 3, 1_000, 2.0, 300_000, 0.2)
    assert (alert.major, alert.on_failure, alert.non_retryable) == (1, -1, ())
    assert (pause.duration_ms, pause.until, until.duration_ms, until.on_failure) == (172_800_000, None, -1, 4)
    assert until.until[0] == "path" and fixed.until == ("lit", "2030-01-01T09:00:00+01:00")
    assert (reply.event, reply.timeout_ms, reply.on_timeout, reply.next, reply.filter[0]) == (
        "sms.received",
        259_200_000,
        5,
        5,
        "contains",
    )
    assert (len(route.cases), route.cases[0][1], route.default) == (1, 7, 6)
    assert again.target == 1 and (tell.event, tell.next) == ("lead.qualified", 9)


def test_new_step_defaults():
    resolved = resolve(
        {
            "id": "d",
            "tenant": "t",
            "trigger": {"event": "x"},
            "steps": [
                {"id": "r", "type": "wait_for_event", "event": "e", "timeout": 1000, "next": "z"},
                {"id": "s", "type": "switch", "cases": [{"when": {"eq": [1, 1]}, "next": "z"}]},
                {"id": "em", "type": "emit", "event": "y"},
                {"id": "z", "type": "end"},
            ],
        }
    )
    r, s, em, _ = resolved.steps
    assert (r.on_timeout, r.next, r.filter) == (3, 3, None)
    assert s.default == 2  # falls through
    assert em.data == ("dict", ()) and (resolved.on_failure, resolved.max_visits) == (-1, 100)


def every_step(index: int, **changes) -> dict:
    definition = copy.deepcopy(EVERY_STEP)
    step = definition["steps"][index]
    for key, value in changes.items():
        if value is None:
            step.pop(key, None)
        else:
            step[key] = value
    return definition


@pytest.mark.parametrize(
    "definition, expected",
    [
        (every_step(6, target="nowhere"), "steps[6] (id 'again'): 'target' points at unknown step 'nowhere'"),
        (every_step(0, on_failure="nope"), "steps[0] (id 'send'): 'on_failure' points at unknown step 'nope'"),
        (every_step(2, on_failure="nope"), "steps[2] (id 'until'): 'on_failure' points at unknown step 'nope'"),
        (every_step(4, on_timeout="nope"), "steps[4] (id 'reply'): 'on_timeout' points at unknown step 'nope'"),
        (every_step(5, default="nope"), "steps[5] (id 'route'): 'default' points at unknown step 'nope'"),
        (
            every_step(5, cases=[{"when": {"eq": [1, 1]}, "next": "nope"}]),
            "steps[5] (id 'route'): 'cases[0].next' points at unknown step 'nope'",
        ),
        (every_step(7, next="nope"), "steps[7] (id 'tell'): 'next' points at unknown step 'nope'"),
        (
            every_step(1, duration="soon"),
            "steps[1] (id 'pause'): 'duration': 'soon' is not a duration (expected e.g. "
            "'500ms', '30s', '15m', '2h', '2d', '1h30m', 'PT15M', 'P1DT2H', or an integer of milliseconds)",
        ),
        (every_step(0, timeout="0s"), "steps[0] (id 'send'): 'timeout' must be a positive duration, got '0s'"),
        (every_step(0, timeout=-5), "steps[0] (id 'send'): 'timeout': a duration must not be negative, got -5"),
        (every_step(4, timeout="PT0S"), "steps[4] (id 'reply'): 'timeout' must be a positive duration, got 'PT0S'"),
        (
            every_step(0, retry={"initial_interval": "1m", "max_interval": "10s"}),
            "steps[0] (id 'send'): 'retry.max_interval' must not be shorter than 'retry.initial_interval'",
        ),
        (
            every_step(0, retry={"initial_interval": "P1Y"}),
            "steps[0] (id 'send'): 'retry.initial_interval': 'P1Y' is not a "
            "duration (expected e.g. '500ms', '30s', '15m', '2h', '2d', '1h30m', 'PT15M', 'P1DT2H',"
            " or an integer of milliseconds)",
        ),
        (
            every_step(1, duration=None),
            "steps[1] (id 'pause'): a wait step needs exactly one of 'duration' and 'until'",
        ),
        (
            every_step(1, until="2030-01-01"),
            "steps[1] (id 'pause'): a wait step needs exactly one of 'duration' and 'until'",
        ),
        (every_step(3, until="next tuesday"), "steps[3] (id 'fixed'): 'until': not an ISO-8601 time: 'next tuesday'"),
        (every_step(4, timeout=None), "steps[4] (id 'reply'): 'timeout' is a required property"),
        (
            every_step(2, until="{{later.x}}"),
            "steps[2] (id 'until'): template '{{later.x}}' uses unknown root 'later'"
            " (expected context, contact or event)",
        ),
    ],
)
def test_new_step_errors_point_at_the_step(definition, expected):
    assert errors_of(definition) == [expected]


@pytest.mark.parametrize(
    "index, changes, start",
    [
        (0, {"action": "Send SMS"}, "steps[0] (id 'send').action: 'Send SMS' does not match"),
        (0, {"version": 0}, "steps[0] (id 'send').version: 0 is less than the minimum of 1"),
        (0, {"retry": {"jitter": 2}}, "steps[0] (id 'send').retry.jitter: 2 is greater than the maximum of 1"),
        (
            0,
            {"retry": {"backoff_coefficient": 0.5}},
            "steps[0] (id 'send').retry.backoff_coefficient: 0.5 is less than",
        ),
        (0, {"retry": {"max_attempts": 0}}, "steps[0] (id 'send').retry.max_attempts: 0 is less than the minimum of 1"),
        (0, {"input": "text"}, "steps[0] (id 'send').input: 'text' is not of type 'object'"),
        (0, {"action": None}, "steps[0] (id 'send'): 'action' is a required property"),
        (1, {"duration": True}, "steps[1] (id 'pause').duration: True is not of type 'string', 'integer'"),
        (4, {"event": ""}, "steps[4] (id 'reply').event: '' should be non-empty"),
        (5, {"cases": []}, "steps[5] (id 'route').cases: [] should be non-empty"),
        (6, {"next": "pause"}, "steps[6] (id 'again'): Additional properties are not allowed ('next' was unexpected)"),
        (7, {"data": [1]}, "steps[7] (id 'tell').data: [1] is not of type 'object'"),
    ],
)
def test_new_step_schema_errors_point_at_the_step(index, changes, start):
    (error,) = errors_of(every_step(index, **changes))
    assert error.startswith(start), error


def test_workflow_on_failure_and_max_visits_errors():
    definition = copy.deepcopy(EVERY_STEP)
    definition["on_failure"] = "nope"
    assert errors_of(definition) == ["definition: 'on_failure' points at unknown step 'nope'"]
    definition = copy.deepcopy(EVERY_STEP)
    definition["limits"]["max_visits"] = 0
    (error,) = errors_of(definition)
    assert error.startswith("limits.max_visits: 0 is less than the minimum of 1")


def test_resolve_alone_reports_bad_durations_and_targets():
    """Program() runs resolve without the schema: new steps must be refused there too."""
    with pytest.raises(DefinitionError) as info:
        resolve(every_step(0, timeout="soon", on_failure="nope", retry={"max_attempts": 0}))
    assert info.value.errors == [
        "steps[0] (id 'send'): 'timeout': 'soon' is not a duration (expected e.g. '500ms', '30s', '15m', '2h', '2d', "
        "'1h30m', 'PT15M', 'P1DT2H', or an integer of milliseconds)",
        "steps[0] (id 'send'): 'retry.max_attempts' must be an integer >= 1, got 0",
        "steps[0] (id 'send'): 'on_failure' points at unknown step 'nope'",
    ]
