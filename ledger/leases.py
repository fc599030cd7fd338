"""Partition leases and worker heartbeats: the rows that say who owns which partition.

Every race over a partition is decided here, by Postgres row locks and by the
epoch a lease was claimed with; daemon/ownership.py decides when to call what.
Partitions and workers belong to a deployment (its subject/stream prefix):
deployments sharing a ledger never see each other's (migration 011).
"""

from ledger.connection import Queryable

# The rows of before migration 011 belong to no deployment (''): the first one to start adopts them.
_ADOPT = """
UPDATE ordo.partitions SET deployment = $1
WHERE deployment = '' AND NOT EXISTS (SELECT FROM ordo.partitions WHERE deployment = $1)
"""

_CREATE = """
INSERT INTO ordo.partitions (deployment, partition) SELECT $1, generate_series(0, $2 - 1)
ON CONFLICT DO NOTHING
"""

_HEARTBEAT = """
INSERT INTO ordo.workers (name, deployment) VALUES ($1, $2)
ON CONFLICT (deployment, name) DO UPDATE SET heartbeat_at = now()
"""

_LIVE = """
SELECT count(*) FROM ordo.workers WHERE deployment = $1 AND heartbeat_at > now() - make_interval(secs => $2)
"""

_RENEW = """
UPDATE ordo.partitions p SET lease_until = now() + make_interval(secs => $3)
FROM unnest($4::int[], $5::bigint[]) AS h(partition, epoch)
WHERE p.deployment = $1 AND p.partition = h.partition AND p.epoch = h.epoch AND p.owner = $2
RETURNING p.partition
"""

_CLAIM = """
UPDATE ordo.partitions p
SET epoch = p.epoch + 1, owner = $2, claimed_at = now(), lease_until = now() + make_interval(secs => $3),
    -- A watermark of another incarnation of the stream means nothing here: start over.
    watermark = CASE WHEN p.stream_created IS DISTINCT FROM $6 THEN 0 ELSE p.watermark END,
    stream_created = $6
FROM (SELECT partition FROM ordo.partitions
      WHERE deployment = $1 AND partition < $5 AND (owner IS NULL OR lease_until IS NULL OR lease_until < now())
      ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) free
WHERE p.deployment = $1 AND p.partition = free.partition
RETURNING p.partition, p.epoch, p.watermark
"""

_RELEASE = """
UPDATE ordo.partitions SET owner = NULL, lease_until = NULL
WHERE deployment = $1 AND partition = $3 AND owner = $2 AND epoch = $4
"""

_LEAVE = "DELETE FROM ordo.workers WHERE deployment = $1 AND name = $2"


async def create_partitions(conn: Queryable, deployment: str, partitions: int) -> None:
    """Make sure the deployment's partitions 0 .. partitions - 1 have a row, unowned when new."""
    await conn.execute(_ADOPT, deployment)
    await conn.execute(_CREATE, deployment, partitions)


async def heartbeat(conn: Queryable, deployment: str, worker: str) -> None:
    """Record that `worker` of `deployment` is alive now (registering it on its first beat)."""
    await conn.execute(_HEARTBEAT, worker, deployment)


async def live_workers(conn: Queryable, deployment: str, ttl_s: float) -> int:
    """How many workers of `deployment` have beaten within the last `ttl_s` seconds."""
    live: int = await conn.fetchval(_LIVE, deployment, ttl_s)
    return live


async def renew(
    conn: Queryable, deployment: str, worker: str, ttl_s: float, partitions: list[int], epochs: list[int]
) -> set[int]:
    """Extend by `ttl_s` the leases `worker` still holds with these epochs; returns the partitions renewed.

    A partition missing from the answer was claimed by another worker (its epoch moved on).
    """
    return {r[0] for r in await conn.fetch(_RENEW, deployment, worker, ttl_s, partitions, epochs)}


async def claim(
    conn: Queryable, deployment: str, worker: str, ttl_s: float, wanted: int, partitions: int, stream_created: str
) -> dict[int, tuple[int, int]]:
    """Take up to `wanted` free or expired partitions below `partitions`: partition -> (epoch, watermark).

    Each claim bumps the partition's epoch, which fences off the commits of its
    previous owner. `stream_created` identifies the execution stream the
    watermarks count in; a watermark of another stream starts over at 0.
    """
    rows = await conn.fetch(_CLAIM, deployment, worker, ttl_s, wanted, partitions, stream_created)
    return {r["partition"]: (r["epoch"], r["watermark"]) for r in rows}


async def release(conn: Queryable, deployment: str, worker: str, partition: int, epoch: int) -> None:
    """Give a partition back, if `worker` still holds it with `epoch`."""
    await conn.execute(_RELEASE, deployment, worker, partition, epoch)


async def forget_worker(conn: Queryable, deployment: str, worker: str) -> None:
    """Drop `worker`'s heartbeat row, so that it no longer counts as live."""
    await conn.execute(_LEAVE, deployment, worker)


_NOW = "SELECT extract(epoch FROM now())::float8"

_OWNERS_SINCE = """
SELECT owner, count(*) AS n FROM ordo.partitions
WHERE deployment = $1 AND claimed_at >= to_timestamp($2) AND owner IS NOT NULL GROUP BY owner
"""


async def ledger_clock(conn: Queryable) -> float:
    """The ledger's clock now, in epoch seconds: what `claimed_at` is written with, wherever the servers are."""
    now: float = await conn.fetchval(_NOW)
    return now


async def partitions_claimed_since(conn: Queryable, deployment: str, since: float) -> dict[str, int]:
    """Owner -> how many of the deployment's partitions it holds by a claim made at or after `since`
    (epoch s, the ledger's clock)."""
    return {r["owner"]: r["n"] for r in await conn.fetch(_OWNERS_SINCE, deployment, since)}


_PARTITION_COUNT = "SELECT count(*) FROM ordo.partitions WHERE deployment = $1"


async def partition_count(conn: Queryable, deployment: str) -> int:
    """How many partitions the deployment has (its `partitions` setting, fixed at set-up, which decides
    its execution subjects); 0 when none of its workers ever started on this ledger."""
    count: int = await conn.fetchval(_PARTITION_COUNT, deployment)
    return count


_EPOCHS = """
SELECT partition, epoch FROM ordo.partitions WHERE deployment = $1 AND partition = ANY($2::int[]) FOR SHARE
"""

_SET_WATERMARKS = """
UPDATE ordo.partitions p SET watermark = w.watermark
FROM unnest($2::int[], $3::bigint[]) AS w(partition, watermark)
WHERE p.deployment = $1 AND p.partition = w.partition AND p.watermark < w.watermark
"""


async def epochs_for_commit(conn: Queryable, deployment: str, partitions: list[int]) -> dict[int, int]:
    """Partition -> its epoch now, locked FOR SHARE until the caller's transaction ends.

    FOR SHARE: a claim (an UPDATE of the epoch) waits for the commit that
    checked it, and a commit after the claim sees the new epoch. Either order
    is safe.
    """
    return {r["partition"]: r["epoch"] for r in await conn.fetch(_EPOCHS, deployment, partitions)}


async def set_watermarks(conn: Queryable, deployment: str, watermarks: dict[int, int]) -> None:
    """Record where each partition's stream has settled up to (only forward)."""
    await conn.execute(_SET_WATERMARKS, deployment, list(watermarks), list(watermarks.values()))
