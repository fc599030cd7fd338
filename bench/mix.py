"""`w9-mix`: the platform's traffic in miniature, for soaks: quick runs, long waits and signals together.

Each trigger event picks its kind by a hash of its event id:

- 80% run W1's five set steps and complete at once;
- 15% wait until a moment --wait MIN-MAX seconds (default 1-600) after their
  trigger was sent, then complete;
- 5% wait the same way and receive --signals signals (default 3) while they
  wait, the first --signal-delay seconds (5) after their trigger, one a
  second after that.

Signals go onto the execution's subject as an operator's would. One that
reaches the engine before its execution's enrolment committed is
dead-lettered (`unknown_execution`), not lost: the run is verified on that
sum (signals recorded in the history + dead-lettered = published), every
execution completed, no timer left. A soak of it:

    python -m bench w9-mix --rate 2000 --duration 1800 --workers 2 --timeout 2700 --retention 5m --plot mix.png

With waits of up to 600 s the run ends that long after the last publish (hence
the --timeout). At 4,000/s on the project's 2-core VM it fell behind from its
first minute and its signals overtook their enrolments (README "Soaks").
"""

from __future__ import annotations

import asyncio
import heapq
import time
import zlib

import orjson

from ledger import run_checks, runs

from .generator import publish, trigger_event
from .scenarios import SCENARIOS, Checks, Scenario, _range

#: Shares of the kinds, in percent of the trigger events (by hash).
QUICK_PERCENT = 80
SIGNALLED_PERCENT = 5


class Mix(Scenario):
    name = "w9-mix"
    description = "80% W1, 15% wait 1-600 s, 5% wait and take 3 signals meanwhile: a soak's traffic"
    workflow_file = "w9-mix.json"
    default_count = 20_000
    defaults = {"wait": "1-600", "signals": 3, "signal_delay": 5.0}
    median_fields = ("signals_published", "signals_dead_lettered")
    #: In the generator: a heap of (publish at, execution id, signal number) of the signals to send.
    _signals_due: list | None = None

    def kind(self, event_id: str) -> str:
        bucket = zlib.crc32(event_id.encode()) % 100
        if bucket < QUICK_PERCENT:
            return "quick"
        return "wait" if bucket < 100 - SIGNALLED_PERCENT else "signalled"

    def event(self, run_id: str, i: int) -> dict:
        event_id = f"{run_id}-{i}"
        kind = self.kind(event_id)
        data: dict = {"kind": kind, "amount": i}
        if kind != "quick":
            lo, hi = _range(self.options["wait"])
            wait_s = lo + (zlib.crc32(event_id.encode()[::-1]) % (hi - lo + 1))
            if kind == "signalled":  # still waiting when its last signal comes, with 5 s to spare
                wait_s = max(wait_s, int(self.options["signal_delay"]) + int(self.options["signals"]) + 5)
            # The trigger goes out now (open mode builds each event when it is due).
            data["due_ms"] = int(time.time() * 1000) + 1000 * wait_s
        if kind == "signalled" and self._signals_due is not None:
            from daemon.topology import execution_id_for

            execution_id = execution_id_for(self.tenant, self.workflow_id(run_id) or "", event_id)
            first = time.monotonic() + float(self.options["signal_delay"])
            for n in range(int(self.options["signals"])):
                heapq.heappush(self._signals_due, (first + n, execution_id, n))
        return trigger_event(run_id, i, tenant=self.tenant, event_type=self.trigger_type(run_id), data=data)

    def timeout(self, expected: int) -> float:
        return 180.0 + _range(self.options["wait"])[1] + expected / 500.0

    def stall_grace(self) -> float:
        return float(_range(self.options["wait"])[1])

    def _signalled_ids(self, run_id: str, count: int) -> list[str]:
        from daemon.topology import execution_id_for

        workflow_id = self.workflow_id(run_id) or ""
        return [
            execution_id_for(self.tenant, workflow_id, f"{run_id}-{i}")
            for i in range(count)
            if self.kind(f"{run_id}-{i}") == "signalled"
        ]

    async def generate(self, js, topology, run_id: str, count: int, **kwargs) -> dict:
        """The trigger events as the base publishes them, and beside them each signalled execution's
        signals, on their own schedule."""
        due: list = []
        self._signals_due = due
        triggers_done = asyncio.Event()
        sent = 0

        async def signals() -> None:
            nonlocal sent
            while due or not triggers_done.is_set():
                if not due or due[0][0] > time.monotonic():
                    await asyncio.sleep(0.01)
                    continue
                _, execution_id, n = heapq.heappop(due)
                body = {
                    "v": 1,
                    "kind": "signal",
                    "execution_id": execution_id,
                    "signal_id": f"nudge-{n}",
                    "name": "nudge",
                    "data": {"n": n},
                }
                subject = topology.exec_subject(execution_id)
                await publish(js, subject, orjson.dumps(body), f"signal:{execution_id}:nudge-{n}")
                sent += 1

        sender = asyncio.create_task(signals())
        try:
            done = await super().generate(js, topology, run_id, count, **kwargs)
        finally:
            triggers_done.set()
        await sender
        return {**done, "published": done["published"] + sent, "signals_published": sent}

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        ids = self._signalled_ids(run_id, expected)
        row = await run_checks.mix_outcomes(conn, self.tenant, self.workflow_id(run_id) or "", ids)
        published = (done or {}).get("signals_published", len(ids) * int(self.options["signals"]))
        checks = Checks(expected)
        checks.add("executions", row["executions"], expected)
        checks.add("completed", row["completed"], expected)
        checks.add("timers_left", row["timers_left"], 0)
        checks.add("signals_out_of_order", row["signals_out_of_order"], 0)
        checks.add("signals_recorded_or_dead_lettered", row["signals"] + row["signals_dead_lettered"], published)
        checks.facts["signals_recorded"] = int(row["signals"])
        checks.facts["signals_dead_lettered"] = int(row["signals_dead_lettered"])
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        facts = run.verification.get("facts", {})
        progress = await runs.workflow_progress(pool, self.tenant, run.run_id)
        return {
            "executions": int(progress["total"]),
            "signals_published": (done or {}).get("signals_published", 0),
            "signals_recorded": facts.get("signals_recorded", 0),
            "signals_dead_lettered": facts.get("signals_dead_lettered", 0),
        }

    def summary(self, m: dict) -> list[str]:
        return [
            f"  signals      {m['signals_published']:,} published: {m['signals_recorded']:,} recorded in order "
            f"while their executions waited, {m['signals_dead_lettered']:,} dead-lettered (sent before the "
            "enrolment committed)"
        ]


SCENARIOS[Mix.name] = Mix
