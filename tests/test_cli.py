"""The `ordo` command line against real servers, as an operator would use it."""

import asyncio
import json
import os
import socket

import orjson
import pytest
from harness import GIVEN_UP_AFTER_8_S, WAITER, Harness, ordo, silence_limits

from bench.generator import trigger_event
from daemon.config import Config


def test_validate_points_at_the_offending_step(tmp_path):
    bad = dict(
        WAITER,
        steps=[
            {"id": "wait", "type": "wait_for_signal"},
            {"id": "go", "type": "if", "condition": {"eq": ["{{contact.x}}", 1]}, "then": "nowhere"},
        ],
    )
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(bad))
    result = ordo("workflow", "validate", str(path))
    assert result.returncode == 1
    assert "steps[0] (id 'wait')" in result.stderr and "'signal'" in result.stderr
    assert "steps[1] (id 'go'): 'then' points at unknown step 'nowhere'" in result.stderr


async def test_migrate_and_deploy_are_idempotent(pg_dsn, tmp_path):
    env = {"ORDO_PG_DSN": pg_dsn}
    first = ordo("migrate", env_extra=env)
    assert first.returncode == 0 and "applied: 001_initial.sql" in first.stdout
    again = ordo("migrate", env_extra=env)
    assert again.returncode == 0 and "up to date" in again.stdout

    path = tmp_path / "waiter.json"
    path.write_bytes(orjson.dumps(WAITER))
    assert "deployed as version 1" in ordo("workflow", "deploy", str(path), env_extra=env).stdout
    assert "unchanged as version 1" in ordo("workflow", "deploy", str(path), env_extra=env).stdout
    changed = dict(WAITER, name="renamed")
    path.write_bytes(orjson.dumps(changed))
    assert "deployed as version 2" in ordo("workflow", "deploy", str(path), env_extra=env).stdout
    listed = ordo("workflow", "list", env_extra=env).stdout
    assert "acme/waiter  latest v2  (2 versions)" in listed


async def test_a_running_execution_keeps_the_version_it_started_on(nats_server_url, pg_dsn, prefix):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker() as worker:
            await h.publish_triggers([trigger_event("ver", 1, tenant="acme", event_type="session.started")])
            old = h.execution_id("acme", "waiter", "ver-1")
            await h.wait_until(
                "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", old, expect="waiting"
            )
            v2 = dict(
                WAITER,
                steps=[
                    {"id": "wait", "type": "wait_for_signal", "signal": "done"},
                    {"id": "v2-only", "type": "set", "values": {"v2": True}},
                ],
            )
            assert await h.deploy(v2) == 2
            # The worker reloads on the deploy's NOTIFY; new enrolments take v2.
            for _ in range(100):
                if worker.registry.version("acme", "waiter", 2) is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the worker did not pick up version 2")
            await h.publish_triggers([trigger_event("ver", 2, tenant="acme", event_type="session.started")])
            new = h.execution_id("acme", "waiter", "ver-2")
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'waiting'", expect=2)
            await h.signal(old, "done", {})
            await h.signal(new, "done", {})
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=2)
        rows = {
            r["execution_id"]: r
            for r in await h.db.fetch("SELECT execution_id::text, workflow_version, context FROM ordo.executions")
        }
        assert rows[old]["workflow_version"] == 1
        assert json.loads(rows[old]["context"]).get("v2") is None
        assert rows[new]["workflow_version"] == 2
        assert json.loads(rows[new]["context"])["v2"] is True

    # `ordo execution show` reads the same row and its history back through the ledger's functions.
    shown = ordo("execution", "show", old, "--json", env_extra={"ORDO_PG_DSN": pg_dsn})
    assert shown.returncode == 0, shown.stderr
    doc = orjson.loads(shown.stdout)
    assert (doc["execution_id"], doc["workflow_version"], doc["status"]) == (old, 1, "completed")
    assert [t["seq"] for t in doc["transitions"]] == list(range(1, len(doc["transitions"]) + 1))
    assert doc["transitions"][0]["kind"] == "started" and doc["transitions"][-1]["kind"] == "completed"
    text = ordo("execution", "show", old, env_extra={"ORDO_PG_DSN": pg_dsn}).stdout
    assert text.startswith(f"execution {old}  acme/waiter v1") and "status completed" in text
    missing = ordo("execution", "show", "00000000-0000-0000-0000-000000000000", env_extra={"ORDO_PG_DSN": pg_dsn})
    assert missing.returncode == 1 and "no execution" in missing.stderr


def _debian_nats_version() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1) as sock:
            info = json.loads(sock.recv(4096).decode().split(" ", 1)[1])
            return info["version"]
    except (OSError, ValueError, IndexError, KeyError):
        return None


def test_a_worker_refuses_a_nats_server_older_than_2_10(pg_dsn):
    version = _debian_nats_version()
    if version is None or tuple(int(x) for x in version.split("-")[0].split(".")) >= (2, 10):
        pytest.skip("no nats-server older than 2.10 listens on 127.0.0.1:4222 to try this against")
    result = ordo(
        "run",
        "--worker-index",
        "0",
        "--workers",
        "1",
        env_extra={"ORDO_NATS_URL": "nats://127.0.0.1:4222", "ORDO_PG_DSN": pg_dsn},
    )
    assert result.returncode != 0
    assert version in result.stderr and "2.10.0" in result.stderr
    assert "Traceback" not in result.stderr


async def test_dev_is_ready_once_workers_started_after_it_own_every_partition(pg_dsn):
    """`ordo dev` (and the bench) wait for fresh claims, counted on the ledger's clock through ledger.leases."""
    import asyncpg

    from daemon.config import Config
    from daemon.dev import wait_for_workers
    from ledger import leases
    from ledger.schema import migrate

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            await leases.create_partitions(conn, "ordo", 4)
            await leases.claim(conn, "ordo", "old", 60.0, 4, 4, "stream-a")
            since = await leases.ledger_clock(conn)
            assert await leases.partitions_claimed_since(conn, "ordo", since) == {}
            for partition in range(4):
                await leases.release(conn, "ordo", "old", partition, 1)
            await leases.claim(conn, "ordo", "w0", 60.0, 2, 4, "stream-a")
            await leases.claim(conn, "ordo", "w1", 60.0, 2, 4, "stream-a")
            assert await leases.partitions_claimed_since(conn, "ordo", since) == {"w0": 2, "w1": 2}
        await wait_for_workers(pool, Config(partitions=4), since, workers=2, timeout=5.0)
        with pytest.raises(RuntimeError, match="3 worker"):
            await wait_for_workers(pool, Config(partitions=4), since, workers=3, timeout=0.5)
    finally:
        await pool.close()


async def test_a_commands_ledger_connection_is_given_up_after_pg_tcp_timeout_s_of_silence(pg_dsn):
    """`ordo`'s commands on the ledger (migrate, inspect, dlq, export, ...) opened their connection with asyncpg
    alone: no keepalive on either end, so one cut without a word held the command for minutes, or for good.
    It is opened as a worker's is."""
    from daemon.cli import _on_ledger

    seen = []

    async def work(conn) -> int:
        seen.append(await silence_limits(conn))
        return 0

    # In a thread: _on_ledger runs its own event loop, as the command does.
    assert await asyncio.to_thread(_on_ledger, Config(pg_dsn=pg_dsn, pg_tcp_timeout_s=8), work) == 0
    assert seen == [GIVEN_UP_AFTER_8_S]


async def test_devs_ledger_connections_are_given_up_after_pg_tcp_timeout_s_of_silence(
    nats_server_url, pg_dsn, prefix, tmp_path, monkeypatch
):
    """`ordo dev` opened its connections (the one that migrates and deploys the examples, the pool that waits
    for the workers and runs the demo) with asyncpg alone: no keepalive on either end. They are opened as a
    worker's are. Read on each, with no workers started (theirs are the worker's own)."""
    from daemon import dev

    seen = {}
    migrate = dev.migrate

    async def read_then_migrate(conn) -> None:
        seen["prepare"] = await silence_limits(conn)
        await migrate(conn)

    async def read_the_pool(config, pool, events) -> int:
        async with pool.acquire() as conn:
            seen["pool"] = await silence_limits(conn)
        return 0

    class NoWorkers:
        def __init__(self, workers, extra_env=None):
            pass

        def start(self) -> None:
            pass

        async def watch(self) -> None:
            pass

        async def stop_async(self) -> bool:
            return True

    async def ready_at_once(pool, config, since, workers) -> None:
        pass

    monkeypatch.setattr(dev, "migrate", read_then_migrate)
    monkeypatch.setattr(dev, "run_demo", read_the_pool)
    monkeypatch.setattr(dev, "Supervisor", NoWorkers)
    monkeypatch.setattr(dev, "wait_for_workers", ready_at_once)
    config = Config(nats_url=nats_server_url, pg_dsn=pg_dsn, prefix=prefix, pg_tcp_timeout_s=8)
    assert await dev.run_dev(config, demo=1, workers=1, data_dir=str(tmp_path)) == 0
    assert seen == {"prepare": GIVEN_UP_AFTER_8_S, "pool": GIVEN_UP_AFTER_8_S}


async def test_deploy_and_validate_refuse_a_subject_type_no_worker_has_registered(pg_dsn, tmp_path):
    env = {"ORDO_PG_DSN": pg_dsn}
    assert ordo("migrate", env_extra=env).returncode == 0
    deals = dict(WAITER, id="deals", subject="opportunity", trigger={"event": "opportunity.updated"})
    path = tmp_path / "deals.json"
    path.write_bytes(orjson.dumps(deals))
    for action in ("validate", "deploy"):
        refused = ordo("workflow", action, str(path), env_extra=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "context type 'opportunity' is not registered (registered: contact)" in refused.stderr

    # Registered through the setting, as the workers would have it, the same file passes.
    (tmp_path / "crm_types.py").write_text(
        "from hotpath.context_types import ContextType\n"
        "OPPORTUNITY = ContextType('opportunity', {'type': 'object', 'required': ['id']})\n"
    )
    registered = dict(
        env,
        ORDO_CONTEXT_TYPE_PLUGINS="crm_types:OPPORTUNITY",
        PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p),
    )
    assert ordo("workflow", "validate", str(path), env_extra=registered).returncode == 0
    deployed = ordo("workflow", "deploy", str(path), env_extra=registered)
    assert deployed.returncode == 0 and "deployed as version 1" in deployed.stdout
