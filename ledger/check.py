"""The ledger's invariants, checked after the fact (`ordo check`, and every fault test).

Each check is a query that counts violations; a healthy ledger answers zero
to every one. They read only the ledger, so they work after any crash.
"""

from ledger.connection import Queryable

#: name -> (what a violation means, query counting violations)
CHECKS = {
    "seq_gaps": (
        "an execution whose transition seqs are not exactly 1..n",
        """SELECT count(*) FROM (SELECT execution_id FROM ordo.transitions GROUP BY execution_id
           HAVING min(seq) <> 1 OR max(seq) <> count(*)) g""",
    ),
    "seq_mismatch": (
        "an execution row whose seq disagrees with its history",
        """SELECT count(*) FROM ordo.executions e WHERE e.seq <>
           (SELECT coalesce(max(seq), 0) FROM ordo.transitions t WHERE t.execution_id = e.execution_id)""",
    ),
    "orphan_transitions": (
        "transitions of an execution that does not exist",
        """SELECT count(*) FROM ordo.transitions t
           WHERE NOT EXISTS (SELECT 1 FROM ordo.executions e WHERE e.execution_id = t.execution_id)""",
    ),
    "double_start": (
        "an execution started more than once (or never)",
        """SELECT count(*) FROM (SELECT execution_id FROM ordo.transitions WHERE kind = 'started'
           GROUP BY execution_id HAVING count(*) <> 1) g""",
    ),
    "double_end": (
        "an execution that ended more than once (an operator retry allows one more end)",
        """SELECT count(*) FROM (SELECT count(*) FILTER (WHERE kind IN ('completed', 'failed', 'cancelled')) AS ends,
                  count(*) FILTER (WHERE kind = 'retried') AS retries
           FROM ordo.transitions GROUP BY execution_id) g WHERE ends > 1 + retries""",
    ),
    "out_of_order": (
        "messages of one execution applied out of their stream order",
        """SELECT count(*) FROM (SELECT source_seq,
               lag(source_seq) OVER (PARTITION BY execution_id ORDER BY seq) AS previous
           FROM ordo.transitions WHERE source_seq IS NOT NULL) t WHERE previous > source_seq""",
    ),
    "enrolled_twice": (
        "an execution id in two day partitions (the primary key includes the day since migration 008)",
        """SELECT count(*) FROM (SELECT execution_id FROM ordo.executions GROUP BY execution_id
           HAVING count(*) > 1) g""",
    ),
    "history_apart": (
        "history rows in another day partition than their execution's (retention would drop them apart)",
        """SELECT count(*) FROM ordo.history h JOIN ordo.executions e USING (execution_id)
           WHERE h.ledger_day <> e.ledger_day""",
    ),
    "stuck_running": (
        "an execution committed as running (it only ever commits suspended or ended)",
        "SELECT count(*) FROM ordo.executions WHERE status = 'running'",
    ),
    "no_wakeup": (
        "an execution waiting for a timer, a retry, an action or an event with no timer to wake it",
        """SELECT count(*) FROM ordo.executions e WHERE e.status = 'waiting'
           AND (e.waiting IN ('timer', 'retry', 'action') OR e.waiting LIKE 'event:%')
           AND NOT EXISTS (SELECT 1 FROM ordo.timers t WHERE t.execution_id = e.execution_id)""",
    ),
    "overdue_timers": (
        "timers more than $1 seconds past due that never fired",
        "SELECT count(*) FROM ordo.timers WHERE fire_at < now() - make_interval(secs => $1)",
    ),
    "limits_of_ended": (
        "limit queue rows or concurrency slots left behind by an execution that ended (migration 014)",
        """SELECT (SELECT count(*) FROM ordo.limit_queue q JOIN ordo.executions e USING (execution_id)
                   WHERE e.status IN ('completed', 'failed', 'cancelled'))
              + (SELECT count(*) FROM ordo.limit_slots s JOIN ordo.executions e USING (execution_id)
                   WHERE e.status IN ('completed', 'failed', 'cancelled'))""",
    ),
    "timers_of_ended": (
        "timer rows or event waits left behind by an execution that ended",
        """SELECT (SELECT count(*) FROM ordo.timers t JOIN ordo.executions e USING (execution_id)
                   WHERE e.status IN ('completed', 'failed', 'cancelled'))
              + (SELECT count(*) FROM ordo.event_waits w JOIN ordo.executions e USING (execution_id)
                   WHERE e.status IN ('completed', 'failed', 'cancelled'))""",
    ),
    "waits_no_deployment": (
        "timer rows or event waits of before migration 013 that several deployments shared: none fires or routes them",
        """SELECT CASE WHEN (SELECT count(DISTINCT deployment) FROM ordo.partitions WHERE deployment <> '') > 1
                  THEN (SELECT count(*) FROM ordo.timers WHERE deployment = '')
                       + (SELECT count(*) FROM ordo.event_waits WHERE deployment = '')
                  ELSE 0 END""",
    ),
}


async def check(conn: Queryable, *, overdue_after_s: float = 300.0) -> dict[str, int]:
    """Every invariant's violation count (all zero on a healthy ledger)."""
    result = {}
    for name, (_, query) in CHECKS.items():
        args = (overdue_after_s,) if "$1" in query else ()
        result[name] = await conn.fetchval(query, *args)
    return result


async def missing_executions(conn: Queryable, expected: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Of (tenant, workflow_id, event_id) that must have enrolled, those with no execution (lost)."""
    if not expected:
        return []
    rows = await conn.fetch(
        """SELECT k.tenant, k.workflow_id, k.event_id
           FROM unnest($1::text[], $2::text[], $3::text[]) AS k(tenant, workflow_id, event_id)
           LEFT JOIN ordo.executions e USING (tenant, workflow_id, event_id)
           WHERE e.execution_id IS NULL""",
        *map(list, zip(*expected, strict=True)),
    )
    return [tuple(r) for r in rows]


def report(result: dict[str, int]) -> str:
    lines = []
    for name, count in result.items():
        lines.append(f"  {'ok  ' if count == 0 else 'FAIL'} {name:<20} {count:>8}  {CHECKS[name][0]}")
    return "\n".join(lines)
