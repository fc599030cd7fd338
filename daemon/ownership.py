"""Who owns which partition: leases in the ledger, fenced by epochs.

No home-made consensus: Postgres row locks decide every race (the statements
are in ledger/leases.py; this decides when to run which). Each round
(every `lease_renew_s`) a worker

1. heartbeats (`ordo.workers`) and counts the live workers of its deployment
   (heartbeat within the lease TTL) to get its fair share, ceil(partitions /
   live workers);
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

Partitions are a deployment's (its prefix: its own streams): two deployments
sharing a ledger neither claim each other's partitions nor count each
other's workers.
"""

import math

from ledger import leases


class Ownership:
    def __init__(self, name: str, partitions: int, *, deployment: str, lease_ttl_s: float, lease_renew_s: float):
        self.name = name
        #: The deployment (prefix) whose partitions these are: others on the same ledger have their own.
        self.deployment = deployment
        self.partitions = partitions
        self.ttl = lease_ttl_s
        self.renew = lease_renew_s
        #: partition -> epoch this worker claimed it with
        self.owned: dict[int, int] = {}

    async def prepare(self, conn) -> None:
        await leases.create_partitions(conn, self.deployment, self.partitions)

    async def fair_share(self, conn) -> int:
        await leases.heartbeat(conn, self.deployment, self.name)
        live = max(1, await leases.live_workers(conn, self.deployment, self.ttl))
        return math.ceil(self.partitions / live)

    async def renew_leases(self, conn) -> list[int]:
        """Renew what is still ours; returns the partitions lost to another owner."""
        if not self.owned:
            return []
        held = list(self.owned)
        kept = await leases.renew(conn, self.deployment, self.name, self.ttl, held, [self.owned[p] for p in held])
        # A partition released while the renewal was in flight (a drain task of its own) is
        # gone from `owned` already, and was given back, not lost.
        lost = [p for p in held if p not in kept and p in self.owned]
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
        gained = await leases.claim(conn, self.deployment, self.name, self.ttl, wanted, self.partitions, stream_created)
        for p, (epoch, _) in gained.items():
            self.owned[p] = epoch
        return gained

    async def still_holds(self, conn, partition: int, epoch: int) -> bool:
        """Whether the ledger still holds the partition as ours under `epoch` (its lease renewed:
        the question is asked before acting as its owner, and the answer holds for a lease)."""
        return partition in await leases.renew(conn, self.deployment, self.name, self.ttl, [partition], [epoch])

    def surplus(self, share: int) -> list[int]:
        """Partitions above the fair share, highest first, to be drained and released."""
        extra = len(self.owned) - share
        return sorted(self.owned, reverse=True)[:extra] if extra > 0 else []

    def let_go(self, partition: int) -> int | None:
        """Stop holding the partition: no round renews its lease from now on. Returns the epoch to
        give it back with (`give_back`), None if it was not held (lost meanwhile)."""
        return self.owned.pop(partition, None)

    async def give_back(self, conn, partition: int, epoch: int) -> None:
        """End the lease held under `epoch`. Safe to retry, and to run late: a claim made since, by any
        worker (this one too), has a newer epoch and is left alone."""
        await leases.release(conn, self.deployment, self.name, partition, epoch)

    async def release(self, conn, partition: int) -> None:
        epoch = self.let_go(partition)
        if epoch is not None:
            await self.give_back(conn, partition, epoch)

    async def leave(self, conn) -> None:
        """On a clean exit: give every partition back at once and stop counting as live."""
        for partition in list(self.owned):
            await self.release(conn, partition)
        await leases.forget_worker(conn, self.deployment, self.name)
