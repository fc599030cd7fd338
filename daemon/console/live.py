"""The Live page's numbers: the workers' own metrics, sampled every few seconds, over the last minutes.

Each worker serves Prometheus metrics on `metrics_port + index` (daemon/service.py).
The console reads them all every `interval_s` and keeps `window_s` of samples
in memory; between two samples it derives the throughput (executions finished
per second), the failure rate (failed / finished), the end-to-end latency p50
and p99 (from the histogram's bucket counts: "at most" the bucket's bound) and
the consumer lag. Nothing is kept across a restart of the console; counting
in the ledger instead would read millions of rows a minute at full speed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("ordo.console")


@dataclass
class Sample:
    """The workers' counters at one moment, summed over the workers that answered."""

    at: float  # epoch seconds
    workers: int = 0
    finished: dict[str, float] = field(default_factory=dict)  # by status
    dead_letters: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    lag: float = 0.0


@dataclass(frozen=True)
class Point:
    """What happened between two samples."""

    at: float
    workers: int
    per_second: float
    failure_rate: float | None  # None: nothing finished
    p50_s: float | None
    p99_s: float | None
    dead_letters: float
    lag: float


def parse(text: str, sample: Sample) -> None:
    """Add one worker's /metrics text to `sample`."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ordo_executions_finished_total":
                status = s.labels.get("status", "")
                sample.finished[status] = sample.finished.get(status, 0.0) + s.value
            elif s.name == "ordo_dead_letters_total":
                sample.dead_letters += s.value
            elif s.name == "ordo_end_to_end_seconds_bucket":
                le = float(s.labels["le"])
                sample.latency_buckets[le] = sample.latency_buckets.get(le, 0.0) + s.value
            elif s.name == "ordo_consumer_lag":
                sample.lag += s.value


def _quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket where the q-th observation falls (cumulative bucket counts)."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


def point(before: Sample, after: Sample) -> Point | None:
    """What changed between two samples; None when a counter went back (a worker restarted) or no time passed."""
    elapsed = after.at - before.at
    finished = sum(after.finished.values()) - sum(before.finished.values())
    failed = after.finished.get("failed", 0.0) - before.finished.get("failed", 0.0)
    letters = after.dead_letters - before.dead_letters
    buckets = {
        le: after.latency_buckets.get(le, 0.0) - before.latency_buckets.get(le, 0.0) for le in after.latency_buckets
    }
    if elapsed <= 0 or after.workers != before.workers or min([finished, failed, letters, *buckets.values()]) < 0:
        return None
    return Point(
        at=after.at,
        workers=after.workers,
        per_second=finished / elapsed,
        failure_rate=failed / finished if finished else None,
        p50_s=_quantile(buckets, 0.5),
        p99_s=_quantile(buckets, 0.99),
        dead_letters=letters,
        lag=after.lag,
    )


class Live:
    """Samples the workers' metrics endpoints until cancelled; `points()` is the recent past."""

    def __init__(self, urls: list[str], interval_s: float = 5.0, window_s: float = 900.0) -> None:
        self.urls = urls
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=max(2, int(window_s / interval_s) + 1))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                self._samples.append(await self._sample(http))
                await asyncio.sleep(self.interval_s)

    async def _sample(self, http: aiohttp.ClientSession) -> Sample:
        sample = Sample(at=time.time())

        async def read(url: str) -> str | None:
            try:
                async with http.get(url) as response:
                    return await response.text() if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                return None  # a worker down or restarting: the others still count

        for text in await asyncio.gather(*(read(url) for url in self.urls)):
            if text is not None:
                sample.workers += 1
                parse(text, sample)
        return sample

    def points(self) -> list[Point | None]:
        """One per interval, oldest first (None where it cannot be told: a worker came or went)."""
        samples = list(self._samples)
        return [point(a, b) for a, b in zip(samples, samples[1:], strict=False)]
