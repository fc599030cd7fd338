"""One worker process: fetch -> order -> dispatch -> commit -> ack.

    trigger lanes ──────decode──> enrol (dispatch the first steps) ─────────┐
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

`Worker` starts and stops the jobs, each in a module of its own that owns its loop:

- daemon/partitions.py: ownership rounds; each owned partition's consumer started and stopped;
- daemon/intake.py: the fetch loops and the timer loop, within the in-flight window;
- daemon/local_results.py: in-process action results taken in;
- daemon/dispatch.py: what the ordering ring hands out, applied to its executions;
- daemon/settle.py: the commit loop, and settling each committed batch: effects, acks, dead-letter copies;
- daemon/upkeep.py: the ledger's day partitions made ahead and, with `retention_keep`, old days dropped.
- daemon/listener.py: the LISTEN connection (deploys, rollouts, timers set elsewhere), opened again when lost.
"""

import asyncio
import logging
import os
import socket
import time

import nats

from hotpath import OrderingRing
from ledger import connection, event_waits, partitioning, rollouts, workflows
from ledger import timers as ledger_timers
from ledger.batcher import LedgerBatcher
from ledger.connection import CONNECTION_ERRORS
from ledger.schema import require_current

from . import background, context_types, faults, logs, tenant_limits
from .config import Config
from .definitions import WorkflowRegistry
from .dispatch import Dispatch
from .effects import Effects
from .intake import Intake, Window
from .limits import CallTokens, LimitGrants, requeue
from .listener import Listener
from .local_results import LocalResults
from .ownership import Ownership
from .partitions import Partitions
from .progress import PartitionProgress
from .resident import ResidentExecutions
from .rollout_controller import RolloutController
from .servers import check_nats_server
from .settle import Settlement
from .timers import DueTimers
from .topology import Topology
from .tracing import OtlpExport, Tracing
from .upkeep import ledger_day_s, retention_keep, upkeep_loop

log = logging.getLogger("ordo.worker")


#: Seconds a pooled read, lease renewal or acquire may take before it is retried.
_POOL_COMMAND_TIMEOUT_S = 15.0


def _in_process_actions(config: Config):
    """The in-process actions: every `ordo.actions` entry point (noop, log, webhook and any installed
    plug-in's) and the `action_plugins` setting's; a bad one stops the start with a PluginError naming it."""
    from actions import plugins

    return plugins.registry(config, config.action_plugins)


class Worker:
    #: Its jobs, each owning its loop; made by start(), once the connections are up.
    window: Window
    intake: Intake
    partitions: Partitions
    local_results: LocalResults
    dispatch: Dispatch
    settlement: Settlement
    rollout_controller: RolloutController

    def __init__(self, config: Config, *, worker_index: int = 0, workers: int = 1, clock_ms=None, actions=None):
        self.config = config
        self.topology = Topology(config)
        self.index = worker_index
        self.workers = workers
        self.name = f"{socket.gethostname()}/{os.getpid()}/w{worker_index}"
        self.ownership = Ownership(
            self.name,
            config.partitions,
            deployment=config.prefix,
            lease_ttl_s=config.lease_ttl_s,
            lease_renew_s=config.lease_renew_s,
        )
        self.registry = WorkflowRegistry()
        self.registry.set_tenant_limits(tenant_limits.parse(config.tenant_limits))
        # The most messages fetched and not yet settled: a pull request opens while
        # in_flight + fetch_batch <= max_ack_pending, and then every open request (the
        # triggers' and one per partition) may still deliver a whole batch.
        self._most_fetched = config.max_ack_pending + (config.partitions + 1) * config.fetch_batch
        # Room for all of them plus a share of due timers.
        self.ring = OrderingRing(
            max(config.ring_capacity, self._most_fetched + config.max_ack_pending + config.fetch_batch)
        )
        #: Epoch milliseconds; injectable so that tests can make "wait 2d" pass in a moment.
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        #: The `retention_keep` setting, checked at start-up (a bad one is an error naming it).
        partitioning.use_day_length(ledger_day_s(config))
        self.retention_keep = retention_keep(config)
        self.timers = DueTimers(deployment=config.prefix, horizon_s=config.timer_horizon_s)
        #: Executions waiting for an in-process action's result, kept between their messages.
        self.resident = ResidentExecutions()
        self._actions = actions
        self.effects: Effects | None = None
        self.progress: dict[int, PartitionProgress] = {}
        #: partition -> the epoch this worker claimed it under: every commit that touches it checks it.
        self.epochs: dict[int, int] = {}
        #: Partitions being given back or lost: their fetch loops finish and stop.
        self._closing: set = set()
        self.batcher = LedgerBatcher(
            config.pg_dsn,
            max_rows=config.batch_max_rows,
            max_ms=config.batch_max_ms,
            deployment=config.prefix,
            # Within the lease: a cut-off owner's open commit lets go of its partitions before they expire.
            idle_in_transaction_s=config.lease_ttl_s / 2,
            tcp_timeout_s=config.pg_tcp_timeout_s,
        )
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._ring_ready = asyncio.Event()
        self._nc = None
        self._js = None
        self._pool = None
        #: The LISTEN connection (deploys, rollouts, timers set elsewhere), opened again when lost.
        self.listener: Listener | None = None
        self._reloading = asyncio.Lock()
        #: Spans of sampled executions (daemon/tracing.py); None while trace_sample is 0.
        self._tracing: Tracing | None = None
        self.fatal: BaseException | None = None

    # -- start and stop -------------------------------------------------------

    async def start(self) -> None:
        logs.bind_worker(self.name)  # every line from here and from the tasks started here names this worker
        self._nc = await nats.connect(
            self.config.nats_servers, name=f"ordo-{self.name}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        check_nats_server(self._nc._server_info)
        self._js = self._nc.jetstream(timeout=10)
        faults.install(self.config.inject_faults, self._nc, self._js, self.batcher, worker=self.index)
        await self.topology.ensure(self._js)
        self._stream_created = str((await self._js.stream_info(self.topology.exec_stream)).created)
        triggers_created = {
            name: str((await self._js.stream_info(name)).created) for name in self.topology.trigger_stream_names()
        }
        #: Lane -> the creation time of its triggers stream (ledger/lane_floors.py: a lane's floor counts in it).
        self._lanes_stream_created = {
            lane: triggers_created[self.topology.trigger_stream_of(lane)] for lane in range(self.topology.lanes)
        }
        if self._actions is None:
            self._actions = _in_process_actions(self.config)
        self.registry.context_types = context_types.registry(self.config, self.config.context_type_plugins)
        # Bounded: a read or lease renewal on a connection that a Postgres restart
        # left half-dead must fail (and be retried), not hang the worker.
        # `ordo.deployment`: the trigger path routes events to this deployment's waits only (ledger/event_waits.py).
        self._pool = await connection.create_pool(
            self.config.pg_dsn,
            tcp_timeout_s=self.config.pg_tcp_timeout_s,
            min_size=1,
            max_size=4,
            command_timeout=_POOL_COMMAND_TIMEOUT_S,
            server_settings={"ordo.deployment": self.config.prefix},
        )
        self._assemble()

        async def prepare(conn):
            await require_current(conn)
            await self.ownership.prepare(conn)
            await ledger_timers.adopt(conn, self.config.prefix)  # rows of before migration 013, if ours
            await event_waits.adopt(conn, self.config.prefix)

        await self._on_pool(prepare, "start")  # a backend terminated at start-up is retried, not fatal
        self.listener = Listener(
            self.config.pg_dsn,
            {
                workflows.DEPLOY_CHANNEL: self._on_deploy,
                rollouts.ROLLOUT_CHANNEL: self.rollout_controller.changed,
                ledger_timers.elsewhere_channel(self.config.prefix): self._on_timers_set,
            },
            catch_up=self._catch_up_after_deafness,
            tcp_timeout_s=self.config.pg_tcp_timeout_s,
        )
        await self.listener.open()
        # After listening: a deploy that commits in between is either read here or told.
        await self.reload_definitions()

    def _assemble(self) -> None:
        """Make the jobs, each given what it shares with the others."""
        config, shared = self.config, dict(ring=self.ring, ring_ready=self._ring_ready, stopping=self.stopping)
        self.window = window = Window(config)
        self.intake = Intake(
            config,
            topology=self.topology,
            registry=self.registry,
            batcher=self.batcher,
            window=window,
            progress=self.progress,
            closing=self._closing,
            timers=self.timers,
            clock_ms=self.clock_ms,
            on_pool=self._on_pool,
            nc=self._nc,
            js=self._js,
            most_fetched=self._most_fetched,
            **shared,
        )
        self.partitions = Partitions(
            config,
            ownership=self.ownership,
            topology=self.topology,
            intake=self.intake,
            timers=self.timers,
            resident=self.resident,
            progress=self.progress,
            epochs=self.epochs,
            closing=self._closing,
            stopping=self.stopping,
            ready=self.ready,
            on_pool=self._on_pool,
            js=self._js,
            stream_created=self._stream_created,
            lanes_stream_created=self._lanes_stream_created,
            on_fetcher_ended=self._fetcher_ended,
        )
        self.local_results = LocalResults(config, window=window, owns=self.partitions.owns, **shared)
        self.effects = Effects(
            self._js,
            self.topology,
            self._actions,
            concurrency=config.action_concurrency,
            backlog=2 * config.action_concurrency,
            concurrency_max=config.action_concurrency_max,
            on_call_done=window.action_call_done,
            apply_locally=self.local_results.take,
            call_tokens=CallTokens(self._pool),
        )
        window.effects = self.effects
        self.settlement = Settlement(
            config,
            batcher=self.batcher,
            epochs=self.epochs,
            progress=self.progress,
            window=window,
            timers=self.timers,
            resident=self.resident,
            effects=self.effects,
            owns=self.partitions.owns,
            watermarks=self.partitions.watermarks,
            clock_ms=self.clock_ms,
            nc=self._nc,
            js=self._js,
            topology=self.topology,
            **shared,
        )
        self.dispatch = Dispatch(
            config,
            registry=self.registry,
            resident=self.resident,
            batcher=self.batcher,
            clock_ms=self.clock_ms,
            on_pool=self._on_pool,
            settle_now=self.settlement.settle_now,
            **shared,
        )
        # Each needs the other: a redelivery is settled at once, a stale item is dispatched again.
        self.settlement.apply_again = self.dispatch.apply_again
        if config.trace_sample > 0:  # OpenTelemetry is imported now, and only now
            export = OtlpExport(config.otlp_endpoint, self.name)
            self._tracing = self.settlement.tracing = Tracing(config.trace_sample, export, self._on_pool)
        self.rollout_controller = RolloutController(self.registry, self._on_pool, self.stopping)
        self.settlement.rollout_tally = self.rollout_controller.tally

    async def reload_definitions(self) -> None:
        """Load the definitions as the ledger has them now. One reload at a time, in the order asked
        (a deploy's NOTIFY, the listener's catch-up, SIGHUP): two at once, the one that read the older
        snapshot could finish last and leave the older definitions loaded until the next deploy."""
        async with self._reloading:
            await self._reload_definitions()

    async def _reload_definitions(self) -> None:
        async def read(conn):
            # One snapshot: a candidate deployed with its rollout is seen with it.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return (
                    await workflows.load_all(conn),
                    await workflows.tenants(conn),
                    await rollouts.latest_per_workflow(conn),
                )

        definitions, tenants, latest_rollouts = await self._on_pool(read, "definitions")
        self.registry.load(definitions, tenants, latest_rollouts)
        self.rollout_controller.tally.set_rollouts(latest_rollouts)

    async def set_tenant_limits(self, limits: tenant_limits.TenantLimits) -> None:
        """New per-tenant limits (SIGHUP): the definitions compiled again with them, for what is
        enrolled from now on, and what waits already given them."""
        before = self.registry.tenant_limits
        self.registry.set_tenant_limits(limits)
        await self.reload_definitions()
        await self._on_pool(lambda conn: requeue(conn, before, limits, self.registry.max_running), "tenant limits")

    def _on_timers_set(self, _conn, _pid, _channel, payload: str) -> None:
        """Timers another worker's enrolments set in partitions it does not own: ours, maybe."""
        for partition, fire_at_us in ledger_timers.told(payload).items():
            self.timers.set_elsewhere(partition, fire_at_us)

    def _on_deploy(self, *_):
        background.start(self.reload_definitions(), "reloading the workflow definitions on a deploy")

    async def _catch_up_after_deafness(self) -> None:
        """The listener was lost and is back: do what a notification missed meanwhile would have made
        happen. Nothing else would: definitions are read only on a deploy's, and a timer set
        elsewhere behind the walk waited for the partition to change hands (the rollouts' loop
        reads them every second anyway)."""
        self.rollout_controller.changed()
        self.timers.walk_again()
        await self.reload_definitions()

    async def run(self) -> None:
        """Run until `stopping` is set, then drain: stop fetching, commit and ack what is in flight."""
        triggers = await self.intake.fetch_triggers()
        pump = asyncio.create_task(self.dispatch.pump())
        committer = asyncio.create_task(self.settlement.commit_loop())
        timer_loop = asyncio.create_task(self.intake.timer_loop())
        owner = asyncio.create_task(self.partitions.ownership_loop())
        lag = asyncio.create_task(self.partitions.lag_loop())
        rollout_loop = asyncio.create_task(self.rollout_controller.run())
        listening = asyncio.create_task(self.listener.run())
        dsn, tcp_timeout_s = self.config.pg_dsn, self.config.pg_tcp_timeout_s
        upkeep = asyncio.create_task(
            upkeep_loop(dsn, self.retention_keep, self.clock_ms, self.stopping, tcp_timeout_s=tcp_timeout_s)
        )
        self._limit_grants = asyncio.create_task(
            LimitGrants(dsn, self._js, self.topology, tcp_timeout_s=tcp_timeout_s).run(self.stopping)
        )
        stop = asyncio.create_task(self.stopping.wait())
        # The listener's loop among them: a worker that cannot listen any more must not run on deaf.
        done, _ = await asyncio.wait(
            [stop, committer, pump, timer_loop, owner, triggers, listening], return_when=asyncio.FIRST_COMPLETED
        )
        self.stopping.set()
        for task in done:
            if task is not stop and task.exception() is not None:
                self.fatal = task.exception()
        await self._drain(owner, lag, rollout_loop, listening, pump, committer, timer_loop, upkeep)

    async def _drain(self, owner, lag, rollout_loop, listening, pump, committer, timer_loop, upkeep) -> None:
        # Drain: each fetch loop finishes the fetch it has open (at most its
        # 1 s expiry) and hands over what it got; then the ring and the
        # batcher empty out and the last batch commits and is acked.
        owner.cancel()
        lag.cancel()
        rollout_loop.cancel()
        listening.cancel()  # before close(): the listener closed then is not lost, nor opened again
        upkeep.cancel()
        self._limit_grants.cancel()
        await asyncio.gather(owner, lag, rollout_loop, listening, upkeep, self._limit_grants, return_exceptions=True)
        fetchers = list(self.intake.fetchers.values())
        if fetchers:  # none when the worker owned no partition (and so took no trigger lane)
            await asyncio.wait(fetchers, timeout=5)
        for task in fetchers:
            task.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)
        self.window.closed = True
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
            try:
                await self._on_pool(self.ownership.leave, "leave")
            except CONNECTION_ERRORS as exc:  # the ledger went away as we left: the leases lapse instead
                log.warning(
                    "partitions not handed back (%r): their leases lapse instead",
                    exc,
                    extra=logs.failure("partition_release", exc),
                )
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
                log.warning(
                    "%s: lost the ledger connection (%s); retrying in %.2fs",
                    what,
                    exc,
                    delay,
                    extra=logs.failure("ledger_connection", exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _fetcher_ended(self, task: asyncio.Task) -> None:
        """A partition's fetch loop must not die quietly while the worker keeps its lease."""
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            log.error(
                "a partition fetch loop failed: %r; stopping the worker",
                task.exception(),
                extra=logs.failure("fetch_loop", task.exception()),
            )
            self.fatal = task.exception()
            self.stopping.set()

    async def close(self) -> None:
        if self._tracing is not None:  # its last history reads need the pool
            await self._tracing.close()
        if self.listener is not None:
            await self.listener.close()
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

    # -- reached into by tests (tests/test_faults.py) -------------------------

    @property
    def _fetchers(self) -> dict:
        return self.intake.fetchers

    @property
    def _unstarted(self) -> dict:
        return self.partitions.unstarted

    def _stop_partition(self, p: int) -> None:
        self.partitions.stop(p)
