"""The generator process: publishes a scenario's trigger events, apart from the bench.

    python -m bench.publisher --scenario w1 --run-id R --count N [--rate R]

NATS comes from ORDO_NATS_URL, the subject prefix and partitions from
ORDO_PREFIX / ORDO_PARTITIONS (the same settings as the workers). It runs in
its own process so that publishing does not compete with the bench's own
polling for one event loop, as a Triggers service would not.

On stdout it writes one JSON object per line: `{"published": n}` now and
then, and at the end `{"done": true, "published": n, "first_publish": t0,
"last_ack": t1}` with epoch seconds (plus what the scenario's
`generate` adds, e.g. w2's signal phase). Without --rate events go out as fast as
the PubAck window allows; with --rate each event's `ts` is its scheduled send
time, so lateness of the publisher counts in the latency (no coordinated
omission).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

from daemon import config as config_module
from daemon.topology import Topology

from . import (
    limits,  # noqa: F401  (registers the `w8-limits` scenario)
    mix,  # noqa: F401  (registers the `w9-mix` scenario)
)
from .generator import PubAcks
from .scenarios import get as get_scenario

#: How often a progress line goes to the parent.
_PROGRESS_EVERY_S = 0.25


def _emit(doc: dict) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


async def run(
    scenario_name: str,
    run_id: str,
    count: int,
    rate: float | None,
    window: int,
    timeout: float,
    atomic_batch: int = 0,
    options: dict | None = None,
    pubacks_file: str | None = None,
    trigger_batch: int = 0,
) -> int:
    import nats

    config = config_module.load()
    if not config.nats_url:
        raise SystemExit("bench.publisher: ORDO_NATS_URL is not set")
    scenario = get_scenario(scenario_name, options)
    topology = Topology(config)
    nc = await nats.connect(config.nats_servers, max_reconnect_attempts=3)
    js = nc.jetstream(timeout=30)
    last_emit = 0.0

    def progress(n: int) -> None:
        nonlocal last_emit
        now = time.monotonic()
        if now - last_emit >= _PROGRESS_EVERY_S:
            last_emit = now
            _emit({"published": n})

    pubacks = PubAcks() if pubacks_file and rate else None
    try:
        outcome = await asyncio.wait_for(
            scenario.generate(
                js,
                topology,
                run_id,
                count,
                rate=rate,
                window=window,
                atomic_batch=atomic_batch,
                trigger_batch=trigger_batch,
                on_progress=progress,
                pubacks=pubacks,
            ),
            timeout,
        )
        last_ack = time.time()
    finally:
        await nc.close()
    if pubacks is not None:
        pubacks.save(pubacks_file)
    _emit({"last_ack": last_ack, **outcome, "done": True})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.publisher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="w1")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=None, help="events/s on a fixed schedule (open mode)")
    parser.add_argument("--window", type=int, default=256, help="publishes awaiting their PubAck at most")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up publishing after this long (s)")
    parser.add_argument(
        "--atomic-batch",
        type=int,
        default=0,
        help="publish in JetStream atomic batches: of this size (closed), per 5 ms tick (open); 0: one by one",
    )
    parser.add_argument(
        "--trigger-batch",
        type=int,
        default=0,
        help="publish trigger batch messages of up to this many events (closed), of the events "
        "due in each 5 ms tick (open); 0: one event per message",
    )
    parser.add_argument("--options", default="{}", help="the scenario's options, a JSON object")
    parser.add_argument(
        "--pubacks",
        metavar="FILE",
        help="open mode: write each event's intended send time and PubAck time here (float64 pairs)",
    )
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(
        run(
            args.scenario,
            args.run_id,
            args.count,
            args.rate,
            args.window,
            args.timeout,
            args.atomic_batch,
            orjson.loads(args.options),
            args.pubacks,
            args.trigger_batch,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
