"""`ordo rollout start|status|pause|resume|abort`: what the operator types, read and shown.

Every refusal is a `RolloutRefused` with one line saying why; the command
prints it as `ordo: ...` and exits 1, having changed nothing. A candidate
engine (`--engine`) is loaded here first (`engine_check`): one that cannot be
imported, lacks the engine API or fails to compile the version is refused.
"""

import getpass
import socket
from collections.abc import Callable
from typing import Any

import orjson

from hotpath.durations import parse_duration
from ledger import rollouts
from ledger.rollouts import Plan, RolloutRefused, Thresholds

from .engines import EngineError, engine


def actor() -> str:
    """Who made a change from the command line, as logged with it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def parse_stages(text: str) -> tuple[int, ...]:
    """'1,5,25,50,100' (percent) -> the shares in basis points."""
    try:
        shares = tuple(round(float(part) * 100) for part in text.split(","))
    except ValueError:
        raise RolloutRefused(
            f"--stages {text!r}: expected percentages separated by commas, e.g. 1,5,25,50,100"
        ) from None
    return shares


def parse_share(option: str, text: str) -> int:
    """'10' (percent) -> basis points."""
    try:
        return round(float(text) * 100)
    except ValueError:
        raise RolloutRefused(f"{option} {text!r}: expected a percentage, e.g. 10") from None


def parse_dwell(text: str) -> float:
    """'60s', '5m', '1h' or a number of seconds -> seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text) / 1000
    except ValueError as exc:
        raise RolloutRefused(f"--min-dwell {text!r}: {exc}") from None


def parse_limit(option: str, text: str | None) -> float | None:
    """A threshold: a number not below 0, or 'off' (None: not checked)."""
    if text is None or text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise RolloutRefused(f"{option} {text!r}: expected a number not below 0, or 'off'")
    return value


def plan_of(args, definition: dict[str, Any] | None) -> Plan:
    """The rollout `ordo rollout start` asks for (ledger.rollouts.start refuses an engine with a version)."""
    if args.engine is None and (args.to_version is None) == (definition is None):
        raise RolloutRefused("rollout start takes --to-version N, --definition FILE or --engine NAME (one of them)")
    return Plan(
        workflow_id=args.workflow,
        to_version=args.to_version,
        tenant=args.tenant,
        from_version=args.from_version,
        stages=parse_stages(args.stages),
        min_dwell_s=parse_dwell(args.min_dwell),
        min_sample=args.min_sample,
        thresholds=Thresholds(
            max_failure_rate=parse_limit("--max-failure-rate", args.max_failure_rate),
            max_p99_ms=parse_limit("--max-p99-ms", args.max_p99_ms),
            max_divergence_rate=parse_limit("--max-divergence-rate", args.max_divergence_rate),
        ),
        shadow_share=parse_share("--shadow", args.shadow),
        definition=definition,
        engine=args.engine,
    )


def engine_check(name: str) -> Callable[[dict[str, Any]], None]:
    """Load the candidate engine now (RolloutRefused when it cannot be); the check that it compiles a version."""
    try:
        build = engine(name)
    except EngineError as exc:
        raise RolloutRefused(f"the candidate engine cannot be used: {exc}") from None

    def compiles(definition: dict[str, Any]) -> None:
        try:
            build.Program(definition)
        except Exception as exc:  # the candidate's own failure, reported as the refusal
            raise RolloutRefused(
                f"engine {name!r} cannot compile version {definition.get('version')}: {type(exc).__name__}: {exc}"
            ) from None

    return compiles


def percent(share: int) -> str:
    return f"{share / 100:g}%"


def describe(row) -> str:
    """One line: the rollout, its versions, state and share."""
    stages = " -> ".join(percent(s) for s in row["stages"])
    shadow = f", shadow {percent(row['shadow_share'])}" if row["shadow_share"] else ""
    return (
        f"rollout {row['rollout_id']}  {row['tenant']}/{row['workflow_id']}  {rollouts.side_label(row, False)} -> "
        f"{rollouts.side_label(row, True)}  {row['state']}  candidate share {percent(row['share'])}{shadow}  "
        f"(stages {stages})"
    )


async def report(conn, row) -> dict[str, Any]:
    """One rollout as `ordo rollout status --json` shows it (and the console draws it): the row,
    its stage's numbers per version, the shadow runs' outcomes and divergences, its logged changes.

    `stage` is keyed by version ('2'), an engine rollout's candidate by its label ('2@pure')."""
    versions = (row["from_version"], row["to_version"])
    since = row["stage_started_at"]
    counts = await rollouts.stage_counts(conn, row["rollout_id"], since)
    p99 = await rollouts.step_p99_ms(conn, row["tenant"], row["workflow_id"], versions, since)
    keys = dict(zip(rollouts.sides(row), (stage_key(row, False), stage_key(row, True)), strict=True))
    return {
        "rollout": {
            k: (v if isinstance(v, (int, float, str, list, type(None))) else str(v)) for k, v in dict(row).items()
        },
        "stage": {
            label: dict(counts[k]) | {"p99_step_ms": p99.get(k)} if k in counts else {"started": 0}
            for k, label in keys.items()
        },
        "shadow": await rollouts.shadow_counts(conn, row["rollout_id"], since),
        "divergences": [
            {
                "execution_id": d["execution_id"],
                "outcome": d["outcome"],
                "seq": d["seq"],
                "step": d["step_id"],
                "primary": orjson.loads(d["primary_decision"]) if d["primary_decision"] else None,
                "candidate": orjson.loads(d["candidate_decision"]) if d["candidate_decision"] else None,
                "error": d["error"],
            }
            for d in await rollouts.shadow_divergences(conn, row["rollout_id"], 10)
        ],
        "transitions": [
            {
                "seq": t["seq"],
                "at": t["at"].isoformat(),
                "action": t["action"],
                "share_before": t["share_before"],
                "share_after": t["share_after"],
                "actor": t["actor"],
                "reason": t["reason"],
                "detail": orjson.loads(t["detail"]) if t["detail"] else None,
            }
            for t in await rollouts.transitions(conn, row["rollout_id"])
        ],
    }


async def status(conn, workflow_id: str | None, tenant: str | None, as_json: bool) -> tuple[int, str]:
    """(exit code, text) of `ordo rollout status`: each rollout, its stage's numbers and its logged changes."""
    found = await rollouts.latest(conn, workflow_id, tenant)
    if not found:
        what = f" of workflow {workflow_id}" if workflow_id else ""
        return 1, f"ordo: no rollout{what}"
    docs = [await report(conn, row) for row in found]
    if as_json:
        return 0, orjson.dumps(docs, option=orjson.OPT_INDENT_2).decode()
    lines = []
    for row, doc in zip(found, docs, strict=True):
        lines.append(describe(row))
        dwelt = f" for {row['dwelt_s']:.0f} s" if row["state"] in rollouts.IN_PROGRESS else ""
        lines.append(
            f"  stage {row['stage'] + 1} of {len(row['stages'])}{dwelt} "
            f"(min dwell {row['min_dwell_s']:g} s, min sample {row['min_sample']})"
        )
        lines.append(
            f"  thresholds over the baseline: failure rate {_or_off(row['max_failure_rate'], 100, '%')}, "
            f"p99 step latency {_or_off(row['max_p99_ms'], 1, ' ms')}; shadow divergence rate "
            f"{_or_off(row['max_divergence_rate'], 100, '%', 'at most ')}"
        )
        for candidate in (False, True):
            stage = doc["stage"][stage_key(row, candidate)]
            role = "candidate" if candidate else "baseline "
            p99 = stage.get("p99_step_ms")
            lines.append(
                f"  {role} {rollouts.side_label(row, candidate)}: started {stage['started']}, "
                f"completed {stage.get('completed', 0)}, "
                f"failed {stage.get('failed', 0)}" + (f", p99 step {p99:.1f} ms" if p99 is not None else "")
            )
        if row["shadow_share"]:
            shadow = doc["shadow"]
            lines.append(
                "  shadow runs this stage: "
                + ", ".join(f"{shadow.get(k, 0)} {k}" for k in ("identical", "diverged", "error", "pending"))
            )
        for d in doc["divergences"]:
            if d["outcome"] == "error":
                lines.append(f"  shadow error  {d['execution_id']}: {d['error']}")
            else:
                lines.append(
                    f"  diverged  {d['execution_id']} at seq {d['seq']} ({d['step'] or '-'}): primary "
                    f"{_decision(d['primary'])}, candidate {_decision(d['candidate'])}"
                )
        for t in doc["transitions"]:
            lines.append(
                f"  {t['seq']:>3}  {t['at']}  {t['action']:<11} {percent(t['share_before'])} -> "
                f"{percent(t['share_after'])}  by {t['actor']}: {t['reason']}"
            )
            detail = t["detail"] or {}
            failed = detail.get("failed_executions")
            if failed:
                raised = set(detail.get("dispatch_error_executions") or ())
                shown = [f"{i} (dispatch_error)" if i in raised else i for i in failed[:10]]
                lines.append(f"       failed executions: {', '.join(shown)}{' ...' if len(failed) > 10 else ''}")
                if raised:
                    lines.append(
                        "       dispatch_error: the dispatcher raised on it, its messages are dead letters "
                        "(ordo dlq list --reason dispatch_error)"
                    )
    return 0, "\n".join(lines)


def stage_key(row, candidate: bool) -> str:
    """The key of a side's numbers in `report`'s `stage`: its version, or 'N@ENGINE' for a candidate engine."""
    return rollouts.side_label(row, candidate).removeprefix("v")


def _decision(decision: dict | None) -> str:
    if decision is None:
        return "(nothing)"
    detail = decision.get("detail")
    return f"{decision.get('kind')}" + ("" if detail is None else " " + orjson.dumps(detail).decode())


def _or_off(value, scale: float, unit: str, sign: str = "+") -> str:
    return "off" if value is None else f"{sign}{value * scale:g}{unit}"
