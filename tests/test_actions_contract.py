"""The action contract: requests and results round-trip, every bad field is named, invoke maps failures."""

import asyncio
import time

import orjson
import pytest

from actions.contract import (
    Action,
    ActionContext,
    ActionError,
    ActionRegistry,
    decode_request,
    decode_result,
    encode,
    idempotency_key,
    invoke,
    request,
    result_error,
    result_msg_id,
    result_ok,
)
from actions.plugins import default_registry
from actions.sdk import FunctionAction, action
from hotpath.envelope import BadMessage

MAX = 64 * 1024


def a_request(**changes) -> dict:
    doc = request(
        execution_id="e-1",
        step_id="send",
        attempt=2,
        idempotency_key=idempotency_key("e-1", "send", 0),
        action="sms.send",
        major=1,
        input={"to": "+15550100"},
        deadline=int(time.time() * 1000) + 60_000,
        tenant="acme",
    )
    doc.update(changes)
    return doc


def ctx_for(doc: dict) -> ActionContext:
    return ActionContext.from_request(doc)


# -- round trips -------------------------------------------------------------------


def test_request_round_trips():
    doc = a_request()
    assert decode_request(encode(doc), MAX) == doc
    assert doc["v"] == 1 and doc["idempotency_key"] == "e-1:send:0"


def test_idempotency_key_is_stable_across_attempts_and_differs_per_iteration():
    assert idempotency_key("e", "s", 0) == idempotency_key("e", "s", 0)
    assert idempotency_key("e", "s", 0) != idempotency_key("e", "s", 1)


def test_results_round_trip_and_carry_their_kind():
    req = a_request()
    ok = result_ok(req, {"id": "m-1"})
    assert ok == {
        "v": 1,
        "kind": "action_result",
        "execution_id": "e-1",
        "step_id": "send",
        "attempt": 2,
        "ok": True,
        "output": {"id": "m-1"},
    }
    assert decode_result(encode(ok), MAX) == ok
    err = result_error(req, ActionError("http_503", True, "busy"))
    assert err["error"] == {"code": "http_503", "retryable": True, "message": "busy"} and err["ok"] is False
    assert decode_result(encode(err), MAX) == err
    assert result_msg_id(err) == "result:e-1:send:2"
    bare = {k: v for k, v in ok.items() if k != "kind"}  # kind is optional on decode
    assert decode_result(encode(bare), MAX) == bare


def test_version_as_major_minor_string_is_accepted():
    assert decode_request(encode(a_request(v="1.3")), MAX)["v"] == "1.3"


# -- every field error is named ------------------------------------------------------


def _without(doc: dict, name: str) -> dict:
    return {k: v for k, v in doc.items() if k != name}


REQUEST_CASES = [
    (b"x" * (MAX + 1), "oversized", "limit"),
    (b"\xff\xfe{}", "invalid_utf8", "UTF-8"),
    (b"{not json", "malformed_json", "JSON"),
    (b"[1, 2]", "not_an_object", "list"),
    (encode(_without(a_request(), "v")), "missing_field", "'v'"),
    (encode(a_request(v=2)), "unsupported_version", "2"),
    (encode(a_request(v="2.0")), "unsupported_version", "2.0"),
    (encode(a_request(v=None)), "wrong_type", "'v'"),
    (encode(a_request(v=True)), "wrong_type", "'v'"),
    (encode(_without(a_request(), "execution_id")), "missing_field", "'execution_id'"),
    (encode(a_request(execution_id=7)), "wrong_type", "'execution_id'"),
    (encode(a_request(execution_id="")), "wrong_type", "'execution_id'"),
    (encode(_without(a_request(), "step_id")), "missing_field", "'step_id'"),
    (encode(a_request(step_id=["x"])), "wrong_type", "'step_id'"),
    (encode(_without(a_request(), "attempt")), "missing_field", "'attempt'"),
    (encode(a_request(attempt="1")), "wrong_type", "'attempt'"),
    (encode(a_request(attempt=0)), "wrong_type", "'attempt'"),
    (encode(a_request(attempt=True)), "wrong_type", "'attempt'"),
    (encode(_without(a_request(), "idempotency_key")), "missing_field", "'idempotency_key'"),
    (encode(a_request(idempotency_key="")), "wrong_type", "'idempotency_key'"),
    (encode(_without(a_request(), "action")), "missing_field", "'action'"),
    (encode(a_request(action="sms.*")), "wrong_type", "'action'"),
    (encode(a_request(action="a b")), "wrong_type", "'action'"),
    (encode(_without(a_request(), "major")), "missing_field", "'major'"),
    (encode(a_request(major="1")), "wrong_type", "'major'"),
    (encode(a_request(major=0)), "wrong_type", "'major'"),
    (encode(_without(a_request(), "input")), "missing_field", "'input'"),
    (encode(a_request(input=[1])), "wrong_type", "'input'"),
    (encode(_without(a_request(), "deadline")), "missing_field", "'deadline'"),
    (encode(a_request(deadline="soon")), "wrong_type", "'deadline'"),
    (encode(a_request(deadline=-1)), "wrong_type", "'deadline'"),
    (encode(a_request(tenant=3)), "wrong_type", "'tenant'"),
]


@pytest.mark.parametrize("body,reason,named", REQUEST_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(REQUEST_CASES)])
def test_bad_requests_are_rejected_with_the_field_named(body, reason, named):
    with pytest.raises(BadMessage) as info:
        decode_request(body, MAX)
    assert info.value.reason == reason
    assert named in str(info.value)


def _result(**changes) -> dict:
    doc = result_error(a_request(), ActionError("http_400", False, "nope"))
    doc.update(changes)
    return doc


RESULT_CASES = [
    (encode(_result(v=9)), "unsupported_version", "9"),
    (encode(_result(kind="signal")), "unknown_kind", "'kind'"),
    (encode(_without(_result(), "execution_id")), "missing_field", "'execution_id'"),
    (encode(_without(_result(), "step_id")), "missing_field", "'step_id'"),
    (encode(_result(attempt=1.5)), "wrong_type", "'attempt'"),
    (encode(_without(_result(), "ok")), "missing_field", "'ok'"),
    (encode(_result(ok="yes")), "wrong_type", "'ok'"),
    (encode(_without(_result(), "error")), "missing_field", "'error'"),
    (encode(_result(error="boom")), "wrong_type", "'error'"),
    (encode(_result(error={"retryable": True})), "missing_field", "'error.code'"),
    (encode(_result(error={"code": "x"})), "missing_field", "'error.retryable'"),
    (encode(_result(error={"code": "x", "retryable": "no"})), "wrong_type", "'error.retryable'"),
    (encode(_result(error={"code": "x", "retryable": False, "message": 5})), "wrong_type", "'error.message'"),
    (encode(_result(ok=True)), "missing_field", "'output'"),
    (encode(_result(ok=True, output=[])), "wrong_type", "'output'"),
]


@pytest.mark.parametrize("body,reason,named", RESULT_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(RESULT_CASES)])
def test_bad_results_are_rejected_with_the_field_named(body, reason, named):
    with pytest.raises(BadMessage) as info:
        decode_result(body, MAX)
    assert info.value.reason == reason
    assert named in str(info.value)


# -- the protocol, the registry and invoke -------------------------------------------


class Echo:
    name = "echo"
    major = 1

    def validate(self, input):
        if "say" not in input:
            raise ActionError("invalid_input", False, "'say' is required")

    async def run(self, ctx, input):
        if input["say"] == "crash":
            raise RuntimeError("kaput")
        if input["say"] == "sleep":
            await asyncio.sleep(10)
        if input["say"] == "list":
            return [1]
        if input["say"] == "fail":
            raise ActionError("provider_down", True, "try later")
        return {"said": input["say"], "key": ctx.idempotency_key, "tenant": ctx.tenant}


def test_builtins_and_classes_satisfy_the_protocol():
    registry = default_registry()
    assert {(a.name, a.major) for a in registry} == {("noop", 1), ("log", 1), ("webhook", 1)}
    for item in registry:
        assert isinstance(item, Action)
    assert isinstance(Echo(), Action)
    assert registry.get("sms.send", 1) is None  # external: requested on the actions stream
    assert registry.get("webhook", 2) is None


def test_registry_refuses_a_duplicate():
    registry = ActionRegistry([Echo()])
    assert ("echo", 1) in registry and len(registry) == 1
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Echo())


async def test_invoke_ok_passes_the_context():
    doc = a_request(input={"say": "hi"})
    result = await invoke(Echo(), ctx_for(doc), doc["input"])
    assert result["ok"] is True
    assert result["output"] == {"said": "hi", "key": "e-1:send:0", "tenant": "acme"}
    assert (result["execution_id"], result["step_id"], result["attempt"]) == ("e-1", "send", 2)


@pytest.mark.parametrize(
    "say,code,retryable",
    [
        (None, "invalid_input", False),
        ("crash", "action_crashed", True),
        ("fail", "provider_down", True),
        ("list", "invalid_output", False),
    ],
)
async def test_invoke_maps_failures(say, code, retryable):
    doc = a_request(input={} if say is None else {"say": say})
    result = await invoke(Echo(), ctx_for(doc), doc["input"])
    assert result["ok"] is False
    assert (result["error"]["code"], result["error"]["retryable"]) == (code, retryable)
    if code == "action_crashed":
        assert "kaput" in result["error"]["message"]


async def test_invoke_times_out_at_the_deadline():
    doc = a_request(input={"say": "sleep"}, deadline=int(time.time() * 1000) + 200)
    started = time.monotonic()
    result = await invoke(Echo(), ctx_for(doc), doc["input"])
    assert time.monotonic() - started < 2
    assert result["error"]["code"] == "timeout" and result["error"]["retryable"] is True


async def test_invoke_past_the_deadline_does_not_run():
    ran = []

    @action("probe", major=1)
    async def probe(ctx, input):
        ran.append(1)
        return {}

    doc = a_request(deadline=int(time.time() * 1000) - 5)
    result = await invoke(probe, ctx_for(doc), {})
    assert result["error"]["code"] == "deadline_exceeded" and result["error"]["retryable"] is True
    assert ran == []


async def test_a_zero_deadline_is_no_deadline():
    doc = a_request(input={"say": "hi"}, deadline=0)
    assert decode_request(encode(doc), MAX)["deadline"] == 0
    assert (await invoke(Echo(), ctx_for(doc), doc["input"]))["ok"] is True


async def test_invoke_lets_the_caller_cancel():
    running = asyncio.Event()

    @action("hang", major=1)
    async def hang(ctx, input):
        running.set()
        await asyncio.sleep(10)
        return {}

    doc = a_request(input={})
    task = asyncio.ensure_future(invoke(hang, ctx_for(doc), doc["input"]))
    await asyncio.wait_for(running.wait(), 5)  # cancelled while the action runs, not before it starts
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_decorator_makes_an_action_with_a_validator():
    @action("sms.send", major=2)
    async def send(ctx, input):
        return {"to": input["to"]}

    @send.validator
    def _check(input):
        if "to" not in input:
            raise ActionError("invalid_input", False, "'to' is required")

    assert isinstance(send, FunctionAction) and isinstance(send, Action)
    assert (send.name, send.major) == ("sms.send", 2)
    doc = a_request()
    assert (await invoke(send, ctx_for(doc), {"to": "x"}))["output"] == {"to": "x"}
    assert (await invoke(send, ctx_for(doc), {}))["error"]["code"] == "invalid_input"
    with pytest.raises(TypeError):
        action("sync", major=1)(lambda ctx, input: {})


async def test_noop_and_log(caplog):
    registry = default_registry()
    doc = a_request()
    assert (await invoke(registry.get("noop", 1), ctx_for(doc), {}))["output"] == {}
    with caplog.at_level("INFO", logger="ordo.actions.log"):
        result = await invoke(registry.get("log", 1), ctx_for(doc), {"message": "hello there", "n": 3})
    assert result["output"] == {}
    assert any(r.getMessage() == "hello there" and r.data == {"n": 3} for r in caplog.records)
    bad = await invoke(registry.get("log", 1), ctx_for(doc), {"level": "loud"})
    assert bad["error"]["code"] == "invalid_input"


def test_results_are_json():
    doc = result_ok(a_request(), {"n": 1})
    assert orjson.loads(encode(doc)) == doc


def test_results_of_requests_after_an_operator_retry_have_their_own_msg_id():
    """Attempts restart at 1 after an operator retry; request_seq keeps the two results apart."""
    from actions.contract import ActionContext, request, result_msg_id, result_ok

    first = request(
        execution_id="e",
        step_id="s",
        attempt=1,
        idempotency_key="e:s:1",
        action="noop",
        major=1,
        input={},
        deadline=0,
        request_seq=2,
    )
    again = dict(first, request_seq=7)
    assert result_msg_id(result_ok(first, {})) != result_msg_id(result_ok(again, {}))
    assert ActionContext.from_request(again).request_seq == 7
    legacy = request(
        execution_id="e", step_id="s", attempt=1, idempotency_key="e:s:1", action="noop", major=1, input={}, deadline=0
    )
    assert result_msg_id(result_ok(legacy, {})) == "result:e:s:1"
