"""`ordo ledger export`: finished executions of past days, archived before retention drops them.

One JSON object per line, gzip-compressed: each is the document `ordo
inspect` shows (daemon/inspect.py `document`), so a person reads an archived
execution back with `ordo inspect --from-file FILE EXECUTION_ID`, or with
`zcat FILE | jq`. Read in pages of PAGE executions, each with its history
and open dead letters in one query apiece: the archive of a day of traffic
is a few thousand round trips, not one per execution. Partition by partition
(the days before the date, and DEFAULT), each in its primary key's order.
"""

import gzip
from datetime import date

import orjson

from ledger import history, partitioning

from .inspect import document

PAGE = 1000


async def export(conn, before: date, out: str) -> int:
    """Write the finished executions of the days before `before` to `out` (.jsonl.gz); how many."""
    written = 0
    days = [
        p for p in await partitioning.partitions(conn, "executions") if p.default or p.low is None or p.low < before
    ]
    with gzip.open(out, "wb") as archive:
        for day in days:
            written += await _export_partition(conn, day.name, before, archive)
    return written


async def _export_partition(conn, partition: str, before: date, archive) -> int:
    written = 0
    after = None
    while True:
        page = await history.finished_before(conn, partition, before, after, PAGE)
        if not page:
            return written
        steps: dict[str, list] = {}
        for row in await history.transitions_of(conn, page, before):
            steps.setdefault(row["execution_id"], []).append(row)
        letters: dict[str, list] = {}
        for row in await history.open_letters_of(conn, [r["execution_id"] for r in page]):
            letters.setdefault(row["execution_id"], []).append(row)
        for ex in page:
            doc = document(ex, steps.get(ex["execution_id"], []), None, None, letters.get(ex["execution_id"], []))
            archive.write(orjson.dumps(doc) + b"\n")
        written += len(page)
        after = page[-1]["execution_id"]


def read_archived(path: str, execution_id: str) -> dict | None:
    """The archived document of one execution from an export file, or None."""
    needle = execution_id.encode()
    with gzip.open(path, "rb") as archive:
        for line in archive:
            if needle in line:
                doc = orjson.loads(line)
                if doc.get("execution_id") == execution_id:
                    return doc
    return None
