"""What a run costs the ledger's storage: WAL written and table + index growth over its window, per execution.

The runner reads a `Snapshot` just before the generator starts and another
once the workers have stopped and their Postgres backends are gone (a
backend reports its WAL statistics when it goes idle or exits, so reading
earlier could miss the last second of them). WAL counters are cluster-wide:
on the bench's embedded server they are the run's own (plus the bench's
progress queries, a few reads); on a configured server (ORDO_PG_DSN) they
include every other database's traffic in the window, and the result says
so. Full-page images are counted apart: after a checkpoint the first change
to each page writes the whole 8 KB page, so they dominate a window that
spans one.

The queries are ledger/runs.py's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ledger.runs import TableSize, WalCounters, backends_named, ledger_sizes, wal_counters

#: How long the runner waits for the workers' backends to exit before it reads anyway.
BACKENDS_GONE_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    wal: WalCounters
    tables: dict[str, TableSize]

    @classmethod
    async def read(cls, pool) -> Snapshot:
        wal = await wal_counters(pool)
        return cls(wal, {t.name: t for t in await ledger_sizes(pool)})


def with_application_name(dsn: str, name: str) -> str:
    """The DSN with `application_name` set, so that the run's own backends can be found in pg_stat_activity."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "application_name"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("application_name", name)])))


async def after_backends_exit(pool, application_name: str) -> Snapshot:
    """A snapshot once no backend named `application_name` is left (or after BACKENDS_GONE_S)."""
    deadline = time.monotonic() + BACKENDS_GONE_S
    while await backends_named(pool, application_name) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return await Snapshot.read(pool)


def lsn(position: int) -> str:
    """A WAL position (bytes since 0/0) as Postgres writes an LSN: what `pg_waldump -s/-e` take."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def _per(value: int | None, count: int | None) -> float | None:
    return value / count if value is not None and count else None


def growth(before: Snapshot, after: Snapshot, executions: int, action_steps: int | None, shared_server: bool) -> dict:
    """The run's WAL and ledger growth, totals and per execution (and per action step, when given)."""
    wal_b, wal_a = before.wal, after.wal
    records = None if wal_b.records is None or wal_a.records is None else wal_a.records - wal_b.records
    fpi = None if wal_b.fpi is None or wal_a.fpi is None else wal_a.fpi - wal_b.fpi
    wal_bytes = wal_a.bytes - wal_b.bytes
    wal = {
        "source": wal_a.source,
        # pg_stat_wal and the WAL position are the whole cluster's, not the ledger database's.
        "cluster_wide": True,
        "includes_other_traffic": shared_server,
        "bytes": wal_bytes,
        "records": records,
        "fpi": fpi,
        "lsn_bytes": wal_a.lsn_bytes - wal_b.lsn_bytes,
        # The run's window of WAL, for `pg_waldump -s START -e END` on a kept data dir (--data-dir).
        "lsn_start": lsn(wal_b.lsn_bytes),
        "lsn_end": lsn(wal_a.lsn_bytes),
        "checkpoints": wal_a.checkpoints - wal_b.checkpoints,
        "bytes_per_execution": _per(wal_bytes, executions),
        "records_per_execution": _per(records, executions),
        "fpi_per_execution": _per(fpi, executions),
        "fpi_share_of_records": _per(fpi, records),
        "action_steps": action_steps,
        "bytes_per_action_step": _per(wal_bytes, action_steps),
    }
    tables = {}
    for name, now in after.tables.items():
        then = before.tables.get(name, TableSize(name, 0, 0))
        grew = (now.table_bytes - then.table_bytes, now.index_bytes - then.index_bytes)
        if grew != (0, 0):
            tables[name] = {"table_bytes": grew[0], "index_bytes": grew[1]}
    table_bytes = sum(t["table_bytes"] for t in tables.values())
    index_bytes = sum(t["index_bytes"] for t in tables.values())
    ledger = {
        "table_bytes": table_bytes,
        "index_bytes": index_bytes,
        "table_bytes_per_execution": _per(table_bytes, executions),
        "index_bytes_per_execution": _per(index_bytes, executions),
        "bytes_per_execution": _per(table_bytes + index_bytes, executions),
        # Only the tables that grew or shrank; sizes move in whole 8 KB pages.
        "tables": {
            name: {
                **t,
                "table_bytes_per_execution": _per(t["table_bytes"], executions),
                "index_bytes_per_execution": _per(t["index_bytes"], executions),
            }
            for name, t in sorted(tables.items(), key=lambda item: -sum(item[1].values()))
        },
    }
    return {"executions": executions, "wal": wal, "ledger": ledger}
