"""A test's own Ordo: config on the session's servers, workers in-process or as
real processes (to kill -9), publishing, and reading the ledger back.

Every harness has its own database and subject/stream prefix (the `pg_dsn` and
`prefix` fixtures), so tests never see each other's data.
"""

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import asyncpg
import nats
import orjson
from aiohttp import web

from bench.generator import publish_events
from daemon import config as config_module
from daemon.topology import Topology, execution_id_for
from daemon.worker import Worker
from ledger import workflows
from ledger.check import CHECKS, check
from ledger.schema import migrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def observations(histogram) -> float:
    """How many values a prometheus Histogram of this process has observed."""
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))


def fault_scale(ci: int, full: int) -> int:
    """Counts for fault tests: reduced in CI (ORDO_FAULT_SCALE=ci), full otherwise when asked."""
    return full if os.environ.get("ORDO_FAULT_SCALE") == "full" else ci


class Harness:
    def __init__(self, nats_url: str, pg_dsn: str, prefix: str, **settings):
        settings.setdefault("partitions", 4)
        settings.setdefault("batch_max_ms", 2.0)
        # Workers come and go within seconds here: short leases keep takeovers quick.
        settings.setdefault("lease_ttl_s", 3.0)
        settings.setdefault("lease_renew_s", 0.5)
        self.config = config_module.Config(nats_url=nats_url, pg_dsn=pg_dsn, prefix=prefix, **settings)
        self.topology = Topology(self.config)
        self.nc = None
        self.js = None
        self.db = None
        self.processes: list[subprocess.Popen] = []

    async def __aenter__(self):
        self.nc = await nats.connect(self.config.nats_url)
        self.js = self.nc.jetstream(timeout=10)
        await self.topology.ensure(self.js)
        self.db = await asyncpg.connect(self.config.pg_dsn)
        await migrate(self.db)
        return self

    async def __aexit__(self, *exc):
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await self.db.close()
        await self.nc.close()

    # -- set-up ---------------------------------------------------------------

    async def deploy(self, definition: dict) -> int:
        version, _ = await workflows.deploy(self.db, definition)
        return version

    # -- workers --------------------------------------------------------------

    @asynccontextmanager
    async def worker(self, index: int = 0, workers: int = 1, *, clock_ms=None, **settings):
        """A worker running in this test's event loop; drained on exit."""
        worker = Worker(self.config.with_(**settings), worker_index=index, workers=workers, clock_ms=clock_ms)
        await worker.start()
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 10)
        try:
            yield worker
        finally:
            worker.stopping.set()
            await asyncio.wait_for(task, 60)

    def env(self, **settings) -> dict:
        """The environment of a worker process with this harness's settings (every one that differs)."""
        config = self.config.with_(**settings)
        env = dict(os.environ)
        defaults = config_module.Config()
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if value != getattr(defaults, field.name) or field.name in ("nats_url", "pg_dsn", "prefix"):
                env[f"ORDO_{field.name.upper()}"] = str(value)
        env["ORDO_LOG_LEVEL"] = "warning"
        return env

    def spawn_worker(self, index: int = 0, workers: int = 1, **settings) -> subprocess.Popen:
        """A worker as a real process (`ordo run --worker-index`), to be killed for real."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--worker-index", str(index), "--workers", str(workers)],
            env=self.env(**settings),
            cwd=ROOT,
        )
        self.processes.append(proc)
        return proc

    async def partition_consumer(self, partition: int) -> str:
        """The partition's consumer under its current owner (there is one per epoch)."""
        epoch = await self.db.fetchval("SELECT epoch FROM ordo.partitions WHERE partition = $1", partition)
        return self.topology.partition_consumer(partition, epoch)

    async def wait_claimed(self, since: float, count: int | None = None, timeout: float = 20.0) -> None:
        """Until `count` partitions (all by default) were claimed after `since` (epoch seconds)."""
        count = self.config.partitions if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            claimed = await self.db.fetchval(
                "SELECT count(*) FROM ordo.partitions WHERE claimed_at >= to_timestamp($1)", since
            )
            if claimed >= count:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("workers did not claim their partitions")

    # -- publishing -----------------------------------------------------------

    async def publish_triggers(self, events: list[dict]) -> None:
        await publish_events(self.js, self.topology, iter(events))

    async def publish_raw(self, subject: str, body: bytes, msg_id: str | None = None) -> int:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await self.js.publish(subject, body, headers=headers)
        return ack.seq

    async def signal(self, execution_id: str, name: str, data=None, signal_id: str | None = None) -> int:
        body = {"v": 1, "kind": "signal", "execution_id": execution_id,
                "signal_id": signal_id or f"{name}-{time.monotonic_ns()}", "name": name, "data": data}
        return await self.publish_raw(self.topology.exec_subject(execution_id), orjson.dumps(body),
                                      msg_id=f"{execution_id}:{body['signal_id']}")

    def execution_id(self, tenant: str, workflow_id: str, event_id: str) -> str:
        return execution_id_for(tenant, workflow_id, event_id)

    # -- reading the ledger back ----------------------------------------------

    async def wait_until(self, sql: str, *args, expect, timeout: float = 60.0):
        """Poll a scalar query until it equals `expect`; returns the last value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.db.fetchval(sql, *args)
            if value == expect:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{sql!r} is {value!r}, expected {expect!r} after {timeout}s")

    async def ledger_problems(self) -> dict:
        """The ledger's invariants (ledger.check); every count must be zero."""
        return await check(self.db)

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


class Target:
    """A local HTTP endpoint that records every call and answers from a script."""

    def __init__(self):
        self.calls: list[dict] = []
        self.script: dict[str, list[int]] = {}
        #: Seconds each call to a name takes before it is answered.
        self.delay: dict[str, float] = {}
        #: The first call to a name waits until this event is set (a call the test holds in flight).
        self.hold_first: dict[str, asyncio.Event] = {}
        self.runner = None
        self.port = None

    async def start(self):
        app = web.Application()
        app.router.add_route("*", "/{name}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, request):
        name = request.match_info["name"]
        body = await request.read()
        first = not self.named(name)
        self.calls.append({"name": name, "key": request.headers.get("Idempotency-Key"),
                           "body": orjson.loads(body) if body else None, "at": time.monotonic()})
        await asyncio.sleep(self.delay.get(name, 0))
        gate = self.hold_first.get(name)
        if gate is not None and first:
            await gate.wait()
        statuses = self.script.get(name) or [200]
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return web.json_response({"ok": status < 300, "n": len(self.calls)}, status=status)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def named(self, name: str) -> list[dict]:
        return [c for c in self.calls if c["name"] == name]

    async def stop(self):
        await self.runner.cleanup()


NO_PROBLEMS = {name: 0 for name in CHECKS}
