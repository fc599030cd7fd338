"""Who may use the console: tokens, the sessions a token logs into, and their CSRF tokens.

Tokens come from the `console_tokens` setting (`ORDO_CONSOLE_TOKENS`), a
comma-separated list of `NAME:SECRET` (an operator token: every tenant) or
`tenant=TENANT:SECRET` (a token bound to one tenant: it sees and changes only
that tenant's executions, dead letters and workflows). A person logs in with
a token once and gets a session cookie; a script sends the token itself as
`Authorization: Bearer SECRET`. Sessions live in the console's memory: a
restart logs everyone out, which is the safe way round.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

#: A secret shorter than this is refused: the console may listen beyond loopback.
MIN_SECRET_CHARS = 16
#: A session ends this long after log-in, used or not.
SESSION_SECONDS = 8 * 3600
#: The most sessions kept; logging in past it ends the oldest (memory stays bounded).
MAX_SESSIONS = 10_000


class TokenError(ValueError):
    """The `console_tokens` setting cannot be read; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class Identity:
    """Who is using the console: `name` goes into the audit trail; `tenant` is None for an operator."""

    name: str
    tenant: str | None

    @property
    def tenants(self) -> tuple[str, ...] | None:
        """The tenants this identity may see (None: all)."""
        return None if self.tenant is None else (self.tenant,)

    def may_see(self, tenant: str | None) -> bool:
        return self.tenant is None or tenant == self.tenant


def _fingerprint(secret: str) -> str:
    """Tells apart two tokens of the same name in the audit trail without showing either secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


class Tokens:
    """The configured tokens; `identify` finds a secret's identity in constant time per token."""

    def __init__(self, setting: str) -> None:
        self._tokens: list[tuple[bytes, Identity]] = []
        for number, entry in enumerate((e.strip() for e in setting.split(",")), start=1):
            if not entry:
                continue
            label, sep, secret = entry.partition(":")
            label = label.strip()
            where = f"console_tokens entry {number} ({label or 'no name'})"
            if not sep or not label:
                raise TokenError(f"{where}: expected NAME:SECRET or tenant=TENANT:SECRET")
            if len(secret) < MIN_SECRET_CHARS:
                raise TokenError(f"{where}: the secret must be at least {MIN_SECRET_CHARS} characters")
            if label.startswith("tenant="):
                tenant = label.removeprefix("tenant=").strip()
                if not tenant:
                    raise TokenError(f"{where}: tenant= names no tenant")
                identity = Identity(f"tenant={tenant}#{_fingerprint(secret)}", tenant)
            else:
                identity = Identity(f"{label}#{_fingerprint(secret)}", None)
            if self.identify(secret) is not None:
                raise TokenError(f"{where}: the same secret is given twice")
            self._tokens.append((secret.encode(), identity))

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def identify(self, secret: str) -> Identity | None:
        """The identity of a presented secret, or None."""
        presented = secret.encode()
        found = None
        for known, identity in self._tokens:
            if hmac.compare_digest(known, presented):
                found = identity
        return found


@dataclass(frozen=True)
class Session:
    """A logged-in browser: its cookie value, who it is, and the CSRF token its forms carry."""

    session_id: str
    identity: Identity
    csrf: str
    expires_at: float

    def csrf_matches(self, presented: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), presented.encode())


class Sessions:
    """The sessions of this console process, oldest first."""

    def __init__(self, clock=time.monotonic) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._clock = clock

    def start(self, identity: Identity) -> Session:
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(
            secrets.token_urlsafe(32), identity, secrets.token_urlsafe(32), self._clock() + SESSION_SECONDS
        )
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
