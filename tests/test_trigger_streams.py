"""Triggers spread over several streams (trigger_streams > 1), on real NATS and Postgres.

With more than one triggers stream, the lane of an event is chosen by the NATS
account's subject mapping before a stream stores it; each lane's stream is
`<PREFIX>_TRIGGERS_<lane % trigger_streams>`. The workers check the mapping at
start-up, and a change of the setting moves lanes only out of drained streams.
"""

import asyncio
from collections import Counter

import nats
import pytest
from harness import NO_PROBLEMS, Harness, ordo, welcome_workflow

from bench.generator import publish_events, trigger_event
from daemon.lanes import lane_of
from daemon.topology import StreamSetupError, Topology, TriggerMappingError

TENANTS = [f"tenant-{n}" for n in range(12)]


def _mapping_line(prefix: str) -> str:
    """The mapping of 16 lanes, as an operator adds it to the NATS configuration."""
    return f'"{prefix}.triggers.*.>": "{prefix}.triggers.{{{{partition(16,1)}}}}.{{{{wildcard(1)}}}}.>"'


async def _stored(h: Harness, stream: str) -> int:
    return (await h.js.stream_info(stream)).state.messages


async def test_each_lane_is_stored_in_its_own_stream_and_every_event_is_enrolled_in_order(
    nats_server_url, pg_dsn, prefix, map_triggers
):
    h = Harness(nats_server_url, pg_dsn, prefix, trigger_streams=4)
    map_triggers(h.topology)
    async with h:  # creates the streams and checks the mapping: the check stores nothing
        t = h.topology
        assert [await _stored(h, name) for name in t.trigger_stream_names()] == [0, 0, 0, 0]
        for tenant in TENANTS:
            await h.deploy(welcome_workflow(tenant))
        events = [trigger_event("spread", i, tenant=TENANTS[i % len(TENANTS)]) for i in range(600)]
        # Atomic batches of mixed tenants: the generator sends each stream's share as a batch of its own
        # (JetStream refuses a batch over two streams).
        assert await publish_events(h.js, t, iter(events), atomic_batch=50) == 600

        # Every event is in the stream of its tenant's lane, filed under that lane, as published.
        for tenant in TENANTS[:3]:
            lane = lane_of(tenant, t.lanes)
            seq = await h.publish_raw(t.trigger_subject(tenant, "other.event"), b"{}")
            stored = (await h.js.get_msg(t.trigger_stream_of(lane), seq)).subject
            assert stored == f"{prefix}.triggers.{lane}.{tenant}.other.event"
        per_stream = Counter(t.tenant_stream(e["tenant"]) for e in events)
        per_stream.update(t.tenant_stream(tenant) for tenant in TENANTS[:3])
        assert {name: await _stored(h, name) for name in t.trigger_stream_names()} == {
            name: per_stream[name] for name in t.trigger_stream_names()
        }
        assert len(per_stream) > 1

        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=600)
            await h.wait_triggers_drained()
        # Each lane's consumer is on its lane's stream.
        for lane, consumer in enumerate(await h.lane_consumers()):
            info = await h.js.consumer_info(t.trigger_stream_of(lane), consumer)
            assert info.config.filter_subject == t.lane_filter(lane)
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_the_lag_of_a_workers_lanes_is_reported_per_triggers_stream(
    nats_server_url, pg_dsn, prefix, map_triggers
):
    """Each triggers stream's lag is what waits there for this worker's lanes (before, one
    `ORDO_TRIGGERS` series held the sum over all streams, under a name none of them has)."""
    from types import SimpleNamespace

    from daemon.config import Config
    from daemon.intake import Window
    from daemon.lanes import Lanes

    h = Harness(nats_server_url, pg_dsn, prefix, trigger_streams=4)
    map_triggers(h.topology)
    async with h:
        t = h.topology
        events = [trigger_event("lag", i, tenant=TENANTS[i % len(TENANTS)]) for i in range(240)]
        assert await publish_events(h.js, t, iter(events), atomic_batch=50) == 240
        config = Config(trigger_streams=4)
        window, stopping = Window(config), asyncio.Event()
        lanes = Lanes(config, topology=t, window=window, stopping=stopping, js=h.js, fetch=lambda lane: None)

        async def subscribe(lane: int, durable: str):  # consumers that nobody pulls from: all of it waits
            return SimpleNamespace(stream=t.trigger_stream_of(lane), consumer=durable)

        for partition in (0, 1):  # this worker's: half the lanes, in two of the four streams
            await lanes.start(partition, 1, subscribe)
        ours = set(t.lanes_of(0) + t.lanes_of(1))
        waiting = Counter(t.tenant_stream(e["tenant"]) for e in events if lane_of(e["tenant"], t.lanes) in ours)
        assert await lanes.measure(0) == ({stream: n for stream, n in waiting.items() if n}, [])
        assert len(waiting) > 1


async def test_a_worker_refuses_several_streams_without_the_mapping_and_prints_it(nats_server_url, prefix, nats):
    from daemon.config import Config

    topology = Topology(Config(prefix=prefix, trigger_streams=4))
    js = nats.jetstream()
    with pytest.raises(TriggerMappingError) as refused:
        await topology.ensure(js)
    message = str(refused.value)
    assert "trigger_streams = 4" in message and "reached no stream" in message
    assert topology.nats_mapping() in message
    assert _mapping_line(prefix) in message
    # The probes stored nothing.
    for name in topology.trigger_stream_names():
        assert (await js.stream_info(name)).state.messages == 0


async def test_a_mapping_of_another_lane_count_is_refused(nats_server_url, prefix, nats, map_triggers):
    """Mapped into 3 lanes where the workers expect 16 in 16 streams: lane 3 and up get nothing,
    and a probe of such a lane reaches another lane's stream."""
    from daemon.config import Config

    map_triggers(Topology(Config(prefix=prefix, trigger_lanes=3)))
    topology = Topology(Config(prefix=prefix, trigger_streams=16))
    with pytest.raises(TriggerMappingError, match="reached another stream"):
        await topology.ensure(nats.jetstream())


async def test_changing_the_setting_waits_for_the_old_stream_to_drain_and_then_moves_the_lanes(
    nats_server_url, pg_dsn, prefix, map_triggers
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:  # one triggers stream
        for tenant in TENANTS:
            await h.deploy(welcome_workflow(tenant))
        before = [trigger_event("before", i, tenant=TENANTS[i % len(TENANTS)]) for i in range(120)]
        await h.publish_triggers(before)

        spread = Harness(nats_server_url, pg_dsn, prefix, trigger_streams=4)
        map_triggers(spread.topology)
        # Not enrolled yet: refused, naming the stream and what it still holds; nothing is deleted.
        with pytest.raises(StreamSetupError, match=rf"{h.topology.triggers_stream} still holds 120 event"):
            await spread.topology.ensure(h.js)
        assert await _stored(h, h.topology.triggers_stream) == 120

        async with h.worker():
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=120)
            await h.wait_triggers_drained()
            # Drained, but a worker of the old setting still pulls from it: refused, nothing deleted.
            with pytest.raises(StreamSetupError, match="still being consumed"):
                await spread.topology.ensure(h.js)
            assert await _stored(h, h.topology.triggers_stream) == 120

    async with spread as s:  # drained: the old stream goes, the lanes move to their streams
        names = [info.config.name for info in await s.topology._streams_info(s.js)]
        assert h.topology.triggers_stream not in names
        assert set(s.topology.trigger_stream_names()) <= set(names)
        after = [trigger_event("after", i, tenant=TENANTS[i % len(TENANTS)]) for i in range(120)]
        await s.publish_triggers(after)
        async with s.worker():
            await s.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=240)
            await s.wait_triggers_drained()
        assert await s.ledger_problems() == NO_PROBLEMS


async def test_ordo_run_without_the_mapping_stops_with_one_message_naming_it_and_nats_mapping_prints_it(
    nats_server_url, pg_dsn, prefix
):
    settings = {"ORDO_NATS_URL": nats_server_url, "ORDO_PG_DSN": pg_dsn, "ORDO_PREFIX": prefix}
    settings |= {"ORDO_TRIGGER_STREAMS": "4", "ORDO_LOG_LEVEL": "warning"}
    run = await asyncio.to_thread(ordo, "run", "--worker-index", "0", "--workers", "1", env_extra=settings)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "ordo: trigger_streams = 4 needs the NATS account" in run.stderr
    mapping = await asyncio.to_thread(ordo, "nats-mapping", env_extra=settings, check=True)
    assert _mapping_line(prefix) in mapping.stdout


@pytest.mark.parametrize("atomic", [True, False], ids=["batched", "single"])
async def test_the_benchs_quiet_tenants_publish_into_their_lanes_streams(nats_server_url, prefix, map_triggers, atomic):
    """w7-noisy's quiet load: the events due together go out as one atomic batch per stream, or each alone."""
    import time

    from bench.quiet_load import publish_quiet
    from daemon.config import Config

    topology = Topology(Config(nats_url=nats_server_url, prefix=prefix, trigger_streams=4))
    map_triggers(topology)
    nc = await nats.connect(nats_server_url)
    try:
        js = nc.jetstream()
        await topology.ensure(js)
        sent, pubacks = await publish_quiet(
            js, topology, "quiet", "contact.created", TENANTS, 40.0, 1.0, atomic=atomic, started=time.time()
        )
        assert sent == 40 * len(TENANTS) == len(list(pubacks.pairs()))
        expected = Counter(topology.tenant_stream(tenant) for tenant in TENANTS)
        for name in topology.trigger_stream_names():
            assert (await js.stream_info(name)).state.messages == 40 * expected[name]
    finally:
        await nc.close()
