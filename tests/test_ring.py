"""The ordering ring, compiled and pure: one test body, two implementations.

Every ring a test makes through `make_ring` is drained at tear-down and must
then hold nothing: no items, nothing in flight, nothing ready, no key records
and every slot back on the free list (uvloop's handle counting, for slots).
"""

from __future__ import annotations

import collections
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test


def assert_drained(ring) -> None:
    """Pop and complete whatever is still ready, then check that nothing leaked."""
    while (popped := ring.pop()) is not None:
        ring.complete(popped[0])
    assert (len(ring), ring.in_flight, ring.ready) == (0, 0, 0), ring
    counts = ring._debug_counts()
    assert counts["keys"] == 0 and counts["free"] == ring.capacity, counts
    # The compiled ring also reports its free lists, walked link by link.
    for name in ("free_slots", "free_records"):
        assert counts.get(name, ring.capacity) == ring.capacity, counts


@pytest.fixture
def make_ring(impl):
    rings = []

    def make(capacity: int):
        ring = impl.OrderingRing(capacity)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        assert_drained(ring)


# -- unit tests ------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [0, -1, 2.5, "3", None])
def test_capacity_must_be_a_positive_int(impl, capacity):
    with pytest.raises(ValueError):
        impl.OrderingRing(capacity)


def test_empty_ring(make_ring):
    ring = make_ring(4)
    assert ring.capacity == 4
    assert (len(ring), ring.in_flight, ring.ready, ring.is_full()) == (0, 0, 0, False)
    assert ring.pop() is None
    assert ring.pop_many(3) == []
    assert ring.pending("a") == 0


def test_one_key_is_fifo_with_one_in_flight(make_ring):
    ring = make_ring(8)
    for item in ("a1", "a2", "a3"):
        assert ring.push("a", item)
    assert (len(ring), ring.ready, ring.pending("a")) == (3, 1, 3)
    assert ring.pop() == ("a", "a1")
    assert ring.pop() is None  # a2 waits until a1 completes
    assert (ring.in_flight, ring.ready, ring.pending("a")) == (1, 0, 3)
    ring.complete("a")
    assert ring.pending("a") == 2
    assert ring.pop() == ("a", "a2")
    ring.complete("a")
    assert ring.pop() == ("a", "a3")
    ring.complete("a")
    assert ring.pending("a") == 0


def test_keys_proceed_concurrently_in_ready_order(make_ring):
    ring = make_ring(8)
    ring.push("a", 1)
    ring.push("b", 2)
    ring.push("a", 3)
    ring.push("c", 4)
    assert ring.ready == 3
    assert ring.pop_many(10) == [("a", 1), ("b", 2), ("c", 4)]
    assert ring.in_flight == 3
    ring.push("d", 5)
    ring.complete("a")  # a's next item becomes ready after d's
    assert ring.pop_many(2) == [("d", 5), ("a", 3)]
    for key in "abcd":
        ring.complete(key)


def test_capacity_counts_in_flight_and_push_refuses_when_full(make_ring):
    ring = make_ring(2)
    assert ring.push("a", 1) and ring.push("b", 2)
    assert ring.is_full()
    assert ring.push("c", 3) is False
    assert (len(ring), ring.pending("c"), ring.ready) == (2, 0, 2)
    assert ring.pop() == ("a", 1)
    assert ring.push("c", 3) is False  # the in-flight item still holds its slot
    ring.complete("a")
    assert not ring.is_full()
    assert ring.push("c", 3) is True
    assert ring.pop_many(5) == [("b", 2), ("c", 3)]
    ring.complete("b")
    ring.complete("c")


def test_complete_requires_the_key_in_flight(make_ring):
    ring = make_ring(4)
    with pytest.raises(KeyError):
        ring.complete("nobody")
    ring.push("a", 1)
    with pytest.raises(KeyError):
        ring.complete("a")  # queued, not in flight
    assert (len(ring), ring.ready, ring.in_flight) == (1, 1, 0)
    ring.pop()
    ring.complete("a")
    with pytest.raises(KeyError):
        ring.complete("a")


def test_any_hashable_key_and_unhashable_rejected(make_ring):
    ring = make_ring(4)
    ring.push(("exec", 7), "x")
    ring.push(42, "y")
    with pytest.raises(TypeError):
        ring.push(["not", "hashable"], "z")
    assert len(ring) == 2
    assert ring.pop_many(2) == [(("exec", 7), "x"), (42, "y")]
    ring.complete(("exec", 7))
    ring.complete(42)


def test_items_are_released_not_kept_alive(make_ring):
    import weakref

    class Item:
        pass

    ring = make_ring(2)
    item = Item()
    ref = weakref.ref(item)
    ring.push("a", item)
    del item
    key, popped = ring.pop()
    del popped
    ring.complete(key)
    assert ref() is None


def test_distinct_keys_leave_no_trace(make_ring):
    """Hundreds of thousands of short-lived keys must not grow memory."""
    ring = make_ring(64)

    def churn(start: int, count: int) -> None:
        for base in range(start, start + count, 64):
            for i in range(base, base + 64):
                ring.push(f"exec-{i}", i)
            for key, _ in ring.pop_many(64):
                ring.complete(key)

    churn(0, 20_000)  # warm up: dict tables, free lists
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(20_000, 200_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ring._debug_counts()["keys"] == 0
    assert grown < 64 * 1024, f"ring grew by {grown} bytes over 200,000 distinct keys"


# -- properties ------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 12),
    ops=st.lists(st.tuples(st.sampled_from(["push", "pop", "complete"]), st.integers(0, 5)), max_size=120),
)
def test_order_kept_nothing_lost_nothing_duplicated(impl, capacity, ops):
    ring = impl.OrderingRing(capacity)
    pushed = collections.defaultdict(list)  # key -> items in push order
    delivered = collections.defaultdict(list)
    in_flight: list = []
    counter = 0
    for op, arg in ops:
        if op == "push":
            counter += 1
            if ring.push(f"k{arg}", counter):
                pushed[f"k{arg}"].append(counter)
        elif op == "pop":
            popped = ring.pop()
            if popped is not None:
                key, item = popped
                assert key not in in_flight, "two items of one key in flight"
                in_flight.append(key)
                delivered[key].append(item)
        elif in_flight:
            ring.complete(in_flight.pop(arg % len(in_flight)))
        assert len(ring) <= capacity
    for key in in_flight:
        ring.complete(key)
    while (popped := ring.pop()) is not None:
        delivered[popped[0]].append(popped[1])
        ring.complete(popped[0])
    assert delivered == pushed
    assert_drained(ring)


class RingModel(RuleBasedStateMachine):
    """Checks every answer of the ring against a plain model, including the exact ready order."""

    impl = None  # set by the test

    def __init__(self):
        super().__init__()
        self.ring = None
        self.queued = collections.defaultdict(collections.deque)
        self.in_flight: set = set()
        self.ready: collections.deque = collections.deque()
        self.counter = 0

    @rule(capacity=st.integers(1, 6))
    @precondition(lambda self: self.ring is None)
    def create(self, capacity):
        self.ring = self.impl.OrderingRing(capacity)
        self.capacity = capacity

    def held(self) -> int:
        return sum(len(q) for q in self.queued.values()) + len(self.in_flight)

    @rule(key=st.sampled_from("abcd"))
    @precondition(lambda self: self.ring is not None)
    def push(self, key):
        self.counter += 1
        accepted = self.ring.push(key, self.counter)
        assert accepted == (self.held() < self.capacity)
        if accepted:
            self.queued[key].append(self.counter)
            if len(self.queued[key]) == 1 and key not in self.in_flight:
                self.ready.append(key)

    def expect_pop(self):
        if not self.ready:
            return None
        key = self.ready.popleft()
        self.in_flight.add(key)
        return key, self.queued[key].popleft()

    @rule()
    @precondition(lambda self: self.ring is not None)
    def pop(self):
        assert self.ring.pop() == self.expect_pop()

    @rule(n=st.integers(0, 4))
    @precondition(lambda self: self.ring is not None)
    def pop_many(self, n):
        expected = [pair for pair in (self.expect_pop() for _ in range(n)) if pair is not None]
        assert self.ring.pop_many(n) == expected

    @rule(data=st.data())
    @precondition(lambda self: self.ring is not None and self.in_flight)
    def complete(self, data):
        key = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.ring.complete(key)
        self.in_flight.remove(key)
        if self.queued[key]:
            self.ready.append(key)

    @rule(key=st.sampled_from("abcdz"))
    @precondition(lambda self: self.ring is not None)
    def complete_not_in_flight(self, key):
        if key in self.in_flight:
            return
        before = (len(self.ring), self.ring.in_flight, self.ring.ready)
        with pytest.raises(KeyError):
            self.ring.complete(key)
        assert (len(self.ring), self.ring.in_flight, self.ring.ready) == before

    @invariant()
    def counters_agree(self):
        if self.ring is None:
            return
        assert len(self.ring) == self.held()
        assert self.ring.in_flight == len(self.in_flight)
        assert self.ring.ready == len(self.ready)
        assert self.ring.is_full() == (self.held() == self.capacity)
        for key in "abcd":
            assert self.ring.pending(key) == len(self.queued[key]) + (key in self.in_flight)

    def teardown(self):
        if self.ring is None:
            return
        for key in list(self.in_flight):
            self.ring.complete(key)
        assert_drained(self.ring)


def test_ring_matches_model(impl):
    machine = type("RingModelFor", (RingModel,), {"impl": impl})
    run_state_machine_as_test(machine, settings=settings(max_examples=150, stateful_step_count=60, deadline=None))
