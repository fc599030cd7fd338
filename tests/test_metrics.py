"""Bulk observation into Prometheus histograms: the same series as one observe per value."""

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from daemon.metrics import Observations, observe_all

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.1, 1)


def _histogram(registry) -> Histogram:
    return Histogram("ordo_test_seconds", "A test histogram.", buckets=BUCKETS, registry=registry)


def _samples(registry) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_all_gives_the_series_of_one_observe_per_value():
    rng = random.Random(6)
    # On a bound, between bounds, past the last one, zero.
    values = [0.0, 0.001, 0.0010001, 0.01, 0.5, 1.0, 7.0] + [rng.expovariate(200) for _ in range(500)]
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    single = _histogram(one_by_one)
    for value in values:
        single.observe(value)
    observe_all(_histogram(bulk), values)
    assert _samples(bulk) == _samples(one_by_one)
    assert b"ordo_test_seconds_count 507.0" in generate_latest(bulk)


def test_observe_all_of_nothing_changes_nothing():
    registry = CollectorRegistry()
    histogram = _histogram(registry)
    before = _samples(registry)
    observe_all(histogram, [])
    assert _samples(registry) == before


def test_observations_reach_the_histogram_on_flush_or_when_full():
    registry = CollectorRegistry()
    timings = Observations(_histogram(registry), size=3)

    def count():
        return _samples(registry)[("ordo_test_seconds_count", ())]

    timings.add(0.002)
    timings.add(0.003)
    assert count() == 0
    timings.add(0.004)  # the third fills it
    assert count() == 3
    timings.add(0.5)
    timings.flush()
    timings.flush()  # nothing left: no double count
    assert count() == 4
    assert _samples(registry)[("ordo_test_seconds_sum", ())] == 0.509
