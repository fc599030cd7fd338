"""Tasks started and not awaited (a reload on a deploy's NOTIFY, an ack of a redelivery, a rate
limit's line): held until they end, and a failure logged, never dropped.

The event loop keeps only weak references to tasks, and a task nobody awaits
reports its exception only if it is garbage collected: a reload that failed
would leave the worker on its old definitions with nothing said.
"""

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any

from . import logs

log = logging.getLogger("ordo.worker")

_running: set[asyncio.Task] = set()


def start(work: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
    """Run `work` as a task of its own; `what` names it in the line logged if it fails."""
    task = asyncio.get_running_loop().create_task(work)
    _running.add(task)
    task.add_done_callback(partial(_ended, what))
    return task


def _ended(what: str, task: asyncio.Task) -> None:
    _running.discard(task)
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error("%s failed: %r", what, exc, extra=logs.failure("background_task", exc, task=what))
