"""Per-action concurrency limits that follow the action's latency (daemon/call_limits.py).

A simulated provider answers each call in a time that depends on how many
calls it holds: the tests drive the limit with those latencies, no clock.
"""

import asyncio

from daemon.call_limits import CallLimit


def _drive(limit: CallLimit, latency_at, calls: int = 20_000, offered: int = 10_000) -> list[int]:
    """Offer `offered` calls at once, over and over; each finishes in latency_at(calls in flight).

    Returns the limit after each round of releases.
    """
    seen = []
    done = 0
    while done < calls:
        running = 0
        while running < offered and limit.try_acquire():
            running += 1
        took = latency_at(limit.in_use)
        for _ in range(running):
            limit.release(took)
        done += running
        seen.append(limit.limit)
    return seen


def test_a_limit_that_binds_grows_while_calls_take_as_long_as_ever():
    limit = CallLimit(initial=256, minimum=256, maximum=4096)
    seen = _drive(limit, lambda in_flight: 0.1, calls=200_000)  # a provider that never slows: 100 ms a call
    assert seen[-1] == 4096 and seen == sorted(seen)


def test_a_limit_shrinks_to_about_what_the_provider_holds_without_queueing():
    # Up to 300 calls at once take 20 ms; past that, each call waits for the ones before it.
    def provider(in_flight: int) -> float:
        return 0.02 * max(1.0, in_flight / 300)

    limit = CallLimit(initial=64, minimum=64, maximum=4096)
    seen = _drive(limit, provider, calls=400_000)
    assert max(seen) > 300  # it grew past the provider's room, saw the calls queue ...
    assert 150 <= min(seen[-50:]) and max(seen[-50:]) <= 900, seen[-50:]  # ... and keeps about to it


def test_a_limit_that_is_not_reached_does_not_grow():
    limit = CallLimit(initial=64, minimum=64, maximum=4096)
    _drive(limit, lambda in_flight: 0.05, offered=10)  # ten calls at a time, far below the limit
    assert limit.limit == 64


def test_a_provider_that_became_slower_for_good_brings_the_limit_back_to_the_configured_one_not_below():
    slow = []

    def provider(in_flight: int) -> float:
        return 0.5 if slow else 0.02  # 20 ms, then 500 ms whatever the load

    limit = CallLimit(initial=128, minimum=128, maximum=4096)
    _drive(limit, provider, calls=100_000)
    assert limit.limit > 1000
    slow.append(True)
    seen = _drive(limit, provider, calls=100_000)
    assert seen[-1] == 128 and min(seen) == 128


def test_calls_past_the_limit_wait_for_a_slot_in_order_and_a_cancelled_wait_gives_nothing_back():
    async def scenario():
        limit = CallLimit(initial=1, minimum=1, maximum=1)
        await limit.acquire()
        order = []

        async def call(name):
            await limit.acquire()
            order.append(name)

        first = asyncio.ensure_future(call("first"))
        cancelled = asyncio.ensure_future(call("cancelled"))
        last = asyncio.ensure_future(call("last"))
        await asyncio.sleep(0)
        assert limit.in_use == 1 and not order
        cancelled.cancel()
        limit.release(0.01)
        await first
        limit.release(0.01)
        await last
        assert order == ["first", "last"] and limit.in_use == 1
        limit.release(0.01)
        assert limit.in_use == 0

    asyncio.run(scenario())
