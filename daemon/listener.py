"""The worker's LISTEN connection, kept open: deploys, rollout changes, timers set elsewhere.

A NOTIFY reaches only the sessions listening when it commits, and a listening
connection that is lost (Postgres restarted, its backend terminated) hears
nothing more and says nothing about it. So a lost one is opened again, with
back-off, for as long as the worker runs; then the worker makes up for what it
may have missed meanwhile (`catch_up`), since nothing will say it again.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from ledger.batcher import CONNECTION_ERRORS

from . import logs

log = logging.getLogger("ordo.worker")

#: What opening the connection again may meet while Postgres restarts: a refused or cut
#: connection, or the server saying it cannot take one yet (starting up, too many clients).
_NOT_YET = (*CONNECTION_ERRORS, asyncpg.PostgresError)


class Listener:
    """One connection listening on `channels` (channel -> callback, asyncpg's `add_listener`)."""

    def __init__(self, dsn: str, channels: dict[str, Callable], catch_up: Callable[[], Awaitable[None]]):
        self._dsn = dsn
        self._channels = channels
        self._catch_up = catch_up
        self._lost = asyncio.Event()
        #: The connection, once it listens on every channel; None while there is none.
        self.connection: asyncpg.Connection | None = None

    async def open(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            for channel, callback in self._channels.items():
                await conn.add_listener(channel, callback)
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        conn.add_termination_listener(self._on_lost)
        if conn.is_closed():
            self._lost.set()  # lost before the listener was there to hear it
        self.connection = conn

    def _on_lost(self, _conn) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Open the connection again each time it is lost, until cancelled (the worker drains)."""
        while True:
            await self._lost.wait()
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

    async def close(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.remove_termination_listener(self._on_lost)  # closed on purpose: not lost
            await conn.close()
