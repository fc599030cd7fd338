"""The ledger's upkeep in a worker: day partitions made ahead, and old days dropped (`retention_keep`).

Off the commit path: a task of its own, on a connection of its own, once at
start-up and then every `UPKEEP_INTERVAL_S`. One maintainer at a time among
the workers (and `ordo ledger maintain`/`retention`): it runs only while it
holds a Postgres advisory lock, and a worker that finds it taken skips its
turn. Partitions are made a week ahead, so any one worker's run keeps the
ledger going; a row whose day has no partition anyway lands in the DEFAULT
partition (counted by `ordo_ledger_default_partition_rows`, with a warning)
and the next run moves it into a partition of its own.
"""

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from hotpath.durations import parse_duration
from ledger import connection, partitioning

from . import logs, metrics
from .config import Config

log = logging.getLogger("ordo.upkeep")

#: Seconds between two runs: partitions are made a week ahead, so an hour is plenty
#: (a quarter of a ledger day where days are short, `ledger_day`).
UPKEEP_INTERVAL_S = 3600.0


def upkeep_interval_s() -> float:
    return min(UPKEEP_INTERVAL_S, partitioning.day_length().total_seconds() / 4)


def ledger_day_s(config: Config) -> int:
    """The `ledger_day` setting in seconds; ValueError names what is wrong (its range is the ledger's to say)."""
    try:
        milliseconds = parse_duration(config.ledger_day)
    except ValueError as exc:
        raise ValueError(f"ledger_day: {exc}") from None
    return partitioning.checked_day_length(milliseconds / 1000)


def retention_keep(config: Config) -> timedelta | None:
    """The `retention_keep` setting as a duration (None: keep everything); ValueError names what is wrong."""
    if not config.retention_keep:
        return None
    try:
        keep = timedelta(milliseconds=parse_duration(config.retention_keep))
    except ValueError as exc:
        raise ValueError(f"retention_keep: {exc}") from None
    if keep < timedelta(seconds=ledger_day_s(config)):
        raise ValueError(
            f"retention_keep must be at least one ledger day ({config.ledger_day}), not {config.retention_keep!r}"
        )
    return keep


async def run_once(dsn: str, now: datetime, keep: timedelta | None, *, tcp_timeout_s: float) -> bool:
    """One run under the maintainer lock: maintain, then retention when `keep` is set.

    False when another maintainer holds the lock (nothing was done).
    """
    conn = await connection.connect(dsn, tcp_timeout_s=tcp_timeout_s, timeout=10)
    try:
        if not await partitioning.try_lock(conn):
            return False
        made = await partitioning.maintain(conn, partitioning.day_at(now))
        if made.created:
            log.info("ledger partitions created: %s", ", ".join(made.created))
        if made.rescued:
            log.warning("rows moved out of the ledger's DEFAULT partitions: %s", made.rescued)
        if keep is not None:
            dropped = await partitioning.retention(conn, keep, now)
            metrics.ledger_retention_dropped.inc(dropped.dropped_executions)
            if dropped.dropped:
                log.info(
                    "ledger retention dropped %s (%d finished executions); "
                    "carried %d executions forward (%d history rows)",
                    ", ".join(dropped.dropped),
                    dropped.dropped_executions,
                    dropped.carried,
                    dropped.carried_history,
                )
        for table, rows in (await partitioning.default_rows(conn)).items():
            metrics.ledger_default_rows.labels(table).set(rows)
            if rows:
                log.warning("ordo.%s_default holds %d rows of days that have no partition", table, rows)
        return True
    finally:
        await conn.close()


async def upkeep_loop(
    dsn: str, keep: timedelta | None, clock_ms, stopping: asyncio.Event, *, tcp_timeout_s: float
) -> None:
    """Run the upkeep now and then every UPKEEP_INTERVAL_S until `stopping`; a failed run is logged and retried."""
    while not stopping.is_set():
        now = datetime.fromtimestamp(clock_ms() / 1000.0, tz=UTC)
        try:
            ran = await run_once(dsn, now, keep, tcp_timeout_s=tcp_timeout_s)
            metrics.ledger_upkeep.labels("done" if ran else "skipped").inc()
        except Exception as exc:  # the upkeep must not die quietly, nor take the worker with it
            metrics.ledger_upkeep.labels("failed").inc()
            log.exception("ledger upkeep failed: %s; trying again later", exc, extra=logs.failure("ledger_upkeep", exc))
        try:
            await asyncio.wait_for(stopping.wait(), upkeep_interval_s())
        except TimeoutError:
            pass
