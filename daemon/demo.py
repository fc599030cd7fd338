"""`ordo dev --demo N`: publish N demo trigger events, then report what the ledger committed.

The events enrol contacts into the example workflow `welcome` (tenant `demo`,
`contact.created`). They go out in trigger batches (contract 1.1): one
publish, one stored message and one fsync per batch, as a Triggers service
at thousands of events/s sends them. Throughput and latency are read back
from the ledger (ledger/runs.py), from each event's `ts` to the commit that
finished its execution.
"""

import asyncio
import sys
import time
import uuid

import nats
import orjson

from hotpath.envelope import MAX_BATCH_EVENTS
from ledger import runs

from .config import Config
from .topology import Topology, trigger_msg_id

TENANT = "demo"
EVENT_TYPE = "contact.created"
#: Events per trigger batch message.
BATCH_EVENTS = min(500, MAX_BATCH_EVENTS)
#: Trigger batches awaiting their PubAck at most.
BATCHES_IN_FLIGHT = 8

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_COUNTRIES = ("DE", "FR", "GB", "US", "ES", "IT")


def trigger_event(
    run_id: str,
    i: int,
    *,
    tenant: str = TENANT,
    event_type: str = EVENT_TYPE,
    ts_ms: float | None = None,
    data: dict | None = None,
    source: str = "demo",
) -> dict:
    """The i-th trigger event of a run (event id `<run_id>-<i>`, a contact of its own); `ts` (epoch ms)
    is now unless given: when it is made to be sent. The bench's generator makes its events here too."""
    return {
        "v": 1,
        "event_id": f"{run_id}-{i}",
        "tenant": tenant,
        "type": event_type,
        "contact": {
            "id": f"c-{run_id}-{i}",
            "first_name": _FIRST_NAMES[i % len(_FIRST_NAMES)],
            "country": _COUNTRIES[i % len(_COUNTRIES)],
        },
        "data": data if data is not None else {"amount": i % 250, "source": source},
        "ts": ts_ms if ts_ms is not None else time.time() * 1000.0,
    }


async def publish(js, topology: Topology, run_id: str, count: int, on_progress=lambda n: None) -> int:
    """Publish `count` demo events in trigger batches, at most BATCHES_IN_FLIGHT awaiting their PubAck.

    A batch's Nats-Msg-Id derives from its first event, so JetStream's
    duplicate window drops a re-published batch as it drops a re-published event.
    """
    pending: set[asyncio.Future] = set()
    sent = 0
    for start in range(0, count, BATCH_EVENTS):
        events = [trigger_event(run_id, i) for i in range(start, min(start + BATCH_EVENTS, count))]
        headers = {"Nats-Msg-Id": f"batch:{trigger_msg_id(events[0])}:{len(events)}"}
        body = orjson.dumps({"v": "1.1", "events": events})
        pending.add(asyncio.ensure_future(js.publish(topology.trigger_subject(TENANT, "batch"), body, headers=headers)))
        if len(pending) >= BATCHES_IN_FLIGHT:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for publishing in done:
                publishing.result()
        sent += len(events)
        on_progress(sent)
    for publishing in asyncio.as_completed(pending):
        await publishing
    return sent


async def wait_until_finished(
    pool, run_id: str, expected: int, *, timeout: float, published=lambda: 0, out=sys.stderr
) -> int:
    """Poll the ledger until `expected` executions of the run have finished, with a progress line."""
    started = time.monotonic()
    last, last_t = 0, started
    finished = 0
    tty = out.isatty()
    last_line = 0.0
    while time.monotonic() - started < timeout:
        finished = await runs.count_finished(pool, TENANT, run_id)
        now = time.monotonic()
        rate = (finished - last) / max(now - last_t, 1e-6)
        last, last_t = finished, now
        line = f"  published {published():>9,}  finished {finished:>9,}/{expected:,}  {rate:>9,.0f}/s"
        if tty:
            out.write("\r" + line + " ")
            out.flush()
        elif now - last_line >= 5.0 or finished >= expected:
            out.write(line + "\n")
            last_line = now
        if finished >= expected:
            break
        await asyncio.sleep(0.5)
    if tty:
        out.write("\n")
    return finished


def render(summary: runs.RunSummary) -> str:
    return (
        f"  executions   {summary.executions} ({summary.completed} completed, {summary.failed} failed)\n"
        f"  wall time    {summary.seconds:.2f} s (first publish to last commit)\n"
        f"  throughput   {summary.executions_per_s:,.0f} executions/s, {summary.steps_per_s:,.0f} steps/s\n"
        f"  latency      p50 {summary.p50_ms:.1f} ms  p95 {summary.p95_ms:.1f} ms  "
        f"p99 {summary.p99_ms:.1f} ms  max {summary.max_ms:.1f} ms (trigger ts -> committed)"
    )


async def run_demo(config: Config, pool, count: int) -> int:
    """Publish `count` demo events to running workers, wait for their executions, print the summary.

    Exit code 1 when not every execution finished in time.
    """
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    topology = Topology(config)
    nc = await nats.connect(config.nats_servers)
    published = 0

    def progress(n: int) -> None:
        nonlocal published
        published = n

    started = time.time()
    publisher = asyncio.create_task(publish(nc.jetstream(), topology, run_id, count, progress))
    try:
        finished = await wait_until_finished(
            pool, run_id, count, timeout=max(120.0, count / 50), published=lambda: published
        )
        await publisher
    finally:
        publisher.cancel()
        await nc.close()
    summary = await runs.summarise(pool, TENANT, run_id, started)
    print(f"demo {run_id}: {count} trigger events")
    print(render(summary))
    if finished < count:
        print(f"  INCOMPLETE: {finished} of {count} executions finished")
        return 1
    return 0
