"""Time arithmetic of workflows: durations, instants and retry delays, all in epoch milliseconds.

Both dispatchers (pure and compiled) and the definition resolver use these
functions, so that a duration, a deadline or a back-off is computed the same
way everywhere, and the same way again when the ledger replays an execution.
Nothing here reads the clock: "now" is always passed in.
"""

from __future__ import annotations

import datetime as _dt
import re
import zlib

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_SHORT = re.compile(r"^(?:[0-9]+(?:ms|s|m|h|d|w))+$")
_SHORT_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")
# ISO-8601 durations without years and months: those have no fixed length.
_ISO = re.compile(
    r"^P(?:(?P<w>[0-9]+)W)?(?:(?P<d>[0-9]+)D)?"
    r"(?:T(?:(?P<h>[0-9]+)H)?(?:(?P<m>[0-9]+)M)?(?:(?P<s>[0-9]+(?:\.[0-9]{1,3})?)S)?)?$"
)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_ONE_MS = _dt.timedelta(milliseconds=1)


def parse_duration(value: object) -> int:
    """Milliseconds of "500ms", "30s", "15m", "2h", "2d", "1w", "1h30m", "PT15M", "P1DT2H", or an int (ms).

    ValueError says what was wrong; a zero duration is returned as 0 (callers that
    need a positive one check for that themselves).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a duration must be a string such as '30s' or an integer of milliseconds, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration must not be negative, got {value!r}")
        return value
    if _SHORT.match(value):
        return sum(int(number) * _UNITS[unit] for number, unit in _SHORT_PART.findall(value))
    iso = _ISO.match(value)
    if iso and value not in ("P", "PT") and not value.endswith("T"):
        parts = iso.groupdict()
        total = 0
        for name, unit in (("w", "w"), ("d", "d"), ("h", "h"), ("m", "m")):
            if parts[name]:
                total += int(parts[name]) * _UNITS[unit]
        if parts["s"]:
            whole, _, fraction = parts["s"].partition(".")
            total += int(whole) * 1000 + int((fraction + "00")[:3])
        return total
    raise ValueError(
        f"{value!r} is not a duration (expected e.g. '500ms', '30s', '15m', '2h', '2d', '1h30m', "
        "'PT15M', 'P1DT2H', or an integer of milliseconds)"
    )


def format_duration(ms: int) -> str:
    """A short text for a number of milliseconds: 30000 -> '30s', 5400000 -> '1h30m'."""
    if ms == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = _UNITS[unit]
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts)


def parse_instant(value: object) -> int:
    """Epoch milliseconds of an ISO-8601 timestamp (UTC when it has no offset) or of a number of epoch ms.

    ValueError when it is neither (a boolean, a malformed string, anything else).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a time: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    try:
        moment = _dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"not an ISO-8601 time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return (moment - _EPOCH) // _ONE_MS


def retry_delay_ms(
    execution_id: str,
    step_id: str,
    attempt: int,
    initial_ms: int,
    coefficient: float,
    max_ms: int,
    jitter: float,
) -> int:
    """The back-off before attempt `attempt + 1`, after attempt `attempt` failed.

    min(initial * coefficient**(attempt-1), max) shortened by up to `jitter` of
    itself. The jitter fraction is a hash of the execution, step and attempt, not
    a random number, so that a replay computes the same delay.
    """
    try:
        base = min(initial_ms * coefficient ** (attempt - 1), max_ms)
    except OverflowError:
        base = max_ms
    fraction = zlib.crc32(f"{execution_id}:{step_id}:{attempt}".encode()) / 2**32
    return int(base * (1 - jitter * fraction))
