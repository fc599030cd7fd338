"""`bench.noop` (major 1): the noop action for external action workers, for `w5-actions --external 1`.

Served by `python -m actions.worker --module bench.noop_action`; no engine runs
it in-process, so every call goes through JetStream both ways.
"""

from actions.contract import ActionContext


class BenchNoop:
    name = "bench.noop"
    major = 1

    def validate(self, input: dict) -> None:
        pass

    async def run(self, ctx: ActionContext, input: dict) -> dict:
        return {}


ACTIONS = [BenchNoop()]
