"""The console's aiohttp application: the routes, the guard in front of them, and the server.

Every request but the log-in page and the stylesheet must come from a
session (cookie) or carry a token (`Authorization: Bearer`); a change is a
POST, and a POST from a session must carry the session's CSRF token. Every
response says: no caching, no framing, scripts and styles from this origin
only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from importlib import resources

from aiohttp import web

from ledger import connection

from ..config import Config
from ..topology import Topology
from . import changes, views
from .auth import Sessions, Tokens
from .html import esc, page
from .live import Live
from .state import CONSOLE, COOKIE, Console, authenticate

log = logging.getLogger("ordo.console")

#: Pages anyone may fetch: the log-in form and the stylesheet.
_OPEN_PATHS = ("/login", "/static/console.css")


@web.middleware
async def guard(request: web.Request, handler):
    """No identity, no page; a session's POST without its CSRF token, no change."""
    if request.path in _OPEN_PATHS:
        return await handler(request)
    identity, session = authenticate(request)
    if identity is None:
        if request.method == "GET" and "Authorization" not in request.headers:
            raise web.HTTPSeeOther("/login")
        raise web.HTTPUnauthorized(text="a console token is needed (log in, or send Authorization: Bearer TOKEN)")
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            raise web.HTTPForbidden(text="the request comes from another site")
        if session is not None:
            form = await request.post()
            if not session.csrf_matches(str(form.get("csrf", ""))):
                raise web.HTTPForbidden(text="the form's CSRF token is missing or wrong: reload the page")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none';"
        " base-uri 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")


def _login_form(message: str = "") -> str:
    error = f'<p class="error">{esc(message)}</p>' if message else ""
    return page(
        "Log in",
        f'{error}<form method="post" action="/login"><label>Token '
        '<input type="password" name="token" autocomplete="current-password" autofocus required></label> '
        '<button type="submit" id="login">Log in</button></form>',
    )


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text=_login_form(), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    form = await request.post()
    identity = console.tokens.identify(str(form.get("token", "")))
    if identity is None:
        log.warning("console log-in refused", extra={"remote": request.remote})
        return web.Response(text=_login_form("That token is not known."), content_type="text/html", status=401)
    session = console.sessions.start(identity)
    response = web.Response(status=303, headers={"Location": "/executions"})
    response.set_cookie(COOKIE, session.session_id, httponly=True, samesite="Strict", secure=request.secure, path="/")
    log.info("console log-in", extra={"who": identity.name})
    return response


async def logout(request: web.Request) -> web.Response:
    _, session = authenticate(request)
    if session is not None:
        request.app[CONSOLE].sessions.end(session.session_id)
    response = web.Response(status=303, headers={"Location": "/login"})
    response.del_cookie(COOKIE, path="/")
    return response


async def stylesheet(request: web.Request) -> web.Response:
    css = resources.files("daemon.console").joinpath("static/console.css").read_text()
    return web.Response(text=css, content_type="text/css", headers={"Cache-Control": "max-age=3600"})


async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/executions")


def make_app(console: Console) -> web.Application:
    """The console as an aiohttp application (the tests drive it as it is)."""
    app = web.Application(middlewares=[guard], client_max_size=256 * 1024)
    app[CONSOLE] = console
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", home)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/console.css", stylesheet)
    app.router.add_get("/executions", views.executions)
    app.router.add_get("/executions/{execution_id}", views.execution)
    app.router.add_post("/executions/{execution_id}/cancel", changes.cancel)
    app.router.add_post("/executions/{execution_id}/signal", changes.signal)
    app.router.add_get("/dead-letters", views.dead_letters)
    app.router.add_post("/dead-letters/retry-group", changes.retry_group)
    app.router.add_post("/dead-letters/{letter_id}/retry", changes.retry_letter)
    app.router.add_get("/workflows", views.workflows)
    app.router.add_get("/workflows/{tenant}/{workflow_id}", views.workflow)
    app.router.add_get("/audit", views.audit)
    app.router.add_get("/live", views.live)
    return app


async def open_console(config: Config, tokens: Tokens) -> tuple[Console, object | None]:
    """The ledger pool and, when NATS is configured, a JetStream context: (console, nats client or None)."""
    # The console's statements read a page each: JIT compiling them costs more than it saves. Its connections
    # are given up after pg_tcp_timeout_s of silence, as a worker's are: a page would otherwise wait on a cut one.
    pool = await connection.create_pool(
        config.pg_dsn, tcp_timeout_s=config.pg_tcp_timeout_s, min_size=1, max_size=4, server_settings={"jit": "off"}
    )
    nc = None
    js = None
    if config.nats_url:
        import nats

        nc = await nats.connect(config.nats_url, name="ordo-console")
        js = nc.jetstream()
    live = None
    if config.metrics_port > 0:
        host = "127.0.0.1" if config.metrics_host in ("0.0.0.0", "", "::") else config.metrics_host
        workers = config.workers or os.cpu_count() or 1
        live = Live([f"http://{host}:{config.metrics_port + i}/metrics" for i in range(workers)])
    return Console(pool, js, Topology(config), tokens, Sessions(), live), nc


async def serve(config: Config, tokens: Tokens, host: str, port: int) -> None:
    """Run the console until cancelled (Ctrl-C)."""
    from ledger.schema import require_current

    console, nc = await open_console(config, tokens)
    async with console.pool.acquire() as conn:
        await require_current(conn)
    runner = web.AppRunner(make_app(console), access_log=None)
    await runner.setup()
    sampling = None if console.live is None else asyncio.create_task(console.live.run())
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        shown = f"[{host}]" if ":" in host else host
        print(f"ordo console on http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
        if not config.nats_url:
            print("ordo console: ORDO_NATS_URL is not set: cancel, signal and retry are off", flush=True)
        # Ctrl-C and systemd's SIGTERM stop it; handled here, since a process started in the
        # background by a shell inherits SIGINT ignored, and Python then raises no KeyboardInterrupt.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        if sampling is not None:
            sampling.cancel()
        await runner.cleanup()
        await console.pool.close()
        if nc is not None:
            await nc.close()  # type: ignore[attr-defined]
