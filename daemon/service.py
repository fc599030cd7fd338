"""One worker process as a service: signals, exit codes, systemd notify, health and metrics.

Signals, mapped the way nats-server maps them:

    SIGTERM, SIGINT  drain: stop fetching, commit and ack what is in flight, exit 0
    SIGHUP           reload what can change without a restart (RELOADABLE):
                     the log level and format, tenant weights and tenant
                     limits, read again from the config file (the ORDO_*
                     environment is the one the worker started with), and
                     the workflow definitions
    SIGUSR1          reopen log files: a no-op, since a worker logs to stderr
                     and journald owns the files; it logs a line so that a
                     logrotate hook sending it is visible
    SIGUSR2          only when ORDO_BLOCK_LOOP_ON_SIGUSR2=1: block the event
                     loop for ORDO_BLOCK_SECONDS (30) seconds, so that a test
                     can prove a stalled loop stops the watchdog pings

Exit codes: 0 after a drain, 1 when the health port cannot be bound (or an
uncaught error), 3 when partition ownership moved (fenced): the supervisor or
systemd restarts the worker, which claims its partitions again.
"""

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import fields

from ledger.batcher import Fenced

from . import config as config_module
from . import logs, tenant_limits
from .config import Config
from .health import HealthServer
from .notify import notify, watchdog, watchdog_interval
from .worker import Worker

log = logging.getLogger("ordo.service")

EXIT_OK = 0
EXIT_NO_PORT = 1
EXIT_FENCED = 3

#: Settings SIGHUP applies; every other one takes a restart (the worker sized its ring, pools, partitions by them).
RELOADABLE = ("log_level", "log_format", "tenant_weights", "tenant_limits")


class _Service:
    """The signal handlers' view of one running worker."""

    def __init__(self, config: Config, worker: Worker, config_path: str | None):
        self.config = config
        self.worker = worker
        self.config_path = config_path
        #: READY=1 went out: systemd considers the unit started.
        self.announced = False
        self._tasks: set[asyncio.Task] = set()

    def status(self) -> str:
        w = self.worker
        owned = ",".join(map(str, sorted(w.ownership.owned)))
        return f"STATUS=consuming: worker {w.index} of {w.workers}, partitions {owned}"

    def announce_ready(self) -> None:
        if self.worker.stopping.is_set():
            return  # a SIGTERM during start-up: the worker drains at once, never "ready"
        self.announced = True
        notify("READY=1", self.status())
        log.info("worker %d ready", self.worker.index)

    def drain(self, signame: str) -> None:
        if not self.worker.stopping.is_set():
            log.info("%s: draining", signame)
            notify("STOPPING=1", "STATUS=draining: committing and acking what is in flight")
        self.worker.stopping.set()

    def reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        announced = self.announced
        if announced:
            # RELOADING=1 wants the monotonic time of the reload (systemd >= 253 checks it).
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")
        try:
            fresh = config_module.load(self.config_path)
            limits = tenant_limits.parse(fresh.tenant_limits)  # a malformed entry raises: nothing changed
            intake = getattr(self.worker, "intake", None)  # made once the worker's connections are up
            if intake is not None:
                intake.lanes.reweigh(fresh.tenant_weights)  # a malformed one raises: nothing changed
            logs.configure(fresh.log_level, fresh.log_format)
            changed = [
                f.name
                for f in fields(Config)
                if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(self.config, f.name)
            ]
            if changed:
                log.warning("SIGHUP: %s changed; they take effect on restart", ", ".join(changed))
            # Before the worker is ready, start() is loading the definitions anyway.
            if self.worker.ready.is_set() and not self.worker.stopping.is_set():
                await self.worker.set_tenant_limits(limits)  # and the workflow definitions again
            else:
                self.worker.registry.set_tenant_limits(limits)
            log.info("SIGHUP: reloaded (log level %s, workflow definitions)", fresh.log_level)
        except Exception as exc:
            log.error("SIGHUP: reload failed, running on as before: %s", exc, extra=logs.failure("reload", exc))
        finally:
            if announced:
                notify("READY=1", self.status())

    @staticmethod
    def reopen_logs() -> None:
        log.info("SIGUSR1: nothing to reopen, logs go to stderr")

    @staticmethod
    def block_loop() -> None:
        seconds = float(os.environ.get("ORDO_BLOCK_SECONDS", "30"))
        log.warning("SIGUSR2: blocking the event loop for %g s (ORDO_BLOCK_LOOP_ON_SIGUSR2=1)", seconds)
        notify(f"STATUS=blocking the event loop for {seconds:g} s (ORDO_BLOCK_LOOP_ON_SIGUSR2)")
        time.sleep(seconds)  # on purpose: a blocked loop, as a stuck callback would block it


#: Allocations of container objects between two young-generation collections (Python's default: 700).
#: Thousands of units live between fetch and commit, and every young pass walks them all: at 700,
#: W1 closed ran at 21,220-21,756 executions/s (medians of 3); at 20,000, 25,214-26,362.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Collect less often on the hot path; what start-up built is left out of collections for good."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run_worker(config: Config, worker_index: int, workers: int, *, config_path: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit code.

    `config_path` is the file SIGHUP re-reads (default: $ORDO_CONFIG or /etc/ordo/ordo.toml).
    """
    worker = Worker(config, worker_index=worker_index, workers=workers)
    # Before the signal handlers and the health server: their lines carry the worker's name too.
    logs.bind_worker(worker.name)
    service = _Service(config, worker, config_path)
    loop = asyncio.get_running_loop()
    handlers = {
        signal.SIGTERM: (service.drain, "SIGTERM"),
        signal.SIGINT: (service.drain, "SIGINT"),
        signal.SIGHUP: (service.reload,),
        signal.SIGUSR1: (service.reopen_logs,),
    }
    if os.environ.get("ORDO_BLOCK_LOOP_ON_SIGUSR2") == "1":
        handlers[signal.SIGUSR2] = (service.block_loop,)
    for sig, (handler, *args) in handlers.items():
        loop.add_signal_handler(sig, handler, *args)

    health = pinger = None
    try:
        if config.metrics_port > 0:
            port = config.metrics_port + worker_index
            health = HealthServer(
                config.metrics_host, port, lambda: worker.ready.is_set() and not worker.stopping.is_set()
            )
            try:
                await health.start()
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s:%d: %s",
                    config.metrics_host,
                    port,
                    exc,
                    extra=logs.failure("metrics_port", exc),
                )
                health = None
                return EXIT_NO_PORT

        interval = watchdog_interval()
        if interval is not None:
            pinger = loop.create_task(watchdog(interval))

        notify("STATUS=starting: connecting to NATS and Postgres, claiming partitions")
        await worker.start()
        run = loop.create_task(worker.run())
        ready = loop.create_task(worker.ready.wait())
        await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            tune_gc()
            service.announce_ready()
        ready.cancel()
        try:
            await run
        except Fenced as exc:
            log.error(
                "%s; exiting so that the supervisor restarts this worker",
                exc,
                extra=logs.failure("fenced", exc, partitions=exc.partitions),
            )
            notify(f"STATUS=fenced, exiting to be restarted: {exc}")
            return EXIT_FENCED
        return EXIT_OK
    finally:
        if pinger is not None:
            pinger.cancel()
        if health is not None:
            await health.close()
        for sig in handlers:
            loop.remove_signal_handler(sig)
