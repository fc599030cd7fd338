"""What the console's handlers share, and what each request carries (who, the CSRF token)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from ..topology import Topology
from .auth import Identity, Session, Sessions, Tokens
from .live import Live


@dataclass
class Console:
    """What the handlers share: the ledger pool, JetStream (None without ORDO_NATS_URL), tokens, sessions."""

    pool: asyncpg.Pool
    js: object | None
    topology: Topology
    tokens: Tokens
    sessions: Sessions
    #: The workers' metrics, sampled (None without metrics_port).
    live: Live | None = None


CONSOLE = web.AppKey("console", Console)
#: The session cookie.
COOKIE = "ordo_console"


def authenticate(request: web.Request) -> tuple[Identity | None, Session | None]:
    """Who sent the request: by its bearer token, or by its session cookie; (None, None) if nobody known."""
    console = request.app[CONSOLE]
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer":
            return None, None
        return console.tokens.identify(secret.strip()), None
    session = console.sessions.get(request.cookies.get(COOKIE, ""))
    return (None, None) if session is None else (session.identity, session)


def identity_of(request: web.Request) -> Identity:
    """Who sent a request the guard (app.py) let through."""
    identity, _ = authenticate(request)
    if identity is None:  # the session ended since the guard looked
        raise web.HTTPUnauthorized(text="log in again")
    return identity


def csrf_of(request: web.Request) -> str:
    """The CSRF token the page's forms carry ("" for a script using a bearer token: it needs none)."""
    _, session = authenticate(request)
    return "" if session is None else session.csrf
