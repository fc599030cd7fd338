"""The per-core supervisor, over real worker processes."""

import asyncio
import os
import signal
import subprocess
import sys
import time

from harness import ROOT, Harness

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


async def test_ordo_run_gives_its_workers_its_config_file_and_passes_sighup_on(
    nats_server_url, pg_dsn, prefix, tmp_path
):
    """`ordo --config FILE run`: the workers read FILE, and a SIGHUP to the supervisor reloads every
    worker, the supervisor running on (left to its default, SIGHUP would end it and orphan them)."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        config_file = h.config_file(tmp_path / "ordo.toml", log_level="info")
        env = {name: value for name, value in os.environ.items() if not name.startswith("ORDO_")}  # the file alone
        log_file = tmp_path / "ordo.log"
        since = await leases.ledger_clock(h.db)
        with log_file.open("wb") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--config", str(config_file), "run", "--workers", "2"],
                env=env,
                cwd=ROOT,
                stderr=log,
            )
            h.processes.append(supervisor)
            await wait_for_workers(h.db, h.config, since, workers=2, timeout=30)

            h.config_file(config_file, log_level="info", tenant_weights="heavy=5")
            supervisor.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while log_file.read_text().count("SIGHUP: reloaded") < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            output = log_file.read_text()
            assert output.count("SIGHUP: reloaded") == 2, output[-3000:]
            assert supervisor.poll() is None

            supervisor.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(supervisor.wait, 60) == 0, log_file.read_text()[-3000:]
