"""How fast JetStream stores trigger events, for each way a Triggers service can publish them.

    python -m bench.publish_paths --rate 3000 --duration 10 [--way single --way atomic --way batch] [--json]

No engine runs: this measures the publish share of an open-mode latency on its
own. Each way publishes w1 trigger events on a fixed schedule, into streams of
its own, and reports the PubAck latency from each event's intended send time
(no coordinated omission) and the rate at which JetStream stored them:

- `single`: one publish per event;
- `atomic`: each 5 ms tick's events as one JetStream atomic batch (2.12+);
- `batch`: each 5 ms tick's events in one trigger batch message (contract 1.1).

With `--beside-burst same` or `other`, a noisy tenant publishes a burst from a
process of its own meanwhile (bench/burst_load.py: w7-noisy's tenant A, atomic
batches of 200, 4 awaiting their PubAck), into the same triggers stream or
into another deployment's on the same server: does a stream of their own
spare these publishes the burst's queue? (#18: the quiet tenants' PubAck is
most of their p99 during w7-noisy's burst.)

NATS is ORDO_NATS_URL's when set, else an embedded nats-server with
`sync_interval: always` (the wheel's) in a temporary directory. Under
`sync_interval: always` every stored message costs an fsync, which is what
tells the ways apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from contextlib import ExitStack

import orjson

from daemon import config as config_module
from daemon.topology import Topology

from .burst_load import nats_url as burst_nats_url
from .generator import PubAcks, publish_events, trigger_event
from .histogram import Histogram

WAYS = {"single": {}, "atomic": {"atomic_batch": 2}, "batch": {"trigger_batch": 1000}}


#: Where the noisy tenant's burst goes with `--beside-burst`: no burst, the same triggers stream, another's.
BESIDE = ("none", "same", "other")


async def measure(nats_url: str, way: str, rate: float, duration: float, beside: str = "none") -> dict:
    """Publish `rate` events/s for `duration` s one `way` (beside a burst: BESIDE); the PubAck latency
    summary and stored rate."""
    import nats

    run_id = f"pp{os.getpid()}{way}{beside}"
    topologies = [Topology(config_module.Config(nats_url=nats_url, prefix=run_id))]
    if beside == "other":
        topologies.append(Topology(config_module.Config(nats_url=nats_url, prefix=f"{run_id}b")))
    topology = topologies[0]
    nc = await nats.connect(nats_url)
    burst = None
    try:
        js = nc.jetstream(timeout=30)
        await topology.ensure(js)
        if beside != "none":
            burst = await _start_burst(nats_url, topologies[-1].prefix, duration + 1.0)
        pubacks = PubAcks()
        count = int(rate * duration)
        events = (trigger_event(run_id, i) for i in range(count))
        await publish_events(js, topology, events, rate=rate, pubacks=pubacks, **WAYS[way])
        burst_done = await _burst_done(burst) if burst is not None else None
        for t in topologies:
            for name in t.stream_names():
                await js.delete_stream(name)
    finally:
        if burst is not None and burst.returncode is None:
            burst.kill()
            await burst.wait()
        await nc.close()
    latency = Histogram()
    latency.record_many(acked - ts for ts, acked in pubacks.pairs())
    first_ts, last_ack = pubacks.span()
    result = {
        "way": way,
        "beside": beside,
        "offered_rate": rate,
        "events": count,
        "stored_rate": count / max(1e-9, (last_ack - first_ts) / 1000.0),
        "puback_latency": latency.summary(),
    }
    if burst_done is not None:
        result["burst_stored_rate"] = burst_done["stored"] / burst_done["seconds"]
    return result


async def _start_burst(nats_url: str, prefix: str, seconds: float):
    """bench/burst_load.py in a process of its own, once it has connected and starts publishing."""
    argv = [sys.executable, "-m", "bench.burst_load", "--nats-url", nats_url, "--prefix", prefix]
    proc = await asyncio.create_subprocess_exec(*argv, "--seconds", str(seconds), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        await proc.wait()
        raise RuntimeError(f"the burst publisher exited with {proc.returncode} before it started")
    return proc


async def _burst_done(proc) -> dict:
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the burst publisher failed (exit status {proc.returncode})")
    done: dict = orjson.loads(out.splitlines()[-1])
    return done


async def main_async(args) -> list[dict]:
    with ExitStack() as stack:
        nats_url = burst_nats_url(stack, "publish-paths")
        results = []
        for way in args.way or list(WAYS):
            for beside in args.beside_burst or ["none"]:
                results.append(await measure(nats_url, way, args.rate, args.duration, beside))
                if not args.json:
                    _print(results[-1])
        return results


def _print(result: dict) -> None:
    lat = result["puback_latency"]
    burst = ""
    if result["beside"] != "none":
        burst = f"  beside a burst in the {result['beside']} stream, stored at {result['burst_stored_rate']:,.0f}/s"
    print(
        f"{result['way']:<7} offered {result['offered_rate']:,.0f}/s  stored {result['stored_rate']:,.0f}/s  "
        f"PubAck p50 {lat['p50_ms']:.1f} ms  p95 {lat['p95_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms  "
        f"max {lat['max_ms']:.1f} ms  (intended send time -> PubAck){burst}"
    )
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="offered events/s (default 3000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of offered load per way (default 10)")
    parser.add_argument("--way", action="append", choices=sorted(WAYS), help="a way to measure (default: all)")
    parser.add_argument(
        "--beside-burst",
        action="append",
        choices=BESIDE,
        help="measure beside a noisy tenant's burst into the same triggers stream or another (repeatable)",
    )
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
