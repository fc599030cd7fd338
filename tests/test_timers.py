"""Timers at scale: each partition's timers walked once, in pages, and fires that keep the
ordering rules of every other message of their execution.

The walk (`daemon/timers.py` over `ledger/timers.py`) runs against a real
ledger with rows written as the batcher writes them; the fires run through a
real worker (NATS, Postgres, an injected clock).
"""

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from harness import NO_PROBLEMS, Clock, engine

from bench.generator import trigger_event
from daemon.timers import DueTimers
from ledger.schema import migrate

NOW_MS = 1_900_000_000_000  # a fixed "now" for the walk: only the rows' fire times matter


@pytest.fixture
async def db(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def _store(db, rows: list[tuple[str, int, str, int]]) -> None:
    """Timer rows (execution_id, partition, timer_id, fire_at_ms) of the default deployment."""
    await db.executemany(
        "INSERT INTO ordo.timers (execution_id, partition, timer_id, fire_at, purpose, step_id, deployment)"
        " VALUES ($1::uuid, $2, $3, $4, 'wait', 's', 'ordo')",
        [(e, p, t, datetime.fromtimestamp(ms / 1000, UTC)) for e, p, t, ms in rows],
    )


def _ids(n: int) -> list[str]:
    return sorted(str(uuid.uuid4()) for _ in range(n))


def _drain(timers: DueTimers, now_ms: int) -> list[tuple[str, str]]:
    """Every held timer due by now_ms, fired and done (their rows stay, as if each fire had found
    its execution moved on): what a later load brings back would be read twice."""
    fired = []
    while fires := timers.pop_due(now_ms, 1000):
        for fire in fires:
            fired.append((fire.key, fire.timer_id))
            timers.done(fire)
    return fired


async def test_each_timer_is_read_once_in_pages_even_where_thousands_share_one_fire_at(db):
    # 2,500 timers at the same millisecond in partition 0 (a "wait until 9:00"), 300 spread over
    # partition 1, 200 of partition 0 beyond the horizon and 100 of a partition owned elsewhere.
    at = NOW_MS + 1000
    same = _ids(2500)
    spread = _ids(300)
    later = _ids(200)
    elsewhere = _ids(100)
    await _store(db, [(e, 0, "t", at) for e in same])
    await _store(db, [(e, 1, "t", NOW_MS - 500 + i) for i, e in enumerate(spread)])
    await _store(db, [(e, 0, "t", NOW_MS + 60_000 + i) for i, e in enumerate(later)])
    await _store(db, [(e, 2, "t", NOW_MS) for e in elsewhere])
    timers = DueTimers(horizon_s=5, page=1000)
    timers.own(0)
    timers.own(1)

    added = [await timers.load(db, NOW_MS) for _ in range(4)]
    # Pages of at most 1,000 per partition, each after the row the last one ended on.
    assert added == [1300, 1000, 500, 0]
    fired = _drain(timers, at)
    assert sorted(e for e, _ in fired) == sorted(same + spread)
    assert [e for e, _ in fired[:300]] == spread  # earliest first
    # Fired and done while their rows stay: the walk is past them and never reads them again.
    assert await timers.load(db, NOW_MS + 1000) == 0
    assert _drain(timers, at) == []
    # The later ones come with the load whose horizon reaches them, once.
    assert await timers.load(db, NOW_MS + 55_002) == 3  # due by NOW_MS + 60,002
    assert await timers.load(db, NOW_MS + 56_000) == 197
    assert sorted(e for e, _ in _drain(timers, NOW_MS + 61_000)) == later


async def test_a_load_holds_no_more_than_the_room_left_and_the_rest_waits_in_order(db):
    ids = _ids(400)
    await _store(db, [(e, i % 2, "t", NOW_MS - 1000 + i) for i, e in enumerate(ids)])
    timers = DueTimers(horizon_s=5, page=1000, most_held=100)
    timers.own(0)
    timers.own(1)
    fired = []
    for _ in range(4):
        assert await timers.load(db, NOW_MS) == 100
        assert await timers.load(db, NOW_MS) == 0  # full: nothing more comes in
        fired += _drain(timers, NOW_MS)
    assert [e for e, _ in fired] == ids  # each once, earliest first


async def test_a_committed_timer_behind_the_walk_is_held_from_its_commit_one_ahead_comes_with_its_page(db):
    timers = DueTimers(horizon_s=5)
    timers.own(0)
    assert await timers.load(db, NOW_MS) == 0  # the walk of partition 0 has passed NOW_MS + 5 s
    behind, ahead, unowned = _ids(3)
    await _store(db, [(behind, 0, "t", NOW_MS + 2000), (ahead, 0, "t", NOW_MS + 9000)])
    assert timers.committed(behind, "t", NOW_MS + 2000, 0)
    assert not timers.committed(ahead, "t", NOW_MS + 9000, 0)
    assert not timers.committed(unowned, "t", NOW_MS, 3)
    assert [e for e, _ in _drain(timers, NOW_MS + 9000)] == [behind]
    assert await timers.load(db, NOW_MS + 4000) == 1
    assert [e for e, _ in _drain(timers, NOW_MS + 9000)] == [ahead]


async def test_a_timer_committed_while_a_load_runs_is_held_once(db, pg_dsn):
    """The commit may land before or after the load's snapshot; held either way, once."""
    timers = DueTimers(horizon_s=5)
    timers.own(0)
    other = await asyncpg.connect(pg_dsn)
    try:
        for i in range(20):
            (execution_id,) = _ids(1)
            now_ms = NOW_MS + i * 10_000
            load = asyncio.create_task(timers.load(db, now_ms))
            await asyncio.sleep(0)  # the load has marked how far it goes and sent its query
            await _store(other, [(execution_id, 0, "t", now_ms + 3000)])
            timers.committed(execution_id, "t", now_ms + 3000, 0)
            await load
            assert [e for e, _ in _drain(timers, now_ms + 3000)] == [execution_id]
    finally:
        await other.close()


async def test_a_partition_owned_again_is_walked_from_its_start(db):
    ids = _ids(3)
    await _store(db, [(e, 0, "t", NOW_MS + i) for i, e in enumerate(ids)])
    timers = DueTimers(horizon_s=5)
    timers.own(0)
    assert await timers.load(db, NOW_MS) == 3
    timers.disown(0)
    assert _drain(timers, NOW_MS + 10) == []  # another worker fires them now
    timers.own(0)
    assert await timers.load(db, NOW_MS) == 3
    assert [e for e, _ in _drain(timers, NOW_MS + 10)] == ids


async def test_a_page_read_under_an_earlier_claim_does_not_move_the_walk_of_the_new_one(db):
    ids = _ids(3)
    await _store(db, [(e, 0, "t", NOW_MS + i) for i, e in enumerate(ids)])
    timers = DueTimers(horizon_s=5, page=2)
    timers.own(0)
    load = asyncio.create_task(timers.load(db, NOW_MS))
    await asyncio.sleep(0)  # its query is out
    timers.disown(0)
    timers.own(0)  # claimed again: whatever the old claim held is gone, the walk starts over
    await load
    assert [e for e, _ in _drain(timers, NOW_MS + 10)] == ids[:2]
    assert await timers.load(db, NOW_MS) == 2  # from the start again, not after ids[1]
    assert [e for e, _ in _drain(timers, NOW_MS + 10)] == ids[:2]


async def test_a_walk_started_again_reads_what_was_set_behind_it_unannounced(db):
    """A timer another worker sets behind the walk is read only if the owner is told (`set_elsewhere`).
    When it may not have been (its listening connection was lost), every owned partition's walk goes
    back to its start; what it holds already it holds once."""
    timers = DueTimers(horizon_s=5)
    timers.own(0)
    timers.own(1)
    (held,) = _ids(1)
    await _store(db, [(held, 0, "t", NOW_MS + 3000)])
    assert await timers.load(db, NOW_MS) == 1  # both walks have passed NOW_MS + 5 s
    behind = _ids(2)
    await _store(db, [(behind[0], 0, "t", NOW_MS + 2000), (behind[1], 1, "t", NOW_MS + 1000)])
    assert await timers.load(db, NOW_MS + 1000) == 0  # untold, the walks do not go back for them
    timers.walk_again()
    assert await timers.load(db, NOW_MS + 1000) == 2
    assert [e for e, _ in _drain(timers, NOW_MS + 3000)] == [behind[1], behind[0], held]


# -- fires through a worker -----------------------------------------------------------


async def test_a_stale_fire_does_nothing_and_the_timer_it_names_no_longer_is_left_alone(
    nats_server_url, pg_dsn, prefix
):
    """A fire for a timer that was replaced or dropped (here: one the execution never had)
    changes nothing, and deletes only a row with its own timer id; the current timer fires."""
    pause = {
        "id": "pause",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "pause", "type": "wait", "duration": "1h"},
            {"id": "after", "type": "set", "values": {"woke": True}},
        ],
    }
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(pause)
        event = trigger_event("stale", 1, tenant="acme", event_type="contact.created")
        execution_id = h.execution_id("acme", "pause", event["event_id"])
        async with h.worker(clock_ms=clock) as worker:
            await h.publish_triggers([event])
            await h.wait_timer(execution_id, "wait")
            row = await h.db.fetchrow(
                "SELECT timer_id, partition FROM ordo.timers WHERE execution_id = $1::uuid", execution_id
            )
            seq = await h.db.fetchval("SELECT seq FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
            stale_id = row["timer_id"].replace(":wait:", ":retry:")
            assert worker.timers.add(execution_id, stale_id, clock(), row["partition"])
            deadline = asyncio.get_running_loop().time() + 10
            while (execution_id, stale_id) in worker.timers:
                assert asyncio.get_running_loop().time() < deadline, "the stale fire never settled"
                await asyncio.sleep(0.05)
            # Nothing changed: the same seq, the same timer row, still waiting.
            assert (
                await h.db.fetchval("SELECT seq FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
                == seq
            )
            assert (
                await h.db.fetchval("SELECT timer_id FROM ordo.timers WHERE execution_id = $1::uuid", execution_id)
                == row["timer_id"]
            )
            clock.advance(3600_000 + 1000)
            await h.wait_status(execution_id, "completed")
        fired = await h.db.fetch(
            "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'timer_fired'", execution_id
        )
        assert [orjson.loads(r["detail"])["timer_id"] for r in fired] == [row["timer_id"]]
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_timeout_and_its_event_arriving_together_apply_one_after_the_other(nats_server_url, pg_dsn, prefix):
    """Each execution's event timeout falls due as its event arrives: the ring lets one of the
    two through first, and the other then finds nothing to do (a stale fire, or an event no
    longer waited for). Every execution ends one way, with one history and no timer left."""
    count = 60
    reply = {
        "id": "reply",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "wait", "type": "wait_for_event", "event": "contact.replied", "timeout": "1m", "on_timeout": "late"},
            {"id": "answered", "type": "set", "values": {"answered": True}, "next": "end"},
            {"id": "late", "type": "set", "values": {"answered": False}},
            {"id": "end", "type": "end"},
        ],
    }
    clock = Clock()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(reply)
        created = [trigger_event("race", i, tenant="acme", event_type="contact.created") for i in range(count)]
        ids = [h.execution_id("acme", "reply", e["event_id"]) for e in created]
        async with h.worker(clock_ms=clock):
            await h.publish_triggers(created)
            await h.wait_until("SELECT count(*) FROM ordo.event_waits", expect=count)
            replies = []
            for i, e in enumerate(created):
                r = trigger_event("race-reply", i, tenant="acme", event_type="contact.replied")
                r["contact"] = e["contact"]
                replies.append(r)
            # The timeouts fall due in half a second; the replies arrive over a second around then.
            clock.advance(59_500)
            for i in range(0, count, 6):
                await h.publish_triggers(replies[i : i + 6])
                await asyncio.sleep(0.1)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count)
        rows = await h.db.fetch(
            "SELECT execution_id::text, array_agg(kind ORDER BY seq) AS kinds FROM ordo.transitions"
            " WHERE execution_id = ANY($1::uuid[]) GROUP BY execution_id",
            ids,
        )
        assert len(rows) == count
        for r in rows:
            kinds = list(r["kinds"])
            assert (kinds.count("event_received"), kinds.count("timed_out")) in ((1, 0), (0, 1)), kinds
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await h.db.fetchval("SELECT count(*) FROM ordo.event_waits") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_short_waits_enrolled_by_a_worker_that_does_not_own_their_partition_fire(nats_server_url, pg_dsn, prefix):
    """An enrolment runs where its trigger is consumed, so half of these 2 s waits are set by the
    worker that does not own their partition, behind the owner's walk (it reads 5 s ahead): the
    commit tells the owner, whose walk goes back for them. Before, they waited for a restart."""
    short = {
        "id": "short",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [{"id": "pause", "type": "wait", "duration": "2s"}, {"id": "done", "type": "end"}],
    }
    count = 200
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(short)
        async with h.worker(0, 2), h.worker(1, 2):
            await h.wait_until(
                "SELECT count(DISTINCT owner) FROM ordo.partitions WHERE owner IS NOT NULL", expect=2, timeout=20
            )
            events = [trigger_event("short", i, tenant="acme") for i in range(count)]
            for start in range(0, count, 20):  # over a few seconds: the walks move on meanwhile
                await h.publish_triggers(events[start : start + 20])
                await h.wait_until("SELECT count(*) FROM ordo.executions", expect=start + 20, timeout=20)
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=30
            )
        assert await h.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await h.ledger_problems() == NO_PROBLEMS
