"""One worker process as a service: signals, exit codes (and, later, notify and metrics)."""

import asyncio
import logging
import signal

from ledger.batcher import Fenced

from .config import Config
from .worker import Worker

log = logging.getLogger("ordo.service")


async def run_worker(config: Config, worker_index: int, workers: int) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit code."""
    worker = Worker(config, worker_index=worker_index, workers=workers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    await worker.start()
    try:
        await worker.run()
    except Fenced as exc:
        log.error("%s; exiting so that the supervisor restarts this worker", exc)
        return 3
    return 0
