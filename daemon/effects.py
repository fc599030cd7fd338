"""What a committed transition asks of the world: actions to run, events to emit.

These run only after the transition that asked for them has committed, so a
crash can repeat them but never run one whose cause was lost. Every action
call carries the step's idempotency key (the same on every retry); an action
whose request or result is lost is retried when its deadline timer fires.

In-process actions (the registry's) run as tasks of this worker, each action
at most its own limit at a time (daemon/call_limits.py: it starts at
`concurrency` and follows the action's latency, up to `concurrency_max`).
Their intake is bounded by the worker: while calls are pending, it fetches
only while its messages in flight (each can start at most one call) and the
pending calls stay under `backlog` (twice the limits, so that a limit that
grows can be fed), so a burst waits in JetStream rather than in memory with
its deadlines running. A call still
queued when its deadline passes is not made at all: its step's deadline timer
has retried it (or will), and a late call would only be a duplicate. Any other
action is requested on `<prefix>.actions.<name>.v<major>` for external action
workers, whose results come back as `action_result` messages on the
execution's subject, ordered with the execution's other messages. An
in-process result is offered to the worker first (`apply_locally`, see
daemon/local_results.py), which orders it the same way without the trip
through JetStream; only a result it cannot take is published. A call of a
step with a rate limit first takes its rate token (daemon/limits.py,
`CallTokens`), so that the provider sees the rate the limit says.
"""

import asyncio
import logging
import time

import nats.errors
import nats.js.errors
import orjson

from actions import contract

from . import logs, metrics
from .call_limits import CallLimits
from .topology import Topology, trigger_msg_id

log = logging.getLogger("ordo.effects")

#: Publish failures that pass (NATS reconnecting, a PubAck that did not come back); any other error is raised.
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def publish_stored(js, subject: str, body: bytes, msg_id: str, traceparent: str | None = None) -> None:
    """Publish until JetStream has stored the message: a committed transition asked for it.

    A retry of a publish that was stored but whose PubAck was lost carries the
    same Nats-Msg-Id, so JetStream drops it as a duplicate. While NATS is away
    this waits, and the acks and the intake behind it wait too: backpressure.
    """
    delay = 0.05
    while True:
        try:
            headers = {"Nats-Msg-Id": msg_id}
            if traceparent:  # a traced execution's action request: the provider's spans join its trace
                headers["traceparent"] = traceparent
            await js.publish(subject, body, headers=headers)
            return
        except _TRANSIENT as exc:
            log.warning("publish of %s failed (%s); retrying in %.2fs", msg_id, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _export_limit(action: str, major: int, limit: int) -> None:
    metrics.action_concurrency_limit.labels(f"{action}@{major}").set(limit)


class Effects:
    def __init__(
        self,
        js,
        topology: Topology,
        actions=None,
        *,
        concurrency: int = 256,
        backlog: int = 512,
        concurrency_max: int | None = None,
        on_call_done=None,
        apply_locally=None,
        call_tokens=None,
    ):
        self._js = js
        self._topology = topology
        self._actions = actions  # an actions.contract.ActionRegistry, or None
        most = concurrency if concurrency_max is None else max(concurrency, concurrency_max)
        self.limits = CallLimits(concurrency, minimum=concurrency, maximum=most, on_change=_export_limit)
        self._running: set = set()
        self._backlog = backlog
        self._most_pending = max(backlog, 2 * most)
        self._on_call_done = on_call_done
        #: result -> bool: the worker takes an in-process result itself (True) or it is published.
        self._apply_locally = apply_locally
        #: execution id -> [(subject, body, msg id, traceparent)]: committed requests and emitted events not
        #: yet published.
        self._outbox: dict = {}
        #: The rate tokens a call under a rate limit takes as it is made (daemon/limits.py `CallTokens`).
        self._call_tokens = call_tokens
        #: Requests for external actions under a rate limit, each waiting for its token.
        self._paced: set = set()

    @property
    def pending(self) -> int:
        """In-process calls queued or running."""
        return len(self._running)

    @property
    def backlog(self) -> int:
        """Pending calls past which new work waits in JetStream: twice what the limits let run now."""
        return min(self._most_pending, max(self._backlog, 2 * self.limits.total()))

    def carry_out(self, record_tenant: str, execution_id: str, effects: list) -> bool:
        """Carry out a committed change's effects; True when one is a call that runs in this process.

        Calls in this process start at once (as tasks); what goes to JetStream
        (requests for external actions, emitted events) is queued for
        `publish_queued`, which publishes a whole batch's at once.
        """
        in_process = False
        for kind, data in effects:
            if kind == "action":
                in_process |= self._action(record_tenant, execution_id, data)
            elif kind == "limit_wait":  # queued in the ledger by the commit; granted by daemon/limits.py
                metrics.limit_waits.labels(data["action"]).inc()
            elif kind == "emit":
                event = data["event"]
                self._queue(
                    execution_id,
                    self._topology.trigger_subject(event["tenant"], event["type"]),
                    orjson.dumps(event),
                    trigger_msg_id(event),
                    data.get("traceparent"),  # a traced execution's: what the event enrols joins its trace
                )
        return in_process

    async def publish_queued(self) -> None:
        """Publish what `carry_out` queued, all at once, and wait until JetStream has stored each.

        One after the other, every request waited for the PubAck (an fsync) of
        the one before it: a batch of a thousand external calls took seconds.
        """
        if not self._outbox:
            return
        queued, self._outbox = self._outbox, {}
        await asyncio.gather(*(self._publish_in_order(messages) for messages in queued.values()))

    def _queue(self, execution_id: str, subject: str, body: bytes, msg_id: str, traceparent: str | None = None) -> None:
        self._outbox.setdefault(execution_id, []).append((subject, body, msg_id, traceparent))

    async def _publish_in_order(self, messages: list) -> None:
        """One execution's messages, in the order it asked for them (two emits stay in order)."""
        for subject, body, msg_id, traceparent in messages:
            await publish_stored(self._js, subject, body, msg_id, traceparent)

    def _action(self, tenant: str, execution_id: str, data: dict) -> bool:
        request = contract.request(
            execution_id=execution_id,
            step_id=data["step_id"],
            attempt=data["attempt"],
            idempotency_key=data["idempotency_key"],
            action=data["action"],
            major=data["major"],
            input=data["input"],
            # The action's own deadline is wall-clock time: it bounds a real call.
            deadline=int(time.time() * 1000) + int(data.get("timeout_ms") or 30_000),
            tenant=tenant,
            request_seq=data.get("request_seq", 0),
        )
        action = self._actions.get(data["action"], data["major"]) if self._actions is not None else None
        rate_limit = data.get("rate_limit")  # a step with a rate limit: the call takes a token first
        if action is None:
            subject = self._topology.action_subject(data["action"], data["major"])
            msg_id = f"request:{execution_id}:{data['step_id']}:{data['attempt']}:{request.get('request_seq', 0)}"
            traceparent = data.get("traceparent")
            if rate_limit is None:
                self._queue(execution_id, subject, contract.encode(request), msg_id, traceparent)
            else:
                paced = self._take_rate_token(rate_limit)
                task = asyncio.get_running_loop().create_task(
                    self._publish_paced(paced, subject, contract.encode(request), msg_id, traceparent)
                )
                self._paced.add(task)
                task.add_done_callback(self._paced.discard)
            return False
        paced = None if rate_limit is None else self._take_rate_token(rate_limit)
        run = self._run_in_process(action, request, time.monotonic(), data.get("traceparent"), paced)
        task = asyncio.get_running_loop().create_task(run)
        self._running.add(task)
        task.add_done_callback(self._call_done)
        return True

    def _call_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if self._on_call_done is not None:
            self._on_call_done()

    async def _take_rate_token(self, rate_limit: dict) -> None:
        if self._call_tokens is not None:
            await self._call_tokens.take(rate_limit["bucket"], rate_limit["rate_per_s"])

    async def _publish_paced(self, paced, subject: str, body: bytes, msg_id: str, traceparent: str | None) -> None:
        await paced
        await publish_stored(self._js, subject, body, msg_id, traceparent)

    async def _run_in_process(
        self, action, request: dict, requested_at: float, traceparent: str | None, paced=None
    ) -> None:
        if paced is not None:
            await paced  # its rate token (a wait for it holds no slot of the action's)
        slots = self.limits.of(action.name, action.major)
        if not slots.try_acquire():
            await slots.wait_for_slot()
        took = None
        try:
            if time.time() * 1000 >= request["deadline"]:
                metrics.actions_expired_queued.labels(request["action"]).inc()
                return
            started = time.monotonic()
            ctx = contract.ActionContext.from_request(request, log)
            ctx.traceparent = traceparent or ""
            result = await contract.invoke(action, ctx, request["input"])
            took = time.monotonic() - started
            metrics.action_queued_timings.add(started - requested_at)
            metrics.action_call_timings.add(took)
        finally:
            slots.release(took)
        if self._apply_locally is not None and self._apply_locally(result):
            return
        await self.publish_result(result)

    async def publish_result(self, result: dict) -> None:
        """Hand an action result to its execution (ordered with its other messages)."""
        try:
            await self._js.publish(
                self._topology.exec_subject(result["execution_id"]),
                contract.encode(result),
                headers={"Nats-Msg-Id": contract.result_msg_id(result)},
            )
        except Exception as exc:  # the step's deadline timer retries it
            log.warning(
                "action result for %s not published: %s",
                result["execution_id"],
                exc,
                extra=logs.execution(
                    result["execution_id"], step=result.get("step_id"), **logs.failure("result_publish", exc)
                ),
            )

    async def close(self, timeout: float = 10.0) -> None:
        """Let in-process actions finish and publish their results (bounded), then close them."""
        if self._running or self._paced:
            await asyncio.wait([*self._running, *self._paced], timeout=timeout)
        if self._actions is not None:
            await self._actions.aclose()
