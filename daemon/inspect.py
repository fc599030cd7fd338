"""`ordo inspect`: one execution as the ledger holds it, for the SRE debugging it.

`inspect()` reads everything about one execution in one snapshot (its row, its
history, its pending timer and event wait, its open dead letters) into a plain
JSON-able dict; `render()` turns that dict into the timeline a person reads.
The dict is also what `--json` prints, so scripts and people see the same facts,
and what `ordo ledger export` archives, one per line, so that `ordo inspect
--from-file` shows an archived execution as it showed it from the ledger.
"""

import hashlib
from datetime import UTC, datetime

import orjson

from ledger import dead_letters, event_waits, history, timers

#: Where each transition kind keeps the data that went in or came out (digested, not shown).
_INPUT = {"signal": "data", "event_received": "data"}
_OUTPUT = {"action_completed": "output"}


def digest(value) -> str:
    """sha256 of the canonical JSON (sorted keys), first 12 hex digits: equal data, equal digest."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def _error_of(kind: str, detail: dict) -> str | None:
    """A failure's reason as one line, `code: message`."""
    if kind in ("action_failed", "step_failed"):
        error = detail.get("error") or {}
        return f"{error.get('code', '')}: {error.get('message', '')}"
    if kind == "failed" and "code" in detail:
        return f"{detail.get('code')}: {detail.get('error')}"
    if kind == "late_result" and detail.get("ok") is False:
        return "late failure"
    return None


def _transition(row) -> dict:
    detail = orjson.loads(row["detail"]) if row["detail"] else None
    d = detail if isinstance(detail, dict) else {}
    kind = row["kind"]
    entry = {
        "seq": row["seq"],
        "at": _iso(row["at"]),
        "step": row["step_id"],
        "kind": kind,
        "attempt": d.get("attempt"),
        "input_digest": digest(d[_INPUT[kind]]) if _INPUT.get(kind) in d else None,
        "output_digest": digest(d[_OUTPUT[kind]]) if _OUTPUT.get(kind) in d else None,
        "error": _error_of(kind, d),
        # The execution-stream sequence the transition came from: None for enrolment and timers.
        "source_seq": row["source_seq"],
        "detail": detail,
    }
    return entry


async def inspect(conn, execution_id: str) -> dict | None:
    """Everything the ledger knows about one execution, as a JSON-able dict (None if there is none)."""
    # One snapshot, so that the row, the history and the timer agree (unless the caller has its own).
    snapshot = None if conn.is_in_transaction() else conn.transaction(isolation="repeatable_read", readonly=True)
    if snapshot is not None:
        await snapshot.start()
    try:
        ex = await history.execution(conn, execution_id)
        if ex is None:
            return None
        transitions = await history.transitions(conn, execution_id)
        timer = await timers.of_execution(conn, execution_id)
        wait = await event_waits.of_execution(conn, execution_id)
        letters = await dead_letters.open_of_execution(conn, execution_id)
    finally:
        if snapshot is not None:
            await snapshot.rollback()  # read-only: nothing to keep
    return document(ex, transitions, timer, wait, letters)


def document(ex, transitions: list, timer, wait, letters: list) -> dict:
    """The JSON-able dict of one execution from its ledger rows: its row, its transitions in seq order, its
    pending timer and event wait (or None), its open dead letters. `ordo ledger export` writes the same."""
    return {
        "execution_id": ex["execution_id"],
        "tenant": ex["tenant"],
        "workflow_id": ex["workflow_id"],
        "workflow_version": ex["workflow_version"],
        "subject_type": ex["subject_type"],
        "subject_id": ex["subject_id"],
        "event_id": ex["event_id"],
        "partition": ex["partition"],
        "status": ex["status"],
        "waiting": ex["waiting"],
        "seq": ex["seq"],
        "pc": ex["pc"],
        "steps": ex["steps"],
        "runtime": orjson.loads(ex["runtime"]),
        "context": orjson.loads(ex["context"]),
        "created_at": _iso(ex["created_at"]),
        "updated_at": _iso(ex["updated_at"]),
        "finished_at": _iso(ex["finished_at"]),
        "transitions": [_transition(t) for t in transitions],
        "timer": None
        if timer is None
        else {
            "timer_id": timer["timer_id"],
            "fire_at": _iso(timer["fire_at"]),
            "purpose": timer["purpose"],
            "step": timer["step_id"],
        },
        "event_wait": None if wait is None else {"event_type": wait["event_type"], "step": wait["step_id"]},
        "dead_letters": [
            {
                "id": r["id"],
                "at": _iso(r["at"]),
                "reason": r["reason"],
                "error": r["error"],
                "step": r["step_id"],
                "attempts": len(orjson.loads(r["attempts"])) if r["attempts"] else 0,
            }
            for r in letters
        ],
    }


# -- the timeline as text -----------------------------------------------------------


def _span(ms: float) -> str:
    """A duration the way a person says it: 850ms, 12.3s, 4m05s, 2d03h."""
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 1000:
        return f"{sign}{ms:.0f}ms"
    s = ms / 1000
    if s < 60:
        return f"{sign}{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{sign}{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{sign}{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{sign}{d}d{h:02d}h"


def _when(iso: str | None) -> datetime | None:
    return None if iso is None else datetime.fromisoformat(iso)


def _brief(detail, width: int = 60) -> str:
    """The detail minus what other columns show, cut to one line."""
    if not isinstance(detail, dict):
        return "" if detail is None else orjson.dumps(detail).decode()[:width]
    shown = {k: v for k, v in detail.items() if k not in ("attempt", "error", "output", "data")}
    if isinstance(shown.get("until_ms"), int):
        until = datetime.fromtimestamp(shown.pop("until_ms") / 1000, tz=UTC)
        shown = {"until": until.isoformat(timespec="milliseconds"), **shown}
    text = orjson.dumps(shown).decode() if shown else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def render(doc: dict, now: datetime | None = None) -> str:
    """The execution as a timeline: identity, where it stands, what it waits for, then each transition."""
    now = now or datetime.now(UTC)
    lines = [
        f"execution {doc['execution_id']}",
        f"  workflow   {doc['tenant']}/{doc['workflow_id']} v{doc['workflow_version']}"
        f"   {doc['subject_type']} {doc['subject_id']}   trigger {doc['event_id']}   partition {doc['partition']}",
    ]
    status = doc["status"]
    if doc["waiting"]:
        status += f" for {doc['waiting']}"
    lines.append(f"  status     {status}   seq {doc['seq']}   pc {doc['pc']}   steps run {doc['steps']}")
    created, finished = _when(doc["created_at"]), _when(doc["finished_at"])
    times = f"  created    {doc['created_at']}"
    if finished is not None:
        times += f"   finished {doc['finished_at']} (took {_span((finished - created).total_seconds() * 1000)})"
    else:
        times += f"   updated {doc['updated_at']}"
    lines.append(times)
    runtime = doc["runtime"] or {}
    if runtime.get("attempt") or runtime.get("failures"):
        lines.append(f"  attempt    {runtime.get('attempt')}   failed attempts {len(runtime.get('failures') or [])}")
    timer, wait = doc["timer"], doc["event_wait"]
    if timer is None and wait is None:
        lines.append("  pending    nothing")
    if timer is not None:
        fire_at = _when(timer["fire_at"])
        due = (fire_at - now).total_seconds() * 1000
        when = f"in {_span(due)}" if due >= 0 else f"OVERDUE by {_span(-due)}"
        lines.append(
            f"  pending    timer {timer['purpose']} at step '{timer['step']}' fires {timer['fire_at']}"
            f" ({when})   id {timer['timer_id']}"
        )
    if wait is not None:
        lines.append(f"  pending    event '{wait['event_type']}' at step '{wait['step']}'")
    for letter in doc["dead_letters"]:
        lines.append(
            f"  DEAD LETTER #{letter['id']} {letter['reason']} at step '{letter['step']}'"
            f" after {letter['attempts']} attempt(s): {letter['error']}"
        )
    lines.append("")
    lines.append(
        f"  {'seq':>4}  {'at (UTC)':<23} {'+elapsed':>9}  {'step':<16} {'kind':<16} {'try':>3}"
        f"  {'in/out':<16} detail / error"
    )
    start = _when(doc["transitions"][0]["at"]) if doc["transitions"] else None
    for t in doc["transitions"]:
        elapsed = _span((_when(t["at"]) - start).total_seconds() * 1000)
        io = (
            f"in:{t['input_digest']}"
            if t["input_digest"]
            else f"out:{t['output_digest']}"
            if t["output_digest"]
            else ""
        )
        tail = f"ERROR {t['error']}" if t["error"] else _brief(t["detail"])
        attempt = "" if t["attempt"] is None else str(t["attempt"])
        lines.append(
            f"  {t['seq']:>4}  {t['at'][:23]:<23} {'+' + elapsed:>9}  {t['step'] or '-':<16}"
            f" {t['kind']:<16} {attempt:>3}  {io:<16} {tail}".rstrip()
        )
    if not doc["transitions"]:
        lines.append("  (no transitions)")
    return "\n".join(lines)
