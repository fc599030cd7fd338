"""Which executions are traced, and the W3C trace context of each: no OpenTelemetry import.

The sampling decision is a pure function of the execution id, so every
worker, every redelivery and every restart decides the same for one
execution, and an unsampled execution costs one slice of its id and a
comparison. Every span id of an execution's trace is derived from its id and
the seq of the transition the span starts at (`span_id`), so the worker that
publishes an action request and the one that later builds the spans from the
ledger name the same span without telling each other.

The trace id is the execution id's 128 bits, unless the trigger message
carried a `traceparent` (W3C Trace Context): then the execution's trace is a
child of it. Enrolment keeps the trigger's traceparent in the execution's
stored event (`traceparent`), so a later commit on any worker finds it.
"""

from __future__ import annotations

import hashlib
import re

#: W3C Trace Context, version 00: version-trace id-parent id-flags, all lowercase hex.
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
#: The key under which enrolment keeps a trigger's traceparent in the execution's event.
EVENT_KEY = "traceparent"
_FULL = 1 << 32


def sampled(execution_id: str, rate: float) -> bool:
    """Whether the execution is traced: its id's last 32 bits (random in a uuid5) below `rate` of 2**32."""
    return place_of(execution_id) < threshold_of(rate)


def threshold_of(rate: float) -> int:
    """The places below which executions are traced at `rate` (2**32 + 1 at 1: all of them)."""
    if rate <= 0.0:
        return 0
    if rate >= 1.0:
        return _FULL + 1
    return int(rate * _FULL)


def place_of(execution_id: str) -> int:
    """An execution's place, 0 to 2**32 - 1: its uuid's last 32 bits (random in a uuid5)."""
    try:
        return int(execution_id[-8:], 16)
    except ValueError:  # not a uuid: a hash of it, as stable
        return int.from_bytes(hashlib.blake2b(execution_id.encode(), digest_size=4).digest(), "big")


def execution_trace_id(execution_id: str) -> int:
    """The trace id of an execution no traceparent came with: its uuid's 128 bits."""
    try:
        value = int(execution_id.replace("-", ""), 16)
    except ValueError:
        value = 0
    if 0 < value < 1 << 128:
        return value
    return int.from_bytes(hashlib.blake2b(execution_id.encode(), digest_size=16).digest(), "big") or 1


def span_id(execution_id: str, what: str, seq: int = 0) -> int:
    """The id of one span of the execution's trace: `what` (root, enrol, step, call, wait) at `seq`."""
    digest = hashlib.blake2b(f"{execution_id}:{what}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def parse_traceparent(value: object) -> tuple[int, int] | None:
    """(trace id, parent span id) of a valid W3C traceparent, else None (an invalid one is ignored)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    trace_id, parent_id = int(match[1], 16), int(match[2], 16)
    if trace_id == 0 or parent_id == 0:  # all zeros is invalid (W3C)
        return None
    return trace_id, parent_id


def format_traceparent(trace_id: int, parent_id: int, sampled_flag: bool = True) -> str:
    return f"00-{trace_id:032x}-{parent_id:016x}-{'01' if sampled_flag else '00'}"


def trigger_traceparent(headers: dict | None, event: dict) -> str | None:
    """The trace context a trigger event continues: its message's `traceparent` header, else the event's
    own `traceparent` field (how each event of a batch can carry one); None when neither is valid.

    Every trigger pays for this, traced or not, tracing on or off: a well-formed value is checked
    with one match and two comparisons, not parsed (trace_of parses it, for sampled executions only).
    """
    if headers:
        value = headers.get("traceparent")
        if value is not None:
            value = _valid_traceparent(value)
            if value is not None:
                return value
    value = event.get(EVENT_KEY)
    return None if value is None else _valid_traceparent(value)


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def _valid_traceparent(value: object) -> str | None:
    """`value` as a lowercase, trimmed W3C traceparent, or None when it is not a valid one."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    if _TRACEPARENT.fullmatch(value) is None:  # not already lowercase and trimmed, or not valid at all
        value = value.strip().lower()
        if _TRACEPARENT.fullmatch(value) is None:
            return None
    if value[3:35] == _ZERO_TRACE or value[36:52] == _ZERO_SPAN:  # all zeros is invalid (W3C)
        return None
    return value


def trace_of(execution_id: str, event: object) -> tuple[int, int | None]:
    """(trace id, the root span's parent or None) of an execution, from its stored event."""
    parent = parse_traceparent(event.get(EVENT_KEY)) if isinstance(event, dict) else None
    if parent is not None:
        return parent
    return execution_trace_id(execution_id), None


def call_traceparent(execution_id: str, event: object, request_seq: int) -> str:
    """The traceparent an action request carries: the span of that call (named by the request's seq)."""
    trace_id, _ = trace_of(execution_id, event)
    return format_traceparent(trace_id, span_id(execution_id, "call", request_seq))
