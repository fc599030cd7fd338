"""The trigger generator: publishes trigger events the way a Triggers service does.

Used by `ordo dev --demo`, the bench scenarios and the end-to-end tests. Every
event sets `Nats-Msg-Id` to its event id (JetStream's duplicate window drops
an exact re-publish) and carries `ts`, its intended send time in epoch ms, so
that latency is measured from when the event was due, not when it went out.
"""

import asyncio
import time

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


async def publish(js, subject: str, body: bytes, msg_id: str) -> None:
    await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})


async def publish_events(js, topology, events, *, window: int = 256, rate: float | None = None,
                         on_progress=None) -> int:
    """Publish events (dicts) with at most `window` publishes awaiting their PubAck.

    With `rate` (events/s) the events are sent on a fixed schedule and each
    event's `ts` is its scheduled time (no coordinated omission).
    """
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
        pending.add(asyncio.ensure_future(publish(js, subject, orjson.dumps(event), event["event_id"])))
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
