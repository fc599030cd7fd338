"""`--plot FILE.png`: throughput over time, the latency distribution and worker RSS over time of each run.

matplotlib is optional (`pip install matplotlib`, or the `[plot]` extra):
`require()` is called before a run starts so that a missing one fails fast.
"""

from __future__ import annotations

from .report import RunResult

MISSING = "bench: --plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')"

#: Percentiles of the latency plot (HDR style: the tail spread out on a log axis).
_PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.9, 99.95, 99.99, 100)


def require() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING) from None


def _throughput(run: RunResult) -> tuple[list[float], list[float]]:
    """Completions per second, in bins of 0.1 s for runs shorter than 20 s (else 1 s); the per-second
    timeline where the run's finish times are not all in the ledger (a soak with retention)."""
    offsets = run.finish_offsets
    if not offsets:
        if not run.timeline:
            return [], []
        return list(range(len(run.timeline) + 1)), [float(c) for c in run.timeline + run.timeline[-1:]]
    width = 0.1 if max(offsets) < 20 else 1.0
    counts = [0] * (int(max(offsets) / width) + 1)
    for offset in offsets:
        counts[int(max(offset, 0.0) / width)] += 1
    xs = [i * width for i in range(len(counts) + 1)]
    ys = [c / width for c in counts]
    return xs, ys + ys[-1:]


def draw(runs: list[RunResult], path: str, title: str) -> None:
    require()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom, memory) = plt.subplots(3, 1, figsize=(10, 11))
    fig.suptitle(title)
    for number, run in enumerate(runs, 1):
        label = f"run {number} ({run.executions_per_s:,.0f}/s)"
        xs, ys = _throughput(run)
        top.step(xs, ys, where="post", label=label)
        hist = run.latency
        if hist.total:
            xs = [1.0 / (1.0 - min(p, 99.999) / 100.0) for p in _PERCENTILES]
            ys = [hist.percentile(p) for p in _PERCENTILES]
            bottom.plot(xs, ys, marker=".", label=f"run {number} (p99 {hist.percentile(99):.1f} ms)")
        if run.offered_rate:
            top.axhline(run.offered_rate, linestyle=":", color="grey")
        rss = run.rss_series(points=2000)
        if rss:
            memory.plot([t for t, _ in rss], [mb for _, mb in rss], label=f"run {number}")
    top.set_xlabel("seconds since the first publish")
    top.set_ylabel("executions committed per second")
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    bottom.set_xscale("log")
    ticks = (50, 90, 99, 99.9, 99.99)
    bottom.set_xticks([1.0 / (1.0 - p / 100.0) for p in ticks], [f"{p:g}%" for p in ticks])
    bottom.set_xlabel("percentile")
    start = "intended send time" if any(run.mode == "open" for run in runs) else "trigger ts"
    bottom.set_ylabel(f"latency, ms ({start} -> committed)")
    bottom.grid(alpha=0.3, which="both")
    if any(run.latency.total for run in runs):
        bottom.legend(loc="upper left")
    memory.set_xlabel("seconds since the first publish")
    memory.set_ylabel("worker RSS, MB (all workers)")
    peak = max((mb for run in runs for _, mb in run.rss_series()), default=0.0)
    memory.set_ylim(0, max(peak * 1.25, 1.0))
    memory.grid(alpha=0.3)
    if any(run.ledger_mb for run in runs):  # a soak: is the ledger's growth steady (and flat once retention drops)?
        ledger = memory.twinx()
        for number, run in enumerate(runs, 1):
            if run.ledger_mb:
                xs, ys = [t for t, _ in run.ledger_mb], [mb for _, mb in run.ledger_mb]
                ledger.plot(xs, ys, linestyle="--", label=f"run {number} ledger")
        ledger.set_ylabel("ledger tables + indexes, MB (dashed)")
        ledger.set_ylim(bottom=0)
    if any(run.trace for run in runs):
        memory.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
