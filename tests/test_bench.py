"""The bench suite works: each scenario run tiny end to end, and the histogram's
percentiles against exact ones. Benchmarks are not tests: nothing here asserts
on speed.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from harness import ROOT, WAITER, Harness
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as PromHistogram

from bench import report, soak, storage, worker_counts
from bench.generator import PubAcks, publish_events, trigger_event
from bench.histogram import PRECISION, Histogram, _bounds, _index
from bench.scenarios import Checks, Verification, check_routing
from daemon import config as config_module
from daemon import metrics
from daemon.topology import Topology
from ledger import run_checks
from ledger.runs import TableSize, WalCounters


async def _bench(nats_url: str, pg_dsn: str, *argv: str, timeout: float = 240.0) -> tuple[int, dict | None, str]:
    env = dict(os.environ, ORDO_NATS_URL=nats_url, ORDO_PG_DSN=pg_dsn, ORDO_LOG_LEVEL="warning")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    try:
        doc = orjson.loads(out)
    except orjson.JSONDecodeError:
        doc = None
    return proc.returncode, doc, err.decode(errors="replace") + out.decode(errors="replace")


# -- end to end ---------------------------------------------------------------------


#: How the generator publishes: its default, or trigger batch messages (contract 1.1).
PACKING = pytest.mark.parametrize("packing", [(), ("--trigger-batch", "50")], ids=["default", "trigger-batches"])


@PACKING
async def test_w1_closed_mode_verifies_every_execution(nats_server_url, pg_dsn, packing):
    code, doc, output = await _bench(nats_server_url, pg_dsn, "w1", "-n", "200", "--workers", "1", "--json", *packing)
    assert code == 0, output
    assert doc is not None, output
    assert doc["ok"] and doc["verified"] and doc["complete"]
    assert doc["config"]["trigger_batch"] == (50 if packing else 0)
    assert doc["config"]["workers"] == 1 and doc["config"]["servers"] == "configured"
    assert doc["machine"]["cores"] >= 1
    (run,) = doc["runs"]
    assert run["mode"] == "closed"
    assert run["published"] == 200 and run["executions"] == 200 and run["steps"] == 1000
    assert run["verification"]["problems"] == [] and run["verification"]["other_deployment_letters"] == 0
    assert run["latency"]["count"] == 200
    assert sum(run["completions_per_s"]) == 200
    assert run["executions_per_s"] > 0 and run["steps_per_s"] == pytest.approx(5 * run["executions_per_s"])
    assert run["resources"]["workers"]["processes"] == 1
    cost = run["cpu_us_per_execution"]  # the groups the bench sees (here workers and generator: servers configured)
    assert cost["workers"] > 0 and cost["all"] == pytest.approx(sum(v for k, v in cost.items() if k != "all"))
    assert run["stored_latency"] is None and run["engine_latency"] is None  # no schedule to measure from
    # The worker's own view of its ledger commits: per execution at least its unit,
    # its executions row and one history row (all five steps of one commit).
    commits = run["commits"]
    assert commits["batches"] >= 1 and commits["rows_per_batch"] * commits["batches"] >= 200 * 3
    assert 0 < commits["p50_le_ms"] <= commits["p99_le_ms"]
    assert doc["median"]["runs"] == 1
    # What the run wrote: the test server is shared, and the result says so.
    _assert_storage_is_plausible(run["storage"], executions=200, shared=True)
    assert run["storage"]["wal"]["bytes_per_action_step"] is None  # w1's steps are not actions
    assert doc["median"]["wal_bytes_per_execution"] == run["storage"]["wal"]["bytes_per_execution"]


def test_cpu_per_event_is_each_groups_cores_over_the_events_per_second():
    resources = {"workers": {"cpu_percent": 50.0}, "nats": {"cpu_percent": 40.0}, "postgres": {"cpu_percent": 0.2}}
    assert report.cpu_per_event(resources, 2000) == pytest.approx(
        {"workers": 250.0, "nats": 200.0, "postgres": 1.0, "all": 451.0}
    )
    assert report.cpu_per_event(resources, 0) is None and report.cpu_per_event({}, 2000) is None
    # Groups under half a percent of a core are left out of the line, not of the sum above.
    assert report.cores_line(resources) == "0.90 cores (workers 0.50, nats 0.40)"


def test_w7_noisy_costs_the_quiet_load_alone_per_quiet_event():
    """The window before the burst (less its first second) holds the quiet load alone: its cores over
    the quiet tenants' events/s; the drain's window gives the cores used meanwhile."""
    from bench.scenarios import NoisyNeighbour

    windows = []

    def usage(since, until):
        windows.append((since, until))
        return {"workers": {"cpu_percent": 50.0 if until == 110.0 else 150.0}, "nats": {"cpu_percent": 50.0}}

    class Run:
        pass

    run = Run()
    run.usage = usage
    scenario = NoisyNeighbour({"quiet_tenants": 4, "quiet_rate": 250.0})
    cpu = scenario._cpu(run, first_publish=100.0, burst_start=110.0, burst_end=130.0)
    assert windows == [(101.0, 110.0), (110.0, 130.0)]
    assert cpu["quiet_cpu_us_per_event"] == pytest.approx({"workers": 500.0, "nats": 500.0, "all": 1000.0})
    assert cpu["quiet_event_cpu_us"] == pytest.approx(1000.0)
    assert cpu["burst_resources"]["workers"]["cpu_percent"] == 150.0
    lines = NoisyNeighbour._cpu_lines(cpu)
    assert "the quiet load alone 1.00 cores (workers 0.50, nats 0.50): 1,000 µs per quiet event" in lines[0]
    assert "while A's burst drained 2.00 cores (workers 1.50, nats 0.50)" in lines[1]
    run.usage = None
    assert scenario._cpu(run, 100.0, 110.0, 130.0) == {}


def _assert_storage_is_plausible(found: dict, executions: int, shared: bool) -> None:
    """Present and self-consistent; no sizes asserted, since other traffic on the server is counted too."""
    assert found["executions"] == executions
    wal = found["wal"]
    assert wal["cluster_wide"] and wal["includes_other_traffic"] is shared
    assert wal["source"] in ("pg_stat_wal", "pg_current_wal_lsn")
    assert wal["bytes"] > 0 and wal["lsn_bytes"] > 0 and wal["checkpoints"] >= 0
    assert wal["bytes_per_execution"] == pytest.approx(wal["bytes"] / executions)
    if wal["source"] == "pg_stat_wal":
        assert wal["records"] > 0 and 0 <= wal["fpi"] <= wal["records"]
        assert wal["records_per_execution"] == pytest.approx(wal["records"] / executions)
        assert 0 <= wal["fpi_share_of_records"] <= 1
    ledger = found["ledger"]
    tables = ledger["tables"]
    assert set(tables) <= LEDGER_TABLES, tables
    assert ledger["table_bytes"] == sum(t["table_bytes"] for t in tables.values())
    assert ledger["index_bytes"] == sum(t["index_bytes"] for t in tables.values())
    assert ledger["bytes_per_execution"] == pytest.approx((ledger["table_bytes"] + ledger["index_bytes"]) / executions)
    for size in tables.values():
        assert size["table_bytes"] % 8192 == 0 and size["index_bytes"] % 8192 == 0  # whole pages


#: The ledger's tables: those its migrations create (a handwritten list missed migration 023's
#: lane_floors, which a run reports once a worker has recorded a floor), and the migrations' own.
LEDGER_TABLES = {
    name
    for path in (Path(ROOT) / "ledger" / "migrations").glob("*.sql")
    for name in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?ordo\.(\w+)", path.read_text())
} | {"schema_migrations"}


@PACKING
async def test_w1_open_mode_measures_latency_from_the_schedule(nats_server_url, pg_dsn, packing):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w1", "--rate", "200", "--duration", "2", "--workers", "1", "--json", *packing
    )
    assert code == 0, output
    (run,) = doc["runs"]
    assert run["mode"] == "open" and run["offered_rate"] == 200
    assert run["executions"] == 400 and run["verified"]
    lat = run["latency"]
    assert lat["count"] == 400
    assert 0 <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # The generator's share: every event's intended send time -> its PubAck.
    stored = run["stored_latency"]
    assert stored["count"] == 400
    assert 0 <= stored["p50_ms"] <= stored["p99_ms"] <= stored["max_ms"]
    # The engine's share, PubAck -> committed, matched per event.
    engine = run["engine_latency"]
    assert engine["count"] == 400
    assert 0 <= engine["p50_ms"] <= engine["p99_ms"] <= engine["max_ms"] <= lat["max_ms"]
    # Worker memory over the run, not only its ends.
    rss = run["workers_rss_mb"]
    assert len(rss) >= 2 and all(mb > 0 for _, mb in rss)
    assert [t for t, _ in rss] == sorted(t for t, _ in rss)
    # The ledger's size is sampled from the first publish on (a soak's disk use); two seconds hold no minute.
    assert run["ledger_mb"] and all(mb > 0 for _, mb in run["ledger_mb"])
    assert run["soak"] is None


async def test_repeat_reports_each_run_and_the_median(nats_server_url, pg_dsn):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w1", "-n", "50", "--workers", "1", "--repeat", "2", "--json"
    )
    assert code == 0, output
    assert len(doc["runs"]) == 2 and doc["median"]["runs"] == 2
    assert doc["runs"][0]["run_id"] != doc["runs"][1]["run_id"]
    assert doc["runs"][0]["prefix"] != doc["runs"][1]["prefix"]
    assert all(run["executions"] == 50 and run["verified"] for run in doc["runs"])


def _interrupt_repeatedly(pid: int, times: int) -> None:
    for _ in range(times):
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:  # it has exited (and been reaped)
            return
        time.sleep(0.0005)


async def test_an_interrupt_during_the_interrupt_still_stops_every_worker(nats_server_url, pg_dsn):
    """Ctrl-C pressed again while the bench stops its run must not cut the stop short: the second
    interrupt once cancelled the clean-up before it stopped the workers, and they ran on (on embedded
    servers, reconnecting for ever). The signals go to the bench alone: a worker stops only if it is stopped."""
    psutil = pytest.importorskip("psutil")
    env = dict(os.environ, ORDO_NATS_URL=nats_server_url, ORDO_PG_DSN=pg_dsn, ORDO_LOG_LEVEL="warning")
    # Open mode, so that the generator is still publishing when the interrupts come.
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench", "w1", "--rate", "200", "--duration", "600", "--workers", "2"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    workers = []
    rest = None
    try:
        lines = []
        # The first progress line comes once every worker owns its partitions.
        while not any(b" published " in line for line in lines):
            line = await asyncio.wait_for(proc.stderr.readline(), 120)
            assert line, b"".join(lines).decode(errors="replace")
            lines.append(line)
        workers = [p for p in psutil.Process(proc.pid).children() if p.cmdline()[1:4] == ["-m", "daemon", "run"]]
        assert len(workers) == 2
        # One interrupt, and more while it is being handled (a Ctrl-C pressed again and again), so
        # that some land while the clean-up awaits the generator's exit, the first thing it awaits.
        rest = asyncio.create_task(proc.stderr.read())  # so that its output never fills the pipe
        await asyncio.to_thread(_interrupt_repeatedly, proc.pid, 200)
        await asyncio.wait_for(proc.wait(), 120)
        running = [p.pid for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert running == [], f"workers {running} outlived the interrupted bench"
        output = b"".join(lines).decode(errors="replace") + (await asyncio.wait_for(rest, 30)).decode(errors="replace")
        assert proc.returncode == 130, output
        assert "interrupted" in output
    finally:
        for p in [proc, *workers]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        await proc.wait()
        if rest is not None:
            await asyncio.wait_for(rest, 30)


async def test_w2_signals_apply_in_publish_order(nats_server_url, pg_dsn):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w2-signals", "-n", "50", "--signals", "5", "--workers", "1", "--json"
    )
    assert code == 0, output
    assert doc["ok"] and doc["config"]["options"] == {"signals": 5}
    (run,) = doc["runs"]
    assert run["executions"] == 50 and run["published"] == 50 + 250
    check = run["verification"]
    assert check["problems"] == []
    assert check["in_publish_order"] == check["exact_signals"] == check["completed"] == 50
    assert check["source_seq_regressions"] == 0
    metrics = run["metrics"]
    assert metrics["applied_signals"] == metrics["signals_published"] == 250
    assert metrics["applied_per_s"] > 0


async def test_w9_mix_completes_every_kind_and_accounts_for_every_signal(nats_server_url, pg_dsn):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w9-mix", "-n", "200", "--wait", "1-3", "--signals", "2", "--signal-delay", "0.5",
        "--workers", "1", "--json",
    )  # fmt: skip
    assert code == 0, output
    (run,) = doc["runs"]
    check = run["verification"]
    assert check["problems"] == [] and check["completed"] == 200 and check["timers_left"] == 0
    metrics = run["metrics"]
    signalled = metrics["signals_published"] // 2
    assert signalled > 0 and metrics["signals_published"] == 2 * signalled
    assert metrics["signals_recorded"] + metrics["signals_dead_lettered"] == metrics["signals_published"]
    assert check["signals_out_of_order"] == 0
    assert run["published"] == 200 + metrics["signals_published"]


async def test_a_message_that_went_to_another_deployment_fails_the_runs_checks(nats_server_url, pg_dsn, prefix):
    """A run is one deployment: an `other_deployment` dead letter, of a message its workers took from its
    execution stream or of one for its workflow's execution, fails its checks by name, whatever its
    scenario's own checks found; the dead letters a retention run counts leave it to this check."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker():
            execution_id = await h.enrol_waiter("astray")

            def verified() -> list:
                checks = Checks(1)
                checks.add("completed", 1, 1)
                return [checks, Verification(1, 1, 1, 1, 1, 1)]

            for verification in verified():
                await check_routing(h.db, verification, h.topology.exec_stream, "waiter")
                assert verification.ok and verification.as_dict()["other_deployment_letters"] == 0

            # The execution is another deployment's: this one's worker dead-letters a signal for it.
            await h.db.execute(
                "UPDATE ordo.executions SET deployment = 'elsewhere' WHERE execution_id = $1::uuid", execution_id
            )
            await h.signal(execution_id, "done")
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters WHERE reason = 'other_deployment'", expect=1)
        assert await run_checks.other_deployment_letters(h.db, h.topology.exec_stream, None) == 1
        assert await run_checks.other_deployment_letters(h.db, "ELSEWHERE_EXEC", "waiter") == 1
        assert await run_checks.other_deployment_letters(h.db, "ELSEWHERE_EXEC", "welcome") == 0
        for verification in verified():
            await check_routing(h.db, verification, h.topology.exec_stream, "waiter")
            assert not verification.ok
            assert verification.problems() == ["other_deployment_letters 1 (expected 0)"]
            assert verification.as_dict()["other_deployment_letters"] == 1
        assert (await run_checks.retained_run(h.db))["dead_letters"] == 0


async def test_w3_timers_fire_and_report_lateness(nats_server_url, pg_dsn):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w3-timers", "-n", "200", "--wait", "1-3", "--workers", "1", "--json"
    )
    assert code == 0, output
    (run,) = doc["runs"]
    assert run["executions"] == 200 and run["verified"], run["verification"]
    assert run["verification"]["expected_history"] == 200 and run["verification"]["timers_left"] == 0
    metrics = run["metrics"]
    assert metrics["fires"] == 200 and metrics["enrolled"] == 200 and metrics["wait_s"] == "1-3"
    # Lateness is measured from the intended fire time: a timer never fires early.
    assert 0 <= metrics["fired_min_ms"] <= metrics["fired_p50_ms"] <= metrics["fired_p99_ms"] <= metrics["fired_max_ms"]
    assert metrics["committed_p50_ms"] >= metrics["fired_p50_ms"]
    assert 0 <= metrics["peak_waiting"] <= 200 and metrics["workers_rss_max_mb"] > 0


async def test_w4_retries_match_the_provider_and_the_dead_letters(nats_server_url, pg_dsn):
    from bench.provider import fails_permanently

    code, doc, output = await _bench(
        nats_server_url,
        pg_dsn,
        "w4-retries",
        "-n",
        "200",
        "--transient",
        "0.1",
        "--permanent",
        "0.03",
        "--workers",
        "1",
        "--json",
    )
    assert code == 0, output
    (run,) = doc["runs"]
    doomed = sum(fails_permanently(f"{run['run_id']}-{i}", 0.03) for i in range(200))
    check = run["verification"]
    assert check["problems"] == [] and check["failed_are_the_permanent_ones"]
    assert check["dead_letters"] == check["failed"] == doomed and check["completed"] == 200 - doomed
    metrics = run["metrics"]
    assert metrics["dead_letters"] == metrics["expected_dead_letters"] == doomed
    # Every retry is a 503 the provider answered or an action deadline.
    assert metrics["provider_503"] <= metrics["retries"] + metrics["timeouts"]
    assert metrics["retries"] <= metrics["provider_503"] + metrics["timeouts"]
    assert metrics["calls"] >= 200


@pytest.mark.parametrize("external", ["0", "1"], ids=["in-process", "external"])
async def test_w5_actions_record_every_step_in_order_and_count_action_steps(nats_server_url, pg_dsn, external):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w5-actions", "-n", "100", "--external", external, "--workers", "1", "--json"
    )
    assert code == 0, output
    (run,) = doc["runs"]
    check = run["verification"]
    assert check["problems"] == [] and check["expected_history"] == check["completed"] == 100
    metrics = run["metrics"]
    assert metrics["actions"] == 500 and metrics["external"] is (external == "1")
    assert metrics["actions_per_s"] == pytest.approx(5 * run["executions_per_s"])
    _assert_storage_is_plausible(run["storage"], executions=100, shared=True)
    wal = run["storage"]["wal"]
    assert wal["action_steps"] == 500 and wal["bytes_per_action_step"] == pytest.approx(wal["bytes"] / 500)


async def test_w6_webhooks_call_the_delayed_provider_once_per_step(nats_server_url, pg_dsn):
    code, doc, output = await _bench(
        nats_server_url, pg_dsn, "w6-webhooks", "-n", "50", "--delay", "5", "--workers", "1", "--json"
    )
    assert code == 0, output
    (run,) = doc["runs"]
    assert run["verification"]["problems"] == []
    metrics = run["metrics"]
    assert metrics["calls"] == 150 and metrics["duplicate_calls"] == 0 and metrics["delay_ms"] == 5.0
    assert metrics["provider_process_cpu_percent"] > 0


async def _bench_tool(tool: str, *argv: str, **env: str) -> tuple[int, dict]:
    """Run `python -m bench.TOOL ARGV --json` with `env` set: its pid and its document."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"bench.{tool}",
        *argv,
        "--json",
        cwd=ROOT,
        env=dict(os.environ, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return proc.pid, orjson.loads(out)


async def _burst_tool(nats_server_url: str, tool: str, *argv: str) -> tuple[int, dict]:
    """A bench tool on the test's NATS server."""
    return await _bench_tool(tool, *argv, ORDO_NATS_URL=nats_server_url)


async def _publish_paths(nats_server_url: str, *argv: str) -> tuple[int, list[dict]]:
    pid, doc = await _burst_tool(nats_server_url, "publish_paths", *argv)
    return pid, doc["ways"]


async def test_publish_paths_measures_each_way_of_publishing_without_an_engine(nats_server_url):
    _, ways = await _publish_paths(nats_server_url, "--rate", "200", "--duration", "1")
    assert [w["way"] for w in ways] == ["single", "atomic", "batch"]
    for way in ways:
        lat = way["puback_latency"]
        assert way["events"] == lat["count"] == 200, way
        assert 0 <= lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] and way["stored_rate"] > 0


async def test_publish_paths_measures_beside_a_burst_in_the_same_stream_or_another(nats, nats_server_url):
    """#18's question without an engine: a noisy tenant's burst (its own process) publishes meanwhile,
    into the same triggers stream or another deployment's; each run reports the rate it was stored at."""
    argv = ["--way", "single", "--rate", "200", "--duration", "1"]
    for beside in ("none", "same", "other"):
        argv += ["--beside-burst", beside]
    pid, runs = await _publish_paths(nats_server_url, *argv)
    assert [r["beside"] for r in runs] == ["none", "same", "other"]
    assert all(r["events"] == r["puback_latency"]["count"] == 200 for r in runs), runs
    assert "burst_stored_rate" not in runs[0]
    assert runs[1]["burst_stored_rate"] > 0 and runs[2]["burst_stored_rate"] > 0
    names = [info.config.name for info in await nats.jetstream().streams_info()]
    assert not [n for n in names if n.startswith(f"PP{pid}")], names  # the runs' streams are gone


async def test_commit_paths_commits_every_enrolment_each_way(pg_dsn):
    """`bench.commit_paths` commits its batches each way (it fails if a commit accepts fewer than all)
    and reports both per commit; every enrolment is in the ledger once."""
    _, report = await _bench_tool("commit_paths", "--rows", "3", "--commits", "20", "--repeat", "1", ORDO_PG_DSN=pg_dsn)
    assert sorted(report["medians"]) == ["lone COPY", "transaction"]
    for way, runs in report["runs"].items():
        assert [(r["way"], r["rows"], r["commits"]) for r in runs] == [(way, 3, 20)]
        assert runs[0]["wall_ms"] > 0 and runs[0]["backend_cpu_us"] >= 0
    db = await asyncpg.connect(pg_dsn)
    try:
        rows = await db.fetchval("SELECT count(*) FROM ordo.executions WHERE status = 'completed'")
    finally:
        await db.close()
    assert rows == 2 * 3 * 20


async def test_pull_depth_takes_a_lanes_backlog_during_a_burst_by_pull_size_and_pulls_open(nats, nats_server_url):
    """The burst (its own process) is stored while the engine's pull consumer takes its lane, with
    one pull and then two asked for at a time: each measurement took messages, and its streams are gone."""
    argv = ["--seconds", "1", "--grant", "50", "--open", "1", "--open", "2"]
    pid, doc = await _burst_tool(nats_server_url, "pull_depth", *argv)
    runs = doc["measurements"]
    assert [(r["grant"], r["pulls_open"]) for r in runs] == [(50, 1), (50, 2)]
    assert all(r["taken_per_s"] > 0 and r["burst_stored_per_s"] > 0 for r in runs), runs
    names = [info.config.name for info in await nats.jetstream().streams_info()]
    assert not [n for n in names if n.startswith(f"PD{pid}")], names


async def test_open_mode_trigger_batches_hold_each_ticks_events(nats, nats_server_url, prefix):
    # One message per 5 ms tick however high the rate, not one per event: at
    # 4,000 events/s for 1 s, about 200 messages of about 20 events.
    topology = Topology(config_module.Config(nats_url=nats_server_url, prefix=prefix))
    js = nats.jetstream(timeout=30)
    await topology.ensure(js)
    pubacks = PubAcks()
    events = (trigger_event(prefix, i) for i in range(4000))
    sent = await publish_events(js, topology, events, rate=4000, trigger_batch=1000, pubacks=pubacks)
    assert sent == 4000 and len(list(pubacks.pairs())) == 4000
    info = await js.stream_info(topology.triggers_stream)
    ticks = 1.0 / 0.005
    assert info.state.messages <= 1.5 * ticks + 5, info.state.messages


def test_storage_growth_per_execution_and_without_pg_stat_wal():
    def snapshot(source, wal_bytes, records, fpi, checkpoints, executions, transitions):
        wal = WalCounters(source, wal_bytes, records, fpi, wal_bytes + 10, checkpoints)
        tables = {
            "executions": TableSize("executions", *executions),
            "transitions": TableSize("transitions", *transitions),
            "tenants": TableSize("tenants", 8192, 16384),
        }
        return storage.Snapshot(wal, tables)

    before = snapshot("pg_stat_wal", 1_000, 10, 1, 3, (8192, 8192), (0, 8192))
    after = snapshot("pg_stat_wal", 201_000, 2_010, 41, 4, (8192 * 3, 8192), (8192 * 10, 8192 * 4))
    grown = storage.growth(before, after, executions=100, action_steps=None, shared_server=False)
    wal = grown["wal"]
    assert wal["bytes"] == 200_000 and wal["bytes_per_execution"] == 2_000 and wal["lsn_bytes"] == 200_000
    assert wal["records_per_execution"] == 20 and wal["fpi_per_execution"] == 0.4 and wal["checkpoints"] == 1
    assert wal["fpi_share_of_records"] == 40 / 2_000 and wal["bytes_per_action_step"] is None
    assert not wal["includes_other_traffic"]
    ledger = grown["ledger"]
    # The tables that grew, the one that grew most first; tenants did not grow.
    assert list(ledger["tables"]) == ["transitions", "executions"]
    assert ledger["table_bytes"] == 8192 * 12 and ledger["index_bytes"] == 8192 * 3
    assert ledger["table_bytes_per_execution"] == 8192 * 12 / 100
    assert ledger["tables"]["transitions"]["index_bytes_per_execution"] == 8192 * 3 / 100
    text = "\n".join(report.storage_lines(grown))
    assert "1.95 KB per execution" in text and "0.40 full-page images" in text and "1 checkpoint(s)" in text
    assert "the bench's own server" in text and "transitions 819 B + 246 B" in text

    # Without pg_stat_wal (before Postgres 14) the WAL position gives bytes only.
    before = snapshot("pg_current_wal_lsn", 1_000, None, None, 0, (0, 0), (0, 0))
    after = snapshot("pg_current_wal_lsn", 51_000, None, None, 0, (0, 0), (0, 0))
    grown = storage.growth(before, after, executions=50, action_steps=250, shared_server=True)
    wal = grown["wal"]
    assert wal["bytes_per_execution"] == 1_000 and wal["bytes_per_action_step"] == 200
    assert wal["records"] is None and wal["records_per_execution"] is None and wal["fpi_per_execution"] is None
    assert wal["includes_other_traffic"] and grown["ledger"]["tables"] == {}
    text = "\n".join(report.storage_lines(grown))
    assert "the WAL position" in text and "other databases' traffic" in text and "records" not in text

    # No execution finished: nothing to divide by.
    assert (
        storage.growth(before, after, executions=0, action_steps=None, shared_server=False)["wal"][
            "bytes_per_execution"
        ]
        is None
    )


def test_the_workers_dsn_names_the_run():
    assert (
        storage.with_application_name("postgresql://u@h:5/db", "ordo-w1-x")
        == "postgresql://u@h:5/db?application_name=ordo-w1-x"
    )
    assert (
        storage.with_application_name("postgresql://u@h/db?sslmode=disable&application_name=a", "b")
        == "postgresql://u@h/db?sslmode=disable&application_name=b"
    )


def test_worker_counts_read_finished_executions_from_metrics_text():
    registry = CollectorRegistry()
    finished = Counter(
        "ordo_executions_finished_total", "Executions that reached an end.", ["status"], registry=registry
    )
    finished.labels("completed").inc(1200)
    finished.labels("failed").inc(34)
    Counter("ordo_transitions_total", "Transitions committed to the ledger.", registry=registry).inc(99)
    assert worker_counts.finished_in(generate_latest(registry).decode()) == 1234
    assert worker_counts.finished_in("") == 0


def test_worker_counts_sum_the_commit_histograms_of_all_workers():
    texts = []
    for seconds, rows in (([0.003, 0.004, 0.2], [100, 200, 300]), ([0.004] * 97, [10] * 97)):
        registry = CollectorRegistry()
        commit = PromHistogram("ordo_ledger_commit_seconds", "x", buckets=metrics.COMMIT_BUCKETS, registry=registry)
        batch = PromHistogram("ordo_ledger_batch_rows", "x", buckets=(1, 10, 100, 1000), registry=registry)
        for s, r in zip(seconds, rows, strict=True):
            commit.observe(s)
            batch.observe(r)
        texts.append(generate_latest(registry).decode())
    commits = worker_counts.commits_in(texts)
    assert commits["batches"] == 100
    assert commits["rows_per_batch"] == pytest.approx((600 + 970) / 100)
    assert commits["mean_ms"] == pytest.approx((0.207 + 0.004 * 97) / 100 * 1000)
    # 99 of 100 commits took at most 5 ms; the 100th is in the 250 ms bucket.
    assert commits["p50_le_ms"] == 5 and commits["p99_le_ms"] == 5
    assert worker_counts.bound_of(worker_counts.buckets_in(texts, "ordo_ledger_commit_seconds")[0], 1.0) == 0.25
    assert worker_counts.commits_in([""]) is None


async def test_worker_counts_scrape_a_worker_and_none_when_one_is_missing():
    registry = CollectorRegistry()
    Counter("ordo_executions_finished_total", "x", ["status"], registry=registry).labels("completed").inc(7)
    body = generate_latest(registry)

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    base = worker_counts.free_port_range(2)
    server = await asyncio.start_server(serve, "127.0.0.1", base)
    other = await asyncio.start_server(serve, "127.0.0.1", base + 1)
    try:
        assert await worker_counts.finished_by_workers("127.0.0.1", [base, base + 1]) == 14
    finally:
        other.close()
        await other.wait_closed()
    try:
        assert await worker_counts.finished_by_workers("127.0.0.1", [base, base + 1]) is None
    finally:
        server.close()
        await server.wait_closed()


async def test_worker_counts_scrape_of_a_worker_that_never_answers_times_out_and_hangs_up():
    """A worker that accepts and never answers: the scrape gives up (scrape_all's None) and closes its end."""
    requests: asyncio.Queue[bytes] = asyncio.Queue()

    async def accept_and_never_answer(reader, writer):
        await requests.put(await reader.read())  # read() returns once the scraper closed its end: EOF
        writer.close()

    port = worker_counts.free_port_range(1)
    server = await asyncio.start_server(accept_and_never_answer, "127.0.0.1", port)
    try:
        with pytest.raises(TimeoutError):
            await worker_counts.scrape("127.0.0.1", port, timeout=0.2)
        assert (await asyncio.wait_for(requests.get(), 10)).startswith(b"GET /metrics ")
        assert await worker_counts.scrape_all("127.0.0.1", [port]) is None
        assert (await asyncio.wait_for(requests.get(), 10)).startswith(b"GET /metrics ")
    finally:
        server.close()
        await server.wait_closed()


async def test_list_and_unknown_scenario():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--list", cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out.decode().startswith("w1 ")
    assert [line.split()[0] for line in out.decode().splitlines()] == [
        "w1",
        "w2-signals",
        "w3-timers",
        "w4-retries",
        "w5-actions",
        "w6-webhooks",
        "w7-noisy",
        "w8-limits",
        "w9-mix",
    ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "nope", cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0 and b"unknown scenario" in err


# -- the histogram ------------------------------------------------------------------


def _exact(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def _close(got: float, want: float, scale: float = 1000.0) -> bool:
    # Relative precision above the linear range, one unit (1 µs) below it.
    return abs(got - want) <= max(want * PRECISION * 1.01, 1.0 / scale)


@pytest.mark.parametrize("shape", ["lognormal", "uniform", "bimodal"])
def test_histogram_percentiles_match_exact_ones(shape):
    rng = random.Random(6)
    if shape == "lognormal":
        values = [rng.lognormvariate(2.0, 1.2) for _ in range(50_000)]
    elif shape == "uniform":
        values = [rng.uniform(0.0, 5_000.0) for _ in range(20_000)]
    else:
        values = [rng.gauss(3.0, 0.2) if rng.random() < 0.98 else rng.gauss(900.0, 50.0) for _ in range(20_000)]
    values = [max(v, 0.0) for v in values]
    hist = Histogram()
    hist.record_many(values)
    assert hist.total == len(values)
    for p in (1, 10, 50, 90, 95, 98, 99, 99.9, 99.99):
        want = _exact(values, p)
        assert _close(hist.percentile(p), want), (p, hist.percentile(p), want)
    assert hist.percentile(100) == max(values) == hist.max
    assert hist.mean() == pytest.approx(sum(values) / len(values))


def test_histogram_merge_equals_recording_everything():
    rng = random.Random(7)
    values = [rng.expovariate(1 / 40.0) for _ in range(10_000)]
    whole, left, right = Histogram(), Histogram(), Histogram()
    whole.record_many(values)
    left.record_many(values[:3000])
    right.record_many(values[3000:])
    merged = left.merge(right)
    assert merged.counts == whole.counts and merged.total == whole.total
    assert merged.max == whole.max and merged.min == whole.min
    for p in (50, 99, 99.9):
        assert merged.percentile(p) == whole.percentile(p)
    with pytest.raises(ValueError):
        Histogram(scale=1.0).merge(Histogram())


def test_histogram_small_exact_and_edge_cases():
    hist = Histogram()
    assert hist.percentile(99) == 0.0 and hist.summary()["max_ms"] == 0.0
    for v in (1.0, 2.0, 3.0, 4.0):
        hist.record(v)
    assert [hist.percentile(p) for p in (25, 50, 75, 100)] == pytest.approx([1.0, 2.0, 3.0, 4.0], rel=PRECISION)
    hist.record(-5.0)  # clock skew: counted as zero, never a negative latency
    assert hist.min == 0.0 and hist.percentile(0) == 0.0


def test_histogram_buckets_tile_the_value_range():
    previous_high = 0
    for index in range(_index(10**12) + 1):
        low, high = _bounds(index)
        assert low == previous_high, index
        assert _index(low) == index and _index(high - 1) == index
        assert (high - low) / max(low, 1) <= 1 / 128 or high - low == 1
        previous_high = high


def test_a_soak_reports_each_minute_and_flags_one_that_strays_from_the_median():
    steady = [100] * 60 + [200] * 60 * 4  # a slow first minute is start-up, not judged
    rss, ledger = [[30.0, 90.0], [250.0, 92.0]], [[60.0, 10.0], [240.0, 40.0]]
    found = soak.report(steady, rss=rss, ledger_mb=ledger, duration_s=300)
    assert found["per_minute"] == [100.0, 200.0, 200.0, 200.0, 200.0]
    assert found["median_per_s"] == 200.0 and found["worst_deviation"] == 0.0 and found["steady"]
    assert found["workers_rss_mb"] == {"first_minute": 90.0, "last_minute": 92.0}
    assert found["ledger_growth_mb_per_min"] == 10.0

    dip = [200] * 60 * 3 + [150] * 60 + [200] * 60  # one minute 25% under
    found = soak.report(dip, rss=[], ledger_mb=[], duration_s=300)
    assert found["worst_deviation"] == 0.25 and not found["steady"]
    assert found["workers_rss_mb"] is None and found["ledger_growth_mb_per_min"] is None
    assert any("NOT steady" in line for line in soak.lines(found))
    # Minutes after the offered load (the tail draining) are not judged; under three minutes, nothing is.
    assert soak.report(dip + [10] * 120, rss=[], ledger_mb=[], duration_s=300)["worst_deviation"] == 0.25
    assert soak.report([200] * 150, rss=[], ledger_mb=[], duration_s=150) is None


def test_a_soak_with_retention_takes_its_rate_from_the_counters_read_while_it_ran():
    """The ledger drops a retaining soak's early minutes: the per-second rate is interpolated from the
    workers' counters, read at uneven times, and adds up to what they counted."""
    samples = [(1000.0, 0), (1000.5, 50), (1002.0, 200), (1003.2, 320), (999.0, 0)]
    assert soak.timeline_from_counts(samples, 1000.0) == [100, 100, 100]
    minutes = [(1000.0 + t, 100 * t) for t in range(0, 301, 7)] + [(1300.0, 30_000)]
    timeline = soak.timeline_from_counts(minutes, 1000.0)
    assert sum(timeline) == 30_000 and set(timeline) == {100}
    assert soak.report(timeline, rss=[], ledger_mb=[], duration_s=300)["per_minute"] == [100.0] * 5
    assert soak.timeline_from_counts([], 1000.0) == []


async def test_retention_is_refused_below_a_minute_and_on_a_shared_postgres():
    for argv, env, message in (
        (["w1", "--retention", "30s"], {}, b"--retention: retention_keep must be at least one ledger day (1m)"),
        (["w1", "--retention", "5m"], {"ORDO_PG_DSN": "postgresql://x@127.0.0.1/y"}, b"embedded Postgres only"),
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench",
            *argv,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "ORDO_PG_DSN"} | env,
        )
        _, err = await proc.communicate()
        assert proc.returncode != 0 and message in err, err
