"""One worker process: fetch -> order -> dispatch -> commit -> ack.

    triggers consumer ──decode──> enrol (dispatch the first steps) ─────────┐
    exec-p<N>-e<epoch> ─decode──> ordering ring ──> load, dispatch ────────┤
                                                                           v
                                       ledger batcher (one transaction per batch)
                                                                           │
                                 ack / nak, release the ring key  <────────┘

A new execution needs no hop through JetStream: its first steps run where its
trigger is consumed, and a duplicate trigger loses on the ledger's primary key.
Messages addressed to an existing execution pass through the ordering ring, so
that at most one of an execution's messages is between fetch and commit. So
do the results of in-process actions, which need no hop either: the worker
that ran the action owns the execution and applies the result itself
(daemon/local_results.py), on the state it kept since the request committed
(daemon/resident.py) rather than on a fresh ledger read.

Memory is bounded: a fetch waits while `max_ack_pending` messages are in
flight (each event of a trigger batch counts as one), a pull delivers at most
`fetch_max_bytes`, and the batcher stops intake while two batches wait for
Postgres.
"""

import asyncio
import logging
import os
import socket
import time
from datetime import datetime, timezone
from functools import partial

import asyncpg
import nats
import nats.errors

from hotpath import OrderingRing
from hotpath.envelope import BadMessage, decode_exec
from hotpath.vocabulary import WAIT_ACTION
from ledger import executions, workflows
from ledger.batcher import CONNECTION_ERRORS, Fenced, LedgerBatcher, Unit
from ledger.schema import require_current

from . import advance, enrolment, faults, logs, metrics
from .config import Config
from .definitions import WorkflowRegistry
from .effects import Effects, publish_stored
from .local_results import LocalResult
from .ownership import Ownership
from .progress import PartitionProgress
from .resident import ResidentExecutions
from .pull import Delivery, PullConsumer
from .servers import check_nats_server
from .timers import DueTimers
from .topology import Topology, partition_of
from .work_items import WorkItem

log = logging.getLogger("ordo.worker")


#: Seconds a pooled read, lease renewal or acquire may take before it is retried.
_POOL_COMMAND_TIMEOUT_S = 15.0


def _in_process_actions(config: Config):
    """The built-in actions, with the webhook's SSRF allow-list (CIDR strings) from the config."""
    from actions.contract import default_registry

    return default_registry(webhook_allow=[c.strip() for c in config.webhook_allow.split(",") if c.strip()])


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Worker:
    def __init__(self, config: Config, *, worker_index: int = 0, workers: int = 1, clock_ms=None, actions=None):
        self.config = config
        self.topology = Topology(config)
        self.index = worker_index
        self.workers = workers
        self.name = f"{socket.gethostname()}/{os.getpid()}/w{worker_index}"
        self.ownership = Ownership(self.name, config.partitions, lease_ttl_s=config.lease_ttl_s,
                                   lease_renew_s=config.lease_renew_s)
        self.registry = WorkflowRegistry()
        # The most messages fetched and not yet settled: a pull request opens while
        # in_flight + fetch_batch <= max_ack_pending, and then every open request (the
        # triggers' and one per partition) may still deliver a whole batch.
        self._most_fetched = config.max_ack_pending + (config.partitions + 1) * config.fetch_batch
        # Room for all of them plus a share of due timers.
        self.ring = OrderingRing(max(config.ring_capacity,
                                     self._most_fetched + config.max_ack_pending + config.fetch_batch))
        #: Epoch milliseconds; injectable so that tests can make "wait 2d" pass in a moment.
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.timers = DueTimers(horizon_s=config.timer_horizon_s)
        #: A timer a commit sets is held in memory from the commit only if it falls due within this;
        #: the timer loop's loads bring in the rest.
        self._timers_from_commits_ms = min(2 * config.timer_load_interval_ms, self.timers.horizon_ms)
        #: Executions waiting for an in-process action's result, kept between their messages.
        self.resident = ResidentExecutions()
        self._actions = actions
        self.effects: Effects | None = None
        self.progress: dict[int, PartitionProgress] = {}
        #: partition -> the epoch this worker claimed it under: every commit that touches it checks it.
        self.epochs: dict[int, int] = {}
        self._fetchers: dict = {}
        #: Partitions claimed whose consumer could not be set up yet: partition -> (epoch, watermark).
        self._unstarted: dict = {}
        #: Partitions being given back or lost: their fetch loops finish and stop.
        self._closing: set = set()
        self._releasing: set = set()
        self.batcher = LedgerBatcher(config.pg_dsn, max_rows=config.batch_max_rows, max_ms=config.batch_max_ms)
        # A message the streams accept (up to 4 x max_message_bytes) must fit one pull, or it never comes.
        self._min_pull_bytes = 4 * config.max_message_bytes + 64 * 1024
        self._fetch_max_bytes = max(config.fetch_max_bytes, self._min_pull_bytes)
        #: Bytes per trigger event lately (a moving average): sizes the triggers' pulls in events.
        self._event_bytes = 512.0
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._ring_ready = asyncio.Event()
        #: Set once every fetch loop has returned: nothing new can come in.
        self._intake_closed = False
        self._nc = None
        self._js = None
        self._pool = None
        self._listener = None
        self._tasks: list[asyncio.Task] = []
        #: The one ack-latency measurement in flight (see _time_acks).
        self._ack_probe: asyncio.Task | None = None
        self.fatal: BaseException | None = None

    # -- start and stop -------------------------------------------------------

    async def start(self) -> None:
        logs.bind_worker(self.name)  # every line from here and from the tasks started here names this worker
        self._nc = await nats.connect(
            self.config.nats_url, name=f"ordo-{self.name}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        check_nats_server(self._nc._server_info)
        self._js = self._nc.jetstream(timeout=10)
        faults.install(self.config.inject_faults, self._nc, self._js, self.batcher, worker=self.index)
        await self.topology.ensure(self._js)
        self._stream_created = str((await self._js.stream_info(self.topology.exec_stream)).created)
        if self._actions is None:
            self._actions = _in_process_actions(self.config)
        self.effects = Effects(self._js, self.topology, self._actions, concurrency=self.config.action_concurrency,
                               backlog=2 * self.config.action_concurrency,
                               on_call_done=self._action_call_done, apply_locally=self._take_local_result)
        # Bounded: a read or lease renewal on a connection that a Postgres restart
        # left half-dead must fail (and be retried), not hang the worker.
        self._pool = await asyncpg.create_pool(self.config.pg_dsn, min_size=1, max_size=4,
                                               command_timeout=_POOL_COMMAND_TIMEOUT_S)
        async def prepare(conn):
            await require_current(conn)
            await self.ownership.prepare(conn)

        await self._on_pool(prepare, "start")  # a backend terminated at start-up is retried, not fatal
        await self.reload_definitions()
        self._listener = await asyncpg.connect(self.config.pg_dsn)
        await self._listener.add_listener(workflows.DEPLOY_CHANNEL, self._on_deploy)

    async def reload_definitions(self) -> None:
        async def read(conn):
            return await workflows.load_all(conn), await workflows.tenants(conn)

        definitions, tenants = await self._on_pool(read, "definitions")
        self.registry.load(definitions, tenants)

    def _on_deploy(self, *_):
        asyncio.get_running_loop().create_task(self.reload_definitions())

    async def run(self) -> None:
        """Run until `stopping` is set, then drain: stop fetching, commit and ack what is in flight."""
        t = self.topology
        triggers = PullConsumer(self._nc, t.triggers_stream, t.triggers_consumer, max_bytes=self._fetch_max_bytes)
        await triggers.subscribe()
        self._fetchers["triggers"] = asyncio.create_task(
            self._fetch_loop(triggers, self._take_triggers, metrics.fetch_triggers_seconds, "triggers"))
        pump = asyncio.create_task(self._pump())
        committer = asyncio.create_task(self._commit_loop())
        timer_loop = asyncio.create_task(self._timer_loop())
        owner = asyncio.create_task(self._ownership_loop())
        lag = asyncio.create_task(self._lag_loop())
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, committer, pump, timer_loop, owner, self._fetchers["triggers"]],
                                     return_when=asyncio.FIRST_COMPLETED)
        self.stopping.set()
        for task in done:
            if task is not stop and task.exception() is not None:
                self.fatal = task.exception()
        # Drain: each fetch loop finishes the fetch it has open (at most its
        # 1 s expiry) and hands over what it got; then the ring and the
        # batcher empty out and the last batch commits and is acked.
        owner.cancel()
        lag.cancel()
        await asyncio.gather(owner, lag, return_exceptions=True)
        fetchers = list(self._fetchers.values())
        await asyncio.wait(fetchers, timeout=5)
        for task in fetchers:
            task.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)
        self._intake_closed = True
        self._ring_ready.set()
        self.batcher.nudge()
        if self.fatal is None:
            await asyncio.wait([committer], timeout=self.config.ack_wait_s)
        for task in (pump, committer, timer_loop):
            task.cancel()
        await asyncio.gather(pump, committer, timer_loop, return_exceptions=True)
        await self.effects.close()
        if self.fatal is None:
            # Everything settled: hand the partitions back now rather than when the leases run out.
            async with self._pool.acquire() as conn:
                await self.ownership.leave(conn)
        await self.close()
        if self.fatal is not None:
            raise self.fatal

    async def _on_pool(self, work, what: str):
        """Run `await work(conn)` on a pooled connection, retrying lost connections with back-off.

        Postgres restarting or a backend being terminated must slow the worker,
        not end it: only the batcher's commits decide anything, and they are
        idempotent; these reads and lease renewals can simply be tried again.
        """
        delay = 0.05
        while True:
            try:
                async with self._pool.acquire(timeout=_POOL_COMMAND_TIMEOUT_S) as conn:
                    return await asyncio.wait_for(work(conn), _POOL_COMMAND_TIMEOUT_S * 2)
            except CONNECTION_ERRORS as exc:
                if self.stopping.is_set() and what != "load":
                    raise
                log.warning("%s: lost the ledger connection (%s); retrying in %.2fs", what, exc, delay,
                            extra=logs.failure("ledger_connection", exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- ownership ------------------------------------------------------------

    async def _ownership_loop(self) -> None:
        """Keep leases, take a fair share, give back the surplus (see daemon/ownership.py)."""
        async def round_(conn):
            share = await self.ownership.fair_share(conn)
            lost = await self.ownership.renew_leases(conn)
            return share, lost, await self.ownership.claim(conn, share, self._stream_created)

        while not self.stopping.is_set():
            try:
                share, lost, gained = await self._on_pool(round_, "ownership")
            except CONNECTION_ERRORS:
                return
            if lost:
                # Another worker holds them under a newer epoch: whatever of
                # theirs is still in flight here will be fenced at commit.
                log.error("lost partition(s) %s to another worker", lost,
                          extra=logs.failure("partitions_lost", partitions=sorted(lost)))
                for p in lost:
                    self._stop_partition(p)
            self._unstarted.update(gained)
            for p, (epoch, watermark) in sorted(self._unstarted.items()):
                try:
                    await self._start_partition(p, epoch, watermark)
                except nats.errors.Error as exc:
                    # NATS is restarting: keep the lease, try again next round.
                    log.warning("partition %d not started (%s); retrying", p, exc,
                                extra=logs.failure("partition_start", exc, partition=p))
                    continue
                del self._unstarted[p]
            for p in self.ownership.surplus(share):
                if p not in self._releasing:
                    self._releasing.add(p)
                    asyncio.get_running_loop().create_task(self._release_partition(p))
            metrics.owned_partitions.set(len(self.ownership.owned))
            self.ready.set()
            try:
                await asyncio.wait_for(self.stopping.wait(), self.config.lease_renew_s)
            except asyncio.TimeoutError:
                pass

    async def _lag_loop(self) -> None:
        """Consumer lag, on its own: NATS round trips must not delay the ownership
        rounds, whose lease renewals keep the partitions (and are Postgres only)."""
        while not self.stopping.is_set():
            await self._measure_lag()
            try:
                await asyncio.wait_for(self.stopping.wait(), max(self.config.lease_renew_s, 1.0))
            except asyncio.TimeoutError:
                pass

    async def _measure_lag(self) -> None:
        """Consumer lag per stream: what JetStream holds for this worker's consumers, not yet delivered."""
        t = self.topology
        try:
            triggers = await self._js.consumer_info(t.triggers_stream, t.triggers_consumer)
            exec_lag = 0
            for p, epoch in list(self.ownership.owned.items()):
                exec_lag += (await self._js.consumer_info(t.exec_stream, t.partition_consumer(p, epoch))).num_pending
        except Exception as exc:  # a metric is not worth a crash
            log.debug("consumer lag not measured: %s", exc, extra=logs.failure("consumer_info", exc))
            return
        metrics.consumer_lag.labels(t.triggers_stream).set(triggers.num_pending)
        metrics.consumer_lag.labels(t.exec_stream).set(exec_lag)

    async def _start_partition(self, p: int, epoch: int, watermark: int) -> None:
        """A claimed partition: fence with its epoch, resume its consumer after the watermark."""
        self.epochs[p] = epoch
        self.progress[p] = PartitionProgress(watermark)
        await self.topology.resume_partition(self._js, p, epoch, watermark)
        consumer = PullConsumer(self._nc, self.topology.exec_stream, self.topology.partition_consumer(p, epoch),
                                max_bytes=self._fetch_max_bytes)
        await consumer.subscribe()
        self.timers.own(p)
        self._fetchers[p] = task = asyncio.create_task(
            self._fetch_loop(consumer, partial(self._take_exec_messages, p), metrics.fetch_exec_seconds, p))
        task.add_done_callback(self._fetcher_ended)
        log.info("owns partition %d (epoch %d, resuming after %d)", p, epoch, watermark,
                 extra={"partition": p, "epoch": epoch})

    def _fetcher_ended(self, task: asyncio.Task) -> None:
        """A partition's fetch loop must not die quietly while the worker keeps its lease."""
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            log.error("a partition fetch loop failed: %r; stopping the worker", task.exception(),
                      extra=logs.failure("fetch_loop", task.exception()))
            self.fatal = task.exception()
            self.stopping.set()

    def _stop_partition(self, p: int) -> None:
        self._closing.add(p)
        self._unstarted.pop(p, None)
        self.timers.disown(p)
        self.resident.drop_partition(p)

    async def _release_partition(self, p: int) -> None:
        """Above the fair share: stop fetching, let what is in flight settle, then give it back."""
        self._stop_partition(p)
        fetcher = self._fetchers.pop(p, None)
        if fetcher is not None:
            await asyncio.gather(fetcher, return_exceptions=True)
        while len(self.progress.get(p, ())) and not self.stopping.is_set():
            await asyncio.sleep(0.05)
        if self.stopping.is_set():
            return
        async with self._pool.acquire() as conn:
            await self.ownership.release(conn, p)
        self.epochs.pop(p, None)
        self.progress.pop(p, None)
        self.resident.drop_partition(p)  # what settled after it stopped
        self._closing.discard(p)
        self._releasing.discard(p)
        log.info("gave partition %d back (above its fair share)", p, extra={"partition": p})

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        await self.batcher.close()
        if self._pool is not None:
            await self._pool.close()
        if self._nc is not None and not self._nc.is_closed:
            # The pipeline drained itself already; flush the last acks and go.
            try:
                await self._nc.flush(timeout=5)
            except Exception as exc:
                log.warning("final flush to NATS failed: %s", exc, extra=logs.failure("nats_flush", exc))
            await self._nc.close()

    # -- fetch ----------------------------------------------------------------

    async def _fetch_loop(self, consumer: PullConsumer, take, fetch_seconds, name) -> None:
        batch = self.config.fetch_batch
        while True:
            stopping = self.stopping.is_set() or name in self._closing
            if consumer.outstanding == 0:
                if stopping:
                    return  # drained: no pull request left open to deliver into nowhere
                # Backpressure: a new request never takes in_flight past max_ack_pending.
                while not self._has_room(batch, new_work=name == "triggers"):
                    self._room.clear()
                    await self._room.wait()
                await self.batcher.wait_for_space()
            started = time.monotonic()
            try:
                if name == "triggers":  # used if this take opens a request
                    consumer.max_bytes = self._trigger_pull_bytes()
                deliveries = await consumer.take(batch, request_more=not stopping)
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:
                log.warning("pull from %s failed (%s); retrying", consumer.consumer, exc,
                            extra=logs.failure("nats_pull", exc))
                await asyncio.sleep(0.5)
                continue
            if not deliveries:
                if consumer.refused:
                    await asyncio.sleep(0.1)
                continue
            fetch_seconds.observe(time.monotonic() - started)
            self._in_flight += len(deliveries)
            metrics.in_flight.set(self._in_flight)
            metrics.ring_occupancy.set(len(self.ring))
            for d in deliveries:
                if d.delivered > 1:
                    metrics.redeliveries.labels(d.stream).inc()
            await take(deliveries)

    def _trigger_pull_bytes(self) -> int:
        """Bytes for the next triggers pull: about the events the window has room for.

        A pull is bounded in messages and bytes, not events; a message may be a
        batch of up to 1,000 events. Sized by the recent bytes per event, a
        pull of batches brings in about what the window has room for.
        """
        room = max(1, self.config.max_ack_pending - self._in_flight)
        return min(self._fetch_max_bytes, max(self._min_pull_bytes, int(room * self._event_bytes)))

    def _has_room(self, batch: int, *, new_work: bool = False) -> bool:
        if self._in_flight + batch > self.config.max_ack_pending:
            return False
        if not new_work:
            return True
        # In-process action calls wait for a slot while their deadlines run. While
        # any are pending, new executions (each starts at most one call) wait in
        # JetStream until what is in flight and those calls fit the backlog. The
        # executions' own messages (results above all) keep flowing.
        pending_calls = self.effects.pending
        return pending_calls == 0 or self._in_flight + pending_calls < self.effects.backlog

    def _release(self, count: int) -> None:
        self._in_flight -= count
        if self._has_room(self.config.fetch_batch):
            self._room.set()

    def _action_call_done(self) -> None:
        if self._has_room(self.config.fetch_batch, new_work=True):
            self._room.set()

    # -- enrol: triggers ------------------------------------------------------

    async def _take_triggers(self, batch: list[Delivery]) -> None:
        now, now_ms = _now(), self.clock_ms()
        decoded = []
        for delivery in batch:
            events, bad = enrolment.decode(delivery, self.config.max_message_bytes)
            for unit in bad:
                self.batcher.add(unit)
            decoded += events
            parts = len(events) + len(bad)
            metrics.triggers_received.inc(parts)
            self._event_bytes += (len(delivery.data) / parts - self._event_bytes) / 16
            # The in-flight window counts events: each part of a batch is settled (released) on its own.
            self._in_flight += parts - 1
        # Executions waiting for these events get them on their own subjects
        # before the trigger is acked (a redelivery re-routes; msg ids dedupe).
        # Only events some workflow waits for can have an execution waiting (the registry knows).
        awaited = self.registry.awaited
        events = [event for _, event in decoded if awaited(event["tenant"], event["type"])]
        routes = await self._on_pool(lambda conn: enrolment.waiting_for(conn, events), "routing") if events else ()
        if routes:
            await asyncio.gather(*(self._route(execution_id, event) for execution_id, event in routes))
        for source, event in decoded:
            self.batcher.add(enrolment.enrol(self.registry, self.topology, source, event, now, now_ms,
                                             self.config.max_context_bytes))
        metrics.advance_timings.flush()

    async def _route(self, execution_id: str, event: dict) -> None:
        body, msg_id = enrolment.event_message(execution_id, event)
        await publish_stored(self._js, self.topology.exec_subject(execution_id), body, msg_id)
        metrics.events_routed.inc()

    # -- order and dispatch: messages and timers addressed to executions -----

    async def _take_exec_messages(self, partition: int, batch: list[Delivery]) -> None:
        progress = self.progress[partition]
        for delivery in batch:
            delivery.partition = partition
            progress.fetched(delivery.stream_seq)
            try:
                doc = decode_exec(delivery.data, self.config.max_message_bytes)
            except BadMessage as exc:
                unit = Unit(delivery)
                unit.dead_letter(exc.reason, str(exc))
                self.batcher.add(unit)
                continue
            delivery.key = doc["execution_id"]
            # The ring holds the most messages fetch can bring in plus the timer share: a push cannot fail here.
            if not self.ring.push(delivery.key, (delivery, doc)):
                raise RuntimeError("ordering ring overflow: more messages fetched than the ring was sized for")
        self._ring_ready.set()

    def _owns(self, partition: int) -> bool:
        """Whether this worker owns the partition and keeps applying its messages."""
        return partition in self.ownership.owned and partition not in self._closing

    def _take_local_result(self, result: dict) -> bool:
        """Apply an in-process action's result here (True), or leave it to be published (False).

        Only while this worker owns the execution's partition and is not
        draining: otherwise the owner (or the next one) must get it, through
        the execution's subject. The ring is sized for what fetch brings in;
        a result that finds it full is published too.
        """
        if self.stopping.is_set():
            metrics.local_published_draining.inc()
            return False
        if not self._owns(partition_of(result["execution_id"], self.config.partitions)):
            metrics.local_published_not_owner.inc()
            return False
        source = LocalResult(result)
        if not self.ring.push(source.key, (source, result)):
            metrics.local_published_ring_full.inc()
            return False
        metrics.local_applied.inc()
        self._in_flight += 1  # settled like a message: memory stays bounded by the same window
        self._ring_ready.set()
        return True

    async def _timer_loop(self) -> None:
        """Load the owned partitions' near-term timers and hand due ones to the ring."""
        next_load = 0
        while not self.stopping.is_set():
            now_ms = self.clock_ms()
            if now_ms >= next_load:
                await self._on_pool(lambda conn: self.timers.load(conn, now_ms), "timers")
                next_load = now_ms + self.config.timer_load_interval_ms
                metrics.timers_pending.set(len(self.timers))
            room = self.ring.capacity - len(self.ring) - self._most_fetched
            fires = self.timers.pop_due(now_ms, max(room, 0))
            for fire in fires:
                metrics.timer_lateness.observe(max(0, now_ms - fire.fire_at_ms) / 1000.0)
                self.ring.push(fire.key, (fire, {"kind": "timer", "execution_id": fire.key,
                                                 "timer_id": fire.timer_id}))
            if fires:
                self._ring_ready.set()
            await asyncio.sleep(self.config.timer_tick_ms / 1000.0)

    async def _pump(self) -> None:
        """Dispatch every message whose execution has nothing else in flight."""
        while True:
            await self._ring_ready.wait()
            self._ring_ready.clear()
            while True:
                items = self.ring.pop_many(1024)
                if not items:
                    break
                await self._dispatch([item for _, item in items])
                if self.stopping.is_set() and not self.ring:
                    self.batcher.nudge()

    async def _dispatch(self, items: list) -> None:
        """Apply (source, decoded message) pairs, each holding its execution's ring key, on one load."""
        records = {}
        unread = []
        for key in {source.key for source, _ in items}:
            record = self.resident.take(key)
            if record is None:
                unread.append(key)
            else:
                records[key] = record
        metrics.read_resident.inc(len(records))
        if unread:
            metrics.read_ledger.inc(len(unread))
            records.update(await self._on_pool(lambda conn: executions.load(conn, unread), "load"))
        now, now_ms = _now(), self.clock_ms()
        for source, doc in items:
            unit = advance.apply(self.registry, records.get(source.key), source, doc, now, now_ms,
                                 self.config.max_context_bytes)
            if unit is None:
                metrics.exec_duplicate.inc()
                self._settle_now(source)
            else:
                self.batcher.add(unit)
        metrics.advance_timings.flush()

    # -- commit and ack -------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            units = await self.batcher.next_batch(self.stopping)
            if not units:
                if self._intake_closed and self._in_flight == 0:
                    return
                continue
            watermarks = {p: progress.watermark for p, progress in self.progress.items()}
            try:
                result = await self.batcher.commit(units, self.epochs, watermarks)
            except Fenced:
                metrics.fenced.inc()
                raise
            metrics.commit_seconds.observe(result.seconds)
            metrics.commit_rows.observe(result.rows)
            if result.attempts > 1:
                metrics.commit_retries.inc(result.attempts - 1)
            await self._settle(result)

    async def _settle(self, result) -> None:
        accepted = result.accepted
        letters = [(u.token, d) for u in result.units for d in u.dead_letters]
        letters += [(u.token, d) for u in result.units for c in u.changes
                    if c.execution_id in accepted for d in c.letters]
        if letters:
            await self._publish_dead_letters(letters)
        enrolled = deduplicated = applied = transitions = 0
        finished: dict = {}
        ended: list = []  # seconds from trigger to this commit, of each execution it ended
        now_ms = time.time() * 1000.0
        first_ack = None
        replies = []
        redo = []
        for unit in result.units:
            source = unit.token
            stale = False
            for change in unit.changes:
                if change.is_new:
                    if change.execution_id not in accepted or change.duplicate:
                        deduplicated += 1
                        continue
                    enrolled += 1
                elif change.execution_id not in accepted:
                    # The ledger moved on since this state was loaded: apply the message again.
                    stale = True
                    continue
                else:
                    applied += 1
                transitions += len(change.transitions)
                if change.finished:
                    finished[change.status] = finished.get(change.status, 0) + 1
                    if change.trigger_ts_ms is not None:
                        ended.append(max(0.0, now_ms - change.trigger_ts_ms) / 1000.0)
                if change.replaced_timer is not None:
                    self.timers.cancel(change.execution_id, change.replaced_timer)
                if change.timer is not None:
                    fire_at_ms = int(change.timer[1].timestamp() * 1000)
                    # Only what falls due before the timer loop's next loads is held from here; the
                    # loop brings the rest in from the ledger, if the row is still there by then (an
                    # action step's deadline timer usually is not: its result replaced it).
                    if fire_at_ms <= self.clock_ms() + self._timers_from_commits_ms:
                        self.timers.add(change.execution_id, change.timer[0], fire_at_ms, change.partition)
                if change.after_commit and self.effects.carry_out(change.row[1], change.execution_id,
                                                                  change.after_commit):
                    # The call runs here and its result will be applied here. (The call has not
                    # started: its task runs at the next turn of the loop, after this.)
                    self._keep_resident(change)
            kind = source.kind
            if kind == "trigger_part":  # an event of a trigger batch: the message is acked after its last
                self._release(1)
                if source.settle():
                    replies.append((source.delivery.reply, b"+ACK"))
                continue
            if kind == "timer":  # its row went with the commit
                if unit.retry_timer_after_ms:
                    self._defer_timer(source, unit.retry_timer_after_ms)
                else:
                    self.timers.done(source)
            elif stale:
                log.warning("execution %s changed in the ledger since it was loaded; message %s:%d is applied "
                            "again", source.key, source.stream, source.stream_seq,
                            extra=logs.execution(source.key, reason="stale_state"))
                redo.append(source)  # it keeps its ring key: nothing younger of the execution can overtake it
                continue
            elif kind == "local_result":  # nothing to ack: it was never in a stream
                metrics.action_apply_timings.add(time.monotonic() - source.result_at)
                self._release(1)
            else:
                if first_ack is None:
                    first_ack = time.monotonic()
                replies.append((source.reply, b"+ACK"))
            self._settled(source)
        await self.effects.publish_queued()  # before the acks: what the batch asked for is in JetStream
        await self._reply_all(replies)
        if redo:
            await self._apply_again(redo)
        if first_ack is not None and (self._ack_probe is None or self._ack_probe.done()):
            # Off the commit path, and one at a time: under load most batches go unmeasured, at no cost.
            self._ack_probe = asyncio.get_running_loop().create_task(self._time_acks(first_ack))
        metrics.in_flight.set(self._in_flight)
        metrics.enrolled.inc(enrolled)
        metrics.deduplicated.inc(deduplicated)
        metrics.exec_applied.inc(applied)
        metrics.transitions.inc(transitions)
        for status, count in finished.items():
            metrics.executions_finished.labels(status).inc(count)
        metrics.observe_all(metrics.end_to_end_seconds, ended)
        metrics.action_queued_timings.flush()
        metrics.action_call_timings.flush()
        metrics.action_apply_timings.flush()
        metrics.resident_executions.set(len(self.resident))
        metrics.actions_in_process.set(self.effects.pending)

    def _keep_resident(self, change) -> None:
        """Keep a committed execution in memory while it waits for an action that runs here."""
        record = change.record
        if record is None or record.state.waiting != WAIT_ACTION or not self._owns(change.partition):
            return
        record.committed(change)
        self.resident.keep(record)

    async def _apply_again(self, deliveries: list) -> None:
        """Dispatch messages whose units were stale once more, on the executions' committed state.

        Still in flight and holding their ring keys, they are applied before any
        younger message of their executions. (Released and NAKed instead, a
        younger one was applied first and the redelivery then dropped as a
        duplicate: a lost signal.)
        """
        metrics.stale_applied_again.inc(len(deliveries))
        # Each decoded when it came in: it decodes again.
        await self._dispatch([(d, decode_exec(d.data, self.config.max_message_bytes)) for d in deliveries])

    def _defer_timer(self, fire, after_ms: int) -> None:
        self.timers.defer(fire, self.clock_ms() + after_ms)
        metrics.timers_deferred.inc()
        log.warning("timer %s not fired: execution %s cannot be read (see its unreadable_execution dead "
                    "letters); trying again in %d s", fire.timer_id, fire.key, after_ms // 1000,
                    extra=logs.execution(fire.key, reason="unreadable_execution"))

    async def _reply_all(self, replies: list) -> None:
        """Write the acks and naks of a committed batch.

        What they settle is committed: an ack that cannot be written (NATS is
        reconnecting and its buffer is full, or the connection closed) only
        means a redelivery after AckWait, which the ledger dedupes. So a failure
        here is counted and logged, never allowed to stop the commit loop.
        """
        publish = self._nc.publish
        for index, (reply, body) in enumerate(replies):
            try:
                await publish(reply, body)
            except nats.errors.Error as exc:
                unsent = len(replies) - index
                metrics.acks_not_sent.inc(unsent)
                log.warning("%d acks not written to NATS (%s); those messages will be redelivered and deduped",
                            unsent, exc, extra=logs.failure("ack_not_sent", exc))
                return

    async def _time_acks(self, since: float) -> None:
        """ordo_nats_ack_seconds: a PING written after a batch's acks; its PONG means NATS has them all."""
        try:
            await self._nc.flush(timeout=5)
        except Exception as exc:  # a metric is not worth a crash; the acks are best effort anyway
            log.debug("ack latency not measured: %s", exc, extra=logs.failure("nats_flush", exc))
            return
        metrics.ack_seconds.observe(time.monotonic() - since)

    def _settle_now(self, source: WorkItem) -> None:
        if source.kind == "message":
            asyncio.get_running_loop().create_task(self._reply_all([(source.reply, b"+ACK")]))
        else:
            self.timers.done(source)
        self._settled(source)

    def _settled(self, source: WorkItem, done: bool = True) -> None:
        if done and source.partition >= 0:
            self.progress[source.partition].settled(source.stream_seq)
        if source.key is not None:
            self.ring.complete(source.key)
            self._ring_ready.set()
        if source.kind == "message":  # the window counts it until now (a local result: see _settle)
            self._release(1)

    async def _publish_dead_letters(self, letters) -> None:
        """Copy committed dead letters onto the DLQ stream (the ledger row is the record)."""
        for source, letter in letters:
            metrics.dead_letters.labels(letter.reason).inc()
            part = "" if letter.batch_index is None else f"[{letter.batch_index}]"  # an event of a batch
            log.warning("dead letter (%s): %s", letter.reason, letter.error, extra=logs.execution(
                letter.execution_id, letter.tenant, letter.step_id, workflow_id=letter.workflow_id,
                **logs.failure(letter.reason, letter.error)))
            headers = {
                "Nats-Msg-Id": f"{letter.stream}:{letter.stream_seq}:{letter.reason}:{letter.workflow_id or ''}"
                               f":{letter.execution_id or ''}{part}",
                "Ordo-Reason": letter.reason,
                "Ordo-Error": letter.error[:1024].replace("\r", " ").replace("\n", " "),
                "Ordo-Source": f"{letter.stream}:{letter.stream_seq}{part}",
            }
            try:
                await self._js.publish(self.topology.dlq_subject(letter.reason), letter.payload, headers=headers)
            except Exception as exc:  # the ledger row is committed; the stream copy is best effort
                log.warning("dead letter not copied to the DLQ stream: %s", exc, extra=logs.execution(
                    letter.execution_id, letter.tenant, letter.step_id, **logs.failure("dlq_copy", exc)))
