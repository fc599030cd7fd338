"""The `noop` action (major 1): does nothing and returns {}; for tests, benchmarks and placeholders."""

from ..contract import ActionContext


class NoopAction:
    name = "noop"
    major = 1

    def validate(self, input: dict) -> None:
        pass

    async def run(self, ctx: ActionContext, input: dict) -> dict:
        return {}
