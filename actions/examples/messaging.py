"""Example external actions: `sms.send` and `email.send` (major 1) over an HTTP provider.

    ORDO_PROVIDER_URL=https://provider.example/v1 python -m actions.worker --example messaging

Each call is `POST {ORDO_PROVIDER_URL}/sms` with {to, body} (or `/email` with
{to, subject, body, from?}) and the step's `Idempotency-Key`, so that a
provider that dedupes on it sends one message however often the request is
redelivered. ORDO_PROVIDER_TOKEN, when set, goes as a bearer token. Provider
answers: 2xx -> {status, provider: <its JSON>}; 408, 429 and 5xx -> retryable;
any other 4xx -> not retryable; no answer -> retryable.

The provider URL is the operator's configuration, not a workflow author's
input, so it does not pass the webhook's SSRF guard.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import orjson

from ..contract import ActionContext, ActionError
from ..sdk import action

RETRYABLE = frozenset({408, 425, 429})
TIMEOUT_S = 10.0

_sessions: dict = {}


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    return session


async def call_provider(ctx: ActionContext, path: str, payload: dict) -> dict:
    base = os.environ.get("ORDO_PROVIDER_URL", "").rstrip("/")
    if not base:
        raise ActionError("not_configured", True, "ORDO_PROVIDER_URL is not set on this action worker")
    headers = {
        "Idempotency-Key": ctx.idempotency_key,
        "X-Ordo-Execution": ctx.execution_id,
        "X-Ordo-Attempt": str(ctx.attempt),
        "Content-Type": "application/json",
    }
    token = os.environ.get("ORDO_PROVIDER_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base}/{path}"
    try:
        async with asyncio.timeout(min(TIMEOUT_S, max(ctx.remaining_s(), 0.001))):
            async with _session().post(url, data=orjson.dumps(payload), headers=headers) as resp:
                raw = await resp.content.read(64 * 1024)
                status = resp.status
    except TimeoutError:
        raise ActionError("timeout", True, f"the provider did not answer {url} in time") from None
    except aiohttp.ClientError as exc:
        raise ActionError("connect_error", True, f"{url}: {exc}") from None
    if 200 <= status < 300:
        try:
            answer = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            answer = raw.decode("utf-8", "replace")
        return {"status": status, "provider": answer}
    text = raw[:512].decode("utf-8", "replace")
    raise ActionError(
        f"http_{status}", status >= 500 or status in RETRYABLE, f"the provider answered {status} to POST {url}: {text}"
    )


def _require_text(input: dict, name: str, limit: int) -> None:
    value = input.get(name)
    if type(value) is not str or not value or len(value) > limit:
        raise ActionError("invalid_input", False, f"'{name}' must be a non-empty string of at most {limit} characters")


@action("sms.send", major=1)
async def send_sms(ctx: ActionContext, input: dict) -> dict:
    """Send one SMS: {to, body}."""
    return await call_provider(ctx, "sms", {"to": input["to"], "body": input["body"]})


@send_sms.validator
def _check_sms(input: dict) -> None:
    _require_text(input, "to", 32)
    _require_text(input, "body", 1600)


@action("email.send", major=1)
async def send_email(ctx: ActionContext, input: dict) -> dict:
    """Send one e-mail: {to, subject, body, from?}."""
    payload = {"to": input["to"], "subject": input["subject"], "body": input["body"]}
    if "from" in input:
        payload["from"] = input["from"]
    return await call_provider(ctx, "email", payload)


@send_email.validator
def _check_email(input: dict) -> None:
    _require_text(input, "to", 320)
    _require_text(input, "subject", 998)
    _require_text(input, "body", 1_000_000)
    if "from" in input:
        _require_text(input, "from", 320)


ACTIONS = [send_sms, send_email]
