"""Decoding of the versioned message contracts (DESIGN.md, "Contracts").

Every message carries `v`, an integer major version or a "major.minor" string.
A message this engine cannot take raises `BadMessage` whose `reason` is a short
stable code (it labels a metric and a dead-letter entry) and whose text names
exactly what was wrong. Decoding is done once, with orjson.
"""

from typing import Any

import orjson

from hotpath.context_types import CONTACT
from hotpath.context_types import NAME as CONTEXT_TYPE_NAME

SUPPORTED_MAJOR = 1

#: Stable reason codes; metrics and dead letters are labelled with these.
REASONS = (
    "oversized",
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "unsupported_version",
    "missing_field",
    "wrong_type",
    "unknown_kind",
    "unknown_tenant",
    "tenant_mismatch",
    "unknown_subject_type",
    "invalid_subject",
    "invalid_definition",
    "unknown_execution",
    "execution_closed",
    "unreadable_execution",
    "other_deployment",
    "dispatch_error",
    # An execution's own failures (dead-lettered with the execution, not a message):
    "step_failed",
    "template_missing_field",
    "template_value_too_large",
    "context_too_large",
)


class BadMessage(ValueError):
    """A message that cannot be processed; never retried, always dead-lettered."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def load_versioned(
    body: bytes, max_bytes: int, *, major: int = SUPPORTED_MAJOR, contract: str = "contract"
) -> dict[str, Any]:
    """A JSON object within the size limit whose `v` has the given major (every contract's first check)."""
    if len(body) > max_bytes:
        raise BadMessage("oversized", f"body is {len(body)} bytes, the limit is {max_bytes}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson reports invalid UTF-8 as a decode error too; name it apart,
        # it usually means a producer with the wrong encoding, not bad JSON.
        if "utf-8" in str(exc).lower():
            raise BadMessage("invalid_utf8", f"body is not valid UTF-8 ({exc})") from None
        raise BadMessage("malformed_json", f"body is not valid JSON ({exc})") from None
    if type(doc) is not dict:
        raise BadMessage("not_an_object", f"body is a JSON {type(doc).__name__}, an object is required")
    _check_version(doc, major, contract)
    return doc


def _load(body: bytes, max_bytes: int) -> dict[str, Any]:
    return load_versioned(body, max_bytes)


def _check_version(doc: dict[str, Any], supported: int, contract: str) -> None:
    if "v" not in doc:
        raise BadMessage("missing_field", "field 'v' (contract version) is missing")
    v = doc["v"]
    if type(v) is int:
        major = v
    elif type(v) is str and v.split(".", 1)[0].isdigit():
        major = int(v.split(".", 1)[0])
    else:
        raise BadMessage("wrong_type", f"field 'v' must be an integer or 'major.minor' string, got {v!r}")
    if major != supported:
        raise BadMessage(
            "unsupported_version",
            f"{contract} version {v!r} is not supported (this engine speaks major {supported})",
        )


def require_field(doc: dict[str, Any], name: str, types: tuple[type, ...], what: str, path: str = "") -> Any:
    """doc[name], which must be one of `types` (`path` prefixes the name in errors: "error.")."""
    if name not in doc:
        raise BadMessage("missing_field", f"field '{path}{name}' is missing")
    value = doc[name]
    if type(value) not in types:
        raise BadMessage("wrong_type", f"field '{path}{name}' must be {what}, got {type(value).__name__}")
    return value


def require_text(doc: dict[str, Any], name: str, limit: int = 256, path: str = "") -> str:
    """doc[name], a non-empty string of at most `limit` characters."""
    value: str = require_field(doc, name, (str,), "a string", path)
    if not value or len(value) > limit:
        raise BadMessage("wrong_type", f"field '{path}{name}' must be a non-empty string of at most {limit} characters")
    return value


def _check_trigger(doc: dict[str, Any], path: str = "") -> None:
    """A trigger event: {v, event_id, tenant, type, subject{type, id, ...} | contact{id, ...}, data, ts}."""
    require_text(doc, "event_id", path=path)
    require_text(doc, "tenant", 128, path)
    require_text(doc, "type", 128, path)
    if "subject" in doc:
        _check_subject(doc, path)
    else:
        contact = require_field(doc, "contact", (dict,), "an object", path)
        contact_id = contact.get("id")
        if type(contact_id) not in (str, int) or contact_id == "":
            raise BadMessage("missing_field", f"field '{path}contact.id' must be a non-empty string or an integer")
    if "data" in doc and type(doc["data"]) is not dict:
        raise BadMessage("wrong_type", f"field '{path}data' must be an object, got {type(doc['data']).__name__}")
    require_field(doc, "ts", (int, float, str), "a number (epoch milliseconds) or an ISO-8601 string", path)


def _check_subject(doc: dict[str, Any], path: str) -> None:
    """Contract 1.2's typed subject: {type, id, ...}, in place of `contact`."""
    if "contact" in doc:
        raise BadMessage(
            "wrong_type",
            f"fields '{path}subject' and '{path}contact' are exclusive: a trigger is about one subject "
            "(contact {id, ...} is short for subject {type: 'contact', id, ...})",
        )
    subject = require_field(doc, "subject", (dict,), "an object {type, id, ...}", path)
    subject_type = subject.get("type")
    if type(subject_type) is not str or not CONTEXT_TYPE_NAME.match(subject_type):
        raise BadMessage(
            "wrong_type",
            f"field '{path}subject.type' must name a context type (a lowercase identifier of at most 64 "
            f"characters), got {subject_type!r}",
        )
    subject_id = subject.get("id")
    if type(subject_id) not in (str, int) or subject_id == "":
        raise BadMessage("missing_field", f"field '{path}subject.id' must be a non-empty string or an integer")


def subject_of(event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(subject type, subject record) of a decoded trigger event; the record is the subject less its `type`.

    An event without `subject` is about its `contact`, which is the record as it is (no copy).
    """
    subject = event.get("subject")
    if subject is None:
        return CONTACT, event["contact"]
    return subject["type"], {key: value for key, value in subject.items() if key != "type"}


def subject_key(event: dict[str, Any]) -> tuple[str, str]:
    """(subject type, subject id as text) of a decoded trigger event: what event waits are keyed on."""
    subject = event.get("subject")
    if subject is None:
        return CONTACT, str(event["contact"]["id"])
    return subject["type"], str(subject["id"])


#: The most events one trigger batch message may hold.
MAX_BATCH_EVENTS = 1000


class BadEvent(BadMessage):
    """One event of a trigger batch that cannot be taken; `payload` is that event alone."""

    def __init__(self, reason: str, message: str, payload: bytes):
        super().__init__(reason, message)
        self.payload = payload


def decode_triggers(body: bytes, max_bytes: int) -> dict[str, Any] | list[dict[str, Any] | BadEvent]:
    """A trigger message: a single event (a dict), or a batch {v, events: [event, ...]} (a list).

    A publisher at thousands of events per second batches them: one stored
    message (one fsync under `sync_interval: always`) for many events. Each
    item of a batch's list is an event or, for an event that is bad on its
    own, a `BadEvent` (its batch-mates still go ahead). A message that is bad
    as a whole raises `BadMessage`. An event of a batch without `v` takes the
    batch's.
    """
    doc = _load(body, max_bytes)
    if "events" not in doc or "event_id" in doc:
        _check_trigger(doc)
        return doc
    events = doc["events"]
    if type(events) is not list or not 0 < len(events) <= MAX_BATCH_EVENTS:
        raise BadMessage("wrong_type", f"field 'events' must be a list of 1 to {MAX_BATCH_EVENTS} trigger events")
    items: list[dict[str, Any] | BadEvent] = []
    for index, event in enumerate(events):
        name = f"events[{index}]"
        try:
            if type(event) is not dict:
                raise BadMessage("not_an_object", f"{name} is a JSON {type(event).__name__}, an object is required")
            event.setdefault("v", doc["v"])
            try:
                _check_version(event, SUPPORTED_MAJOR, "contract")
            except BadMessage as exc:
                raise BadMessage(exc.reason, f"{name}: {exc.message}") from None
            _check_trigger(event, f"{name}.")
        except BadMessage as exc:
            items.append(BadEvent(exc.reason, exc.message, orjson.dumps(event)))
            continue
        items.append(event)
    return items


#: Message kinds carried on an execution's subject, with their required text fields.
EXEC_KINDS = {
    "signal": ("signal_id", "name"),
    "action_result": ("step_id",),
    "event": (),
    "cancel": (),
    "retry": (),
    "limit_granted": ("step_id",),  # an action step's turn under its limits (daemon/limits.py)
}


def decode_exec(body: bytes, max_bytes: int) -> dict[str, Any]:
    """A message addressed to one execution: {v, kind, execution_id, ...}."""
    doc = _load(body, max_bytes)
    kind = require_text(doc, "kind", 64)
    if kind not in EXEC_KINDS:
        raise BadMessage("unknown_kind", f"kind {kind!r} is not one of {sorted(EXEC_KINDS)}")
    require_text(doc, "execution_id", 64)
    for name in EXEC_KINDS[kind]:
        require_text(doc, name)
    if kind == "action_result":
        require_field(doc, "attempt", (int,), "an integer")
        ok = require_field(doc, "ok", (bool,), "a boolean")
        if not ok:
            error = require_field(doc, "error", (dict,), "an object {code, retryable, message}")
            if type(error.get("code")) is not str or type(error.get("retryable")) is not bool:
                raise BadMessage("wrong_type", "field 'error' needs a string 'code' and a boolean 'retryable'")
    elif kind == "limit_granted":
        require_field(doc, "attempt", (int,), "an integer")
    elif kind == "event":
        event = require_field(doc, "event", (dict,), "an object (a trigger event)")
        if type(event.get("type")) is not str or type(event.get("event_id")) is not str:
            raise BadMessage("wrong_type", "field 'event' needs string 'type' and 'event_id'")
        stored = doc.get("stored")
        if stored is not None and not is_stored_position(stored):
            raise BadMessage(
                "wrong_type", "field 'stored' must be [stream, tenant token, seq, ns]: two strings and two integers"
            )
    return doc


def is_stored_position(value: object) -> bool:
    """Where a stream stored a trigger, as a routed event and an execution's row carry it:
    [stream, the tenant token of its subject, seq, ns]."""
    return (
        type(value) is list
        and len(value) == 4
        and type(value[0]) is str
        and type(value[1]) is str
        and type(value[2]) is int
        and type(value[3]) is int
    )


def encode(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)
