"""Tenant fairness for triggers: lanes, fair turns, and per-contact routing order (real NATS and Postgres).

Tenants here and their lanes (16 lanes, the default; the harness has 4
partitions, so lane L is served by the owner of partition L % 4):
noisy -> 5, quiet -> 7, n6 -> 5 (shares noisy's lane), heavy -> 0, kilo -> 0,
acme -> 15, echo -> 4.
"""

import asyncio
import os
from types import SimpleNamespace

import nats
import orjson
import pytest
from harness import NO_PROBLEMS, QUICK_LEASES, Harness, welcome_workflow

from bench.generator import trigger_event
from daemon.config import Config
from daemon.intake import Window
from daemon.lanes import (
    ACTIVE_S,
    PULLS_AHEAD,
    TURNS_AHEAD,
    FairShare,
    Lane,
    Lanes,
    lane_of,
    lane_weights,
    parse_weights,
)

#: Waits for a contact's `contact.updated` events, one after another, for as long as they come.
LISTENER = {
    "id": "listener",
    "tenant": "acme",
    "trigger": {"event": "session.started"},
    "limits": {"max_visits": 10000},
    "steps": [
        {"id": "listen", "type": "wait_for_event", "event": "contact.updated", "timeout": "1h"},
        {"id": "again", "type": "goto", "target": "listen"},
    ],
}


def _update(contact_id: str, event_id: str) -> dict:
    return {
        "v": 1,
        "event_id": event_id,
        "tenant": "acme",
        "type": "contact.updated",
        "contact": {"id": contact_id},
        "data": {"event_id": event_id},
        "ts": 0,
    }


async def _received(h: Harness, execution_id: str, count: int) -> list[str]:
    """Once the execution has received `count` events: their ids, in the order it received them."""
    await h.wait_until(
        "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'event_received'",
        execution_id,
        expect=count,
    )
    rows = await h.db.fetch(
        "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'event_received' ORDER BY seq",
        execution_id,
    )
    return [orjson.loads(r["detail"])["event_id"] for r in rows]


async def _publish_interleaved(h: Harness, contact_id: str, per_publisher: int) -> list[str]:
    """Two publishers on connections of their own send one contact's events at once; returns
    the event ids in the order the triggers stream stored them."""
    subject = h.topology.trigger_subject("acme", "contact.updated")
    stored: list[tuple[int, str]] = []

    async def publisher(name: str) -> None:
        nc = await nats.connect(h.config.nats_servers)
        js = nc.jetstream()
        try:
            for i in range(per_publisher):
                event = _update(contact_id, f"{name}-{i}")
                ack = await js.publish(subject, orjson.dumps(event), headers={"Nats-Msg-Id": f"acme:{name}-{i}"})
                stored.append((ack.seq, event["event_id"]))
        finally:
            await nc.close()

    await asyncio.gather(publisher("a"), publisher("b"))
    return [event_id for _, event_id in sorted(stored)]


async def test_a_tenants_triggers_are_filed_under_the_lane_nats_partitions_its_token_into(
    nats_server_url, pg_dsn, prefix
):
    """The stream's transform and daemon/lanes.py's lane_of agree; publishers keep their subjects,
    and a subject without a tenant and an event type is refused to the publisher, not lost."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        t = h.topology
        for tenant in ("noisy", "quiet", "n6", "acme", "tenant-17", "a"):
            seq = await h.publish_raw(t.trigger_subject(tenant, "contact.created"), b"{}")
            stored = (await h.js.get_msg(t.triggers_stream, seq)).subject
            assert stored == f"{prefix}.triggers.{lane_of(tenant, t.lanes)}.{tenant}.contact.created"
            assert t.published_subject(stored) == t.trigger_subject(tenant, "contact.created")
        assert lane_of("noisy", 16) == lane_of("n6", 16) != lane_of("quiet", 16)
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await h.js.publish(f"{prefix}.triggers.notenant", b"{}")


def test_tenant_weights_are_parsed_with_an_error_naming_the_bad_entry():
    assert parse_weights(" acme=4, bigco=2 ,") == {"acme": 4, "bigco": 2}
    assert lane_weights({"noisy": 3, "n6": 5, "quiet": 2}, 16) == {5: 5, 7: 2}
    for bad in ("acme", "acme=0", "acme=x", "=3"):
        with pytest.raises(ValueError, match="tenant_weights"):
            parse_weights(bad)


async def test_a_noisy_tenants_backlog_does_not_delay_a_quiet_tenant_in_another_lane(nats_server_url, pg_dsn, prefix):
    """10,000 queued triggers of `noisy`, then one of `quiet` (another lane) and one of `n6`
    (noisy's lane). Bound: quiet's trigger is taken before the worker has taken more than one
    window plus one pull of noisy's (max_ack_pending + fetch_batch = 500 events, 5% of the
    backlog); in one FIFO it came after all 10,000. A tenant that shares the noisy tenant's lane
    waits behind its backlog, in stream order: n6's trigger comes after (nearly) all of it."""
    window, batch = 400, 100
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        for tenant in ("noisy", "quiet", "n6"):
            await h.deploy(welcome_workflow(tenant))
        noisy = [trigger_event("burst", i, tenant="noisy") for i in range(10_000)]
        await h.publish_triggers(noisy)
        await h.publish_triggers([trigger_event("q", 0, tenant="quiet"), trigger_event("n", 0, tenant="n6")])
        async with h.worker(max_ack_pending=window, fetch_batch=batch, trigger_quantum=50):
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=10_002, timeout=120)
            await h.wait_triggers_drained()
        ahead = """SELECT count(*) FROM ordo.executions n, ordo.executions x
                   WHERE n.tenant = 'noisy' AND x.tenant = $1 AND n.created_at < x.created_at"""
        quiet_ahead = await h.db.fetchval(ahead, "quiet")
        neighbour_ahead = await h.db.fetchval(ahead, "n6")
        assert quiet_ahead <= window + batch, f"{quiet_ahead} of noisy's triggers were taken before quiet's"
        assert neighbour_ahead >= 9_000, f"n6 shares noisy's lane, yet only {neighbour_ahead} came before it"
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_busy_lanes_share_the_window_by_their_tenants_weights(nats_server_url, pg_dsn, prefix):
    """`heavy` (weight 3, lane 0) and `echo` (weight 1, lane 4), 3,000 queued triggers each:
    while both have a backlog the worker takes about three of heavy's for one of echo's."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        for tenant in ("heavy", "echo"):
            await h.deploy(welcome_workflow(tenant))
        events = [trigger_event("h", i, tenant="heavy") for i in range(3000)]
        events += [trigger_event("e", i, tenant="echo") for i in range(3000)]
        await h.publish_triggers(events)
        async with h.worker(max_ack_pending=400, fetch_batch=100, trigger_quantum=40, tenant_weights="heavy=3"):
            await h.wait_until("SELECT count(*) FROM ordo.executions", expect=6000, timeout=120)
        # The first 3,600 taken: both lanes still had a backlog then (heavy's lasts ~4,000 at 3:1).
        # Echo's pulls are a third of heavy's and come back sooner: it may be TURNS_AHEAD turns ahead.
        first = await h.db.fetch("SELECT tenant FROM ordo.executions ORDER BY created_at LIMIT 3600")
        heavy = sum(1 for r in first if r["tenant"] == "heavy")
        ratio = heavy / (len(first) - heavy)
        assert 2.4 <= ratio <= 3.6, f"heavy:echo was {ratio:.2f} in the first 3,600 ({heavy} heavy)"


def _window(**settings) -> tuple[Config, Window, asyncio.Event]:
    """A worker's config (16 lanes, as the tenants above), its in-flight window with no in-process
    action calls waiting, and its stop event."""
    config = Config(trigger_lanes=16, **settings)
    window = Window(config)
    window.effects = SimpleNamespace(pending=0, backlog=0)
    return config, window, asyncio.Event()


def _lanes(config: Config, window: Window, stopping: asyncio.Event) -> Lanes:
    """The worker's lanes with no JetStream behind them: their turns and their pulls' accounts only."""
    return Lanes(
        config,
        topology=SimpleNamespace(lanes=config.trigger_lanes),
        window=window,
        stopping=stopping,
        js=None,
        fetch=None,
    )


async def _loop_turns() -> None:
    """A few turns of the event loop: enough for FairShare to hand out a turn the window has room for."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_quiet_lane_keeps_a_probe_open_and_a_busy_one_takes_turns():
    """FairShare alone: grants go round by weight among busy lanes, and a lane waits while the window is full."""
    config, window, stopping = _window(max_ack_pending=1000, fetch_batch=500, trigger_quantum=100)
    fair = FairShare(config, window, stopping)
    assert fair.probe == 15  # 1000 // (4 x 16): every lane can keep one open
    runner = asyncio.create_task(fair.run())
    heavy, light = Lane(0, 0, 1, 3), Lane(1, 1, 1, 1)
    # Alone with a backlog, a lane takes a whole pull per turn: there is no one to be fair to.
    fair.busy = {0}
    assert await asyncio.wait_for(fair.turn(heavy), 1) == 500
    window.unreserve(500)
    heavy.deficit = 0
    fair.busy = {0, 1}
    grants = [await asyncio.wait_for(fair.turn(heavy), 1), await asyncio.wait_for(fair.turn(light), 1)]
    assert grants == [300, 100] and window.reserved == 400
    window.arrived(400)  # the pulls brought all of it
    window.release(400)  # and it committed
    # Each pull brought what it was granted (Lanes.took charges it). Heavy's pulls come back before
    # light's: it takes turns ahead of light's, TURNS_AHEAD at most, then waits for light's next.
    heavy.deficit, light.deficit = heavy.deficit - 300, light.deficit - 100
    for _ in range(TURNS_AHEAD - 1):  # (its turn alone counts too)
        assert await asyncio.wait_for(fair.turn(heavy), 1) == 300
        window.arrived(300)
        window.release(300)
        heavy.deficit -= 300
    held = asyncio.create_task(fair.turn(heavy))
    await _loop_turns()
    assert not held.done()  # TURNS_AHEAD turns ahead of light, whose pull is out
    window.add(800)  # meanwhile the window fills
    assert await asyncio.wait_for(fair.turn(light), 1) == 100 and window.in_flight + window.reserved == 900
    await _loop_turns()
    assert not held.done()  # its turn has come, but over-quota work waits in JetStream, not in the worker
    window.release(500)  # its whole grant fits again
    assert await asyncio.wait_for(held, 1) == 300 and window.in_flight + window.reserved == 700
    stopping.set()
    await runner


async def test_a_weight_whose_share_is_more_than_one_pull_still_counts_in_full():
    """heavy (weight 3) and light (weight 1), a quantum of 40 and pulls of at most 100: heavy's
    share of 120 does not fit one pull, so the quantum is scaled to 33 and the lanes, pulling as
    fast as they can, get 3:1 (99:33), not the 100:40 of a share cut to one pull."""
    config, window, stopping = _window(max_ack_pending=400, fetch_batch=100, trigger_quantum=40)
    fair = FairShare(config, window, stopping)
    runner = asyncio.create_task(fair.run())
    heavy, light = Lane(0, 0, 1, 3), Lane(1, 1, 1, 1)
    fair.busy = {0, 1}
    taken = {0: 0, 1: 0}

    async def pull_while_busy(lane: Lane) -> None:
        while sum(taken.values()) < 4000:
            grant = await fair.turn(lane)
            await asyncio.sleep(0)  # the pull's round trip
            window.arrived(grant)  # it brought all it was granted (Lanes.took charges it)
            lane.deficit -= grant
            taken[lane.index] += grant
            window.release(grant)  # committed

    await asyncio.wait_for(asyncio.gather(pull_while_busy(heavy), pull_while_busy(light)), 10)
    ratio = taken[0] / taken[1]
    assert 2.8 <= ratio <= 3.2, f"heavy:light was {ratio:.2f} ({taken})"
    stopping.set()
    await runner


async def test_a_lane_takes_turns_while_its_consumer_holds_more_not_when_its_pull_came_back_full():
    """What the consumer still held after a pull's last message (the delivery's `pending`) says
    whether a lane has a backlog. A quiet lane's probe fills up as its events trickle in: were it
    a backlog, the lane would take turns, and a busy lane would be held behind a pull that lingers
    until it expires. A pull of batches comes back short of its grant in messages (bounded by
    bytes) with a backlog behind it: that lane takes turns."""
    config, window, stopping = _window(max_ack_pending=1000, fetch_batch=500, trigger_quantum=100)
    lanes = _lanes(config, window, stopping)
    quiet, burst = Lane(3, 3, 1, 1), Lane(5, 1, 1, 1)

    lanes.took(quiet, lanes.fair.probe, lanes.fair.probe, stored_ns=1, pending=0)
    lanes.pull_opens(quiet)
    assert quiet.idle and lanes.fair.busy == set()  # full, and nothing behind it: it keeps probing

    lanes.took(burst, 2, 400, stored_ns=1, pending=900)  # two batches of 200 events filled the bytes
    lanes.pull_opens(burst)
    assert not burst.idle and lanes.fair.busy == {5}

    lanes.took(quiet, lanes.fair.probe, lanes.fair.probe, stored_ns=2, pending=30)  # a spike of its own
    lanes.pull_opens(quiet)
    assert not quiet.idle and lanes.fair.busy == {3, 5}

    lanes.took(burst, 1, 200, stored_ns=2, pending=0)  # the backlog's last batch; its pull stays open
    assert lanes.fair.busy == {3}  # from now on: no lane waits in the turns for that pull
    lanes.pull_opens(burst)
    assert burst.idle and lanes.fair.busy == {3}


async def test_the_one_lane_with_a_backlog_keeps_more_than_one_pull_open():
    """The one busy lane asks for its next turn until PULLS_AHEAD grants are asked for, so that
    JetStream has more than one of its requests to serve; a probing lane opens one pull at a
    time, and so do a lane beside another busy one and a lane whose backlog has all come."""
    config, window, stopping = _window(max_ack_pending=1000, fetch_batch=500, trigger_quantum=100)
    lanes = _lanes(config, window, stopping)
    burst, quiet = Lane(5, 1, 1, 1), Lane(3, 3, 1, 1)
    assert lanes.wants_pull(quiet, outstanding=0) and lanes.wants_pull(burst, outstanding=0)

    lanes.pull_opens(quiet)
    quiet.granted = lanes.fair.probe
    lanes.took(quiet, 1, 1, stored_ns=1, pending=0)
    assert not lanes.wants_pull(quiet, outstanding=lanes.fair.probe - 1)  # its probe stays open alone

    burst.granted = 100
    lanes.took(burst, 100, 100, stored_ns=1, pending=5000)
    lanes.pull_opens(burst)  # a backlog: it takes turns
    assert lanes.wants_pull(burst, outstanding=100)  # one grant asked for: the next turn's pull opens too
    assert not lanes.wants_pull(burst, outstanding=PULLS_AHEAD * 100)
    lanes.took(burst, 1, 1, stored_ns=2, pending=4999)
    assert lanes.wants_pull(burst, outstanding=PULLS_AHEAD * 100 - 1)
    lanes.fair.backlogged(quiet.index)
    assert not lanes.wants_pull(burst, outstanding=1)  # beside another busy lane: one pull at a time
    lanes.fair.quiet(quiet.index)
    lanes.took(burst, 1, 1, stored_ns=3, pending=0)
    assert not lanes.wants_pull(burst, outstanding=100)  # all of it came: no more until these end


async def test_a_busy_lane_is_not_held_behind_a_pull_whose_backlog_has_come():
    """Two busy lanes; the burst's pulls come back at once, the other's stays open. The burst may
    be TURNS_AHEAD turns ahead, then waits, until the other's pull brings the last of its backlog:
    what that pull may still bring comes as it is published, so the burst takes turns again (it
    used to wait up to the pull's expiry, a second, with capacity idle). Its pulls stay quanta
    while the other lane takes events, and are whole pulls once it has been still for ACTIVE_S."""
    config, window, stopping = _window(max_ack_pending=1000, fetch_batch=500, trigger_quantum=100)
    lanes = _lanes(config, window, stopping)
    fair = lanes.fair
    runner = asyncio.create_task(fair.run())
    burst, other = Lane(5, 1, 1, 1), Lane(3, 3, 1, 1)
    fair.backlogged(5)
    fair.backlogged(3)
    other.granted = await asyncio.wait_for(fair.turn(other), 1)  # its pull is out
    for _ in range(TURNS_AHEAD + 1):  # level with the other's one turn, then TURNS_AHEAD beyond
        grant = await asyncio.wait_for(fair.turn(burst), 1)
        window.arrived(grant)
        window.release(grant)
        burst.deficit -= grant
    held = asyncio.create_task(fair.turn(burst))
    await _loop_turns()
    assert not held.done()  # TURNS_AHEAD turns ahead of a lane with a backlog
    window.arrived(3)
    lanes.took(other, 3, 3, stored_ns=1, pending=20)  # some of it came, more is there
    await _loop_turns()
    assert not held.done()
    window.arrived(20)
    lanes.took(other, 20, 20, stored_ns=2, pending=0)  # the rest: its pull now waits for new events
    # The one busy lane now, but the other took events within ACTIVE_S: a quantum, not a whole pull.
    grant = await asyncio.wait_for(held, 1)
    assert grant == 100
    window.arrived(grant)
    window.release(grant)
    burst.deficit -= grant
    fair._took_at[3] -= ACTIVE_S  # the other lane has taken nothing since
    assert await asyncio.wait_for(fair.turn(burst), 1) == 500  # no one to be fair to: a whole pull
    stopping.set()
    await runner


async def test_a_quiet_lanes_probe_waits_for_room_for_itself_not_for_a_busy_lanes_pull():
    """The window full of a burst: a quiet lane's probe opens once its 15 slots are free, while
    the busy lane's turn waits until its whole grant fits (as before, the window was told of
    room only once a fetch_batch fitted, and the probe waited for 500 events to settle)."""
    config, window, stopping = _window(max_ack_pending=1000, fetch_batch=500, trigger_quantum=100)
    fair = FairShare(config, window, stopping)
    runner = asyncio.create_task(fair.run())
    noisy = Lane(5, 1, 1, 1)
    fair.busy = {5}
    window.add(1000)  # the burst's events, taken and not yet committed
    turn = asyncio.create_task(fair.turn(noisy))
    probe = asyncio.create_task(window.wait_for_room(fair.probe, new_work=True))
    await _loop_turns()
    assert not turn.done() and not probe.done()
    window.release(fair.probe)  # 15 of the burst's events committed
    await _loop_turns()
    assert probe.done() and not turn.done()
    window.reserve(fair.probe)
    window.release(500)
    assert await asyncio.wait_for(turn, 1) == 500
    assert window.in_flight + window.reserved == 1000
    stopping.set()
    await runner


async def test_a_quiet_lanes_events_go_into_the_next_commit_ahead_of_a_backlog():
    """LedgerBatcher.add(ahead=True): a quiet lane's trigger goes into the next batch before the
    units queued without; each queue keeps its own order, and a batch still holds at most max_rows."""
    from ledger.batcher import LedgerBatcher, Unit

    batcher = LedgerBatcher("postgresql://unused", max_rows=4, max_ms=0.0)
    for name in ("a", "b", "c", "d", "e"):
        batcher.add(Unit(token=name))  # one row each
    batcher.add(Unit(token="quiet-1"), ahead=True)
    batcher.add(Unit(token="quiet-2"), ahead=True)
    taken = [[u.token for u in await asyncio.wait_for(batcher.next_batch(), 1)] for _ in range(2)]
    assert taken == [["quiet-1", "quiet-2", "a", "b"], ["c", "d", "e"]]
    assert batcher.pending_rows == 0


async def test_one_contacts_events_from_two_publishers_reach_its_execution_in_stream_order(
    nats_server_url, pg_dsn, prefix
):
    """Two workers run; two publishers interleave 40 events each for one contact while its
    execution waits for them: the execution receives them in the order the stream stored them
    (acme's lane is served by one worker, which routes them in that order)."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(LISTENER)
        async with h.worker(0, 2), h.worker(1, 2):
            start = {**_update("c-1", "start"), "type": "session.started"}
            await h.publish_triggers([start])
            execution_id = h.execution_id("acme", "listener", "start")
            await h.wait_status(execution_id, "waiting")
            stored_order = await _publish_interleaved(h, "c-1", 40)
            assert await _received(h, execution_id, 80) == stored_order
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_backlog_taken_through_several_open_pulls_reaches_its_execution_in_stream_order(
    nats_server_url, pg_dsn, prefix
):
    """300 of one contact's events wait in the lane before a worker takes it, with pulls of 10:
    the lane keeps more than one pull open (PULLS_AHEAD), and its events still reach the
    waiting execution one after another, in the order the triggers stream stored them."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(LISTENER)
        execution_id = h.execution_id("acme", "listener", "start")
        async with h.worker():
            await h.publish_triggers([{**_update("c-1", "start"), "type": "session.started"}])
            await h.wait_status(execution_id, "waiting")
        stored_order = await _publish_interleaved(h, "c-1", 150)
        async with h.worker(fetch_batch=10, trigger_quantum=10):
            assert await _received(h, execution_id, 300) == stored_order
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_lane_moves_to_another_worker_when_its_owner_dies_and_nothing_is_lost_or_doubled(
    nats_server_url, pg_dsn, prefix
):
    """Two worker processes take 8 tenants' triggers (every partition serves some lanes) and
    one contact's events; one is killed -9 midway and a new one joins. Every trigger enrolled
    once, the ledger sound, and the listener saw the contact's events in stream order."""
    tenants = ["noisy", "quiet", "heavy", "echo", "acme", "kilo", "n6", "golf"]
    settings = {**QUICK_LEASES, "ack_wait_s": 2.0, "fetch_batch": 50, "max_ack_pending": 400, "batch_max_ms": 10.0}
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        for tenant in tenants:
            if tenant != "acme":
                await h.deploy(welcome_workflow(tenant))
        await h.deploy({**welcome_workflow("acme"), "id": "welcome"})
        await h.deploy(LISTENER)
        first = h.spawn_worker(0, 2, **settings)
        second = h.spawn_worker(1, 2, **settings)
        start = {**_update("c-9", "start"), "type": "session.started"}
        await h.publish_triggers([start])
        execution_id = h.execution_id("acme", "listener", "start")
        await h.wait_status(execution_id, "waiting")
        events = [trigger_event("ho", i, tenant=tenants[i % len(tenants)]) for i in range(8000)]
        publishing = asyncio.create_task(h.publish_triggers(events))
        updates = asyncio.create_task(_publish_interleaved(h, "c-9", 30))
        await h.wait_until(
            "SELECT count(*) >= 1500 FROM ordo.executions WHERE workflow_id = 'welcome'", expect=True, timeout=60
        )
        h.kill(first)
        third = h.spawn_worker(0, 2, **settings)
        await publishing
        stored_order = await updates
        await h.wait_until(
            "SELECT count(DISTINCT event_id) FROM ordo.executions WHERE workflow_id = 'welcome'",
            expect=len(events),
            timeout=120,
        )
        received = await _received(h, execution_id, 60)
        await h.wait_triggers_drained(timeout=60)
        for proc in (second, third):
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
        assert await h.db.fetchval("SELECT count(*) FROM ordo.executions WHERE workflow_id = 'welcome'") == len(events)
        assert received == stored_order
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_sighup_reloads_tenant_weights_and_a_malformed_setting_changes_nothing(
    nats_server_url, pg_dsn, prefix, tmp_path, monkeypatch
):
    """The reload SIGHUP runs (daemon/service.py) gives the running lanes their new weights."""
    from daemon.service import _Service

    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(welcome_workflow("heavy"))
        async with h.worker() as worker:
            lanes = worker.intake.lanes
            heavy_lane = lanes.running[lane_of("heavy", h.topology.lanes)]
            assert heavy_lane.weight == 1
            config_file = tmp_path / "ordo.toml"
            service = _Service(worker.config, worker, str(config_file))
            for name in [n for n in os.environ if n.startswith("ORDO_")]:
                monkeypatch.delenv(name)  # the file alone is under test
            config_file.write_text('tenant_weights = "heavy=5"\n')
            await service._reload()
            assert heavy_lane.weight == 5
            config_file.write_text('tenant_weights = "heavy=lots"\n')
            await service._reload()
            assert heavy_lane.weight == 5
