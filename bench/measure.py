"""Reading a run back from the ledger while it goes: how many of its executions
have finished, and when each did.

The queries are ledger/runs.py's, shared with `ordo dev --demo`; a scenario
with a workflow of its own reads its executions by workflow id instead
(ledger/runs.py, the workflow_* reads).
"""

from ledger.runs import count_finished, finish_times

__all__ = ["count_finished", "finish_times"]
