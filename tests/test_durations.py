"""Durations, instants and retry back-offs: the time arithmetic both dispatchers share."""

from __future__ import annotations

import zlib

import pytest

from hotpath.durations import format_duration, parse_duration, parse_instant, retry_delay_ms


@pytest.mark.parametrize(
    "text, ms",
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("15m", 900_000),
        ("2h", 7_200_000),
        ("2d", 172_800_000),
        ("1w", 604_800_000),
        ("1h30m", 5_400_000),
        ("1m30s250ms", 90_250),
        ("0s", 0),
        ("PT15M", 900_000),
        ("P2D", 172_800_000),
        ("P1DT2H", 93_600_000),
        ("PT1.5S", 1_500),
        ("P1W", 604_800_000),
        (1500, 1500),
        (0, 0),
    ],
)
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "value", ["", "soon", "5", "1.5h", "-5s", "5 s", "P", "PT", "P1DT", "P1Y", "P1M", "pt1m", True, None, 1.5, -1]
)
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "ms, text", [(0, "0s"), (500, "500ms"), (30_000, "30s"), (5_400_000, "1h30m"), (90_061_001, "1d1h1m1s1ms")]
)
def test_format_duration(ms, text):
    assert format_duration(ms) == text
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "value, ms",
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2030-01-02T03:04:05.678Z", 1_893_553_445_678),
        ("2030-01-02T04:04:05+01:00", 1_893_553_445_000),
        ("2030-01-02T03:04:05", 1_893_553_445_000),
        ("2030-01-02", 1_893_542_400_000),
        (1_893_553_445_000, 1_893_553_445_000),
        (1.5e12, 1_500_000_000_000),
    ],
)
def test_parse_instant(value, ms):
    assert parse_instant(value) == ms


@pytest.mark.parametrize("value", ["tomorrow", "", "2030-13-01", True, None, {}, [], float("nan")])
def test_parse_instant_refuses(value):
    with pytest.raises(ValueError):
        parse_instant(value)


def test_retry_delay_without_jitter_is_exponential_and_capped():
    delays = [retry_delay_ms("e", "s", attempt, 1_000, 2.0, 10_000, 0.0) for attempt in range(1, 7)]
    assert delays == [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
    assert retry_delay_ms("e", "s", 5_000, 1_000, 10.0, 60_000, 0.0) == 60_000  # no float overflow


def test_retry_delay_jitter_is_a_hash_not_a_random_number():
    fraction = zlib.crc32(b"exec-1:send:2") / 2**32
    delay = retry_delay_ms("exec-1", "send", 2, 1_000, 2.0, 60_000, 0.5)
    assert delay == int(2_000 * (1 - 0.5 * fraction))
    assert delay == retry_delay_ms("exec-1", "send", 2, 1_000, 2.0, 60_000, 0.5)
    assert 1_000 <= delay <= 2_000
    assert retry_delay_ms("e", "s", 1, 1_000, 2.0, 60_000, 1.0) >= 0
