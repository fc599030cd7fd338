"""Dispatcher builds by name, for `ordo replay --engine`: judge an engine change on recorded executions.

An engine is what the hot path exposes: `Program` (a compiled definition),
`ExecutionState` and `advance`. Ordo ships two that must decide alike,
`compiled` (the Cython build, when it is built) and `pure` (its Python twin).
A candidate build is shipped beside them as a package of its own and named

- by an entry point in the group `ordo.engines` (`name = "package.module"`), or
- as `module:package.module` on the command line (importable from the path).

`ordo replay --engine NAME` runs the recorded inputs through that build and
diffs its decisions with the ones production made: an engine upgrade, or a
fork of the step semantics, is dual-run on history before it takes traffic.
`ordo rollout start --engine NAME` then gives it live traffic, stage by stage
(ledger/rollouts.py): the workers load it by the same name, an execution
enrolled on it records the name (`executions.engine`) and every later step of
it runs on this build, whose state class it is given (`adopt`).
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from types import SimpleNamespace

from hotpath import ExecutionState, implementations
from hotpath import dispatcher as pure_dispatcher
from hotpath.vocabulary import FAILED, STARTED

from . import logs

log = logging.getLogger("ordo.engines")

GROUP = "ordo.engines"
#: What an engine module must have.
_API = ("Program", "ExecutionState", "advance")
#: An execution state's fields after its id, each a keyword of every engine's ExecutionState (the
#: pure twin's slots, which the compiled build's match: tests/test_dispatcher.py).
_STATE_FIELDS = tuple(name for name in pure_dispatcher.ExecutionState.__slots__ if name != "execution_id")


class EngineError(ValueError):
    """An engine that cannot be used; the message names it and says why."""


def names() -> list[str]:
    """The engines that can be named: Ordo's own that are built, then the entry points'."""
    own = [name for name, ns in implementations() if ns is not None]
    return own + sorted(ep.name for ep in metadata.entry_points(group=GROUP) if ep.name not in own)


def engine(name: str) -> SimpleNamespace:
    """The engine called `name`: `compiled`, `pure`, an `ordo.engines` entry point, or `module:MODULE`."""
    own = dict(implementations())
    if name in own:
        if own[name] is None:
            raise EngineError(f"engine {name!r} is not built here (python setup.py build_ext --inplace)")
        return own[name]
    if name.startswith("module:"):
        return _from_module(name, name.removeprefix("module:"))
    found = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise EngineError(f"no engine {name!r}: one of {', '.join(names())}, or module:PACKAGE.MODULE")
    return _from_module(name, found[0].value)


def _from_module(name: str, module_name: str) -> SimpleNamespace:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a candidate's import error is its own: report it, do not crash the tool
        raise EngineError(f"engine {name!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    missing = [attr for attr in _API if not hasattr(module, attr)]
    if missing:
        raise EngineError(
            f"engine {name!r}: {module_name} lacks {', '.join(missing)} (an engine has {', '.join(_API)})"
        )
    return SimpleNamespace(**{attr: getattr(module, attr) for attr in _API})


def adopt(state, build: SimpleNamespace):
    """`state` as an instance of the engine's own ExecutionState (itself when it is one already).

    A record read from the ledger is built with the worker's own state class; a compiled engine's
    `advance` takes only its own, so an execution on another engine gets a copy of its fields.
    """
    if type(state) is build.ExecutionState:
        return state
    return build.ExecutionState(state.execution_id, **{name: getattr(state, name) for name in _STATE_FIELDS})


def crash_safe_start(entry, record, now_ms: int) -> list:
    """The first advance of a new execution on a candidate engine (`entry.build`), whose crash fails it.

    A candidate build that raises is the candidate's failure, not a poison trigger: the execution is
    recorded as started and failed (code `engine_error`, the exception in its detail), on a fresh state
    (what the engine left half done is dropped), so the rollout counts it in the candidate's failure
    rate and rolls it back, and no trigger is held back by it.
    """
    state = record.state
    try:
        transitions: list = entry.build.advance(entry.program, state, "start", None, now_ms)
        return transitions
    except Exception as exc:  # the candidate's own failure, whatever it is
        error = f"engine {entry.engine!r} raised {type(exc).__name__}: {exc}"
        log.error(
            "execution %s fails: %s",
            state.execution_id,
            error,
            extra=logs.execution(
                state.execution_id, entry.tenant, workflow_id=entry.workflow_id, **logs.failure("engine_error", exc)
            ),
        )
    failed = record.state = ExecutionState(
        state.execution_id, subject=state.subject, event=state.event, tenant=state.tenant
    )
    failed.seq, failed.status = 2, FAILED
    return [
        (1, "", STARTED, {"workflow_id": entry.workflow_id, "version": entry.version}),
        (2, "", FAILED, {"error": error, "code": "engine_error"}),
    ]
