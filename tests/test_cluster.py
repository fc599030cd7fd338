"""Ordo on a three-node NATS cluster with replicated (R3) streams.

The cluster is the test's own (daemon.servers.EmbeddedNatsCluster: three
nats-servers from the wheel on loopback ports, in tmp_path), never the
session's server. The failover test kills the node that leads the execution
stream while two worker processes are under load, restarts it later, and ends
with the exact check that every execution exists once, completed, with its
signals in publish order, and with `ordo check`'s invariants at zero. Counts
are CI-sized; ``ORDO_FAULT_SCALE=full pytest -n 0 -s tests/test_cluster.py`` runs
the full ones and prints the stall the failover caused.
"""

import asyncio
import time

import nats as nats_py
import pytest
from harness import LOADED, Fleet, Harness, Load, fault_scale, ordo

from daemon.config import Config
from daemon.servers import EmbeddedNatsCluster
from daemon.topology import StreamSetupError, Topology


@pytest.fixture
async def cluster(tmp_path):
    nodes = EmbeddedNatsCluster(tmp_path / "nats", 3)
    await asyncio.to_thread(nodes.start)
    try:
        yield nodes
    finally:
        await asyncio.to_thread(nodes.stop)


async def _replicas(h: Harness) -> dict[str, int]:
    t = h.topology
    names = (t.triggers_stream, t.exec_stream, t.dlq_stream, t.actions_stream)
    return {name: (await h.js.stream_info(name)).config.num_replicas for name in names}


async def test_streams_take_the_configured_replicas_and_an_r1_deployment_moves_to_r3(cluster, pg_dsn, prefix):
    async with Harness(cluster.url, pg_dsn, prefix) as h:
        assert set((await _replicas(h)).values()) == {1}
        await Topology(h.config.with_(stream_replicas=3)).ensure(h.js)
        assert set((await _replicas(h)).values()) == {3}
        # The new copies catch up and the stream elects a leader among the three.
        deadline = time.monotonic() + 20
        while True:
            info = (await h.js.stream_info(h.topology.exec_stream)).cluster
            peers = [info.leader] + [r.name for r in info.replicas or () if r.current]
            if sorted(peers, key=str) == ["n0", "n1", "n2"]:
                break
            assert time.monotonic() < deadline, f"the stream's copies did not form: {info}"
            await asyncio.sleep(0.1)


async def test_streams_are_placed_on_the_servers_with_the_configured_tags(tmp_path, prefix):
    tagged = EmbeddedNatsCluster(tmp_path / "tagged", 3, tags=[("az:a",), ("az:b",), ("az:c",)])
    await asyncio.to_thread(tagged.start)
    try:
        nc = await nats_py.connect(tagged.urls)
        try:
            js = nc.jetstream(timeout=10)
            config = Config(prefix=prefix, stream_placement="az:b")
            await Topology(config).ensure(js)
            info = await js.stream_info(Topology(config).exec_stream)
            assert info.config.placement.tags == ["az:b"]
            assert info.cluster.leader == "n1" and not info.cluster.replicas
            with pytest.raises(StreamSetupError, match="az:z.*stream_placement"):
                await Topology(config.with_(prefix=f"{prefix}z", stream_placement="az:z")).ensure(js)
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(tagged.stop)


def test_nats_url_names_every_node_of_a_cluster():
    config = Config(nats_url="nats://a:4222, nats://b:4222,nats://c:4222")
    assert config.nats_servers == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert Config(nats_url="nats://a:4222").nats_servers == ["nats://a:4222"]


async def test_ordo_dev_cluster_runs_the_demo_on_three_nodes_with_r3_streams(tmp_path, pg_dsn):
    result = await asyncio.to_thread(
        ordo,
        "dev",
        "--cluster",
        "3",
        "--demo",
        "300",
        "--workers",
        "1",
        "--data-dir",
        str(tmp_path),
        env_extra={"ORDO_PG_DSN": pg_dsn, "ORDO_NATS_URL": "", "ORDO_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in ("n0", "n1", "n2"):
        assert f"node {node})" in result.stdout
    assert "streams with 3 replicas" in result.stdout
    assert "executions   300 (300 completed, 0 failed)" in result.stdout


async def test_more_replicas_than_the_server_can_hold_is_refused_naming_the_setting(nats, prefix):
    topology = Topology(Config(prefix=prefix, stream_replicas=3))
    with pytest.raises(StreamSetupError, match="3 replica.*stream_replicas.*non-clustered"):
        await topology.ensure(nats.jetstream())


async def _leader(h: Harness, stream: str) -> tuple[str, float]:
    """The stream's leader and since when (epoch s), asked again while the cluster elects one."""
    deadline = time.monotonic() + 30
    while True:
        try:
            cluster = (await asyncio.wait_for(h.js.stream_info(stream), 2)).cluster
            if cluster.leader:
                return cluster.leader, cluster.leader_since.timestamp()
        except Exception:  # timeouts, no responders, the connection failing over
            pass
        assert time.monotonic() < deadline, f"{stream} has no leader after 30 s"
        await asyncio.sleep(0.1)


class Progress:
    """Completed executions sampled every 20 ms: the longest time without one more is the stall."""

    def __init__(self, load: Load):
        self.load = load
        self.samples: list[tuple[float, int]] = []

    async def watch(self, fleet: Fleet) -> None:
        """Sample (the only reader of the ledger meanwhile), respawning a worker that exited."""
        while True:
            fleet.respawn_exited()
            self.samples.append((time.monotonic(), await self.load.completed()))
            await asyncio.sleep(0.02)

    async def reach(self, at_least: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.samples or self.samples[-1][1] < at_least:
            assert time.monotonic() < deadline, f"no progress to {at_least}: {self.samples[-1:]}"
            await asyncio.sleep(0.02)

    def longest_stall(self, since: float) -> float:
        """The longest time after `since` that the count stood still, until the last execution completed."""
        longest, last_change, last_count = 0.0, since, None
        for at, count in self.samples:
            if at < since:
                last_count = count
                continue
            if count != last_count:
                longest = max(longest, at - last_change)
                last_change, last_count = at, count
        return longest


async def test_killing_the_stream_leaders_node_under_load_loses_duplicates_and_reorders_nothing(
    cluster, pg_dsn, prefix
):
    welcome = fault_scale(ci=3000, full=30000)
    async with Harness(cluster.url, pg_dsn, prefix, stream_replicas=3, **LOADED) as h:
        load = Load(h, "fo", welcome, waiters=20)
        await load.prepare()
        fleet = Fleet(h, 2)
        fleet.start()
        progress = Progress(load)
        watcher = asyncio.create_task(progress.watch(fleet))
        # Triggers and signal rounds go on being published through the kill.
        publishing = asyncio.create_task(load.publish(over_s=fault_scale(ci=6, full=20)))
        try:
            await progress.reach(len(load.waiter_events) + welcome // 4)
            leader, _ = await _leader(h, h.topology.exec_stream)
            triggers_leader, _ = await _leader(h, h.topology.triggers_stream)
            node = cluster.node_named(leader)
            killed_at, killed_at_wall = time.monotonic(), time.time()
            node.kill()
            await progress.reach(len(load.waiter_events) + welcome // 2)
            new_leader, elected = await _leader(h, h.topology.exec_stream)
            await asyncio.to_thread(node.start)
            await asyncio.to_thread(cluster.wait_healthy)
            await publishing
            await progress.reach(load.total, timeout=120)
            finished = time.monotonic()
        finally:
            publishing.cancel()
            watcher.cancel()
            fleet.stop()
        numbers = await load.verify()
        stall = progress.longest_stall(killed_at)
        print(
            f"\nkilled {leader} (exec stream leader; triggers' was {triggers_leader}), "
            f"new leader {new_leader} elected {elected - killed_at_wall:.1f} s after the kill; "
            f"longest stall after the kill {stall * 1000:.0f} ms, "
            f"all done {finished - killed_at:.1f} s after it; worker exits {fleet.exits}; {numbers}"
        )
        assert new_leader != leader
        assert fleet.exits == [], f"workers exited when a NATS node died: {fleet.exits}"
