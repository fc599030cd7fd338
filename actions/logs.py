"""Structured logs: one JSON object per line on stderr (journald keeps them as is),
or readable lines when stderr is a terminal.

The engine's workers and external action workers log alike; the engine
imports this as daemon.logs.

Every line of a worker carries `worker` (its name, bound once at start-up and
inherited by every task it starts); a line about an execution carries
`execution_id`, `tenant` and `step` where known (`extra=logs.execution(...)`);
an error carries its `reason` (a code) and `error` (the message). Credentials
in URLs (`scheme://user:password@host`) are masked in every line, whatever
library logged them.

On a terminal (`log_format = "auto"`, the default) the same fields are
printed as one readable line each: time, level, worker, message, then the
fields as key=value. `log_format = "json"` keeps JSON lines everywhere,
`"text"` readable lines everywhere.
"""

import logging
import os
import re
import sys
import time
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


class TextFormatter(logging.Formatter):
    """One readable line: `12:03:04.567 WARNING w0  message  key=value ...` (the JSON line's fields)."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        worker = _worker.get() or getattr(record, "worker", None)
        head = f"{when} {record.levelname:<7} {_short(worker) if worker else record.name}"
        fields = " ".join(
            f"{key}={_text(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD and key != "worker" and not key.startswith("_")
        )
        line = f"{head}  {mask(record.getMessage())}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + mask(self.formatException(record.exc_info))
        return line


def _short(worker: str) -> str:
    """`host/pid/w0` -> `w0/pid`: the host is the same on every line of one terminal."""
    parts = str(worker).split("/")
    return f"{parts[-1]}/{parts[-2]}" if len(parts) == 3 else str(worker)


def _text(value: object) -> str:
    text = mask(value) if isinstance(value, str) else str(value)
    return orjson.dumps(text).decode() if not text or any(c.isspace() or c == '"' for c in text) else text


#: `log_format` values: JSON lines, readable lines, or readable on a terminal and JSON otherwise.
FORMATS = ("auto", "json", "text")


def configure(level: str = "info", format: str = "auto") -> None:
    """Send every logger's lines to stderr from `level` up, as JSON lines or readable ones (`FORMATS`)."""
    if format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {format!r}")
    readable = format == "text" or (format == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if readable else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
