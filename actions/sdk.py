"""The SDK for external action workers: write an action, run a worker that serves it.

    from actions.sdk import action

    @action("sms.send", major=1)
    async def send_sms(ctx, input):
        ...                       # call the provider with ctx.idempotency_key
        return {"message_id": "..."}

An ActionWorker takes requests from the work queue `<prefix>.actions.<name>.v<major>`
(one durable pull consumer per action and major version, shared by all the
workers that serve it), runs them with bounded concurrency, publishes each
result onto the execution's subject and only then acks the request.

Delivery is at least once, by design. A worker that dies (or hangs the event
loop) while it holds a request stops sending in-progress acks, so JetStream
redelivers the request after `ack_wait_s` to any worker, which runs it again
with the same idempotency key; the downstream dedupes on that key. A worker
that dies after publishing the result but before the ack publishes the same
result again on the redelivery; its Nats-Msg-Id (one per attempt) lets
JetStream drop the copy within the duplicate window, and the engine applies a
result for an attempt once anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import socket
import time
import typing

import nats
import nats.errors
import nats.js.api as jsapi
from nats.js.errors import BadRequestError, NotFoundError

from hotpath.envelope import BadMessage

from . import logs
from .contract import Action, ActionContext, ActionError, decode_request, encode, invoke, result_error, result_msg_id
from .settings import Settings
from .transport import Delivery, PullConsumer, Subjects

log = logging.getLogger("ordo.actions.worker")

RunFunction = typing.Callable[[ActionContext, dict], typing.Awaitable[dict]]


# -- the decorator ---------------------------------------------------------------


class FunctionAction:
    """An Action made of an async function (and, optionally, a validation function)."""

    def __init__(self, name: str, major: int, run: RunFunction, validate=None):
        if not asyncio.iscoroutinefunction(run):
            raise TypeError(f"action {name}@{major}: {run!r} must be an async function (ctx, input) -> dict")
        self.name = name
        self.major = major
        self._run = run
        self._validate = validate
        self.__doc__ = run.__doc__
        self.__wrapped__ = run

    def validator(self, fn: typing.Callable[[dict], None]) -> typing.Callable[[dict], None]:
        """Decorate the function that checks an input (it raises ActionError("invalid_input", False, ...))."""
        self._validate = fn
        return fn

    def validate(self, input: dict) -> None:
        if self._validate is not None:
            self._validate(input)

    async def run(self, ctx: ActionContext, input: dict) -> dict:
        return await self._run(ctx, input)

    def __repr__(self) -> str:
        return f"<action {self.name}@{self.major}>"


def action(name: str, *, major: int = 1) -> typing.Callable[[RunFunction], FunctionAction]:
    """`@action("sms.send", major=1)` on `async def fn(ctx, input) -> dict` makes it an Action."""

    def wrap(fn: RunFunction) -> FunctionAction:
        return FunctionAction(name, major, fn)

    return wrap


# -- the worker ------------------------------------------------------------------


class _Slots:
    """The worker's in-flight bound: requests running plus requests asked of the server."""

    __slots__ = ("free", "_changed")

    def __init__(self, n: int):
        self.free = n
        self._changed = asyncio.Event()

    async def take(self, most: int) -> int:
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()
        n = min(most, self.free)
        self.free -= n
        return n

    def give(self, n: int) -> None:
        if n:
            self.free += n
            self._changed.set()


class ActionWorker:
    """Serves `actions` from JetStream until `run(stop)` is told to stop."""

    def __init__(
        self,
        nats_url: str,
        *,
        prefix: str = "ordo",
        actions: list[Action],
        concurrency: int = 64,
        max_message_bytes: int = 256 * 1024,
        partitions: int = 16,
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 4096,
        drain_timeout_s: float = 30.0,
        name: str = "ordo-action-worker",
    ):
        if not actions:
            raise ValueError("an action worker needs at least one action")
        keys = [(a.name, a.major) for a in actions]
        if len(set(keys)) != len(keys):
            raise ValueError(f"an action is listed twice: {keys}")
        self.nats_url = nats_url
        # The partition count must be the engine's: it decides the subject a result goes to.
        self.subjects = Subjects(prefix, partitions)
        self.actions = list(actions)
        self.concurrency = concurrency
        self.max_message_bytes = max_message_bytes
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.drain_timeout_s = drain_timeout_s
        self.name = name
        #: Outcomes: "ok", "error:<code>", "rejected:<reason>", "publish_failed"; for metrics and tests.
        self.counts: collections.Counter = collections.Counter()
        self.in_flight = 0
        self.ready = asyncio.Event()
        self._nc = None
        self._js = None
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, config: Settings, actions: list[Action], **settings) -> ActionWorker:
        settings.setdefault("max_message_bytes", config.max_message_bytes)
        return cls(config.nats_url, prefix=config.prefix, partitions=config.partitions, actions=actions, **settings)

    # -- running -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        logs.bind_worker(f"{socket.gethostname()}/{os.getpid()}/{self.name}")
        servers = [url.strip() for url in self.nats_url.split(",") if url.strip()]
        self._nc = await nats.connect(servers, name=self.name, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self._js = self._nc.jetstream(timeout=10)
        consumers: list[PullConsumer] = []
        try:
            if not await self._wait_for_stream(stop):
                return
            for item in self.actions:
                consumers.append(await self._consumer(item))
            slots = _Slots(self.concurrency)
            share = max(1, math.ceil(self.concurrency / len(self.actions)))
            loops = [
                asyncio.create_task(self._pull(item, consumer, slots, share, stop))
                for item, consumer in zip(self.actions, consumers, strict=True)
            ]
            self.ready.set()
            log.info("serving %s", ", ".join(f"{a.name}@{a.major}" for a in self.actions))
            try:
                await asyncio.gather(*loops)
            finally:
                for loop_task in loops:
                    loop_task.cancel()
            await self._drain()
        finally:
            for item in self.actions:  # the webhook's connection pool, for one
                close = getattr(item, "aclose", None)
                if close is not None:
                    await close()
            for consumer in consumers:
                try:
                    await consumer.unsubscribe()
                except Exception as exc:  # closing anyway
                    log.debug("unsubscribing %s: %s", consumer.consumer, exc, extra=logs.failure("unsubscribe", exc))
            await self._nc.close()

    async def _wait_for_stream(self, stop: asyncio.Event) -> bool:
        """The engine creates the streams; a worker started first waits for them."""
        stream = self.subjects.actions_stream
        warned = False
        while not stop.is_set():
            try:
                await self._js.stream_info(stream)
                return True
            except NotFoundError:
                if not warned:
                    log.warning("stream %s does not exist yet; waiting for the engine to create it", stream)
                    warned = True
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        return False

    async def _consumer(self, item: Action) -> PullConsumer:
        stream = self.subjects.actions_stream
        durable = self.subjects.action_consumer(item.name, item.major)
        config = jsapi.ConsumerConfig(
            durable_name=durable,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            # Never dropped after N deliveries: a request ends in a result, or is
            # terminated by a worker as malformed (and dead-lettered).
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.subjects.action_subject(item.name, item.major),
            max_waiting=512,
        )
        try:
            info = await self._js.consumer_info(stream, durable)
            if info.config.ack_wait != self.ack_wait_s or info.config.max_ack_pending != self.max_ack_pending:
                await self._js.add_consumer(stream, config)  # an update of editable fields
        except NotFoundError:
            try:
                await self._js.add_consumer(stream, config)
            except BadRequestError as exc:  # created concurrently by another worker
                if "already in use" not in str(exc) and "exists" not in str(exc):
                    raise
        consumer = PullConsumer(self._nc, stream, durable, expires=1.0)
        await consumer.subscribe()
        return consumer

    async def _pull(self, item: Action, consumer: PullConsumer, slots: _Slots, share: int, stop: asyncio.Event) -> None:
        # `reserved` slots cover the open pull request: messages it may still
        # deliver. In flight plus reserved never exceeds the concurrency.
        reserved = 0
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if consumer.outstanding == 0:
                    slots.give(reserved)
                    reserved = 0
                    await asyncio.sleep(0)  # let another action's loop take the slots just given back
                    taking = asyncio.create_task(slots.take(share))
                    await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
                    if not taking.done():
                        taking.cancel()
                        break
                    reserved = taking.result()
                try:
                    deliveries = await consumer.take(reserved)
                except (
                    nats.errors.ConnectionClosedError,
                    nats.errors.ConnectionReconnectingError,
                    nats.errors.OutboundBufferLimitError,
                ) as exc:
                    log.warning("pull from %s failed: %s", consumer.consumer, exc, extra=logs.failure("nats_pull", exc))
                    await asyncio.sleep(0.5)
                    continue
                reserved -= len(deliveries)
                for delivery in deliveries:
                    self._start(item, delivery, slots)
            # A request still open may deliver after the stop: hand those back now
            # rather than let them wait out ack_wait.
            while consumer.outstanding > 0:
                for delivery in await consumer.take(0, request_more=False):
                    await self._settle(delivery, b"-NAK")
        finally:
            stopping.cancel()
            slots.give(max(reserved, 0))

    def _start(self, item: Action, delivery: Delivery, slots: _Slots) -> None:
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._handle(item, delivery))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self.in_flight -= 1
            slots.give(1)

        task.add_done_callback(done)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("waiting up to %.0fs for %d requests in flight", self.drain_timeout_s, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout_s)
        for task in pending:  # redelivered after ack_wait, to run again with the same key
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    # -- one request ---------------------------------------------------------------

    async def _handle(self, item: Action, delivery: Delivery) -> None:
        try:
            request = decode_request(delivery.data, self.max_message_bytes)
            if (request["action"], request["major"]) != (item.name, item.major):
                raise BadMessage(
                    "wrong_type",
                    f"a request for {request['action']}@{request['major']} "
                    f"arrived on {item.name}@{item.major}'s subject",
                )
        except BadMessage as exc:
            await self._reject(delivery, exc)
            return
        ctx = ActionContext.from_request(
            request,
            logging.LoggerAdapter(
                log,
                logs.execution(
                    request["execution_id"],
                    request.get("tenant") or None,
                    request["step_id"],
                    action=item.name,
                    attempt=request["attempt"],
                    delivered=delivery.delivered,
                ),
            ),
        )
        if delivery.headers:  # a traced execution's request: the action's own spans may join its trace
            ctx.traceparent = delivery.headers.get("traceparent", "")
        if 0 < request["deadline"] <= time.time() * 1000:
            result = result_error(
                request,
                ActionError(
                    "deadline_exceeded",
                    True,
                    f"the request reached {item.name}@{item.major} after its deadline (delivery {delivery.delivered})",
                ),
            )
        else:
            heartbeat = asyncio.get_running_loop().create_task(self._keep_alive(delivery, request["deadline"]))
            try:
                result = await invoke(item, ctx, request["input"])
            finally:
                heartbeat.cancel()
        self.counts["ok" if result["ok"] else f"error:{result['error']['code']}"] += 1
        if await self._publish_result(result, request):
            await self._settle(delivery, b"+ACK")
        # else: not acked, so redelivered after ack_wait and run again (same idempotency key).

    async def _keep_alive(self, delivery: Delivery, deadline_ms: int) -> None:
        """In-progress acks while the request runs, until its deadline.

        They stop at the deadline (plus the time to publish): a run that ignores
        cancellation past it is taken over by a redelivery, which answers
        "deadline_exceeded" at once.
        """
        every = max(self.ack_wait_s / 3, 0.1)
        while deadline_ms <= 0 or time.time() * 1000 < deadline_ms + self.ack_wait_s * 1000:
            await asyncio.sleep(every)
            await self._settle(delivery, b"+WPI")

    async def _publish_result(self, result: dict, request: dict) -> bool:
        """Publish onto the execution's subject and wait for the PubAck (retried, bounded by ack_wait)."""
        subject = self.subjects.exec_subject(request["execution_id"])
        headers = {"Nats-Msg-Id": result_msg_id(result)}
        try:
            body = encode(result)
        except TypeError as exc:
            body = encode(result_error(request, ActionError("invalid_output", False, f"the output is not JSON: {exc}")))
        give_up = time.monotonic() + self.ack_wait_s
        pause = 0.1
        while True:
            try:
                await self._js.publish(subject, body, headers=headers, timeout=5)
                return True
            except Exception as exc:
                if time.monotonic() + pause >= give_up:
                    self.counts["publish_failed"] += 1
                    log.error(
                        "result for %s step %s not published, the request will run again: %s",
                        request["execution_id"],
                        request["step_id"],
                        exc,
                        extra=logs.execution(
                            request["execution_id"],
                            request.get("tenant") or None,
                            request["step_id"],
                            **logs.failure("result_publish", exc),
                        ),
                    )
                    return False
                log.warning(
                    "publishing the result for %s failed, retrying: %s",
                    request["execution_id"],
                    exc,
                    extra=logs.execution(
                        request["execution_id"],
                        request.get("tenant") or None,
                        request["step_id"],
                        **logs.failure("result_publish", exc),
                    ),
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _reject(self, delivery: Delivery, exc: BadMessage) -> None:
        """A malformed request: counted, dead-lettered (best effort) and terminated; never retried."""
        self.counts[f"rejected:{exc.reason}"] += 1
        log.warning(
            "rejected request %s:%s: %s",
            delivery.stream,
            delivery.stream_seq,
            exc,
            extra=logs.failure(exc.reason, str(exc), source=f"{delivery.stream}:{delivery.stream_seq}"),
        )
        headers = {
            "Nats-Msg-Id": f"{delivery.stream}:{delivery.stream_seq}:{exc.reason}",
            "Ordo-Reason": exc.reason,
            "Ordo-Error": str(exc)[:1024].replace("\r", " ").replace("\n", " "),
            "Ordo-Source": f"{delivery.stream}:{delivery.stream_seq}",
        }
        try:
            await self._js.publish(self.subjects.dlq_subject(exc.reason), delivery.data, headers=headers, timeout=5)
        except Exception as err:  # the stream copy is best effort; the log and the count are not
            log.warning("rejected request not copied to the DLQ stream: %s", err, extra=logs.failure("dlq_copy", err))
        await self._settle(delivery, b"+TERM")

    async def _settle(self, delivery: Delivery, verb: bytes) -> None:
        try:
            await self._nc.publish(delivery.reply, verb)
        except Exception as exc:  # unacked: redelivered after ack_wait
            log.warning(
                "%s for %s:%s not sent: %s",
                verb.decode(),
                delivery.stream,
                delivery.stream_seq,
                exc,
                extra=logs.failure("nats_ack", exc),
            )
