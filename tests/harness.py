"""A test's own Ordo: config on the session's servers, workers in-process or as
real processes (to kill -9), publishing, and reading the ledger back.

Every harness has its own database and subject/stream prefix (the `pg_dsn` and
`prefix` fixtures), so tests never see each other's data.

This is also the one home of whatever several test modules share (test modules
never import each other): the workflows many of them run (WELCOME, WAITER), the
injected Clock, the `ordo` command and an HTTP client, and the Fleet and Load
that the fault tests put under stress. Fixtures live in conftest.py.
"""

import asyncio
import dataclasses
import importlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import nats.js.errors
import orjson
from aiohttp import web

from bench.generator import batch_message, publish_events, trigger_event
from daemon import config as config_module
from daemon.lanes import lane_of
from daemon.topology import Topology, execution_id_for
from daemon.worker import Worker
from hotpath.vocabulary import LIMIT_GRANTED, LIMIT_WAITING
from ledger import connection, workflows
from ledger.check import CHECKS, check
from ledger.schema import migrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def observations(histogram) -> float:
    """How many values a prometheus Histogram of this process has observed."""
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))


#: What ledger_problems() returns for a sound ledger.
NO_PROBLEMS = {name: 0 for name in CHECKS}


def fault_scale(ci: int, full: int) -> int:
    """Counts for fault tests: reduced in CI (ORDO_FAULT_SCALE=ci), full otherwise when asked."""
    return full if os.environ.get("ORDO_FAULT_SCALE") == "full" else ci


# -- workflows that several test modules run ---------------------------------------

WELCOME = {
    "id": "welcome",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "greet", "type": "set", "values": {"greeting": "Hi {{contact.first_name}}"}},
        {"id": "by-country", "type": "if", "condition": {"eq": ["{{contact.country}}", "DE"]}, "then": "german"},
        {"id": "english", "type": "set", "values": {"locale": "en"}, "next": "done"},
        {"id": "german", "type": "set", "values": {"locale": "de"}},
        {"id": "done", "type": "end"},
    ],
}

WAITER = {
    "id": "waiter",
    "tenant": "acme",
    "trigger": {"event": "session.started"},
    "steps": [
        {"id": "wait", "type": "wait_for_signal", "signal": "done"},
        {"id": "finish", "type": "set", "values": {"finished": True}},
    ],
}

#: A step that fails for good at once: the SSRF guard refuses the metadata address (a dead letter).
FAILING = {
    "id": "failing",
    "tenant": "acme",
    "trigger": {"event": "order.placed"},
    "steps": [
        {
            "id": "call",
            "type": "action",
            "action": "webhook",
            "input": {"url": "http://169.254.169.254/latest"},
            "retry": {"max_attempts": 1},
        },
    ],
}


class PostgresRelay:
    """A TCP relay from `host`:<port> to the Postgres server, for hosts that cannot reach its loopback,
    or for connections to be cut without a word (`cut`)."""

    def __init__(self, host: str, upstream_host: str, upstream_port: int):
        self.host = host
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        #: Per connection relayed: set once it is cut (`cut`).
        self._cuts: list[asyncio.Event] = []
        #: Bytes passed toward Postgres so far, on all connections.
        self._sent = 0
        #: A cut to come (`cut(after_bytes=...)`): at what count of `_sent`, and the connections it cuts.
        self._cut_later: tuple[int, list[asyncio.Event]] | None = None
        #: The local port of each upstream connection -> the address of the host it relays for: what
        #: Postgres sees as a session's client_port names the host behind it.
        self.hosts_by_port: dict[int, str] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.hosts_by_port[up_writer.get_extra_info("sockname")[1]] = writer.get_extra_info("peername")[0]
        cut = asyncio.Event()
        self._cuts.append(cut)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, cut, toward_postgres=True)),
            asyncio.create_task(self._pump(up_reader, writer, cut)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)
        for w in (writer, up_writer):
            w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event, toward_postgres=False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if toward_postgres:
                    self._sent += len(data)
                    if self._cut_later is not None and self._sent >= self._cut_later[0]:
                        for later in self._cut_later[1]:
                            later.set()
                        self._cut_later = None
                if cut.is_set():
                    await asyncio.Event().wait()  # swallowed: never passed on, never closed
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    def cut(self, after_bytes: int = 0) -> None:
        """Cut the connections relayed so far without a word, as a host gone or an address moved by a
        failover leaves a client's: no byte passes either way, and nothing is closed. Later ones pass.

        `after_bytes`: not now but once that many more bytes have passed toward Postgres, so that the cut
        falls in the middle of what a client sends (a COPY). The relay's own kernel still acknowledges
        what it is sent until its buffers are full: the client then sees a zero window, not silence.
        """
        if after_bytes:
            self._cut_later = (self._sent + after_bytes, list(self._cuts))
            return
        for cut in self._cuts:
            cut.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


def with_host(dsn: str, host: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}:{port}"))


async def silence_limits(conn) -> dict[str, int]:
    """How each end of a Postgres connection (a pool's too) gives up a silent peer, read back: this end's
    socket options from the kernel, Postgres' end from its session's settings (ledger/connection.py sets both)."""
    sock = connection._tcp_socket(conn)
    assert sock is not None, "not a TCP connection: it has no keepalive to read"
    limits = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"):
        limits[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
    for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout"):
        limits[name] = int(await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", name))
    return limits


#: What `silence_limits` reads on a connection opened with `pg_tcp_timeout_s` = 8: a keepalive probe every
#: 2 s, given up after three unanswered, and 8 s for sent data to go unacknowledged, on both ends.
GIVEN_UP_AFTER_8_S = {
    "SO_KEEPALIVE": 1,
    "TCP_KEEPIDLE": 2,
    "TCP_KEEPINTVL": 2,
    "TCP_KEEPCNT": 3,
    "TCP_USER_TIMEOUT": 8000,
    "tcp_keepalives_idle": 2,
    "tcp_keepalives_interval": 2,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 8000,
}


class Clock:
    """Epoch milliseconds that move only when the test says (plus real time, slowly)."""

    def __init__(self):
        self.offset_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def advance(self, ms: int) -> None:
        self.offset_ms += ms


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
        self.nc = await nats.connect(self.config.nats_servers)
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

    def settings(self, **settings) -> dict:
        """This harness's settings that a worker process must be given: every one that differs from
        the defaults, and where its servers are."""
        config = self.config.with_(**settings)
        defaults = config_module.Config()
        return {
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(config)
            if getattr(config, field.name) != getattr(defaults, field.name)
            or field.name in ("nats_url", "pg_dsn", "prefix", *settings)
        }

    def env(self, **settings) -> dict:
        """The environment of a worker process with this harness's settings."""
        env = dict(os.environ)
        env.update((f"ORDO_{name.upper()}", str(value)) for name, value in self.settings(**settings).items())
        env["ORDO_LOG_LEVEL"] = "warning"
        return env

    def config_file(self, path: Path, **settings) -> Path:
        """This harness's settings as a worker's config file, at `path` (JSON's values are TOML's)."""
        lines = [f"{name} = {orjson.dumps(value).decode()}" for name, value in self.settings(**settings).items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def spawn_worker(self, index: int = 0, workers: int = 1, **settings) -> subprocess.Popen:
        """A worker as a real process (`ordo run --worker-index`), to be killed for real."""
        proc = subprocess.Popen(
            worker_command(index, workers),
            env=self.env(**settings),
            cwd=ROOT,
        )
        self.processes.append(proc)
        return proc

    async def partition_consumer(self, partition: int) -> str:
        """The partition's consumer under its current owner (there is one per epoch)."""
        epoch = await self.db.fetchval(
            "SELECT epoch FROM ordo.partitions WHERE deployment = $1 AND partition = $2", self.config.prefix, partition
        )
        return self.topology.partition_consumer(partition, epoch)

    async def wait_claimed(self, since: float, count: int | None = None, timeout: float = 20.0) -> None:
        """Until `count` partitions (all by default) were claimed after `since` (epoch seconds)."""
        count = self.config.partitions if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            claimed = await self.db.fetchval(
                "SELECT count(*) FROM ordo.partitions WHERE deployment = $1 AND claimed_at >= to_timestamp($2)",
                self.config.prefix,
                since,
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
        body = {
            "v": 1,
            "kind": "signal",
            "execution_id": execution_id,
            "signal_id": signal_id or f"{name}-{time.monotonic_ns()}",
            "name": name,
            "data": data,
        }
        return await self.publish_raw(
            self.topology.exec_subject(execution_id), orjson.dumps(body), msg_id=f"{execution_id}:{body['signal_id']}"
        )

    async def signal_once_waiting(self, execution_id: str, name: str) -> None:
        """Send signal `name` once the execution waits for it (a wait_for_signal step)."""
        await self.wait_until(
            "SELECT count(*) FROM ordo.executions WHERE execution_id = $1::uuid AND waiting = $2",
            execution_id,
            name,
            expect=1,
        )
        await self.signal(execution_id, name)

    def execution_id(self, tenant: str, workflow_id: str, event_id: str) -> str:
        return execution_id_for(tenant, workflow_id, event_id)

    async def enrol_waiter(self, run: str) -> str:
        """acme's WAITER (deployed, a worker running) enrolled by trigger `run`-0, and waiting: its id."""
        await self.publish_triggers([trigger_event(run, 0, tenant="acme", event_type="session.started")])
        execution_id = self.execution_id("acme", "waiter", f"{run}-0")
        await self.wait_status(execution_id, "waiting")
        return execution_id

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

    async def wait_status(self, execution_id: str, status: str, timeout: float = 30.0) -> None:
        """Until the execution has `status`; on a timeout the error shows its history and the dead letters."""
        try:
            await self.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid",
                execution_id,
                expect=status,
                timeout=timeout,
            )
        except AssertionError as exc:
            history = await self.db.fetch(
                "SELECT seq, step_id, kind, detail FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq",
                execution_id,
            )
            letters = await self.db.fetch("SELECT reason, error FROM ordo.dead_letters")
            raise AssertionError(
                f"{exc}\nhistory: {[tuple(r) for r in history]}\nletters: {[tuple(r) for r in letters]}"
            ) from None

    async def wait_timer(self, execution_id: str, purpose: str, timeout: float = 30.0) -> None:
        """Until the execution's timer row is one for `purpose` (wait, retry, event_timeout, ...)."""
        await self.wait_until(
            "SELECT purpose FROM ordo.timers WHERE execution_id = $1::uuid",
            execution_id,
            expect=purpose,
            timeout=timeout,
        )

    async def wait_drained(self, stream: str, consumer: str, timeout: float = 30.0) -> None:
        """Until the consumer has nothing pending and nothing unacked: every message stored on its
        subjects so far was delivered and settled (a worker acks only after the commit)."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.js.consumer_info(stream, consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{consumer}: {info.num_pending} pending, {info.num_ack_pending} unacked after {timeout}s"
                )
            await asyncio.sleep(0.05)

    async def lane_consumers(self) -> list[str]:
        """Each trigger lane's consumer under the current owner of the partition that serves it."""
        rows = await self.db.fetch(
            "SELECT partition, epoch FROM ordo.partitions WHERE deployment = $1", self.config.prefix
        )
        epochs = {r["partition"]: r["epoch"] for r in rows}
        t = self.topology
        return [t.lane_consumer(lane, epochs.get(lane % t.partitions, 0)) for lane in range(t.lanes)]

    async def tenant_lane_consumer(self, tenant: str) -> str:
        """The consumer of the trigger lane `tenant` is filed under, under its current owner."""
        lane = lane_of(tenant, self.topology.lanes)
        return (await self.lane_consumers())[lane]

    async def triggers_info(self) -> dict:
        """The trigger lanes' current consumers summed: num_pending, num_ack_pending, num_waiting
        (a lane whose owner has not set its consumer up yet counts its messages as pending)."""
        totals = {"num_pending": 0, "num_ack_pending": 0, "num_waiting": 0, "missing": 0}
        for lane, name in enumerate(await self.lane_consumers()):
            try:
                info = await self.js.consumer_info(self.topology.trigger_stream_of(lane), name)
            except nats.js.errors.NotFoundError:
                totals["missing"] += 1
                continue
            totals["num_pending"] += info.num_pending
            totals["num_ack_pending"] += info.num_ack_pending
            totals["num_waiting"] += info.num_waiting
        return totals

    async def wait_triggers_drained(self, timeout: float = 30.0) -> None:
        """Until every trigger published so far was taken, routed or enrolled, committed and acked."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.triggers_info()
            if info["num_pending"] == 0 and info["num_ack_pending"] == 0 and info["missing"] == 0:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"trigger lanes not drained after {timeout}s: {info}")
            await asyncio.sleep(0.05)

    async def wait_partition_drained(self, partition: int, timeout: float = 30.0) -> None:
        """Until every message on the partition's execution subjects so far was applied (or
        found a duplicate), committed and acked by its current owner."""
        await self.wait_drained(self.topology.exec_stream, await self.partition_consumer(partition), timeout)

    async def ledger_problems(self) -> dict:
        """The ledger's invariants (ledger.check); every count must be zero."""
        return await check(self.db)

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    @staticmethod
    @contextmanager
    def stopped(proc: subprocess.Popen):
        """SIGSTOP a worker for the block; should the block end with it still stopped, SIGCONT it."""
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)

    @staticmethod
    async def resume(proc: subprocess.Popen, timeout: float = 30.0) -> int:
        """SIGCONT a stopped worker and wait for it to exit: its exit code."""
        proc.send_signal(signal.SIGCONT)
        return await asyncio.to_thread(proc.wait, timeout)


def welcome_workflow(tenant: str) -> dict:
    """A tenant's one-step workflow, enrolled by its `contact.created` triggers."""
    return {
        "id": "welcome",
        "tenant": tenant,
        "trigger": {"event": "contact.created"},
        "steps": [{"id": "greet", "type": "set", "values": {"greeting": "Hi {{contact.first_name}}"}}],
    }


def engine(nats_url: str, pg_dsn: str, prefix: str, **settings) -> Harness:
    """A harness whose webhook may call loopback addresses, where the tests' Target lives
    (the webhook's SSRF guard refuses them unless allowed)."""
    return Harness(nats_url, pg_dsn, prefix, webhook_allow="127.0.0.0/8", **settings)


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
        self.calls.append(
            {
                "name": name,
                "key": request.headers.get("Idempotency-Key"),
                "body": orjson.loads(body) if body else None,
                "at": time.monotonic(),
            }
        )
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


# -- the command line and HTTP ---------------------------------------------------------


def worker_command(index: int = 0, workers: int = 1) -> list[str]:
    """The command line of one worker process: `ordo run --worker-index I --workers N`."""
    return [sys.executable, "-m", "daemon", "run", "--worker-index", str(index), "--workers", str(workers)]


def ordo(*args, env_extra=None, check=False) -> subprocess.CompletedProcess:
    """`python -m daemon ARGS...` from the repository root, as an operator runs `ordo`."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


async def worker_metric(port: int, sample: str) -> float:
    """The value of one sample (e.g. `ordo_advance_seconds_count`) of the worker serving /metrics on `port`."""
    status, _, body = await http(port, "/metrics")
    assert status == 200
    line = next(line for line in body.decode().splitlines() if line.startswith(sample + " "))
    return float(line.rsplit(" ", 1)[1])


async def http(port: int, path: str, method: str = "GET", timeout: float = 5.0, raw: bytes | None = None):
    """(status, headers text, body) of one HTTP/1.1 request to 127.0.0.1:port."""

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        return data

    data = await asyncio.wait_for(go(), timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode(), body


# -- load under faults (test_chaos, test_fault_injection) -----------------------------------

#: A killed worker's partitions are claimable when its lease runs out: keep that short.
QUICK_LEASES = {"lease_ttl_s": 2.0, "lease_renew_s": 0.3}
#: Small batches so that faults land inside batches, and a short AckWait so that
#: messages a dead connection or process held come back quickly.
LOADED = {"ack_wait_s": 2.0, "batch_max_ms": 10.0, "fetch_batch": 50, **QUICK_LEASES}
TICKS = 8


class Fleet:
    """Worker processes kept alive: one that exits is respawned, and its exit is recorded."""

    def __init__(self, h: Harness, workers: int = 2, **settings):
        self.h = h
        self.workers = workers
        self.settings = settings
        self.procs: dict = {}
        self.exits: list = []  # (worker index, exit code)
        self.kills = 0

    def start(self) -> None:
        for i in range(self.workers):
            self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def respawn_exited(self) -> None:
        for i, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                self.exits.append((i, code))
                self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def kill_one(self, rng: random.Random) -> None:
        i = rng.randrange(self.workers)
        self.h.kill(self.procs[i])
        self.kills += 1
        self.procs[i] = self.h.spawn_worker(i, self.workers, **self.settings)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
                proc.wait()


async def ledger(h: Harness) -> asyncpg.Connection:
    """The harness's ledger connection, reconnected if a Postgres restart broke it."""
    for _ in range(100):
        if h.db is not None and not h.db.is_closed():
            try:
                await h.db.fetchval("SELECT 1")
                return h.db
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pass
        try:
            h.db = await asyncpg.connect(h.config.pg_dsn, timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.2)
    raise AssertionError("cannot reach the ledger")


async def _count(h: Harness, sql: str, *args) -> int:
    for _ in range(50):
        try:
            return await (await ledger(h)).fetchval(sql, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("cannot read the ledger")


async def _retrying(publish, *args, **kwargs):
    """Publish as a Triggers service does while nats-server restarts: retry until
    JetStream acks (each message has a fixed Nats-Msg-Id, so a retry that was in
    fact stored the first time is dropped by the duplicate window)."""
    for _attempt in range(200):
        try:
            return await publish(*args, **kwargs)
        except Exception:  # timeouts, no responders, connection reconnecting
            await asyncio.sleep(0.1)
    raise AssertionError("could not publish for 20 s")


class Load:
    """WAITER executions with TICKS ordered signals each, plus WELCOME enrolments."""

    def __init__(self, h: Harness, run_id: str, welcome: int, waiters: int, trigger_batch: int = 0):
        self.h = h
        self.run_id = run_id
        #: > 0: every other round of WELCOME triggers goes out in trigger batch messages of this many events.
        self.trigger_batch = trigger_batch
        self.waiter_events = [
            trigger_event(f"{run_id}-w", i, tenant="acme", event_type="session.started") for i in range(waiters)
        ]
        self.waiter_ids = [h.execution_id("acme", "waiter", e["event_id"]) for e in self.waiter_events]
        self.events = [trigger_event(run_id, i, tenant="acme", event_type="contact.created") for i in range(welcome)]
        self.total = len(self.events) + len(self.waiter_events)

    async def prepare(self) -> None:
        """Deploy; enrol the waiters with an in-process worker until they wait."""
        await self.h.deploy(WELCOME)
        await self.h.deploy(WAITER)
        async with self.h.worker():
            await self.h.publish_triggers(self.waiter_events)
            await self.h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=len(self.waiter_events)
            )

    async def publish(self, over_s: float = 0.0) -> None:
        """Triggers and signal rounds interleaved, spread over `over_s` seconds (at once by default)."""
        rounds = TICKS + 1
        chunk = -(-len(self.events) // rounds)
        for i in range(rounds):
            events = self.events[i * chunk : (i + 1) * chunk]
            if self.trigger_batch and i % 2:
                await self._publish_batches(events)
            else:
                await self.publish_triggers(events)
            for execution_id in self.waiter_ids:
                if i < TICKS:
                    await _retrying(self.h.signal, execution_id, "tick", {"i": i}, signal_id=f"tick-{i}")
                else:
                    await _retrying(self.h.signal, execution_id, "done", None, signal_id="done")
            if over_s:
                await asyncio.sleep(over_s / rounds)

    async def publish_triggers(self, events: list[dict]) -> None:
        """Like the generator (Nats-Msg-Id = event id, a window of PubAcks), retrying what failed."""
        topology = self.h.topology
        while events:
            failed = []
            for start in range(0, len(events), 256):
                window = events[start : start + 256]
                results = await asyncio.gather(
                    *(
                        self.h.js.publish(
                            topology.trigger_subject(e["tenant"], e["type"]),
                            orjson.dumps(e),
                            headers={"Nats-Msg-Id": e["event_id"]},
                        )
                        for e in window
                    ),
                    return_exceptions=True,
                )
                failed += [e for e, r in zip(window, results, strict=True) if isinstance(r, BaseException)]
            events = failed
            if failed:
                await asyncio.sleep(0.1)

    async def _publish_batches(self, events: list[dict]) -> None:
        for start in range(0, len(events), self.trigger_batch):
            subject, body, msg_id = batch_message(self.h.topology, events[start : start + self.trigger_batch])
            await _retrying(self.h.js.publish, subject, body, headers={"Nats-Msg-Id": msg_id})

    async def completed(self) -> int:
        return await _count(self.h, "SELECT count(*) FROM ordo.executions WHERE status = 'completed'")

    async def wait_completed(self, fleet: Fleet | None = None, timeout: float = 120.0) -> float:
        """Until every execution completed (respawning exited workers); returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        done = 0
        while time.monotonic() < deadline:
            if fleet is not None:
                fleet.respawn_exited()
            done = await self.completed()
            if done == self.total:
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise AssertionError(f"{done} of {self.total} executions completed after {timeout}s")

    async def verify(self) -> dict:
        """Exactly once, completed, in order; returns the counts for the report."""
        db = await ledger(self.h)
        rows = await db.fetch("SELECT event_id, status FROM ordo.executions WHERE workflow_id = 'welcome'")
        got = sorted(r["event_id"] for r in rows)
        expected = sorted(e["event_id"] for e in self.events)
        lost = len(set(expected) - set(got))
        duplicated = len(got) - len(set(got))
        assert got == expected, f"{lost} lost, {duplicated} duplicated welcome executions"
        assert {r["status"] for r in rows} == {"completed"}
        out_of_order = 0
        seen = []
        for execution_id in self.waiter_ids:
            details = await db.fetch(
                "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'signal' ORDER BY seq",
                execution_id,
            )
            signals = [orjson.loads(d["detail"]) for d in details]
            if [s["data"]["i"] for s in signals[:-1]] != list(range(TICKS)) or signals[-1]["name"] != "done":
                out_of_order += 1
                letters = await db.fetch(
                    "SELECT reason, stream_seq FROM ordo.dead_letters WHERE execution_id = $1::uuid", execution_id
                )
                seen.append(
                    (
                        execution_id,
                        [(s.get("name"), (s.get("data") or {}).get("i")) for s in signals],
                        [tuple(r) for r in letters],
                    )
                )
        assert out_of_order == 0, f"{out_of_order} waiters saw their signals lost, doubled or out of order: {seen}"
        problems = await self.h.ledger_problems()
        assert problems == NO_PROBLEMS
        return {"executions": self.total, "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}


# -- README's how-tos, followed literally --------------------------------------------


def readme_how_to(title: str, names: set[str]) -> dict[str, str]:
    """The files of README's section `## {title}`: each a code block after a line that starts with its `name`."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    files = dict(re.findall(r"^`([\w.]+)`,[^`]*?:\n\n```\w+\n(.*?)^```", section, re.MULTILINE | re.DOTALL))
    assert set(files) == names, files
    return files


def pip_install_how_to(root: Path, project_name: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A how-to's package written under `root` as the README has it, `pip install`ed into a directory of its own.

    Returns the project's directory and the one pip installed it into.
    """
    project = root / project_name
    project.mkdir()
    for name, text in files.items():
        (project / name).write_text(text)
    target = root / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
        + ["--target", str(target), str(project)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return project, target


@contextmanager
def importable(project: Path, target: Path, monkeypatch):
    """The installed package on sys.path for one test, its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(project.parent)):
            del sys.modules[name]
    importlib.invalidate_caches()


async def assert_signals_recorded_while_limited(db, execution_id: str) -> None:
    """The history of an execution that waited its turn at a limit while signals note {n: 0, 1, 2}
    came, then made its call and waited for `go`: the three in the order sent, all before the grant."""
    rows = await db.fetch(
        "SELECT kind, detail FROM ordo.transitions WHERE execution_id = $1::uuid ORDER BY seq", execution_id
    )
    assert [r["kind"] for r in rows] == [
        "started",
        LIMIT_WAITING,
        "signal",
        "signal",
        "signal",
        LIMIT_GRANTED,
        "action_requested",
        "action_completed",
        "waiting",
        "signal",
        "completed",
    ]
    notes = [orjson.loads(r["detail"])["data"] for r in rows if r["kind"] == "signal"][:3]
    assert notes == [{"n": 0}, {"n": 1}, {"n": 2}]
