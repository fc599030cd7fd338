"""The hot path: the ordering ring and the step dispatcher, compiled or pure.

Each compiled module (`hotpath._ring`, `hotpath._dispatcher`) has a pure-Python
twin (`hotpath.ring`, `hotpath.dispatcher`) with the same API and behaviour,
as aiohttp does it. `HOTPATH_NO_EXTENSIONS=1` selects the twins; otherwise the
compiled modules are used when they are built, and the twins when they are not.
`IMPLEMENTATION` says which one this process got.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from hotpath import dispatcher as _pure_dispatcher
from hotpath import ring as _pure_ring

NO_EXTENSIONS = bool(os.environ.get("HOTPATH_NO_EXTENSIONS"))

#: Why the compiled modules are not in use, when they are not (None when they are).
COMPILED_UNAVAILABLE: str | None = None

if NO_EXTENSIONS:
    _compiled = None
    COMPILED_UNAVAILABLE = "HOTPATH_NO_EXTENSIONS is set: the pure twins are used"
else:
    try:
        from hotpath import _dispatcher as _compiled_dispatcher
        from hotpath import _ring as _compiled_ring
    except ImportError as exc:
        _compiled = None
        COMPILED_UNAVAILABLE = (
            f"the compiled hotpath extensions are not built ({exc}); build them with "
            "`pip install -e .` or `python setup.py build_ext --inplace`"
        )
    else:
        _compiled = SimpleNamespace(
            OrderingRing=_compiled_ring.OrderingRing,
            Program=_compiled_dispatcher.Program,
            ExecutionState=_compiled_dispatcher.ExecutionState,
            advance=_compiled_dispatcher.advance,
        )

_pure = SimpleNamespace(
    OrderingRing=_pure_ring.OrderingRing,
    Program=_pure_dispatcher.Program,
    ExecutionState=_pure_dispatcher.ExecutionState,
    advance=_pure_dispatcher.advance,
)

IMPLEMENTATION = "compiled" if _compiled is not None else "pure"
_active = _compiled if _compiled is not None else _pure

OrderingRing = _active.OrderingRing
Program = _active.Program
ExecutionState = _active.ExecutionState
advance = _active.advance


def implementations() -> list[tuple[str, SimpleNamespace | None]]:
    """[("compiled", ns), ("pure", ns)] for tests and benchmarks to run over both.

    The compiled namespace is None when it is not available; `COMPILED_UNAVAILABLE`
    says why, and `NO_EXTENSIONS` whether that was asked for (skip) or not (fail).
    """
    return [("compiled", _compiled), ("pure", _pure)]


__all__ = [
    "IMPLEMENTATION",
    "NO_EXTENSIONS",
    "COMPILED_UNAVAILABLE",
    "OrderingRing",
    "Program",
    "ExecutionState",
    "advance",
    "implementations",
]
