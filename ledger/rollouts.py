"""Progressive rollouts in the ledger: start, change and read them; the numbers they are judged on.

A rollout moves a workflow's new executions from a baseline version to a
candidate version in stages, or, an engine rollout, from the worker's own
dispatcher build to a candidate engine on the same version (`engine`, see
daemon/engines.py); the candidate's share is in basis points (100 = 1%).
Every change of a rollout (started, advanced, paused, resumed, completed,
rolled back, aborted) is a row of `ordo.rollout_transitions` with
who made it, why and the values it was decided on, written in the same
transaction as the change, so a rollout's history can always be read back.
Each change NOTIFYs `ROLLOUT_CHANNEL`: the workers pick the new share up at
once (and poll besides, should a notification be lost).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from asyncpg import Record

from hotpath.context_types import ContextType
from hotpath.definition import DefinitionError, validate
from ledger import workflows
from ledger.connection import Queryable, Transactional

#: Workers LISTEN on this channel to re-read the rollouts after a change.
ROLLOUT_CHANNEL = "ordo_rollouts"
#: The whole of new executions, in basis points.
ALL = 10_000
IN_PROGRESS = ("running", "paused")
#: The version under which an engine rollout counts its candidate's executions (ordo.rollout_counts):
#: both its sides run one version, and no workflow has a version 0 (migration 017).
CANDIDATE_ENGINE = 0
#: Any fixed number: the advisory lock of the worker that judges the rollouts this round.
_CONTROLLER_LOCK = 0x726F6C6C


class RolloutRefused(ValueError):
    """A rollout that cannot be started or changed; nothing was changed. The message says why."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How much worse than the baseline the candidate may be before it is rolled back (None: not checked)."""

    max_failure_rate: float | None = 0.01
    max_p99_ms: float | None = None
    max_divergence_rate: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What `ordo rollout start` asks for."""

    workflow_id: str
    to_version: int | None
    tenant: str | None = None
    from_version: int | None = None
    #: The candidate's share at each stage, in basis points, ascending, the last one ALL.
    stages: tuple[int, ...] = (100, 500, 2_500, 5_000, ALL)
    min_dwell_s: float = 60.0
    min_sample: int = 100
    thresholds: Thresholds = Thresholds()
    #: The share of new executions on the baseline that the candidate runs beside in shadow (basis points).
    shadow_share: int = 0
    #: A definition to deploy as the candidate, in the same transaction (instead of to_version).
    definition: dict[str, Any] | None = None
    #: An engine rollout: the candidate engine's name, on the version new executions run now.
    engine: str | None = None


# -- starting and changing --------------------------------------------------------


async def start(
    conn: Transactional,
    plan: Plan,
    actor: str,
    context_types: Mapping[str, ContextType] | None = None,
    engine_check: Callable[[dict[str, Any]], None] | None = None,
) -> Record:
    """Start a rollout; its row. Raises RolloutRefused, having changed nothing, when it cannot be one.

    Refused: stages that are not ascending shares ending at 100%, a workflow or version that is not
    deployed, a candidate that fails validation (against the registered `context_types`) or is
    triggered by another event or about another subject type than its baseline, and a workflow
    that has a rollout in progress already. An engine rollout (`plan.engine`) runs the version new
    executions run now on the candidate engine: it takes no version or definition of its own (one
    change at a time), and is refused when `engine_check(definition)` raises RolloutRefused (the
    daemon loads the engine and compiles the version with it).
    """
    _check_stages(plan.stages, plan.shadow_share)
    if plan.engine is not None and (
        plan.to_version is not None or plan.definition is not None or plan.from_version is not None
    ):
        raise RolloutRefused(
            "an engine rollout runs the version new executions run now on the candidate engine: "
            "roll out one change at a time (the version first, then the engine), without --to-version, "
            "--definition or --from-version"
        )
    if plan.min_sample < 1 or plan.min_dwell_s < 0:
        raise RolloutRefused("the minimum sample must be at least 1 and the minimum dwell not negative")
    async with conn.transaction():
        tenant = await _tenant_of(conn, plan.workflow_id, plan.tenant)
        # The deploys' lock: a version number cannot race a rollout of the same workflow.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{tenant}/{plan.workflow_id}")
        busy = await conn.fetchval(
            "SELECT rollout_id FROM ordo.rollouts WHERE tenant = $1 AND workflow_id = $2 AND state = ANY($3::text[])",
            tenant,
            plan.workflow_id,
            list(IN_PROGRESS),
        )
        if busy is not None:
            raise RolloutRefused(
                f"workflow {tenant}/{plan.workflow_id} has rollout {busy} in progress already; "
                "abort it or let it finish first"
            )
        to_version = plan.to_version
        if plan.definition is not None:
            if plan.definition.get("id") != plan.workflow_id or plan.definition.get("tenant") != tenant:
                raise RolloutRefused(f"the candidate definition is not workflow {tenant}/{plan.workflow_id}")
            try:
                to_version, _ = await workflows.deploy(conn, plan.definition, context_types)
            except DefinitionError as exc:
                raise RolloutRefused(f"the candidate fails validation: {exc}") from None
        if to_version is None and plan.engine is None:
            raise RolloutRefused("a rollout needs a candidate: a version, a definition or an engine")
        versions = {
            r["version"]: orjson.loads(r["definition"])
            for r in await conn.fetch(
                "SELECT version, definition FROM ordo.workflows WHERE tenant = $1 AND workflow_id = $2",
                tenant,
                plan.workflow_id,
            )
        }
        from_version = plan.from_version
        if from_version is None:
            from_version = await _serving_version(conn, tenant, plan.workflow_id, to_version, set(versions))
        if plan.engine is not None:
            to_version = from_version
            if engine_check is not None:
                engine_check(versions[to_version])
        for role, version in (("candidate", to_version), ("baseline", from_version)):
            if version not in versions:
                deployed = ", ".join(str(v) for v in sorted(versions))
                raise RolloutRefused(
                    f"version {version} of workflow {tenant}/{plan.workflow_id} (the {role}) is not deployed "
                    f"(deployed: {deployed})"
                )
        if from_version == to_version and plan.engine is None:
            raise RolloutRefused(f"the candidate and the baseline are both version {to_version}")
        candidate, baseline = versions[to_version], versions[from_version]
        try:
            validate(candidate, context_types)
        except DefinitionError as exc:
            raise RolloutRefused(f"the candidate, version {to_version}, fails validation: {exc}") from None
        if candidate.get("trigger", {}).get("event") != baseline.get("trigger", {}).get("event") or candidate.get(
            "subject", "contact"
        ) != baseline.get("subject", "contact"):
            raise RolloutRefused(
                f"version {to_version} is triggered by another event or about another subject type than "
                f"version {from_version}: a rollout splits the same executions between them"
            )
        thresholds = plan.thresholds
        row = await conn.fetchrow(
            """
            INSERT INTO ordo.rollouts (tenant, workflow_id, from_version, to_version, stages, share, min_dwell_s,
                min_sample, max_failure_rate, max_p99_ms, max_divergence_rate, shadow_share, engine, state)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'running')
            RETURNING *
            """,
            tenant,
            plan.workflow_id,
            from_version,
            to_version,
            list(plan.stages),
            plan.stages[0],
            plan.min_dwell_s,
            plan.min_sample,
            thresholds.max_failure_rate,
            thresholds.max_p99_ms,
            thresholds.max_divergence_rate,
            plan.shadow_share,
            plan.engine,
        )
        assert row is not None
        await _log(conn, row["rollout_id"], "started", 0, plan.stages[0], actor, "started", None)
    return row


async def operate(
    conn: Transactional, workflow_id: str, tenant: str | None, action: str, actor: str, reason: str
) -> Record:
    """An operator's pause, resume or abort of the workflow's rollout in progress; the rollout's row after it.

    Pausing holds the candidate's share (the controller still rolls back a candidate that crosses a
    threshold); aborting sends every new execution to the baseline again. Raises RolloutRefused when
    there is no rollout in progress or it is not in a state the action applies to.
    """
    async with conn.transaction():
        tenant = await _tenant_of(conn, workflow_id, tenant)
        row = await conn.fetchrow(
            "SELECT * FROM ordo.rollouts WHERE tenant = $1 AND workflow_id = $2 AND state = ANY($3::text[]) FOR UPDATE",
            tenant,
            workflow_id,
            list(IN_PROGRESS),
        )
        if row is None:
            raise RolloutRefused(f"workflow {tenant}/{workflow_id} has no rollout in progress")
        wanted = {"pause": ("running", "paused"), "resume": ("paused", "running"), "abort": (None, "aborted")}
        if action not in wanted:
            raise RolloutRefused(f"unknown rollout action {action!r}")
        needs, state = wanted[action]
        if needs is not None and row["state"] != needs:
            raise RolloutRefused(f"rollout {row['rollout_id']} is {row['state']}, not {needs}")
        share = 0 if state == "aborted" else row["share"]
        changed = await conn.fetchrow(
            "UPDATE ordo.rollouts SET state = $2, share = $3 WHERE rollout_id = $1 RETURNING *",
            row["rollout_id"],
            state,
            share,
        )
        assert changed is not None
        logged = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[action]
        await _log(conn, row["rollout_id"], logged, row["share"], share, actor, reason, None)
    return changed


async def move(
    conn: Queryable,
    rollout: Record,
    action: str,
    reason: str,
    detail: dict[str, Any] | None,
    actor: str = "controller",
) -> None:
    """The controller's advance, completion, rollback or abort of a rollout it holds locked (`judged_for_update`).

    Advanced: the next stage's share, with a new dwell. Completed: every new execution on the candidate.
    Rolled back or aborted: none.
    """
    stage, state, share = rollout["stage"], rollout["state"], rollout["share"]
    if action == "advanced":
        stage += 1
        share = rollout["stages"][stage]
        if share == ALL:
            action, state = "completed", "completed"
    elif action in ("rolled_back", "aborted"):
        state, share = action, 0
    else:
        raise ValueError(f"unknown move {action!r}")
    # A rollback keeps the window of the stage it judged, so that `ordo rollout status` shows those numbers.
    await conn.execute(
        "UPDATE ordo.rollouts SET stage = $2, state = $3, share = $4, "
        "stage_started_at = CASE WHEN $3 = 'rolled_back' THEN stage_started_at ELSE now() END WHERE rollout_id = $1",
        rollout["rollout_id"],
        stage,
        state,
        share,
    )
    await _log(conn, rollout["rollout_id"], action, rollout["share"], share, actor, reason, detail)


async def _log(
    conn: Queryable,
    rollout_id: int,
    action: str,
    share_before: int,
    share_after: int,
    actor: str,
    reason: str,
    detail: dict[str, Any] | None,
) -> None:
    await conn.execute(
        """
        INSERT INTO ordo.rollout_transitions (rollout_id, seq, action, share_before, share_after, actor, reason, detail)
        SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, $4, $5, $6, $7::jsonb
        FROM ordo.rollout_transitions WHERE rollout_id = $1
        """,
        rollout_id,
        action,
        share_before,
        share_after,
        actor,
        reason,
        None if detail is None else orjson.dumps(detail).decode(),
    )
    await conn.execute(f"NOTIFY {ROLLOUT_CHANNEL}")


def _check_stages(stages: Sequence[int], shadow_share: int) -> None:
    if not 0 <= shadow_share <= ALL:
        raise RolloutRefused("the shadow share must be from 0% to 100%")
    if stages and stages[0] == 0 and shadow_share == 0:
        raise RolloutRefused("a first stage of 0% needs a shadow share: with none, nothing would be judged")
    if not stages or any(not 0 < s <= ALL for s in stages[1:]) or not 0 <= stages[0] <= ALL:
        raise RolloutRefused("stages must be shares above 0% (the first may be 0% with a shadow) and at most 100%")
    if any(a >= b for a, b in zip(stages, stages[1:], strict=False)):
        raise RolloutRefused("stages must be ascending")
    if stages[-1] != ALL:
        raise RolloutRefused("the last stage must be 100%")


async def _tenant_of(conn: Queryable, workflow_id: str, tenant: str | None) -> str:
    """The tenant of the deployed workflow `workflow_id`; RolloutRefused when there is none or several."""
    rows = await conn.fetch(
        "SELECT DISTINCT tenant FROM ordo.workflows WHERE workflow_id = $1 AND ($2::text IS NULL OR tenant = $2)",
        workflow_id,
        tenant,
    )
    if not rows:
        where = f" of tenant {tenant}" if tenant else ""
        raise RolloutRefused(f"no workflow {workflow_id!r}{where} is deployed")
    if len(rows) > 1:
        tenants = ", ".join(sorted(r["tenant"] for r in rows))
        raise RolloutRefused(f"workflow {workflow_id!r} is deployed by several tenants ({tenants}): name one")
    tenant_of: str = rows[0]["tenant"]
    return tenant_of


async def _serving_version(
    conn: Queryable, tenant: str, workflow_id: str, to_version: int | None, deployed: set[int]
) -> int:
    """The version new executions run now, as the baseline of a rollout to `to_version` (None: an engine's).

    The outcome of the workflow's last rollout when no version was deployed after its two; else the
    newest version other than the candidate (before the candidate was deployed, that one ran).
    """
    last = await conn.fetchrow(
        "SELECT from_version, to_version, state FROM ordo.rollouts WHERE tenant = $1 AND workflow_id = $2 "
        "ORDER BY rollout_id DESC LIMIT 1",
        tenant,
        workflow_id,
    )
    others = sorted(v for v in deployed if v != to_version)
    if last is not None:
        outcome = last["to_version"] if last["state"] == "completed" else last["from_version"]
        newest = max(last["from_version"], last["to_version"])
        if outcome != to_version and not any(v > newest and v != to_version for v in deployed):
            version: int = outcome
            return version
    if not others:
        raise RolloutRefused(f"workflow {tenant}/{workflow_id} has no other version to roll out from")
    return others[-1]


# -- what the workers read -------------------------------------------------------


async def latest_per_workflow(conn: Queryable) -> list[Record]:
    """Each workflow's most recent rollout: rollout_id, tenant, workflow_id, from_version, to_version, state, share,
    shadow_share, stage_started_at, engine."""
    return await conn.fetch(
        """
        SELECT DISTINCT ON (tenant, workflow_id)
               rollout_id, tenant, workflow_id, from_version, to_version, state, share, shadow_share, stage_started_at,
               engine
        FROM ordo.rollouts ORDER BY tenant, workflow_id, rollout_id DESC
        """
    )


# -- what the controller judges on ------------------------------------------------


async def lead(conn: Queryable) -> bool:
    """Whether this transaction is the one that judges the rollouts now (one worker at a time)."""
    led: bool = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _CONTROLLER_LOCK)
    return led


async def judged_for_update(conn: Queryable) -> list[Record]:
    """The rollouts in progress, locked for this transaction, with how long their stage has run (`dwelt_s`)."""
    return await conn.fetch(
        """
        SELECT *, extract(epoch FROM now() - stage_started_at)::float8 AS dwelt_s
        FROM ordo.rollouts WHERE state = ANY($1::text[]) ORDER BY rollout_id FOR UPDATE
        """,
        list(IN_PROGRESS),
    )


async def newest_version(conn: Queryable, tenant: str, workflow_id: str) -> int | None:
    """The workflow's newest deployed version."""
    version: int | None = await conn.fetchval(
        "SELECT max(version) FROM ordo.workflows WHERE tenant = $1 AND workflow_id = $2", tenant, workflow_id
    )
    return version


def sides(rollout: Mapping[str, Any]) -> tuple[int, int]:
    """The keys of the baseline's and the candidate's numbers (stage_counts, step_p99_ms): their versions,
    or for an engine rollout its version and CANDIDATE_ENGINE."""
    if rollout.get("engine") is None:
        return rollout["from_version"], rollout["to_version"]
    return rollout["from_version"], CANDIDATE_ENGINE


def side_label(rollout: Mapping[str, Any], candidate: bool) -> str:
    """How a side of the rollout is named to an operator: 'v3', or 'v3@pure' for a candidate engine."""
    if not candidate:
        return f"v{rollout['from_version']}"
    engine = rollout.get("engine")
    return f"v{rollout['to_version']}" + ("" if engine is None else f"@{engine}")


async def stage_counts(conn: Queryable, rollout_id: int, since: datetime) -> dict[int, Record]:
    """Per version: the stage's executions started, completed and failed, as the workers counted them.

    The stage is the one that began at `since`; its executions are those created since then
    (migration 018, `add_stage_counts`).
    """
    rows = await conn.fetch(
        """
        SELECT version, started, completed, failed FROM ordo.rollout_counts
        WHERE rollout_id = $1 AND stage_started_at = $2
        """,
        rollout_id,
        since,
    )
    return {r["version"]: r for r in rows}


async def add_stage_counts(conn: Queryable, counts: Sequence[tuple[int, datetime, int, int, int, int]]) -> None:
    """Add a worker's counts: (rollout_id, stage_started_at, version, started, completed, failed) each.

    One statement, its rows in key order, so that two workers adding at once never deadlock.
    """
    rows = sorted(counts)
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO ordo.rollout_counts AS c (rollout_id, stage_started_at, version, started, completed, failed)
        SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[])
        ON CONFLICT (rollout_id, stage_started_at, version) DO UPDATE
        SET started = c.started + EXCLUDED.started, completed = c.completed + EXCLUDED.completed,
            failed = c.failed + EXCLUDED.failed
        """,
        *(list(column) for column in zip(*rows, strict=True)),
    )


async def step_p99_ms(
    conn: Queryable, tenant: str, workflow_id: str, versions: Sequence[int], since: datetime
) -> dict[int, float]:
    """Per version: the p99 of its action steps' latency (request committed -> result committed), in ms.

    Over the executions started since `since`; a version without a finished action step is absent.
    Executions on a candidate engine count as CANDIDATE_ENGINE (see `sides`).
    """
    rows = await conn.fetch(
        """
        SELECT CASE WHEN e.engine IS NULL THEN e.workflow_version ELSE 0 END AS version,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM d.at - r.at) * 1000) AS p99
        FROM ordo.executions e
        JOIN ordo.transitions r ON r.execution_id = e.execution_id AND r.kind = 'action_requested'
        JOIN ordo.transitions d ON d.execution_id = e.execution_id AND d.step_id = r.step_id AND d.seq > r.seq
             AND d.kind IN ('action_completed', 'action_failed')
             AND (d.detail ->> 'attempt') = (r.detail ->> 'attempt')
        WHERE e.tenant = $1 AND e.workflow_id = $2 AND e.workflow_version = ANY($3::int[]) AND e.created_at >= $4
        GROUP BY 1
        """,
        tenant,
        workflow_id,
        list(versions),
        since,
    )
    return {r["version"]: float(r["p99"]) for r in rows if r["p99"] is not None}


async def failed_executions(
    conn: Queryable,
    tenant: str,
    workflow_id: str,
    version: int,
    since: datetime,
    limit: int = 100,
    engine: str | None = None,
) -> list[str]:
    """Ids of the version's executions (on `engine`, or the worker's own build) started since `since` that
    failed, oldest first (at most `limit`)."""
    rows = await conn.fetch(
        """
        SELECT execution_id::text FROM ordo.executions
        WHERE tenant = $1 AND workflow_id = $2 AND workflow_version = $3 AND created_at >= $4 AND status = 'failed'
              AND engine IS NOT DISTINCT FROM $6
        ORDER BY created_at LIMIT $5
        """,
        tenant,
        workflow_id,
        version,
        since,
        limit,
        engine,
    )
    return [r["execution_id"] for r in rows]


# On the dispatch errors' own index (migration 022): a rollback reads its workflow's, not the table.
_DISPATCH_ERRORED = """
SELECT execution_id::text FROM ordo.dead_letters
WHERE reason = 'dispatch_error' AND tenant = $1 AND workflow_id = $2 AND at >= $3 AND execution_id IS NOT NULL
GROUP BY execution_id ORDER BY min(id) LIMIT $4
"""


async def dispatch_errored(
    conn: Queryable, tenant: str, workflow_id: str, since: datetime, limit: int
) -> list[tuple[str, Record | None]]:
    """The first `limit` executions of the workflow its dispatcher raised on since `since` (each has a
    `dispatch_error` dead letter), first raised on first, each with its row (workflow_version, engine,
    created_at), or None when it raised on enrolment and was never recorded.

    Of both sides: the caller tells them apart. Two statements rather than a join, as dead_letters is
    not distributed by execution (docs/citus.md).
    """
    letters = await conn.fetch(_DISPATCH_ERRORED, tenant, workflow_id, since, limit)
    ids = [r["execution_id"] for r in letters]
    rows = await conn.fetch(
        "SELECT execution_id::text, workflow_version, engine, created_at FROM ordo.executions "
        "WHERE execution_id = ANY($1::uuid[])",
        ids,
    )
    found = {r["execution_id"]: r for r in rows}
    return [(execution_id, found.get(execution_id)) for execution_id in ids]


async def engine_of(conn: Queryable, execution_id: str) -> str | None:
    """The engine an execution was enrolled on (an engine rollout's candidate), or None: the worker's own."""
    engine: str | None = await conn.fetchval(
        "SELECT engine FROM ordo.executions WHERE execution_id = $1::uuid", execution_id
    )
    return engine


# -- shadow runs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowRun:
    """How the candidate fared beside one primary execution (see migration 010's ordo.shadow_runs)."""

    rollout_id: int
    execution_id: str
    outcome: str
    compared: int = 0
    seq: int | None = None
    step_id: str | None = None
    primary_decision: dict[str, Any] | None = None
    candidate_decision: dict[str, Any] | None = None
    error: str | None = None


def _json_or_none(value: dict[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


async def record_shadow_runs(conn: Queryable, runs: Sequence[ShadowRun]) -> None:
    """Store shadow runs; one already stored (a redelivered trigger ran it twice) is kept as it is."""
    if not runs:
        return
    await conn.execute(
        """
        INSERT INTO ordo.shadow_runs (rollout_id, execution_id, outcome, compared, seq, step_id, primary_decision,
            candidate_decision, error)
        SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::int[], $6::text[], $7::jsonb[],
            $8::jsonb[], $9::text[])
        ON CONFLICT DO NOTHING
        """,
        [r.rollout_id for r in runs],
        [r.execution_id for r in runs],
        [r.outcome for r in runs],
        [r.compared for r in runs],
        [r.seq for r in runs],
        [r.step_id for r in runs],
        [_json_or_none(r.primary_decision) for r in runs],
        [_json_or_none(r.candidate_decision) for r in runs],
        [r.error for r in runs],
    )


async def pending_shadow_runs(conn: Queryable, rollout_id: int, limit: int) -> list[str]:
    """Executions whose shadow run waits for them to end, and that have ended (at most `limit`)."""
    rows = await conn.fetch(
        """
        SELECT s.execution_id::text FROM ordo.shadow_runs s
        JOIN ordo.executions e ON e.execution_id = s.execution_id
        WHERE s.rollout_id = $1 AND s.outcome = 'pending' AND e.status IN ('completed', 'failed', 'cancelled')
        ORDER BY s.at LIMIT $2
        """,
        rollout_id,
        limit,
    )
    return [r["execution_id"] for r in rows]


async def settle_shadow_run(conn: Queryable, run: ShadowRun) -> None:
    """The outcome of a pending shadow run, once the primary's whole history went through the candidate."""
    await conn.execute(
        """
        UPDATE ordo.shadow_runs SET outcome = $3, compared = $4, seq = $5, step_id = $6, primary_decision = $7::jsonb,
            candidate_decision = $8::jsonb, error = $9
        WHERE rollout_id = $1 AND execution_id = $2::uuid AND outcome = 'pending'
        """,
        run.rollout_id,
        run.execution_id,
        run.outcome,
        run.compared,
        run.seq,
        run.step_id,
        _json_or_none(run.primary_decision),
        _json_or_none(run.candidate_decision),
        run.error,
    )


async def shadow_counts(conn: Queryable, rollout_id: int, since: datetime) -> dict[str, int]:
    """Shadow runs of executions started since `since`, by outcome (pending, identical, diverged, error)."""
    rows = await conn.fetch(
        "SELECT outcome, count(*) AS n FROM ordo.shadow_runs WHERE rollout_id = $1 AND at >= $2 GROUP BY outcome",
        rollout_id,
        since,
    )
    return {r["outcome"]: r["n"] for r in rows}


async def shadow_divergences(conn: Queryable, rollout_id: int, limit: int = 20) -> list[Record]:
    """The rollout's shadow runs that diverged or failed, oldest first: where and how they differed."""
    return await conn.fetch(
        """
        SELECT execution_id::text, outcome, seq, step_id, primary_decision::text, candidate_decision::text, error
        FROM ordo.shadow_runs WHERE rollout_id = $1 AND outcome IN ('diverged', 'error') ORDER BY at LIMIT $2
        """,
        rollout_id,
        limit,
    )


# -- what `ordo rollout status` reads ------------------------------------------------


async def latest(conn: Queryable, workflow_id: str | None = None, tenant: str | None = None) -> list[Record]:
    """The most recent rollout of each workflow (of `workflow_id` / `tenant` only when given)."""
    return await conn.fetch(
        """
        SELECT DISTINCT ON (tenant, workflow_id) *, extract(epoch FROM now() - stage_started_at)::float8 AS dwelt_s
        FROM ordo.rollouts
        WHERE ($1::text IS NULL OR workflow_id = $1) AND ($2::text IS NULL OR tenant = $2)
        ORDER BY tenant, workflow_id, rollout_id DESC
        """,
        workflow_id,
        tenant,
    )


async def transitions(conn: Queryable, rollout_id: int) -> list[Record]:
    """The rollout's logged changes in order: seq, at, action, share_before, share_after, actor, reason, detail."""
    return await conn.fetch(
        "SELECT seq, at, action, share_before, share_after, actor, reason, detail::text AS detail "
        "FROM ordo.rollout_transitions WHERE rollout_id = $1 ORDER BY seq",
        rollout_id,
    )
