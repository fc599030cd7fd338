"""Bench scenarios: which trigger events a run publishes and how its ledger is verified.

A scenario is a class registered in `SCENARIOS` under its name; the runner
(`bench.__main__`) and the generator process (`bench.publisher`) look it up by
name. W1 needs nothing but trigger events and the ledger check below; the
scenarios with waits, signals or failures (w2-signals, w3-timers,
w4-retries) will bring their own events and their own `verify()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generator import trigger_event


@dataclass
class Verification:
    """What the ledger says about one run's executions; `ok` when all are as expected."""

    expected: int
    executions: int
    distinct_events: int
    completed: int
    expected_steps: int
    expected_history: int

    @property
    def ok(self) -> bool:
        n = self.expected
        return (self.executions == n and self.distinct_events == n and self.completed == n
                and self.expected_steps == n and self.expected_history == n)

    def problems(self) -> list[str]:
        n = self.expected
        found = []
        for name in ("executions", "distinct_events", "completed", "expected_steps", "expected_history"):
            value = getattr(self, name)
            if value != n:
                found.append(f"{name} {value} of {n}")
        return found

    def as_dict(self) -> dict:
        return {"ok": self.ok, "expected": self.expected, "executions": self.executions,
                "distinct_events": self.distinct_events, "completed": self.completed,
                "expected_steps": self.expected_steps, "expected_history": self.expected_history,
                "problems": self.problems()}


# One row: per-execution facts of the run, joined with a digest of its history.
# `expected_history` counts executions whose transitions are exactly seq 1..N,
# `started` first, `completed` last, and the given number of each kind.
_VERIFY = """
WITH e AS (
    SELECT execution_id, event_id, status, steps, seq
    FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
), t AS (
    SELECT tr.execution_id, count(*) AS n, min(tr.seq) AS lo, max(tr.seq) AS hi,
           count(*) FILTER (WHERE tr.kind = 'started' AND tr.seq = 1) AS started_first,
           count(*) FILTER (WHERE tr.kind = 'completed') AS completed,
           max(tr.seq) FILTER (WHERE tr.kind = 'completed') AS completed_seq,
           count(*) FILTER (WHERE tr.kind = $4) AS step_kind
    FROM ordo.transitions tr JOIN e USING (execution_id)
    GROUP BY tr.execution_id
)
SELECT count(*) AS executions,
       count(DISTINCT e.event_id) AS distinct_events,
       count(*) FILTER (WHERE e.status = 'completed') AS completed,
       count(*) FILTER (WHERE e.steps = $3) AS expected_steps,
       count(*) FILTER (WHERE t.n = $3 + 2 AND t.lo = 1 AND t.hi = $3 + 2 AND e.seq = $3 + 2
                        AND t.started_first = 1 AND t.completed = 1 AND t.completed_seq = $3 + 2
                        AND t.step_kind = $3) AS expected_history
FROM e LEFT JOIN t USING (execution_id)
"""


class Scenario:
    """The base: trigger events of one type for one tenant, each running `steps` steps."""

    name = ""
    description = ""
    tenant = "bench"
    event_type = ""
    #: Steps each execution runs, and the transition kind each step writes.
    steps = 0
    step_kind = "set"

    def event(self, run_id: str, i: int) -> dict:
        """Trigger event `i` of run `run_id`; its event id is `<run_id>-<i>`."""
        return trigger_event(run_id, i, tenant=self.tenant, event_type=self.event_type)

    async def verify(self, conn, run_id: str, expected: int) -> Verification:
        r = await conn.fetchrow(_VERIFY, self.tenant, f"{run_id}-%", self.steps, self.step_kind)
        return Verification(expected=expected, executions=r["executions"], distinct_events=r["distinct_events"],
                            completed=r["completed"], expected_steps=r["expected_steps"],
                            expected_history=r["expected_history"])


class LinearFive(Scenario):
    name = "w1"
    description = "linear-5: five in-process set steps, no waits (daemon/examples/linear5.json)"
    event_type = "bench.linear5"
    steps = 5


#: Every scenario by name; `python -m bench --list` prints them.
SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (LinearFive,)}


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise SystemExit(f"bench: unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}") from None
