"""One worker process: fetch -> order -> dispatch -> commit -> ack.

    triggers consumer ──decode──> enrol (dispatch the first steps) ─────────┐
    exec-p<N> consumers ─decode──> ordering ring ──> load, dispatch ────────┤
                                                                           v
                                       ledger batcher (one transaction per batch)
                                                                           │
                                 ack / nak, release the ring key  <────────┘

A new execution needs no hop through JetStream: its first steps run where its
trigger is consumed, and a duplicate trigger loses on the ledger's primary key.
Messages addressed to an existing execution pass through the ordering ring, so
that at most one of an execution's messages is between fetch and commit.

Memory is bounded: a fetch waits while `max_ack_pending` messages are in
flight, and the batcher stops intake while two batches wait for Postgres.
"""

import asyncio
import logging
import os
import socket
import time
from datetime import datetime, timezone

import asyncpg
import nats
import nats.errors

from hotpath import ExecutionState, OrderingRing, advance
from hotpath.envelope import BadMessage, decode_exec, decode_trigger
from ledger import executions, workflows
from ledger.batcher import DeadLetter, Fenced, LedgerBatcher, Unit, claim_partitions
from ledger.schema import require_current

from . import metrics
from .config import Config
from .definitions import WorkflowRegistry
from .pull import Delivery, PullConsumer
from .servers import check_nats_server
from .topology import Topology, execution_id_for, partition_of

log = logging.getLogger("ordo.worker")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Worker:
    def __init__(self, config: Config, *, worker_index: int = 0, workers: int = 1):
        self.config = config
        self.topology = Topology(config)
        self.index = worker_index
        self.workers = workers
        self.name = f"{socket.gethostname()}/{os.getpid()}/w{worker_index}"
        self.partitions = self.topology.owned_partitions(worker_index, workers)
        self.registry = WorkflowRegistry()
        self.ring = OrderingRing(max(config.ring_capacity, config.max_ack_pending + config.fetch_batch))
        self.batcher = LedgerBatcher(config.pg_dsn, max_rows=config.batch_max_rows, max_ms=config.batch_max_ms)
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
        self.fatal: BaseException | None = None

    # -- start and stop -------------------------------------------------------

    async def start(self) -> None:
        self._nc = await nats.connect(
            self.config.nats_url, name=f"ordo-{self.name}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        check_nats_server(self._nc._server_info)
        self._js = self._nc.jetstream(timeout=10)
        await self.topology.ensure(self._js)
        self._pool = await asyncpg.create_pool(self.config.pg_dsn, min_size=1, max_size=3)
        async with self._pool.acquire() as conn:
            await require_current(conn)
            self.batcher.epochs = await claim_partitions(conn, self.partitions, self.name)
        await self.reload_definitions()
        self._listener = await asyncpg.connect(self.config.pg_dsn)
        await self._listener.add_listener(workflows.DEPLOY_CHANNEL, self._on_deploy)
        metrics.owned_partitions.set(len(self.partitions))
        log.info("worker %s owns partitions %s", self.name, self.partitions)

    async def reload_definitions(self) -> None:
        async with self._pool.acquire() as conn:
            definitions = await workflows.load_all(conn)
            tenants = await workflows.tenants(conn)
        self.registry.load(definitions, tenants)

    def _on_deploy(self, *_):
        asyncio.get_running_loop().create_task(self.reload_definitions())

    async def run(self) -> None:
        """Run until `stopping` is set, then drain: stop fetching, commit and ack what is in flight."""
        t = self.topology
        consumers = [PullConsumer(self._nc, t.triggers_stream, t.triggers_consumer)]
        consumers += [PullConsumer(self._nc, t.exec_stream, t.partition_consumer(p)) for p in self.partitions]
        for consumer in consumers:
            await consumer.subscribe()
        fetchers = [asyncio.create_task(
            self._fetch_loop(consumers[0], self._take_triggers, metrics.fetch_triggers_seconds))]
        fetchers += [asyncio.create_task(self._fetch_loop(c, self._take_exec_messages, metrics.fetch_exec_seconds))
                     for c in consumers[1:]]
        pump = asyncio.create_task(self._pump())
        committer = asyncio.create_task(self._commit_loop())
        self._tasks = fetchers + [pump, committer]
        self.ready.set()
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, committer, pump, *fetchers], return_when=asyncio.FIRST_COMPLETED)
        self.stopping.set()
        for task in done:
            if task is not stop and task.exception() is not None:
                self.fatal = task.exception()
        # Drain: each fetch loop finishes the fetch it has open (at most its
        # 1 s expiry) and hands over what it got; then the ring and the
        # batcher empty out and the last batch commits and is acked.
        await asyncio.wait(fetchers, timeout=5)
        for task in fetchers:
            task.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)
        self._intake_closed = True
        self._ring_ready.set()
        self.batcher.nudge()
        if self.fatal is None:
            await asyncio.wait([committer], timeout=self.config.ack_wait_s)
        for task in (pump, committer):
            task.cancel()
        await asyncio.gather(pump, committer, return_exceptions=True)
        await self.close()
        if self.fatal is not None:
            raise self.fatal

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
                log.warning("final flush to NATS failed: %s", exc)
            await self._nc.close()

    # -- fetch ----------------------------------------------------------------

    async def _fetch_loop(self, consumer: PullConsumer, take, fetch_seconds) -> None:
        batch = self.config.fetch_batch
        while True:
            stopping = self.stopping.is_set()
            if consumer.outstanding == 0:
                if stopping:
                    return  # drained: no pull request left open to deliver into nowhere
                # Backpressure: a new request never takes in_flight past max_ack_pending.
                while self._in_flight + batch > self.config.max_ack_pending:
                    self._room.clear()
                    await self._room.wait()
                await self.batcher.wait_for_space()
            started = time.monotonic()
            try:
                deliveries = await consumer.take(batch, request_more=not self.stopping.is_set())
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:
                log.warning("pull from %s failed (%s); retrying", consumer.consumer, exc)
                await asyncio.sleep(0.5)
                continue
            if not deliveries:
                continue
            fetch_seconds.observe(time.monotonic() - started)
            self._in_flight += len(deliveries)
            metrics.in_flight.set(self._in_flight)
            metrics.ring_occupancy.set(len(self.ring))
            for d in deliveries:
                if d.delivered > 1:
                    metrics.redeliveries.labels(d.stream).inc()
            take(deliveries)

    def _release(self, count: int) -> None:
        self._in_flight -= count
        if self._in_flight + self.config.fetch_batch <= self.config.max_ack_pending:
            self._room.set()

    # -- enrol: triggers ------------------------------------------------------

    def _take_triggers(self, batch: list[Delivery]) -> None:
        now = _now()
        metrics.triggers_received.inc(len(batch))
        for inbound in batch:
            self.batcher.add(self._enrol(inbound, now))

    def _enrol(self, inbound: Delivery, now: datetime) -> Unit:
        """A trigger's outcome: a new execution per matching workflow, run until it suspends."""
        unit = Unit(inbound)
        try:
            event = decode_trigger(inbound.data, self.config.max_message_bytes)
        except BadMessage as exc:
            self._dead_letter(unit, exc.reason, str(exc))
            return unit
        tenant = event["tenant"]
        if not self.registry.knows_tenant(tenant):
            self._dead_letter(unit, "unknown_tenant", f"tenant {tenant!r} is not known to this engine", tenant=tenant)
            return unit
        matched = False
        for entry in self.registry.candidates(tenant, event["type"]):
            if entry.program is None:
                self._dead_letter(unit, "invalid_definition", entry.error, tenant=tenant, workflow_id=entry.workflow_id)
                continue
            try:
                if not entry.program.matches(event):
                    continue
                matched = True
                execution_id = execution_id_for(tenant, entry.workflow_id, event["event_id"])
                record = executions.ExecutionRecord(
                    execution_id, tenant, entry.workflow_id, entry.version, str(event["contact"]["id"]),
                    event["event_id"], partition_of(execution_id, self.topology.partitions), now, 0,
                    ExecutionState(execution_id, contact=event["contact"], event=event),
                    event_json=inbound.data.decode(),
                )
                transitions = advance(entry.program, record.state, "start", None)
            except Exception as exc:  # a definition the dispatcher cannot run: poison, not fatal
                log.exception("dispatch failed for %s/%s", tenant, entry.workflow_id)
                self._dead_letter(unit, "dispatch_error", f"{type(exc).__name__}: {exc}", tenant=tenant,
                                  workflow_id=entry.workflow_id)
                continue
            unit.changes.append(record.change(transitions, now))
        if not matched and not unit.dead_letters:
            metrics.triggers_unmatched.inc()
        return unit

    # -- order and dispatch: messages addressed to executions -----------------

    def _take_exec_messages(self, batch: list[Delivery]) -> None:
        for inbound in batch:
            try:
                doc = decode_exec(inbound.data, self.config.max_message_bytes)
            except BadMessage as exc:
                unit = Unit(inbound)
                self._dead_letter(unit, exc.reason, str(exc))
                self.batcher.add(unit)
                continue
            inbound.key = doc["execution_id"]
            # The ring is sized above max_ack_pending, so a push cannot fail here.
            if not self.ring.push(inbound.key, (inbound, doc)):
                raise RuntimeError("ordering ring overflow: ring_capacity must exceed max_ack_pending")
        metrics.ring_occupancy.set(len(self.ring))
        self._ring_ready.set()

    async def _pump(self) -> None:
        """Dispatch every message whose execution has nothing else in flight."""
        while True:
            await self._ring_ready.wait()
            self._ring_ready.clear()
            while True:
                items = self.ring.pop_many(1024)
                if not items:
                    break
                async with self._pool.acquire() as conn:
                    records = await executions.load(conn, list({key for key, _ in items}))
                now = _now()
                for key, (inbound, doc) in items:
                    unit = self._apply(records.get(key), inbound, doc, now)
                    if unit is not None:
                        self.batcher.add(unit)
                if self.stopping.is_set() and not self.ring:
                    self.batcher.nudge()

    def _apply(self, record, inbound: Delivery, doc: dict, now: datetime) -> Unit | None:
        """One message applied to one execution; None when it is a redelivery of a committed one."""
        unit = Unit(inbound)
        if record is None:
            self._dead_letter(unit, "unknown_execution", f"no execution {doc['execution_id']!r}")
            return unit
        if inbound.stream_seq <= record.last_stream_seq:
            # Committed before (a redelivery): nothing to apply, just settle it.
            metrics.exec_duplicate.inc()
            self._settle_now(inbound)
            return None
        state = record.state
        if state.status in executions.CLOSED:
            self._dead_letter(unit, "execution_closed", f"execution {record.execution_id} is {state.status}",
                              tenant=record.tenant, workflow_id=record.workflow_id)
            return unit
        entry = self.registry.version(record.tenant, record.workflow_id, record.workflow_version)
        if entry is None or entry.program is None:
            error = entry.error if entry else f"workflow {record.workflow_id} v{record.workflow_version} is not deployed"
            self._dead_letter(unit, "invalid_definition", error, tenant=record.tenant, workflow_id=record.workflow_id)
            return unit
        try:
            transitions = advance(entry.program, state, doc["kind"], {"name": doc["name"], "data": doc.get("data")})
        except Exception as exc:
            log.exception("dispatch failed for execution %s", record.execution_id)
            self._dead_letter(unit, "dispatch_error", f"{type(exc).__name__}: {exc}", tenant=record.tenant,
                              workflow_id=record.workflow_id)
            return unit
        record.last_stream_seq = inbound.stream_seq
        unit.changes.append(record.change(transitions, now))
        return unit

    def _dead_letter(self, unit: Unit, reason: str, error: str, **where) -> None:
        inbound = unit.token
        log.warning("dead letter (%s) from %s seq %s: %s", reason, inbound.stream, inbound.stream_seq, error)
        execution_id = inbound.key
        unit.dead_letters.append(
            DeadLetter(reason, error, inbound.subject, inbound.stream, inbound.stream_seq, inbound.data,
                       execution_id=execution_id if _looks_like_uuid(execution_id) else None, **where)
        )

    # -- commit and ack -------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            units = await self.batcher.next_batch(self.stopping)
            if not units:
                if self._intake_closed and self._in_flight == 0:
                    return
                continue
            try:
                result = await self.batcher.commit(units)
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
        if letters:
            await self._publish_dead_letters(letters)
        enrolled = deduplicated = applied = transitions = 0
        finished: dict = {}
        publish = self._nc.publish
        for unit in result.units:
            inbound = unit.token
            stale = False
            for change in unit.changes:
                if change.is_new:
                    if change.execution_id not in accepted or change.duplicate:
                        deduplicated += 1
                        continue
                    enrolled += 1
                elif change.execution_id not in accepted:
                    # The ledger moved on since this state was loaded: let the
                    # redelivery re-read it (it dedupes if this already applied).
                    stale = True
                    continue
                else:
                    applied += 1
                transitions += len(change.transitions)
                if change.finished:
                    finished[change.status] = finished.get(change.status, 0) + 1
            if stale:
                await publish(inbound.reply, b'-NAK {"delay": 100000000}')
            else:
                await publish(inbound.reply, b"+ACK")
            self._settled(inbound)
        metrics.enrolled.inc(enrolled)
        metrics.deduplicated.inc(deduplicated)
        metrics.exec_applied.inc(applied)
        metrics.transitions.inc(transitions)
        for status, count in finished.items():
            metrics.executions_finished.labels(status).inc(count)

    def _settle_now(self, inbound: Delivery) -> None:
        asyncio.get_running_loop().create_task(self._nc.publish(inbound.reply, b"+ACK"))
        self._settled(inbound)

    def _settled(self, inbound: Delivery) -> None:
        if inbound.key is not None:
            self.ring.complete(inbound.key)
            self._ring_ready.set()
        self._release(1)

    async def _publish_dead_letters(self, letters) -> None:
        """Copy committed dead letters onto the DLQ stream (the ledger row is the record)."""
        for inbound, letter in letters:
            metrics.dead_letters.labels(letter.reason).inc()
            headers = {
                "Nats-Msg-Id": f"{inbound.stream}:{inbound.stream_seq}:{letter.reason}:{letter.workflow_id or ''}",
                "Ordo-Reason": letter.reason,
                "Ordo-Error": letter.error[:1024].replace("\r", " ").replace("\n", " "),
                "Ordo-Source": f"{inbound.stream}:{inbound.stream_seq}",
            }
            try:
                await self._js.publish(self.topology.dlq_subject(letter.reason), inbound.data, headers=headers)
            except Exception as exc:  # the ledger row is committed; the stream copy is best effort
                log.warning("dead letter not copied to the DLQ stream: %s", exc)


def _looks_like_uuid(value) -> bool:
    return isinstance(value, str) and len(value) == 36 and value.count("-") == 4
