"""An HDR-style latency histogram: log-linear buckets, ~1% precision, mergeable.

Values (milliseconds, as floats) are quantised to integer units of `1/scale`
ms (microseconds by default). Below 256 units every unit has its own bucket;
above, each power-of-two range [2^k, 2^(k+1)) is split into 128 equal
buckets, so a bucket is at most 1/128 (0.78%) of its lower edge wide and a
reported value (the bucket's midpoint, clamped to the recorded min and max)
is within 0.4% of every value recorded in it. This is HdrHistogram's layout
with two significant decimal digits; written out here because it is forty
lines and the `hdrhistogram` package would add a dependency (and a C
extension) for no precision we need.
"""

from __future__ import annotations

import math

_SUB_BITS = 7
_SUB = 1 << _SUB_BITS  # buckets per power of two above the linear range
_LINEAR = _SUB << 1  # values below this are exact

#: The worst relative error of a percentile above the linear range.
PRECISION = 1.0 / (2 * _SUB)


def _index(units: int) -> int:
    if units < _LINEAR:
        return units
    shift = units.bit_length() - _SUB_BITS - 1
    return _LINEAR + (shift - 1) * _SUB + ((units >> shift) - _SUB)


def _bounds(index: int) -> tuple[int, int]:
    """[low, high) in units of the bucket at `index`."""
    if index < _LINEAR:
        return index, index + 1
    shift, offset = divmod(index - _LINEAR, _SUB)
    shift += 1
    low = (_SUB + offset) << shift
    return low, low + (1 << shift)


class Histogram:
    """Counts of values in log-linear buckets; percentiles by nearest rank."""

    __slots__ = ("scale", "counts", "total", "min", "max", "sum")

    def __init__(self, scale: float = 1000.0):
        self.scale = scale  # units per recorded unit: 1000 records ms at µs resolution
        self.counts: dict[int, int] = {}
        self.total = 0
        self.min = math.inf
        self.max = -math.inf
        self.sum = 0.0

    def record(self, value: float, count: int = 1) -> None:
        """Record `value` (negative values, e.g. from clock skew, count as 0)."""
        value = max(float(value), 0.0)
        index = _index(int(value * self.scale))
        self.counts[index] = self.counts.get(index, 0) + count
        self.total += count
        self.sum += value * count
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def record_many(self, values) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: Histogram) -> Histogram:
        """Add `other`'s counts to this histogram (same scale); returns self."""
        if other.scale != self.scale:
            raise ValueError(f"cannot merge histograms of scale {self.scale} and {other.scale}")
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def percentile(self, p: float) -> float:
        """The value at percentile `p` (0-100) by nearest rank; 0.0 when empty."""
        if not self.total:
            return 0.0
        if p >= 100:
            return self.max
        rank = max(1, math.ceil(p / 100.0 * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                low, high = _bounds(index)
                middle = (low + high - 1) / 2.0 / self.scale if high - low > 1 else low / self.scale
                return min(max(middle, self.min), self.max)
        return self.max  # pragma: no cover - the ranks add up to total

    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def buckets(self) -> list[tuple[float, float, int]]:
        """(low, high, count) of every non-empty bucket, in value order (for plots)."""
        return [
            (low / self.scale, high / self.scale, self.counts[i])
            for i in sorted(self.counts)
            for low, high in [_bounds(i)]
        ]

    def summary(self) -> dict:
        """The usual percentiles in ms, as the bench reports them."""
        return {
            "count": self.total,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "p999_ms": self.percentile(99.9),
            "max_ms": self.max if self.total else 0.0,
            "mean_ms": self.mean(),
        }
