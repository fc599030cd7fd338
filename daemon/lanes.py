"""Trigger lanes: every tenant's triggers in one lane, and the lanes taken in a fair order.

Each event is filed under a lane, by NATS's own partition() of the subject's
tenant token (daemon/topology.py `trigger_lane_mapping`): publishers keep
their subjects. The lanes share one triggers stream, or are spread over
`trigger_streams` of them. Lane i is consumed only by the owner of
partition i % partitions, through a durable consumer of its own per ownership
epoch (`triggers-l<i>-e<epoch>`), so one tenant's events pass through one
worker at a time, in stream order: the events it routes to a waiting
execution reach the execution's subject in that order.

Within a worker the lanes share the in-flight window by deficit round-robin
(`FairShare`): a busy lane, in its turn, may open a pull for its deficit
(`trigger_quantum` x its weight, less what its last pulls brought beyond their
grant), never for the whole window. When the heaviest busy lane's share would
be more than one pull (`fetch_batch`), every lane's quantum is scaled down so
that it fits: the lanes' shares keep the ratio of their weights. A lane whose
pull comes back sooner (a lighter share) may not take more than TURNS_AHEAD
turns beyond another busy lane's, whose pull is still open.

The one busy lane keeps PULLS_AHEAD of its grants asked for (each pull its own
turn): the next opens while what came is being enrolled, and JetStream, which
serves a consumer's open pulls in turns and in stream order, has one to serve
meanwhile. Beside other busy lanes a lane has one pull open at a time.

A lane is busy while its consumer holds a backlog: each delivery says how many
messages its consumer still had (`pending`). A lane whose delivery says none is
quiet at once, though its pull stays open for what is published next: no lane
waits in the turns for a pull that is only waiting for new events (the turns
are work-conserving), and a quiet lane's probe that fills up as its events
trickle in does not make it busy. A quiet lane keeps a small pull open
(`probe`) that bypasses the turns, so its next event is taken at once instead
of after another lane's backlog. What a lane has not been granted
waits in JetStream; what it was granted is reserved in the window before it
arrives, so the window stays bounded as before.

A probe waits for room for itself only, not for a busy lane's pull's worth
(`Window.release` wakes every waiter), and what it brings goes into the next
commit ahead of the busy lanes' backlog (daemon/intake.py,
`LedgerBatcher.add(ahead=True)`).
"""

import asyncio
import logging
import time
from collections import deque

from nats.js.errors import NotFoundError

from . import logs, metrics
from .config import Config
from .topology import settled_by

log = logging.getLogger("ordo.lanes")

#: How many turns a busy lane may take beyond another busy lane's while that one's pull is out.
#: In w7-noisy, 1 (strict rounds) was worse than 2 on both counts: A drained no faster and the
#: quiet tenants' p99 was higher (docs/fairness.md, "Weights that hold").
TURNS_AHEAD = 2

#: A lane that took events this recently is active: a busy lane beside it takes quanta, not whole
#: pulls, even when it is the only busy one, so that pulls of thousands do not hold up the active
#: lane's few events in the worker.
ACTIVE_S = 1.0

#: The one lane with a backlog keeps this many of its grants asked for, in pulls open at once.
#: JetStream serves a consumer's pull after a delay while the stream is being written to (a burst
#: still being published): one pull of 256 at a time, a lane was taken at 60% of the rate of two
#: (`python -m bench.pull_depth`).
PULLS_AHEAD = 2


def lane_of(tenant: str, lanes: int) -> int:
    """The lane of a tenant's triggers: nats-server's partition(lanes, tenant token), FNV-1a 32 mod lanes."""
    h = 0x811C9DC5
    for byte in tenant.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % lanes


def parse_weights(text: str) -> dict[str, int]:
    """`tenant_weights` ("acme=4,bigco=2") as {tenant: weight}; a malformed entry is an error naming it."""
    weights: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, raw = item.partition("=")
        tenant = tenant.strip()
        try:
            weight = int(raw.strip()) if sep else 0
        except ValueError:
            weight = 0
        if not tenant or weight < 1:
            raise ValueError(f"tenant_weights: {item!r} is not TENANT=WEIGHT with an integer weight >= 1")
        weights[tenant] = weight
    return weights


def lane_weights(weights: dict[str, int], lanes: int) -> dict[int, int]:
    """Each lane's weight: its heaviest configured tenant's (lanes without one weigh 1)."""
    out: dict[int, int] = {}
    for tenant, weight in weights.items():
        lane = lane_of(tenant, lanes)
        out[lane] = max(out.get(lane, 1), weight)
    return out


class Lane:
    """One lane this worker consumes under one epoch: its pull's grant and its standing in the turns."""

    __slots__ = (
        "index",
        "partition",
        "epoch",
        "weight",
        "deficit",
        "idle",
        "granted",
        "taken",
        "stopping",
        "waiter",
        "task",
        "consumer",
        "pending",
        "last_stored_ns",
        "taken_total",
        "settled",
    )

    def __init__(self, index: int, partition: int, epoch: int, weight: int):
        self.index = index
        self.partition = partition
        self.epoch = epoch
        self.weight = weight
        #: Events the lane may still take in this turn (negative: taken beyond its grants, paid back in turns).
        self.deficit = 0
        #: Its consumer held nothing more when its last pull opened: no backlog, it keeps a probe open
        #: (what the probe brings goes into the next commit ahead of the backlog), takes no turns.
        self.idle = True
        #: The grant of the lane's last pull, and the messages taken since that pull opened.
        self.granted = 0
        self.taken = 0
        #: What the lane's consumer still held after the last message taken (its backlog).
        self.pending = 0
        self.stopping = False
        self.waiter: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.consumer = None
        #: When the stream stored the newest trigger taken from the lane (how far behind the lane is).
        self.last_stored_ns = 0
        self.taken_total = metrics.lane_taken.labels(str(index))
        #: The stream sequence at or below which its consumer had settled everything, when last
        #: asked (`Lanes.measure`): where its consumer resumes if JetStream loses it.
        self.settled = 0


class FairShare:
    """Deficit round-robin over this worker's busy lanes: whose pull opens next, and for how many messages."""

    def __init__(self, config: Config, window, stopping: asyncio.Event):
        self.window = window
        self.stopping = stopping
        self.quantum = max(1, config.trigger_quantum)
        #: No grant is above this: a pull of a whole window would shut the other lanes out.
        self.most = max(1, min(config.fetch_batch, config.max_ack_pending // 2))
        #: A quiet lane's standing pull: small, so that every lane can keep one open.
        self.probe = max(1, min(16, config.max_ack_pending // (4 * max(1, config.trigger_lanes))))
        self._turns: deque[Lane] = deque()
        self._queued = asyncio.Event()
        #: Lanes with a backlog (their consumer held more after their last delivery): while there is
        #: one alone, it may take a whole pull per turn, as the one consumer of before did, instead
        #: of a quantum.
        self.busy: set[int] = set()
        #: The weight of each lane that has taken turns (lane index -> weight).
        self._weights: dict[int, int] = {}
        #: Turns each busy lane has had (lane index -> turns). A lane that comes back for a turn
        #: TURNS_AHEAD turns ahead of another busy lane waits in `_held` until that one has had
        #: its next: else a lane whose pulls come back sooner (smaller ones: a lighter weight)
        #: would take more turns. A lane that turns busy starts level with the busy lanes.
        self._taken: dict[int, int] = {}
        self._held: list[Lane] = []
        #: When each lane last took events (lane index -> time.monotonic()).
        self._took_at: dict[int, float] = {}

    async def turn(self, lane: Lane) -> int:
        """Wait for the lane's turn; the messages its next pull may ask for (0: the lane is stopping)."""
        lane.waiter = waiter = asyncio.get_running_loop().create_future()
        self._weights[lane.index] = lane.weight
        self._turns.append(lane)
        self._queued.set()
        try:
            return await waiter
        finally:
            lane.waiter = None

    def leave(self, lane: Lane) -> None:
        """A stopping lane gives up its place in the turns."""
        if lane.waiter is not None and not lane.waiter.done():
            lane.waiter.set_result(0)

    def quiet(self, index: int) -> None:
        """The lane has no backlog any more (or stops): it takes no more turns, and no busy lane
        is held behind it."""
        self.busy.discard(index)
        self._queued.set()

    def _quantum(self) -> int:
        """The quantum of this turn: `trigger_quantum`, or less if the heaviest busy lane's share
        would be more than one pull. A lane opens one pull per turn, so a bigger share would be
        cut to a pull and the weights above it would all count the same."""
        heaviest = max((self._weights.get(index, 1) for index in self.busy), default=1)
        return max(1, min(self.quantum, self.most // heaviest))

    def took(self, index: int) -> None:
        """The lane took events: it is active for ACTIVE_S."""
        self._took_at[index] = time.monotonic()

    def others_busy(self, index: int) -> bool:
        """Another lane than this one has a backlog."""
        return bool(self.busy - {index})

    def _alone(self, index: int) -> bool:
        """No other lane is busy or took events within ACTIVE_S: no one to be fair to."""
        if self.others_busy(index):
            return False
        recently = time.monotonic() - ACTIVE_S
        return not any(at > recently for other, at in self._took_at.items() if other != index)

    def backlogged(self, index: int) -> None:
        """The lane has a backlog: it takes turns, level with the busy lanes if it was not one."""
        if index not in self.busy:
            fewest = min((self._taken.get(other, 0) for other in self.busy), default=0)
            self._taken[index] = max(self._taken.get(index, 0), fewest)
            self.busy.add(index)

    def _ahead(self, lane: Lane) -> bool:
        """The lane has had TURNS_AHEAD turns more than another busy lane (whose pull is out)."""
        if lane.index not in self.busy or len(self.busy) < 2:
            return False
        fewest = min(self._taken.get(index, 0) for index in self.busy if index != lane.index)
        return self._taken.get(lane.index, 0) - fewest >= TURNS_AHEAD

    def _release_held(self) -> None:
        """The held lanes no longer ahead go first, in their order."""
        if self._held:
            released = [lane for lane in self._held if not self._ahead(lane)]
            if released:
                self._held = [lane for lane in self._held if lane not in released]
                self._turns.extendleft(reversed(released))

    async def run(self) -> None:
        """Hand out turns until the worker stops: each busy lane in order, for its deficit, as the window has room."""
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                self._release_held()
                if not self._turns:
                    self._queued.clear()
                    queued = asyncio.ensure_future(self._queued.wait())
                    await asyncio.wait([queued, stopped], return_when=asyncio.FIRST_COMPLETED)
                    queued.cancel()
                    continue
                lane = self._turns.popleft()
                if lane.waiter is None or lane.waiter.done():
                    continue  # it left while waiting
                if self._ahead(lane):
                    self._held.append(lane)
                    continue
                self._taken[lane.index] = self._taken.get(lane.index, 0) + 1
                # Each turn adds a quantum by weight; a lane whose batches brought more events
                # than granted skips turns until it has paid that back. No lane banks more than
                # a couple of turns: credit is for a backlog being taken, not for idle time.
                share = self._quantum() * lane.weight
                if self._alone(lane.index):
                    share = max(share, self.most)  # no one else to be fair to: small pulls only cost round trips
                lane.deficit = min(lane.deficit + share, 2 * share)
                if lane.deficit <= 0:
                    self._turns.append(lane)
                    continue
                grant = min(lane.deficit, self.most)
                while not self.window.has_room(grant, new_work=True):
                    room = asyncio.ensure_future(self.window.wait_for_room(grant, new_work=True))
                    await asyncio.wait([room, stopped], return_when=asyncio.FIRST_COMPLETED)
                    if not room.done():
                        room.cancel()
                        self.leave(lane)
                        return
                if lane.waiter is None or lane.waiter.done():
                    continue  # it left while the window filled up
                # Charged by what the pull brings (Lanes.took), in events, not by the grant.
                self.window.reserve(grant)
                lane.waiter.set_result(grant)
        finally:
            stopped.cancel()
            for lane in (*self._turns, *self._held):
                self.leave(lane)
            self._turns.clear()
            self._held.clear()


class Lanes:
    """The lanes this worker consumes: started and stopped with the partitions that serve them."""

    def __init__(self, config: Config, *, topology, window, stopping: asyncio.Event, js, fetch):
        self.config = config
        self.topology = topology
        self.window = window
        self.fair = FairShare(config, window, stopping)
        self._js = js
        #: fetch(lane, consumer) -> the lane's fetch-loop task (daemon/intake.py).
        self._fetch = fetch
        self._weights = lane_weights(parse_weights(config.tenant_weights), topology.lanes)
        #: lane index -> the Lane being consumed.
        self.running: dict[int, Lane] = {}
        #: Set once the worker's first claims have all started: until then no lane pulls, so
        #: that the lanes started first do not take a head start over the others.
        self.opened = asyncio.Event()

    async def start(
        self, partition: int, epoch: int, subscribe, floors: dict[int, int] | None = None
    ) -> list[asyncio.Task]:
        """Consume the partition's lanes under its epoch (after earlier owners' consumers settled, or
        after a lane's floor in the ledger, `floors`, if that is later); returns the fetch loops started
        (an earlier, failed attempt may have started some)."""
        started = []
        for index in self.topology.lanes_of(partition):
            current = self.running.get(index)
            if current is not None and current.epoch == epoch and not current.stopping:
                continue  # started by an earlier attempt
            after = (floors or {}).get(index, 0)
            durable, settled = await self.topology.resume_lane(self._js, index, epoch, after_seq=after)
            lane = Lane(index, partition, epoch, self._weights.get(index, 1))
            lane.settled = settled
            lane.consumer = await subscribe(index, durable)
            self.running[index] = lane
            lane.task = self._fetch(lane)
            started.append(lane.task)
            log.info("takes trigger lane %d (epoch %d)", index, epoch, extra={"lane": index, "epoch": epoch})
        return started

    def stop(self, partition: int) -> None:
        """The partition is being given back or was lost: its lanes' fetch loops finish and stop."""
        for index in self.topology.lanes_of(partition):
            lane = self.running.get(index)
            if lane is not None:
                lane.stopping = True
                self.fair.quiet(index)
                self.fair.leave(lane)

    async def drain(self, partition: int, timeout: float) -> None:
        """Until the partition's lanes have stopped fetching and what they took has settled (acked),
        so that the next owner resumes after it rather than taking it again."""
        lanes = [lane for lane in self.running.values() if lane.partition == partition]
        for lane in lanes:
            if lane.task is not None:
                await asyncio.gather(lane.task, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + timeout
        for lane in lanes:
            while asyncio.get_running_loop().time() < deadline:
                try:
                    info = await self._js.consumer_info(lane.consumer.stream, lane.consumer.consumer)
                except Exception:  # gone or unreachable: the next owner resumes from its ack floor anyway
                    break
                if info.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.05)
        for lane in lanes:
            if self.running.get(lane.index) is lane:
                del self.running[lane.index]
                for gauge in (metrics.lane_backlog, metrics.lane_behind):
                    try:  # not measured yet: prometheus-client < 0.22 raises (this drain ending a give-back)
                        gauge.remove(str(lane.index))
                    except KeyError:
                        pass

    def forget(self, lane: Lane) -> None:
        """A lane's fetch loop ended (stopping): it is no longer this worker's."""
        current = self.running.get(lane.index)
        if current is None or current is lane:
            self.fair.quiet(lane.index)  # no busy lane is held behind it
        if current is lane and lane.stopping:
            del self.running[lane.index]
            for gauge in (metrics.lane_backlog, metrics.lane_behind):
                try:
                    gauge.remove(str(lane.index))
                except KeyError:
                    pass

    def reweigh(self, tenant_weights: str) -> None:
        """New `tenant_weights` (SIGHUP): from the next turn on. A malformed setting raises and changes nothing."""
        self._weights = lane_weights(parse_weights(tenant_weights), self.topology.lanes)
        for lane in self.running.values():
            lane.weight = self._weights.get(lane.index, 1)

    def took(self, lane: Lane, messages: int, events: int, stored_ns: int, pending: int) -> None:
        """A pull brought `messages` of its grant, holding `events` trigger events, and left `pending`
        messages in the lane's consumer: charge the lane."""
        lane.taken += messages
        lane.deficit -= events
        lane.pending = pending
        if events:
            self.fair.took(lane.index)
        if pending == 0 and lane.index in self.fair.busy:
            # Its backlog is taken; what its pull may still bring comes as it is published. No busy
            # lane waits in the turns for that pull to fill up or expire.
            self.fair.quiet(lane.index)
        lane.last_stored_ns = max(lane.last_stored_ns, stored_ns)
        lane.taken_total.inc(events)

    def wants_pull(self, lane: Lane, outstanding: int) -> bool:
        """Whether the lane opens another pull now: when none is open and, while it is the one lane
        with a backlog, until PULLS_AHEAD grants' worth are asked for (each pull its own turn).

        Beside other busy lanes, JetStream has their pulls to serve meanwhile, and one pull at a
        time keeps the turns' shares to their weights (with two open, a weight-3 lane's share
        against a weight-1 lane's spread from 2.5-2.9 to 2.4-3.8 in tests/test_fairness.py)."""
        if outstanding == 0:
            return True
        if lane.idle or lane.pending == 0 or self.fair.others_busy(lane.index):
            return False
        return outstanding < PULLS_AHEAD * lane.granted

    def pull_opens(self, lane: Lane) -> None:
        """The lane opens another pull: a turn while it has a backlog, else a probe.

        A backlog is what the consumer still held after the last message taken, not a pull
        that came back full: a quiet lane's probe fills up as its events trickle in, and turns
        for it would hold the busy lanes behind a pull that lingers until it expires."""
        lane.idle = lane.taken == 0 or lane.pending == 0
        if lane.idle:
            lane.deficit = min(lane.deficit, 0)  # an emptied lane keeps its debt, not its credit
            self.fair.quiet(lane.index)
        else:
            self.fair.backlogged(lane.index)
        lane.taken = 0

    async def measure(self, now_ns: int) -> tuple[dict[str, int], list[Lane]]:
        """Each running lane's backlog and how far behind it is (metrics), and where its consumer
        has settled; returns the backlog of this worker's lanes in each triggers stream (stream ->
        messages), and the lanes whose consumer JetStream no longer has (`create_again`)."""
        totals: dict[str, int] = {}
        gone: list[Lane] = []
        for lane in list(self.running.values()):
            try:
                info = await self._js.consumer_info(lane.consumer.stream, lane.consumer.consumer)
            except NotFoundError:
                if not lane.stopping:
                    gone.append(lane)
                continue
            except Exception as exc:  # a metric is not worth a crash
                log.debug("lane %d not measured: %s", lane.index, exc, extra=logs.failure("consumer_info", exc))
                continue
            lane.settled = max(lane.settled, settled_by(info))
            totals[lane.consumer.stream] = totals.get(lane.consumer.stream, 0) + info.num_pending
            label = str(lane.index)
            metrics.lane_backlog.labels(label).set(info.num_pending)
            behind = (now_ns - lane.last_stored_ns) / 1e9 if info.num_pending and lane.last_stored_ns else 0.0
            metrics.lane_behind.labels(label).set(max(0.0, behind))
        return totals, gone

    async def create_again(self, lane: Lane) -> int:
        """The lane's consumer, which JetStream lost, created again under the same name, to resume
        after where it had settled when last asked; returns that sequence. The lane's pulls, which
        the lost consumer will never answer, expire and are asked for again (daemon/pull.py)."""
        _, settled = await self.topology.resume_lane(self._js, lane.index, lane.epoch, after_seq=lane.settled)
        return settled
