"""The `webhook` action (major 1): one real HTTP request, its status mapped to retryable or not.

Input: {url, method="POST", headers?, body? (JSON), timeout_ms=10000,
retry_on=[408, 425, 429, 500, 502, 503, 504]}. Output on 2xx:
{status, body (JSON when the response says so, else text; at most 64 KiB),
headers (a few), truncated}. Every request carries `Idempotency-Key`,
`X-Ordo-Execution` and `X-Ordo-Attempt`; the key is the same on every attempt
of the step, so the receiver can dedupe our retries and redeliveries. The call
of a traced execution also carries its W3C `traceparent` (the action call's
span), so the receiver's spans join the execution's trace.

Connections go through the egress guard (egress.py): private, loopback,
link-local and other internal addresses are refused unless allow-listed, on
the resolved addresses, at connect time. Redirects are followed by hand, at
most `max_redirects` (3), and each target passes the same guard (its scheme
here, its addresses at connect time). Cookies are never kept between requests:
one session serves every tenant.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import typing

import aiohttp
import orjson
from yarl import URL

from ..contract import ActionContext, ActionError
from .egress import EgressPolicy, EgressRefused, GuardedResolver

DEFAULT_RETRY_ON = (408, 425, 429, 500, 502, 503, 504)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
BODY_LIMIT = 64 * 1024
MAX_TIMEOUT_MS = 300_000
#: Response headers worth keeping in the output (for templates and diagnostics).
KEPT_HEADERS = (
    "content-type",
    "content-length",
    "location",
    "etag",
    "last-modified",
    "retry-after",
    "x-request-id",
    "request-id",
)
#: Headers the author may not set: the transport owns them.
OWNED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",  # codespell:ignore te
        "idempotency-key",
        "x-ordo-execution",
        "x-ordo-attempt",
    }
)
#: Headers not carried to another origin on a redirect.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _invalid(message: str) -> ActionError:
    return ActionError("invalid_input", False, message)


def _refused(exc: EgressRefused | str) -> ActionError:
    return ActionError("ssrf_refused", False, str(exc))


class WebhookAction:
    """One HTTP request per call; `allow` lists the internal networks it may reach anyway."""

    name = "webhook"
    major = 1

    def __init__(
        self,
        allow: typing.Iterable = (),
        *,
        max_redirects: int = 3,
        connections: int = 256,
        user_agent: str = "ordo-webhook/1",
    ):
        self.policy = EgressPolicy(allow)
        self.max_redirects = max_redirects
        self.connections = connections
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._session_loop = None

    # -- validation ---------------------------------------------------------------

    def validate(self, input: dict) -> None:
        url = input.get("url")
        if type(url) is not str or not url:
            raise _invalid("'url' must be a non-empty string")
        self._check_url(url, "url")
        method = input.get("method", "POST")
        if type(method) is not str or method.upper() not in METHODS:
            raise _invalid(f"'method' must be one of {sorted(METHODS)}, got {method!r}")
        headers = input.get("headers", {})
        if type(headers) is not dict:
            raise _invalid("'headers' must be an object of strings")
        for key, value in headers.items():
            if not _TOKEN.match(key):
                raise _invalid(f"header name {key!r} is not a valid HTTP token")
            if key.lower() in OWNED_HEADERS:
                raise _invalid(f"header {key!r} is set by the webhook action, not by the input")
            if type(value) not in (str, int, float) or any(c in str(value) for c in "\r\n\0"):
                raise _invalid(f"header {key!r} must be a single-line string")
        timeout_ms = input.get("timeout_ms", 10_000)
        if type(timeout_ms) not in (int, float) or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise _invalid(f"'timeout_ms' must be a number in (0, {MAX_TIMEOUT_MS}], got {timeout_ms!r}")
        retry_on = input.get("retry_on", DEFAULT_RETRY_ON)
        if type(retry_on) not in (list, tuple) or any(type(s) is not int or not 100 <= s <= 599 for s in retry_on):
            raise _invalid("'retry_on' must be a list of HTTP status codes")
        if "body" in input:
            try:
                orjson.dumps(input["body"])
            except TypeError as exc:
                raise _invalid(f"'body' is not JSON: {exc}") from None

    def _check_url(self, raw: str | URL, what: str) -> URL:
        """Scheme and shape, and the address when the host is an IP literal (names are checked at connect)."""
        try:
            url = raw if isinstance(raw, URL) else URL(raw)
        except (ValueError, TypeError) as exc:
            raise _invalid(f"{what} {raw!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https"):
            raise _refused(f"{what} {str(url)!r}: scheme {url.scheme!r} is refused, only http and https are allowed")
        host = url.raw_host
        if not host:
            raise _invalid(f"{what} {str(url)!r} has no host")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if host.replace(".", "").isdigit():  # 2130706433, 127.1: legacy IPv4 spellings
                raise _refused(f"{what} host {host!r} is a non-canonical IPv4 address") from None
            return url
        reason = self.policy.refusal(address)
        if reason is not None:
            raise _refused(f"{what} {str(url)!r}: {EgressRefused(str(address), reason)}")
        return url

    def _redirect_target(self, url: URL, location: str, hop: int) -> URL:
        try:
            target = url.join(URL(location))
        except (ValueError, TypeError) as exc:
            raise ActionError(
                "bad_redirect", False, f"redirect #{hop} from {str(url)!r} to {location!r}: {exc}"
            ) from None
        return self._check_url(target, f"redirect #{hop} from {str(url)!r} to")

    # -- running ------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy),
                socket_factory=self.policy.socket_factory,
                limit=self.connections,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # no proxy from the environment: the guard must see the real target
                headers={"User-Agent": self.user_agent},
            )
            self._session_loop = loop
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def run(self, ctx: ActionContext, input: dict) -> dict:
        url = self._check_url(input["url"], "url")
        method = input.get("method", "POST").upper()
        retry_on = frozenset(input.get("retry_on", DEFAULT_RETRY_ON))
        headers = {k: str(v) for k, v in input.get("headers", {}).items()}
        headers["Idempotency-Key"] = ctx.idempotency_key
        headers["X-Ordo-Execution"] = ctx.execution_id
        headers["X-Ordo-Attempt"] = str(ctx.attempt)
        if ctx.traceparent:  # a traced execution: the receiver's spans join its trace
            headers = {k: v for k, v in headers.items() if k.lower() != "traceparent"}
            headers["traceparent"] = ctx.traceparent
        data = None
        if "body" in input:
            data = orjson.dumps(input["body"])
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        timeout_s = input.get("timeout_ms", 10_000) / 1000.0
        session = self._client()
        try:
            async with asyncio.timeout(timeout_s):
                for hop in range(self.max_redirects + 1):
                    async with session.request(method, url, headers=headers, data=data, allow_redirects=False) as resp:
                        location = resp.headers.get("Location") if resp.status in (301, 302, 303, 307, 308) else None
                        if location is None:
                            return await self._outcome(resp, retry_on)
                    target = self._redirect_target(url, location, hop + 1)
                    if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                        method, data = ("HEAD" if method == "HEAD" else "GET"), None
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                    if target.origin() != url.origin():
                        headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                    url = target
                raise ActionError(
                    "too_many_redirects", False, f"more than {self.max_redirects} redirects, the last to {str(url)!r}"
                )
        except TimeoutError:
            raise ActionError("timeout", True, f"no response from {str(url)!r} within {timeout_s:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ActionError("tls_error", False, f"{str(url)!r}: {exc}") from None
        except aiohttp.InvalidURL as exc:
            raise _invalid(f"{str(url)!r} is not a valid URL: {exc}") from None
        except aiohttp.ClientError as exc:
            refused = _egress_refusal(exc)
            if refused is not None:
                raise ActionError("ssrf_refused", False, f"{str(url)!r}: {refused}") from None
            raise ActionError("connect_error", True, f"{str(url)!r}: {exc}") from None

    async def _outcome(self, resp: aiohttp.ClientResponse, retry_on: frozenset) -> dict:
        raw, truncated = await _read_capped(resp.content, BODY_LIMIT)
        if 200 <= resp.status < 300:
            kept = {name: resp.headers[name] for name in KEPT_HEADERS if name in resp.headers}
            return {"status": resp.status, "body": _body(resp, raw, truncated), "headers": kept, "truncated": truncated}
        snippet = raw[:512].decode("utf-8", "replace")
        retry_after = resp.headers.get("Retry-After")
        message = f"{resp.method} {str(resp.url)!r} answered {resp.status} {resp.reason or ''}".rstrip()
        if retry_after:
            message += f" (Retry-After: {retry_after})"
        if snippet:
            message += f": {snippet}"
        raise ActionError(f"http_{resp.status}", resp.status in retry_on, message)


def from_settings(settings) -> WebhookAction:
    """The webhook as a plug-in (its `ordo.actions` entry point): it may reach the `webhook_allow` networks.

    `settings` is the process's actions.settings.Settings (or the engine's
    Config); `webhook_allow` is comma-separated CIDRs.
    """
    return WebhookAction(allow=[c.strip() for c in settings.webhook_allow.split(",") if c.strip()])


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while size <= limit:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    raw = b"".join(chunks)
    return raw[:limit], len(raw) > limit


def _body(resp: aiohttp.ClientResponse, raw: bytes, truncated: bool):
    if not truncated and "json" in resp.content_type:
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            pass
    try:
        return raw.decode(resp.charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", "replace")


def _egress_refusal(exc: BaseException) -> str | None:
    """The egress refusal behind an aiohttp connect error, if that is what it was."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EgressRefused):
            return str(exc)
        if "refused by the egress policy" in str(exc):  # aiohappyeyeballs' "Multiple exceptions"
            return str(exc)
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
    return None
