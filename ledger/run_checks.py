"""What the bench's scenarios check of a run's committed history, one query per scenario.

Each scenario's workflow writes a known history per execution (so many
transitions of such kinds in seq order, timers gone, failures dead-lettered);
these read back, in one row, how many executions of a run wrote exactly that.
bench/scenarios.py turns the counts into its checks and numbers. The ledger's
own invariants, for any workload, are ledger/check.py's.
"""

from asyncpg import Record

from ledger.connection import Queryable

#: A connection, or a pool to take one from for the query.

# One row: per-execution facts of the run, joined with a digest of its history.
# `expected_history` counts executions whose transitions are exactly seq 1..N,
# `started` first, `completed` last, and the given number of each kind.
_STEPS = """
WITH e AS (
    SELECT execution_id, event_id, status, steps, seq
    FROM ordo.executions WHERE tenant = $1 AND event_id LIKE $2
), t AS (
    SELECT tr.execution_id, count(*) AS n, min(tr.seq) AS lo, max(tr.seq) AS hi,
           count(*) FILTER (WHERE tr.kind = 'started' AND tr.seq = 1) AS started_first,
           count(*) FILTER (WHERE tr.kind = 'completed') AS completed,
           max(tr.seq) FILTER (WHERE tr.kind = 'completed') AS completed_seq,
           count(*) FILTER (WHERE tr.kind = $4) AS step_kind
    FROM ordo.transitions tr JOIN e USING (execution_id)
    GROUP BY tr.execution_id
)
SELECT count(*) AS executions,
       count(DISTINCT e.event_id) AS distinct_events,
       count(*) FILTER (WHERE e.status = 'completed') AS completed,
       count(*) FILTER (WHERE e.steps = $3) AS expected_steps,
       count(*) FILTER (WHERE t.n = $3 + 2 AND t.lo = 1 AND t.hi = $3 + 2 AND e.seq = $3 + 2
                        AND t.started_first = 1 AND t.completed = 1 AND t.completed_seq = $3 + 2
                        AND t.step_kind = $3) AS expected_history
FROM e LEFT JOIN t USING (execution_id)
"""

_SIGNALS = """
WITH e AS (
    SELECT execution_id, status, seq FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
), t AS (
    SELECT tr.execution_id, count(*) AS n, max(tr.seq) AS hi,
           count(*) FILTER (WHERE tr.kind = 'signal') AS signals,
           count(*) FILTER (WHERE tr.kind = 'signal' AND tr.source_seq IS NOT NULL) AS with_source,
           array_agg((tr.detail->'data'->>'i')::int ORDER BY tr.seq) FILTER (WHERE tr.kind = 'signal') AS order_i,
           count(*) FILTER (WHERE tr.kind = 'completed') AS completed
    FROM ordo.transitions tr JOIN e USING (execution_id)
    GROUP BY tr.execution_id
)
SELECT count(*) AS executions,
       count(*) FILTER (WHERE e.status = 'completed' AND t.completed = 1) AS completed,
       count(*) FILTER (WHERE t.signals = $3 AND t.with_source = $3) AS exact_signals,
       count(*) FILTER (WHERE t.order_i = $4::int[]) AS in_publish_order,
       count(*) FILTER (WHERE t.n = 2 + 3 * $3 AND t.hi = t.n AND e.seq = t.n) AS full_history,
       coalesce(sum(t.signals), 0) AS applied
FROM e LEFT JOIN t USING (execution_id)
"""

# Signals of one execution whose stream sequence is not above the previous one's.
_SIGNAL_ORDER_REGRESSIONS = """
SELECT count(*) FROM (
    SELECT tr.source_seq, lag(tr.source_seq) OVER (PARTITION BY tr.execution_id ORDER BY tr.seq) AS previous
    FROM ordo.transitions tr
    JOIN ordo.executions e USING (execution_id)
    WHERE e.tenant = $1 AND e.workflow_id = $2 AND tr.kind = 'signal'
) s WHERE s.previous >= s.source_seq
"""

_TIMERS = """
WITH e AS (
    SELECT execution_id, status, seq FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
), t AS (
    SELECT tr.execution_id, count(*) AS n, max(tr.seq) AS hi,
           array_agg(tr.kind ORDER BY tr.seq) AS kinds
    FROM ordo.transitions tr JOIN e USING (execution_id)
    GROUP BY tr.execution_id
)
SELECT count(*) AS executions,
       count(*) FILTER (WHERE e.status = 'completed') AS completed,
       count(*) FILTER (WHERE t.kinds = ARRAY['started', 'branch', 'waiting', 'timer_fired', 'completed']
                        AND t.n = 5 AND t.hi = 5 AND e.seq = 5) AS expected_history,
       (SELECT count(*) FROM ordo.timers tm JOIN e USING (execution_id)) AS timers_left
FROM e LEFT JOIN t USING (execution_id)
"""

# w9-mix: the signals of the signalled executions ($3) count as recorded (a `signal`
# transition, in the order sent: data.n ascending) or dead-lettered (sent before the
# enrolment committed, or after the execution ended).
_MIX = """
WITH e AS (
    SELECT execution_id, status FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
)
SELECT count(*) AS executions,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       (SELECT count(*) FROM ordo.transitions t JOIN e USING (execution_id) WHERE t.kind = 'signal') AS signals,
       (SELECT count(*) FROM (
            SELECT (t.detail->'data'->>'n')::int AS n,
                   lag((t.detail->'data'->>'n')::int) OVER (PARTITION BY t.execution_id ORDER BY t.seq) AS before
            FROM ordo.transitions t JOIN e USING (execution_id) WHERE t.kind = 'signal') s
         WHERE s.n < s.before) AS signals_out_of_order,
       (SELECT count(*) FROM ordo.timers tm JOIN e USING (execution_id)) AS timers_left,
       (SELECT count(*) FROM ordo.dead_letters d
         WHERE d.reason IN ('unknown_execution', 'execution_closed')
           AND d.execution_id = ANY($3::uuid[])) AS signals_dead_lettered
FROM e
"""

# Lateness of each fire: from the intended time (the `waiting` transition's
# until_ms) to the `timer_fired` transition (dispatch) and to its commit.
_TIMER_LATENESS = """
WITH e AS (
    SELECT execution_id, finished_at FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
), l AS (
    SELECT extract(epoch FROM f.at) * 1000.0 - (w.detail->>'until_ms')::float8 AS fired,
           extract(epoch FROM e.finished_at) * 1000.0 - (w.detail->>'until_ms')::float8 AS committed,
           extract(epoch FROM f.at)::float8 AS fired_at, (w.detail->>'until_ms')::float8 / 1000.0 AS due_at
    FROM e
    JOIN ordo.transitions w ON w.execution_id = e.execution_id AND w.kind = 'waiting'
    JOIN ordo.transitions f ON f.execution_id = e.execution_id AND f.kind = 'timer_fired'
)
SELECT count(*) AS fires,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY fired) AS fired_p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY fired) AS fired_p99,
       max(fired) AS fired_max, min(fired) AS fired_min,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY committed) AS committed_p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY committed) AS committed_p99,
       max(committed) AS committed_max,
       min(fired_at) AS first_fired_at, max(fired_at) AS last_fired_at,
       min(due_at) AS first_due_at, max(due_at) AS last_due_at,
       (SELECT count(*) FROM l l2 GROUP BY floor(l2.fired_at) ORDER BY 1 DESC LIMIT 1) AS busiest_second_fires
FROM l
"""

_RETRIES = """
WITH e AS (
    SELECT execution_id, status, event_id FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
)
SELECT count(*) AS executions,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       array_agg(event_id) FILTER (WHERE status = 'failed') AS failed_events,
       (SELECT count(*) FROM ordo.transitions t JOIN e USING (execution_id)
        WHERE t.kind = 'action_failed' AND (t.detail->'error'->>'retryable')::boolean) AS retries,
       (SELECT count(*) FROM ordo.transitions t JOIN e USING (execution_id)
        WHERE t.kind = 'action_failed' AND t.detail->'error'->>'code' = 'timeout') AS timeouts,
       (SELECT count(*) FROM ordo.transitions t JOIN e USING (execution_id)
        WHERE t.kind = 'action_requested') AS requests,
       (SELECT count(*) FROM ordo.dead_letters d
        WHERE d.reason = 'step_failed' AND d.workflow_id = $2) AS dead_letters
FROM e
"""

# Per execution of N action steps: `started` at seq 1, step k's `action_requested` at
# seq 2k and its `action_completed` at 2k + 1, `completed` at 2N + 2, nothing else.
_ACTION_STEPS = """
WITH e AS (
    SELECT execution_id, status, seq FROM ordo.executions WHERE tenant = $1 AND workflow_id = $2
), t AS (
    SELECT tr.execution_id, count(*) AS n, max(tr.seq) AS hi,
           count(*) FILTER (WHERE tr.kind = 'started' AND tr.seq = 1) AS started,
           count(*) FILTER (WHERE tr.kind = 'action_requested' AND tr.seq % 2 = 0 AND tr.seq <= 2 * $3) AS requested,
           count(*) FILTER (WHERE tr.kind = 'action_completed' AND tr.seq % 2 = 1 AND tr.seq > 1
                                  AND tr.seq <= 2 * $3 + 1) AS completed_actions,
           count(*) FILTER (WHERE tr.kind = 'completed' AND tr.seq = 2 * $3 + 2) AS completed
    FROM ordo.transitions tr JOIN e USING (execution_id)
    GROUP BY tr.execution_id
)
SELECT count(*) AS executions,
       count(*) FILTER (WHERE e.status = 'completed') AS completed,
       count(*) FILTER (WHERE t.n = 2 * $3 + 2 AND t.hi = 2 * $3 + 2 AND e.seq = 2 * $3 + 2 AND t.started = 1
                        AND t.requested = $3 AND t.completed_actions = $3 AND t.completed = 1) AS expected_history
FROM e LEFT JOIN t USING (execution_id)
"""


async def step_histories(conn: Queryable, tenant: str, run_id: str, steps: int, step_kind: str) -> Record:
    """w1, the run by its event ids: executions, distinct events, completed, with `steps` steps, with the history."""
    row = await conn.fetchrow(_STEPS, tenant, f"{run_id}-%", steps, step_kind)
    assert row is not None, "an aggregate query returns one row"
    return row


async def signal_histories(conn: Queryable, tenant: str, workflow_id: str, signals: int) -> Record:
    """w2: executions, completed, with exactly `signals` signals, in publish order, full history; signals applied."""
    row = await conn.fetchrow(_SIGNALS, tenant, workflow_id, signals, list(range(signals)))
    assert row is not None, "an aggregate query returns one row"
    return row


async def signal_order_regressions(conn: Queryable, tenant: str, workflow_id: str) -> int:
    """w2: signals applied after one of a later stream sequence, in the same execution (0 when in order)."""
    regressions: int = await conn.fetchval(_SIGNAL_ORDER_REGRESSIONS, tenant, workflow_id)
    return regressions


async def timer_histories(conn: Queryable, tenant: str, workflow_id: str) -> Record:
    """w3: executions, completed, with the wait-then-fire history, and timer rows left behind."""
    row = await conn.fetchrow(_TIMERS, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row


async def mix_outcomes(conn: Queryable, tenant: str, workflow_id: str, signalled: list[str]) -> Record:
    """w9: executions, completed, timers left, and the signalled executions' signals recorded, out of
    order and dead-lettered."""
    row = await conn.fetchrow(_MIX, tenant, workflow_id, signalled)
    assert row is not None, "an aggregate query returns one row"
    return row


async def timer_lateness(conn: Queryable, tenant: str, workflow_id: str) -> Record:
    """w3: how late the timers fired and committed (ms past their time): count, percentiles, extremes;
    when the first and last were due and fired (epoch s), and the most fired in one second."""
    row = await conn.fetchrow(_TIMER_LATENESS, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row


async def retry_outcomes(conn: Queryable, tenant: str, workflow_id: str) -> Record:
    """w4: completed and failed executions (and the failed ones' events), retries, timeouts, requests, dead letters."""
    row = await conn.fetchrow(_RETRIES, tenant, workflow_id)
    assert row is not None, "an aggregate query returns one row"
    return row


async def action_histories(conn: Queryable, tenant: str, workflow_id: str, steps: int) -> Record:
    """w5/w6: executions, completed, and those with exactly `steps` request/result pairs and nothing else."""
    row = await conn.fetchrow(_ACTION_STEPS, tenant, workflow_id, steps)
    assert row is not None, "an aggregate query returns one row"
    return row


async def retained_run(conn: Queryable) -> Record:
    """A run with retention at work, on a ledger of its own: the finished executions retention dropped
    (`dropped`, ordo.retention_drops) and the dead letters of the whole ledger: those of signals for an
    execution not enrolled yet or ended already (`unroutable`, which w9-mix's signals may be) apart
    from the others (`dead_letters`) but for `other_deployment`'s, which every run checks
    (`other_deployment_letters`)."""
    row = await conn.fetchrow(
        """SELECT (SELECT coalesce(sum(executions), 0) FROM ordo.retention_drops)::bigint AS dropped,
                  (SELECT count(*) FROM ordo.dead_letters
                   WHERE reason NOT IN ('unknown_execution', 'execution_closed', 'other_deployment'))
                   AS dead_letters,
                  (SELECT count(*) FROM ordo.dead_letters
                   WHERE reason IN ('unknown_execution', 'execution_closed')) AS unroutable"""
    )
    assert row is not None, "an aggregate query returns one row"
    return row


# A message of the run's execution stream for another deployment's execution, or a message for one of
# the run's executions that reached another deployment (the letter names the execution's workflow).
_OTHER_DEPLOYMENT = """
SELECT count(*) FROM ordo.dead_letters
WHERE reason = 'other_deployment' AND (stream = $1 OR workflow_id = $2)
"""


async def other_deployment_letters(conn: Queryable, exec_stream: str, workflow_id: str | None) -> int:
    """The `other_deployment` dead letters (daemon/advance.py) of a run whose execution stream and
    workflow these are: a message that went to a deployment its execution does not belong to. A run
    is one deployment (its own prefix), so it has none."""
    count: int = await conn.fetchval(_OTHER_DEPLOYMENT, exec_stream, workflow_id)
    return count
