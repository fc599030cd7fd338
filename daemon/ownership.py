"""Who owns which partition: leases in the ledger, fenced by epochs.

No home-made consensus: Postgres row locks decide every race. Each round
(every `lease_renew_s`) a worker

1. heartbeats (`ordo.workers`) and counts the live workers (heartbeat within
   the lease TTL) to get its fair share, ceil(partitions / live workers);
2. renews the leases it holds, but only where the epoch is still the one it
   claimed with: a partition whose lease ran out and was claimed by another
   worker is lost, and its late commits are refused by that epoch;
3. claims free or expired partitions up to its share (`FOR UPDATE SKIP
   LOCKED`, so two claimers never wait on each other), bumping their epochs;
4. gives back partitions above its share once the caller has drained them, so
   that a worker that joins gets its share within a round or two.

A worker that stops (SIGSTOP, a dead VM) keeps nothing: its partitions are
claimable `lease_ttl_s` after its last renewal, so takeover takes at most
lease_ttl_s + lease_renew_s.
"""

import math

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


class Ownership:
    def __init__(self, name: str, partitions: int, *, lease_ttl_s: float, lease_renew_s: float):
        self.name = name
        self.partitions = partitions
        self.ttl = lease_ttl_s
        self.renew = lease_renew_s
        #: partition -> epoch this worker claimed it with
        self.owned: dict[int, int] = {}

    async def prepare(self, conn) -> None:
        await conn.execute(
            "INSERT INTO ordo.partitions (partition) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
            self.partitions,
        )

    async def fair_share(self, conn) -> int:
        await conn.execute(_HEARTBEAT, self.name)
        live = max(1, await conn.fetchval(_LIVE, self.ttl))
        return math.ceil(self.partitions / live)

    async def renew_leases(self, conn) -> list[int]:
        """Renew what is still ours; returns the partitions lost to another owner."""
        if not self.owned:
            return []
        held = list(self.owned)
        kept = {r[0] for r in await conn.fetch(_RENEW, self.name, self.ttl, held, [self.owned[p] for p in held])}
        lost = [p for p in held if p not in kept]
        for p in lost:
            del self.owned[p]
        return lost

    async def claim(self, conn, share: int, stream_created: str) -> dict[int, tuple[int, int]]:
        """Claim up to `share` - owned free or expired partitions: partition -> (epoch, watermark).

        `stream_created` identifies the execution stream the watermarks count in.
        """
        wanted = share - len(self.owned)
        if wanted <= 0:
            return {}
        rows = await conn.fetch(_CLAIM, self.name, self.ttl, wanted, self.partitions, stream_created)
        gained = {r["partition"]: (r["epoch"], r["watermark"]) for r in rows}
        for p, (epoch, _) in gained.items():
            self.owned[p] = epoch
        return gained

    def surplus(self, share: int) -> list[int]:
        """Partitions above the fair share, highest first, to be drained and released."""
        extra = len(self.owned) - share
        return sorted(self.owned, reverse=True)[:extra] if extra > 0 else []

    async def release(self, conn, partition: int) -> None:
        epoch = self.owned.pop(partition, None)
        if epoch is not None:
            await conn.execute(_RELEASE, self.name, partition, epoch)

    async def leave(self, conn) -> None:
        """On a clean exit: give every partition back at once and stop counting as live."""
        for partition in list(self.owned):
            await self.release(conn, partition)
        await conn.execute("DELETE FROM ordo.workers WHERE name = $1", self.name)
