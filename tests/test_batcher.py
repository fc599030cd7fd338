"""The batcher's intake: when a batch is due (group commit, or a wait for company).

No server here: taking a batch is the batcher's own bookkeeping; committing
one is exercised against Postgres by the pipeline and fault tests.
"""

import asyncio

from daemon.config import Config
from ledger.batcher import LedgerBatcher, Unit


def _unit(name: str) -> Unit:
    return Unit(token=name)


async def _taken(batcher: LedgerBatcher) -> list:
    """The batch next_batch() returns within a few turns of the event loop (no timed wait)."""
    taker = asyncio.create_task(batcher.next_batch())
    for _ in range(5):
        await asyncio.sleep(0)
    assert taker.done(), "the batch was not due at once"
    return [u.token for u in taker.result()]


async def test_by_default_a_batch_is_what_came_in_while_the_previous_commit_ran():
    batcher = LedgerBatcher("postgresql://unused", max_rows=10_000, max_ms=Config().batch_max_ms)
    # One fetch's units arrive in one go: they are one batch, taken without waiting for more.
    for name in ("a", "b", "c"):
        batcher.add(_unit(name))
    assert await _taken(batcher) == ["a", "b", "c"]

    # While "the commit" of that batch runs, more arrive; they are the next batch, whole.
    for name in ("d", "e"):
        batcher.add(_unit(name))
        await asyncio.sleep(0)
    assert await _taken(batcher) == ["d", "e"]
    assert batcher.pending_rows == 0

    # An idle batcher wakes for the first unit rather than sleeping out its idle poll.
    taker = asyncio.create_task(batcher.next_batch())
    await asyncio.sleep(0)
    assert not taker.done()
    batcher.add(_unit("f"))
    batch = await asyncio.wait_for(taker, 1.0)
    assert [u.token for u in batch] == ["f"]


async def test_with_a_wait_the_oldest_unit_waits_for_company():
    batcher = LedgerBatcher("postgresql://unused", max_rows=10_000, max_ms=60_000)
    batcher.add(_unit("a"))
    taker = asyncio.create_task(batcher.next_batch())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not taker.done()  # not due: too young and too small
    batcher.add(_unit("b"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not taker.done()
    # Full (max_rows) makes it due at once, however young.
    batcher.max_rows = batcher.pending_rows + 1
    batcher.add(_unit("c"))
    batch = await asyncio.wait_for(taker, 1.0)
    assert [u.token for u in batch] == ["a", "b", "c"]


async def test_a_batch_holds_at_most_max_rows_and_the_rest_stays_due():
    batcher = LedgerBatcher("postgresql://unused", max_rows=5, max_ms=60_000)
    rows = {"a": 2, "b": 2, "c": 2, "big": 9, "d": 1}
    for name, count in rows.items():
        unit = _unit(name)
        unit.dead_letters = [None] * (count - 1)  # a unit's rows: 1 + its dead letters here
        batcher.add(unit)
    assert batcher.pending_rows == 16
    # Oldest first, whole units, never past 5 rows; what is left is due at once, however young.
    assert await _taken(batcher) == ["a", "b"]
    assert await _taken(batcher) == ["c"]
    assert await _taken(batcher) == ["big"]  # bigger than a batch: alone, not split, not stuck
    # The one left is a lone unit that is neither full nor old: it waits for company again.
    assert batcher.pending_rows == 1


async def test_while_a_pull_is_being_enrolled_a_batch_waits_for_the_rest_of_it():
    batcher = LedgerBatcher("postgresql://unused", max_rows=10_000, max_ms=0, most_fill_wait_ms=60_000)
    taker = asyncio.create_task(batcher.next_batch())
    with batcher.filling():
        # Intake yields between slices of a pull; the commit loop does not cut a batch at each one.
        for name in ("a", "b"):
            batcher.add(_unit(name))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not taker.done()
    # The pull is in: the batch holds all of it, due at once.
    assert [u.token for u in await asyncio.wait_for(taker, 1.0)] == ["a", "b"]

    # Full is due at once, pull or no pull.
    batcher.max_rows = 2
    with batcher.filling():
        batcher.add(_unit("c"))
        batcher.add(_unit("d"))
        assert await _taken(batcher) == ["c", "d"]


async def test_a_batch_waits_for_a_pull_being_enrolled_only_so_long():
    batcher = LedgerBatcher("postgresql://unused", max_rows=10_000, max_ms=0, most_fill_wait_ms=1)
    with batcher.filling():
        batcher.add(_unit("a"))
        batch = await asyncio.wait_for(batcher.next_batch(), 1.0)
    assert [u.token for u in batch] == ["a"]
