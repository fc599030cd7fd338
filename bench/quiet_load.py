"""w7-noisy's quiet tenants: a publisher process of their own, as other tenants' services would be.

    python -m bench.quiet_load --run-id R --event-type T --tenants a,b --rate 100 --seconds 40 --pubacks FILE

NATS, the prefix and the partitions come from ORDO_NATS_URL, ORDO_PREFIX and
ORDO_PARTITIONS, as for bench.publisher. Each tenant publishes `--rate`
events/s for `--seconds`, round-robin on one schedule from when it has
connected (the first line on stdout, `{"started": epoch s}`); an
event's `ts` is its intended send time, so a late publisher counts in the
latency. It runs apart from tenant A's burst: in the one event loop of
before, the burst's closed publisher held the quiet ticks back by hundreds
of milliseconds, which the bench then reported as the engine's latency.

It writes each event's intended send time and PubAck time to `--pubacks`
(bench.generator.PubAcks) and, on stdout, `{"sent": n}`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import orjson

from daemon import config as config_module
from daemon.topology import Topology

from .generator import (
    AtomicBatches,
    PubAcks,
    in_batches,
    message_stream,
    publish,
    supports_atomic_batches,
    trigger_event,
)

#: Below JetStream's limit of 1,000 messages per atomic batch: a late tick may hold more.
_MOST_PER_BATCH = 500
#: Ticks of the schedule: the events due in one go out together.
_TICK_S = 0.005


def pubacks_path(run_id: str) -> str:
    """Where the run's quiet PubAcks are written (the bench reads them back in `measure`)."""
    return os.path.join(tempfile.gettempdir(), f"ordo-{run_id}.quiet-pubacks")


async def _publish_one(js, message: tuple, ts_ms: float, pubacks: PubAcks) -> None:
    await publish(js, *message)
    pubacks.record(ts_ms, time.time() * 1000.0)


async def publish_quiet(
    js,
    topology,
    run_id: str,
    event_type: str,
    tenants: list[str],
    rate_each: float,
    seconds: float,
    *,
    atomic: bool,
    started: float,
) -> tuple[int, PubAcks]:
    """Each tenant's events on a fixed schedule, round-robin; the events due go out as one atomic
    batch where the stream allows it (four fsyncs each on one server), else one publish each."""
    total = round(len(tenants) * rate_each * seconds)
    rate = len(tenants) * rate_each
    subject_of = {t: topology.trigger_subject(t, event_type) for t in tenants}
    pubacks = PubAcks()
    # One batch out at a time; the ticks that come meanwhile go out together in the next (group
    # commit). With many out at once, each waited its turn in the server: PubAck p50 228 ms at
    # 2,000 events/s with nothing else running, against 17 ms one at a time.
    # With several triggers streams, a tick goes out as one batch per stream (JetStream's atomic
    # batches are per stream), with as many batches out at a time as there are streams.
    stream_of = message_stream(topology)
    by_stream = (lambda pair: stream_of(pair[0])) if stream_of is not None else None
    batches = AtomicBatches(js, in_flight=topology.trigger_streams, pubacks=pubacks) if atomic else None
    pending: set = set()
    sent = 0
    while sent < total:
        due = min(total, int((time.time() - started) * rate) + 1)
        tick, stamps = [], []
        while sent < due:
            tenant = tenants[sent % len(tenants)]
            ts_ms = (started + sent / rate) * 1000.0
            # Ids above any burst's: the event ids of one run are unique across its tenants.
            event = trigger_event(run_id, 10**9 + sent, tenant=tenant, event_type=event_type, ts_ms=ts_ms)
            tick.append((subject_of[tenant], orjson.dumps(event), f"{tenant}:{event['event_id']}"))
            stamps.append(ts_ms)
            sent += 1
        for part in in_batches(zip(tick, stamps, strict=True), _MOST_PER_BATCH, by_stream):
            if batches is not None:
                await batches.send([message for message, _ in part], [ts_ms for _, ts_ms in part])
                continue
            for message, ts_ms in part:
                task = asyncio.ensure_future(_publish_one(js, message, ts_ms, pubacks))
                pending.add(task)
                task.add_done_callback(pending.discard)
        await asyncio.sleep(max(0.0, started + sent / rate - time.time(), _TICK_S))
    if batches is not None:
        await batches.close()
    if pending:
        await asyncio.gather(*pending)
    return sent, pubacks


def _started() -> float:
    """The schedule starts now, once connected; the bench starts the burst from this line."""
    started = time.time()
    sys.stdout.write(orjson.dumps({"started": started}).decode() + "\n")
    sys.stdout.flush()
    return started


async def _run(args) -> int:
    import nats

    config = config_module.load()
    nc = await nats.connect(config.nats_servers, max_reconnect_attempts=3)
    js = nc.jetstream(timeout=30)
    topology = Topology(config)
    try:
        atomic = args.publish == "batched" and await supports_atomic_batches(js, topology)
        sent, pubacks = await publish_quiet(
            js,
            topology,
            args.run_id,
            args.event_type,
            args.tenants.split(","),
            args.rate,
            args.seconds,
            atomic=atomic,
            started=_started(),
        )
    finally:
        await nc.close()
    pubacks.save(args.pubacks)
    sys.stdout.write(orjson.dumps({"sent": sent}).decode() + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quiet_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--event-type", required=True)
    parser.add_argument("--tenants", required=True, help="comma-separated")
    parser.add_argument("--rate", type=float, required=True, help="events/s of each tenant")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--pubacks", required=True, metavar="FILE")
    parser.add_argument(
        "--publish",
        choices=["batched", "single"],
        default="batched",
        help="the events due together as atomic batches (one per triggers stream), or each alone",
    )
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
