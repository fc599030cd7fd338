"""Micro-benchmarks of the hot path, compiled against pure (pytest-benchmark), and the envelope.

Run with `pytest -n 0 bench/test_micro_hotpath.py --benchmark-only`; each benchmark
records in `extra_info` how many operations one call does, so that ops/s is
`ops_per_call / median`.
"""

from __future__ import annotations

import pytest

import hotpath

LINEAR = {
    "id": "bench-linear",
    "tenant": "bench",
    "version": 1,
    "trigger": {
        "event": "contact.created",
        "filter": {"all": [{"eq": ["{{contact.country}}", "DE"]}, {"exists": "contact.email"}]},
    },
    "steps": [
        {"id": "s1", "type": "set", "values": {"stage": "new"}},
        {"id": "s2", "type": "set", "values": {"name": "{{contact.name}}"}},
        {"id": "s3", "type": "set", "values": {"score": 10}},
        {"id": "s4", "type": "set", "values": {"greeting": "Hello {{contact.name}}"}},
        {"id": "s5", "type": "set", "values": {"done": True}},
    ],
}
EXECUTIONS = 1000
KEYS = 1000


@pytest.fixture(params=hotpath.implementations(), ids=["compiled", "pure"])
def impl(request):
    name, namespace = request.param
    if namespace is None:
        if hotpath.NO_EXTENSIONS:
            pytest.skip(hotpath.COMPILED_UNAVAILABLE)
        pytest.fail(f"{name}: {hotpath.COMPILED_UNAVAILABLE}")
    return namespace


def test_dispatcher_linear_steps(benchmark, impl):
    """Start EXECUTIONS fresh executions of a 5-step linear `set` workflow."""
    program = impl.Program(LINEAR)
    advance, new_state = impl.advance, impl.ExecutionState
    contact = {"name": "Ann", "country": "DE", "email": "ann@example.com"}

    def run():
        for _ in range(EXECUTIONS):
            advance(program, new_state("e", subject=contact), "start", None)

    benchmark.extra_info["steps_per_call"] = EXECUTIONS * len(LINEAR["steps"])
    benchmark(run)


def test_ring_push_pop_complete(benchmark, impl):
    """One push, one pop and one complete for each of KEYS keys (3 * KEYS operations)."""
    ring = impl.OrderingRing(KEYS)
    keys = [f"exec-{i}" for i in range(KEYS)]

    def run():
        push, pop, complete = ring.push, ring.pop, ring.complete
        for key in keys:
            push(key, key)
        for _ in keys:
            complete(pop()[0])

    benchmark.extra_info["ops_per_call"] = 3 * KEYS
    benchmark(run)
    assert len(ring) == 0


def test_program_matches(benchmark, impl):
    """Program.matches over a batch of trigger events (half match the filter)."""
    program = impl.Program(LINEAR)
    events = [
        {"type": "contact.created", "contact": {"country": "DE" if i % 2 else "FR", "email": "x@y.z"}}
        for i in range(EXECUTIONS)
    ]
    matches = program.matches

    def run():
        for event in events:
            matches(event)

    benchmark.extra_info["matches_per_call"] = EXECUTIONS
    benchmark(run)


# The envelope has one implementation: its JSON work is orjson's (C) already, and what is
# left in Python is a handful of field checks per message, measured here as such.


def _envelope_bodies(kind: str) -> list[bytes]:
    from bench.generator import trigger_event
    from hotpath.envelope import encode

    if kind == "trigger":
        return [encode(trigger_event("micro", i)) for i in range(EXECUTIONS)]
    return [
        encode(
            {
                "v": 1,
                "kind": "signal",
                "execution_id": f"{i:032x}",
                "signal_id": f"s-{i}",
                "name": "tick",
                "data": {"i": i},
            }
        )
        for i in range(EXECUTIONS)
    ]


@pytest.mark.parametrize("kind", ["trigger", "signal"])
def test_envelope_decode(benchmark, kind):
    """decode_triggers / decode_exec (orjson parse + contract checks) of EXECUTIONS trigger
    events, or of EXECUTIONS signals addressed to executions."""
    from hotpath.envelope import decode_exec, decode_triggers

    decode = decode_triggers if kind == "trigger" else decode_exec
    bodies = _envelope_bodies(kind)

    def run():
        for body in bodies:
            decode(body, 65536)

    benchmark.extra_info["messages_per_call"] = EXECUTIONS
    benchmark(run)


def test_envelope_encode(benchmark):
    """encode of EXECUTIONS trigger-event documents."""
    from bench.generator import trigger_event
    from hotpath.envelope import encode

    docs = [trigger_event("micro", i) for i in range(EXECUTIONS)]

    def run():
        for doc in docs:
            encode(doc)

    benchmark.extra_info["messages_per_call"] = EXECUTIONS
    benchmark(run)
