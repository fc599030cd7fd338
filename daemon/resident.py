"""Executions kept in the worker between two of their messages, so that the second needs no ledger read.

The ledger stays the truth; this only saves reading back what this worker has
just committed. An execution is kept after a commit only while it waits for
the result of an action that runs in this worker: that result comes back in
milliseconds, to this worker, and finds its state here. Anything else (a
wait for a timer, a signal or an event, an end) leaves it on disk only.

Why a kept record can never be stale:
- it is taken out (`take`) when a message of its execution is dispatched, and
  put back (`keep`) only after that message's change has committed; the
  ordering ring lets one message of an execution through at a time, so no
  other change of it can commit in between from this worker;
- another worker can change the execution only after taking the partition
  over, and the records of a partition are dropped as soon as this worker
  gives it back or finds it lost; a worker that does not notice (stalled past
  its lease) is fenced on its next commit and exits;
- and should all of that fail, every update commits only where the stored seq
  is the one it was computed from: a stale record's change is refused and its
  message applied again on a fresh read.
"""

from ledger.executions import ExecutionRecord


class ResidentExecutions:
    def __init__(self, capacity: int = 100_000):
        #: The most records kept; past it the oldest is dropped (it is read from the ledger when needed).
        self.capacity = capacity
        self._records: dict[str, ExecutionRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def take(self, execution_id: str) -> ExecutionRecord | None:
        """The kept record of this execution (removed: it is being advanced), or None: read the ledger.

        (Hits and misses are counted where the records are needed: ordo_execution_reads_total.)"""
        return self._records.pop(execution_id, None)

    def keep(self, record: ExecutionRecord) -> None:
        """Keep a record whose latest change has committed (`ExecutionRecord.committed` was called)."""
        records = self._records
        records[record.execution_id] = record
        if len(records) > self.capacity:
            del records[next(iter(records))]

    def drop_partition(self, partition: int) -> None:
        """This worker no longer owns the partition: another worker may change its executions."""
        for execution_id in [e for e, r in self._records.items() if r.partition == partition]:
            del self._records[execution_id]
