"""A soak's steadiness: the committed rate minute by minute, worker RSS and the ledger's size over a long run.

An open-mode run long enough to hold whole minutes is a soak:

    python -m bench w1 --rate 6000 --duration 1800 --workers 2 --plot docs/soak-w1.png

The report then gives the rate of each whole minute of offered load, their
median after the first minute (start-up, partition claims and the first
checkpoint's full-page images weigh on it), and the worst minute's distance
from that median; the worker RSS of the first and the last minute; and how
fast the ledger's tables and indexes grew (`ledger_growth_mb_per_min`),
sampled every LEDGER_SAMPLE_S. A steady engine keeps every minute within
15% of the median, its RSS flat, and its growth at the rate the traffic
writes until retention drops a day. With `--retention 5m` the workers run
with one-minute ledger days and drop each minute older than five: the ledger
then stays flat within a soak; its early minutes are gone by the end, so the
run's rate comes from the workers' counters (`timeline_from_counts`).
"""

from __future__ import annotations

import statistics

#: How often the ledger's size is read during a run (a scan of the catalogue, cheap).
LEDGER_SAMPLE_S = 10.0
#: A soak must hold at least this many whole minutes of offered load to be judged.
MIN_MINUTES = 3
#: The steadiness the project holds a soak to: each minute within this share of the median.
STEADY_WITHIN = 0.15


def per_minute(timeline: list[int], minutes: int) -> list[float]:
    """Completions per second averaged over each of the first `minutes` whole minutes of `timeline`
    (completions per second since the first publish)."""
    whole = min(minutes, len(timeline) // 60)
    return [sum(timeline[m * 60 : (m + 1) * 60]) / 60.0 for m in range(whole)]


def timeline_from_counts(samples: list[tuple[float, int]], t0: float) -> list[int]:
    """Completions per second since `t0` from (time, finished so far) samples, such as the workers'
    counters read while a run goes: the count at each whole second is interpolated between the
    samples around it. Used where the ledger no longer holds every finish time (retention)."""
    points = sorted((t - t0, count) for t, count in samples if t >= t0)
    if not points:
        return []
    at_second = []
    i = 0
    previous = (0.0, 0)
    for second in range(int(points[-1][0]) + 1):
        while i < len(points) and points[i][0] <= second:
            previous = points[i]
            i += 1
        if i == len(points):
            at_second.append(previous[1])
            continue
        (t1, c1), (t2, c2) = previous, points[i]
        at_second.append(round(c1 + (c2 - c1) * (second - t1) / (t2 - t1)) if t2 > t1 else c2)
    return [max(0, at_second[s + 1] - at_second[s]) for s in range(len(at_second) - 1)]


def steadiness(timeline: list[int], duration_s: float) -> dict | None:
    """The per-minute rates over the offered load and how far the worst one strays from their
    median after the first minute; None when the run is too short to tell."""
    rates = per_minute(timeline, int(duration_s // 60))
    if len(rates) < MIN_MINUTES:
        return None
    settled = rates[1:]
    middle = statistics.median(settled)
    worst = max(abs(rate - middle) / middle for rate in settled) if middle else 0.0
    return {
        "per_minute": [round(rate, 1) for rate in rates],
        "median_per_s": round(middle, 1),
        "worst_deviation": round(worst, 4),
        "steady": worst <= STEADY_WITHIN,
    }


def _mean_over(series: list[list[float]], start: float, end: float) -> float | None:
    values = [value for t, value in series if start <= t < end]
    return sum(values) / len(values) if values else None


def drift(series: list[list[float]], duration_s: float) -> dict | None:
    """A [[seconds, value], ...] series' mean over the first and the last minute of the offered load."""
    if duration_s < 120 or not series:
        return None
    first = _mean_over(series, 0.0, 60.0)
    last = _mean_over(series, duration_s - 60.0, duration_s)
    if first is None or last is None:
        return None
    return {"first_minute": round(first, 1), "last_minute": round(last, 1)}


def growth_per_minute(series: list[list[float]], duration_s: float) -> float | None:
    """MB per minute the ledger grew between the end of the first minute and the end of the offered load."""
    inside = [(t, mb) for t, mb in series if 60.0 <= t <= duration_s]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 60.0:
        return None
    (t0, mb0), (t1, mb1) = inside[0], inside[-1]
    return round((mb1 - mb0) / ((t1 - t0) / 60.0), 2)


def report(timeline: list[int], rss: list[list[float]], ledger_mb: list[list[float]], duration_s: float) -> dict | None:
    """The soak section of a run's report, or None for a run shorter than MIN_MINUTES."""
    steady = steadiness(timeline, duration_s)
    if steady is None:
        return None
    return {
        **steady,
        "workers_rss_mb": drift(rss, duration_s),
        "ledger_mb": drift(ledger_mb, duration_s),
        "ledger_growth_mb_per_min": growth_per_minute(ledger_mb, duration_s),
    }


def lines(soak: dict) -> list[str]:
    """The soak's lines of the text table."""
    rates = "  ".join(f"{rate:,.0f}" for rate in soak["per_minute"])
    out = [
        f"  soak         per minute (/s): {rates}",
        f"               median after the first minute {soak['median_per_s']:,.0f}/s, worst minute "
        f"{100 * soak['worst_deviation']:.1f}% from it ({'steady' if soak['steady'] else 'NOT steady'}: "
        f"within {100 * STEADY_WITHIN:.0f}% wanted)",
    ]
    rss, ledger = soak.get("workers_rss_mb"), soak.get("ledger_mb")
    if rss:
        out.append(
            f"               worker RSS {rss['first_minute']:.0f} MB in the first minute, "
            f"{rss['last_minute']:.0f} MB in the last"
        )
    if ledger:
        growth = soak.get("ledger_growth_mb_per_min")
        rate = f", growing {growth:,.1f} MB/min" if growth is not None else ""
        out.append(
            f"               ledger tables + indexes {ledger['first_minute']:,.0f} MB -> "
            f"{ledger['last_minute']:,.0f} MB{rate}"
        )
    return out
