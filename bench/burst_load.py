"""A noisy tenant's burst from a process of its own, beside `python -m bench.publish_paths --beside-burst`.

    python -m bench.burst_load --nats-url URL --prefix P --seconds 20

Publishes w1 trigger events of tenant `noisy` into deployment P's triggers
stream as fast as JetStream takes them, as w7-noisy's tenant A does: atomic
batches of 200, 4 awaiting their PubAck (bench/scenarios.py,
`NoisyNeighbour.burst_in_flight`). It prints `{"started": epoch s}` once
connected and, when `--seconds` are up, `{"stored": n, "seconds": s}`.
"""

from __future__ import annotations

import argparse
import itertools
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

from .generator import as_message, publish_atomic, trigger_event

BATCH = 200
IN_FLIGHT = 4


async def burst(nats_url: str, prefix: str, seconds: float) -> dict:
    import nats

    topology = Topology(config_module.Config(nats_url=nats_url, prefix=prefix))
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        await topology.ensure(js)
        started = time.time()
        _say({"started": started})

        def events_until_time_is_up():
            for i in itertools.count():
                if i % BATCH == 0 and time.time() - started >= seconds:
                    return
                yield trigger_event(prefix, i, tenant="noisy")

        messages = (as_message(topology, e) for e in events_until_time_is_up())
        stored = await publish_atomic(js, messages, batch=BATCH, in_flight=IN_FLIGHT)
        return {"stored": stored, "seconds": time.time() - started}
    finally:
        await nc.close()


def nats_url(stack: ExitStack, name: str) -> str:
    """ORDO_NATS_URL, else an embedded nats-server (`sync_interval: always`, the wheel's) in a temporary
    directory `ordo-<name>-*` that `stack` stops and removes: where the burst tools publish."""
    url = os.environ.get("ORDO_NATS_URL")
    if url:
        return url
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"ordo-{name}-")))
    return stack.enter_context(EmbeddedNats(data_dir)).url


def _say(doc: dict) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--prefix", required=True, help="the deployment whose triggers stream takes the burst")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    import uvloop

    _say(uvloop.run(burst(args.nats_url, args.prefix, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
