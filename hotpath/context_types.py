"""Context types: the kinds of subject a workflow can be about (contact, opportunity, ...).

A context type is a name and the JSON Schema (draft-07) of its subject record,
the `subject` of a trigger event less its `type`. Each is registered like an
action, from the `ordo.context_types` entry points and the
`context_type_plugins` setting (`daemon/context_types.py`); Ordo's own
`contact` is registered the same way.

The schema is compiled to Python once, with fastjsonschema: enrolment checks
every trigger's subject against it, and at tens of thousands of triggers a
second the compiled check (about a microsecond) matters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema

#: The subject type of a trigger without `subject` (contracts 1.0 and 1.1) and of a workflow that names none.
CONTACT = "contact"
#: The trigger contract version of an event with a typed `subject` (what an `emit` step of such a workflow sends).
SUBJECT_CONTRACT = "1.2"
#: A context type's name: a lowercase identifier; it is also the root of templates (`{{opportunity.stage}}`).
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: Template roots a context type cannot take.
RESERVED = frozenset(("context", "event", "subject"))


class ContextType:
    """A kind of subject: its name and the JSON Schema of its records (ValueError if either is unusable)."""

    __slots__ = ("name", "schema", "_check")

    def __init__(self, name: str, schema: Mapping[str, Any]) -> None:
        if type(name) is not str or not NAME.match(name) or name in RESERVED:
            raise ValueError(
                f"context type name {name!r} must be a lowercase identifier of at most 64 characters "
                f"and not one of {', '.join(sorted(RESERVED))}"
            )
        if not isinstance(schema, Mapping):
            raise ValueError(f"context type {name!r}: its schema must be a JSON Schema object")
        try:
            check: Callable[[Any], Any] = fastjsonschema.compile(dict(schema))
        except fastjsonschema.JsonSchemaDefinitionException as exc:
            raise ValueError(f"context type {name!r}: its schema is not a valid JSON Schema: {exc}") from None
        self.name = name
        self.schema = dict(schema)
        self._check = check

    def problem(self, record: Any) -> str | None:
        """What is wrong with a subject record, naming the field ('subject.stage must be ...'), or None."""
        try:
            self._check(record)
        except fastjsonschema.JsonSchemaValueException as exc:
            message: str = exc.message
            return "subject" + message[4:] if message.startswith("data") else message
        return None

    def known_properties(self) -> frozenset[str] | None:
        """The only properties a record may have (its schema says `additionalProperties: false`), else None."""
        if self.schema.get("additionalProperties") is not False:
            return None
        properties = self.schema.get("properties")
        return frozenset(properties) if isinstance(properties, Mapping) else frozenset()

    def __repr__(self) -> str:
        return f"ContextType({self.name!r})"


#: Ordo's own context type: a contact, any object with an `id`.
contact = ContextType(
    CONTACT,
    {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": ["string", "integer"]}},
    },
)
