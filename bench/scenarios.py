"""Bench scenarios: which trigger events a run publishes and how its ledger is verified.

A scenario is a class registered in `SCENARIOS` under its name; the runner
(`bench.__main__`) and the generator process (`bench.publisher`) look it up by
name. W1 needs nothing but trigger events and the ledger check below (its
workflow is one of daemon/examples, deployed by `prepare`).

The other scenarios deploy their own workflow per run (bench/workflows/,
with the run id as workflow id and `bench.<run id>` as trigger event, so that
runs on a shared ledger never enrol into each other's workflows and the
ledger is read through its (tenant, workflow_id, status) index), bring their
own events (`generate`, run in the generator process), their own ledger
checks (`verify`) and their own numbers (`measure`):

  w2-signals  N executions each apply S signals, published onto their
              subjects interleaved across executions; applied signals/s, and
              every execution applied exactly S, in publish order
  w3-timers   N executions each wait a whole number of seconds (--wait
              MIN-MAX, plus --hold), or until a moment spread over S seconds
              (--due-over S, after --hold); fire rate and lateness, enrolment
              rate, worker RSS against the number of waiting executions
  w4-retries  N executions each call a flaky local HTTP provider through the
              webhook action; throughput, retries, dead letters as expected
  w5-actions  N executions of five `noop` action steps (in-process, or served
              by an external action worker with --external 1); action steps/s
  w6-webhooks N executions of three webhook calls to a local provider that
              answers after --delay ms; calls/s and the provider's CPU
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ledger import connection, run_checks, runs

from .generator import (
    PubAcks,
    publish_atomic,
    publish_events,
    publish_messages,
    trigger_event,
)
from .histogram import Histogram
from .report import cores_line, cpu_per_event

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
EXAMPLES = Path(__file__).resolve().parent.parent / "daemon" / "examples"


@dataclass
class Verification:
    """What the ledger says about one run's executions; `ok` when all are as expected."""

    expected: int
    executions: int
    distinct_events: int
    completed: int
    expected_steps: int
    expected_history: int
    #: Checks of every run beside these (`check_routing`): name -> (found, wanted).
    checks: dict = field(default_factory=dict)

    def add(self, name: str, found, wanted) -> None:
        self.checks[name] = (found, wanted)

    @property
    def ok(self) -> bool:
        n = self.expected
        return (
            self.executions == n
            and self.distinct_events == n
            and self.completed == n
            and self.expected_steps == n
            and self.expected_history == n
            and not _mismatches(self.checks)
        )

    def problems(self) -> list[str]:
        n = self.expected
        found = []
        for name in ("executions", "distinct_events", "completed", "expected_steps", "expected_history"):
            value = getattr(self, name)
            if value != n:
                found.append(f"{name} {value} of {n}")
        return found + _mismatches(self.checks)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "expected": self.expected,
            "executions": self.executions,
            "distinct_events": self.distinct_events,
            "completed": self.completed,
            "expected_steps": self.expected_steps,
            "expected_history": self.expected_history,
            **{name: found for name, (found, _) in self.checks.items()},
            "problems": self.problems(),
        }


@dataclass
class Checks:
    """Named ledger facts against what they must be; `ok` when every one matches.

    Same interface as Verification (add(), ok, problems(), as_dict()); `facts` are
    reported but not checked.
    """

    expected: int
    checks: dict = field(default_factory=dict)  # name -> (found, wanted)
    facts: dict = field(default_factory=dict)

    def add(self, name: str, found, wanted) -> None:
        self.checks[name] = (found, wanted)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not _mismatches(self.checks)

    def problems(self) -> list[str]:
        return _mismatches(self.checks)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "expected": self.expected,
            **{name: found for name, (found, _) in self.checks.items()},
            "expected_values": {name: wanted for name, (_, wanted) in self.checks.items()},
            "facts": self.facts,
            "problems": self.problems(),
        }


def _mismatches(checks: dict) -> list[str]:
    """`name found (expected wanted)` of each check (name -> (found, wanted)) whose found is not its wanted."""
    return [f"{name} {found} (expected {wanted})" for name, (found, wanted) in checks.items() if found != wanted]


async def check_routing(conn, verification: Verification | Checks, exec_stream: str, workflow_id: str | None) -> None:
    """Every run's check beside its scenario's: no message went to a deployment its execution is not of.

    The worker that takes one dead-letters it (`other_deployment`) and acks it: a copy that went astray
    while the message itself was applied leaves every execution as the scenario expects, and a message
    that went astray alone is counted as missing, not as misrouted. A run is one deployment (its own
    prefix): it has none."""
    found = await run_checks.other_deployment_letters(conn, exec_stream, workflow_id)
    verification.add("other_deployment_letters", found, 0)


class Scenario:
    """The base: trigger events of one type for one tenant, each running `steps` steps."""

    name = ""
    description = ""
    tenant = "bench"
    event_type = ""
    #: Steps each execution runs, and the transition kind each step writes (w1's check).
    steps = 0
    step_kind = "set"
    #: -n when not given.
    default_count = 20_000
    #: bench/workflows/<file> (or an absolute path) deployed per run (id = run id, trigger =
    #: bench.<run id>), so that the run's rows are found through the (tenant, workflow_id)
    #: index; None: the workflow is one of daemon/examples as `prepare` deploys it, and the
    #: run's rows are found by event id prefix, a scan of the whole ledger.
    workflow_file: str | None = None
    #: The scenario's options (CLI flags) and their defaults.
    defaults: dict = {}
    #: Scenario numbers (keys of `measure()`) the median over repeated runs is taken of.
    median_fields: tuple = ()

    def __init__(self, options: dict | None = None):
        given = {k: v for k, v in (options or {}).items() if k in self.defaults and v is not None}
        self.options = {**self.defaults, **given}

    # -- the run's workflow ---------------------------------------------------------
    def workflow_id(self, run_id: str) -> str | None:
        return run_id if self.workflow_file else None

    def trigger_type(self, run_id: str) -> str:
        return f"bench.{run_id}" if self.workflow_file else self.event_type

    def definitions(self, run_id: str) -> list[dict]:
        """The workflow(s) this run deploys (after `start()`), shaped by the options."""
        if not self.workflow_file:
            return []
        definition = orjson.loads((WORKFLOWS / self.workflow_file).read_bytes())
        definition.pop("version", None)
        definition["id"] = self.workflow_id(run_id)
        definition["tenant"] = self.tenant
        definition["trigger"]["event"] = self.trigger_type(run_id)
        return [self.shape(definition)]

    def shape(self, definition: dict) -> dict:
        return definition

    def worker_env(self) -> dict:
        """Extra ORDO_* settings for the run's workers."""
        return {}

    async def start(self) -> None:
        """Servers the run needs in the bench process (w4's provider); before deploying."""

    async def start_beside_workers(self, env: dict) -> None:
        """Processes the run needs once the workers are up (w5's external action worker); `env` names
        the run's servers and prefix."""

    async def stop(self) -> None:
        pass

    # -- load --------------------------------------------------------------------------
    def event(self, run_id: str, i: int) -> dict:
        """Trigger event `i` of run `run_id`; its event id is `<run_id>-<i>`."""
        return trigger_event(run_id, i, tenant=self.tenant, event_type=self.trigger_type(run_id))

    def timeout(self, expected: int) -> float:
        return max(120.0, expected / 100.0)

    def expected(self, count: int) -> int:
        """Executions a closed run of -n `count` makes (w7-noisy adds its quiet tenants' to the burst)."""
        return count

    def stall_grace(self) -> float:
        """Seconds a run may legitimately show no progress beyond the stall timeout (long waits)."""
        return 0.0

    async def generate(
        self,
        js,
        topology,
        run_id: str,
        count: int,
        *,
        rate=None,
        window: int = 256,
        atomic_batch: int = 0,
        trigger_batch: int = 0,
        on_progress=None,
        pubacks=None,
    ) -> dict:
        """Publish the run's load (in the generator process); {"published", "first_publish", ...}.

        In open mode `pubacks` (a generator.PubAcks) records each event's PubAck.
        """
        first = []

        def events():
            for i in range(count):
                event = self.event(run_id, i)
                if not first:
                    first.append(time.time())
                yield event

        sent = await publish_events(
            js,
            topology,
            events(),
            window=window,
            rate=rate,
            on_progress=on_progress,
            atomic_batch=atomic_batch,
            trigger_batch=trigger_batch,
            pubacks=pubacks if rate else None,
        )
        return {"published": sent, "first_publish": first[0] if first else None}

    # -- reading the ledger ------------------------------------------------------------
    async def progress(self, pool, run_id: str) -> dict:
        """{"finished", "waiting", "total"} executions of the run now."""
        if not self.workflow_file:
            from .measure import count_finished

            return {"finished": await count_finished(pool, self.tenant, run_id)}
        return dict(await runs.workflow_progress(pool, self.tenant, self.workflow_id(run_id)))

    async def finish_times(self, pool, run_id: str) -> list:
        if not self.workflow_file:
            from .measure import finish_times

            return await finish_times(pool, self.tenant, run_id)
        return await runs.workflow_finish_times(pool, self.tenant, self.workflow_id(run_id))

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None):
        r = await run_checks.step_histories(conn, self.tenant, run_id, self.steps, self.step_kind)
        return Verification(
            expected=expected,
            executions=r["executions"],
            distinct_events=r["distinct_events"],
            completed=r["completed"],
            expected_steps=r["expected_steps"],
            expected_history=r["expected_history"],
        )

    async def measure(self, pool, run, done: dict | None) -> dict:
        """The scenario's own numbers for the report (after verify)."""
        return {}

    def action_steps(self, run) -> int | None:
        """Action steps the run's executions completed (WAL is also given per action step), after `measure()`;
        None for a scenario without action steps."""
        return None

    def summary(self, metrics: dict) -> list[str]:
        """Lines for the text table, from `measure()`'s numbers."""
        return []


class LinearFive(Scenario):
    name = "w1"
    description = "linear-5: five in-process set steps, no waits (daemon/examples/linear5.json)"
    # Deployed per run: counting a run's executions by event id prefix scanned every
    # earlier run's rows too, each time, while the load ran.
    workflow_file = str(EXAMPLES / "linear5.json")
    steps = 5
    default_count = 150_000  # ~10 s: long enough that start-up and the tail weigh little


# -- publishing onto execution subjects ----------------------------------------------------
async def _allow_atomic(js, stream: str) -> bool:
    """Let the run's execution stream take atomic batch publishes (nats-server 2.12+).

    Signals from a service that sends many at once go out as atomic batches,
    a few fsyncs per batch under `sync_interval: always`, not one per message, as the generator's
    trigger events do; the engine enables that only on the triggers stream.
    """
    from dataclasses import replace

    from daemon.servers import parse_version
    from daemon.topology import ATOMIC_PUBLISH_SERVER

    if parse_version(js._nc._server_info.get("version", "0.0.0")) < ATOMIC_PUBLISH_SERVER:
        return False
    info = await js.stream_info(stream)
    if not info.config.allow_atomic:
        await js.update_stream(replace(info.config, allow_atomic=True))
    return True


# -- w2: signals ------------------------------------------------------------------------


class Signals(Scenario):
    """N executions, each looping on wait_for_signal until the signal marked last.

    Signals, not routed trigger events: a signal is published straight onto
    the execution's own subject, so its order is the execution stream's, the
    path that promises per-execution order (guarantee 1). Trigger events
    reach a waiting execution only through the shared triggers consumer and a
    lookup of the waits, so two events for one contact fetched by two
    workers are routed in either order: not an ordering test.

    The generator enrols N executions, waits until all of them wait for their
    first signal, then publishes round after round: signal 0 of every
    execution, then signal 1 of every execution, ... (interleaved). Each
    signal carries {i, last}; the ledger must show, per execution, exactly S
    `signal` transitions with i = 0..S-1 in seq order and increasing
    `source_seq`, and the execution completed.
    """

    name = "w2-signals"
    description = "N executions each apply S signals (default 20) interleaved across executions, in order"
    workflow_file = "w2-signals.json"
    default_count = 10_000
    defaults = {"signals": 20}
    median_fields = ("applied_per_s", "signal_publish_rate", "seconds_signals")

    def timeout(self, expected: int) -> float:
        return max(180.0, expected * self.options["signals"] / 500.0)

    async def generate(
        self,
        js,
        topology,
        run_id: str,
        count: int,
        *,
        rate=None,
        window: int = 256,
        atomic_batch: int = 0,
        trigger_batch: int = 0,
        on_progress=None,
        pubacks=None,
    ) -> dict:

        from daemon import config as config_module
        from daemon.topology import execution_id_for

        enrolled = await super().generate(
            js,
            topology,
            run_id,
            count,
            window=window,
            atomic_batch=atomic_batch,
            trigger_batch=trigger_batch,
            on_progress=on_progress,
        )
        # A signal for an execution that has not committed its enrolment would be
        # dead-lettered (unknown execution): wait until all wait for the first one.
        config = config_module.load()
        conn = await connection.connect(config.pg_dsn, tcp_timeout_s=config.pg_tcp_timeout_s)
        try:
            while (await runs.workflow_progress(conn, self.tenant, run_id))["waiting"] < count:
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        ids = [execution_id_for(self.tenant, run_id, f"{run_id}-{i}") for i in range(count)]
        subjects = [topology.exec_subject(x) for x in ids]
        total = self.options["signals"]

        def messages():
            for r in range(total):
                last = r == total - 1
                for execution_id, subject in zip(ids, subjects, strict=True):
                    body = orjson.dumps(
                        {
                            "v": 1,
                            "kind": "signal",
                            "execution_id": execution_id,
                            "signal_id": f"tick-{r}",
                            "name": "tick",
                            "data": {"i": r, "last": last},
                        }
                    )
                    yield subject, body, f"{execution_id}:tick-{r}"

        def progress(n):
            if on_progress:
                on_progress(count + n)

        atomic = atomic_batch > 1 and await _allow_atomic(js, topology.exec_stream)
        signals_first = time.time()
        if atomic:
            sent = await publish_atomic(js, messages(), batch=atomic_batch, on_progress=progress)
        else:
            sent = await publish_messages(js, messages(), window=window, on_progress=progress)
        return {
            **enrolled,
            "published": count + sent,
            "signals_published": sent,
            "signals_atomic": atomic,
            "signals_first_publish": signals_first,
            "signals_last_ack": time.time(),
        }

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        total = self.options["signals"]
        r = await run_checks.signal_histories(conn, self.tenant, run_id, total)
        checks = Checks(expected)
        checks.add("executions", r["executions"], expected)
        checks.add("completed", r["completed"], expected)
        checks.add("exact_signals", r["exact_signals"], expected)
        checks.add("in_publish_order", r["in_publish_order"], expected)
        checks.add("full_history", r["full_history"], expected)
        checks.add("source_seq_regressions", await run_checks.signal_order_regressions(conn, self.tenant, run_id), 0)
        checks.facts["applied_signals"] = int(r["applied"])
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        done = done or {}
        applied = run.verification.get("facts", {}).get("applied_signals", 0)
        first, last_ack = done.get("signals_first_publish"), done.get("signals_last_ack")
        last_commit = await runs.workflow_last_commit(pool, self.tenant, run.run_id)
        seconds = (last_commit - first) if first and last_commit else 0.0
        published = done.get("signals_published", 0)
        return {
            "signals_per_execution": self.options["signals"],
            "applied_signals": applied,
            "seconds_signals": seconds,
            "applied_per_s": applied / seconds if seconds > 0 else 0.0,
            "signals_published": published,
            "signal_publish_rate": published / (last_ack - first) if first and last_ack and last_ack > first else 0.0,
            "signals_atomic": bool(done.get("signals_atomic")),
        }

    def summary(self, m: dict) -> list[str]:
        return [
            f"  signals      {m['applied_signals']:,} applied ({m['signals_per_execution']} per execution) in "
            f"{m['seconds_signals']:.2f} s: {m['applied_per_s']:,.0f} applied/s   (published at "
            f"{m['signal_publish_rate']:,.0f}/s{' in atomic batches' if m.get('signals_atomic') else ''}; "
            "first signal publish -> last commit)"
        ]


# -- w3: timers ---------------------------------------------------------------------------


def _range(text) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 0 < lo <= hi or hi - lo > 3600:
        raise ValueError(f"--wait wants MIN-MAX whole seconds, 0 < MIN <= MAX, got {text!r}")
    return lo, hi


class Timers(Scenario):
    """N executions, each waiting a whole number of seconds in MIN..MAX (plus --hold), then completing.

    The duration is picked per event (`data.wait_s`, uniform by a hash of the
    event id) and the workflow has one `wait` step per duration behind a
    `switch`: the timer starts at enrolment, so lateness measures the timers,
    not the enrolment backlog. --hold S adds S seconds to every wait, so that
    all N executions wait at once (enrolment takes longer than MAX seconds
    at a million) while the worker RSS is sampled.

    --due-over S makes the due times independent of the enrolment: each
    execution waits `until` a moment uniform (by the same hash) over S seconds
    from --hold seconds after the run starts, so N timers fall due at N/S per
    second, a rate enrolment alone cannot offer. --hold must then outlast the
    enrolment, or the first timers are late before they are set.
    """

    name = "w3-timers"
    description = "N executions each wait MIN-MAX s (default 1-60) then complete: fire lateness, worker RSS"
    workflow_file = "w3-timers.json"
    default_count = 1_000_000
    #: start_ms is no flag: the run's start, fixed by the bench (shape) and handed to the generator.
    defaults = {"wait": "1-60", "hold": 0, "due_over": 0, "start_ms": 0}
    median_fields = (
        "fired_per_s",
        "busiest_second_fires",
        "postgres_cpu_firing_percent",
        "workers_rss_firing_max_mb",
        "fired_p50_ms",
        "fired_p99_ms",
        "committed_p50_ms",
        "committed_p99_ms",
        "enrolment_per_s",
        "peak_waiting",
        "workers_rss_at_peak_mb",
        "workers_rss_max_mb",
        "workers_rss_end_mb",
    )

    @property
    def wait_range(self) -> tuple[int, int]:
        return _range(self.options["wait"])

    @property
    def due_over_s(self) -> int:
        return int(self.options["due_over"])

    def shape(self, definition: dict) -> dict:
        lo, hi = self.wait_range
        hold = int(self.options["hold"])
        if self.due_over_s:
            self.options["start_ms"] = int(time.time() * 1000)
            # The same steps as with --wait (so the same history and work): one case, one wait.
            definition["steps"] = [
                {
                    "id": "pick",
                    "type": "switch",
                    "cases": [{"when": {"eq": [1, 1]}, "next": "wait"}],
                    "default": "wait",
                },
                {"id": "wait", "type": "wait", "until": "{{event.data.due_ms}}", "next": "done"},
                {"id": "done", "type": "end"},
            ]
            return definition
        steps = [
            {
                "id": "pick",
                "type": "switch",
                "cases": [
                    {"when": {"eq": ["{{event.data.wait_s}}", d]}, "next": f"wait-{d}"} for d in range(lo, hi + 1)
                ],
                "default": f"wait-{lo}",
            }
        ]
        steps += [
            {"id": f"wait-{d}", "type": "wait", "duration": f"{hold + d}s", "next": "done"} for d in range(lo, hi + 1)
        ]
        steps.append({"id": "done", "type": "end"})
        definition["steps"] = steps
        return definition

    def event(self, run_id: str, i: int) -> dict:
        import zlib

        lo, hi = self.wait_range
        event_id = f"{run_id}-{i}"
        spread = zlib.crc32(event_id.encode())
        if self.due_over_s:
            due_ms = (
                int(self.options["start_ms"]) + 1000 * int(self.options["hold"]) + spread % (1000 * self.due_over_s)
            )
            data = {"due_ms": due_ms}
        else:
            data = {"wait_s": lo + spread % (hi - lo + 1)}
        return trigger_event(run_id, i, tenant=self.tenant, event_type=self.trigger_type(run_id), data=data)

    def _longest_wait_s(self) -> int:
        return int(self.options["hold"]) + (self.due_over_s or self.wait_range[1])

    def timeout(self, expected: int) -> float:
        return 180.0 + self._longest_wait_s() + expected / 500.0

    def stall_grace(self) -> float:
        return float(self._longest_wait_s())

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        r = await run_checks.timer_histories(conn, self.tenant, run_id)
        checks = Checks(expected)
        checks.add("executions", r["executions"], expected)
        checks.add("completed", r["completed"], expected)
        checks.add("expected_history", r["expected_history"], expected)
        checks.add("timers_left", r["timers_left"], 0)
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        lat = await run_checks.timer_lateness(pool, self.tenant, run.run_id)
        enrolled = await runs.workflow_enrolment(pool, self.tenant, run.run_id)
        first = run.first_publish
        enrol_s = (enrolled["last"] - first) if enrolled["last"] and first else 0.0
        trace = getattr(run, "trace", [])
        peak = max(trace, key=lambda s: s["waiting"], default=None)
        rss = [s["workers_rss_mb"] for s in trace if s.get("workers_rss_mb") is not None]
        lo, hi = self.wait_range

        def ms(v):
            return float(v) if v is not None else None

        # The firing: from the first timer fired to the last. The rate the timers fell due over
        # the same count says whether the workers kept up; CPU and RSS are taken over it.
        fires = lat["fires"]
        first_fired, last_fired = lat["first_fired_at"], lat["last_fired_at"]
        fire_s = (last_fired - first_fired) if fires and last_fired > first_fired else 0.0
        due_s = (lat["last_due_at"] - lat["first_due_at"]) if fires else 0.0
        sampler_report = getattr(run, "usage", None)
        usage = sampler_report(first_fired, last_fired) if sampler_report and fire_s else {}
        rss_firing = [
            s["workers_rss_mb"]
            for s in trace
            if s.get("workers_rss_mb") is not None and fire_s and first_fired <= s["t"] <= last_fired
        ]
        return {
            "wait_s": f"{lo}-{hi}" if not self.due_over_s else None,
            "due_over_s": self.due_over_s or None,
            "hold_s": int(self.options["hold"]),
            "fires": fires,
            "fired_per_s": fires / fire_s if fire_s else 0.0,
            "due_per_s": fires / due_s if due_s > 0 else 0.0,
            "fire_seconds": fire_s,
            "busiest_second_fires": lat["busiest_second_fires"] or 0,
            "postgres_cpu_firing_percent": usage.get("postgres", {}).get("cpu_percent"),
            "workers_cpu_firing_percent": usage.get("workers", {}).get("cpu_percent"),
            "workers_rss_firing_max_mb": max(rss_firing) if rss_firing else None,
            "fired_p50_ms": ms(lat["fired_p50"]),
            "fired_p99_ms": ms(lat["fired_p99"]),
            "fired_max_ms": ms(lat["fired_max"]),
            "fired_min_ms": ms(lat["fired_min"]),
            "committed_p50_ms": ms(lat["committed_p50"]),
            "committed_p99_ms": ms(lat["committed_p99"]),
            "committed_max_ms": ms(lat["committed_max"]),
            "enrolled": enrolled["n"],
            "enrolment_seconds": enrol_s,
            "enrolment_per_s": enrolled["n"] / enrol_s if enrol_s > 0 else 0.0,
            "peak_waiting": peak["waiting"] if peak else 0,
            "peak_waiting_at_s": (peak["t"] - first) if peak and first else None,
            "workers_rss_at_peak_mb": peak.get("workers_rss_mb") if peak else None,
            "workers_rss_max_mb": max(rss) if rss else None,
            "workers_rss_end_mb": rss[-1] if rss else None,
        }

    def summary(self, m: dict) -> list[str]:
        def f(v, fmt=".1f"):
            return "-" if v is None else format(v, fmt)

        return [
            f"  timers       {m['fires']:,} fired "
            + (
                f"(due over {m['due_over_s']} s after hold {m['hold_s']} s)"
                if m.get("due_over_s")
                else f"(wait {m['wait_s']} s + hold {m['hold_s']} s)"
            )
            + " in "
            f"{m['fire_seconds']:.1f} s: {m['fired_per_s']:,.0f} fired/s, busiest second "
            f"{m['busiest_second_fires']:,} (due at {m['due_per_s']:,.0f}/s)",
            f"  firing       postgres CPU {f(m['postgres_cpu_firing_percent'], '.0f')}%  workers CPU "
            f"{f(m['workers_cpu_firing_percent'], '.0f')}%  workers RSS max "
            f"{f(m['workers_rss_firing_max_mb'], '.0f')} MB (all workers, first fire -> last)",
            f"  lateness     fired p50 {f(m['fired_p50_ms'])} ms  p99 {f(m['fired_p99_ms'])} ms  "
            f"max {f(m['fired_max_ms'])} ms   committed p50 {f(m['committed_p50_ms'])} ms  "
            f"p99 {f(m['committed_p99_ms'])} ms  (intended fire time -> timer_fired / its commit)",
            f"  enrolment    {m['enrolled']:,} in {m['enrolment_seconds']:.1f} s: {m['enrolment_per_s']:,.0f}/s",
            f"  waiting      peak {m['peak_waiting']:,} at {f(m['peak_waiting_at_s'], '.0f')} s; worker RSS "
            f"{f(m['workers_rss_at_peak_mb'], '.0f')} MB then, max {f(m['workers_rss_max_mb'], '.0f')} MB, "
            f"end {f(m['workers_rss_end_mb'], '.0f')} MB (all workers)",
        ]


# -- w4: retries ---------------------------------------------------------------------------


class Retries(Scenario):
    """N executions, each one webhook call to a flaky provider (bench/provider.py) with retries.

    5% of calls get a 503 (retryable: a retry on a durable timer after
    100 ms, 200 ms, ...), 0.5% of executions a 400 on every call (not
    retryable: the step fails, the execution fails and a `step_failed` dead
    letter is written). Which ones is a hash of the event id, so the ledger is
    checked exactly: the failed executions are the permanently failing ones,
    their number is the DLQ count, and every other execution completed. The
    retries (retryable `action_failed` transitions) are reported beside the
    503s the provider answered and the action timeouts: when the offered load
    exceeds what the provider answers, calls queue in the worker past their
    deadline and time out (each is retried, and the late call still reaches
    the provider: a duplicate success, deduped downstream by its key).
    """

    name = "w4-retries"
    description = "N executions call a local provider (5% transient 503, 0.5% permanent 400): retries, DLQ"
    workflow_file = "w4-retries.json"
    default_count = 20_000
    defaults = {"transient": 0.05, "permanent": 0.005}
    median_fields = ("calls_per_s", "retries", "dead_letters", "expected_dead_letters")

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.provider = None

    async def start(self) -> None:
        from .provider import Provider

        self.provider = await Provider(
            transient=float(self.options["transient"]), permanent=float(self.options["permanent"])
        ).start()

    async def stop(self) -> None:
        if self.provider is not None:
            await self.provider.stop()

    def shape(self, definition: dict) -> dict:
        call = definition["steps"][0]
        if self.provider is not None:
            call["input"]["url"] = self.provider.url
        # A transient failure hits one key at most max_transient times: never all attempts.
        assert call["retry"]["max_attempts"] > 2
        return definition

    def worker_env(self) -> dict:
        # The provider listens on loopback, which the webhook's SSRF guard refuses unless allowed.
        return {"ORDO_WEBHOOK_ALLOW": "127.0.0.0/8"}

    def timeout(self, expected: int) -> float:
        return max(180.0, expected / 100.0)

    def permanent_events(self, run_id: str, count: int) -> set[str]:
        from .provider import fails_permanently

        share = float(self.options["permanent"])
        return {e for e in (f"{run_id}-{i}" for i in range(count)) if fails_permanently(e, share)}

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        r = await run_checks.retry_outcomes(conn, self.tenant, run_id)
        doomed = self.permanent_events(run_id, expected)
        checks = Checks(expected)
        checks.add("executions", r["executions"], expected)
        checks.add("completed", r["completed"], expected - len(doomed))
        checks.add("failed", r["failed"], len(doomed))
        checks.add("failed_are_the_permanent_ones", set(r["failed_events"] or ()) == doomed, True)
        checks.add("dead_letters", r["dead_letters"], len(doomed))
        if self.provider is not None:
            # Not a check: under overload a call can also time out (a retryable
            # failure the provider never answered), and a 503 that comes back after
            # its step timed out is recorded as a late result, not a failure.
            checks.facts["provider"] = self.provider.stats()
        checks.facts.update(
            retries=r["retries"], timeouts=r["timeouts"], requests=r["requests"], expected_dead_letters=len(doomed)
        )
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        facts = run.verification.get("facts", {})
        provider = facts.get("provider", {})
        seconds = run.seconds
        return {
            "transient_share": float(self.options["transient"]),
            "permanent_share": float(self.options["permanent"]),
            "requests": facts.get("requests"),
            "calls": provider.get("calls"),
            "calls_per_s": provider.get("calls", 0) / seconds if seconds else 0.0,
            "retries": facts.get("retries"),
            "timeouts": facts.get("timeouts"),
            "provider_503": provider.get("transient_503"),
            "provider_400": provider.get("permanent_400"),
            "duplicate_successes": provider.get("duplicate_successes"),
            "dead_letters": run.verification.get("dead_letters"),
            "expected_dead_letters": facts.get("expected_dead_letters"),
        }

    def action_steps(self, run) -> int | None:
        # Every attempt, retries too, is an action request and its outcome in the ledger.
        return run.metrics.get("requests")

    def summary(self, m: dict) -> list[str]:
        return [
            f"  actions      {m['requests'] or 0:,} requests, {m['calls'] or 0:,} provider calls "
            f"({m['calls_per_s']:,.0f}/s): {m['provider_503'] or 0:,} x 503, {m['provider_400'] or 0:,} x 400, "
            f"{m['timeouts'] or 0:,} timeouts, {m['duplicate_successes'] or 0:,} duplicate successes",
            f"  retries      {m['retries'] or 0:,} retryable failures retried   dead letters "
            f"{m['dead_letters']} (expected {m['expected_dead_letters']})",
        ]


# -- w5/w6: action steps -------------------------------------------------------------------


class ActionSteps(Scenario):
    """N executions of five `noop` action steps, each result durably recorded before the next step runs.

    The same shape as a DBOS step or a Restate `ctx.run`: what an action step
    costs the engine when the action itself costs nothing. With --external 1
    the steps call `bench.noop` instead, which no worker runs in-process: an
    external action worker (`python -m actions.worker --module bench.noop_action`,
    started by the bench) takes the requests from JetStream and publishes the
    results back.
    """

    name = "w5-actions"
    description = "five in-process noop action steps per execution (--external 1: served by actions.worker)"
    workflow_file = "w5-actions.json"
    steps = 5
    step_kind = "action_completed"
    default_count = 20_000
    defaults = {"external": 0}
    median_fields = ("actions_per_s",)

    def __init__(self, options: dict | None = None):
        super().__init__(options)
        self.action_worker = None

    @property
    def external(self) -> bool:
        return bool(int(self.options["external"]))

    def shape(self, definition: dict) -> dict:
        if self.external:
            for step in definition["steps"]:
                step["action"] = "bench.noop"
        return definition

    async def start_beside_workers(self, env: dict) -> None:
        """With --external: the action worker that serves `bench.noop`, on the run's NATS and prefix."""
        if not self.external:
            return
        import os
        import sys

        self.action_worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "actions.worker",
            "--module",
            "bench.noop_action",
            "--concurrency",
            "1024",
            env={**os.environ, **env},
        )

    async def stop(self) -> None:
        if self.action_worker is not None and self.action_worker.returncode is None:
            self.action_worker.terminate()
            try:
                await asyncio.wait_for(self.action_worker.wait(), 30)
            except TimeoutError:
                self.action_worker.kill()

    def timeout(self, expected: int) -> float:
        return max(180.0, expected / 50.0)

    def stall_grace(self) -> float:
        # Served over JetStream, a run's executions move in step: none finishes until all
        # have had their five round trips, which at 20,000 takes longer than the stall timeout.
        return 120.0 if self.external else 0.0

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None) -> Checks:
        r = await run_checks.action_histories(conn, self.tenant, run_id, self.steps)
        checks = Checks(expected)
        checks.add("executions", r["executions"], expected)
        checks.add("completed", r["completed"], expected)
        checks.add("expected_history", r["expected_history"], expected)
        return checks

    async def measure(self, pool, run, done: dict | None) -> dict:
        seconds = run.seconds
        actions = self.steps * run.verification.get("completed", 0)
        return {"actions": actions, "actions_per_s": actions / seconds if seconds else 0.0, "external": self.external}

    def action_steps(self, run) -> int | None:
        return run.metrics.get("actions")

    def summary(self, m: dict) -> list[str]:
        where = "an external action worker" if m["external"] else "in-process"
        return [f"  actions      {m['actions']:,} action steps ({where}): {m['actions_per_s']:,.0f} action steps/s"]


class Webhooks(ActionSteps):
    """N executions of three `webhook` steps against the bench's local provider, which answers after --delay ms.

    What real HTTP actions cost: the provider never fails; it runs in the
    bench process, whose CPU is reported beside the workers'.
    """

    name = "w6-webhooks"
    description = "three webhook calls per execution to a local provider answering after --delay ms (20)"
    workflow_file = "w6-webhooks.json"
    steps = 3
    default_count = 10_000
    defaults = {"delay": 20.0}
    median_fields = ("actions_per_s", "provider_process_cpu_percent")

    @property
    def external(self) -> bool:
        return False

    async def start(self) -> None:
        from .provider import Provider

        self.provider = await Provider(transient=0.0, permanent=0.0, delay_ms=float(self.options["delay"])).start()

    async def stop(self) -> None:
        if getattr(self, "provider", None) is not None:
            await self.provider.stop()

    def shape(self, definition: dict) -> dict:
        for step in definition["steps"]:
            step["input"]["url"] = self.provider.url
        return definition

    def worker_env(self) -> dict:
        return {"ORDO_WEBHOOK_ALLOW": "127.0.0.0/8"}

    async def measure(self, pool, run, done: dict | None) -> dict:
        m = await super().measure(pool, run, done)
        stats = self.provider.stats()
        m.update(
            calls=stats["calls"],
            duplicate_calls=stats["calls"] - stats["keys"],
            provider_process_cpu_percent=stats["process_cpu_percent"],
            delay_ms=float(self.options["delay"]),
        )
        return m

    def summary(self, m: dict) -> list[str]:
        return [
            f"  webhooks     {m['actions']:,} webhook steps: {m['actions_per_s']:,.0f} calls/s "
            f"(provider answers after {m['delay_ms']:g} ms; {m['calls']:,} calls, "
            f"{m['duplicate_calls']:,} repeated), bench process CPU {m['provider_process_cpu_percent']:.0f}%"
        ]


# -- w7: a noisy neighbour ------------------------------------------------------------------


class NoisyNeighbour(Scenario):
    """Tenant A publishes a burst of -n events (closed, as fast as it can) while quiet tenants
    publish `quiet_rate` events/s each for `seconds` (open, on a schedule), all running W1's
    five steps. The burst starts a quarter into the quiet load, so the quiet tenants' latency
    is measured before and during it, in one run.

    The quiet tenants are picked in lanes other than A's (with 16 lanes, one in 16 tenants
    shares A's lane and waits behind its burst; tests/test_fairness.py shows that case).
    """

    name = "w7-noisy"
    description = "noisy neighbour: tenant A's burst of -n beside quiet tenants' steady load (linear-5)"
    workflow_file = str(EXAMPLES / "linear5.json")
    steps = 5
    tenant = "noisy-a"
    default_count = 500_000
    defaults = {"seconds": 60.0, "quiet_tenants": 20, "quiet_rate": 100.0, "quiet_publish": "batched"}
    median_fields = (
        "quiet_p99_before_ms",
        "quiet_p99_during_ms",
        "burst_publish_per_s",
        "burst_drain_per_s",
        "burst_total_per_s",
        "total_per_s",
        "quiet_event_cpu_us",
    )
    #: The burst's atomic batches awaiting their commit at once, as W1's closed publisher (2 was
    #: tried for #18: the quiet p99 no better and A stored more slowly; docs/fairness.md).
    burst_in_flight = 4

    @property
    def quiet(self) -> list[str]:
        from daemon.lanes import lane_of

        names, i = [], 0
        while len(names) < int(self.options["quiet_tenants"]):
            name = f"quiet-{i:02d}"
            if lane_of(name, 16) != lane_of(self.tenant, 16):
                names.append(name)
            i += 1
        return names

    def quiet_count(self) -> int:
        return round(len(self.quiet) * self.options["quiet_rate"] * self.options["seconds"])

    def expected(self, count: int) -> int:
        return count + self.quiet_count()

    def definitions(self, run_id: str) -> list[dict]:
        [definition] = super().definitions(run_id)
        return [dict(definition, tenant=tenant) for tenant in [self.tenant, *self.quiet]]

    async def generate(self, js, topology, run_id: str, count: int, **kwargs) -> dict:
        """`count` is the run's whole load (`expected()`): the burst is what the quiet tenants leave of it.

        The quiet tenants publish from a process of their own (bench/quiet_load.py), as other
        tenants' services would: sharing this one's event loop, their ticks waited for the burst's.
        """
        count -= self.quiet_count()
        quiet = await self._start_quiet_load(run_id)
        assert quiet.stdout is not None
        started = orjson.loads(await quiet.stdout.readline())["started"]
        await asyncio.sleep(self.options["seconds"] / 4)
        burst_start = time.time()
        # The burst: W1's closed publisher (atomic batches where the stream allows them), with
        # `burst_in_flight` batches awaiting their commit at once.
        event_type = self.trigger_type(run_id)
        events = (trigger_event(run_id, i, tenant=self.tenant, event_type=event_type) for i in range(count))
        kwargs.pop("rate", None)
        kwargs.pop("pubacks", None)
        sent = await publish_events(js, topology, events, atomic_in_flight=self.burst_in_flight, **kwargs)
        burst_published = time.time()
        out, _ = await quiet.communicate()
        if quiet.returncode != 0:
            raise RuntimeError(f"the quiet tenants' publisher failed (exit status {quiet.returncode})")
        sent += orjson.loads(out.splitlines()[-1])["sent"]
        return {
            "published": sent,
            "first_publish": started,
            "burst_start": burst_start,
            "burst_published": burst_published,
        }

    async def _start_quiet_load(self, run_id: str):
        import sys

        from .quiet_load import pubacks_path

        argv = [
            sys.executable,
            "-m",
            "bench.quiet_load",
            "--run-id",
            run_id,
            "--event-type",
            self.trigger_type(run_id),
            "--tenants",
            ",".join(self.quiet),
            "--rate",
            str(self.options["quiet_rate"]),
            "--seconds",
            str(self.options["seconds"]),
            "--pubacks",
            pubacks_path(run_id),
            "--publish",
            self.options["quiet_publish"],
        ]
        return await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)

    async def progress(self, pool, run_id: str) -> dict:
        totals = {"finished": 0, "waiting": 0, "total": 0}
        for tenant in [self.tenant, *self.quiet]:
            row = await runs.workflow_progress(pool, tenant, self.workflow_id(run_id))
            for key in totals:
                totals[key] += row[key]
        return totals

    async def finish_times(self, pool, run_id: str) -> list:
        rows = []
        for tenant in [self.tenant, *self.quiet]:
            rows += await runs.workflow_finish_times(pool, tenant, self.workflow_id(run_id))
        return rows

    async def verify(self, conn, run_id: str, expected: int, done: dict | None = None):
        sums: dict = {}
        for tenant in [self.tenant, *self.quiet]:
            r = await run_checks.step_histories(conn, tenant, run_id, self.steps, self.step_kind)
            for key in ("executions", "distinct_events", "completed", "expected_steps", "expected_history"):
                sums[key] = sums.get(key, 0) + r[key]
        return Verification(expected=expected, **sums)

    async def measure(self, pool, run, done: dict | None) -> dict:
        """The quiet tenants' latency before and during the burst, and where it went: trigger ts ->
        PubAck (`published`: the publisher and JetStream), -> taken by a worker (`taken`, from
        created_at: it adds the wait in the lane), -> committed (finished_at); `worker` is taken ->
        committed alone (the enrolment, the wait for a batch and its commit)."""
        import os

        from .quiet_load import pubacks_path

        if not done or "burst_start" not in done:
            return {}
        wid = self.workflow_id(run.run_id)
        burst = await runs.workflow_finish_times(pool, self.tenant, wid)
        quiet = []
        for tenant in self.quiet:
            quiet += await runs.workflow_stage_times(pool, tenant, wid)
        path = pubacks_path(run.run_id)
        pubacks = PubAcks.load(path) if os.path.exists(path) else {}
        if os.path.exists(path):
            os.unlink(path)
        burst_start_ms = done["burst_start"] * 1000.0
        burst_end = max((r["finished"] for r in burst), default=done["burst_start"])
        stages = ("published", "taken", "worker", "committed")
        before = {stage: Histogram() for stage in stages}
        during = {stage: Histogram() for stage in stages}
        for r in quiet:
            ts = r["ts"]
            if ts < burst_start_ms:
                into = before
            elif ts <= burst_end * 1000.0:
                into = during
            else:
                continue
            if ts in pubacks:
                into["published"].record(pubacks[ts] - ts)
            into["taken"].record(r["taken"] * 1000.0 - ts)
            into["worker"].record((r["finished"] - r["taken"]) * 1000.0)
            into["committed"].record(r["finished"] * 1000.0 - ts)
        last = max((r["finished"] for r in [*burst, *quiet]), default=done["burst_start"])
        out = {}
        for when, histograms in (("before", before), ("during", during)):
            for stage, h in histograms.items():
                name = "" if stage == "committed" else f"{stage}_"
                for q in (50, 99):
                    out[f"quiet_{name}p{q}_{when}_ms"] = h.percentile(q) if h.total else 0.0
        drain_s = max(1e-3, burst_end - done["burst_start"])
        out |= {
            "quiet_during": during["committed"].total,
            "burst_drain_s": burst_end - done["burst_start"],
            "burst_drain_per_s": len(burst) / drain_s,
            # Everyone's executions while the burst drained: the engine's throughput under the
            # noisy neighbour, to hold against W1 closed (the whole run's total is bounded by the
            # quiet load's schedule, before and after the burst).
            "burst_total_per_s": (len(burst) + during["committed"].total) / drain_s,
            # How fast A's publisher got its burst stored: a bound on A's in-flight publishes
            # must not buy the quiet tenants' latency with A's ingest.
            "burst_publish_per_s": len(burst) / max(1e-3, done["burst_published"] - done["burst_start"]),
            "total_per_s": (len(burst) + len(quiet)) / max(1e-3, last - done["first_publish"]),
        }
        return out | self._cpu(run, done["first_publish"], done["burst_start"], burst_end)

    def _cpu(self, run, first_publish: float, burst_start: float, burst_end: float) -> dict:
        """What the quiet load alone costs per event (before the burst), and the cores the
        processes used while A's burst drained: "everyone meanwhile" can come near W1 closed only
        if a quiet event costs about what a W1 execution does (W1's `cpu_us_per_execution`)."""
        if run.usage is None:
            return {}
        quiet_alone = run.usage(first_publish + 1.0, burst_start)  # the first second: connecting
        cost = cpu_per_event(quiet_alone, len(self.quiet) * self.options["quiet_rate"])
        return {
            "quiet_alone_resources": quiet_alone,
            "quiet_cpu_us_per_event": cost,
            "quiet_event_cpu_us": cost["all"] if cost else None,
            "burst_resources": run.usage(burst_start, burst_end),
        }

    def summary(self, metrics: dict) -> list[str]:
        m = metrics

        def stages(when: str) -> str:
            return (
                f"{m[f'quiet_p50_{when}_ms']:,.0f}/{m[f'quiet_p99_{when}_ms']:,.0f} ms (stored "
                f"{m[f'quiet_published_p50_{when}_ms']:,.0f}/{m[f'quiet_published_p99_{when}_ms']:,.0f}, taken "
                f"{m[f'quiet_taken_p50_{when}_ms']:,.0f}/{m[f'quiet_taken_p99_{when}_ms']:,.0f}; in the worker "
                f"{m[f'quiet_worker_p50_{when}_ms']:,.0f}/{m[f'quiet_worker_p99_{when}_ms']:,.0f})"
            )

        return [
            f"quiet tenants  trigger->completed p50/p99 before the burst {stages('before')}",
            f"               during it {stages('during')} ({m['quiet_during']:,} events)",
            f"tenant A       burst stored at {m['burst_publish_per_s']:,.0f}/s ({self.burst_in_flight} batches "
            f"in flight), drained in {m['burst_drain_s']:,.1f} s ({m['burst_drain_per_s']:,.0f}/s); "
            f"everyone meanwhile {m['burst_total_per_s']:,.0f} executions/s, the whole run {m['total_per_s']:,.0f}/s",
        ] + self._cpu_lines(m)

    @staticmethod
    def _cpu_lines(m: dict) -> list[str]:
        cost = m.get("quiet_cpu_us_per_event")
        if not cost:
            return []
        return [
            f"CPU            the quiet load alone {cores_line(m['quiet_alone_resources'])}: "
            f"{cost['all']:,.0f} µs per quiet event",
            f"               while A's burst drained {cores_line(m['burst_resources'])}",
        ]


#: Every scenario by name; `python -m bench --list` prints them.
SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (LinearFive, Signals, Timers, Retries, ActionSteps, Webhooks, NoisyNeighbour)
}


def get(name: str, options: dict | None = None) -> Scenario:
    try:
        cls = SCENARIOS[name]
    except KeyError:
        raise SystemExit(f"bench: unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}") from None
    return cls(options)
