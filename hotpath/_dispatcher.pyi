"""Types of the compiled step dispatcher; `hotpath.dispatcher` is its pure twin, with the same API."""

from typing import Any

from typing_extensions import disjoint_base

from hotpath.vocabulary import Effect, Transition

@disjoint_base  # PEP 800: a cdef class, which no class can inherit together with another such base
class Program:
    """A workflow definition compiled for the dispatcher (DefinitionError if it cannot run)."""

    def __init__(self, definition: dict[str, Any], enrolment_rate_per_s: float | None = None) -> None: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def tenant(self) -> str: ...
    @property
    def trigger_event(self) -> str: ...
    @property
    def subject_type(self) -> str: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def max_visits(self) -> int: ...
    @property
    def max_running(self) -> int | None: ...
    @property
    def gates(self) -> tuple[dict[str, Any], ...]: ...
    @property
    def on_failure(self) -> int: ...
    @property
    def step_ids(self) -> tuple[str, ...]: ...
    def matches(self, event: object, subject: object = None) -> bool: ...

@disjoint_base
class ExecutionState:
    """One execution's mutable state; the dispatcher reads and writes it in place."""

    execution_id: str
    status: str
    pc: int
    seq: int
    context: dict[str, Any]
    subject: dict[str, Any]
    event: dict[str, Any]
    steps: int
    waiting: str | None
    attempt: int
    timer: str | None
    visits: dict[str, int]
    failures: list[dict[str, Any]]
    tenant: str
    effects: list[Effect]

    def __init__(
        self,
        execution_id: str,
        status: str = ...,
        pc: int = 0,
        seq: int = 0,
        context: dict[str, Any] | None = None,
        subject: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
        steps: int = 0,
        waiting: str | None = None,
        attempt: int = 0,
        timer: str | None = None,
        visits: dict[str, int] | None = None,
        failures: list[dict[str, Any]] | None = None,
        tenant: str = "",
        effects: list[Effect] | None = None,
    ) -> None: ...

def advance(program: Program, state: ExecutionState, kind: str, payload: Any, now_ms: int = 0) -> list[Transition]:
    """Apply one event to `state`; return the transitions made (effects go to state.effects)."""
