"""How long the console's executions search takes on a large ledger.

    python -m bench.console_search --executions 10000000 [--tenants 20] [--repeat 7] [--json]

Fills an EMPTY database (ORDO_PG_DSN, never the command line: a DSN may hold a
password; it refuses a database that holds a ledger already) with synthetic executions (ledger/console.py,
`add_synthetic_executions`: generate_series in Postgres, a million rows per
statement), then runs each kind of search the console offers `--repeat`
times and reports the median and the slowest, in ms, measured from the
client (the round trip included). A deep page is one whose cursor sits in
the middle of the ledger: keyset paging makes it cost what the first does.
`--keep` reuses a database this bench filled before (same sizes) and skips
the load.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from daemon import config as config_module
from ledger import connection, workflows
from ledger import console as queries
from ledger.schema import migrate, schema_version

CHUNK = 1_000_000
#: The synthetic ledger spans this much time, its executions evenly spread.
SPAN = timedelta(days=30)
WORKFLOWS = 7


def synthetic_id(i: int) -> str:
    """Execution i's id, as add_synthetic_executions makes it (md5 of its name)."""
    return str(uuid.UUID(hashlib.md5(f"console-bench-{i}".encode()).hexdigest()))


async def fill(conn, executions: int, tenants: int, start: datetime, spacing_s: float) -> float:
    """Deploy the workflows and add the executions; seconds it took."""
    began = time.monotonic()
    for t in range(tenants):
        for w in range(WORKFLOWS):
            definition = {
                "id": f"workflow-{w}",
                "tenant": f"tenant-{t}",
                "trigger": {"event": "contact.created"},
                "steps": [
                    {"id": "greet", "type": "set", "values": {"greeting": "hi"}},
                    {"id": "wait", "type": "wait_for_signal", "signal": "done"},
                    {"id": "done", "type": "end"},
                ],
            }
            await workflows.deploy(conn, definition)
    for first in range(0, executions, CHUNK):
        count = min(CHUNK, executions - first)
        await queries.add_synthetic_executions(conn, first, count, tenants, WORKFLOWS, start, spacing_s)
        print(f"  {first + count:,} executions ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    await queries.analyze(conn)
    return time.monotonic() - began


def searches(executions: int, tenants: int, start: datetime, spacing_s: float) -> dict[str, tuple]:
    """name -> (ExecutionSearch, cursor): each kind of search the console makes."""
    tenant = ("tenant-3",)
    middle = executions // 2
    middle -= middle % tenants  # an execution of tenant-0 ...
    middle += 3  # ... and of tenant-3
    cursor = (start + timedelta(seconds=middle * spacing_s), synthetic_id(middle))
    hour_from = start + timedelta(seconds=middle * spacing_s)
    subject = f"c-{middle // 3}"
    event_ids = tuple(synthetic_id(middle + k * tenants) for k in range(WORKFLOWS))
    s = queries.ExecutionSearch
    return {
        "all tenants, newest page": (s(), None),
        "all tenants, a page in the middle": (s(), cursor),
        "all tenants, failed": (s(status="failed"), None),
        "one tenant, newest page": (s(tenants=tenant), None),
        "one tenant, a page in the middle": (s(tenants=tenant), cursor),
        "one tenant, failed": (s(tenants=tenant, status="failed"), None),
        "one tenant, one workflow, waiting": (s(tenants=tenant, workflow_id="workflow-3", status="waiting"), None),
        "one tenant, one hour": (
            s(tenants=tenant, created_from=hour_from, created_to=hour_from + timedelta(hours=1)),
            None,
        ),
        "one tenant, a contact": (s(tenants=tenant, subject_id=subject), None),
        "by trigger event id (7 workflows)": (s(execution_ids=event_ids), None),
    }


async def measure(conn, search, cursor, repeat: int) -> dict:
    await queries.search_executions(conn, search, cursor, 51)  # warm-up (and the plan)
    took, rows = [], 0
    for _ in range(repeat):
        began = time.perf_counter()
        rows = len(await queries.search_executions(conn, search, cursor, 51))
        took.append((time.perf_counter() - began) * 1000)
    return {"median_ms": statistics.median(took), "max_ms": max(took), "rows": rows}


async def main_async(args) -> dict:
    config = config_module.load()
    dsn = config.pg_dsn
    if not dsn:
        sys.exit("bench.console_search: set ORDO_PG_DSN (an empty database of its own)")
    # As the console's own pool connects (daemon/console/app.py): no JIT.
    conn = await connection.connect(
        dsn, tcp_timeout_s=config.pg_tcp_timeout_s, command_timeout=3600, server_settings={"jit": "off"}
    )
    try:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        spacing_s = SPAN.total_seconds() / args.executions
        report: dict = {"executions": args.executions, "tenants": args.tenants, "repeat": args.repeat}
        if args.keep:
            report["load_s"] = None
        else:
            if await schema_version(conn) != 0:
                sys.exit("bench.console_search: the database holds a ledger already; give it an empty one")
            await migrate(conn)
            report["load_s"] = await fill(conn, args.executions, args.tenants, start, spacing_s)
        report["searches"] = {
            name: await measure(conn, search, cursor, args.repeat)
            for name, (search, cursor) in searches(args.executions, args.tenants, start, spacing_s).items()
        }
        return report
    finally:
        await conn.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="the database was filled by this bench already")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    load = "" if report["load_s"] is None else f", loaded in {report['load_s']:.0f} s"
    print(f"console search on {report['executions']:,} executions of {report['tenants']} tenants{load}")
    print(f"  {'search':<40} {'median ms':>10} {'max ms':>8} {'rows':>5}")
    for name, r in report["searches"].items():
        print(f"  {name:<40} {r['median_ms']:>10.2f} {r['max_ms']:>8.2f} {r['rows']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
