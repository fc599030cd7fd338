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
    "trigger": {"event": "contact.created", "filter": {"all": [{"exists": "contact.email"}, {"ne": ["{{contact.country}}", "US"]}]}},
    "limits": {"max_steps": 50},
    "steps": [
        {"id": "greet", "type": "set", "values": {"greeting": "Hello {{contact.first_name}}", "meta.source": "{{event.data}}"}},
        {"id": "check", "type": "if", "condition": {"in": ["{{contact.country}}", ["DE", "AT"]]}, "then": "wait-reply", "else": "done"},
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
    assert set(schema["$defs"]["step"]["properties"]["type"]["enum"]) == {"set", "if", "end", "wait_for_signal"}


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
        "steps[0] (id 'greet'): template 'Hi {{ user.name }}' uses unknown root 'user' (expected context, contact or event)"
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
