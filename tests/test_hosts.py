"""Workers on simulated hosts: each in a network namespace of its own, reaching
NATS and Postgres over a veth pair, as separate machines reach them over a LAN.

The hosts hang off a bridge on a private /24 of their own (the host side has
`.1`, host i has `.10 + i`). The test's own nats-server listens on the
bridge's address; Postgres, which listens on loopback only, is reached through
a TCP relay bound to the same address (`PostgresRelay`). Cutting a host off is
`ip link set <its veth> down`: its packets go nowhere, its connections hang,
as a dead switch port does it.

Under load, hosts join, one is cut off for longer than a lease and comes back,
one leaves; the ledger must show no two live leases on a partition at once,
nothing lost, doubled or out of order, and the cut-off host's late commit
fenced. The hand-over times (join, stall, leave) are printed for
docs/capacity.md.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2: it skips, saying
which, where `ip netns add` is refused.
"""

import asyncio
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from harness import NO_PROBLEMS, ROOT, Harness, Load, PostgresRelay, fault_scale, with_host, worker_command

from daemon.servers import EmbeddedNats

PARTITIONS = 6
METRICS_PORT = 9464  # the same in every namespace: each has its own network stack


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _netns_refusal() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"ordo-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"`ip netns add` is not permitted here ({exc}); it needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    _ip("netns", "del", probe)
    return None


def _free_subnet() -> str:
    """The first three octets of a private /24 no route on this machine uses."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=10).stdout
    for _ in range(100):
        net = f"10.{random.randrange(100, 250)}.{random.randrange(256)}"
        if f"{net}." not in routes:
            return net
    raise RuntimeError("no free private /24 found")


@dataclass
class Hosts:
    """A bridge and `count` namespaces on it, each with its own veth pair and address."""

    count: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    net: str = field(default_factory=_free_subnet)

    @property
    def bridge(self) -> str:
        return f"obr{self.tag}"

    @property
    def gateway(self) -> str:
        """The host side's address: where NATS and the Postgres relay listen."""
        return f"{self.net}.1"

    def namespace(self, i: int) -> str:
        return f"ordo-{self.tag}-{i}"

    def veth(self, i: int) -> str:
        """The host-side end of host i's veth pair (the one a cut takes down)."""
        return f"ov{self.tag}h{i}"

    def address(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            ns, inner = self.namespace(i), f"ov{self.tag}n{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", self.veth(i), "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", self.veth(i), "master", self.bridge)
            _ip("link", "set", self.veth(i), "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Remove whatever exists of them (deleting a namespace deletes its veth pair)."""
        for i in range(self.count):
            subprocess.run(["ip", "netns", "del", self.namespace(i)], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", self.veth(i)], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def cut(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "down")

    def reconnect(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "up")


class HostWorkers:
    """One worker process per simulated host, started inside its namespace."""

    def __init__(self, h: Harness, hosts: Hosts, pg_dsn: str, logs: Path):
        self.h = h
        self.hosts = hosts
        self.pg_dsn = pg_dsn
        self.logs = logs
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, i: int) -> subprocess.Popen:
        # Metrics on every address of its namespace: the test reads them across the bridge.
        env = self.h.env(metrics_port=METRICS_PORT, metrics_host="0.0.0.0")
        env["ORDO_PG_DSN"] = self.pg_dsn
        env["ORDO_LOG_LEVEL"] = "info"
        log = open(self.logs / f"host{i}-{len(self.procs)}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.namespace(i), *worker_command()],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.procs[i] = proc
        return proc

    def name(self, i: int) -> str:
        """Its worker's name in the ledger (`ip netns exec` execs the worker: the same pid)."""
        return f"{os.uname().nodename}/{self.procs[i].pid}/w0"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# Every change of a partition's lease and every worker's registration, as the ledger makes them:
# triggers on the test's own database, so that no claim, renewal or release between two polls
# goes unseen.
_LEASE_LOG = """
CREATE TABLE public.lease_log (
    at timestamptz NOT NULL DEFAULT clock_timestamp(), partition int, old_epoch bigint, old_owner text,
    old_until timestamptz, new_epoch bigint, new_owner text, new_until timestamptz, claimed_at timestamptz);
CREATE FUNCTION public.log_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.lease_log (partition, old_epoch, old_owner, old_until, new_epoch, new_owner, new_until,
                                  claimed_at)
    VALUES (NEW.partition, OLD.epoch, OLD.owner, OLD.lease_until, NEW.epoch, NEW.owner, NEW.lease_until,
            NEW.claimed_at);
    RETURN NULL;
END $$;
CREATE TRIGGER log_lease AFTER UPDATE ON ordo.partitions FOR EACH ROW EXECUTE FUNCTION public.log_lease();
CREATE TABLE public.worker_log (name text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION public.log_worker() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.worker_log (name) VALUES (NEW.name);
    RETURN NULL;
END $$;
CREATE TRIGGER log_worker AFTER INSERT ON ordo.workers FOR EACH ROW EXECUTE FUNCTION public.log_worker();
"""


class LeaseMonitor:
    """The deployment's leases as the ledger holds them, and the log of every change to them."""

    def __init__(self, h: Harness):
        self.h = h

    async def start(self) -> None:
        await self.h.db.execute(_LEASE_LOG)

    async def owners(self) -> dict[str, list[int]]:
        """Worker -> the partitions it holds a live lease on."""
        rows = await self.h.db.fetch(
            "SELECT owner, partition FROM ordo.partitions WHERE deployment = $1 AND owner IS NOT NULL"
            " AND lease_until > now() ORDER BY partition",
            self.h.config.prefix,
        )
        owners: dict[str, list[int]] = {}
        for r in rows:
            owners.setdefault(r["owner"], []).append(r["partition"])
        return owners

    async def until_held(self, wanted: dict[str, int], timeout: float = 30.0) -> float:
        """Until exactly these workers hold these counts of live leases; returns the latest claim (epoch s)."""
        deadline = time.monotonic() + timeout
        while True:
            owners = await self.owners()
            if {o: len(ps) for o, ps in owners.items()} == wanted:
                return await self.h.db.fetchval(
                    "SELECT extract(epoch FROM max(claimed_at))::float8 FROM ordo.partitions WHERE deployment = $1",
                    self.h.config.prefix,
                )
            assert time.monotonic() < deadline, f"leases held {owners}, wanted {wanted}"
            await asyncio.sleep(0.05)

    async def registered(self, worker: str) -> float:
        """When the worker's first heartbeat registered it (epoch s)."""
        return await self.h.db.fetchval(
            "SELECT extract(epoch FROM min(at))::float8 FROM public.worker_log WHERE name = $1", worker
        )

    async def overlaps(self) -> list[str]:
        """Every claim made while the epoch before it was still leased: two live owners at once."""
        rows = await self.h.db.fetch(
            "SELECT partition, old_epoch, old_owner, old_until, new_epoch, new_owner, claimed_at FROM public.lease_log"
            " WHERE new_epoch > old_epoch AND old_owner IS NOT NULL AND old_until >= claimed_at"
        )
        return [
            f"partition {r['partition']}: epoch {r['new_epoch']} claimed by {r['new_owner']} at {r['claimed_at']}"
            f" while epoch {r['old_epoch']} of {r['old_owner']} was leased until {r['old_until']}"
            for r in rows
        ]

    async def lock_holders(self, relay: PostgresRelay) -> set[str]:
        """The hosts (addresses) whose sessions hold a lock on a partition row inside an open transaction."""
        rows = await self.h.db.fetch(
            "SELECT DISTINCT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.relation = 'ordo.partitions'::regclass AND a.state = 'idle in transaction'"
        )
        return {relay.hosts_by_port.get(r["client_port"], "?") for r in rows}

    async def claims(self) -> int:
        return await self.h.db.fetchval("SELECT count(*) FROM public.lease_log WHERE new_epoch > old_epoch")


async def _fenced_commits(address: str) -> float:
    """A live worker's ordo_fenced_commits_total, read from its metrics endpoint across the bridge."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{address}:{METRICS_PORT}/metrics", timeout=aiohttp.ClientTimeout(10)) as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith("ordo_fenced_commits_total "):
            return float(line.split()[1])
    raise AssertionError(f"no ordo_fenced_commits_total at {address}")


@pytest.fixture
def hosts():
    refusal = _netns_refusal()
    if refusal:
        pytest.skip(refusal)
    made = Hosts(3)
    try:
        made.create()
        yield made
    finally:
        made.destroy()


@asynccontextmanager
async def _servers(hosts: Hosts, tmp_path: Path, pg_server: str):
    """The test's own nats-server and a Postgres relay, both on the bridge's address."""
    upstream = urlsplit(pg_server)
    relay = PostgresRelay(hosts.gateway, upstream.hostname or "127.0.0.1", upstream.port or 5432)
    await relay.start()
    try:
        with EmbeddedNats(tmp_path / "nats", host=hosts.gateway) as nats_server:
            yield nats_server, relay
    finally:
        await relay.stop()


async def _cut_mid_commit(hosts: Hosts, i: int, monitor: LeaseMonitor, relay: PostgresRelay) -> float:
    """Cut host i off while its open commit transaction holds partition rows; returns when (epoch s).

    A cut that lands just after the commit moved on is undone at once (a blip shorter than any
    timeout: TCP resends what it dropped) and tried again.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if hosts.address(i) in await monitor.lock_holders(relay):
            cut_at = time.time()
            hosts.cut(i)
            await asyncio.sleep(0.3)
            if hosts.address(i) in await monitor.lock_holders(relay):
                return cut_at
            hosts.reconnect(i)
        await asyncio.sleep(0.002)
    raise AssertionError(f"host {i} never held a partition row in an open commit")


async def _progress(load: Load, executions: int, timeout: float = 60.0) -> None:
    """Until `executions` more have completed: the load is flowing through whoever holds what."""
    target = await load.completed() + executions
    deadline = time.monotonic() + timeout
    while await load.completed() < target:
        assert time.monotonic() < deadline, f"fewer than {executions} executions completed in {timeout} s"
        await asyncio.sleep(0.05)


async def _exited(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        return None


async def test_hosts_share_partitions_hand_them_over_and_a_cut_off_host_is_fenced(hosts, pg_dsn, tmp_path):
    async with _servers(hosts, tmp_path, pg_dsn) as (nats_server, relay):
        prefix = "h" + secrets.token_hex(5)
        h = Harness(nats_server.url, pg_dsn, prefix, partitions=PARTITIONS)
        relayed_dsn = with_host(pg_dsn, relay.host, relay.port)
        async with h:
            load = Load(h, "hosts", welcome=fault_scale(3000, 20000), waiters=fault_scale(150, 200))
            await load.prepare()
            workers = HostWorkers(h, hosts, relayed_dsn, tmp_path)
            monitor = LeaseMonitor(h)
            await monitor.start()
            try:
                lease_ttl = h.config.lease_ttl_s
                for i in (0, 1):
                    workers.start(i)
                await monitor.until_held({workers.name(0): 3, workers.name(1): 3})
                publishing = asyncio.create_task(load.publish(over_s=fault_scale(30, 90)))

                # Join: host 2 starts; the others drain and give back its share.
                await _progress(load, 200)
                workers.start(2)
                joined = await monitor.until_held({workers.name(i): 2 for i in range(3)})
                join_s = joined - await monitor.registered(workers.name(2))

                # Stall: host 1 is cut off; once its leases run out, hosts 0 and 2 take its partitions.
                await _progress(load, 200)
                cut_off = workers.procs[1]
                cut_name = workers.name(1)
                held = (await monitor.owners())[cut_name]
                # The worst moment: its commit has locked its partitions' rows (the epoch check, the
                # watermarks) and waits for its next statement, which the cut holds back.
                cut_at = await _cut_mid_commit(hosts, 1, monitor, relay)
                taken = await monitor.until_held({workers.name(0): 3, workers.name(2): 3})
                stall_s = taken - cut_at
                # Longer than a lease in all, then back: its late commit meets the new epochs.
                await asyncio.sleep(max(0.0, cut_at + 2 * lease_ttl - time.time()))
                hosts.reconnect(1)
                code = await _exited(cut_off, 60)
                log = Path(cut_off.log_path).read_text()
                assert code == 3, f"the cut-off host must stop on a fenced commit (exit {code}):\n{log[-3000:]}"
                assert "commits refused" in log
                # It comes back as a new process (systemd restarts it) and gets its share again.
                workers.start(1)
                await monitor.until_held({workers.name(i): 2 for i in range(3)})

                # Leave: host 0 drains on SIGTERM and gives its partitions back.
                await _progress(load, 200)
                leaver = workers.procs[0]
                left_at = time.time()
                leaver.send_signal(signal.SIGTERM)
                left = await monitor.until_held({workers.name(1): 3, workers.name(2): 3})
                leave_s = left - left_at
                assert await _exited(leaver, 60) == 0

                await publishing
                await load.wait_completed(timeout=180)
                # The hosts that stayed were never fenced: none committed under an epoch it had lost.
                for i in (1, 2):
                    assert await _fenced_commits(hosts.address(i)) == 0
            finally:
                workers.stop()
            print(
                f"hand-over ({PARTITIONS} partitions, lease {lease_ttl:g} s, renewal {h.config.lease_renew_s:g} s): "
                f"join {join_s:.2f} s, stall {stall_s:.2f} s (partitions {held} of the cut-off host), "
                f"leave {leave_s:.2f} s"
            )
            assert await monitor.claims() >= 2 * PARTITIONS  # every hand-over was logged
            assert await monitor.overlaps() == []
            counts = await load.verify()
            assert counts["lost"] == counts["duplicated"] == counts["out_of_order"] == 0
            assert await h.ledger_problems() == NO_PROBLEMS
