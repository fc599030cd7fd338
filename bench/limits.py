"""`w8-limits`: one webhook step under a shared rate limit, and what the provider saw.

N executions each call the bench's local provider once, from a step declaring
`"limits": {"rate": "<--limit>/s"}`; the run's workers (one per core, or
--workers) share the limit through the ledger. It reports the most calls the
provider received within any 1 s window (the limit holds when that is at most
the limit plus 5%), the calls/s over the run, and whether every call was made
exactly once (distinct idempotency keys, none repeated).

    python -m bench w8-limits -n 10000 --limit 500 --workers 2
"""

from __future__ import annotations

from ledger import runs

from .scenarios import SCENARIOS, Checks, Webhooks


class LimitedWebhooks(Webhooks):
    name = "w8-limits"
    description = "one webhook call per execution under a rate limit of --limit calls/s shared by all workers"
    steps = 1
    default_count = 10_000
    defaults = {"delay": 0.0, "limit": 500}
    median_fields = ("calls_per_s", "most_in_any_second")

    @property
    def limit(self) -> int:
        return int(self.options["limit"])

    def shape(self, definition: dict) -> dict:
        first = definition["steps"][0]
        first["input"]["url"] = self.provider.url
        first["limits"] = {"rate": f"{self.limit}/s"}
        definition["steps"] = [first]
        return definition

    def timeout(self, expected: int) -> float:
        return max(120.0, 3.0 * expected / self.limit)

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        progress = await runs.workflow_progress(conn, self.tenant, self.workflow_id(run_id))
        stats = self.provider.stats()
        checks = Checks(expected)
        checks.add("executions", progress["total"], expected)
        checks.add("finished", progress["finished"], expected)
        checks.add("calls_made_once", stats["keys"], expected)
        checks.add("repeated_calls", stats["calls"] - stats["keys"], 0)
        checks.add("within_limit_plus_5pct", self.provider.most_in_any_second() <= self.limit * 1.05, True)
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        seconds = run.seconds
        calls = self.provider.calls
        return {
            "actions": calls,
            "calls": calls,
            "calls_per_s": calls / seconds if seconds else 0.0,
            "most_in_any_second": self.provider.most_in_any_second(),
            "limit": self.limit,
            "provider_process_cpu_percent": self.provider.stats()["process_cpu_percent"],
        }

    def summary(self, m: dict) -> list[str]:
        return [
            f"  limits       {m['calls']:,} calls under a limit of {m['limit']}/s: {m['calls_per_s']:,.0f} calls/s, "
            f"at most {m['most_in_any_second']} in any 1 s window at the provider"
        ]


# Registered here, beside bench/scenarios.py's own: the bench and its generator process import this module.
SCENARIOS[LimitedWebhooks.name] = LimitedWebhooks
