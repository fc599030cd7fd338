"""The trigger generator: publishes trigger events the way a Triggers service does.

Used by the bench scenarios and the end-to-end tests. Every
event sets `Nats-Msg-Id` to its event id (JetStream's duplicate window drops
an exact re-publish) and carries `ts`, its intended send time in epoch ms, so
that latency is measured from when the event was due, not when it went out.
"""

import array
import asyncio
import time
import uuid

import orjson

from daemon import demo
from daemon.topology import trigger_msg_id
from hotpath.envelope import MAX_BATCH_EVENTS


def trigger_event(
    run_id: str,
    i: int,
    *,
    tenant: str = "demo",
    event_type: str = "contact.created",
    ts_ms: float | None = None,
    data: dict | None = None,
) -> dict:
    """Trigger event `i` of run `run_id`: the demo's (daemon/demo.py), marked as the generator's."""
    return demo.trigger_event(
        run_id, i, tenant=tenant, event_type=event_type, ts_ms=ts_ms, data=data, source="generator"
    )


async def publish(js, subject: str, body: bytes, msg_id: str) -> None:
    await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})


class PubAcks:
    """When each event's PubAck came back, against its intended send time (epoch ms).

    Splits an open-mode latency in two: intended send -> PubAck is the
    publisher's and JetStream's share (the event is stored, under
    `sync_interval: always` on disk), PubAck -> committed the engine's.
    """

    def __init__(self):
        self._pairs = array.array("d")  # ts, acked, ts, acked, ...

    def record(self, ts_ms: float, acked_ms: float) -> None:
        self._pairs.append(ts_ms)
        self._pairs.append(acked_ms)

    def save(self, path: str) -> None:
        with open(path, "wb") as fh:
            self._pairs.tofile(fh)

    def pairs(self):
        """(intended send time, PubAck time) of every event recorded, epoch ms."""
        return zip(self._pairs[0::2], self._pairs[1::2], strict=True)

    def span(self) -> tuple[float, float]:
        """(the first intended send time, the last PubAck time), epoch ms."""
        return min(self._pairs[0::2]), max(self._pairs[1::2])

    @staticmethod
    def load(path: str) -> dict[float, float]:
        """{intended send time: PubAck time} (epoch ms), as `save` wrote them."""
        pairs = array.array("d")
        with open(path, "rb") as fh:
            pairs.frombytes(fh.read())
        return dict(zip(pairs[0::2], pairs[1::2], strict=True))


async def _publish_stamped(js, message: tuple, stamps: list, pubacks: PubAcks | None) -> None:
    """Publish; with `pubacks`, record the PubAck time against each of the message's events' send times."""
    await publish(js, *message)
    if pubacks is not None:
        acked_ms = time.time() * 1000.0
        for ts_ms in stamps:
            pubacks.record(ts_ms, acked_ms)


def batch_message(topology, events: list[dict]) -> tuple:
    """One trigger batch message (contract 1.1) holding `events`: (subject, body, msg id).

    Its msg id derives from its first event and its size, so publishing the
    same batch again is dropped by JetStream's duplicate window as a single
    event's re-publish is.
    """
    first = events[0]
    return (
        topology.trigger_subject(first["tenant"], "batch"),
        orjson.dumps({"v": "1.1", "events": events}),
        f"batch:{trigger_msg_id(first)}:{len(events)}",
    )


#: JetStream's answer to an atomic batch holding a message id it has seen.
_DUPLICATE_IN_BATCH = 10201
#: Below the server's limit of 1,000 messages per atomic batch.
_MAX_ATOMIC_BATCH = 500


async def supports_atomic_batches(js, topology) -> bool:
    info = await js.stream_info(topology.trigger_stream_names()[0])
    return bool(info.config.allow_atomic)


class _Window:
    """Publishes in flight, at most `size` awaiting their PubAck; a failed one raises."""

    def __init__(self, size: int):
        self._size = size
        self._pending: set = set()

    async def add(self, publishing) -> None:
        self._pending.add(asyncio.ensure_future(publishing))
        if len(self._pending) >= self._size:
            done, self._pending = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()

    async def drain(self) -> None:
        for task in asyncio.as_completed(self._pending):
            await task
        self._pending = set()


async def publish_messages(js, messages, *, window: int = 256, on_progress=None) -> int:
    """(subject, body, msg id) one publish each, at most `window` awaiting their PubAck."""
    in_flight = _Window(window)
    sent = 0
    for subject, body, msg_id in messages:
        await in_flight.add(publish(js, subject, body, msg_id))
        sent += 1
        if on_progress and sent % window == 0:
            on_progress(sent)
    await in_flight.drain()
    if on_progress:
        on_progress(sent)
    return sent


class AtomicBatches:
    """JetStream atomic batch publishes (nats-server 2.12+, `allow_atomic` streams).

    Every message stays its own message with its own Nats-Msg-Id; the server
    stores a batch at once. On one server (R1, file storage) it first stages the
    batch in a store of its own, a directory it creates, writes and removes:
    under `sync_interval: always` that is four fsyncs per batch whatever its
    size, against one per message published alone (README, "What an atomic
    batch costs"); worth it from about five messages. Only the commit gets a PubAck; at most
    `in_flight` batches await theirs.
    """

    def __init__(self, js, *, in_flight: int = 4, pubacks: PubAcks | None = None):
        self._js = js
        self._in_flight = in_flight
        self._pubacks = pubacks
        self._pending: list = []  # (commit reply future, the batch's messages)

    async def send(self, batch: list, stamps: list | None = None) -> None:
        nc = self._js._nc
        batch_id = uuid.uuid4().hex
        last = len(batch)
        for n, (subject, body, msg_id) in enumerate(batch, 1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n), "Nats-Msg-Id": msg_id}
            if n < last:
                await nc.publish(subject, body, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                self._pending.append((asyncio.ensure_future(self._commit(subject, body, headers, stamps)), batch))
        while len(self._pending) >= self._in_flight:
            await self._settle(*self._pending.pop(0))

    async def _commit(self, subject, body, headers, stamps):
        reply = await self._js._nc.request(subject, body, timeout=30, headers=headers)
        # Stamped on arrival: a batch is settled only once `in_flight` younger
        # ones are out, which would add their sending time to its share.
        if stamps and self._pubacks is not None:
            now_ms = time.time() * 1000.0
            for ts_ms in stamps:
                self._pubacks.record(ts_ms, now_ms)
        return reply

    async def _settle(self, future, batch) -> None:
        reply = await future
        error = (orjson.loads(reply.data) if reply.data else {}).get("error")
        if error and error.get("err_code") == _DUPLICATE_IN_BATCH:
            # A batch is all or nothing: one message already published refuses
            # it whole. Publish them one by one; the duplicate window drops
            # only the duplicates.
            await publish_messages(self._js, iter(batch), window=64)
        elif error:
            raise RuntimeError(f"atomic batch publish refused: {error}")

    async def close(self) -> None:
        while self._pending:
            await self._settle(*self._pending.pop(0))


async def publish_atomic(js, messages, *, batch: int, in_flight: int = 4, on_progress=None, stream_of=None) -> int:
    """(subject, body, msg id) in atomic batches of `batch`; with `stream_of` (a message -> the
    stream that stores it), each batch holds one stream's messages, as JetStream requires."""
    batches = AtomicBatches(js, in_flight=in_flight)
    sent = 0
    for chunk in in_batches(messages, batch, stream_of):
        await batches.send(chunk)
        sent += len(chunk)
        if on_progress:
            on_progress(sent)
    await batches.close()
    if on_progress:
        on_progress(sent)
    return sent


def as_message(topology, event: dict) -> tuple:
    """(subject, body, Nats-Msg-Id) of a trigger event, as every publish here sends it."""
    return topology.trigger_subject(event["tenant"], event["type"]), orjson.dumps(event), trigger_msg_id(event)


def in_batches(items, size: int, key=None):
    """Batches of `size` items in their order; with `key`, each batch holds items of one key
    (the order of one key's items is kept, not the order between keys)."""
    open_batches: dict = {}
    for item in items:
        k = key(item) if key is not None else None
        batch = open_batches.setdefault(k, [])
        batch.append(item)
        if len(batch) == size:
            yield batch
            del open_batches[k]
    yield from open_batches.values()


def message_stream(topology):
    """None with one triggers stream; else a (subject, body, msg id) -> the triggers stream that
    stores it (the stream of its tenant's lane: JetStream's atomic batches are per stream)."""
    if topology.trigger_streams == 1:
        return None
    head = len(f"{topology.prefix}.triggers.")

    def stream_of(message: tuple) -> str:
        return topology.tenant_stream(message[0][head:].partition(".")[0])

    return stream_of


async def _paced(events, rate: float, send, *, tick_s: float, gather: bool = False, on_progress=None) -> int:
    """Hand `send` the events due by each tick of a fixed schedule, each stamped with its own
    intended send time as `ts` (latency is measured from it: no coordinated omission).

    Without `gather`, wake when the next event is due (at most `tick_s` later):
    one send per event at any rate. With `gather`, wake at the next tick
    boundary (or when the next event is due, if later): one send per tick,
    holding that tick's events, however high the rate.
    """
    sent = 0
    started = time.monotonic()
    wall_start = time.time() * 1000.0
    events = iter(events)
    exhausted = False
    last_tick = -1
    while not exhausted:
        if gather:
            # The event loop's timers may fire a little early: still in the tick just
            # sent, wait for its end rather than send a second, near-empty message.
            elapsed = time.monotonic() - started
            tick = int(elapsed / tick_s)
            if tick <= last_tick:
                await asyncio.sleep((last_tick + 1) * tick_s - elapsed + 0.0002)
                continue
            last_tick = tick
        due = int((time.monotonic() - started) * rate) + 1
        chunk = []
        while sent + len(chunk) < due:
            event = next(events, None)
            if event is None:
                exhausted = True
                break
            event["ts"] = wall_start + ((sent + len(chunk)) / rate) * 1000.0
            chunk.append(event)
        if chunk:
            await send(chunk)
            sent += len(chunk)
            if on_progress:
                on_progress(sent)
        if not exhausted:
            now = time.monotonic()
            next_due = started + (sent + 1) / rate
            if gather:
                next_tick = started + (int((now - started) / tick_s) + 1) * tick_s
                wake = max(next_tick, next_due)
            else:
                wake = min(now + tick_s, next_due)
            await asyncio.sleep(max(0.0, wake - now))
    return sent


async def publish_events(
    js,
    topology,
    events,
    *,
    window: int = 256,
    rate: float | None = None,
    on_progress=None,
    atomic_batch: int = 0,
    atomic_in_flight: int = 4,
    trigger_batch: int = 0,
    pubacks: PubAcks | None = None,
) -> int:
    """Publish trigger events (dicts).

    Closed (no `rate`): as fast as possible, in atomic batches of
    `atomic_batch` when the stream allows them (`atomic_in_flight` awaiting
    their commit), else one publish each with at most `window` awaiting their
    PubAck. Open (`rate` events/s): on a fixed
    schedule; with `atomic_batch` > 1 the events due in each 5 ms tick go out
    as one atomic batch, else one publish each. In open mode `pubacks`
    records when each event's PubAck came back.

    With `trigger_batch` > 1, events go out in trigger batch messages of up to
    that many (in open mode: the events due in each 5 ms tick), one publish,
    one stored message and one fsync each: what a Triggers service does at
    thousands of events/s under `sync_interval: always`.
    """
    if trigger_batch > 1:
        return await _publish_trigger_batches(
            js, topology, events, trigger_batch, window=window, rate=rate, on_progress=on_progress, pubacks=pubacks
        )
    atomic = atomic_batch > 1 and await supports_atomic_batches(js, topology)
    if not rate:
        messages = (as_message(topology, e) for e in events)
        if atomic:
            return await publish_atomic(
                js,
                messages,
                batch=atomic_batch,
                in_flight=atomic_in_flight,
                on_progress=on_progress,
                stream_of=message_stream(topology),
            )
        return await publish_messages(js, messages, window=window, on_progress=on_progress)
    if atomic:
        batches = AtomicBatches(js, in_flight=16, pubacks=pubacks)
        stream_of = message_stream(topology)

        async def send(chunk):
            # JetStream refuses an atomic batch over 1,000 messages; a late tick can hold more.
            stamped = [(as_message(topology, e), e["ts"]) for e in chunk]
            key = (lambda pair: stream_of(pair[0])) if stream_of is not None else None
            for part in in_batches(stamped, _MAX_ATOMIC_BATCH, key):
                await batches.send([message for message, _ in part], [ts for _, ts in part])

        sent = await _paced(events, rate, send, tick_s=0.005, gather=True, on_progress=on_progress)
        await batches.close()
        return sent
    in_flight = _Window(window)

    async def send_each(chunk):
        for event in chunk:
            message = as_message(topology, event)
            await in_flight.add(_publish_stamped(js, message, [event["ts"]], pubacks))

    sent = await _paced(events, rate, send_each, tick_s=0.001, on_progress=on_progress)
    await in_flight.drain()
    return sent


async def _publish_trigger_batches(
    js, topology, events, size: int, *, window: int, rate: float | None, on_progress, pubacks: PubAcks | None
) -> int:
    in_flight = _Window(window)
    size = min(size, MAX_BATCH_EVENTS)

    async def send(chunk):
        for batch in in_batches(chunk, size):
            message = batch_message(topology, batch)
            await in_flight.add(_publish_stamped(js, message, [e["ts"] for e in batch], pubacks))

    if rate:
        sent = await _paced(events, rate, send, tick_s=0.005, gather=True, on_progress=on_progress)
    else:
        sent = 0
        for batch in in_batches(events, size):
            await send(batch)
            sent += len(batch)
            if on_progress:
                on_progress(sent)
    await in_flight.drain()
    return sent
