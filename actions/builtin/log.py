"""The `log` action (major 1): writes its input to the engine's log and returns {}.

Input: any object; `message` (a string) becomes the log line, `level` (debug,
info, warning, error; default info) its level, and the rest goes along as data.
"""

import logging

from ..contract import ActionContext, ActionError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

log = logging.getLogger("ordo.actions.log")


class LogAction:
    name = "log"
    major = 1

    def validate(self, input: dict) -> None:
        if "message" in input and type(input["message"]) is not str:
            raise ActionError("invalid_input", False, "'message' must be a string")
        if input.get("level", "info") not in LEVELS:
            raise ActionError("invalid_input", False, f"'level' must be one of {sorted(LEVELS)}")

    async def run(self, ctx: ActionContext, input: dict) -> dict:
        data = {k: v for k, v in input.items() if k not in ("message", "level")}
        log.log(
            LEVELS[input.get("level", "info")],
            input.get("message", "workflow log step"),
            extra={
                "execution_id": ctx.execution_id,
                "step": ctx.step_id,
                "attempt": ctx.attempt,
                "tenant": ctx.tenant,
                "data": data,
            },
        )
        return {}
