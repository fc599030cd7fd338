"""Dispatch: what the ordering ring hands out, applied to its executions.

The ring (`hotpath/ring.py`) hands out at most one item per execution at a
time, in order, and different executions concurrently: stream messages,
due timers and in-process action results (daemon/work_items.py). A batch of
them is applied on one load: the records daemon/resident.py kept, the rest
read from the ledger. daemon/advance.py decides what each one does, and its
unit goes to the ledger batcher; a redelivery of what has committed is
settled at once (daemon/settle.py).
"""

import asyncio
import logging
from datetime import UTC, datetime

from hotpath import OrderingRing
from hotpath.envelope import decode_exec
from ledger import executions
from ledger.batcher import LedgerBatcher

from . import advance, metrics
from .config import Config
from .definitions import WorkflowRegistry
from .resident import ResidentExecutions
from .work_items import WorkItem

log = logging.getLogger("ordo.worker")


class Dispatch:
    """Takes what the ring hands out, loads its executions and applies it; the units go to the batcher."""

    def __init__(
        self,
        config: Config,
        *,
        registry: WorkflowRegistry,
        ring: OrderingRing,
        ring_ready: asyncio.Event,
        resident: ResidentExecutions,
        batcher: LedgerBatcher,
        stopping: asyncio.Event,
        clock_ms,
        on_pool,
        settle_now,
    ):
        self.config = config
        self.registry = registry
        self.ring = ring
        self.ring_ready = ring_ready
        self.resident = resident
        self.batcher = batcher
        self.stopping = stopping
        self.clock_ms = clock_ms
        self._on_pool = on_pool
        #: Settles an item at once (daemon/settle.py): a redelivery of what has committed.
        self._settle_now = settle_now

    async def pump(self) -> None:
        """Dispatch every message whose execution has nothing else in flight."""
        while True:
            await self.ring_ready.wait()
            self.ring_ready.clear()
            while True:
                items = self.ring.pop_many(1024)
                if not items:
                    break
                await self.dispatch([item for _, item in items])
                if self.stopping.is_set() and not self.ring:
                    self.batcher.nudge()

    async def dispatch(self, items: list[tuple[WorkItem, dict]]) -> None:
        """Apply (source, decoded message) pairs, each holding its execution's ring key, on one load."""
        records = await self._load({source.key for source, _ in items})
        now, now_ms = datetime.now(UTC), self.clock_ms()
        for source, doc in items:
            unit = advance.apply(
                self.registry,
                records.get(source.key),
                source,
                doc,
                now,
                now_ms,
                self.config.max_context_bytes,
                deployment=self.config.prefix,
            )
            if unit is None:
                metrics.exec_duplicate.inc()
                self._settle_now(source)
            else:
                self.batcher.add(unit)
        metrics.advance_timings.flush()

    async def _load(self, keys: set) -> dict:
        """The executions' records: those kept in memory, the rest read from the ledger."""
        records = {}
        unread = []
        for key in keys:
            record = self.resident.take(key)
            if record is None:
                unread.append(key)
            else:
                records[key] = record
        metrics.read_resident.inc(len(records))
        if unread:
            metrics.read_ledger.inc(len(unread))
            records.update(await self._on_pool(lambda conn: executions.load(conn, unread), "load"))
        return records

    async def apply_again(self, items: list[WorkItem]) -> None:
        """Dispatch messages whose units were stale once more, on the executions' committed state.

        Still in flight and holding their ring keys, they are applied before any
        younger message of their executions. (Released and NAKed instead, a
        younger one was applied first and the redelivery then dropped as a
        duplicate: a lost signal.)
        """
        metrics.stale_applied_again.inc(len(items))
        # Each decoded when it came in: it decodes again.
        await self.dispatch([(d, decode_exec(d.data, self.config.max_message_bytes)) for d in items])
