"""The action contract (DESIGN.md, "Contracts", guarantee 3).

The engine hands an action a *request* and gets back a *result*, whether the
action runs in-process (`invoke`) or in an external action worker that takes
requests from `<prefix>.actions.<action>.v<major>` and publishes results onto
the execution's subject. Both shapes are versioned: every message carries `v`
and a major version this code does not speak is rejected with BadMessage
reason "unsupported_version".

    request  {v, execution_id, step_id, attempt, idempotency_key, action, major,
              input, deadline, tenant?}      deadline: epoch milliseconds, 0: none
    result   {v, kind: "action_result", execution_id, step_id, attempt, ok,
              output | error{code, retryable, message}}

The idempotency key is the same on every attempt of a step (execution id + step
id + loop iteration, `idempotency_key()`), so a downstream can dedupe what
at-least-once delivery repeats. The attempt number is not part of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import typing

import orjson

from hotpath.envelope import BadMessage, load_versioned, require_field, require_text

#: The contract major version this code speaks.
CONTRACT_MAJOR = 1

#: The `kind` of a result message on an execution's subject.
RESULT_KIND = "action_result"

_ACTION_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

log = logging.getLogger("ordo.actions")


# -- errors, context, protocol -------------------------------------------------


class ActionError(Exception):
    """A typed action failure: `code` labels metrics and retry policies, `retryable` decides a retry.

    The engine's retry policy may still refuse a retry (max attempts, a code in
    the step's non-retryable list); `retryable=False` always ends the step.
    """

    def __init__(self, code: str, retryable: bool, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.retryable = retryable
        self.message = message

    def as_dict(self) -> dict:
        return {"code": self.code, "retryable": self.retryable, "message": self.message}


class ActionContext:
    """What an action knows about the call besides its input."""

    __slots__ = (
        "execution_id",
        "step_id",
        "attempt",
        "idempotency_key",
        "deadline_ms",
        "tenant",
        "log",
        "request_seq",
        "traceparent",
    )

    def __init__(
        self,
        execution_id: str,
        step_id: str,
        attempt: int,
        idempotency_key: str,
        deadline_ms: int,
        tenant: str = "",
        log: logging.Logger | logging.LoggerAdapter | None = None,
        request_seq: int = 0,
    ):
        #: Which request this is when attempts restart after an operator retry (echoed in the result).
        self.request_seq = request_seq
        #: The W3C traceparent of this call when its execution is traced (else ""): an action that
        #: calls out passes it on (the webhook sends it as a header) so its provider's spans join the trace.
        self.traceparent = ""
        self.execution_id = execution_id
        self.step_id = step_id
        self.attempt = attempt
        self.idempotency_key = idempotency_key
        self.deadline_ms = deadline_ms
        self.tenant = tenant
        #: Lines an action logs carry the call's execution, tenant, step and attempt (an adapter passed in
        #: brings its own fields).
        self.log = (
            log
            if isinstance(log, logging.LoggerAdapter)
            else logging.LoggerAdapter(
                log if log is not None else logging.getLogger("ordo.actions.run"),
                {
                    "execution_id": execution_id,
                    "step": step_id,
                    "attempt": attempt,
                    **({"tenant": tenant} if tenant else {}),
                },
            )
        )

    @classmethod
    def from_request(cls, request: dict, log=None) -> ActionContext:
        return cls(
            request["execution_id"],
            request["step_id"],
            request["attempt"],
            request["idempotency_key"],
            request["deadline"],
            request.get("tenant") or "",
            log,
            request.get("request_seq") or 0,
        )

    def remaining_s(self) -> float:
        """Seconds left before the deadline (negative when past it; infinite when there is none)."""
        if self.deadline_ms <= 0:
            return math.inf
        return self.deadline_ms / 1000.0 - time.time()


@typing.runtime_checkable
class Action(typing.Protocol):
    """An action: a name and major version, input validation, and `run`.

    `validate` raises ActionError(code="invalid_input", retryable=False).
    `run` returns a JSON object (the step's output) or raises ActionError; any
    other exception is reported as "action_crashed" and retried.
    """

    name: str
    major: int

    def validate(self, input: dict) -> None: ...

    async def run(self, ctx: ActionContext, input: dict) -> dict: ...


# -- building messages ----------------------------------------------------------


def idempotency_key(execution_id: str, step_id: str, iteration: int = 0) -> str:
    """The key a step's side effect carries on every attempt (guarantee 3).

    `iteration` counts the visits of a step inside a loop (goto), so that each
    pass of a loop is its own side effect while retries of one pass are not.
    """
    return f"{execution_id}:{step_id}:{iteration}"


def request(
    *,
    execution_id: str,
    step_id: str,
    attempt: int,
    idempotency_key: str,
    action: str,
    major: int,
    input: dict,
    deadline: int,
    tenant: str = "",
    request_seq: int = 0,
) -> dict:
    doc = {
        "v": CONTRACT_MAJOR,
        "execution_id": execution_id,
        "step_id": step_id,
        "attempt": attempt,
        "idempotency_key": idempotency_key,
        "action": action,
        "major": major,
        "input": input,
        "deadline": int(deadline),
    }
    if tenant:
        doc["tenant"] = tenant
    if request_seq:
        # The execution's seq when it asked: attempts restart at 1 after an
        # operator retry, this keeps each request (and its result) distinct.
        doc["request_seq"] = int(request_seq)
    return doc


def _result_head(request: dict) -> dict:
    return {
        "v": CONTRACT_MAJOR,
        "kind": RESULT_KIND,
        "execution_id": request["execution_id"],
        "step_id": request["step_id"],
        "attempt": request["attempt"],
        **({"request_seq": request["request_seq"]} if request.get("request_seq") else {}),
    }


def result_ok(request: dict, output: dict) -> dict:
    doc = _result_head(request)
    doc["ok"] = True
    doc["output"] = output
    return doc


def result_error(request: dict, error: ActionError) -> dict:
    doc = _result_head(request)
    doc["ok"] = False
    doc["error"] = error.as_dict()
    return doc


def result_msg_id(result: dict) -> str:
    """Nats-Msg-Id of a result: one result per attempt, whatever redelivery repeats."""
    msg_id = f"result:{result['execution_id']}:{result['step_id']}:{result['attempt']}"
    return f"{msg_id}:{result['request_seq']}" if result.get("request_seq") else msg_id


def encode(doc: dict) -> bytes:
    return orjson.dumps(doc)


# -- decoding -----------------------------------------------------------------


def _load(body: bytes, max_bytes: int) -> dict:
    return load_versioned(body, max_bytes, major=CONTRACT_MAJOR, contract="action contract")


def _count(doc: dict, name: str, minimum: int) -> int:
    value = require_field(doc, name, (int,), "an integer")
    if value < minimum:
        raise BadMessage("wrong_type", f"field '{name}' must be at least {minimum}, got {value}")
    return value


def _head(doc: dict) -> None:
    require_text(doc, "execution_id", 128)
    require_text(doc, "step_id", 256)
    _count(doc, "attempt", 1)


def decode_request(body: bytes, max_bytes: int) -> dict:
    """An action request, checked field by field; raises BadMessage naming the field."""
    doc = _load(body, max_bytes)
    _head(doc)
    require_text(doc, "idempotency_key", 512)
    name = require_text(doc, "action", 128)
    if not _ACTION_NAME.match(name):
        raise BadMessage(
            "wrong_type", f"field 'action' must be dot-separated tokens of letters, digits, '_' or '-', got {name!r}"
        )
    _count(doc, "major", 1)
    require_field(doc, "input", (dict,), "an object")
    deadline = require_field(doc, "deadline", (int, float), "a number (epoch milliseconds)")
    if deadline < 0:
        raise BadMessage("wrong_type", f"field 'deadline' must be epoch milliseconds (0: none), got {deadline}")
    doc["deadline"] = int(deadline)
    if "tenant" in doc and type(doc["tenant"]) is not str:
        raise BadMessage("wrong_type", f"field 'tenant' must be a string, got {type(doc['tenant']).__name__}")
    return doc


def decode_result(body: bytes, max_bytes: int) -> dict:
    """An action result (with or without its `kind`); raises BadMessage naming the field."""
    doc = _load(body, max_bytes)
    if "kind" in doc and doc["kind"] != RESULT_KIND:
        raise BadMessage("unknown_kind", f"field 'kind' must be {RESULT_KIND!r}, got {doc['kind']!r}")
    _head(doc)
    ok = require_field(doc, "ok", (bool,), "a boolean")
    if ok:
        require_field(doc, "output", (dict,), "an object")
    else:
        error = require_field(doc, "error", (dict,), "an object")
        require_text(error, "code", 128, "error.")
        require_field(error, "retryable", (bool,), "a boolean", "error.")
        if "message" in error and type(error["message"]) is not str:
            raise BadMessage(
                "wrong_type", f"field 'error.message' must be a string, got {type(error['message']).__name__}"
            )
    return doc


# -- in-process actions -------------------------------------------------------


class ActionRegistry:
    """The actions that run in this process, by (name, major).

    The engine asks `get(name, major)`; None means the action is external and
    its request goes to `Topology.action_subject(name, major)`. Which actions
    fill it is actions/plugins.py's business (the `ordo.actions` entry points).
    """

    __slots__ = ("_actions",)

    def __init__(self, actions: typing.Iterable[Action] = ()):
        self._actions: dict[tuple[str, int], Action] = {}
        for item in actions:
            self.register(item)

    def register(self, action: Action) -> None:
        key = (action.name, action.major)
        if key in self._actions:
            raise ValueError(f"action {action.name}@{action.major} is already registered")
        self._actions[key] = action

    def get(self, name: str, major: int) -> Action | None:
        return self._actions.get((name, major))

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._actions

    def __iter__(self):
        return iter(self._actions.values())

    def __len__(self) -> int:
        return len(self._actions)

    async def aclose(self) -> None:
        """Release what actions hold (the webhook's HTTP connection pool)."""
        for item in self._actions.values():
            close = getattr(item, "aclose", None)
            if close is not None:
                await close()


async def invoke(action: Action, ctx: ActionContext, input: dict) -> dict:
    """Validate and run `action` before `ctx.deadline_ms`; always returns a result dict, never raises.

    (Cancellation of the caller still propagates.) A deadline already past
    gives "deadline_exceeded" without running; running into it, "timeout";
    both are retryable: the engine's policy decides. A deadline of 0 is none.
    """
    ids = {
        "execution_id": ctx.execution_id,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "request_seq": ctx.request_seq,
    }
    remaining = ctx.remaining_s()
    if remaining <= 0:
        return result_error(
            ids,
            ActionError("deadline_exceeded", True, f"the deadline passed {-remaining:.3f}s before the action started"),
        )
    when = None if remaining == math.inf else asyncio.get_running_loop().time() + remaining
    try:
        async with asyncio.timeout_at(when):
            action.validate(input)
            output = await action.run(ctx, input)
    except ActionError as exc:
        return result_error(ids, exc)
    except TimeoutError:
        return result_error(
            ids, ActionError("timeout", True, f"the action did not finish before its deadline ({remaining:.3f}s)")
        )
    except Exception as exc:
        ctx.log.warning("action %s@%s crashed", action.name, action.major, exc_info=True)
        return result_error(ids, ActionError("action_crashed", True, repr(exc)[:1024]))
    if type(output) is not dict:
        return result_error(
            ids,
            ActionError(
                "invalid_output", False, f"the action returned a {type(output).__name__}, an object is required"
            ),
        )
    try:
        orjson.dumps(output)
    except TypeError as exc:
        return result_error(ids, ActionError("invalid_output", False, f"the output is not JSON: {exc}"))
    return result_ok(ids, output)
