"""In-process action results, applied by the worker that ran the action: no JetStream hop.

The worker that ran an in-process action owns the execution's partition, so
it hands the result straight to the ordering ring as one more message of the
execution: it takes the execution's ring key, so a signal or event for the
same execution is applied before or after it, never interleaved, and the
result commits with the next batch like any other message.

A local result was never in a stream. It has no stream position (the
partition's watermark does not wait for it) and nothing to ack. If the worker
dies before its commit, it is lost, and the step's deadline timer re-runs the
action with the same idempotency key, exactly as when a published result is
lost. If the partition moved meanwhile, the commit is fenced and the new owner
re-runs it. A result the worker cannot apply itself (it is draining, it no
longer owns the partition, the ring has no room) is published onto the
execution's subject as before.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from actions import contract
from hotpath import OrderingRing

from . import metrics
from .config import Config
from .intake import Window
from .topology import partition_of


class LocalResult:
    """An in-process action's result travelling through the pipeline in place of a stream message."""

    __slots__ = ("key", "result", "result_at")
    kind: Literal["local_result"] = "local_result"
    subject = "local"
    stream = "local"
    stream_seq = 0
    reply = None
    delivered = 1
    partition = -1
    batch_index = None

    def __init__(self, result: dict):
        self.key = result["execution_id"]
        self.result = result
        #: time.monotonic() when the result became available (the apply stage of an action step).
        self.result_at = time.monotonic()

    @property
    def data(self) -> bytes:
        """The result as the execution's subject would carry it: what a dead letter keeps."""
        return contract.encode(self.result)


class LocalResults:
    """Takes in the in-process results this worker can apply itself (daemon/effects.py's `apply_locally`)."""

    def __init__(
        self,
        config: Config,
        *,
        ring: OrderingRing,
        ring_ready: asyncio.Event,
        window: Window,
        stopping: asyncio.Event,
        owns: Callable[[int], bool],
    ):
        self.config = config
        self.ring = ring
        self.ring_ready = ring_ready
        self.window = window
        self.stopping = stopping
        #: Whether this worker owns a partition and keeps applying its messages (daemon/partitions.py).
        self.owns = owns

    def take(self, result: dict) -> bool:
        """Apply an in-process action's result here (True), or leave it to be published (False).

        Only while this worker owns the execution's partition and is not
        draining: otherwise the owner (or the next one) must get it, through
        the execution's subject. The ring is sized for what fetch brings in;
        a result that finds it full is published too.
        """
        if self.stopping.is_set():
            metrics.local_published_draining.inc()
            return False
        if not self.owns(partition_of(result["execution_id"], self.config.partitions)):
            metrics.local_published_not_owner.inc()
            return False
        source = LocalResult(result)
        if not self.ring.push(source.key, (source, result)):
            metrics.local_published_ring_full.inc()
            return False
        metrics.local_applied.inc()
        self.window.add(1)  # settled like a message: memory stays bounded by the same window
        self.ring_ready.set()
        return True
