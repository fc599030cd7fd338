"""Partition leases and worker heartbeats: the rows that say who owns which partition.

Every race over a partition is decided here, by Postgres row locks and by the
epoch a lease was claimed with; daemon/ownership.py decides when to call what.
"""

from ledger.connection import Queryable

_CREATE = "INSERT INTO ordo.partitions (partition) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING"

_HEARTBEAT = """
INSERT INTO ordo.workers (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET heartbeat_at = now()
"""

_LIVE = "SELECT count(*) FROM ordo.workers WHERE heartbeat_at > now() - make_interval(secs => $1)"

_RENEW = """
UPDATE ordo.partitions p SET lease_until = now() + make_interval(secs => $2)
FROM unnest($3::int[], $4::bigint[]) AS h(partition, epoch)
WHERE p.partition = h.partition AND p.epoch = h.epoch AND p.owner = $1
RETURNING p.partition
"""

_CLAIM = """
UPDATE ordo.partitions p
SET epoch = p.epoch + 1, owner = $1, claimed_at = now(), lease_until = now() + make_interval(secs => $2),
    -- A watermark of another incarnation of the stream means nothing here: start over.
    watermark = CASE WHEN p.stream_created IS DISTINCT FROM $5 THEN 0 ELSE p.watermark END,
    stream_created = $5
FROM (SELECT partition FROM ordo.partitions
      WHERE partition < $4 AND (owner IS NULL OR lease_until IS NULL OR lease_until < now())
      ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED) free
WHERE p.partition = free.partition
RETURNING p.partition, p.epoch, p.watermark
"""

_RELEASE = """
UPDATE ordo.partitions SET owner = NULL, lease_until = NULL
WHERE partition = $2 AND owner = $1 AND epoch = $3
"""

_LEAVE = "DELETE FROM ordo.workers WHERE name = $1"


async def create_partitions(conn: Queryable, partitions: int) -> None:
    """Make sure partitions 0 .. partitions - 1 have a row, unowned when new."""
    await conn.execute(_CREATE, partitions)


async def heartbeat(conn: Queryable, worker: str) -> None:
    """Record that `worker` is alive now (registering it on its first beat)."""
    await conn.execute(_HEARTBEAT, worker)


async def live_workers(conn: Queryable, ttl_s: float) -> int:
    """How many workers have beaten within the last `ttl_s` seconds."""
    live: int = await conn.fetchval(_LIVE, ttl_s)
    return live


async def renew(conn: Queryable, worker: str, ttl_s: float, partitions: list[int], epochs: list[int]) -> set[int]:
    """Extend by `ttl_s` the leases `worker` still holds with these epochs; returns the partitions renewed.

    A partition missing from the answer was claimed by another worker (its epoch moved on).
    """
    return {r[0] for r in await conn.fetch(_RENEW, worker, ttl_s, partitions, epochs)}


async def claim(
    conn: Queryable, worker: str, ttl_s: float, wanted: int, partitions: int, stream_created: str
) -> dict[int, tuple[int, int]]:
    """Take up to `wanted` free or expired partitions below `partitions`: partition -> (epoch, watermark).

    Each claim bumps the partition's epoch, which fences off the commits of its
    previous owner. `stream_created` identifies the execution stream the
    watermarks count in; a watermark of another stream starts over at 0.
    """
    rows = await conn.fetch(_CLAIM, worker, ttl_s, wanted, partitions, stream_created)
    return {r["partition"]: (r["epoch"], r["watermark"]) for r in rows}


async def release(conn: Queryable, worker: str, partition: int, epoch: int) -> None:
    """Give a partition back, if `worker` still holds it with `epoch`."""
    await conn.execute(_RELEASE, worker, partition, epoch)


async def forget_worker(conn: Queryable, worker: str) -> None:
    """Drop `worker`'s heartbeat row, so that it no longer counts as live."""
    await conn.execute(_LEAVE, worker)


_NOW = "SELECT extract(epoch FROM now())::float8"

_OWNERS_SINCE = """
SELECT owner, count(*) AS n FROM ordo.partitions
WHERE claimed_at >= to_timestamp($1) AND owner IS NOT NULL GROUP BY owner
"""


async def ledger_clock(conn: Queryable) -> float:
    """The ledger's clock now, in epoch seconds: what `claimed_at` is written with, wherever the servers are."""
    now: float = await conn.fetchval(_NOW)
    return now


async def partitions_claimed_since(conn: Queryable, since: float) -> dict[str, int]:
    """Owner -> how many partitions it holds by a claim made at or after `since` (epoch s, the ledger's clock)."""
    return {r["owner"]: r["n"] for r in await conn.fetch(_OWNERS_SINCE, since)}
