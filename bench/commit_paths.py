"""What one ledger commit of new executions costs, by the path the batcher takes for it.

    python -m bench.commit_paths [--rows 10] [--commits 2000] [--repeat 3] [--json]

No NATS and no worker: the batcher alone commits `--commits` batches of
`--rows` enrolments that end in the commit that enrols them (W1's five set
steps), one batch after another, each way:

- `lone COPY`: as they are, they need only their rows, and one COPY in
  autocommit commits them (ledger/batcher.py);
- `transaction`: each batch's first enrolment also asks for an effect on the
  world, so the batch is a transaction: BEGIN, txid_current(), the COPY,
  COMMIT.

It reports, per commit, the wall time and the CPU of this process and of the
connection's backend (read from /proc: the Postgres server must run on this
machine). A quiet tenant's trigger comes nearly alone: w7-noisy's quiet load
commits ~12 rows at a time, where W1's closed run commits thousands.

Postgres is ORDO_PG_DSN's (a database of its own: the enrolments stay in
it), else an embedded one in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import orjson

from daemon import config as config_module
from daemon.servers import EmbeddedPostgres
from hotpath import ExecutionState
from ledger import connection
from ledger.batcher import ExecutionChange, LedgerBatcher, Unit
from ledger.executions import ExecutionRecord
from ledger.schema import migrate

WAYS = ("lone COPY", "transaction")
STEPS = 5


class TriggerMessage:
    """A unit's source as the batcher sees it: a trigger message (tests commit with it too)."""

    key = None
    subject = "ordo.triggers.bench.contact.created"
    stream = "ORDO_TRIGGERS"
    data = b"{}"
    batch_index = None

    def __init__(self, stream_seq: int):
        self.stream_seq = stream_seq


def finished_enrolment(
    n: int, *, effect: bool = False, context: dict | None = None, execution_id: str | None = None
) -> ExecutionChange:
    """A new execution that ran W1's five steps and ended in the commit that enrols it, with `context`
    (its last step's by default): it needs only its row, and a lone COPY commits it. With `effect`, it
    also asks for an event to be emitted once it has committed, and a transaction commits it."""
    execution_id = execution_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    # A trigger of noon: one from the first hour of its day is also looked up on the day before.
    noon_ms = now.replace(hour=12, minute=0, second=0, microsecond=0).timestamp() * 1000
    state = ExecutionState(
        execution_id, subject={"id": f"c{n}"}, event={"event_id": f"e{n}", "ts": noon_ms}, tenant="bench"
    )
    record = ExecutionRecord(execution_id, "bench", "linear5", 1, "contact", f"e{n}", 0, now, 0, state)
    state.status, state.seq = "completed", STEPS + 2
    state.context = {"step": STEPS} if context is None else context
    transitions = [(1, "", "started", {"workflow_id": "linear5", "version": 1})]
    transitions += [(i + 2, f"s{i}", "step_completed", None) for i in range(STEPS)]
    transitions.append((STEPS + 2, "", "completed", None))
    change = record.change(transitions, now)
    if effect:
        change.after_commit = [("emit", {"event": "bench.done"})]
    return change


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(dsn: str, way: str, rows: int, commits: int) -> dict:
    """Commit `commits` batches of `rows` enrolments `way`; per commit: wall ms, client and backend CPU µs."""
    batches = [
        [Unit(TriggerMessage(i), [finished_enrolment(i, effect=way == "transaction" and i == 0)]) for i in range(rows)]
        for _ in range(commits)
    ]
    batcher = LedgerBatcher(dsn, max_rows=rows, max_ms=0)
    conn = await batcher.connect()
    backend = conn.get_server_pid()
    try:
        cpu, backend_cpu, started = time.process_time(), _cpu_s(backend), time.perf_counter()
        for units in batches:
            result = await batcher.commit(units, {}, {})
            if len(result.accepted) != rows:
                raise RuntimeError(f"{way}: a commit accepted {len(result.accepted)} of {rows} enrolments")
        wall = time.perf_counter() - started
        cpu, backend_cpu = time.process_time() - cpu, _cpu_s(backend) - backend_cpu
    finally:
        await batcher.close()
    return {
        "way": way,
        "rows": rows,
        "commits": commits,
        "wall_ms": wall / commits * 1e3,
        "client_cpu_us": cpu / commits * 1e6,
        "backend_cpu_us": backend_cpu / commits * 1e6,
    }


async def main_async(args, dsn: str) -> dict:
    config = config_module.load()
    db = await connection.connect(dsn, tcp_timeout_s=config.pg_tcp_timeout_s)
    try:
        await migrate(db)
    finally:
        await db.close()
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeat):  # the ways alternate: a drift of the machine's speed hits both
        for way in WAYS:
            runs[way].append(await measure(dsn, way, args.rows, args.commits))
    keys = ("wall_ms", "client_cpu_us", "backend_cpu_us")
    medians = {way: {key: statistics.median(r[key] for r in done) for key in keys} for way, done in runs.items()}
    return {"rows": args.rows, "commits": args.commits, "repeat": args.repeat, "medians": medians, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commit_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10, help="enrolments per commit (default 10)")
    parser.add_argument("--commits", type=int, default=2000, help="commits per run (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way, alternated (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    args = parser.parse_args(argv)
    import uvloop

    with ExitStack() as stack:
        dsn = config_module.load().pg_dsn
        if not dsn:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ordo-commit-paths-")))
            dsn = stack.enter_context(EmbeddedPostgres(data_dir / "postgres")).dsn
        report = uvloop.run(main_async(args, dsn))
    if args.json:
        print(orjson.dumps(report).decode())
        return 0
    for way, median in report["medians"].items():
        print(
            f"{way:<12} {args.rows} rows a commit: {median['wall_ms']:.2f} ms, {median['client_cpu_us']:.0f} µs of "
            f"this process's CPU, {median['backend_cpu_us']:.0f} µs of its backend's (medians of {args.repeat})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
