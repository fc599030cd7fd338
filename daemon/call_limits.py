"""How many calls of one in-process action run at once, sized from the action's own latency.

A fixed number of slots caps an action at slots / latency: 256 slots and a
100 ms provider allow ~2,500 calls/s however many more the provider could
take, while a provider that slows down under load gets ever more calls queued
at it. Each action gets a limit of its own instead, adjusted as TCP Vegas
adjusts its window (and as Netflix's concurrency-limits library does): while
calls take about as long as the fastest recent ones, nothing is queueing at
the provider, and a limit that was reached grows; when they take clearly
longer, the provider is queueing them and the limit shrinks in proportion.
The limit stays within [minimum, maximum]: the minimum is the configured
`action_concurrency`, so an action whose provider became slower for good is
back where a fixed limit would have kept it, never below; the maximum bounds
the memory of the calls in flight.
"""

import asyncio
import math
from collections import deque

#: Calls are "queueing" when they take this many times the no-load latency ...
_TOLERANCE = 2.0
#: ... and at least this many seconds more (a 20 µs call that took 60 µs waited for the event loop,
#: not for its provider).
_QUEUEING_FLOOR_S = 0.005


class CallLimit:
    """A counting semaphore whose size follows the latency of the calls it admits."""

    def __init__(self, initial: int, minimum: int, maximum: int, on_change=None):
        #: Called with the new limit whenever it changes (a metric).
        self._on_change = on_change
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.limit = min(max(initial, self.minimum), self.maximum)
        self.in_use = 0
        self._waiters: deque = deque()
        self._fastest = math.inf
        self._round_fastest = math.inf
        self._round_calls = 0
        self._round_seconds = 0.0
        #: Whether calls had to wait for a slot this round: only a limit that binds may grow.
        self._round_reached = False

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits for one."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        self._round_reached = True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        await self.wait_for_slot()

    async def wait_for_slot(self) -> None:
        """Wait for the slot that `try_acquire` could not take (callers on a hot path try first:
        a free slot then costs no coroutine)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot was taken on our behalf by the release that woke us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(None)  # woken and cancelled at once: give the slot back
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, seconds: float | None) -> None:
        """Give a slot back; `seconds` is how long the call took (None: it did not run)."""
        self.in_use -= 1
        if seconds is not None:
            self._observe(seconds)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    def _observe(self, seconds: float) -> None:
        self._round_calls += 1
        self._round_seconds += seconds
        self._round_fastest = min(self._round_fastest, seconds)
        # A round is about one limit's worth of calls: long enough to average, short enough to follow.
        if self._round_calls < max(16, self.limit // 2):
            return
        mean = self._round_seconds / self._round_calls
        # The no-load latency: the fastest call seen. (Letting it age drifted it up to the latency
        # of calls queued at the provider, and the limit with it.)
        self._fastest = min(self._fastest, self._round_fastest)
        queueing = mean - self._fastest
        before = self.limit
        if queueing > max(self._fastest * (_TOLERANCE - 1.0), _QUEUEING_FLOOR_S):
            # The provider is queueing calls: shrink in proportion, at most by half.
            target = self._fastest * _TOLERANCE
            self.limit = max(self.minimum, int(self.limit * min(1.0, max(0.5, target / mean))))
        elif self._round_reached:
            self.limit = min(self.maximum, self.limit + max(1, int(math.sqrt(self.limit))))
        if self.limit != before:
            if self._on_change is not None:
                self._on_change(self.limit)
            if self.limit > before:
                self._wake()
        self._round_calls = 0
        self._round_seconds = 0.0
        self._round_fastest = math.inf
        self._round_reached = False


class CallLimits:
    """One CallLimit per action (name, major), made on first use."""

    def __init__(self, initial: int, minimum: int, maximum: int, on_change=None):
        self.initial = initial
        self.minimum = minimum
        self.maximum = maximum
        #: Called with (action, major, limit) when an action's limit is made or changes.
        self._on_change = on_change
        self._limits: dict[tuple[str, int], CallLimit] = {}

    def of(self, action: str, major: int) -> CallLimit:
        limit = self._limits.get((action, major))
        if limit is None:
            report = None if self._on_change is None else lambda n: self._on_change(action, major, n)
            limit = self._limits[(action, major)] = CallLimit(self.initial, self.minimum, self.maximum, report)
            if report is not None:
                report(limit.limit)
        return limit

    def total(self) -> int:
        """The sum of the current limits: how many calls may run at once now."""
        return sum(limit.limit for limit in self._limits.values())
