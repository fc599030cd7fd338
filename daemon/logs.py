"""The engine's structured logs: actions/logs.py's JSON lines, shared with action workers.

Imported from here by the engine (`from . import logs`); defined there so
that an action worker needs nothing of the engine.
"""

from actions.logs import FORMATS, JsonFormatter, TextFormatter, bind_worker, configure, execution, failure, mask

__all__ = [
    "FORMATS",
    "JsonFormatter",
    "TextFormatter",
    "bind_worker",
    "configure",
    "execution",
    "failure",
    "mask",
]
