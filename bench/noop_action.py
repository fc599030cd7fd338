"""`bench.noop` (major 1): the noop action for external action workers, for `w5-actions --external 1`.

Served by `python -m actions.worker --module bench.noop_action`; no engine runs
it in-process, so every call goes through JetStream both ways.
"""

from actions.builtin.noop import NoopAction


class BenchNoop(NoopAction):
    name = "bench.noop"


ACTIONS = [BenchNoop()]
