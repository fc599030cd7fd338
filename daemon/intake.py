"""What comes into a worker: fetched messages and due timers, within the in-flight window.

    triggers-l<L>-e<epoch> ──decode──> route, enrol (dispatch the first steps) ──> ledger batcher
    exec-p<N>-e<epoch> ─────decode──> ordering ring ──> daemon/dispatch.py
    due timers ──────────────────────> ordering ring

One fetch loop per consumer: one per trigger lane and one per owned partition
(both started and stopped by daemon/partitions.py with the partition that
serves them), each with at most one pull request open. The lanes' pulls open
in the fair order of daemon/lanes.py. A new execution needs no hop through JetStream:
its first steps run where its trigger is consumed, and a duplicate trigger
loses on the ledger's primary key. Messages addressed to an existing
execution pass through the ordering ring, so that at most one of an
execution's messages is between fetch and commit; so do due timers and the
results of in-process actions (daemon/local_results.py).

Memory is bounded: a fetch waits while `max_ack_pending` messages are in
flight (`Window`; each event of a trigger batch counts as one), a pull
delivers at most `fetch_max_bytes`, and the batcher stops intake while two
batches wait for Postgres.
"""

import asyncio
import logging
import time
from datetime import UTC, datetime
from functools import partial

import nats.errors

from hotpath import OrderingRing
from hotpath.envelope import BadMessage, decode_exec
from ledger.batcher import LedgerBatcher, Unit

from . import enrolment, logs, metrics
from .config import Config
from .definitions import WorkflowRegistry
from .effects import Effects, publish_stored
from .lanes import Lane, Lanes
from .progress import PartitionProgress
from .pull import Delivery, PullConsumer
from .timers import DueTimers
from .topology import Topology

log = logging.getLogger("ordo.worker")

#: Events enrolled between two turns of the event loop: a pull of thousands would hold it for a
#: hundred milliseconds and more, and a quiet lane's pull that came meanwhile would wait behind it
#: (LedgerBatcher.filling keeps the slices in one group commit).
_ENROL_SLICE = 32


class _Seen:
    """What a lane's consumer has brought and given up, as far as the window was told: room is
    reserved for what a pull may bring; what came is in flight then, what will not come is freed."""

    __slots__ = ("received", "given_up")

    def __init__(self):
        self.received = 0
        self.given_up = 0

    def settle(self, consumer: PullConsumer, window: "Window", delivered: int) -> None:
        came = consumer.received - self.received
        window.arrived(came)
        window.add(delivered - came)  # late messages of a request given up as lost: in flight, never reserved
        window.unreserve(consumer.given_up - self.given_up)
        self.received, self.given_up = consumer.received, consumer.given_up


class Window:
    """The in-flight window: what was taken in and has not settled yet (daemon/settle.py releases it).

    Stream messages count, each event of a trigger batch, and in-process
    results; due timers do not.
    """

    def __init__(self, config: Config):
        self.config = config
        self.in_flight = 0
        #: Granted to trigger lanes' open pulls and not arrived yet (daemon/lanes.py): counted for room.
        self.reserved = 0
        self._room = asyncio.Event()
        self._room.set()
        #: The in-process action calls, which share the window (set once they are made: they call back here).
        self.effects: Effects | None = None
        #: Set once every fetch loop has returned: nothing new can come in.
        self.closed = False

    def add(self, count: int) -> None:
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
        # Every waiter checks whether what it waits for fits now: a quiet lane's probe needs a
        # few slots, not a pull's worth (daemon/lanes.py).
        self._room.set()

    def reserve(self, count: int) -> None:
        """A lane's pull may bring `count` messages: room is kept for them before they arrive."""
        self.reserved += count

    def arrived(self, count: int) -> None:
        """Reserved messages came: they are in flight now."""
        self.reserved -= count
        self.in_flight += count

    def unreserve(self, count: int) -> None:
        """A lane's pull ended without bringing all it may have."""
        self.reserved -= count
        if count:
            self._room.set()

    def action_call_done(self) -> None:
        if self.has_room(self.config.fetch_batch, new_work=True):
            self._room.set()

    def has_room(self, batch: int, *, new_work: bool = False) -> bool:
        if self.in_flight + self.reserved + batch > self.config.max_ack_pending:
            return False
        if not new_work:
            return True
        # In-process action calls wait for a slot while their deadlines run. While
        # any are pending, new executions (each starts at most one call) wait in
        # JetStream until what is in flight and those calls fit the backlog. The
        # executions' own messages (results above all) keep flowing.
        pending_calls = self.effects.pending
        return pending_calls == 0 or self.in_flight + pending_calls < self.effects.backlog

    async def wait_for_room(self, batch: int, *, new_work: bool) -> None:
        while not self.has_room(batch, new_work=new_work):
            self._room.clear()
            await self._room.wait()


class Intake:
    """The fetch loops and the timer loop: messages and due timers into the batcher or the ring."""

    def __init__(
        self,
        config: Config,
        *,
        topology: Topology,
        registry: WorkflowRegistry,
        ring: OrderingRing,
        ring_ready: asyncio.Event,
        batcher: LedgerBatcher,
        window: Window,
        progress: dict[int, PartitionProgress],
        closing: set,
        timers: DueTimers,
        clock_ms,
        stopping: asyncio.Event,
        on_pool,
        nc,
        js,
        most_fetched: int,
    ):
        self.config = config
        self.topology = topology
        self.registry = registry
        self.ring = ring
        self.ring_ready = ring_ready
        self.batcher = batcher
        self.window = window
        self.progress = progress
        #: Partitions being given back or lost (daemon/partitions.py): their fetch loops finish and stop.
        self.closing = closing
        self.timers = timers
        self.clock_ms = clock_ms
        self.stopping = stopping
        self._on_pool = on_pool
        self._nc = nc
        self._js = js
        #: The most messages fetched and not yet settled (the ring is sized for them; timers get the rest).
        self._most_fetched = most_fetched
        # A message the streams accept (up to 4 x max_message_bytes) must fit one pull, or it never comes.
        self._min_pull_bytes = 4 * config.max_message_bytes + 64 * 1024
        self._fetch_max_bytes = max(config.fetch_max_bytes, self._min_pull_bytes)
        #: Bytes per trigger event lately (a moving average): sizes the triggers' pulls in events.
        self._event_bytes = 512.0
        #: The running fetch loops: one per owned partition, and ("lane", L) per trigger lane.
        self.fetchers: dict = {}
        #: The trigger lanes this worker takes, and their fair order.
        self.lanes = Lanes(config, topology=topology, window=window, stopping=stopping, js=js, fetch=self.fetch_lane)

    # -- fetch ----------------------------------------------------------------

    def consumer(self, stream: str, name: str) -> PullConsumer:
        return PullConsumer(self._nc, stream, name, max_bytes=self._fetch_max_bytes)

    async def fetch_triggers(self) -> asyncio.Task:
        """Start handing out the trigger lanes' turns; each lane's fetch loop starts with the
        partition that serves it (daemon/partitions.py)."""
        return asyncio.create_task(self.lanes.fair.run())

    async def subscribe_lane(self, lane: int, durable: str) -> PullConsumer:
        consumer = self.consumer(self.topology.trigger_stream_of(lane), durable)
        await consumer.subscribe()
        return consumer

    def fetch_lane(self, lane: Lane) -> asyncio.Task:
        """Start the fetch loop of a trigger lane (subscribed); it returns once the lane is stopping."""
        self.fetchers[("lane", lane.index)] = task = asyncio.create_task(self._lane_loop(lane))
        task.add_done_callback(lambda _: self._lane_ended(lane))
        return task

    def _lane_ended(self, lane: Lane) -> None:
        if self.fetchers.get(("lane", lane.index)) is lane.task:
            del self.fetchers[("lane", lane.index)]
        self.lanes.forget(lane)

    def fetch_partition(self, p: int, consumer: PullConsumer) -> asyncio.Task:
        """Start the fetch loop of an owned partition (subscribed); it returns once the partition is closing."""
        self.fetchers[p] = task = asyncio.create_task(
            self._fetch_loop(consumer, partial(self._take_exec_messages, p), metrics.fetch_exec_seconds, p)
        )
        return task

    async def _fetch_loop(self, consumer: PullConsumer, take, fetch_seconds, name) -> None:
        batch = self.config.fetch_batch
        while True:
            stopping = self.stopping.is_set() or name in self.closing
            if consumer.outstanding == 0:
                if stopping:
                    return  # drained: no pull request left open to deliver into nowhere
                # Backpressure: a new request never takes in_flight past max_ack_pending.
                await self.window.wait_for_room(batch, new_work=False)
                await self.batcher.wait_for_space()
            started = time.monotonic()
            try:
                deliveries = await consumer.take(batch, request_more=not stopping)
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:
                log.warning(
                    "pull from %s failed (%s); retrying", consumer.consumer, exc, extra=logs.failure("nats_pull", exc)
                )
                await asyncio.sleep(0.5)
                continue
            if not deliveries:
                if consumer.refused:
                    await asyncio.sleep(0.1)
                continue
            fetch_seconds.observe(time.monotonic() - started)
            self._count_in(deliveries)
            await take(deliveries)

    def _count_in(self, deliveries: list[Delivery]) -> None:
        self.window.add(len(deliveries))
        self._count_metrics(deliveries)

    def _count_metrics(self, deliveries: list[Delivery]) -> None:
        metrics.in_flight.set(self.window.in_flight)
        metrics.ring_occupancy.set(len(self.ring))
        for d in deliveries:
            if d.delivered > 1:
                metrics.redeliveries.labels(d.stream).inc()

    async def _lane_loop(self, lane: Lane) -> None:
        """A trigger lane's fetch loop: pulls open for what the lane was granted, reserved in the
        window (a probe while the lane is quiet, else a turn of daemon/lanes.py). A lane with a
        backlog keeps more than one pull open (Lanes.wants_pull), each its own turn; the next
        opens while what came is enrolled, and what they bring is enrolled in stream order."""
        consumer, lanes = lane.consumer, self.lanes
        opening: asyncio.Future | None = None
        seen = _Seen()

        def open_if_wanted() -> bool:
            """Open the lane's next pull if it wants one (Lanes.wants_pull); False: NATS is closed."""
            nonlocal opening
            if opening is not None and opening.done():
                try:
                    opening.result()  # a failure other than a refused request (_open_pull) ends the loop
                except nats.errors.ConnectionClosedError:
                    return False
                opening = None
            stopping = self.stopping.is_set() or lane.stopping
            if opening is None and not stopping and lanes.wants_pull(lane, consumer.outstanding):
                opening = asyncio.ensure_future(self._open_pull(lane))
            return True

        try:
            await lanes.opened.wait()
            while True:
                if not open_if_wanted():
                    return
                if consumer.outstanding == 0:
                    if opening is None:
                        return  # stopping, drained: no pull request left open to deliver into nowhere
                    await asyncio.wait([opening])
                    continue
                started = time.monotonic()
                try:
                    deliveries = await consumer.take(0, request_more=False)
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:
                    self._pull_failed(consumer, exc)
                    consumer.give_up()  # whatever was asked for is given up: its room is released
                    seen.settle(consumer, self.window, 0)
                    await asyncio.sleep(0.5)
                    continue
                seen.settle(consumer, self.window, len(deliveries))
                if not deliveries:
                    if consumer.refused:
                        await asyncio.sleep(0.1)
                    continue
                metrics.fetch_triggers_seconds.observe(time.monotonic() - started)
                published_subject = self.topology.published_subject
                for d in deliveries:
                    d.subject = published_subject(d.subject)  # as published: dead letters and retries use it
                self._count_metrics(deliveries)
                decoded, events = self._decode_triggers(deliveries)
                ahead = lane.idle  # a probe's events go into the next commit ahead of the backlog
                lanes.took(lane, len(deliveries), events, deliveries[-1].timestamp_ns, deliveries[-1].pending)
                if not open_if_wanted():  # the next pull is on its way while these are enrolled
                    return
                await self._enrol_triggers(decoded, ahead=ahead)
        finally:
            if opening is not None and not opening.done():
                opening.cancel()
                await asyncio.wait([opening])
            consumer.give_up()
            seen.settle(consumer, self.window, 0)
            await consumer.unsubscribe()

    async def _open_pull(self, lane: Lane) -> None:
        """Open the lane's next pull: a probe while the lane is quiet (it waits for room for itself
        only, and its events go into the next commit ahead of the busy lanes' backlog), else a pull
        for its turn's grant. None opens once the worker or the lane is stopping, and a request
        NATS refused to take is not retried here: the lane's loop asks again."""
        lanes = self.lanes
        lanes.pull_opens(lane)
        if lane.idle:
            grant = lanes.fair.probe
            await self.window.wait_for_room(grant, new_work=True)
            self.window.reserve(grant)
        else:
            grant = await lanes.fair.turn(lane)  # reserved in the window once granted
            if grant == 0:
                return  # stopping
        try:
            if not lane.idle:
                await self.batcher.wait_for_space()
            if self.stopping.is_set() or lane.stopping:
                self.window.unreserve(grant)
                return
            lane.granted = grant
            lane.consumer.max_bytes = self._trigger_pull_bytes(grant)
            await lane.consumer.open(grant)
        except nats.errors.ConnectionClosedError:
            self.window.unreserve(grant)
            raise
        except nats.errors.Error as exc:  # not sent: the loop asks again
            self.window.unreserve(grant)
            self._pull_failed(lane.consumer, exc)
            await asyncio.sleep(0.5)
        except BaseException:
            self.window.unreserve(grant)
            raise

    @staticmethod
    def _pull_failed(consumer: PullConsumer, exc: Exception) -> None:
        log.warning("pull from %s failed (%s); retrying", consumer.consumer, exc, extra=logs.failure("nats_pull", exc))

    def _trigger_pull_bytes(self, grant: int) -> int:
        """Bytes for the next pull of a lane: about the events it was granted.

        A pull is bounded in messages and bytes, not events; a message may be a
        batch of up to 1,000 events. Sized by the recent bytes per event, a
        pull of batches brings in about the grant (never less than one largest
        message; what it brings beyond is charged to the lane's next turns).
        """
        return min(self._fetch_max_bytes, max(self._min_pull_bytes, int(grant * self._event_bytes)))

    # -- enrol: triggers ------------------------------------------------------

    def _decode_triggers(self, batch: list[Delivery]) -> tuple[list, int]:
        """A pull's trigger messages as (source, event) pairs, and the events they held (a malformed
        one goes to the batcher as its dead letter)."""
        decoded = []
        taken = 0
        published_tenant = self.topology.published_tenant
        for delivery in batch:
            events, bad = enrolment.decode(delivery, self.config.max_message_bytes, published_tenant(delivery.subject))
            for unit in bad:
                self.batcher.add(unit)
            decoded += events
            parts = len(events) + len(bad)
            taken += parts
            metrics.triggers_received.inc(parts)
            self._event_bytes += (len(delivery.data) / parts - self._event_bytes) / 16
            # The in-flight window counts events: each part of a batch is settled (released) on its own.
            self.window.add(parts - 1)
        return decoded, taken

    async def _enrol_triggers(self, decoded: list, *, ahead: bool) -> None:
        """Route and enrol a pull's decoded trigger events. A quiet lane's (`ahead`) go into the
        batcher before the others' (LedgerBatcher.add)."""
        now, now_ms = datetime.now(UTC), self.clock_ms()
        # Executions waiting for these events get them on their own subjects
        # before the trigger is acked (a redelivery re-routes; msg ids dedupe).
        # Only events some workflow waits for can have an execution waiting (the registry knows).
        awaited = self.registry.awaited
        waited = [(source, event) for source, event in decoded if awaited(event["tenant"], event["type"])]
        events = [event for _, event in waited]
        routes = await self._on_pool(lambda conn: enrolment.waiting_for(conn, events), "routing") if events else ()
        if routes:
            # One execution's events one after the other, in stream order (a retried publish
            # must not let a younger one overtake it); different executions' at once.
            by_execution: dict[str, list[tuple]] = {}
            for execution_id, i in routes:
                by_execution.setdefault(execution_id, []).append(waited[i])
            await asyncio.gather(*(self._route(execution_id, evs) for execution_id, evs in by_execution.items()))
        most_context = self.config.max_context_bytes
        with self.batcher.filling():
            for n, (source, event) in enumerate(decoded, 1):
                unit = enrolment.enrol(self.registry, self.topology, source, event, now, now_ms, most_context)
                self.batcher.add(unit, ahead=ahead)
                if n % _ENROL_SLICE == 0:
                    await asyncio.sleep(0)  # a busy lane's pull does not hold up a quiet lane's events
        metrics.advance_timings.flush()

    async def _route(self, execution_id: str, events: list[tuple]) -> None:
        """Each (source, event) onto the execution's subject, with where its trigger was stored."""
        topology = self.topology
        subject = topology.exec_subject(execution_id)
        for source, event in events:
            body, msg_id = enrolment.event_message(execution_id, event, enrolment.stored_position(source, topology))
            await publish_stored(self._js, subject, body, msg_id)
            metrics.events_routed.inc()

    # -- order: messages and timers addressed to executions ------------------

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
        self.ring_ready.set()

    async def timer_loop(self) -> None:
        """Load the owned partitions' near-term timers and hand due ones to the ring."""
        next_load = 0
        while not self.stopping.is_set():
            now_ms = self.clock_ms()
            if now_ms >= next_load:
                await self._on_pool(lambda conn, now_ms=now_ms: self.timers.load(conn, now_ms), "timers")
                next_load = now_ms + self.config.timer_load_interval_ms
                metrics.timers_pending.set(len(self.timers))
            room = self.ring.capacity - len(self.ring) - self._most_fetched
            fires = self.timers.pop_due(now_ms, max(room, 0))
            for fire in fires:
                metrics.timer_lateness.observe(max(0, now_ms - fire.fire_at_ms) / 1000.0)
                self.ring.push(fire.key, (fire, {"kind": "timer", "execution_id": fire.key, "timer_id": fire.timer_id}))
            if fires:
                self.ring_ready.set()
            await asyncio.sleep(self.config.timer_tick_ms / 1000.0)
