"""Limits set per tenant in the config (`tenant_limits`), applied to the tenant's workflows.

One entry per line (or separated by `;`), each a tenant then FIELD=VALUE pairs:

    acme enrolments=200/s
    acme action=sms.send rate=50/s concurrency=10
    acme workflow=onboarding max_running=100

- `enrolments`: the tenant's new executions start at most this fast (all its
  workflows together); the rest are enrolled and wait their turn in order.
- `action=NAME` with `rate` and/or `concurrency`: the limits of every step of
  the tenant's workflows that calls NAME, in place of the definition's (a field
  left out keeps the definition's; a `key` stays the definition's).
- `workflow=ID` with `max_running`: in place of the definition's `limits.max_running`.

The registry (`daemon/definitions.py`) compiles each tenant's workflows with
them; SIGHUP reloads them, and `requeue` gives the calls and executions
already waiting the new limits (`daemon/limits.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hotpath.definition import RATE
from hotpath.vocabulary import enrolment_bucket, running_bucket

_PERIOD_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_FIELDS = {"enrolments": ("enrolments",), "action": ("rate", "concurrency"), "workflow": ("max_running",)}


@dataclass(frozen=True)
class TenantLimits:
    """What `tenant_limits` sets: per tenant, per (tenant, action), per (tenant, workflow)."""

    #: tenant -> its enrolment rate, per second.
    enrolments: dict[str, float] = field(default_factory=dict)
    #: (tenant, action) -> the action step limits it sets ({"rate": "50/s", "concurrency": 10}, either or both).
    actions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: (tenant, workflow id) -> its max_running.
    max_running: dict[tuple[str, str], int] = field(default_factory=dict)

    def enrolment_rate(self, tenant: str) -> float | None:
        return self.enrolments.get(tenant)

    def applied(self, definition: dict) -> dict:
        """The definition as the tenant's limits make it (itself when none applies)."""
        tenant, workflow_id = definition.get("tenant"), definition.get("id")
        running = self.max_running.get((tenant, workflow_id))  # type: ignore[arg-type]
        actions = {a: v for (t, a), v in self.actions.items() if t == tenant}
        steps = definition.get("steps")
        touched = isinstance(steps, list) and any(
            isinstance(s, dict) and s.get("type") == "action" and s.get("action") in actions for s in steps
        )
        if running is None and not touched:
            return definition
        out = copy.deepcopy(definition)
        if running is not None:
            limits = out.get("limits")
            out["limits"] = {**(limits if isinstance(limits, dict) else {}), "max_running": running}
        for step in out["steps"] if touched else ():
            if isinstance(step, dict) and step.get("type") == "action" and step.get("action") in actions:
                limits = step.get("limits")
                step["limits"] = {**(limits if isinstance(limits, dict) else {}), **actions[step["action"]]}
        return out

    def fingerprint(self, tenant: str) -> tuple:
        """What of these limits a tenant's compiled workflows depend on (to know when to compile again)."""
        return (
            self.enrolments.get(tenant),
            sorted((a, sorted(v.items())) for (t, a), v in self.actions.items() if t == tenant),
            sorted((w, n) for (t, w), n in self.max_running.items() if t == tenant),
        )

    def gate_limits(
        self, before: TenantLimits, max_running: Callable[[str, str], int | None]
    ) -> list[tuple[str, float | None, int | None]]:
        """(bucket, rate_per_s, concurrency) of each start gate whose limit this config sets or
        `before` set: what executions already waiting there take on a reload. `max_running` is
        a workflow's as now compiled (the config's, else its definition's, else None)."""
        out: list[tuple[str, float | None, int | None]] = []
        for tenant in self.enrolments.keys() | before.enrolments.keys():
            out.append((enrolment_bucket(tenant), self.enrolments.get(tenant), None))
        for tenant, workflow_id in self.max_running.keys() | before.max_running.keys():
            out.append((running_bucket(tenant, workflow_id), None, max_running(tenant, workflow_id)))
        return out

    def action_limits(self) -> list[tuple[str, str, float | None, int | None]]:
        """(tenant, action, rate_per_s, concurrency) of each action override (None: the definition's)."""
        return [
            (tenant, action, _rate_per_s(v["rate"]) if "rate" in v else None, v.get("concurrency"))
            for (tenant, action), v in self.actions.items()
        ]


def _rate_per_s(text: str) -> float:
    match = RATE.match(text)
    assert match is not None, "checked by parse"
    return int(match.group(1)) / _PERIOD_S[match.group(2)]


def parse(text: str) -> TenantLimits:
    """`tenant_limits` as TenantLimits; a malformed entry raises ValueError naming it."""
    limits = TenantLimits()
    for raw in text.replace(";", "\n").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        try:
            _parse_entry(entry, limits)
        except ValueError as exc:
            raise ValueError(f"tenant_limits: entry {entry!r}: {exc}") from None
    return limits


def _parse_entry(entry: str, limits: TenantLimits) -> None:
    tenant, *pairs = entry.split()
    if "=" in tenant:
        raise ValueError("it must start with the tenant, e.g. 'acme enrolments=200/s'")
    fields: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value:
            raise ValueError(f"{pair!r} is not FIELD=VALUE")
        if name in fields:
            raise ValueError(f"{name!r} is given twice")
        fields[name] = value
    kind = "action" if "action" in fields else "workflow" if "workflow" in fields else "enrolments"
    if "action" in fields and "workflow" in fields:
        raise ValueError("an entry limits an action or a workflow, not both")
    target = fields.pop(kind, None) if kind != "enrolments" else None
    allowed = _FIELDS[kind]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} here (expected {', '.join(allowed)})")
    if not fields:
        raise ValueError(f"it sets nothing (expected {', '.join(allowed)})")
    if "enrolments" in fields:
        limits.enrolments[tenant] = _rate_per_s(_rate(fields["enrolments"], "enrolments"))
    if kind == "action":
        assert target is not None
        override: dict[str, Any] = {}
        if "rate" in fields:
            override["rate"] = _rate(fields["rate"], "rate")
        if "concurrency" in fields:
            override["concurrency"] = _count(fields["concurrency"], "concurrency")
        limits.actions[(tenant, target)] = override
    if kind == "workflow":
        assert target is not None
        limits.max_running[(tenant, target)] = _count(fields["max_running"], "max_running")


def _rate(value: str, name: str) -> str:
    if not RATE.match(value):
        raise ValueError(f"{name} must be a positive count per s, m or h such as '50/s', got {value!r}")
    return value


def _count(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
