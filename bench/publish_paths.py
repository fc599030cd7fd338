"""How fast JetStream stores trigger events, for each way a Triggers service can publish them.

    python -m bench.publish_paths --rate 3000 --duration 10 [--way single --way atomic --way batch] [--json]

No engine runs: this measures the publish share of an open-mode latency on its
own. Each way publishes w1 trigger events on a fixed schedule, into streams of
its own, and reports the PubAck latency from each event's intended send time
(no coordinated omission) and the rate at which JetStream stored them:

- `single`: one publish per event;
- `atomic`: each 5 ms tick's events as one JetStream atomic batch (2.12+);
- `batch`: each 5 ms tick's events in one trigger batch message (contract 1.1).

NATS is ORDO_NATS_URL's when set, else an embedded nats-server with
`sync_interval: always` (the wheel's) in a temporary directory. Under
`sync_interval: always` every stored message costs an fsync, which is what
tells the ways apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import orjson

from daemon import config as config_module
from daemon.servers import EmbeddedNats
from daemon.topology import Topology

from .generator import PubAcks, publish_events, trigger_event
from .histogram import Histogram

WAYS = {"single": {}, "atomic": {"atomic_batch": 2}, "batch": {"trigger_batch": 1000}}


async def measure(nats_url: str, way: str, rate: float, duration: float) -> dict:
    """Publish `rate` events/s for `duration` s one `way`; the PubAck latency summary and stored rate."""
    import nats

    run_id = f"pp{os.getpid()}{way}"
    topology = Topology(config_module.Config(nats_url=nats_url, prefix=run_id))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await topology.ensure(js)
        pubacks = PubAcks()
        count = int(rate * duration)
        events = (trigger_event(run_id, i) for i in range(count))
        await publish_events(js, topology, events, rate=rate, pubacks=pubacks, **WAYS[way])
        for name in (topology.triggers_stream, topology.exec_stream, topology.dlq_stream, topology.actions_stream):
            await js.delete_stream(name)
    finally:
        await nc.close()
    latency = Histogram()
    latency.record_many(acked - ts for ts, acked in pubacks.pairs())
    first_ts, last_ack = pubacks.span()
    return {
        "way": way,
        "offered_rate": rate,
        "events": count,
        "stored_rate": count / max(1e-9, (last_ack - first_ts) / 1000.0),
        "puback_latency": latency.summary(),
    }


async def main_async(args) -> list[dict]:
    with ExitStack() as stack:
        nats_url = os.environ.get("ORDO_NATS_URL")
        if not nats_url:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ordo-publish-paths-")))
            nats_url = stack.enter_context(EmbeddedNats(data_dir)).url
        results = []
        for way in args.way or list(WAYS):
            results.append(await measure(nats_url, way, args.rate, args.duration))
            if not args.json:
                _print(results[-1])
        return results


def _print(result: dict) -> None:
    lat = result["puback_latency"]
    print(
        f"{result['way']:<7} offered {result['offered_rate']:,.0f}/s  stored {result['stored_rate']:,.0f}/s  "
        f"PubAck p50 {lat['p50_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  max {lat['max_ms']:.1f} ms  "
        "(intended send time -> PubAck)"
    )
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="offered events/s (default 3000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of offered load per way (default 10)")
    parser.add_argument("--way", action="append", choices=sorted(WAYS), help="a way to measure (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    args = parser.parse_args(argv)
    import uvloop

    started = time.time()
    results = uvloop.run(main_async(args))
    if args.json:
        print(orjson.dumps({"ways": results, "seconds": time.time() - started}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
