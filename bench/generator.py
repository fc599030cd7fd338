"""The trigger generator: publishes trigger events the way a Triggers service does.

Used by `ordo dev --demo`, the bench scenarios and the end-to-end tests. Every
event sets `Nats-Msg-Id` to its event id (JetStream's duplicate window drops
an exact re-publish) and carries `ts`, its intended send time in epoch ms, so
that latency is measured from when the event was due, not when it went out.
"""

import asyncio
import time
import uuid

import orjson

FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
COUNTRIES = ("DE", "FR", "GB", "US", "ES", "IT")


def trigger_event(run_id: str, i: int, *, tenant: str = "demo", event_type: str = "contact.created",
                  ts_ms: float | None = None, data: dict | None = None) -> dict:
    return {
        "v": 1,
        "event_id": f"{run_id}-{i}",
        "tenant": tenant,
        "type": event_type,
        "contact": {
            "id": f"c-{run_id}-{i}",
            "first_name": FIRST_NAMES[i % len(FIRST_NAMES)],
            "country": COUNTRIES[i % len(COUNTRIES)],
        },
        "data": data if data is not None else {"amount": i % 250, "source": "generator"},
        "ts": ts_ms if ts_ms is not None else time.time() * 1000.0,
    }


def trigger_msg_id(event: dict) -> str:
    """JetStream's duplicate window is per stream, not per tenant: qualify the event id by its
    tenant, or one tenant's event would silently suppress another's with the same id."""
    return f"{event['tenant']}:{event['event_id']}"


async def publish(js, subject: str, body: bytes, msg_id: str) -> None:
    await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})


#: JetStream's answer to an atomic batch holding a message id it has seen.
_DUPLICATE_IN_BATCH = 10201


async def supports_atomic_batches(js, topology) -> bool:
    info = await js.stream_info(topology.triggers_stream)
    return bool(info.config.allow_atomic)


async def publish_atomic_batches(js, topology, events, *, batch: int, in_flight: int = 4,
                                 on_progress=None) -> int:
    """Publish events in JetStream atomic batches (nats-server 2.12+, `allow_atomic`).

    Every event stays its own message with its own Nats-Msg-Id; the server
    stores a batch at once and, under `sync_interval: always`, fsyncs once
    per batch instead of once per message. Only the commit gets a PubAck.
    """
    nc = js._nc
    sent = 0
    pending: list = []  # (commit reply future, the batch's events)
    chunk: list = []

    async def flush(chunk):
        batch_id = uuid.uuid4().hex
        last = len(chunk)
        for n, event in enumerate(chunk, 1):
            subject = topology.trigger_subject(event["tenant"], event["type"])
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n), "Nats-Msg-Id": trigger_msg_id(event)}
            if n < last:
                await nc.publish(subject, orjson.dumps(event), headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                future = asyncio.ensure_future(nc.request(subject, orjson.dumps(event), timeout=30, headers=headers))
                pending.append((future, chunk))

    async def settle(future, chunk):
        reply = await future
        body = orjson.loads(reply.data) if reply.data else {}
        error = body.get("error")
        if error and error.get("err_code") == _DUPLICATE_IN_BATCH:
            # A batch is all or nothing: one event already published refuses
            # it whole. Publish its events one by one; the duplicate window
            # drops only the duplicates.
            for event in chunk:
                await publish(js, topology.trigger_subject(event["tenant"], event["type"]),
                              orjson.dumps(event), trigger_msg_id(event))
        elif error:
            raise RuntimeError(f"atomic batch publish refused: {error}")

    for event in events:
        chunk.append(event)
        if len(chunk) == batch:
            await flush(chunk)
            sent += len(chunk)
            chunk = []
            while len(pending) >= in_flight:
                await settle(*pending.pop(0))
            if on_progress:
                on_progress(sent)
    if chunk:
        await flush(chunk)
        sent += len(chunk)
    for future, chunk in pending:
        await settle(future, chunk)
    if on_progress:
        on_progress(sent)
    return sent


async def publish_events(js, topology, events, *, window: int = 256, rate: float | None = None,
                         on_progress=None, atomic_batch: int = 0) -> int:
    """Publish events (dicts) with at most `window` publishes awaiting their PubAck.

    With `rate` (events/s) the events are sent on a fixed schedule and each
    event's `ts` is its scheduled time (no coordinated omission). Without a
    rate and with `atomic_batch` > 1, events go out in atomic batches of that
    size when the stream allows it (see publish_atomic_batches).
    """
    if atomic_batch > 1 and not rate and await supports_atomic_batches(js, topology):
        return await publish_atomic_batches(js, topology, events, batch=atomic_batch, on_progress=on_progress)
    sent = 0
    pending: set = set()
    started = time.monotonic()
    wall_start = time.time() * 1000.0
    for event in events:
        if rate:
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event["ts"] = wall_start + (sent / rate) * 1000.0
        subject = topology.trigger_subject(event["tenant"], event["type"])
        pending.add(asyncio.ensure_future(publish(js, subject, orjson.dumps(event), trigger_msg_id(event))))
        sent += 1
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if on_progress:
                on_progress(sent)
    if pending:
        for task in asyncio.as_completed(pending):
            await task
    if on_progress:
        on_progress(sent)
    return sent
