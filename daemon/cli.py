"""The `ordo` command line.

    ordo dev [--demo N] [--cluster N]   embedded NATS (one server or a cluster) + Postgres, migrate,
                                   deploy the examples, run workers
    ordo run [--workers N | --worker-index I]
    ordo migrate
    ordo workflow deploy FILE...   ordo workflow validate FILE...   ordo workflow list
    ordo signal EXECUTION_ID NAME [--data JSON]
    ordo execution show ID [--json]
    ordo inspect EXECUTION_ID [--json]     the timeline, current state, pending timer and wait, dead letters
    ordo replay EXECUTION_ID [--definition FILE | --version N] [--json]
    ordo replay --sample N --workflow W [--tenant T] [--definition FILE | --version N] [--json]
    ordo replay --import FILE.jsonl [--definition FILE | --version N] [--json]
    ordo replay ... --engine NAME       the same on another dispatcher build (daemon/engines.py)
    ordo dlq list|show ID [--all-deployments]|retry ID|--all   this deployment's letters (list, show: or anyone's)
    ordo execution cancel ID
    ordo check                     the ledger's invariants (lost, duplicated, out of order, stuck)
    ordo rollout start --workflow W (--to-version N | --definition FILE | --engine NAME) [--stages 1,5,25,50,100 ...]
    ordo rollout status [--workflow W] [--json]     ordo rollout pause|resume|abort --workflow W
    ordo ledger maintain           create the day partitions a week ahead, move rows out of DEFAULT
    ordo ledger retention [--keep 14d]             drop the days older than that (open executions stay)
    ordo ledger export --before DATE --out FILE    finished executions of the days before DATE, as .jsonl.gz
    ordo inspect EXECUTION_ID --from-file FILE     an execution archived by `ordo ledger export`
    ordo bench SCENARIO ...
    ordo profile --worker I [--seconds S] [--out FILE] [--pid P]
    ordo console [--host H] [--port P]   the operator console (tokens from ORDO_CONSOLE_TOKENS)

Servers come from ORDO_NATS_URL / ORDO_PG_DSN (or the config file), never from
the command line: a DSN with a password must not show up in `ps`.
"""

import argparse
import os
import sys

import orjson

from . import config as config_module
from .topology import Topology


def _setup_logging(args, config) -> None:
    """The level and format of this process's lines; `ordo dev` shows warnings and above unless told.

    `ordo dev` sets the level for the workers it starts too (they inherit
    ORDO_LOG_LEVEL), so its summary is not buried under partition hand-overs.
    """
    from .logs import configure

    level = args.log_level or config.log_level
    if args.command == "dev":
        if args.log_level is None and "ORDO_LOG_LEVEL" not in os.environ and config.log_level == "info":
            level = "warning"
        os.environ["ORDO_LOG_LEVEL"] = level
    configure(level, config.log_format)


def _require(config, *names) -> None:
    missing = [n for n in names if not getattr(config, n)]
    if missing:
        env = ", ".join(f"ORDO_{n.upper()}" for n in missing)
        sys.exit(f"ordo: {env} is not set (or use `ordo dev`, which starts embedded servers)")


def _on_ledger(config, work) -> int:
    """Run `await work(conn)` on a connection to the ledger, given up after `pg_tcp_timeout_s` of silence as a
    worker's is (a command waiting on a cut connection would otherwise hang); its result is the exit code."""
    _require(config, "pg_dsn")

    async def go():
        from ledger import connection

        conn = await connection.connect(config.pg_dsn, tcp_timeout_s=config.pg_tcp_timeout_s)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return _run_async(go()) or 0


def _run_async(coro):
    import uvloop

    return uvloop.run(coro)


# -- commands -------------------------------------------------------------------


def cmd_run(args, config) -> int:
    _require(config, "nats_url", "pg_dsn")
    if args.worker_index is not None:
        from .service import run_worker

        workers = args.workers or config.workers or os.cpu_count() or 1
        return _run_async(run_worker(config, args.worker_index, workers, config_path=args.config))
    from .supervisor import run_supervisor

    # The workers read the file this command was given, at start and on SIGHUP, and log as told.
    options = ["--config", os.path.abspath(args.config)] if args.config else []
    options += ["--log-level", args.log_level] if args.log_level else []
    return run_supervisor(args.workers or config.workers or os.cpu_count() or 1, options)


def cmd_migrate(args, config) -> int:
    from ledger.schema import migrate

    async def go(conn):
        applied = await migrate(conn)
        print(f"applied: {', '.join(applied)}" if applied else "the ledger is up to date")

    return _on_ledger(config, go)


def _read_definition(path: str) -> dict:
    with open(path, "rb") as fh:
        try:
            return orjson.loads(fh.read())
        except orjson.JSONDecodeError as exc:
            raise SystemExit(f"ordo: {path}: not valid JSON ({exc})") from None


def cmd_workflow(args, config) -> int:
    from daemon import context_types as registered
    from hotpath.definition import DefinitionError, validate

    # A workflow is checked against the context types the workers will have, so that a
    # subject type no worker knows is refused here rather than dead-lettered there.
    context_types = None if args.action == "list" else registered.registry(config, config.context_type_plugins)
    if args.action == "validate":
        failed = 0
        for path in args.files:
            try:
                validate(_read_definition(path), context_types)
                print(f"{path}: valid")
            except DefinitionError as exc:
                failed += 1
                print(f"{path}: invalid\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 1 if failed else 0

    async def go(conn):
        from ledger import workflows

        if args.action == "list":
            for r in await workflows.versions(conn):
                print(f"{r['tenant']}/{r['workflow_id']}  latest v{r['latest']}  ({r['versions']} versions)")
            return 0
        failed = 0
        for path in args.files:
            try:
                version, new = await workflows.deploy(conn, _read_definition(path), context_types)
                print(f"{path}: {'deployed' if new else 'unchanged'} as version {version}")
            except DefinitionError as exc:
                failed += 1
                print(f"{path}: rejected\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 1 if failed else 0

    return _on_ledger(config, go)


def _send_to_execution(config, message) -> int:
    """Publish an operator's message (daemon/operator_messages.py) and say what was sent; 1 if it was refused
    (no such execution, or another deployment's: the ledger says whose)."""
    _require(config, "nats_url")

    async def go(conn):
        import nats

        from . import operator_messages

        nc = await nats.connect(config.nats_servers)
        try:
            seq = await operator_messages.send(nc.jetstream(), conn, Topology(config), message)
        except operator_messages.NotSent as exc:
            print(f"ordo: {exc}", file=sys.stderr)
            return 1
        finally:
            await nc.close()
        what = f"signal {message.body['name']!r}" if message.kind == "signal" else message.kind
        print(f"{what} sent to {message.execution_id} (stream seq {seq})")
        return 0

    return _on_ledger(config, go)


def cmd_signal(args, config) -> int:
    import uuid

    from . import operator_messages

    data = orjson.loads(args.data) if args.data else None
    signal_id = args.signal_id or str(uuid.uuid4())
    return _send_to_execution(config, operator_messages.signal(args.execution_id, args.name, data, signal_id))


def cmd_execution(args, config) -> int:
    if args.action == "cancel":
        from . import operator_messages

        return _send_to_execution(config, operator_messages.cancel(args.execution_id, args.reason))

    async def go(conn):
        from ledger import history

        ex = await history.execution_as_stored(conn, args.execution_id)
        if ex is None:
            print(f"ordo: no execution {args.execution_id}", file=sys.stderr)
            return 1
        transitions = await history.transitions(conn, args.execution_id)
        if args.json:
            doc = {k: (str(v) if not isinstance(v, (int, str, type(None))) else v) for k, v in dict(ex).items()}
            doc["transitions"] = [
                {
                    "seq": t["seq"],
                    "step_id": t["step_id"],
                    "kind": t["kind"],
                    "at": t["at"].isoformat(),
                    "detail": orjson.loads(t["detail"]) if t["detail"] else None,
                }
                for t in transitions
            ]
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            return 0
        print(
            f"execution {ex['execution_id']}  {ex['tenant']}/{ex['workflow_id']} v{ex['workflow_version']}"
            f"  {ex['subject_type']} {ex['subject_id']}  status {ex['status']}"
        )
        for t in transitions:
            detail = t["detail"] or ""
            print(
                f"  {t['seq']:>4}  {t['at'].isoformat(timespec='milliseconds')}  {t['kind']:<10} "
                f"{t['step_id']:<20} {detail}"
            )
        return 0

    return _on_ledger(config, go)


def cmd_inspect(args, config) -> int:
    if args.from_file:
        from .export import read_archived
        from .inspect import render

        try:
            doc = read_archived(args.from_file, args.execution_id)
        except OSError as exc:
            sys.exit(f"ordo: cannot read {args.from_file}: {exc}")
        if doc is None:
            print(f"ordo: no execution {args.execution_id} in {args.from_file}", file=sys.stderr)
            return 1
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json else render(doc))
        return 0

    async def go(conn):
        from .inspect import inspect, render

        doc = await inspect(conn, args.execution_id)
        if doc is None:
            print(f"ordo: no execution {args.execution_id}", file=sys.stderr)
            return 1
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json else render(doc))
        return 0

    return _on_ledger(config, go)


def cmd_replay(args, config) -> int:
    """Exit 0 when every replay makes the recorded decisions, 1 when one diverges, 2 when one cannot run
    (or, with --import, a line is malformed)."""
    if sum(x is not None for x in (args.execution_id, args.sample, args.import_file)) != 1:
        sys.exit("ordo: replay needs an EXECUTION_ID, --sample N --workflow W, or --import FILE.jsonl")
    if args.sample is not None and not args.workflow:
        sys.exit("ordo: replay --sample needs --workflow")
    if args.definition and args.version is not None:
        sys.exit("ordo: replay takes --definition FILE or --version N, not both")
    definition = _read_definition(args.definition) if args.definition else args.version
    engine = None
    if args.engine is not None:
        from .engines import EngineError
        from .engines import engine as engine_named

        try:
            engine = engine_named(args.engine)
        except EngineError as exc:
            sys.exit(f"ordo: {exc}")

    if args.import_file is not None:
        try:
            with open(args.import_file, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            sys.exit(f"ordo: cannot read {args.import_file}: {exc.strerror}")

    async def go(conn):
        from .replay import render, render_summary, replay, replay_sample

        if args.import_file is not None:
            from .replay_import import render_import, replay_import

            compared = await replay_import(conn, lines, definition, engine)
            print(orjson.dumps(compared, option=orjson.OPT_INDENT_2).decode() if args.json else render_import(compared))
            return 2 if compared["errors"] or compared["malformed"] else 1 if compared["diverged"] else 0
        if args.execution_id is not None:
            result = await replay(conn, args.execution_id, definition, engine, args.engine)
            print(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() if args.json else render(result))
            return {"identical": 0, "diverged": 1}.get(result.outcome, 2)
        summary = await replay_sample(
            conn, args.tenant, args.workflow, args.sample, definition, engine=engine, engine_name=args.engine
        )
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() if args.json else render_summary(summary))
        return 2 if summary["errors"] else 1 if summary["diverged"] else 0

    return _on_ledger(config, go)


def cmd_dlq(args, config) -> int:

    async def go(conn):
        from .dlq import OthersLetter, list_letters, retry, show_letter, summary

        if args.all_deployments and args.action == "retry":
            sys.exit("ordo: --all-deployments is for dlq list and show: retry takes only this deployment's letters")
        if args.action == "list":
            lines = await list_letters(
                conn,
                Topology(config),
                all_deployments=args.all_deployments,
                reason=args.reason,
                tenant=args.tenant,
                limit=args.limit,
            )
            for line in lines:
                print(line)
            return 0
        if args.action == "show":
            if not args.id:
                sys.exit("ordo: dlq show needs an ID")
            try:
                text = await show_letter(
                    conn, Topology(config), int(args.id), all_deployments=args.all_deployments, tenant=args.tenant
                )
            except OthersLetter as exc:
                print(f"ordo: {exc}: pass --all-deployments to show it", file=sys.stderr)
                return 1
            if text is None:
                print(f"ordo: no dead letter {args.id}", file=sys.stderr)
                return 1
            print(text)
            return 0
        _require(config, "nats_url")
        if not args.id and not args.all:
            sys.exit("ordo: dlq retry needs an ID or --all")
        import nats

        letter_id = int(args.id) if args.id else None
        nc = await nats.connect(config.nats_servers)
        try:
            # One letter by id that is another deployment's is refused, as `show` refuses it and the
            # console does; `--all` leaves the other deployments' letters open and says how many.
            done = await retry(
                conn,
                nc.jetstream(),
                Topology(config),
                letter_id=letter_id,
                reason=args.reason,
                action=args.only_action,
                tenant=args.tenant,
                refuse_others=True,
            )
        except OthersLetter as exc:
            print(f"ordo: {exc}", file=sys.stderr)
            return 1
        finally:
            await nc.close()
        for line in done.lines:
            print(line)
        print(summary(done.retried, len(done.left_open)))
        # A letter asked for by id and not retried (none such, or it stayed open) is a failure.
        return 1 if letter_id is not None and done.retried == 0 else 0

    return _on_ledger(config, go)


def cmd_check(args, config) -> int:

    async def go(conn):
        from ledger.check import check, report

        result = await check(conn, overdue_after_s=args.overdue_after)
        print("ledger invariants")
        print(report(result))
        return 1 if any(result.values()) else 0

    return _on_ledger(config, go)


def cmd_nats_mapping(args, config) -> int:
    from .topology import Topology

    topology = Topology(config)
    lanes, streams = config.trigger_lanes, config.trigger_streams
    print(f"# Ordo {config.prefix!r}: {lanes} trigger lanes, trigger_streams = {streams}.")
    print("# The NATS account mapping that trigger_streams > 1 needs (with 1, the stream files the lanes itself):")
    print(topology.nats_mapping(), end="")
    return 0


def cmd_rollout(args, config) -> int:
    """Start, show or change a workflow's progressive rollout; a refusal is one `ordo:` line and exit 1."""
    from ledger.rollouts import RolloutRefused

    from . import rollout_commands as commands

    if args.action != "status" and not args.workflow:
        sys.exit(f"ordo: rollout {args.action} needs --workflow W")

    async def go(conn):
        from daemon import context_types as registered
        from ledger import rollouts

        if args.action == "status":
            code, text = await commands.status(conn, args.workflow, args.tenant, args.json)
            print(text, file=sys.stderr if code else sys.stdout)
            return code
        if args.action == "start":
            definition = _read_definition(args.definition) if args.definition else None
            plan = commands.plan_of(args, definition)
            context_types = registered.registry(config, config.context_type_plugins)
            check = commands.engine_check(args.engine) if args.engine else None
            row = await rollouts.start(conn, plan, commands.actor(), context_types, check)
        else:
            reason = args.reason or f"{args.action} by the operator"
            row = await rollouts.operate(conn, args.workflow, args.tenant, args.action, commands.actor(), reason)
        print(commands.describe(row))
        return 0

    try:
        return _on_ledger(config, go)
    except RolloutRefused as exc:
        sys.exit(f"ordo: {exc}")


def cmd_ledger(args, config) -> int:
    """The ledger's day partitions: made ahead, dropped past retention, archived (ledger/partitioning.py)."""
    from datetime import UTC, date, datetime

    from ledger import partitioning

    from .upkeep import ledger_day_s, retention_keep

    now = datetime.now(UTC)
    try:
        partitioning.use_day_length(ledger_day_s(config))
    except ValueError as exc:
        sys.exit(f"ordo: {exc}")
    if args.action == "retention":
        try:
            keep = retention_keep(config.with_(retention_keep=args.keep or config.retention_keep))
        except ValueError as exc:
            sys.exit(f"ordo: {exc}")
        if keep is None:
            sys.exit("ordo: say how long to keep: --keep 14d, or the retention_keep setting")
    if args.action == "export":
        if not args.before or not args.out:
            sys.exit("ordo: ledger export needs --before DATE (YYYY-MM-DD) and --out FILE.jsonl.gz")
        try:
            before = date.fromisoformat(args.before)
        except ValueError:
            sys.exit(f"ordo: --before {args.before!r} is not a date (YYYY-MM-DD)")

    async def go(conn):
        if args.action == "export":
            from .export import export

            written = await export(conn, before, args.out)
            print(f"{written} finished execution(s) of the days before {before} written to {args.out}")
            return 0
        if not await partitioning.try_lock(conn):
            print("ordo: another maintainer (a worker or ordo ledger) is at work; try again", file=sys.stderr)
            return 1
        if args.action == "maintain":
            made = await partitioning.maintain(conn, partitioning.day_at(now), args.ahead)
            print(f"created: {', '.join(made.created)}" if made.created else "every partition is there already")
            for table, rows in made.rescued.items():
                print(f"moved {rows} row(s) of ordo.{table} out of its DEFAULT partition")
            return 0
        done = await partitioning.retention(conn, keep, now)
        print(f"kept: everything since {done.cutoff.isoformat(timespec='seconds')}, and every open execution")
        print(f"dropped: {', '.join(done.dropped)}" if done.dropped else "dropped: nothing (no day is that old)")
        print(f"carried forward: {done.carried} execution(s), {done.carried_history} history row(s)")
        return 0

    return _on_ledger(config, go)


def cmd_dev(args, config) -> int:
    from .dev import run_dev

    return _run_async(
        run_dev(config, demo=args.demo, workers=args.workers, data_dir=args.data_dir, cluster=args.cluster)
    )


def cmd_profile(args, config) -> int:
    from .profile import ProfileError, find_worker_pid, profile

    try:
        pid = args.pid or find_worker_pid(args.worker)
        who = f"pid {pid}" if args.pid else f"worker {args.worker} (pid {pid})"
        out = args.out or (f"ordo-pid{pid}.svg" if args.pid else f"ordo-w{args.worker}-{pid}.svg")
        print(f"recording {who} for {args.seconds} s into {out}", file=sys.stderr, flush=True)
        return profile(pid, args.seconds, out, native=not args.no_native)
    except ProfileError as exc:
        sys.exit(f"ordo: {exc}")


def cmd_console(args, config) -> int:
    from .console.app import serve
    from .console.auth import TokenError, Tokens

    _require(config, "pg_dsn")
    try:
        tokens = Tokens(config.console_tokens)
    except TokenError as exc:
        sys.exit(f"ordo: {exc}")
    if not tokens:
        sys.exit("ordo: ORDO_CONSOLE_TOKENS is not set: nobody could log in (README, Console)")
    try:
        _run_async(serve(config, tokens, args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_bench(args, config) -> int:
    """Become `python -m bench ...`: the engine does not import its own benchmark."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "bench", *args.rest])


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ordo", description="Ordo workflow execution engine")
    parser.add_argument("--config", help="TOML config file (default: $ORDO_CONFIG or /etc/ordo/ordo.toml)")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run workers (one per core by default)")
    p.add_argument("--workers", type=int, default=None, help="number of worker processes")
    p.add_argument("--worker-index", type=int, default=None, help="run only this worker (for systemd)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("dev", help="run on embedded servers unless ORDO_NATS_URL / ORDO_PG_DSN are set")
    p.add_argument("--demo", type=int, default=None, metavar="N", help="publish N demo triggers, report, exit")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="where the embedded servers keep their data (default .ordo)")
    p.add_argument(
        "--cluster", type=int, default=0, metavar="N", help="an embedded NATS cluster of N nodes, streams R3"
    )
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("migrate", help="apply the ledger's schema migrations (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("workflow", help="deploy, validate or list workflow definitions")
    p.add_argument("action", choices=["deploy", "validate", "list"])
    p.add_argument("files", nargs="*")
    p.set_defaults(func=cmd_workflow)

    p = sub.add_parser("signal", help="send a signal to an execution")
    p.add_argument("execution_id")
    p.add_argument("name")
    p.add_argument("--data", help="JSON payload")
    p.add_argument("--signal-id", help="idempotency id (default: random)")
    p.set_defaults(func=cmd_signal)

    p = sub.add_parser("execution", help="show or cancel an execution")
    p.add_argument("action", choices=["show", "cancel"])
    p.add_argument("execution_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--reason", help="why it is cancelled (recorded)")
    p.set_defaults(func=cmd_execution)

    p = sub.add_parser("inspect", help="an execution's timeline, state, pending timer and wait, dead letters")
    p.add_argument("execution_id")
    p.add_argument("--json", action="store_true", help="the same facts as JSON")
    p.add_argument("--from-file", metavar="FILE", help="read it from an archive of `ordo ledger export`")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("replay", help="re-run recorded inputs through the dispatcher (no side effects) and diff")
    p.add_argument("execution_id", nargs="?", help="the execution to replay (or --sample)")
    p.add_argument("--definition", metavar="FILE", help="replay against this definition (need not be deployed)")
    p.add_argument("--version", type=int, metavar="N", help="replay against this deployed version")
    p.add_argument("--sample", type=int, metavar="N", help="replay N finished executions picked at random")
    p.add_argument("--workflow", metavar="W", help="with --sample: the workflow id")
    p.add_argument("--tenant", metavar="T", help="with --sample: only this tenant's executions")
    p.add_argument(
        "--engine",
        metavar="NAME",
        help="replay on this dispatcher build: compiled, pure, an ordo.engines entry point, or module:PACKAGE.MODULE",
    )
    p.add_argument(
        "--import",
        dest="import_file",
        metavar="FILE",
        help="compare another engine's exported executions (JSON lines) with Ordo's decisions",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "dlq", help="this deployment's dead letters: list, show ID [--all-deployments], retry ID | --all"
    )
    p.add_argument("action", choices=["list", "show", "retry"])
    p.add_argument("id", nargs="?", help="a dead letter's id")
    p.add_argument(
        "--all",
        action="store_true",
        help="retry every open letter of this deployment (narrow it with --reason/--action)",
    )
    p.add_argument(
        "--all-deployments",
        action="store_true",
        help="list or show the letters of every deployment sharing the ledger, each with its deployment "
        "(default: this one's)",
    )
    p.add_argument("--reason")
    p.add_argument("--action", dest="only_action", metavar="ACTION", help="only failed steps of this action")
    p.add_argument("--tenant", help="only this tenant's letters")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("rollout", help="progressive rollout of a workflow version: start, status, pause, resume, abort")
    p.add_argument("action", choices=["start", "status", "pause", "resume", "abort"])
    p.add_argument("--workflow", metavar="W", help="the workflow id")
    p.add_argument("--tenant", metavar="T", help="the tenant (needed only when several deploy workflow W)")
    p.add_argument("--to-version", type=int, metavar="N", help="start: the candidate, a deployed version")
    p.add_argument("--definition", metavar="FILE", help="start: deploy this definition as the candidate")
    p.add_argument("--from-version", type=int, metavar="N", help="start: the baseline (default: what runs now)")
    p.add_argument(
        "--engine", metavar="NAME", help="start: a candidate engine (dispatcher build) for the version that runs now"
    )
    p.add_argument("--stages", default="1,5,25,50,100", help="start: the candidate's share at each stage, in %%")
    p.add_argument("--min-dwell", default="60s", help="start: the least time at each stage (default 60s)")
    p.add_argument("--min-sample", type=int, default=100, help="start: finished candidate executions per stage")
    p.add_argument(
        "--max-failure-rate", default="0.01", help="start: how much higher than the baseline's (default 0.01, or off)"
    )
    p.add_argument("--max-p99-ms", default=None, help="start: how much slower the p99 action step (default off)")
    p.add_argument(
        "--shadow", default="0", metavar="PERCENT", help="start: run the candidate in shadow beside this share"
    )
    p.add_argument("--max-divergence-rate", default=None, help="start: of shadow runs that diverge (default off)")
    p.add_argument("--reason", help="pause, resume, abort: why (logged with the change)")
    p.add_argument("--json", action="store_true", help="status: as JSON")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("profile", help="record a flame graph of a live worker with py-spy (needs root)")
    p.add_argument("--worker", type=int, default=0, metavar="I", help="worker index (default 0)")
    p.add_argument("--pid", type=int, default=None, help="profile this pid instead of looking the worker up")
    p.add_argument("--seconds", type=int, default=30, metavar="S", help="how long to record (default 30)")
    p.add_argument("--out", default=None, metavar="FILE", help="the SVG to write (default ordo-wI-PID.svg)")
    p.add_argument("--no-native", action="store_true", help="leave out C and Cython frames")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("check", help="check the ledger's invariants (exit 1 on any violation)")
    p.add_argument(
        "--overdue-after",
        type=float,
        default=300.0,
        metavar="S",
        help="a timer this many seconds past due counts as never fired (default 300)",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("nats-mapping", help="print the NATS account mapping that trigger_streams > 1 needs")
    p.set_defaults(func=cmd_nats_mapping)

    p = sub.add_parser("ledger", help="the ledger's day partitions: maintain, retention, export")
    p.add_argument("action", choices=["maintain", "retention", "export"])
    p.add_argument("--ahead", type=int, default=7, metavar="DAYS", help="maintain: days ahead (default 7)")
    p.add_argument("--keep", metavar="DURATION", help="retention: e.g. 14d (default: the retention_keep setting)")
    p.add_argument("--before", metavar="DATE", help="export: the finished executions of the days before DATE")
    p.add_argument("--out", metavar="FILE", help="export: the archive to write (.jsonl.gz)")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("console", help="the operator console in the browser (tokens: ORDO_CONSOLE_TOKENS)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8360, help="port to listen on (default 8360)")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("bench", help="run a bench scenario (python -m bench)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    from actions.plugins import PluginError

    from .servers import ServerVersionError
    from .topology import StreamSetupError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        # REMAINDER does not take options that come first (`ordo bench --list`).
        args.rest = unknown + args.rest
    try:
        config = config_module.load(args.config)
    except (OSError, ValueError) as exc:
        sys.exit(f"ordo: bad configuration: {exc}")
    _setup_logging(args, config)
    # What the operator must fix outside Ordo (a server too old, a stream NATS refused or a
    # subject mapping it lacks, a plug-in that does not load) is a message naming it, not a
    # traceback; PluginError's message names the plug-in, where it was declared and why it failed.
    try:
        return args.func(args, config) or 0
    except (ServerVersionError, StreamSetupError, PluginError) as exc:
        sys.exit(f"ordo: {exc}")
