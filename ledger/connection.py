"""What the ledger's queries run on, as the type checker sees it, and how it is lost.

asyncpg's Connection, Pool and a pool's connection (PoolConnectionProxy)
share no base class, yet the ledger's reads and writes are called with each
of them: these Protocols name the few methods a function really uses, so that
any of the three (or a test's stand-in) fits structurally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg
from asyncpg import Record
from asyncpg.transaction import Transaction

#: What a lost connection raises (a new connection is the cure, and the work is tried again on it).
CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # The protocol state left behind when the server shut down mid-statement (seen
    # under a Postgres restart: "cannot switch to state 15; another operation is
    # in progress"): the connection is unusable, a new one is the cure.
    asyncpg.InternalClientError,
)


class Queryable(Protocol):
    """A connection, a pool's connection or a pool: one statement at a time."""

    async def execute(self, query: str, *args: object, timeout: float | None = ...) -> str: ...

    async def fetch(self, query: str, *args: object, timeout: float | None = ...) -> list[Record]: ...

    async def fetchrow(self, query: str, *args: object, timeout: float | None = ...) -> Record | None: ...

    async def fetchval(self, query: str, *args: object, column: int = ..., timeout: float | None = ...) -> Any: ...


class Transactional(Queryable, Protocol):
    """A connection of its own or a pool's (not a pool): statements in one transaction."""

    def transaction(self) -> Transaction: ...


async def responds(conn: asyncpg.Connection, timeout: float) -> bool:
    """Whether the server answers on this connection within `timeout` seconds.

    A connection cut without a word (its host gone, its address moved by a
    failover) fails only the statements sent on it; one that only listens sends
    none, and asyncpg sets no TCP keepalive, so nothing else would notice.
    """
    try:
        await conn.execute("SELECT 1", timeout=timeout)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError):
        return False
    return True


def when_lost(conn: asyncpg.Connection, callback: Callable[[object], None]) -> None:
    """Call `callback(conn)` once the connection is lost (asyncpg's termination listener), or now if it
    is lost already: a listener added to a closed connection is never called."""
    conn.add_termination_listener(callback)
    if conn.is_closed():
        callback(conn)
