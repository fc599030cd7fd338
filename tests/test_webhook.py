"""The webhook action against a real local HTTP server, and its SSRF guard (issue 4).

The server listens on 127.0.0.1, which the guard refuses: every test that
reaches it passes an allow-list, and the refusal tests pass none.
"""

import asyncio
import ipaddress
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from actions.builtin.egress import EgressPolicy, EgressRefused, GuardedResolver
from actions.builtin.webhook import WebhookAction
from actions.contract import ActionContext, invoke

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


class Target:
    """A local webhook receiver that records what it got."""

    def __init__(self):
        self.seen: list[dict] = []
        self.url = ""

    async def record(self, request: web.Request) -> None:
        self.seen.append(
            {
                "path": request.path,
                "method": request.method,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        path = request.path
        if path == "/ok":
            return web.json_response(
                {"got": self.seen[-1]["body"].decode(), "n": len(self.seen)},
                headers={"X-Request-Id": "r-1", "X-Secret": "not kept"},
            )
        if path == "/text":
            return web.Response(text="plain words")
        if path == "/big":
            return web.Response(text="x" * (100 * 1024))
        if path == "/busy":
            return web.Response(status=503, text="try later", headers={"Retry-After": "7"})
        if path == "/bad":
            return web.Response(status=400, text="bad field 'to'")
        if path == "/teapot":
            return web.Response(status=418)
        if path == "/slow":
            await asyncio.sleep(2)
            return web.Response(text="late")
        if path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            target = "/ok" if left <= 1 else f"/hop/{left - 1}"
            raise web.HTTPFound(target)
        if path == "/see-other":
            raise web.HTTPSeeOther("/ok")
        if path == "/to":
            raise web.HTTPTemporaryRedirect(request.query["where"])
        return web.Response(status=404)


@pytest.fixture
async def target():
    t = Target()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", t.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    t.url = f"http://127.0.0.1:{port}"
    t.port = port
    yield t
    await runner.cleanup()


def context(attempt: int = 1, key: str = "exec-1:hook:0", deadline_s: float = 30) -> ActionContext:
    return ActionContext(
        execution_id="exec-1",
        step_id="hook",
        attempt=attempt,
        idempotency_key=key,
        deadline_ms=int((time.time() + deadline_s) * 1000),
        tenant="acme",
    )


async def call(action: WebhookAction, input: dict, **ctx) -> dict:
    try:
        return await invoke(action, context(**ctx), input)
    finally:
        await action.aclose()


# -- the request and its outcome ------------------------------------------------------


async def test_2xx_returns_status_json_body_and_a_few_headers(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/ok", "body": {"to": "+1555"}})
    assert result["ok"] is True, result
    out = result["output"]
    assert out["status"] == 200
    assert out["body"] == {"got": '{"to":"+1555"}', "n": 1}
    assert out["headers"]["x-request-id"] == "r-1" and "x-secret" not in out["headers"]
    assert out["truncated"] is False
    seen = target.seen[0]
    assert seen["method"] == "POST" and seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["Idempotency-Key"] == "exec-1:hook:0"
    assert seen["headers"]["X-Ordo-Execution"] == "exec-1" and seen["headers"]["X-Ordo-Attempt"] == "1"


async def test_text_and_capped_bodies(target):
    action = WebhookAction(allow=LOOPBACK)
    text = await call(action, {"url": f"{target.url}/text", "method": "GET"})
    assert text["output"]["body"] == "plain words"
    big = await call(action, {"url": f"{target.url}/big", "method": "GET"})
    assert big["output"]["truncated"] is True and len(big["output"]["body"]) == 64 * 1024


async def test_the_idempotency_key_is_the_same_on_every_attempt(target):
    action = WebhookAction(allow=LOOPBACK)
    for attempt in (1, 2, 3):
        await call(action, {"url": f"{target.url}/busy"}, attempt=attempt)
    keys = [s["headers"]["Idempotency-Key"] for s in target.seen]
    assert keys == ["exec-1:hook:0"] * 3
    assert [s["headers"]["X-Ordo-Attempt"] for s in target.seen] == ["1", "2", "3"]


@pytest.mark.parametrize(
    "path,code,retryable",
    [
        ("/busy", "http_503", True),
        ("/bad", "http_400", False),
        ("/teapot", "http_418", False),
        ("/nowhere", "http_404", False),
    ],
)
async def test_status_mapping(target, path, code, retryable):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}{path}"})
    assert result["ok"] is False
    assert (result["error"]["code"], result["error"]["retryable"]) == (code, retryable)
    if path == "/busy":
        assert "Retry-After: 7" in result["error"]["message"] and "try later" in result["error"]["message"]


async def test_retry_on_is_configurable(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/teapot", "retry_on": [418]})
    assert result["error"] == {"code": "http_418", "retryable": True, "message": result["error"]["message"]}
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/busy", "retry_on": []})
    assert result["error"]["retryable"] is False


async def test_timeout_and_connection_errors_are_retryable(target):
    slow = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/slow", "timeout_ms": 200})
    assert (slow["error"]["code"], slow["error"]["retryable"]) == ("timeout", True)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = await call(WebhookAction(allow=LOOPBACK), {"url": f"http://127.0.0.1:{port}/"})
    assert (refused["error"]["code"], refused["error"]["retryable"]) == ("connect_error", True)


async def test_the_step_deadline_bounds_the_request(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/slow"}, deadline_s=0.3)
    assert (result["error"]["code"], result["error"]["retryable"]) == ("timeout", True)


@pytest.mark.parametrize(
    "input,named",
    [
        ({}, "'url'"),
        ({"url": "http://example.com", "method": "BREW"}, "'method'"),
        ({"url": "http://example.com", "headers": {"Host": "internal"}}, "'Host'"),
        ({"url": "http://example.com", "headers": {"X-A": "1\r\nX-B: 2"}}, "single-line"),
        ({"url": "http://example.com", "headers": {"Idempotency-Key": "mine"}}, "set by the webhook"),
        ({"url": "http://example.com", "timeout_ms": 0}, "'timeout_ms'"),
        ({"url": "http://example.com", "retry_on": ["503"]}, "'retry_on'"),
        ({"url": "http://"}, "no host"),
    ],
)
async def test_invalid_input_is_not_retryable(input, named):
    result = await call(WebhookAction(), input)
    assert (result["error"]["code"], result["error"]["retryable"]) == ("invalid_input", False)
    assert named in result["error"]["message"]


# -- redirects ----------------------------------------------------------------------------


async def test_follows_up_to_three_redirects(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/hop/3", "method": "GET"})
    assert result["ok"] is True and result["output"]["status"] == 200
    too_many = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/hop/4", "method": "GET"})
    assert (too_many["error"]["code"], too_many["error"]["retryable"]) == ("too_many_redirects", False)


async def test_303_turns_a_post_into_a_get_without_body(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/see-other", "body": {"a": 1}})
    assert result["ok"] is True
    assert [(s["path"], s["method"], s["body"]) for s in target.seen] == [
        ("/see-other", "POST", b'{"a":1}'),
        ("/ok", "GET", b""),
    ]
    assert target.seen[1]["headers"]["Idempotency-Key"] == "exec-1:hook:0"


async def test_credentials_are_not_carried_to_another_origin(target):
    where = f"http://localhost:{target.port}/ok"
    result = await call(
        WebhookAction(allow=LOOPBACK),
        {"url": f"{target.url}/to?where={where}", "headers": {"Authorization": "Bearer s3cret"}},
    )
    assert result["ok"] is True, result
    assert target.seen[0]["headers"]["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in target.seen[1]["headers"]


@pytest.mark.parametrize(
    "where,address",
    [
        ("http://127.0.0.2:80/", "127.0.0.2"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::1]:80/", "::1"),
    ],
)
async def test_a_redirect_to_an_internal_address_is_refused(target, where, address):
    # Only the target itself (127.0.0.1) is allowed; the redirect leads elsewhere.
    action = WebhookAction(allow=[ipaddress.ip_network("127.0.0.1/32")])
    result = await call(action, {"url": f"{target.url}/to?where={where}"})
    assert (result["error"]["code"], result["error"]["retryable"]) == ("ssrf_refused", False)
    assert address in result["error"]["message"] and "redirect" in result["error"]["message"]
    assert [s["path"] for s in target.seen] == ["/to"]


async def test_a_redirect_to_another_scheme_is_refused(target):
    result = await call(WebhookAction(allow=LOOPBACK), {"url": f"{target.url}/to?where=file:///etc/passwd"})
    assert result["error"]["code"] == "ssrf_refused" and "'file'" in result["error"]["message"]


# -- the SSRF guard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,why",
    [
        ("http://10.0.0.1/hook", "private"),
        ("http://127.0.0.1/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::1]/hook", "loopback"),
        ("http://100.64.0.1/hook", "CGNAT"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://[::ffff:127.0.0.1]/hook", "IPv6 form of 127.0.0.1"),
        ("http://[fd12::1]/hook", "unique-local"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://192.168.1.10:8080/hook", "private"),
        ("http://2130706433/hook", "non-canonical"),
        ("ftp://example.com/file", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
    ],
)
async def test_internal_addresses_are_refused_without_an_allow_list(url, why):
    result = await call(WebhookAction(), {"url": url, "timeout_ms": 2000})
    assert (result["error"]["code"], result["error"]["retryable"]) == ("ssrf_refused", False), result
    assert why in result["error"]["message"]


async def test_a_hostname_resolving_to_loopback_is_refused(target):
    result = await call(WebhookAction(), {"url": f"http://localhost:{target.port}/ok"})
    assert (result["error"]["code"], result["error"]["retryable"]) == ("ssrf_refused", False), result
    assert "localhost" in result["error"]["message"] and "loopback" in result["error"]["message"]
    assert target.seen == []


async def test_the_allow_list_permits_loopback(target):
    for url in (f"{target.url}/ok", f"http://localhost:{target.port}/ok"):
        result = await call(WebhookAction(allow=LOOPBACK), {"url": url})
        assert result["ok"] is True, result
    narrow = await call(WebhookAction(allow=[ipaddress.ip_network("10.0.0.0/8")]), {"url": f"{target.url}/ok"})
    assert narrow["error"]["code"] == "ssrf_refused"


class FakeResolver(AbstractResolver):
    """A DNS that answers what the test says (a rebinding or mixed answer)."""

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.calls = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.calls += 1
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for a in self.answers
        ]

    async def close(self):
        pass


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["93.184.216.34", "10.1.2.3"], ["::ffff:169.254.169.254"]])
async def test_the_resolver_refuses_a_name_if_any_address_is_internal(answers):
    resolver = GuardedResolver(EgressPolicy(), FakeResolver(answers))
    with pytest.raises(EgressRefused) as info:
        await resolver.resolve("rebind.example", 80)
    assert "rebind.example" in str(info.value)


async def test_the_resolved_addresses_are_checked_at_connect_time(target):
    # A name that resolves to loopback only when the connection is made: the guard
    # sits in the connector's resolver, so what is checked is what is connected to.
    policy = EgressPolicy()
    fake = FakeResolver(["127.0.0.1"])
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, fake), socket_factory=policy.socket_factory)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.get(f"http://rebind.example:{target.port}/ok")
    assert fake.calls == 1
    assert isinstance(info.value.__cause__, EgressRefused)
    assert target.seen == []


async def test_every_connected_address_passes_the_socket_factory(target):
    # IP literals skip the resolver; the socket factory still sees and refuses them.
    action = WebhookAction()
    session = action._client()
    try:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.get(f"{target.url}/ok")
        assert isinstance(info.value.__cause__, EgressRefused)
    finally:
        await action.aclose()
    assert target.seen == []
    with pytest.raises(EgressRefused):
        EgressPolicy().socket_factory((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)))
    sock = EgressPolicy().socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)))
    sock.close()


@pytest.mark.parametrize(
    "address,refused",
    [
        ("8.8.8.8", False),
        ("2606:4700::1111", False),
        ("::ffff:8.8.8.8", False),
        ("172.16.5.4", True),
        ("fe80::1", True),
        ("ff02::1", True),
        ("240.0.0.1", True),
        ("::", True),
        ("64:ff9b::a00:1", True),
        ("2002:a9fe:a9fe::", True),
        ("192.0.2.7", True),
    ],
)
def test_policy_table(address, refused):
    assert (EgressPolicy().refusal(address) is not None) is refused
