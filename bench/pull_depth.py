"""How fast JetStream hands one trigger lane's backlog to a pull consumer while a burst is being published.

    python -m bench.pull_depth [--seconds 8] [--grant 256 --grant 2048] [--open 1 --open 2] [--json]

No engine runs. A noisy tenant publishes w7-noisy's burst from a process of
its own (bench/burst_load.py: atomic batches of 200, 4 awaiting their
PubAck) into a triggers stream, and the engine's pull consumer takes the
tenant's lane as a worker does: pulls of `--grant` messages, `--open` of them
asked for at a time (daemon/lanes.py `PULLS_AHEAD`), each message acked and
then held for the worker's enrolment cost (35 us). It reports the messages
taken per second and the rate the burst was stored at meanwhile: while a
stream is being written to, JetStream serves a pull after a delay, and a lane
that asked for one pull at a time was taken at half the rate of two.

NATS is ORDO_NATS_URL's when set, else an embedded nats-server with
`sync_interval: always` (the wheel's) in a temporary directory.
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
from daemon.lanes import lane_of
from daemon.pull import PullConsumer
from daemon.topology import Topology

from .burst_load import nats_url as burst_nats_url

#: What the worker spends per trigger event before it takes the next (enrolment, its five set steps).
ENROL_S = 35e-6


async def measure(nats_url: str, grant: int, pulls_open: int, seconds: float, run: int = 0) -> dict:
    """Take the burst tenant's lane for `seconds` with pulls of `grant`, `pulls_open` grants asked for
    (streams of its own, deleted after)."""
    import nats

    prefix = f"pd{os.getpid()}r{run}g{grant}o{pulls_open}"
    topology = Topology(config_module.Config(nats_url=nats_url, prefix=prefix))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await topology.ensure(js)
        lane = lane_of("noisy", topology.lanes)
        durable, _ = await topology.resume_lane(js, lane, 1)
        consumer = PullConsumer(nc, topology.trigger_stream_of(lane), durable)
        await consumer.subscribe()
        burst = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.burst_load", "--nats-url", nats_url, "--prefix", prefix, "--seconds", str(seconds)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert burst.stdout is not None
        await burst.stdout.readline()  # started
        started, taken = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            while consumer.outstanding < pulls_open * grant:
                await consumer.open(grant)
            deliveries = await consumer.take(0, request_more=False)
            for delivery in deliveries:
                await nc.publish(delivery.reply, b"+ACK")
            taken += len(deliveries)
            await asyncio.sleep(len(deliveries) * ENROL_S)
        taken_per_s = taken / (time.monotonic() - started)
        out, _ = await burst.communicate()
        stored = orjson.loads(out.splitlines()[-1])
        await consumer.unsubscribe()
        for info in await js.streams_info():
            if info.config.name.startswith(prefix.upper()):
                await js.delete_stream(info.config.name)
        return {
            "grant": grant,
            "pulls_open": pulls_open,
            "taken_per_s": taken_per_s,
            "burst_stored_per_s": stored["stored"] / stored["seconds"],
        }
    finally:
        await nc.close()


async def main_async(args) -> list[dict]:
    with ExitStack() as stack:
        nats_url = burst_nats_url(stack, "pull-depth")
        results = []
        for run in range(args.repeat):
            for grant in args.grant or [256, 2048]:
                for pulls_open in args.open or [1, 2]:
                    results.append(await measure(nats_url, grant, pulls_open, args.seconds, run))
                    if not args.json:
                        r = results[-1]
                        print(
                            f"pulls of {grant:>5}, {pulls_open} asked for at a time: taken {r['taken_per_s']:>8,.0f}/s "
                            f"while the burst was stored at {r['burst_stored_per_s']:,.0f}/s",
                            flush=True,
                        )
        return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pull_depth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of burst per measurement (default 8)")
    parser.add_argument("--grant", type=int, action="append", help="messages per pull (default: 256 and 2048)")
    parser.add_argument("--open", type=int, action="append", help="grants asked for at a time (default: 1 and 2)")
    parser.add_argument("--repeat", type=int, default=1, help="measure every pair K times, alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    args = parser.parse_args(argv)
    import uvloop

    results = uvloop.run(main_async(args))
    if args.json:
        print(orjson.dumps({"measurements": results}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
