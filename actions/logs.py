"""Structured logs: one JSON object per line on stderr (journald keeps them as is).

The engine's workers and external action workers log alike; the engine
imports this as daemon.logs.

Every line of a worker carries `worker` (its name, bound once at start-up and
inherited by every task it starts); a line about an execution carries
`execution_id`, `tenant` and `step` where known (`extra=logs.execution(...)`);
an error carries its `reason` (a code) and `error` (the message). Credentials
in URLs (`scheme://user:password@host`) are masked in every line, whatever
library logged them.
"""

import logging
import os
import re
import sys
from contextvars import ContextVar

import orjson

_STANDARD = set(vars(logging.makeLogRecord({})))

#: The worker whose code is running: a context variable, so that several
#: workers in one process (tests) each label their own tasks' lines.
_worker: ContextVar[str | None] = ContextVar("ordo_worker", default=None)

_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")


def bind_worker(name: str) -> None:
    """Label every line logged from this context on, and from the tasks it starts, with `worker`."""
    _worker.set(name)


def execution(execution_id: str | None, tenant: str | None = None, step: str | None = None, **more) -> dict:
    """The `extra=` of a line about an execution: its id, tenant and step, where known."""
    fields = {"execution_id": execution_id, "tenant": tenant, "step": step, **more}
    return {key: value for key, value in fields.items() if value is not None}


def failure(reason: str, exc: BaseException | str | None = None, **more) -> dict:
    """The `extra=` of a line about something that went wrong: a short `reason` code and the `error` text."""
    fields = {"reason": reason, **more}
    if exc is not None:
        fields["error"] = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return fields


def mask(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` replaced by `***`."""
    return _CREDENTIALS.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "msg": mask(record.getMessage()),
        }
        worker = _worker.get()
        if worker is not None:
            doc["worker"] = worker
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = mask(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = mask(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


def configure(level: str = "info") -> None:
    """Send every logger's lines to stderr as JSON, from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
