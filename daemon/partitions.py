"""The partitions a worker owns: its ownership rounds, and each partition's consumer started and stopped.

Leases and epochs are daemon/ownership.py's; this runs them. Every
`lease_renew_s` a round renews the leases, takes a fair share and gives back
the surplus. A claimed partition is fenced with its epoch (every commit that
touches it checks it, ledger/batcher.py) and its consumer resumes after the
partition's watermark (daemon/topology.py); a partition given back first lets
what is in flight settle. Consumer lag is measured here too, on a loop of its
own, which also creates again a consumer JetStream has lost.
"""

import asyncio
import logging
import time

import nats.errors
from nats.js.errors import NotFoundError

from ledger import lane_floors
from ledger.connection import CONNECTION_ERRORS

from . import logs, metrics
from .config import Config
from .intake import Intake
from .ownership import Ownership
from .progress import PartitionProgress
from .resident import ResidentExecutions
from .timers import DueTimers
from .topology import Topology

log = logging.getLogger("ordo.worker")


class Partitions:
    """Ownership rounds; each owned partition's fencing epoch, progress, timers and fetch loop."""

    def __init__(
        self,
        config: Config,
        *,
        ownership: Ownership,
        topology: Topology,
        intake: Intake,
        timers: DueTimers,
        resident: ResidentExecutions,
        progress: dict[int, PartitionProgress],
        epochs: dict[int, int],
        closing: set,
        stopping: asyncio.Event,
        ready: asyncio.Event,
        on_pool,
        js,
        stream_created: str,
        lanes_stream_created: dict[int, str],
        on_fetcher_ended,
    ):
        self.config = config
        self.ownership = ownership
        self.topology = topology
        self.intake = intake
        self.timers = timers
        self.resident = resident
        self.progress = progress
        #: partition -> the epoch it was claimed under (the worker's map, which every commit is checked with).
        self.epochs = epochs
        #: Partitions being given back or lost: their fetch loops finish and stop.
        self.closing = closing
        self.stopping = stopping
        self.ready = ready
        self._on_pool = on_pool
        self._js = js
        self._stream_created = stream_created
        self._lanes_stream_created = lanes_stream_created
        #: Lane -> the floor last recorded in the ledger (ledger/lane_floors.py), so that only those
        #: that moved on are written.
        self._floors_recorded: dict[int, int] = {}
        self._on_fetcher_ended = on_fetcher_ended
        #: Partitions claimed whose consumer could not be set up yet: partition -> (epoch, watermark).
        self.unstarted: dict = {}
        #: The task starting them, apart from the rounds.
        self._starter: asyncio.Task | None = None
        #: Partitions being let go (given back, or lost): until what they had in flight has
        #: settled they stay `closing`, and a new claim of one waits to be started. Each has a task
        #: (`_letting_go_of`) that ends by forgetting it, or fails and stops the worker: none stays
        #: here for good, which would leave a claim of it renewed round after round and never started.
        self._letting_go: set = set()
        #: Those tasks, held until they end (the loop keeps only weak references to tasks).
        self._let_go_tasks: set[asyncio.Task] = set()
        #: The first of them to fail: the next round raises it, and the worker stops.
        self._let_go_failure: BaseException | None = None

    def owns(self, partition: int) -> bool:
        """Whether this worker owns the partition and keeps applying its messages."""
        return partition in self.ownership.owned and partition not in self.closing

    def watermarks(self) -> dict[int, int]:
        """Each partition's watermark for the next commit to write: of those still held under the
        epoch they were started with. A lost partition's (or one lost and claimed again, not yet
        started afresh) would be fenced, and stop the worker for nothing its commit carried."""
        owned, epochs = self.ownership.owned, self.epochs
        return {p: progress.watermark for p, progress in self.progress.items() if owned.get(p) == epochs.get(p)}

    # -- ownership rounds -----------------------------------------------------

    async def ownership_loop(self) -> None:
        """Keep leases, take a fair share, give back the surplus (see daemon/ownership.py)."""
        try:
            await self._rounds()
        finally:
            if self._starter is not None:
                self._starter.cancel()

    async def _rounds(self) -> None:
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                share, lost, gained = await self._on_pool(self._round, "ownership")
            except CONNECTION_ERRORS:
                return
            took = time.monotonic() - began
            if took > self.config.lease_ttl_s / 2:
                log.warning(
                    "an ownership round took %.1f s (leases last %.1f s): the ledger is slow to answer",
                    took,
                    self.config.lease_ttl_s,
                    extra=logs.failure("slow_ownership_round", seconds=round(took, 2)),
                )
            if lost:
                self._lost(lost)
            self.unstarted.update(gained)
            failed = self._starter_failure() or self._let_go_failure
            if failed is not None:
                raise failed  # the worker stops, as it did when a start failed within the round
            if self.unstarted and (self._starter is None or self._starter.done()):
                # Off the round: starting a consumer waits on JetStream (seconds while a
                # stream elects a new leader), and the next renewal must not wait with it.
                self._starter = asyncio.get_running_loop().create_task(self._start_unstarted())
            elif self._starter is None or self._starter.done():
                self.ready.set()  # nothing claimed to start (else the starter says when it is done)
                self.intake.lanes.opened.set()
            self._give_back_surplus(share)
            metrics.owned_partitions.set(len(self.ownership.owned))
            try:
                await asyncio.wait_for(self.stopping.wait(), self.config.lease_renew_s)
            except TimeoutError:
                pass

    def _starter_failure(self) -> BaseException | None:
        starter = self._starter
        if starter is None or not starter.done() or starter.cancelled():
            return None
        return starter.exception()

    async def _round(self, conn) -> tuple:
        share = await self.ownership.fair_share(conn)
        lost = await self.ownership.renew_leases(conn)
        return share, lost, await self.ownership.claim(conn, share, self._stream_created)

    def _lost(self, lost: list[int]) -> None:
        # Another worker holds them under a newer epoch: whatever of
        # theirs is still in flight here will be fenced at commit.
        log.error(
            "lost partition(s) %s to another worker",
            lost,
            extra=logs.failure("partitions_lost", partitions=sorted(lost)),
        )
        for p in lost:
            self.stop(p)
            self._letting_go_of(p, self._let_go)

    async def _start_unstarted(self) -> None:
        for p, claim in sorted(self.unstarted.items()):
            if self.unstarted.get(p) != claim:
                continue  # lost meanwhile (and perhaps claimed again: the next start takes that)
            if p in self._letting_go:
                continue  # its last ownership is still settling: started in a later round
            epoch, watermark = claim
            try:
                await self._start(p, epoch, watermark)
            except nats.errors.Error as exc:
                # NATS is restarting: keep the lease, try again next round.
                log.warning(
                    "partition %d not started (%s); retrying",
                    p,
                    exc,
                    extra=logs.failure("partition_start", exc, partition=p),
                )
                continue
            if self.unstarted.get(p) == claim:
                del self.unstarted[p]
        self.ready.set()  # the first claims are fetching (or will be retried next round)
        self.intake.lanes.opened.set()  # all at once: no lane of the first claims gets a head start

    def _give_back_surplus(self, share: int) -> None:
        for p in self.ownership.surplus(share):
            self._letting_go_of(p, self._release)

    def _letting_go_of(self, p: int, let_go) -> None:
        """`let_go(p)` as a task of its own, unless p is being let go already; held, and its failure
        never dropped: logged, and raised by the next round (a partition it left in `_letting_go`
        would never be started again while this worker holds it)."""
        if p in self._letting_go:
            return
        self._letting_go.add(p)
        task = asyncio.get_running_loop().create_task(let_go(p))
        self._let_go_tasks.add(task)
        task.add_done_callback(lambda task: self._let_go_ended(p, task))

    def _let_go_ended(self, p: int, task: asyncio.Task) -> None:
        self._let_go_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error(
            "letting go of partition %d failed: %r; stopping the worker",
            p,
            exc,
            extra=logs.failure("partition_let_go", exc, partition=p),
        )
        if self._let_go_failure is None:
            self._let_go_failure = exc

    # -- one partition --------------------------------------------------------

    async def _start(self, p: int, epoch: int, watermark: int) -> None:
        """A claimed partition: fence with its epoch, resume its consumer after the watermark.

        Every wait on JetStream here is followed by a check that the partition is still held: it
        may have been lost, or given back above the fair share, meanwhile (and its progress dropped).
        """
        if not self._holds(p, epoch):
            return
        self.epochs[p] = epoch
        self.progress[p] = PartitionProgress(watermark)
        await self.topology.resume_partition(self._js, p, epoch, watermark)
        if not self._holds(p, epoch):
            return  # lost while JetStream set the consumer up: the new owner's epoch fences us
        consumer = self.intake.consumer(self.topology.exec_stream, self.topology.partition_consumer(p, epoch))
        await consumer.subscribe()
        if not self._holds(p, epoch):
            await consumer.unsubscribe()
            return
        try:
            await self._start_lanes(p, epoch)
        except BaseException:
            await consumer.unsubscribe()  # the start is tried again next round, with a subscription of its own
            raise
        if not self._holds(p, epoch):
            await consumer.unsubscribe()
            return
        self.timers.own(p)
        task = self.intake.fetch_partition(p, consumer)
        task.add_done_callback(self._on_fetcher_ended)
        log.info(
            "owns partition %d (epoch %d, resuming after %d)",
            p,
            epoch,
            watermark,
            extra={"partition": p, "epoch": epoch},
        )

    async def _start_lanes(self, p: int, epoch: int) -> None:
        """The trigger lanes the partition serves (daemon/lanes.py), under the same epoch."""
        if not self._holds(p, epoch):
            return

        async def subscribe(lane: int, durable: str):
            return await self.intake.subscribe_lane(lane, durable)

        created = {lane: self._lanes_stream_created[lane] for lane in self.topology.lanes_of(p)}
        floors = await self._on_pool(
            lambda conn: lane_floors.settled(conn, self.ownership.deployment, created), "lane floors"
        )
        for task in await self.intake.lanes.start(p, epoch, subscribe, floors):
            task.add_done_callback(self._on_fetcher_ended)
        if not self._holds(p, epoch):
            self.intake.lanes.stop(p)

    def _holds(self, p: int, epoch: int) -> bool:
        return self.ownership.owned.get(p) == epoch and p not in self.closing

    def stop(self, p: int) -> None:
        self.closing.add(p)
        self.intake.lanes.stop(p)
        self.unstarted.pop(p, None)
        self.timers.disown(p)
        self.resident.drop_partition(p)

    async def _release(self, p: int) -> None:
        """Above the fair share: stop fetching, let what is in flight settle, then give it back."""
        self.stop(p)
        if not await self._settled(p):
            return  # the worker is stopping: it gives back what it still owns as it leaves
        # Settled: nothing of ours needs the lease any more, and from here on no round renews it,
        # whether or not the UPDATE giving it back lands. If it cannot be written, the lease lapses
        # within lease_ttl_s and the partition is claimable as a dead worker's is (the next claim,
        # this worker's too, bumps the epoch and starts it afresh). Keeping it owned and renewed until
        # the UPDATE lands would hold a partition nobody serves for as long as the ledger refuses us
        # that one statement, and count it in this worker's share, so that it claims none in its place.
        epoch = self.ownership.let_go(p)
        try:
            if epoch is not None:  # else lost meanwhile: nothing to give back
                await self._give_back(p, epoch)
        finally:
            self._forget(p)  # a later claim of it is started, whatever became of the UPDATE

    async def _give_back(self, p: int, epoch: int) -> None:
        """The UPDATE ending the lease, retried on a lost connection as the rounds' statements are, for
        as long as that lease can last: after that it has lapsed anyway."""
        try:
            await asyncio.wait_for(
                self._on_pool(lambda conn: self.ownership.give_back(conn, p, epoch), f"release of partition {p}"),
                self.config.lease_ttl_s,
            )
        except CONNECTION_ERRORS as exc:  # a lease's time of retries, or the worker is stopping
            log.warning(
                "partition %d not given back (%r): its lease lapses instead",
                p,
                exc,
                extra=logs.failure("partition_release", exc, partition=p),
            )
            return
        log.info("gave partition %d back (above its fair share)", p, extra={"partition": p})

    async def _let_go(self, p: int) -> None:
        """A lost partition (stopped): once what it had in flight has settled, or been fenced, it is
        forgotten, so that a later claim of it starts afresh instead of finding it still closing."""
        if await self._settled(p):
            self._forget(p)

    async def _settled(self, p: int) -> bool:
        """Until the stopped partition's fetch loops have ended and what they took has settled;
        False if the worker began to stop meanwhile."""
        fetcher = self.intake.fetchers.pop(p, None)
        if fetcher is not None:
            await asyncio.gather(fetcher, return_exceptions=True)
        await self.intake.lanes.drain(p, timeout=self.config.ack_wait_s)
        while len(self.progress.get(p, ())) and not self.stopping.is_set():
            await asyncio.sleep(0.05)
        return not self.stopping.is_set()

    def _forget(self, p: int) -> None:
        self.epochs.pop(p, None)
        self.progress.pop(p, None)
        self.resident.drop_partition(p)  # what settled after it stopped
        self.closing.discard(p)
        self._letting_go.discard(p)

    # -- consumer lag ---------------------------------------------------------

    async def lag_loop(self) -> None:
        """Consumer lag, on its own: NATS round trips must not delay the ownership
        rounds, whose lease renewals keep the partitions (and are Postgres only). What it
        asks JetStream also tells it which consumers are gone (`_create_again`)."""
        while not self.stopping.is_set():
            await self._measure_lag()
            try:
                await asyncio.wait_for(self.stopping.wait(), max(self.config.lease_renew_s, 1.0))
            except TimeoutError:
                pass

    async def _measure_lag(self) -> None:
        """Consumer lag per stream: what JetStream holds for this worker's consumers, not yet delivered
        (summed over the workers, a stream's whole backlog: each worker reports its own lanes). A
        consumer it finds gone is created again (`_create_again`)."""
        t = self.topology
        triggers, lanes_gone = await self.intake.lanes.measure(time.time_ns())
        await self._record_lane_floors()
        exec_lag, gone = 0, []
        try:
            for p, epoch in list(self.ownership.owned.items()):
                try:
                    exec_lag += (
                        await self._js.consumer_info(t.exec_stream, t.partition_consumer(p, epoch))
                    ).num_pending
                except NotFoundError:
                    if self._started(p, epoch):
                        gone.append((p, epoch))
        except Exception as exc:  # a metric is not worth a crash
            log.debug("consumer lag not measured: %s", exc, extra=logs.failure("consumer_info", exc))
        else:
            for stream in t.trigger_stream_names():  # (0 for a stream none of this worker's lanes is in)
                metrics.consumer_lag.labels(stream).set(triggers.get(stream, 0))
            metrics.consumer_lag.labels(t.exec_stream).set(exec_lag)
        if gone or lanes_gone:
            try:
                await self._create_again(gone, lanes_gone)
            except Exception as exc:  # tried again at the next measurement; the loop must go on
                log.warning("consumers not created again: %r", exc, extra=logs.failure("consumer_create_again", exc))

    async def _record_lane_floors(self) -> None:
        """Where this worker's lanes had settled, as just measured, into the ledger: a lane whose
        consumers JetStream lost (they keep their state in memory) resumes after it."""
        floors = {
            lane.index: (self._lanes_stream_created[lane.index], lane.settled)
            for lane in self.intake.lanes.running.values()
            if not lane.stopping and lane.settled > self._floors_recorded.get(lane.index, 0)
        }
        if not floors:
            return
        try:
            await self._on_pool(lambda conn: lane_floors.record(conn, self.ownership.deployment, floors), "lane floors")
        except CONNECTION_ERRORS:  # stopping
            return
        self._floors_recorded.update({lane: settled for lane, (_, settled) in floors.items()})

    def _started(self, p: int, epoch: int) -> bool:
        """Whether the partition is held and was started under `epoch` (its consumer set up)."""
        return (
            self._holds(p, epoch) and self.epochs.get(p) == epoch and p in self.progress and p in self.intake.fetchers
        )

    async def _create_again(self, partitions: list[tuple[int, int]], lanes: list) -> None:
        """Consumers of this worker's partitions and lanes that JetStream no longer has (deleted by
        hand, lost with a server's state) are created again, each to resume after where its work
        had settled: a partition after its watermark, a lane after its consumer's ack floor when last
        measured (what came since is delivered again and deduped, as after a handover). Without this
        their fetch loops would be refused for as long as the worker held them.

        Only once the ledger confirms the ownership: a worker that lost the partition (and has not
        noticed yet) finds its consumer deleted by the new owner, and must not bring it back. The
        ledger is asked once per partition: a server restart loses a partition's consumer and all
        of its lanes' at once.
        """
        asked: dict[tuple[int, int], bool] = {}

        async def confirmed(p: int, epoch: int) -> bool:
            if (p, epoch) not in asked:
                asked[p, epoch] = await self._confirmed(p, epoch)
            return asked[p, epoch] and self._holds(p, epoch)

        for p, epoch in partitions:
            if await confirmed(p, epoch):
                watermark = self.progress[p].watermark

                async def resume(p=p, epoch=epoch, watermark=watermark) -> int:
                    await self.topology.resume_partition(self._js, p, epoch, watermark)
                    return watermark

                await self._create_one_again("partition", f"partition {p}", resume, partition=p)
        for lane in lanes:
            if not lane.stopping and await confirmed(lane.partition, lane.epoch):
                await self._create_one_again(
                    "lane",
                    f"trigger lane {lane.index}",
                    lambda lane=lane: self.intake.lanes.create_again(lane),
                    lane=lane.index,
                )

    async def _create_one_again(self, kind: str, what: str, create, **where) -> None:
        """`await create()` (the sequence the consumer resumes after), counted and logged; a NATS
        failure is logged, and the next measurement finds the consumer gone again."""
        try:
            after = await create()
        except nats.errors.Error as exc:
            log.warning(
                "%s's consumer not created again (%s); trying again",
                what,
                exc,
                extra=logs.failure("consumer_create_again", exc, **where),
            )
            return
        metrics.consumers_created_again.labels(kind).inc()
        log.warning(
            "%s's consumer was gone from JetStream: created again, resuming after %d",
            what,
            after,
            extra=logs.failure("consumer_gone", **where),
        )

    async def _confirmed(self, p: int, epoch: int) -> bool:
        """Whether the partition is still held under `epoch`, by this worker's view and the ledger's."""
        if not self._holds(p, epoch):
            return False
        try:
            held = await self._on_pool(lambda conn: self.ownership.still_holds(conn, p, epoch), "ownership check")
        except CONNECTION_ERRORS:  # stopping: nothing to create again
            return False
        return held and self._holds(p, epoch)
