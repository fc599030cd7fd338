"""The worker's LISTEN connection, kept open: deploys, rollout changes, timers set elsewhere.

A NOTIFY reaches only the sessions listening when it commits, and a listening
connection that is lost (Postgres restarted, its backend terminated) hears
nothing more and says nothing about it. So a lost one is opened again, with
back-off, for as long as the worker runs; then the worker makes up for what it
may have missed meanwhile (`catch_up`), since nothing will say it again.

A connection cut without a word (the host gone, an address a failover moved)
is told lost only by the TCP keepalive of `pg_tcp_timeout_s` (ledger/connection.py),
and sooner by asking it: the connection is asked to answer every `check_every_s`,
and one that does not is taken as lost.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from ledger import connection
from ledger.connection import CONNECTION_ERRORS, responds, when_lost

from . import logs

log = logging.getLogger("ordo.worker")

#: What opening the connection again may meet while Postgres restarts: a refused or cut
#: connection, or the server saying it cannot take one yet (starting up, too many clients).
_NOT_YET = (*CONNECTION_ERRORS, asyncpg.PostgresError)


#: How often the listening connection is asked whether it is still there, and how long it has to answer.
CHECK_EVERY_S = 10.0
CHECK_TIMEOUT_S = 5.0


class Listener:
    """One connection listening on `channels` (channel -> callback, asyncpg's `add_listener`)."""

    def __init__(
        self,
        dsn: str,
        channels: dict[str, Callable],
        catch_up: Callable[[], Awaitable[None]],
        *,
        check_every_s: float = CHECK_EVERY_S,
        check_timeout_s: float = CHECK_TIMEOUT_S,
        tcp_timeout_s: float = connection.TCP_TIMEOUT_S,
    ):
        self._dsn = dsn
        self._tcp_timeout_s = tcp_timeout_s
        self.check_every_s = check_every_s
        self.check_timeout_s = check_timeout_s
        self._channels = channels
        self._catch_up = catch_up
        self._lost = asyncio.Event()
        #: The connection, once it listens on every channel; None while there is none.
        self.connection: asyncpg.Connection | None = None

    async def open(self) -> None:
        conn = await connection.connect(self._dsn, tcp_timeout_s=self._tcp_timeout_s)
        try:
            for channel, callback in self._channels.items():
                await conn.add_listener(channel, callback)
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        when_lost(conn, self._on_lost)
        self.connection = conn

    def _on_lost(self, _conn) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Open the connection again each time it is lost, until cancelled (the worker drains)."""
        while True:
            await self._until_lost()
            self.connection = None
            log.warning(
                "lost the ledger connection that listens for deploys, rollouts and timers set elsewhere; "
                "opening it again",
                extra=logs.failure("ledger_connection", "listening connection closed"),
            )
            delay = 0.05
            while True:
                try:
                    await self.open()
                    break
                except _NOT_YET:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            # Listening again first, so that what the catch-up does not see is told from now on.
            await self._catch_up()

    async def _until_lost(self) -> None:
        """Until the connection is lost: told by asyncpg, or found not answering."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.check_every_s)
                return
            except TimeoutError:
                conn = self.connection
                if conn is not None and not await responds(conn, self.check_timeout_s):
                    conn.terminate()  # its termination listener tells `_lost`

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.remove_termination_listener(self._on_lost)  # closed on purpose: not lost
            try:
                # One cut without a word would never answer the goodbye: past the timeout asyncpg aborts it.
                await conn.close(timeout=self.check_timeout_s)
            except CONNECTION_ERRORS:
                pass
