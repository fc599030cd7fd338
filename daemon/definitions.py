"""The worker's view of deployed workflows: compiled programs by tenant and trigger.

Every stored version is compiled once; a version that fails to compile is kept
as an entry with its error, so that triggers and executions that need it are
dead-lettered with that error instead of blocking anything else. A workflow
about a context type that is not registered is such a version.

New executions of a workflow run its latest version, unless a rollout
(ledger/rollouts.py) says otherwise: while one is in progress, each new
execution runs the candidate when its cohort (a stable hash of its id, 0 to
9,999) is below the candidate's share, the baseline otherwise; after a
rollback or an abort the baseline keeps them all, until a version newer than
both is deployed. A rollout with a shadow share also has the candidate run
beside the primary, its effects dropped, for the executions on the baseline
whose cohort is in the top `shadow_share` (daemon/rollout_shadow.py).

An engine rollout keeps the version and changes the dispatcher build: its
candidate is the same version compiled by the candidate engine (`on_engine`,
daemon/engines.py), an entry that names the engine (`engine`) and carries the
build that runs it (`build`). Enrolment runs a new execution on that build and
records the engine with it; every later message of the execution runs on
`on_engine` too. Every other entry has neither, and runs on the worker's own.

Each version is compiled with its tenant's limits from the config
(`tenant_limits`, daemon/tenant_limits.py): its enrolment rate and max_running
become the program's start gates, its action limits replace the steps'.
"""

import hashlib
import logging
from dataclasses import dataclass, replace
from types import SimpleNamespace

from hotpath import Program
from hotpath.context_types import CONTACT, ContextType
from hotpath.definition import DefinitionError, validate

from . import context_types as registered_context_types
from . import engines, logs
from .rollout_shadow import ShadowResults, bounded
from .tenant_limits import TenantLimits

log = logging.getLogger("ordo.definitions")


@dataclass(slots=True)
class WorkflowEntry:
    tenant: str
    workflow_id: str
    version: int
    trigger_event: str | None
    program: Program | None
    error: str | None
    #: step id -> action name, to label a failed step's dead letter.
    step_actions: dict | None = None
    #: The context type its executions are about: it enrols only triggers about that type.
    subject_type: str = CONTACT
    #: Set on the entry that stands for a workflow under rollout: which version a new execution runs.
    split: "Split | None" = None
    #: The candidate engine this entry runs on (an engine rollout's, `on_engine`); None: the worker's own.
    engine: str | None = None
    #: That engine's Program, ExecutionState and advance (daemon/engines.py); None with `engine`.
    build: SimpleNamespace | None = None
    #: It has a wait_for_event step: its executions keep where their trigger was stored
    #: (ExecutionRecord.trigger_stored), to refuse events stored before it.
    waits_for_events: bool = False

    @property
    def rollout_label(self) -> str:
        """The version as the rollout metrics label it: '3', or '3@pure' on a candidate engine."""
        return str(self.version) if self.engine is None else f"{self.version}@{self.engine}"


def cohort(execution_id: str) -> int:
    """The execution's place among new executions, 0 to 9,999: a stable hash of its id.

    Its version under a rollout depends on it and the stage alone, so every worker, before and after a
    restart, chooses the same one; and an execution on the candidate at one stage stays on it at the next.
    """
    return int.from_bytes(hashlib.blake2b(execution_id.encode(), digest_size=8).digest(), "big") % 10_000


@dataclass(frozen=True, slots=True)
class Split:
    """A workflow under rollout: the candidate's share of new executions (basis points) and both versions.

    The executions on the baseline whose cohort is in the top `shadow_share` also run the candidate in
    shadow (`shadow_program`, bounded as the baseline is), its results going to `shadow_results`.
    """

    rollout_id: int
    share: int
    baseline: WorkflowEntry
    candidate: WorkflowEntry
    shadow_share: int = 0
    shadow_program: Program | None = None
    shadow_results: ShadowResults | None = None

    def choose(self, execution_id: str) -> tuple[WorkflowEntry, bool]:
        """The version the new execution runs, and whether the candidate runs beside it in shadow."""
        place = cohort(execution_id)
        if place < self.share:
            return self.candidate, False
        return self.baseline, place >= 10_000 - self.shadow_share and self.shadow_program is not None


def compile_entry(
    definition: dict, context_types: dict[str, ContextType], tenant_limits: TenantLimits | None = None
) -> WorkflowEntry:
    tenant = str(definition.get("tenant"))
    enrolment_rate = None
    if tenant_limits is not None:
        definition = tenant_limits.applied(definition)
        enrolment_rate = tenant_limits.enrolment_rate(tenant)
    workflow_id = str(definition.get("id"))
    version = definition.get("version") if isinstance(definition.get("version"), int) else 0
    trigger = definition.get("trigger")
    event = trigger.get("event") if isinstance(trigger, dict) and isinstance(trigger.get("event"), str) else None
    subject_type = definition.get("subject", CONTACT)
    try:
        validate(definition, context_types)
        program = Program(definition, enrolment_rate)
    except (DefinitionError, ValueError, TypeError, KeyError) as exc:
        log.error(
            "workflow %s/%s v%s cannot be loaded: %s",
            tenant,
            workflow_id,
            version,
            exc,
            extra=logs.execution(
                None, tenant, workflow_id=workflow_id, version=version, **logs.failure("invalid_definition", exc)
            ),
        )
        return WorkflowEntry(
            tenant, workflow_id, version, event, None, f"invalid definition: {exc}", subject_type=str(subject_type)
        )
    step_actions = {s["id"]: s["action"] for s in definition["steps"] if s.get("type") == "action"}
    waits_for_events = any(s.get("type") == "wait_for_event" for s in definition["steps"])
    return WorkflowEntry(
        tenant,
        workflow_id,
        version,
        event,
        program,
        None,
        step_actions,
        program.subject_type,
        waits_for_events=waits_for_events,
    )


class WorkflowRegistry:
    """Compiled workflows: every version by key, the latest one by (tenant, trigger event).

    It also holds the registered context types (Ordo's own until the worker sets them): the
    definitions are checked against them, and enrolment validates a trigger's subject with them.
    """

    def __init__(self, context_types: dict[str, ContextType] | None = None):
        self.context_types = registered_context_types.default_registry() if context_types is None else context_types
        self._versions: dict = {}
        self._by_trigger: dict = {}
        self._tenants: set = set()
        self._awaited: frozenset = frozenset()
        self._latest: dict = {}
        #: (tenant, workflow_id) -> its most recent rollout (ledger.rollouts.latest_per_workflow).
        self._rollouts: dict = {}
        self._definitions: dict = {}
        self._shadow_programs: dict = {}
        #: (tenant, workflow_id, version, engine) -> that version compiled by that engine (`on_engine`).
        self._on_engine: dict = {}
        #: The config's per-tenant limits the versions are compiled with.
        self.tenant_limits = TenantLimits()
        #: Tenants whose versions the next `load` compiles again (their limits changed).
        self._recompile: set = set()
        #: What shadow runs found, for the rollout controller to write to the ledger.
        self.shadow_results = ShadowResults()

    def load(self, definitions: list[dict], tenants: set[str], rollouts=None) -> None:
        versions, latest = {}, {}
        for definition in definitions:
            key = (definition.get("tenant"), definition.get("id"), definition.get("version"))
            entry = None if key[0] in self._recompile else self._versions.get(key)
            entry = entry or compile_entry(definition, self.context_types, self.tenant_limits)
            versions[key] = entry
            current = latest.get(key[:2])
            if current is None or entry.version > current.version:
                latest[key[:2]] = entry
        self._versions, self._latest, self._tenants = versions, latest, set(tenants)
        if self._recompile:  # their candidate engines' compilations carry the old limits too
            self._on_engine = {k: e for k, e in self._on_engine.items() if k[0] not in self._recompile}
        self._recompile = set()
        self._definitions = {
            (d.get("tenant"), d.get("id"), d.get("version")): d for d in definitions if isinstance(d, dict)
        }
        if rollouts is not None:
            self._rollouts = {(r["tenant"], r["workflow_id"]): r for r in rollouts}
        self._route()
        self._awaited = frozenset(
            (definition.get("tenant"), step.get("event"))
            for definition in definitions
            if isinstance(definition.get("steps"), list)
            for step in definition["steps"]
            if isinstance(step, dict) and step.get("type") == "wait_for_event"
        )

    def set_tenant_limits(self, tenant_limits: TenantLimits) -> None:
        """New per-tenant limits (SIGHUP): the next `load` compiles again the versions of the tenants
        whose limits changed; until then the programs compiled before serve."""
        changed = {
            tenant
            for (tenant, _workflow_id, _version) in self._versions
            if tenant_limits.fingerprint(tenant) != self.tenant_limits.fingerprint(tenant)
        }
        self.tenant_limits = tenant_limits
        self._recompile |= changed

    def set_rollouts(self, rollouts) -> None:
        """Take the rollouts' current state (each workflow's most recent rollout) for new executions."""
        fresh = {(r["tenant"], r["workflow_id"]): r for r in rollouts}
        if {k: tuple(r) for k, r in fresh.items()} != {k: tuple(r) for k, r in self._rollouts.items()}:
            self._rollouts = fresh
            self._route()  # only on a change: the workers read the rollouts every second

    def _route(self) -> None:
        by_trigger: dict = {}
        for key, entry in self._latest.items():
            entry = self._serving(entry, self._rollouts.get(key))
            by_trigger.setdefault((entry.tenant, entry.trigger_event), []).append(entry)
        self._by_trigger = by_trigger

    def _serving(self, latest: WorkflowEntry, rollout) -> WorkflowEntry:
        """What new executions of the workflow whose latest version is `latest` run, given its last rollout."""
        if rollout is None or latest.version > max(rollout["from_version"], rollout["to_version"]):
            return latest  # no rollout, or a version deployed after it: the latest runs, as after any deploy
        baseline = self.version(latest.tenant, latest.workflow_id, rollout["from_version"])
        if rollout["engine"] is None:
            candidate = self.version(latest.tenant, latest.workflow_id, rollout["to_version"])
        else:
            candidate = self.on_engine(latest.tenant, latest.workflow_id, rollout["to_version"], rollout["engine"])
        if rollout["state"] == "completed" and candidate is not None:
            return candidate
        if baseline is None:
            return latest
        in_progress = rollout["state"] in ("running", "paused") and candidate is not None
        shadow_share = rollout["shadow_share"] if candidate is not None and candidate.program is not None else 0
        if not in_progress or (rollout["share"] <= 0 and shadow_share <= 0):
            return baseline
        split = Split(
            rollout["rollout_id"],
            rollout["share"],
            baseline,
            candidate,
            shadow_share,
            self._shadow_program(candidate, baseline) if shadow_share > 0 else None,
            self.shadow_results,
        )
        # A copy: the entry kept by version must not carry the split.
        return replace(baseline, split=split)

    def _shadow_program(self, candidate: WorkflowEntry, baseline: WorkflowEntry) -> Program | None:
        """The candidate's program for shadow runs, bounded by the baseline's max_steps; compiled once."""
        if baseline.program is None:
            return None
        max_steps = baseline.program.max_steps
        key = (candidate.tenant, candidate.workflow_id, candidate.version, max_steps, candidate.engine)
        if key not in self._shadow_programs:
            definition = self._definitions.get(key[:3])
            program_class = Program if candidate.build is None else candidate.build.Program
            try:
                program = None if definition is None else bounded(definition, max_steps, program_class)
            except Exception:  # a candidate (engine) that cannot compile it has no shadow
                program = None
            self._shadow_programs[key] = program
        return self._shadow_programs[key]

    def on_engine(self, tenant: str, workflow_id: str, version: int, engine: str) -> WorkflowEntry | None:
        """The version compiled by the engine called `engine`; compiled once. None: the version is not deployed.

        An engine that cannot be loaded here, or that fails to compile the version, gives an entry
        without a program whose error says so: its executions are dead-lettered with it (and can be
        retried once the engine is installed), the rest flows.
        """
        key = (tenant, workflow_id, version, engine)
        entry = self._on_engine.get(key)
        if entry is None:
            base = self.version(tenant, workflow_id, version)
            if base is None:
                return None
            entry = self._on_engine[key] = self._compile_on(base, engine)
        return entry

    def _compile_on(self, base: WorkflowEntry, name: str) -> WorkflowEntry:
        if base.program is None:
            return replace(base, engine=name)
        definition = self._definitions.get((base.tenant, base.workflow_id, base.version))
        try:
            build = engines.engine(name)
            # The same tenant limits as the worker's own build: its action limits and max_running are the
            # definition's; an enrolment rate is a gate only a build that takes one is given.
            definition = self.tenant_limits.applied(definition)
            rate = self.tenant_limits.enrolment_rate(base.tenant)
            program = build.Program(definition) if rate is None else build.Program(definition, rate)
        except engines.EngineError as exc:
            error = f"engine {name!r} cannot be loaded on this worker: {exc}"
        except Exception as exc:  # the candidate's own failure, reported as its entry's error
            error = f"engine {name!r} cannot compile {base.workflow_id} v{base.version}: {type(exc).__name__}: {exc}"
        else:
            return replace(base, program=program, engine=name, build=build, split=None)
        log.error(
            "%s",
            error,
            extra=logs.execution(None, base.tenant, workflow_id=base.workflow_id, version=base.version),
        )
        return replace(base, program=None, error=error, engine=name, split=None)

    def max_running(self, tenant: str, workflow_id: str) -> int | None:
        """The max_running new executions of the workflow start under (its latest version's, as compiled)."""
        entry = self._latest.get((tenant, workflow_id))
        return None if entry is None or entry.program is None else entry.program.max_running

    def rollouts(self) -> list:
        """Each workflow's most recent rollout, as last read from the ledger."""
        return list(self._rollouts.values())

    def knows_tenant(self, tenant: str) -> bool:
        return tenant in self._tenants

    def awaited(self, tenant: str, event_type: str) -> bool:
        """Whether any version of the tenant's workflows has a `wait_for_event` for this event type.

        Only then can an execution be waiting for such an event, so only then
        does a trigger need routing (a query per fetched batch otherwise).
        """
        return (tenant, event_type) in self._awaited

    def candidates(self, tenant: str, event_type: str) -> list[WorkflowEntry]:
        """The version new executions run of each of the tenant's workflows triggered by this event type.

        An entry with a `split` stands for a workflow under rollout: `split.choose(execution_id)` is the version.
        """
        return self._by_trigger.get((tenant, event_type), ())

    def version(self, tenant: str, workflow_id: str, version: int) -> WorkflowEntry | None:
        return self._versions.get((tenant, workflow_id, version))
