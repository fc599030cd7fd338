"""What the ledger's queries run on, as the type checker sees it, and how it is lost.

asyncpg's Connection, Pool and a pool's connection (PoolConnectionProxy)
share no base class, yet the ledger's reads and writes are called with each
of them: these Protocols name the few methods a function really uses, so that
any of the three (or a test's stand-in) fits structurally.

A connection cut without a word (its host gone, a NAT or proxy dropping the
flow, a failover moving an address: no FIN or RST ever arrives) is found lost
only by TCP itself, and asyncpg asks TCP for nothing but TCP_NODELAY: a
statement then fails at its command_timeout, and a COPY waiting for the socket
(with no timeout in asyncpg) at the kernel's retransmission limit, ~15
minutes. `connect` and `create_pool` open the worker's connections (and those
of `ordo`'s commands, `ordo dev` and the console) with both ends told to give
such a connection up after `tcp_timeout_s` of silence.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
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
    none, and asyncpg sets no TCP keepalive, so nothing else would notice before
    the keepalive `fail_when_silent` sets gives up (`tcp_timeout_s`).
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


#: The default `pg_tcp_timeout_s`: seconds of silence after which a connection is taken as cut.
TCP_TIMEOUT_S = 30.0


def _keepalive(tcp_timeout_s: float) -> tuple[int, int]:
    """The keepalive idle time (= the interval between probes) and probe count that give up a
    silent peer after about `tcp_timeout_s`: a probe every quarter, three unanswered ones."""
    return max(1, int(tcp_timeout_s / 4)), 3


def _tcp_socket(conn: asyncpg.Connection) -> Any:
    """The connection's TCP socket (asyncio's or uvloop's socket-like object); None for a Unix socket.

    Reaches into asyncpg: it offers no keepalive option and no public way to its
    socket, so this reads its transport (the private `_transport`) as asyncpg
    itself does to set TCP_NODELAY (`transport.get_extra_info('socket')`).
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def fail_when_silent(conn: asyncpg.Connection, tcp_timeout_s: float) -> None:
    """Have the kernel end `conn` once its peer has been silent for about `tcp_timeout_s` seconds.

    Keepalive probes find a silent peer while nothing is being sent; TCP_USER_TIMEOUT
    bounds how long sent data may go unacknowledged, or a zero window last (a COPY
    paused on a full socket). Either ends the connection as lost (asyncpg's termination
    listeners are told, what awaits it fails). Options the platform lacks are skipped.
    """
    sock = _tcp_socket(conn)
    if sock is None:
        return
    every, count = _keepalive(tcp_timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", every),
        ("TCP_KEEPINTVL", every),
        ("TCP_KEEPCNT", count),
        ("TCP_USER_TIMEOUT", int(tcp_timeout_s * 1000)),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def server_side_timeout(tcp_timeout_s: float) -> dict[str, str]:
    """The same bound on Postgres' end of the connection, as session settings (server_settings).

    A backend whose client was cut mid-transaction otherwise keeps the transaction, and its
    locks (the partition rows a commit holds FOR SHARE, the rows it inserted), until the
    server's own keepalive gives up (2 hours by default): idle_in_transaction_session_timeout
    does not cover a backend waiting for the rest of a COPY. Ignored on a Unix socket.
    """
    every, count = _keepalive(tcp_timeout_s)
    return {
        "tcp_keepalives_idle": str(every),
        "tcp_keepalives_interval": str(every),
        "tcp_keepalives_count": str(count),
        "tcp_user_timeout": str(int(tcp_timeout_s * 1000)),
    }


async def connect(dsn: str, *, tcp_timeout_s: float, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect, the connection given up by both ends after `tcp_timeout_s` of silence."""
    server_settings = {**server_side_timeout(tcp_timeout_s), **kwargs.pop("server_settings", {})}
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=server_settings, **kwargs)
    fail_when_silent(conn, tcp_timeout_s)
    return conn


async def create_pool(dsn: str, *, tcp_timeout_s: float, **kwargs: Any) -> asyncpg.Pool:
    """asyncpg.create_pool, each of its connections given up by both ends after `tcp_timeout_s` of
    silence (this end's options set by the pool's `init`, before any `init` of the caller's)."""
    server_settings = {**server_side_timeout(tcp_timeout_s), **kwargs.pop("server_settings", {})}
    then: Callable[[asyncpg.Connection], Awaitable[None]] | None = kwargs.pop("init", None)

    async def init(conn: asyncpg.Connection) -> None:
        fail_when_silent(conn, tcp_timeout_s)
        if then is not None:
            await then(conn)

    return await asyncpg.create_pool(dsn, server_settings=server_settings, init=init, **kwargs)
