"""Workflow definitions: the published JSON Schema, validation, and resolution.

`validate` is what deploy runs: the schema first (exact error paths from the
jsonschema library), then the semantic rules a schema cannot express. Every
error names the offending step, e.g. ``steps[2] (id 'check'): 'then' points at
unknown step 'nope'``, and all of them are reported at once.

`resolve` turns a definition into the neutral, checked form that both
dispatchers (pure and compiled) are built from: step targets become indexes,
templates and conditions become nested tuples. Keeping the semantic rules here,
in one place, is what makes the two dispatchers agree on what is valid.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from hotpath.context_types import CONTACT, NAME, RESERVED, ContextType
from hotpath.durations import format_duration, parse_duration, parse_instant

if TYPE_CHECKING:  # jsonschema itself is imported on first use: most processes never validate
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

#: The slots a template's root resolves to: the context, the execution's subject, the event. The
#: subject's root is written as its type's name (`{{contact.x}}`, `{{opportunity.stage}}`).
SLOTS = ("context", "subject", "event")
DEFAULT_MAX_STEPS = 1000
MAX_MAX_STEPS = 100_000
DEFAULT_MAX_VISITS = 100
MAX_MAX_VISITS = 1_000_000
NO_STEP = -1  # a target that is not set (on_failure, on_timeout)
ACTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
#: A rate limit: calls per second, minute or hour.
RATE = re.compile(r"^([1-9][0-9]*)/(s|m|h)$")
_RATE_PERIOD_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


class DefinitionError(ValueError):
    """A workflow definition that cannot run; `.errors` lists every problem found."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


# -- schema --------------------------------------------------------------------
def load_schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12), read from the package data."""
    text = importlib.resources.files("hotpath").joinpath("workflow.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _path_sort_key(error: ValidationError) -> tuple[tuple[int, int, str], ...]:
    # Paths mix list indexes and property names; order ints numerically.
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path)


def validate(definition: object, context_types: Mapping[str, ContextType] | None = None) -> None:
    """Raise DefinitionError listing every schema and semantic problem of `definition`.

    With the registered `context_types`, the workflow's subject type must be one of them, and a template
    may not name a property its type's schema rules out (`additionalProperties: false`).
    """
    schema_errors = sorted(_validator().iter_errors(definition), key=_path_sort_key)
    messages = [f"{_pointer(definition, list(e.absolute_path))}: {e.message}" for e in schema_errors]
    try:
        resolve(definition, context_types)
    except _Problems as exc:
        # The resolver also notices malformed parts, which the schema has then
        # already reported (more precisely); add only what a schema cannot see.
        messages += [m for semantic, m in exc.problems if semantic or not schema_errors]
    if messages:
        raise DefinitionError(messages)


def _step_pointer(definition: Any, index: int) -> str:
    steps = definition.get("steps") if isinstance(definition, dict) else None
    step = steps[index] if isinstance(steps, list) and 0 <= index < len(steps) else None
    step_id = step.get("id") if isinstance(step, dict) else None
    return f"steps[{index}] (id {step_id!r})" if isinstance(step_id, str) else f"steps[{index}]"


def _pointer(definition: Any, path: list[str | int]) -> str:
    """'steps[1] (id 'greet').values' for ['steps', 1, 'values']; 'definition' for []."""
    if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int):
        text, rest = _step_pointer(definition, path[1]), path[2:]
    elif path:
        text, rest = str(path[0]), path[1:]
    else:
        return "definition"
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


# -- templates and missing fields -------------------------------------------------
# A template names a field with {{root.key.key}} (root: context, the workflow's
# subject type, e.g. contact, or event; a numeric key also indexes a list). A field is missing when a key is
# absent, an index is out of range, or a part of the path is not an object or
# list (a null included); a field that is present and null is not missing.
#
# Conditions ask a question, so a missing field there is null: {"exists":
# "context.reply"} is false, {"eq": ["{{contact.plan}}", "pro"]} is false. A
# value (a set step's values, an action's input, an emit's data, a wait's
# until) must exist: a missing field fails the step with the non-retryable
# error `template_missing_field`, naming the template ({{contact.first_nam}}).
# The step's on_failure (action, wait) or else the workflow's on_failure is
# taken; without one the execution fails and the step is dead-lettered with
# reason `template_missing_field`. A set step's values before the failing one
# stay assigned. To copy a field that may be absent, test it with `exists`.
TEMPLATE_MISSING_FIELD = "template_missing_field"
# A rendered value may not grow without bound (a `set` in a loop that doubles a
# string or a list would otherwise eat the worker's memory within one advance):
# a string over MAX_RENDERED_CHARS, or a copied field over MAX_RENDERED_NODES
# dicts, lists and values, fails the step with `template_value_too_large`.
TEMPLATE_VALUE_TOO_LARGE = "template_value_too_large"
TEMPLATE_ERRORS = frozenset((TEMPLATE_MISSING_FIELD, TEMPLATE_VALUE_TOO_LARGE))
MAX_RENDERED_CHARS = 1_000_000
MAX_RENDERED_NODES = 100_000

#: A resolved template or condition: a tuple tagged by its first item (the forms are listed below).
Template = tuple[Any, ...]
Condition = tuple[Any, ...]


def template_text(node: Template) -> str:
    """A ("path", slot, segments, root) node as written: '{{contact.first_name}}'."""
    _, _, segments, root = node
    return "{{" + ".".join([root, *(key for key, _ in segments)]) + "}}"


def interp_text(node: Template, limit: int = 80) -> str:
    """An ("interp", parts) node as written, cut at `limit` characters: 'Hi {{contact.first_name}}!'."""
    text = "".join(part if isinstance(part, str) else template_text(part) for part in node[1])
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- resolved form ---------------------------------------------------------------
# Templates (operands and values):
#   ("lit", value)                  a JSON scalar, used as is
#   ("path", slot, segments, root)  the raw value at slot.seg.seg (slot: one of SLOTS, root: as written,
#                                   for errors); segments are (key, index|-1)
#   ("interp", parts)               parts are str or path nodes, joined with str(value)
#   ("dict", ((key, node), ...))    rendered into a new dict (never shared with the program)
#   ("list", (node, ...))           rendered into a new list
# Conditions:
#   ("all"|"any", (cond, ...)), ("not", cond), ("exists", path node),
#   (op, template, template) for op in COMPARISONS.

COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "contains")
OPERATORS = ("all", "any", "not", "exists") + COMPARISONS


class SetStep(NamedTuple):
    id: str
    next: int
    assignments: tuple[tuple[tuple[str, ...], Template], ...]  # ((context key path, template), ...)


class IfStep(NamedTuple):
    id: str
    condition: Condition
    then: int  # step index; len(steps) means "the end"
    else_: int


class EndStep(NamedTuple):
    id: str
    status: str  # "completed" | "failed"
    reason: str | None


class WaitForSignalStep(NamedTuple):
    id: str
    next: int
    signal: str


class ActionLimits(NamedTuple):
    """An action step's `limits`: its calls share a rate and a concurrency across all workers."""

    rate_per_s: float | None  # None: no rate limit
    rate_text: str | None  # the rate as written ("50/s")
    concurrency: int | None  # None: no concurrency limit
    key: Template | None  # None: one limit per tenant; else also per rendered key


class ActionStep(NamedTuple):
    id: str
    next: int
    action: str
    major: int
    input: Template  # a ("dict", ...) template
    timeout_ms: int
    timeout_text: str  # the timeout as written, for error messages
    max_attempts: int
    initial_ms: int
    coefficient: float
    max_interval_ms: int
    jitter: float
    non_retryable: tuple[str, ...]  # error codes that are never retried
    on_failure: int  # step index or NO_STEP
    limits: ActionLimits | None = None  # None: the call is made at once


class WaitStep(NamedTuple):
    id: str
    next: int
    duration_ms: int  # NO_STEP when the step waits `until` a time
    until: Template | None  # a template yielding an ISO-8601 string or epoch ms
    on_failure: int


class WaitForEventStep(NamedTuple):
    id: str
    next: int
    event: str
    filter: Condition | None  # condition over event (the arriving one), the subject and context
    timeout_ms: int
    on_timeout: int  # defaults to next


class SwitchStep(NamedTuple):
    id: str
    cases: tuple[tuple[Condition, int], ...]  # ((condition, step index), ...), first that holds wins
    default: int  # defaults to next


class GotoStep(NamedTuple):
    id: str
    target: int


class EmitStep(NamedTuple):
    id: str
    next: int
    event: str
    data: Template  # a ("dict", ...) template


#: A resolved step: one of the types above.
Step = (
    SetStep
    | IfStep
    | EndStep
    | WaitForSignalStep
    | ActionStep
    | WaitStep
    | WaitForEventStep
    | SwitchStep
    | GotoStep
    | EmitStep
)


class ResolvedDefinition(NamedTuple):
    workflow_id: str
    version: int  # 0 when not yet deployed (deploy assigns versions from 1)
    tenant: str
    trigger_event: str
    trigger_filter: Condition | None
    max_steps: int
    steps: tuple[Step, ...]
    max_visits: int = DEFAULT_MAX_VISITS
    on_failure: int = NO_STEP  # the workflow-level failure branch
    subject_type: str = CONTACT  # the context type its executions are about
    max_running: int | None = None  # None: any number of its executions may run at once


class _Problems(DefinitionError):
    """DefinitionError that also says which problems are semantic (beyond the schema's reach)."""

    def __init__(self, problems: list[tuple[bool, str]]):
        self.problems = problems
        super().__init__([message for _, message in problems])


_EXACT = re.compile(r"^\{\{\s*([^{}]*?)\s*\}\}$")
_EMBEDDED = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class _Resolver:
    """Collects problems while walking one definition.

    `where` is the current location: a step index or a name such as 'trigger.filter'.
    `error` is for malformed parts (the schema reports those too), `semantic` for
    rules only the resolver checks (unique ids, targets, template paths).
    """

    def __init__(self, definition: Any):
        self.definition = definition
        self.problems: list[tuple[bool, str]] = []
        self.where: int | str = "definition"
        #: The workflow's subject type (the root its templates name it by) and, when its schema
        #: says `additionalProperties: false`, the only properties a template may name.
        self.subject = CONTACT
        self.subject_properties: frozenset[str] | None = None

    def _report(self, semantic: bool, message: str) -> None:
        where = self.where
        prefix = _step_pointer(self.definition, where) if isinstance(where, int) else where
        self.problems.append((semantic, f"{prefix}: {message}"))

    def error(self, message: str) -> None:
        self._report(False, message)

    def semantic(self, message: str) -> None:
        self._report(True, message)

    # templates
    def path(self, text: str, source: str) -> Template:
        segments = text.split(".")
        root = segments[0]
        slot = "subject" if root == self.subject else root
        if slot not in SLOTS or root == "subject":
            self.semantic(f"template {source!r} uses unknown root {root!r} (expected context, {self.subject} or event)")
        elif any(not s or s != s.strip() for s in segments):
            self.semantic(f"template {source!r} has an empty or blank path segment")
        elif slot == "subject" and self.subject_properties is not None and len(segments) > 1:
            if segments[1] not in self.subject_properties:
                self.semantic(
                    f"template {source!r} names {segments[1]!r}, which the {root} schema does not declare "
                    f"(additionalProperties is false; it declares {', '.join(sorted(self.subject_properties))})"
                )
        parsed = tuple((s, int(s) if s.isascii() and s.isdigit() else -1) for s in segments[1:])
        return ("path", slot, parsed, root)

    def template(self, value: Any) -> Template:
        if isinstance(value, str):
            exact = _EXACT.match(value)
            if exact:
                return self.path(exact.group(1), value)
            parts: list[str | Template] = []
            pos = 0
            for match in _EMBEDDED.finditer(value):
                if match.start() > pos:
                    parts.append(value[pos : match.start()])
                parts.append(self.path(match.group(1), value))
                pos = match.end()
            if not parts:
                return ("lit", value)
            if pos < len(value):
                parts.append(value[pos:])
            return ("interp", tuple(parts))
        if isinstance(value, dict):
            return ("dict", tuple((key, self.template(item)) for key, item in value.items()))
        if isinstance(value, list):
            return ("list", tuple(self.template(item) for item in value))
        return ("lit", value)

    # conditions
    def condition(self, cond: Any) -> Condition:
        if not isinstance(cond, dict) or len(cond) != 1:
            self.error(f"a condition must be an object with exactly one operator, got {cond!r}")
            return ("all", ())
        ((op, arg),) = cond.items()
        if op not in OPERATORS:
            self.error(f"unknown condition operator {op!r} (expected one of {', '.join(OPERATORS)})")
            return ("all", ())
        if op in ("all", "any"):
            if not isinstance(arg, list):
                self.error(f"'{op}' takes a list of conditions")
                return (op, ())
            return (op, tuple(self.condition(c) for c in arg))
        if op == "not":
            return ("not", self.condition(arg))
        if op == "exists":
            if not isinstance(arg, str) or not arg:
                self.error(f"'exists' takes a path such as 'contact.email', got {arg!r}")
                return ("exists", ("lit", None))
            exact = _EXACT.match(arg)
            return ("exists", self.path(exact.group(1), arg) if exact else self.path(arg, arg))
        if not isinstance(arg, list) or len(arg) != 2:
            self.error(f"'{op}' takes a list of two operands, got {arg!r}")
            return (op, ("lit", None), ("lit", None))
        return (op, self.template(arg[0]), self.template(arg[1]))

    # steps
    def target(self, step: dict[str, Any], field: str, default: int, index_of: dict[str, int]) -> int:
        if field not in step:
            return default
        name = step[field]
        if not isinstance(name, str):
            self.error(f"{field!r} must be a step id, got {name!r}")
            return default
        if name not in index_of:
            self.semantic(f"{field!r} points at unknown step {name!r}")
            return default
        return index_of[name]

    def set_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> SetStep:
        values = step.get("values")
        assignments = []
        if values is None:
            self.error("'values' is a required property")
        elif not isinstance(values, dict) or not values:
            self.error("'values' must be a non-empty object of context paths")
        else:
            for key, value in values.items():
                path = tuple(key.split(".")) if isinstance(key, str) else ("",)
                if any(not s or s != s.strip() for s in path):
                    self.error(f"'values' key {key!r} is not a dotted context path")
                assignments.append((path, self.template(value)))
        return SetStep(step["id"], self.target(step, "next", following, index_of), tuple(assignments))

    def if_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> IfStep:
        if "condition" not in step:
            self.error("'condition' is a required property")
        condition = self.condition(step.get("condition", {"all": []}))
        fallthrough = self.target(step, "next", following, index_of)
        return IfStep(
            step["id"],
            condition,
            self.target(step, "then", fallthrough, index_of),
            self.target(step, "else", fallthrough, index_of),
        )

    def end_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> EndStep:
        status = step.get("status", "completed")
        if status not in ("completed", "failed"):
            self.error(f"'status' must be 'completed' or 'failed', got {status!r}")
            status = "failed"
        reason = step.get("reason")
        if reason is not None and not isinstance(reason, str):
            self.error("'reason' must be a string")
            reason = str(reason)
        return EndStep(step["id"], status, reason)

    def wait_for_signal_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> WaitForSignalStep:
        signal = step.get("signal")
        if not isinstance(signal, str) or not signal:
            self.error("'signal' must be a non-empty string")
            signal = ""
        return WaitForSignalStep(step["id"], self.target(step, "next", following, index_of), signal)

    # durations and policies
    def duration(self, owner: dict[str, Any], field: str, default: int | str, positive: bool, label: str = "") -> int:
        value = owner.get(field, default)
        name = label + field
        try:
            ms = parse_duration(value)
        except ValueError as exc:
            # The schema checks only the type; the form of a duration is ours to report.
            report = self.semantic if isinstance(value, (int, str)) and not isinstance(value, bool) else self.error
            report(f"{name!r}: {exc}")
            return 1
        if positive and ms <= 0:
            self.semantic(f"{name!r} must be a positive duration, got {value!r}")
            return 1
        return ms

    def number(self, policy: dict[str, Any], field: str, default: float, low: float, high: float | None) -> float:
        value = policy.get(field, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < low
            or (high is not None and value > high)
        ):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            self.error(f"'retry.{field}' must be a number {bounds}, got {value!r}")
            return default
        return float(value)

    def action_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> ActionStep:
        action = step.get("action")
        if not isinstance(action, str) or not ACTION_NAME.match(action):
            self.error(f"'action' must be an action name such as 'webhook' or 'sms.send', got {action!r}")
            action = ""
        major = step.get("version", 1)
        if not isinstance(major, int) or isinstance(major, bool) or major < 1:
            self.error(f"'version' must be an action major version >= 1, got {major!r}")
            major = 1
        raw_input = step.get("input", {})
        if not isinstance(raw_input, dict):
            self.error("'input' must be an object of templates")
            raw_input = {}
        timeout = step.get("timeout", "30s")
        timeout_ms = self.duration(step, "timeout", "30s", positive=True)
        policy = step.get("retry", {})
        if not isinstance(policy, dict):
            self.error("'retry' must be an object")
            policy = {}
        max_attempts = policy.get("max_attempts", 3)
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            self.error(f"'retry.max_attempts' must be an integer >= 1, got {max_attempts!r}")
            max_attempts = 1
        initial_ms = self.duration(policy, "initial_interval", "1s", positive=True, label="retry.")
        max_interval_ms = self.duration(policy, "max_interval", "5m", positive=True, label="retry.")
        if max_interval_ms < initial_ms:
            self.semantic("'retry.max_interval' must not be shorter than 'retry.initial_interval'")
        non_retryable = policy.get("non_retryable", [])
        if not isinstance(non_retryable, list) or not all(isinstance(code, str) for code in non_retryable):
            self.error("'retry.non_retryable' must be a list of error codes")
            non_retryable = []
        return ActionStep(
            id=step["id"],
            next=self.target(step, "next", following, index_of),
            action=action,
            major=major,
            input=self.template(raw_input),
            timeout_ms=timeout_ms,
            timeout_text=timeout if isinstance(timeout, str) else format_duration(timeout_ms),
            max_attempts=max_attempts,
            initial_ms=initial_ms,
            coefficient=self.number(policy, "backoff_coefficient", 2.0, 1.0, None),
            max_interval_ms=max_interval_ms,
            jitter=self.number(policy, "jitter", 0.2, 0.0, 1.0),
            non_retryable=tuple(non_retryable),
            on_failure=self.target(step, "on_failure", NO_STEP, index_of),
            limits=self.action_limits(step["limits"]) if "limits" in step else None,
        )

    def action_limits(self, limits: Any) -> ActionLimits | None:
        if not isinstance(limits, dict):
            self.error(f"'limits' must be an object with 'rate', 'concurrency' and/or 'key', got {limits!r}")
            return None
        unknown = sorted(set(limits) - {"rate", "concurrency", "key"})
        if unknown:
            self.error(
                f"'limits' has unknown field(s) {', '.join(map(repr, unknown))} (expected rate, concurrency, key)"
            )
        if "rate" not in limits and "concurrency" not in limits:
            self.error("'limits' needs a 'rate', a 'concurrency' or both")
        rate = limits.get("rate")
        rate_per_s = None
        if rate is not None:
            match = RATE.match(rate) if isinstance(rate, str) else None
            if match is None:
                self.error(f"'limits.rate' must be a positive count per s, m or h such as '50/s', got {rate!r}")
            else:
                rate_per_s = int(match.group(1)) / _RATE_PERIOD_S[match.group(2)]
        concurrency = limits.get("concurrency")
        if concurrency is not None and (
            not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
        ):
            self.error(f"'limits.concurrency' must be an integer >= 1, got {concurrency!r}")
            concurrency = None
        key = limits.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            self.error(f"'limits.key' must be a non-empty template string, got {key!r}")
            key = None
        return ActionLimits(
            rate_per_s=rate_per_s,
            rate_text=rate if rate_per_s is not None else None,
            concurrency=concurrency,
            key=None if key is None else self.template(key),
        )

    def wait_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> WaitStep:
        duration_ms, until = NO_STEP, None
        if ("duration" in step) == ("until" in step):
            self.semantic("a wait step needs exactly one of 'duration' and 'until'")
        elif "duration" in step:
            duration_ms = self.duration(step, "duration", 0, positive=False)
        else:
            raw = step["until"]
            if isinstance(raw, bool) or not isinstance(raw, (str, int)):
                self.error(f"'until' must be an ISO-8601 time, a template, or epoch milliseconds, got {raw!r}")
            else:
                until = self.template(raw)
                if until[0] == "lit":
                    try:
                        parse_instant(raw)
                    except ValueError as exc:
                        self.semantic(f"'until': {exc}")
        return WaitStep(
            step["id"],
            self.target(step, "next", following, index_of),
            duration_ms,
            until,
            self.target(step, "on_failure", NO_STEP, index_of),
        )

    def wait_for_event_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> WaitForEventStep:
        event = step.get("event")
        if not isinstance(event, str) or not event:
            self.error("'event' must be a non-empty event type")
            event = ""
        if "timeout" not in step:
            self.error("'timeout' is a required property")
        following = self.target(step, "next", following, index_of)
        return WaitForEventStep(
            step["id"],
            following,
            event,
            self.condition(step["filter"]) if "filter" in step else None,
            self.duration(step, "timeout", 1, positive=True),
            self.target(step, "on_timeout", following, index_of),
        )

    def switch_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> SwitchStep:
        cases = step.get("cases")
        resolved = []
        if not isinstance(cases, list) or not cases:
            self.error("'cases' must be a non-empty list of {'when', 'next'}")
            cases = []
        for i, case in enumerate(cases):
            if not isinstance(case, dict) or "when" not in case or not isinstance(case.get("next"), str):
                self.error(f"'cases[{i}]' must be an object with 'when' and 'next'")
                continue
            target = case["next"]
            if target not in index_of:
                self.semantic(f"'cases[{i}].next' points at unknown step {target!r}")
            resolved.append((self.condition(case["when"]), index_of.get(target, following)))
        following = self.target(step, "next", following, index_of)
        return SwitchStep(step["id"], tuple(resolved), self.target(step, "default", following, index_of))

    def goto_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> GotoStep:
        if "target" not in step:
            self.error("'target' is a required property")
        return GotoStep(step["id"], self.target(step, "target", following, index_of))

    def emit_step(self, step: dict[str, Any], following: int, index_of: dict[str, int]) -> EmitStep:
        event = step.get("event")
        if not isinstance(event, str) or not event:
            self.error("'event' must be a non-empty event type")
            event = ""
        data = step.get("data", {})
        if not isinstance(data, dict):
            self.error("'data' must be an object of templates")
            data = {}
        return EmitStep(step["id"], self.target(step, "next", following, index_of), event, self.template(data))

    #: Step type -> resolver method; a new step type is one entry here (and one in the schema).
    STEP_TYPES: ClassVar[dict[str, Callable[[_Resolver, dict[str, Any], int, dict[str, int]], Step]]] = {
        "set": set_step,
        "if": if_step,
        "end": end_step,
        "wait_for_signal": wait_for_signal_step,
        "action": action_step,
        "wait": wait_step,
        "wait_for_event": wait_for_event_step,
        "switch": switch_step,
        "goto": goto_step,
        "emit": emit_step,
    }


def resolve(definition: object, context_types: Mapping[str, ContextType] | None = None) -> ResolvedDefinition:
    """Check the semantic rules and return the resolved form; DefinitionError lists all problems.

    With the registered `context_types`, also that the subject type is one of them (see `validate`).
    """
    r = _Resolver(definition)
    if not isinstance(definition, dict):
        r.error(f"a workflow definition must be an object, got {type(definition).__name__}")
        raise _Problems(r.problems)

    header: dict[str, str] = {}
    for field in ("id", "tenant"):
        r.where = field
        value = definition.get(field)
        if not isinstance(value, str):
            r.error(f"{field!r} must be a string")
            value = ""
        header[field] = value

    r.where = "version"
    version = definition.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        r.error(f"'version' must be an integer >= 1, got {version!r}")

    r.where = "limits"
    limits = definition.get("limits") or {}
    max_steps = limits.get("max_steps", DEFAULT_MAX_STEPS) if isinstance(limits, dict) else None
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 1 <= max_steps <= MAX_MAX_STEPS:
        r.error(f"'max_steps' must be an integer from 1 to {MAX_MAX_STEPS}, got {max_steps!r}")
        max_steps = DEFAULT_MAX_STEPS
    max_visits = limits.get("max_visits", DEFAULT_MAX_VISITS) if isinstance(limits, dict) else None
    if not isinstance(max_visits, int) or isinstance(max_visits, bool) or not 1 <= max_visits <= MAX_MAX_VISITS:
        r.error(f"'max_visits' must be an integer from 1 to {MAX_MAX_VISITS}, got {max_visits!r}")
        max_visits = DEFAULT_MAX_VISITS
    max_running = limits.get("max_running") if isinstance(limits, dict) else None
    if max_running is not None and (
        not isinstance(max_running, int) or isinstance(max_running, bool) or max_running < 1
    ):
        r.error(f"'limits.max_running' must be an integer >= 1, got {max_running!r}")
        max_running = None
    unknown = sorted(set(limits) - {"max_steps", "max_visits", "max_running"}) if isinstance(limits, dict) else []
    if unknown:
        expected = "expected max_steps, max_visits, max_running"
        r.error(f"'limits' has unknown field(s) {', '.join(map(repr, unknown))} ({expected})")

    r.where = "subject"
    subject = definition.get("subject", CONTACT)
    if not isinstance(subject, str) or not NAME.match(subject) or subject in RESERVED:
        r.error(f"'subject' must name a context type (a lowercase identifier), got {subject!r}")
    else:
        r.subject = subject
        if context_types is not None:
            if subject not in context_types:
                registered = ", ".join(sorted(context_types)) or "none"
                r.semantic(f"context type {subject!r} is not registered (registered: {registered})")
            else:
                r.subject_properties = context_types[subject].known_properties()

    r.where = "trigger"
    trigger = definition.get("trigger")
    trigger_event, trigger_filter = "", None
    if not isinstance(trigger, dict) or not isinstance(trigger.get("event"), str):
        r.error("'trigger' must be an object with an 'event' string")
    else:
        trigger_event = trigger["event"]
        if "filter" in trigger:
            r.where = "trigger.filter"
            trigger_filter = r.condition(trigger["filter"])

    r.where = "steps"
    raw_steps = definition.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        r.error("'steps' must be a non-empty list")
        raise _Problems(r.problems)

    index_of: dict[str, int] = {}
    usable = []
    for i, step in enumerate(raw_steps):
        r.where = i
        if not isinstance(step, dict) or not isinstance(step.get("id"), str):
            r.error("a step must be an object with an 'id' string")
        elif step["id"] in index_of:
            r.semantic(f"duplicate step id {step['id']!r} (first used by steps[{index_of[step['id']]}])")
        elif step.get("type") not in _Resolver.STEP_TYPES:
            index_of[step["id"]] = i
            r.error(f"unknown step type {step.get('type')!r} (expected one of {', '.join(_Resolver.STEP_TYPES)})")
        else:
            index_of[step["id"]] = i
            usable.append(i)

    steps: dict[int, Step] = {}
    for i in usable:
        r.where = i
        step = raw_steps[i]
        steps[i] = _Resolver.STEP_TYPES[step["type"]](r, step, i + 1, index_of)

    r.where = "definition"
    on_failure = r.target(definition, "on_failure", NO_STEP, index_of)

    if r.problems:
        raise _Problems(r.problems)
    return ResolvedDefinition(
        workflow_id=header["id"],
        version=version,
        tenant=header["tenant"],
        trigger_event=trigger_event,
        trigger_filter=trigger_filter,
        max_steps=max_steps,
        steps=tuple(steps[i] for i in range(len(raw_steps))),  # all of them: there were no problems
        max_visits=max_visits,
        on_failure=on_failure,
        subject_type=r.subject,
        max_running=max_running,
    )
