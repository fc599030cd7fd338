"""Committing and settling: the ledger batcher's commits, and what follows each one.

Only after COMMIT returns: the committed dead letters are copied onto the DLQ
stream, the committed effects start (daemon/effects.py: action calls, emitted
events), the timers the changes set or dropped are held or forgotten, and each
item settles by its kind (daemon/work_items.py): a message is acked (a trigger
batch after its last event), a timer fire is done, and every item releases its
ring key and its room in the in-flight window and lets its partition's
watermark advance (daemon/progress.py). A change refused as stale is applied
again, still holding its ring key.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats.errors

from hotpath import OrderingRing
from hotpath.vocabulary import WAIT_ACTION
from ledger.batcher import CommitResult, Fenced, LedgerBatcher, Unit

from . import background, logs, metrics
from .config import Config
from .effects import Effects
from .intake import Window
from .progress import PartitionProgress
from .resident import ResidentExecutions
from .timers import DueTimers, TimerFire
from .topology import Topology
from .work_items import WorkItem

log = logging.getLogger("ordo.worker")

_ACK = b"+ACK"
#: The kinds of item that hold room in the in-flight window until they settle.
_IN_WINDOW = frozenset(("message", "local_result"))


@dataclass(slots=True)
class _Tally:
    """What a committed batch did, for the metrics."""

    now_ms: float
    enrolled: int = 0
    deduplicated: int = 0
    applied: int = 0
    transitions: int = 0
    finished: dict = field(default_factory=dict)
    ended: list = field(default_factory=list)  # seconds from trigger to this commit, of each execution it ended


@dataclass(slots=True)
class _Acks:
    """What a committed batch settles after its effects are out: acks, and the stale items to apply again."""

    replies: list = field(default_factory=list)
    first_at: float | None = None  # time.monotonic() of the batch's first message ack
    redo: list = field(default_factory=list)


class Settlement:
    """The commit loop: each batch committed, then settled."""

    def __init__(
        self,
        config: Config,
        *,
        batcher: LedgerBatcher,
        epochs: dict[int, int],
        progress: dict[int, PartitionProgress],
        window: Window,
        ring: OrderingRing,
        ring_ready: asyncio.Event,
        timers: DueTimers,
        resident: ResidentExecutions,
        effects: Effects,
        owns,
        watermarks,
        stopping: asyncio.Event,
        clock_ms,
        nc,
        js,
        topology: Topology,
    ):
        self.config = config
        self.batcher = batcher
        #: partition -> the epoch it was claimed under (daemon/partitions.py keeps it): every commit checks it.
        self.epochs = epochs
        self.progress = progress
        self.window = window
        self.ring = ring
        self.ring_ready = ring_ready
        self.timers = timers
        self.resident = resident
        self.effects = effects
        #: Counts the stages' executions of workflows under rollout (daemon/rollout_tally.py); set by the worker.
        self.rollout_tally = None
        #: Whether this worker owns a partition and keeps applying its messages (daemon/partitions.py).
        self.owns = owns
        #: The watermarks each commit writes (daemon/partitions.py `Partitions.watermarks`).
        self.watermarks = watermarks
        self.stopping = stopping
        self.clock_ms = clock_ms
        self._nc = nc
        self._js = js
        self.topology = topology
        #: Applies stale items again (daemon/dispatch.py `Dispatch.apply_again`); set once that is made.
        self.apply_again = None
        #: Builds and exports the spans of sampled executions (daemon/tracing.py); None: tracing is off.
        self.tracing = None
        #: The one ack-latency measurement in flight (see _time_acks).
        self._ack_probe: asyncio.Task | None = None

    # -- commit ---------------------------------------------------------------

    async def commit_loop(self) -> None:
        while True:
            units = await self.batcher.next_batch(self.stopping)
            if not units:
                if self.window.closed and self.window.in_flight == 0:
                    return
                continue
            watermarks = self.watermarks()
            try:
                result = await self.batcher.commit(units, self.epochs, watermarks)
            except Fenced:
                metrics.fenced.inc()
                raise
            metrics.commit_seconds.observe(result.seconds)
            metrics.commit_rows.observe(result.rows)
            if result.attempts > 1:
                metrics.commit_retries.inc(result.attempts - 1)
            await self.settle(result)

    # -- settle a committed batch ---------------------------------------------

    async def settle(self, result: CommitResult) -> None:
        """Everything that follows a commit, in this order: dead-letter copies, what the changes set in
        motion, each item settled, the effects published, then the acks."""
        await self._copy_dead_letters(result)
        tally = _Tally(now_ms=time.time() * 1000.0)
        acks = _Acks()
        for unit in result.units:
            stale = self._committed_changes(unit, result.accepted, tally)
            self._settle_item(unit, stale, acks)
        await self.effects.publish_queued()  # before the acks: what the batch asked for is in JetStream
        await self._reply_all(acks.replies)
        if acks.redo:
            await self.apply_again(acks.redo)
        if acks.first_at is not None and (self._ack_probe is None or self._ack_probe.done()):
            # Off the commit path, and one at a time: under load most batches go unmeasured, at no cost.
            self._ack_probe = asyncio.get_running_loop().create_task(self._time_acks(acks.first_at))
        self._count(tally)

    def _committed_changes(self, unit: Unit, accepted: set, tally: _Tally) -> bool:
        """Count the unit's changes and carry out what the accepted ones ask; True if one was stale.

        Its dispatch failures are counted too: under a rollout they are failures of their version.
        """
        if self.rollout_tally is not None:
            for failure in unit.dispatch_failures:
                self.rollout_tally.dispatch_failed(failure)
        stale = False
        for change in unit.changes:
            if change.is_new:
                if change.execution_id not in accepted or change.duplicate:
                    tally.deduplicated += 1
                    continue
                tally.enrolled += 1
            elif change.execution_id not in accepted:
                # The ledger moved on since this state was loaded: apply the message again.
                stale = True
                continue
            else:
                tally.applied += 1
            if self.rollout_tally is not None and (change.is_new or change.finished):
                self.rollout_tally.observe(change)
            tally.transitions += change.transitions
            if change.finished:
                tally.finished[change.status] = tally.finished.get(change.status, 0) + 1
                if change.trigger_ts_ms is not None:
                    tally.ended.append(max(0.0, tally.now_ms - change.trigger_ts_ms) / 1000.0)
            if self.tracing is not None:  # before the effects: it gives their requests a traceparent
                self.tracing.committed(change)
            self._carry_out(change)
        return stale

    def _carry_out(self, change) -> None:
        """The timer a committed change set or dropped, and its effects."""
        if change.replaced_timer is not None:
            self.timers.cancel(change.execution_id, change.replaced_timer)
        if change.timer is not None:
            # Held from here if the timer loop's walk has passed its time; else the walk brings it
            # in from the ledger, if the row is still there by then (an action step's deadline
            # timer usually is not: its result replaced it).
            fire_at_ms = int(change.timer[1].timestamp() * 1000)
            self.timers.committed(change.execution_id, change.timer[0], fire_at_ms, change.partition)
        if change.after_commit and self.effects.carry_out(change.row[1], change.execution_id, change.after_commit):
            # The call runs here and its result will be applied here. (The call has not
            # started: its task runs at the next turn of the loop, after this.)
            self._keep_resident(change)

    def _settle_item(self, unit: Unit, stale: bool, acks: _Acks) -> None:
        """Settle what the unit stood for, by its kind."""
        source = unit.token
        kind = source.kind
        if kind == "trigger_part":  # an event of a trigger batch: the message is acked after its last
            self.window.release(1)
            if source.settle():
                acks.replies.append((source.delivery.reply, _ACK))
            return
        if kind == "timer":  # its row went with the commit
            if unit.retry_timer_after_ms:
                self._defer_timer(source, unit.retry_timer_after_ms)
            elif stale:  # its change was refused and its row stays: fire it again, on a fresh read
                self.timers.defer(source, self.clock_ms())
            else:
                self.timers.done(source)
        elif stale:
            log.warning(
                "execution %s changed in the ledger since it was loaded; message %s:%d is applied again",
                source.key,
                source.stream,
                source.stream_seq,
                extra=logs.execution(source.key, reason="stale_state"),
            )
            acks.redo.append(source)  # it keeps its ring key: nothing younger of the execution can overtake it
            return
        elif kind == "local_result":  # nothing to ack: it was never in a stream
            metrics.action_apply_timings.add(time.monotonic() - source.result_at)
        else:
            if acks.first_at is None:
                acks.first_at = time.monotonic()
            acks.replies.append((source.reply, _ACK))
        self.settled(source)

    def _keep_resident(self, change) -> None:
        """Keep a committed execution in memory while it waits for an action that runs here."""
        record = change.record
        if record is None or record.state.waiting != WAIT_ACTION or not self.owns(change.partition):
            return
        record.committed(change)
        self.resident.keep(record)

    def _defer_timer(self, fire: TimerFire, after_ms: int) -> None:
        self.timers.defer(fire, self.clock_ms() + after_ms)
        metrics.timers_deferred.inc()
        log.warning(
            "timer %s not fired: execution %s cannot be read (see its unreadable_execution dead "
            "letters); trying again in %d s",
            fire.timer_id,
            fire.key,
            after_ms // 1000,
            extra=logs.execution(fire.key, reason="unreadable_execution"),
        )

    def _count(self, tally: _Tally) -> None:
        metrics.in_flight.set(self.window.in_flight)
        metrics.enrolled.inc(tally.enrolled)
        metrics.deduplicated.inc(tally.deduplicated)
        metrics.exec_applied.inc(tally.applied)
        metrics.transitions.inc(tally.transitions)
        for status, count in tally.finished.items():
            metrics.executions_finished.labels(status).inc(count)
        metrics.observe_all(metrics.end_to_end_seconds, tally.ended)
        metrics.action_queued_timings.flush()
        metrics.action_call_timings.flush()
        metrics.action_apply_timings.flush()
        metrics.resident_executions.set(len(self.resident))
        metrics.actions_in_process.set(self.effects.pending)

    # -- settle one item ------------------------------------------------------

    def settle_now(self, source: WorkItem) -> None:
        """Settle an item that commits nothing (a redelivery of what has committed) at once."""
        if source.kind == "message":
            background.start(self._reply_all([(source.reply, _ACK)]), "acking a redelivery of what has committed")
        else:
            self.timers.done(source)
        self.settled(source)

    def settled(self, source: WorkItem) -> None:
        """Its partition's watermark may pass it, its ring key goes to its execution's next item,
        and a message or a local result gives its room in the window back (a trigger part gives
        its own in _settle_item; a timer fire never took any)."""
        if source.partition >= 0:
            self.progress[source.partition].settled(source.stream_seq)
        if source.key is not None:
            self.ring.complete(source.key)
            self.ring_ready.set()
        if source.kind in _IN_WINDOW:
            self.window.release(1)

    # -- acks and dead-letter copies ------------------------------------------

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
                log.warning(
                    "%d acks not written to NATS (%s); those messages will be redelivered and deduped",
                    unsent,
                    exc,
                    extra=logs.failure("ack_not_sent", exc),
                )
                return

    async def _time_acks(self, since: float) -> None:
        """ordo_nats_ack_seconds: a PING written after a batch's acks; its PONG means NATS has them all."""
        try:
            await self._nc.flush(timeout=5)
        except Exception as exc:  # a metric is not worth a crash; the acks are best effort anyway
            log.debug("ack latency not measured: %s", exc, extra=logs.failure("nats_flush", exc))
            return
        metrics.ack_seconds.observe(time.monotonic() - since)

    async def _copy_dead_letters(self, result: CommitResult) -> None:
        """The batch's committed dead letters: its units' own, and the accepted changes' (failed steps)."""
        accepted = result.accepted
        letters = [(u.token, d) for u in result.units for d in u.dead_letters]
        letters += [
            (u.token, d)
            for u in result.units
            for c in u.changes
            if c.execution_id in accepted and not c.duplicate
            for d in c.letters
        ]
        if letters:
            await self._publish_dead_letters(letters)

    async def _publish_dead_letters(self, letters) -> None:
        """Copy committed dead letters onto the DLQ stream (the ledger row is the record)."""
        for _source, letter in letters:
            metrics.dead_letters.labels(letter.reason).inc()
            part = "" if letter.batch_index is None else f"[{letter.batch_index}]"  # an event of a batch
            log.warning(
                "dead letter (%s): %s",
                letter.reason,
                letter.error,
                extra=logs.execution(
                    letter.execution_id,
                    letter.tenant,
                    letter.step_id,
                    workflow_id=letter.workflow_id,
                    **logs.failure(letter.reason, letter.error),
                ),
            )
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
                log.warning(
                    "dead letter not copied to the DLQ stream: %s",
                    exc,
                    extra=logs.execution(
                        letter.execution_id, letter.tenant, letter.step_id, **logs.failure("dlq_copy", exc)
                    ),
                )
