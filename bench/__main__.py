"""`python -m bench SCENARIO` (also `ordo bench`): run a scenario end to end and report.

    python -m bench w1 [-n 150000] [--workers N] [--repeat K] [--json] [--plot FILE.png]
    python -m bench w1 --rate 3500 --duration 20        open mode: a fixed offered rate
    python -m bench w2-signals [-n 10000] [--signals 20]
    python -m bench w3-timers [-n 1000000] [--wait 1-60 | --due-over S] [--hold S]
    python -m bench w4-retries [-n 20000] [--transient 0.05] [--permanent 0.005]
    python -m bench w5-actions [-n 20000] [--external 1]
    python -m bench w7-noisy [-n 500000] [--seconds 60] [--quiet-tenants 20] [--quiet-rate 100]
    python -m bench w6-webhooks [-n 10000] [--delay 20]
    python -m bench w8-limits [-n 10000] [--limit 500]
    python -m bench w9-mix --rate 4000 --duration 1800 [--wait 1-600] [--signals 3]   a soak's mix
    python -m bench w1 --inject-faults seed=7,nats=0.03,pg=0.03   throughput under injected faults
    python -m bench w1 --trace-sample 0.01                         throughput with 1% of executions traced
    python -m bench --list

Servers are those of ORDO_NATS_URL / ORDO_PG_DSN when set, else embedded ones
in a temporary data dir (`--data-dir` keeps it). Each run gets its own
subject/stream prefix and run id, its own worker processes (the per-core
Supervisor) and its own generator process (`bench.publisher`); the ledger
may be shared, since a run reads back only the executions of its event ids
(`<run_id>-<i>`). Other ORDO_* settings (batch sizes, fetch batch) reach the
workers through the environment.

Closed mode publishes N events as fast as the generator can and measures
from the first publish to the last commit. Open mode publishes at --rate for
--duration seconds, each event stamped with its intended send time, and
measures latency from that time to the commit that finished the execution.
Every run is then verified in the ledger: each execution exactly once, with
its steps and a gap-free history. The exit status is 0 only if every run
finished and verified.

The scenarios other than w1 deploy their own workflow per run (bench/workflows/)
and add their own numbers to the table and the JSON (`metrics`): w2 applied
signals/s, w3 fire lateness, enrolment rate and worker RSS against waiting
executions, w4 retries and dead letters, w5 and w6 action steps/s and the
stages of one action step (see bench/scenarios.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import orjson

from ledger import connection
from ledger.runs import ledger_sizes

from . import (
    limits,  # noqa: F401  (registers the `w8-limits` scenario)
    mix,  # noqa: F401  (registers the `w9-mix` scenario)
    report,
    soak,
    storage,
    worker_counts,
)
from .generator import PubAcks
from .histogram import Histogram
from .otlp_sink import OtlpSink
from .report import ProcessSampler, RunResult
from .scenarios import SCENARIOS, Checks, Scenario, check_routing
from .scenarios import get as get_scenario

#: The ledger day of a run with --retention: retention then works by the minute.
SOAK_LEDGER_DAY = "1m"
#: How often the workers' counters are read for progress while a run goes.
POLL_S = 0.25
#: How often the ledger is (at most: see _wait).
LEDGER_POLL_S = 5.0
#: The bench's workers serve /metrics here, on ports of their own (bench.worker_counts).
METRICS_HOST = "127.0.0.1"
#: A run that makes no progress for this long is given up (it reports incomplete).
DEFAULT_STALL_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Ordo's bench scenarios.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("scenario", nargs="?", help="scenario name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "-n",
        "--count",
        type=int,
        default=None,
        help="closed mode: trigger events (default: the scenario's, 150000 for w1)",
    )
    parser.add_argument("--rate", type=float, default=None, help="open mode: offered events/s")
    parser.add_argument("--duration", type=float, default=None, help="open mode: seconds of offered load")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--partitions", type=int, default=None, help="partitions (default: the config's)")
    parser.add_argument(
        "--trigger-streams",
        type=int,
        default=None,
        metavar="N",
        help="triggers streams the lanes are spread over (default: the config's); the embedded "
        "NATS gets the lanes' subject mapping",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run K times and report each and the median")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="draw throughput over time and latency (matplotlib)")
    parser.add_argument("--data-dir", help="keep the embedded servers' data here (default: a temp dir)")
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="an embedded NATS cluster of N nodes with R3 streams instead of one server (as `ordo dev --cluster`)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="give a run up after this many seconds (default: from the load)"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_S,
        help=f"give a run up after this long without progress (default {DEFAULT_STALL_S:.0f} s)",
    )
    parser.add_argument("--log-level", default="warning", help="the workers' log level (default warning)")
    parser.add_argument(
        "--inject-faults",
        metavar="SPEC",
        default=None,
        help="the workers fail a share of their NATS publishes/acks and ledger commits on "
        "purpose (ORDO_INJECT_FAULTS, see daemon/faults.py), e.g. seed=7,nats=0.03,pg=0.03",
    )
    parser.add_argument(
        "--publish-batch",
        type=int,
        default=None,
        metavar="N",
        help="the generator publishes JetStream atomic batches: of N events in closed mode, "
        "of the events due in each 5 ms tick in open mode (nats-server 2.12+; 0 or 1: "
        "one publish per event; default: 200 closed, 0 open, because an atomic batch "
        "costs ~70 ms of visibility latency measured here)",
    )
    parser.add_argument(
        "--trigger-batch",
        type=int,
        default=0,
        metavar="N",
        help="the generator packs events into trigger batch messages (contract 1.1): N per "
        "message in closed mode, the events due in each 5 ms tick (at most N) in open mode; "
        "one publish and one fsync per message (replaces --publish-batch)",
    )
    parser.add_argument(
        "--shadow",
        type=float,
        default=0.0,
        metavar="PERCENT",
        help="a rollout of the run's workflow to an identical candidate runs it in shadow beside this share of "
        "the executions (what dual-running costs; the candidate takes no traffic)",
    )
    parser.add_argument(
        "--retention",
        metavar="KEEP",
        help="a soak with retention at work: the workers run with one-minute ledger days (ledger_day) and drop "
        "the finished executions older than KEEP (retention_keep, e.g. 5m); the run then ends on the workers' "
        "counters and is verified as 'every execution is in the ledger or counted in ordo.retention_drops' "
        "(the bench's own embedded Postgres only)",
    )
    parser.add_argument(
        "--trace-sample",
        type=float,
        default=0.0,
        metavar="RATE",
        help="the workers trace this share of the executions (0 to 1, trace_sample) and export the spans to a "
        "local OTLP/HTTP collector the bench runs (needs the otel extra)",
    )
    options = parser.add_argument_group("scenario options")
    options.add_argument(
        "--signals",
        type=int,
        default=None,
        help="w2-signals: signals per execution (default 20); w9-mix: per signalled execution (default 3)",
    )
    options.add_argument(
        "--signal-delay",
        type=float,
        default=None,
        metavar="S",
        help="w9-mix: a signalled execution's first signal goes S seconds after its trigger (default 5)",
    )
    options.add_argument(
        "--wait",
        default=None,
        metavar="MIN-MAX",
        help="w3-timers: whole seconds each execution waits, uniform (default 1-60); w9-mix: those that wait "
        "(default 1-600)",
    )
    options.add_argument(
        "--hold",
        type=int,
        default=None,
        metavar="S",
        help="w3-timers: add S seconds to every wait, so that all executions wait at once (default 0)",
    )
    options.add_argument(
        "--due-over",
        type=int,
        default=None,
        metavar="S",
        help="w3-timers: instead of --wait, each execution waits until a moment uniform over S seconds "
        "starting --hold seconds after the run starts: N timers fall due at N/S per second, "
        "whatever the enrolment rate (default 0: --wait)",
    )
    options.add_argument(
        "--transient", type=float, default=None, help="w4-retries: share of provider calls answered 503 (default 0.05)"
    )
    options.add_argument(
        "--permanent",
        type=float,
        default=None,
        help="w4-retries: share of executions whose calls are answered 400 (default 0.005)",
    )
    options.add_argument(
        "--external",
        type=int,
        choices=(0, 1),
        default=None,
        help="w5-actions: 1 = the noop steps are served by an external action worker "
        "(python -m actions.worker) over JetStream (default 0: in-process)",
    )
    options.add_argument(
        "--delay",
        type=float,
        default=None,
        metavar="MS",
        help="w6-webhooks: the provider answers after this many ms (default 20)",
    )
    options.add_argument(
        "--limit", type=int, default=None, metavar="N", help="w8-limits: the step's rate limit, calls/s (default 500)"
    )
    options.add_argument("--seconds", type=float, default=None, help="w7-noisy: seconds of quiet load (default 60)")
    options.add_argument("--quiet-tenants", type=int, default=None, help="w7-noisy: quiet tenants (default 20)")
    options.add_argument(
        "--quiet-rate", type=float, default=None, help="w7-noisy: events/s of each quiet tenant (default 100)"
    )
    options.add_argument(
        "--quiet-publish",
        choices=["batched", "single"],
        default=None,
        help="w7-noisy: the quiet tenants' events due together go out as atomic batches (one per "
        "triggers stream; the default), or each tenant publishes each of its events alone",
    )
    return parser


def scenario_options(args) -> dict:
    return {
        name: getattr(args, name)
        for name in (
            *("signals", "wait", "hold", "due_over", "transient", "permanent", "external", "delay", "limit"),
            *("seconds", "quiet_tenants", "quiet_rate", "quiet_publish", "signal_delay"),
        )
        if getattr(args, name) is not None
    }


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, cls in sorted(SCENARIOS.items()):
            print(f"{name:<12} {cls.description}")
        return 0
    if not args.scenario:
        parser.error("a scenario is required (see --list)")
    if (args.rate is None) != (args.duration is None):
        parser.error("open mode needs both --rate and --duration")
    if args.rate is not None and (args.rate <= 0 or args.duration <= 0):
        parser.error("--rate and --duration must be positive")
    scenario = get_scenario(args.scenario, scenario_options(args))
    if args.count is None:
        args.count = scenario.default_count
    if args.count <= 0 or args.repeat <= 0:
        parser.error("-n and --repeat must be positive")
    if args.rate is not None and scenario.name == "w2-signals":
        parser.error("w2-signals runs in closed mode only")
    if args.signals is not None and args.signals < 1:
        parser.error("--signals must be positive")
    if args.hold is not None and args.hold < 0:
        parser.error("--hold must not be negative")
    if args.due_over is not None and args.due_over < 0:
        parser.error("--due-over must not be negative")
    if args.retention is not None:
        from daemon.config import Config
        from daemon.upkeep import retention_keep

        try:
            retention_keep(Config(ledger_day=SOAK_LEDGER_DAY, retention_keep=args.retention))
        except ValueError as exc:
            parser.error(f"--retention: {exc}")
        if os.environ.get("ORDO_PG_DSN"):
            parser.error("--retention drops the ledger's old days: it runs on the bench's own embedded Postgres only")
    if not 0.0 <= args.trace_sample <= 1.0:
        parser.error("--trace-sample must be between 0 and 1")
    if args.inject_faults is not None:
        from daemon.faults import parse as parse_faults

        try:
            parse_faults(args.inject_faults)
        except ValueError as exc:
            parser.error(str(exc))
    if args.wait is not None and hasattr(type(scenario), "wait_range"):
        try:
            _ = scenario.wait_range  # the property validates --wait
        except ValueError as exc:
            parser.error(str(exc))
    if args.plot:
        from .plot import require

        require()
    import uvloop

    try:
        return uvloop.run(_main(args, scenario))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; workers and servers stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:  # servers or workers did not come up, a server went away
        print(f"bench: {exc}", file=sys.stderr)
        return 1


# -- the whole invocation ---------------------------------------------------------------
async def _main(args, scenario: Scenario) -> int:

    from daemon import config as config_module
    from daemon.dev import Environment

    # Ctrl-C and SIGTERM cancel the run; the finally clauses stop the generator,
    # the workers and the servers. Installed here rather than left to the
    # runner, which skips SIGINT when it was inherited as ignored (`cmd &`).
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)

    config = config_module.load(
        partitions=args.partitions, trigger_streams=args.trigger_streams, log_level=args.log_level
    )
    temp_dir = None
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
    else:
        data_dir = Path(temp_dir := tempfile.mkdtemp(prefix="ordo-bench-"))
    env = Environment(config, data_dir, args.cluster)
    runs: list[RunResult] = []
    try:
        print(f"bench {scenario.name}", file=sys.stderr)
        with redirect_stdout(sys.stderr):
            config = env.start()
        # Reading a run back (verify, finish times) scans its executions: a soak's millions take minutes.
        expected = _expected(args, scenario)
        pool = await connection.create_pool(
            config.pg_dsn,
            tcp_timeout_s=config.pg_tcp_timeout_s,
            min_size=1,
            max_size=2,
            command_timeout=max(120.0, expected / 2_000),
        )
        try:
            workers = args.workers or config.workers or os.cpu_count() or 1
            for number in range(1, args.repeat + 1):
                run = await run_once(args, scenario, config, env, pool, workers)
                runs.append(run)
                if not args.json:
                    mode = f"open {args.rate:,.0f}/s for {args.duration:g} s" if run.mode == "open" else "closed"
                    print(report.run_table(run, f"{scenario.name} {mode}  run {number}/{args.repeat}  {run.run_id}"))
                    for line in scenario.summary(run.metrics) if run.metrics else ():
                        print(line)
                    sys.stdout.flush()
        finally:
            await pool.close()
    finally:
        env.stop()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)

    med = report.median(runs)
    for name in scenario.median_fields:
        values = [
            run.metrics[name]
            for run in runs
            if getattr(run, "metrics", None) and isinstance(run.metrics.get(name), (int, float))
        ]
        if values:
            med[name] = statistics.median(values)
    ok = all(run.ok for run in runs)
    if args.plot:
        from .plot import draw

        draw(
            runs,
            args.plot,
            f"Ordo bench {scenario.name} ({'open' if args.rate else 'closed'} mode, "
            f"{workers} workers, {report.machine()['cores']} cores)",
        )
    if args.json:
        doc = {
            "scenario": scenario.name,
            "description": scenario.description,
            "mode": "open" if args.rate else "closed",
            "ok": ok,
            "verified": all(run.verified for run in runs),
            "complete": all(run.complete for run in runs),
            "config": {
                "count": runs[0].expected if runs else None,
                "rate": args.rate,
                "duration": args.duration,
                "options": scenario.options,
                # How the generator packs events: atomic batches of N, or trigger batch messages of up to N.
                "publish_batch": _publish_batch(args),
                "trigger_batch": args.trigger_batch,
                "repeat": args.repeat,
                "workers": workers,
                "partitions": config.partitions,
                "trigger_streams": config.trigger_streams,
                "fetch_batch": config.fetch_batch,
                "max_ack_pending": config.max_ack_pending,
                "batch_max_rows": config.batch_max_rows,
                "batch_max_ms": config.batch_max_ms,
                "inject_faults": args.inject_faults or config.inject_faults,
                "trace_sample": args.trace_sample,
                "servers": "embedded" if env.embedded else "configured",
                "embedded": [type(server).__name__ for server in env.embedded],
            },
            "machine": report.machine(),
            "runs": [{**run.as_dict(), "metrics": run.metrics} for run in runs],
            "median": med,
        }
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        if len(runs) > 1:
            print(report.median_table(med))
            extra = [f"{name} {med[name]:,.1f}" for name in scenario.median_fields if name in med]
            if extra:
                print("  scenario     " + "  ".join(extra))
        if args.plot:
            print(f"plot written to {args.plot}")
        if not ok:
            print("bench: FAILED: not every run finished and verified", file=sys.stderr)
    return 0 if ok else 1


# -- one run ------------------------------------------------------------------------------
async def run_once(args, scenario: Scenario, config, env, pool, workers: int) -> RunResult:
    """Fresh prefix, fresh workers and generator; publish, wait, verify, clean up."""
    from daemon.dev import prepare, wait_for_workers
    from daemon.supervisor import Supervisor
    from daemon.topology import Topology
    from ledger import leases

    token = uuid.uuid4().hex[:10]
    run_id = f"{scenario.name}-{token}"
    run_config = config.with_(prefix=f"bench{token}")
    open_mode = args.rate is not None
    expected = _expected(args, scenario)
    run = RunResult(
        scenario=scenario.name,
        mode="open" if open_mode else "closed",
        run_id=run_id,
        prefix=run_config.prefix,
        expected=expected,
        offered_rate=args.rate,
    )
    run.metrics = {}
    timeout = args.timeout or (args.duration + 120.0 if open_mode else scenario.timeout(expected))

    with redirect_stdout(sys.stderr):
        env.map_triggers(run_config)
        await asyncio.wait_for(prepare(run_config), 60)
    settings = {
        "ORDO_NATS_URL": run_config.nats_url,
        "ORDO_PG_DSN": run_config.pg_dsn,
        "ORDO_PREFIX": run_config.prefix,
        "ORDO_PARTITIONS": str(run_config.partitions),
        "ORDO_STREAM_REPLICAS": str(run_config.stream_replicas),
        "ORDO_TRIGGER_STREAMS": str(run_config.trigger_streams),
    }
    worker_settings = {"ORDO_INJECT_FAULTS": args.inject_faults} if args.inject_faults else {}
    if args.retention:
        worker_settings |= {"ORDO_LEDGER_DAY": SOAK_LEDGER_DAY, "ORDO_RETENTION_KEEP": args.retention}
    sink = None
    if args.trace_sample > 0:  # what tracing costs: spans built and exported to a collector on 127.0.0.1
        sink = OtlpSink().start()
        worker_settings |= {"ORDO_TRACE_SAMPLE": str(args.trace_sample), "ORDO_OTLP_ENDPOINT": sink.endpoint}
    # The workers' backends carry the run's name, so that the WAL they report is waited for (bench.storage).
    application_name = f"ordo-{run_id}"
    worker_settings["ORDO_PG_DSN"] = storage.with_application_name(run_config.pg_dsn, application_name)
    metrics_base = worker_counts.free_port_range(workers, METRICS_HOST)
    metrics_ports = list(range(metrics_base, metrics_base + workers))
    supervisor = Supervisor(
        workers,
        extra_env={
            **settings,
            **scenario.worker_env(),
            **worker_settings,
            "ORDO_LOG_LEVEL": args.log_level,
            "ORDO_METRICS_HOST": METRICS_HOST,
            "ORDO_METRICS_PORT": str(metrics_base),
        },
    )
    publisher = None
    watcher = None
    sampler = ProcessSampler()
    # Open mode: the generator writes when each event's PubAck came back, to split the latency.
    pubacks_file = os.path.join(tempfile.gettempdir(), f"ordo-{run_id}.pubacks") if open_mode else None
    outcome: dict = {}
    before = None

    async def stop_the_run() -> None:
        """The generator, the workers, the scenario's own processes and the run's streams, in that order."""
        if watcher is not None:
            watcher.cancel()
        if publisher is not None and publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
        if publisher is not None:
            outcome["reader"].cancel()
        # Workers drain before the ledger is read: what they commit late is checked too.
        drained = await supervisor.stop_async(timeout=30)
        if not drained and run.failure is None:
            run.failure = "a worker did not stop cleanly"
        await scenario.stop()
        if sink is not None:
            print(f"bench: trace collector received {sink.summary()}", file=sys.stderr)
            sink.stop()
        try:
            await asyncio.wait_for(_delete_streams(run_config.nats_url, Topology(run_config)), 30)
        except Exception as exc:  # noqa: BLE001 - clean-up is best effort
            print(f"bench: could not delete the run's streams: {exc}", file=sys.stderr)

    await scenario.start()
    try:
        # The run's streams are new: the workers see that the partitions' watermarks
        # belong to another stream and start over (ordo.partitions.stream_created).
        # Each run is its own deployment (prefix): its partitions and leases are its own (migration 011).
        # The run's own workflow(s): deployed before the workers start, so they load them.
        definitions = scenario.definitions(run_id)
        if definitions:
            from ledger import workflows

            async with pool.acquire() as conn:
                for definition in definitions:
                    await workflows.deploy(conn, definition)
                if args.shadow:
                    await _shadow_rollouts(conn, definitions, args.shadow)
        # The ledger's clock: claimed_at is Postgres' now(), and the servers may be elsewhere.
        since = await leases.ledger_clock(pool)
        supervisor.start()
        watcher = asyncio.create_task(supervisor.watch())
        await wait_for_workers(pool, run_config, since, workers)
        await scenario.start_beside_workers(settings)

        sampler.add("workers", lambda: [child.pid for child in supervisor.children.values()])
        # The load publishers: the generator and any it starts (w7-noisy's quiet tenants).
        sampler.add("generator", lambda: [publisher.pid] if publisher else [], children=True)
        sampler.add("collector", lambda: [sink.pid] if sink else [])  # the OTLP collector's process (--trace-sample)
        for server in env.embedded:
            if type(server).__name__ == "EmbeddedNatsCluster":
                sampler.add("nats", lambda server=server: [node.pid for node in server.nodes if node.pid])
                continue
            name = "nats" if type(server).__name__ == "EmbeddedNats" else "postgres"
            sampler.add(name, lambda server=server: [server.pid], children=(name == "postgres"))
        sampler.start()

        before = await storage.Snapshot.read(pool)
        publisher, outcome = await _start_publisher(
            scenario,
            run_id,
            expected,
            args.rate,
            settings,
            timeout,
            _publish_batch(args),
            pubacks_file,
            args.trigger_batch,
        )
        run.first_publish = time.time()  # replaced by the generator's own clock when it reports
        await _wait(
            run,
            pool,
            scenario,
            publisher,
            outcome,
            sampler,
            timeout,
            args.stall_timeout + scenario.stall_grace(),
            metrics_ports,
            retaining=bool(args.retention),
        )
        run.commits = await worker_counts.commits_by_workers(METRICS_HOST, metrics_ports)
        sampler.sample()
        try:
            await asyncio.wait_for(publisher.wait(), 30)
            await asyncio.wait_for(outcome["reader"], 5)
        except TimeoutError:
            run.failure = run.failure or "the generator did not exit"
        done = outcome.get("done")
        if done:
            run.first_publish = done["first_publish"] or run.first_publish
            run.last_ack = done["last_ack"]
            run.published = done["published"]
    finally:
        await _uninterrupted(stop_the_run())
    after = await storage.after_backends_exit(pool, application_name) if before is not None else None

    dropped = 0  # finished executions that retention took out of the ledger before the end
    if args.retention:
        verification = await _verify_retained(pool, scenario, run_id, expected)
        dropped = verification.facts["dropped_by_retention"]
    else:
        verification = await scenario.verify(pool, run_id, expected, outcome.get("done"))
    await check_routing(pool, verification, Topology(run_config).exec_stream, scenario.workflow_id(run_id))
    run.verification = verification.as_dict()
    run.verified = verification.ok
    rows = await scenario.finish_times(pool, run_id)
    run.finished = len(rows) + dropped
    run.complete = run.finished >= expected and run.failure is None
    pubacks = {}
    if pubacks_file and os.path.exists(pubacks_file):
        pubacks = PubAcks.load(pubacks_file)
        os.unlink(pubacks_file)
    _collect(run, rows, pubacks)
    if run.first_publish is not None:
        if args.retention:
            # The ledger holds the run's last KEEP only (latency and steps are over those): the rate comes
            # from the workers' counters read while the run went, and the plot draws that timeline.
            run.timeline = soak.timeline_from_counts([(s["t"], s["finished"]) for s in run.trace], run.first_publish)
        else:
            run.timeline, run.finish_offsets = _per_second(rows, run.first_publish)
    run.resources = sampler.report(since=run.first_publish, until=run.last_commit)
    run.usage = sampler.report
    run.metrics = await scenario.measure(pool, run, outcome.get("done"))
    if open_mode:
        run.soak = soak.report(run.timeline, run.rss_series(points=len(run.trace)), run.ledger_mb, args.duration)
    if before is not None and after is not None:
        run.storage = storage.growth(
            before, after, run.finished, scenario.action_steps(run), shared_server=not _postgres_embedded(env)
        )
    return run


async def _uninterrupted(cleanup: Coroutine[Any, Any, None]) -> None:
    """Await `cleanup` to its end even if the run is cancelled meanwhile, and then pass the cancellation on.

    A second Ctrl-C (or SIGTERM) cancels the run again while it is stopping: cut short at its first await,
    the clean-up never stopped the workers, and _main then stopped the servers under them, so that they
    ran on, reconnecting for ever."""
    task = asyncio.ensure_future(cleanup)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            interrupted = True
    task.result()  # the clean-up's own error, if it had one
    if interrupted:
        raise asyncio.CancelledError


async def _verify_retained(pool, scenario: Scenario, run_id: str, expected: int) -> Checks:
    """A run with retention at work keeps only its last KEEP in the ledger: each of its executions must be
    there, finished, or counted in ordo.retention_drops (the bench's own Postgres holds this run only),
    and none may be left open or dead-lettered (but for a signal to an execution not enrolled yet or
    ended already, which w9-mix's may be: those are counted as a fact)."""
    from ledger.run_checks import retained_run

    progress = await scenario.progress(pool, run_id)
    ledger = await retained_run(pool)
    checks = Checks(expected)
    checks.add("finished_or_dropped", progress["finished"] + ledger["dropped"], expected)
    checks.add("open", progress.get("total", progress["finished"]) - progress["finished"], 0)
    checks.add("dead_letters", ledger["dead_letters"], 0)
    checks.facts["dropped_by_retention"] = ledger["dropped"]
    checks.facts["unroutable_signals_dead_lettered"] = ledger["unroutable"]
    return checks


def _expected(args, scenario: Scenario) -> int:
    """The executions a run makes: what the open mode offers over its duration, or the scenario's closed count."""
    return round(args.rate * args.duration) if args.rate is not None else scenario.expected(args.count or 0)


def _postgres_embedded(env) -> bool:
    """Whether the bench started the Postgres it measures: then no other database shares its WAL."""
    return any(type(server).__name__ == "EmbeddedPostgres" for server in env.embedded)


def _publish_batch(args) -> int:
    if args.trigger_batch > 1:
        return 0
    if args.publish_batch is not None:
        return args.publish_batch
    return 0 if args.rate else 200


async def _shadow_rollouts(conn, definitions: list[dict], percent: float) -> None:
    """Roll each workflow out to an identical candidate, shadow only: the candidate runs beside `percent`."""
    from ledger import rollouts, workflows

    for definition in definitions:
        version, _ = await workflows.deploy(conn, dict(definition, description="bench: shadow candidate"))
        plan = rollouts.Plan(
            definition["id"],
            version,
            tenant=definition["tenant"],
            stages=(0, rollouts.ALL),
            min_sample=2**31 - 1,
            shadow_share=round(percent * 100),
        )
        await rollouts.start(conn, plan, "bench")


async def _start_publisher(
    scenario: Scenario,
    run_id: str,
    count: int,
    rate,
    settings: dict,
    timeout: float,
    publish_batch: int = 0,
    pubacks_file: str | None = None,
    trigger_batch: int = 0,
):
    """Start the generator process; a task fills `outcome` from its stdout lines."""
    env = dict(os.environ, **settings)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = [
        sys.executable,
        "-m",
        "bench.publisher",
        "--scenario",
        scenario.name,
        "--run-id",
        run_id,
        "--count",
        str(count),
        "--timeout",
        str(timeout),
        "--options",
        orjson.dumps(scenario.options).decode(),
    ]
    if rate:
        argv += ["--rate", str(rate)]
    if publish_batch > 1:
        argv += ["--atomic-batch", str(publish_batch)]
    if trigger_batch > 1:
        argv += ["--trigger-batch", str(trigger_batch)]
    if pubacks_file:
        argv += ["--pubacks", pubacks_file]
    # Its own session: a Ctrl-C reaches the bench, which stops it, not the generator directly.
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE, start_new_session=True)
    outcome: dict = {"published": 0}

    async def read():
        async for line in proc.stdout:
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            outcome["published"] = doc.get("published", outcome["published"])
            if doc.get("done"):
                outcome["done"] = doc

    outcome["reader"] = asyncio.create_task(read())
    return proc, outcome


async def _wait(
    run: RunResult,
    pool,
    scenario: Scenario,
    publisher,
    outcome: dict,
    sampler,
    timeout: float,
    stall_timeout: float,
    metrics_ports: list[int],
    retaining: bool = False,
) -> None:
    """Poll until the ledger says the run's executions have all finished, or give up; live progress on stderr.

    With retention at work (`retaining`) the ledger drops what finished minutes ago: the workers'
    counters, which count the whole run, say when it is done."""
    out = sys.stderr
    tty = out.isatty()
    started = last_change = time.monotonic()
    last_line = 0.0
    finished = prev = 0
    prev_t = started
    marker = None
    state: dict = {}
    next_ledger_read = next_size_read = 0.0
    while True:
        # The workers' counters every POLL_S; the ledger, whose count is a scan,
        # every LEDGER_POLL_S (or 20 times what reading it costs), and whenever
        # the counters say the run may be done: only the ledger ends a run.
        counted = await worker_counts.finished_by_workers(METRICS_HOST, metrics_ports)
        asked = time.monotonic()
        if counted is None or counted >= run.expected or asked >= next_ledger_read:
            state = await scenario.progress(pool, run.run_id)
            next_ledger_read = time.monotonic() + max(LEDGER_POLL_S, 20.0 * (time.monotonic() - asked))
        if retaining:
            finished = counted if counted is not None else finished
        else:
            finished = max(state["finished"], counted or 0)
        now = time.monotonic()
        sampler.sample()
        rss = sampler.rss.get("workers")
        run.trace.append({"t": time.time(), **state, "finished": finished, "workers_rss_mb": rss[-1] if rss else None})
        if now >= next_size_read and run.first_publish is not None:
            next_size_read = now + soak.LEDGER_SAMPLE_S
            tables = await ledger_sizes(pool)
            total_mb = sum(t.table_bytes + t.index_bytes for t in tables) / 2**20
            run.ledger_mb.append([round(time.time() - run.first_publish, 1), round(total_mb, 1)])
        published = outcome["published"]
        # Progress is anything moving: publishing, enrolling, finishing.
        if (finished, state.get("total"), published) != marker:
            last_change = now
            marker = (finished, state.get("total"), published)
        rate = (finished - prev) / max(now - prev_t, 1e-6)
        prev, prev_t = finished, now
        waiting = f"  waiting {state['waiting']:>9,}" if "waiting" in state else ""
        line = (
            f"  {now - started:6.1f} s  published {published:>9,}  finished {finished:>9,}/{run.expected:,}"
            f"  {rate:>8,.0f}/s  lag {max(published - finished, 0):>8,}{waiting}"
        )
        if tty:
            out.write("\r" + line + "  ")
            out.flush()
        elif now - last_line >= 5.0 or finished >= run.expected:
            out.write(line + "\n")
            last_line = now
        if (finished if retaining else state["finished"]) >= run.expected:
            break
        if publisher.returncode not in (None, 0):
            run.failure = f"the generator exited with {publisher.returncode}"
            break
        if now - last_change > stall_timeout:
            run.failure = f"no progress for {stall_timeout:.0f} s ({finished:,} of {run.expected:,} finished)"
            break
        if now - started > timeout:
            run.failure = f"timed out after {timeout:.0f} s ({finished:,} of {run.expected:,} finished)"
            break
        await asyncio.sleep(POLL_S)
    if tty:
        out.write("\n")
    run.published = outcome["published"]


def _collect(run: RunResult, rows, pubacks: dict) -> None:
    """Latency histograms, steps and the last commit from the ledger's rows.

    `pubacks` maps an event's intended send time to its PubAck time (open
    mode): intended send -> PubAck is the publish share of the latency,
    PubAck -> committed the engine's own.
    """
    hist = Histogram()
    stored = Histogram()
    for ts, acked in pubacks.items():
        stored.record(acked - ts)
    engine = Histogram()
    steps = 0
    last = None
    for row in rows:
        finished, ts = row["finished"], row["ts"]
        steps += row["steps"]
        if ts is not None:
            hist.record(finished * 1000.0 - ts)
            acked = pubacks.get(ts)
            if acked is not None:
                engine.record(finished * 1000.0 - acked)
        last = finished if last is None or finished > last else last
    run.latency = hist
    run.stored_latency = stored if stored.total else None
    run.engine_latency = engine if engine.total else None
    run.steps = steps
    run.last_commit = last


def _per_second(rows, t0: float) -> tuple[list[int], list[float]]:
    """Completions per second since `t0` (the first publish), and each finish's offset from it for the
    plot, from the ledger's rows: a run whose every finish time the ledger still holds."""
    timeline: list[int] = []
    offsets: list[float] = []
    for row in rows:
        offset = row["finished"] - t0
        offsets.append(offset)
        second = max(0, int(offset))
        if second >= len(timeline):
            timeline.extend([0] * (second + 1 - len(timeline)))
        timeline[second] += 1
    return timeline, offsets


async def _delete_streams(nats_url: str, topology) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        for name in topology.stream_names():
            try:
                await js.delete_stream(name)
            except NotFoundError:
                pass
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(main())
