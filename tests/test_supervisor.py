"""The per-core supervisor, over real worker processes."""

import asyncio

from harness import Harness

from daemon.dev import wait_for_workers
from daemon.supervisor import Supervisor
from ledger import leases


async def test_stopping_from_an_event_loop_leaves_the_loop_running_while_the_workers_drain(
    nats_server_url, pg_dsn, prefix
):
    """The bench stops its workers from its event loop, beside the readers and watchers on it.

    The ticker counts its steps across the stop: a stop that blocked the loop would let it take none.
    """
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        supervisor = Supervisor(2, extra_env=h.env())
        since = await leases.ledger_clock(h.db)
        supervisor.start()
        try:
            # Each worker owns its share: both are up, their SIGTERM handlers in place (the bench waits so too).
            await wait_for_workers(h.db, h.config, since, workers=2)
        except BaseException:
            supervisor.stop(timeout=5)
            raise
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        try:
            drained = await supervisor.stop_async(timeout=30)
            during = ticks - before
        finally:
            ticker.cancel()
        assert drained, [child.returncode for child in supervisor.children.values()]
        assert during > 0
