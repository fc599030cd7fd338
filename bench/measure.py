"""Reading results back from the ledger: progress while a run goes, a summary after.

The ledger is the record of truth, so throughput and latency are measured on
what has committed: an execution counts when its final state is in Postgres,
and its latency runs from its trigger's intended send time (`ts`) to the
commit that finished it.
"""

import asyncio
import sys
import time
from dataclasses import asdict, dataclass

_COUNT = """
SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')) AS finished,
       count(*) AS total
FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
"""

_SUMMARY = """
WITH runs AS (
    SELECT status, steps, created_at, finished_at,
           extract(epoch FROM finished_at) * 1000.0 - (event->>'ts')::float8 AS latency_ms
    FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
)
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) AS executions,
       coalesce(sum(steps), 0) AS steps,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99,
       max(latency_ms) AS max,
       extract(epoch FROM max(finished_at))::float8 AS last_commit
FROM runs
"""

_FINISHED = """
SELECT extract(epoch FROM finished_at)::float8 AS finished, (event->>'ts')::float8 AS ts, steps
FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2 AND finished_at IS NOT NULL
"""


@dataclass
class Summary:
    executions: int
    completed: int
    failed: int
    steps: int
    seconds: float
    executions_per_s: float
    steps_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        return (
            f"  executions   {self.executions} ({self.completed} completed, {self.failed} failed)\n"
            f"  wall time    {self.seconds:.2f} s (first publish to last commit)\n"
            f"  throughput   {self.executions_per_s:,.0f} executions/s, {self.steps_per_s:,.0f} steps/s\n"
            f"  latency      p50 {self.p50_ms:.1f} ms  p95 {self.p95_ms:.1f} ms  "
            f"p99 {self.p99_ms:.1f} ms  max {self.max_ms:.1f} ms (trigger ts -> committed)"
        )


async def wait_until_finished(pool, tenant: str, run_id: str, expected: int, *, timeout: float,
                              published=lambda: 0, out=sys.stderr) -> int:
    """Poll the ledger until `expected` executions of this run have finished; prints a progress line."""
    pattern = f"{run_id}-%"
    started = time.monotonic()
    last, last_t = 0, started
    finished = 0
    tty = out is not None and out.isatty()
    last_line = 0.0
    while time.monotonic() - started < timeout:
        row = await pool.fetchrow(_COUNT, tenant, pattern)
        finished = row["finished"]
        now = time.monotonic()
        rate = (finished - last) / max(now - last_t, 1e-6)
        last, last_t = finished, now
        line = f"  published {published():>9,}  finished {finished:>9,}/{expected:,}  {rate:>9,.0f}/s"
        if tty:
            out.write("\r" + line + " ")
            out.flush()
        elif out is not None and (now - last_line >= 5.0 or finished >= expected):
            out.write(line + "\n")
            last_line = now
        if finished >= expected:
            break
        await asyncio.sleep(0.5)
    if tty:
        out.write("\n")
    return finished


async def count_finished(pool, tenant: str, run_id: str) -> int:
    """Executions of run `run_id` that have reached a final state in the ledger."""
    return (await pool.fetchrow(_COUNT, tenant, f"{run_id}-%"))["finished"]


async def finish_times(pool, tenant: str, run_id: str) -> list:
    """(finished_at in epoch s, trigger ts in epoch ms, steps) of every finished execution of the run."""
    return await pool.fetch(_FINISHED, tenant, f"{run_id}-%")


async def summarise(pool, tenant: str, run_id: str, started_wall: float) -> Summary:
    r = await pool.fetchrow(_SUMMARY, tenant, f"{run_id}-%")
    last_commit = float(r["last_commit"]) if r["last_commit"] is not None else None
    seconds = max(last_commit - started_wall, 1e-6) if last_commit is not None else 0.0
    return Summary(
        executions=r["executions"],
        completed=r["completed"],
        failed=r["failed"],
        steps=int(r["steps"]),
        seconds=seconds,
        executions_per_s=r["executions"] / seconds if seconds else 0.0,
        steps_per_s=int(r["steps"]) / seconds if seconds else 0.0,
        p50_ms=float(r["p50"] or 0),
        p95_ms=float(r["p95"] or 0),
        p99_ms=float(r["p99"] or 0),
        max_ms=float(r["max"] or 0),
    )
