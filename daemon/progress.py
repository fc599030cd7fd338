"""Per-partition progress: the stream sequence below which everything has settled.

Messages of different executions complete out of order (the ordering ring
lets them), so the watermark is the last sequence before the oldest message
still in flight. It is what the ledger records and what a new owner of the
partition resumes from; a message above it may already have committed, which
the execution's `last_stream_seq` recognises because replay is in order.
"""

from collections import deque


class PartitionProgress:
    __slots__ = ("watermark", "_pending", "_in_flight", "_settled", "_highest")

    def __init__(self, watermark: int):
        self.watermark = watermark
        self._pending: deque = deque()  # fetched, in stream order
        self._in_flight: set = set()
        self._settled: set = set()
        self._highest = watermark

    def fetched(self, seq: int) -> None:
        # A redelivery of a message still in flight (AckWait passed) is the same message.
        if seq > self._highest:
            self._highest = seq
            self._pending.append(seq)
            self._in_flight.add(seq)

    def settled(self, seq: int) -> None:
        if seq not in self._in_flight:
            return  # a second copy of one that settled already
        self._in_flight.discard(seq)
        self._settled.add(seq)
        pending = self._pending
        while pending and pending[0] in self._settled:
            done = pending.popleft()
            self._settled.discard(done)
            self.watermark = done

    def __len__(self) -> int:
        return len(self._in_flight)
