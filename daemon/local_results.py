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

import time
from typing import Literal

from actions import contract


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
