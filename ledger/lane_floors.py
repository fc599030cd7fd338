"""Where each trigger lane had settled, kept in the ledger (migration 023).

A lane's consumer resumes after its earlier consumer's ack floor (daemon/topology.py
`resume_lane`); the consumers keep their state in JetStream's memory, so a server
restart loses them, and the lane then resumes after the floor recorded here, which
its worker writes as it measures its lanes (daemon/partitions.py). What was settled
after the last write is delivered again and deduped, as after a handover.
"""

from ledger.connection import Queryable

# Only forward within one stream; a floor of another stream (created again since) is replaced.
_SET = """
INSERT INTO ordo.lane_floors AS f (deployment, lane, stream_created, settled)
SELECT $1, lane, stream_created, settled
FROM unnest($2::int[], $3::text[], $4::bigint[]) AS s(lane, stream_created, settled)
ON CONFLICT (deployment, lane) DO UPDATE
SET settled = CASE WHEN f.stream_created = excluded.stream_created THEN greatest(f.settled, excluded.settled)
                   ELSE excluded.settled END,
    stream_created = excluded.stream_created
"""

_GET = "SELECT lane, stream_created, settled FROM ordo.lane_floors WHERE deployment = $1 AND lane = ANY($2::int[])"


async def record(conn: Queryable, deployment: str, floors: dict[int, tuple[str, int]]) -> None:
    """Record lane -> (the creation time of its triggers stream, the sequence it had settled up to)."""
    lanes = list(floors)
    await conn.execute(
        _SET, deployment, lanes, [floors[lane][0] for lane in lanes], [floors[lane][1] for lane in lanes]
    )


async def settled(conn: Queryable, deployment: str, streams_created: dict[int, str]) -> dict[int, int]:
    """Lane -> the sequence it had settled up to in its triggers stream as created now (`streams_created`:
    lane -> that stream's creation time); a lane with no floor of that stream is left out."""
    rows = await conn.fetch(_GET, deployment, list(streams_created))
    return {r["lane"]: r["settled"] for r in rows if r["stream_created"] == streams_created[r["lane"]]}
