"""Reads of the durable timers (`ordo.timers`, one row per waiting execution).

The batcher writes and deletes the rows as part of each commit; this reads
them back, gives the rows of before migration 013 to their deployment
(`adopt`), and carries what a commit tells the owners of partitions it set
timers in without owning them (`tell_owners`, `told`).

A worker pages through its partitions' timers in (fire_at, execution_id)
order, each partition from where its previous page ended, so that every row
is read once on its way to firing, not once per load while it is due soon.
Timers belong to a deployment, as its partitions do (migration 013): a worker
reads only its own deployment's, whatever partition numbers others share.
A page is a range of the index `timers_due` (deployment, partition, fire_at), sorted by
execution id only among rows with the same fire_at, so that a page ends on a
row even where thousands share one fire_at ("wait until 9:00"). Times cross
as whole epoch microseconds, exactly what a timestamptz holds, so that the
next page starts right after the row the last one ended on.

(The execution id is not added to the index: with it there, on Postgres 18,
the batcher's `DELETE ... WHERE execution_id = ANY(...)` of fired timers took
ten times as long in the bench, 80 µs a row instead of 8, by
pg_stat_statements; the plan was not caught.)
"""

from asyncpg import Record

from ledger.connection import Queryable

#: The lowest (fire_at, execution_id) key: where the walk of a partition starts.
START: tuple[int, str] = (0, "00000000-0000-0000-0000-000000000000")

_DUE = """
SELECT t.execution_id::text, t.timer_id, (extract(epoch FROM t.fire_at) * 1000000)::bigint, c.partition
FROM unnest($1::int[], $2::bigint[], $3::uuid[]) AS c(partition, after_us, after_id)
CROSS JOIN LATERAL (
    SELECT execution_id, timer_id, fire_at
    FROM ordo.timers
    WHERE deployment = $6 AND partition = c.partition
      AND fire_at >= timestamptz 'epoch' + c.after_us * interval '1 microsecond'
      AND (fire_at, execution_id) > (timestamptz 'epoch' + c.after_us * interval '1 microsecond', c.after_id)
      AND fire_at <= timestamptz 'epoch' + $4::bigint * interval '1 microsecond'
    ORDER BY fire_at, execution_id
    LIMIT $5
) AS t
"""

_OF_EXECUTION = "SELECT timer_id, fire_at, purpose, step_id FROM ordo.timers WHERE execution_id = $1::uuid"


async def due(
    conn: Queryable, deployment: str, after: dict[int, tuple[int, str]], before_us: int, page: int
) -> list[Record]:
    """Of each of the deployment's partitions in `after`, the next `page` timers after its
    (fire_at_us, execution_id) key and due by `before_us`, in key order; one round trip for all of them.

    Each row unpacks as (execution_id, timer_id, fire_at_us, partition).
    """
    partitions = list(after)
    return await conn.fetch(
        _DUE,
        partitions,
        [after[p][0] for p in partitions],
        [after[p][1] for p in partitions],
        before_us,
        page,
        deployment,
    )


# The rows of before migration 013 that it could not give a deployment ('': the ledger had none
# yet): a deployment adopts them when it is the ledger's only one, as it adopted the partitions.
_ADOPT = """
UPDATE ordo.timers SET deployment = $1
WHERE deployment = '' AND NOT EXISTS (SELECT FROM ordo.partitions WHERE deployment NOT IN ('', $1))
"""


async def adopt(conn: Queryable, deployment: str) -> None:
    """Take the timers of no deployment when `deployment` is the only one on the ledger."""
    await conn.execute(_ADOPT, deployment)


# A timer set by a worker that does not own its partition (an enrolment runs where its trigger is
# consumed) may fall behind the owner's walk, which holds only what it reads and what its own
# commits set: the commit tells the deployment's workers on this channel, delivered when it commits.
_NOTIFY = "SELECT pg_notify($1, $2)"


def elsewhere_channel(deployment: str) -> str:
    """The channel on which a deployment's commits announce timers set in partitions they do not own."""
    return f"ordo_timers_set_{deployment}"


async def tell_owners(conn: Queryable, deployment: str, earliest_us: dict[int, int]) -> None:
    """Within a commit: partition -> the earliest fire time (epoch µs) it sets there, for their owners."""
    payload = ",".join(f"{partition}:{us}" for partition, us in sorted(earliest_us.items()))
    await conn.execute(_NOTIFY, elsewhere_channel(deployment), payload)


def told(payload: str) -> dict[int, int]:
    """What `tell_owners` said: partition -> earliest fire time (epoch µs)."""
    pairs = (item.split(":") for item in payload.split(",") if item)
    return {int(partition): int(us) for partition, us in pairs}


async def of_execution(conn: Queryable, execution_id: str) -> Record | None:
    """The execution's pending timer (timer_id, fire_at, purpose, step_id), or None."""
    return await conn.fetchrow(_OF_EXECUTION, execution_id)
