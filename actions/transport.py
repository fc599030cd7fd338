"""What an action worker and the engine share on NATS: the subject and stream
names, and a lean JetStream pull consumer.

Both sides name things here, once: the engine's topology (daemon/topology.py)
builds on `Subjects`, and an action worker needs only `Subjects` to find its
requests and to address an execution's result.

The pull consumer: nats-py's `fetch()` creates an asyncio task, a uuid4 and a
wait_for for every message it returns, and `Msg.metadata` builds objects to
read a sequence number; at tens of thousands of messages a second that was a
fifth of a worker's CPU. `PullConsumer` speaks the pull protocol directly instead:

- one pull request is open at a time (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`
  with `batch`, `expires` and `max_bytes`), delivering into one inbox subscription;
- `take()` returns whatever has arrived (at least one message, or nothing
  after the request expired), without waiting for the whole batch;
- a request ends when its batch is delivered or with a status message
  (404 no messages, 408 expired, 409 limits or its bytes delivered); a lost
  one (reconnect) ends by timeout. Only then is the next one sent, so no more than `batch`
  messages are ever requested and not yet taken.

The stream sequence and delivery count come from the ack reply subject.
"""

import asyncio
import zlib
from typing import Literal

import orjson

_STATUS = "Status"
_DESCRIPTION = "Description"
#: The 409 that ends a request whose `max_bytes` is used up: a normal end, not a refusal.
_BYTES_DELIVERED = "Message Size Exceeds MaxBytes"
#: The status header that says how many messages an ended pull request will not bring.
_PENDING_MESSAGES = "Nats-Pending-Messages"


def stream_prefix(prefix: str) -> str:
    """The stream names' prefix for a subject prefix: `ordo` -> `ORDO` (streams `ORDO_EXEC`, ...)."""
    return prefix.upper().replace(".", "_").replace("-", "_")


def partition_of(execution_id: str, partitions: int) -> int:
    """The partition of an execution's messages: crc32(execution id) % partitions, fixed at set-up."""
    return zlib.crc32(execution_id.encode()) % partitions


class Subjects:
    """The stream, subject and consumer names an action worker shares with the engine, under one prefix.

    `partitions` must be the engine's: it decides the subject an execution's messages go to.
    """

    def __init__(self, prefix: str = "ordo", partitions: int = 16):
        self.prefix = prefix
        self.partitions = partitions
        self.stream_prefix = sp = stream_prefix(prefix)
        self.exec_stream = f"{sp}_EXEC"
        self.dlq_stream = f"{sp}_DLQ"
        self.actions_stream = f"{sp}_ACTIONS"

    def exec_subject(self, execution_id: str) -> str:
        """Where an execution's messages go (signals, events, action results): its partition's subjects."""
        return f"{self.prefix}.exec.{partition_of(execution_id, self.partitions)}.{execution_id}"

    def partition_filter(self, partition: int) -> str:
        return f"{self.prefix}.exec.{partition}.>"

    def action_subject(self, action: str, major: int) -> str:
        """Where requests for an external action go: a work queue per action and major version."""
        return f"{self.prefix}.actions.{action}.v{major}"

    def action_consumer(self, action: str, major: int) -> str:
        """The durable consumer of one action's requests, shared by every worker that serves it."""
        return f"action-{action.replace('.', '-')}-v{major}"

    def dlq_subject(self, reason: str) -> str:
        return f"{self.prefix}.dlq.{reason}"


class Delivery:
    """A message as the pipeline carries it: payload, ack subject, position in the stream."""

    __slots__ = (
        "subject",
        "data",
        "reply",
        "headers",
        "stream",
        "stream_seq",
        "delivered",
        "timestamp_ns",
        "pending",
        "key",
        "partition",
    )
    #: What kind of work item this is (the engine has others, daemon/work_items.py): a stream message, acked.
    kind: Literal["message"] = "message"
    #: A message stands for itself, never for one event of a batch (that is the engine's BatchPart).
    batch_index = None

    def __init__(self, msg):
        self.subject = msg.subject
        self.data = msg.data
        self.reply = reply = msg.reply
        #: The message's headers, or None (a trigger's `traceparent` is read from them).
        self.headers = msg.headers
        tokens = reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the
        # v2 form with <domain>.<account hash> after ACK and a random suffix. <pending> is what the
        # consumer still held after this message: above 0, its consumer has a backlog.
        if len(tokens) == 9:
            self.stream = tokens[2]
            self.delivered = int(tokens[4])
            self.stream_seq = int(tokens[5])
            self.timestamp_ns = int(tokens[7])
            self.pending = int(tokens[8])
        else:
            self.stream = tokens[4]
            self.delivered = int(tokens[6])
            self.stream_seq = int(tokens[7])
            self.timestamp_ns = int(tokens[9])
            self.pending = int(tokens[10])
        #: When the stream stored it (the same on every redelivery): a new execution's ledger day.
        #: The ordering-ring key (an execution id) while the message holds it.
        self.key = None
        #: The execution-stream partition it came from (-1: not an execution message).
        self.partition = -1


class PullConsumer:
    """Takes messages from one durable pull consumer, through pull requests it opens.

    Usually one request is open at a time; a caller may open another before
    the last has delivered all it asked for (daemon/intake.py does, for a
    trigger lane with a backlog), so that the server always has one to serve.
    JetStream serves a consumer's open requests in turns, one message each,
    in stream order: the messages come in that order whichever request
    brought them. A request that ends short (it expired, or reached its
    bytes) says in its status how many of its messages it will not bring
    (`Nats-Pending-Messages`).
    """

    def __init__(self, nc, stream: str, consumer: str, *, expires: float = 1.0, max_bytes: int = 0):
        self._nc = nc
        #: At most this many bytes per request (0: no limit): a pull of big messages stays bounded in memory.
        self.max_bytes = max_bytes
        self.stream = stream
        self.consumer = consumer
        self.expires = expires
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = None
        self._queue: asyncio.Queue | None = None
        self._sub = None
        #: Messages the open requests may still deliver (0: no request open).
        self.outstanding = 0
        #: Since the consumer was made: messages that came of its requests, and messages its requests
        #: ended without bringing (a caller that keeps room for what it asked for releases the latter).
        self.received = 0
        self.given_up = 0
        #: The server refused the last request (its consumer is gone, or busy): pause before the next.
        self.refused = False

    async def subscribe(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox)
        self._queue = self._sub._pending_queue

    async def unsubscribe(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def open(self, batch: int) -> None:
        """Open a request for at most `batch` messages: `take` returns them as they come."""
        request = {"batch": batch, "expires": int(self.expires * 1e9)}
        if self.max_bytes:
            request["max_bytes"] = self.max_bytes
        body = orjson.dumps(request)
        await self._nc.publish(self._next_subject, body, reply=self._inbox)
        self.outstanding += batch

    def give_up(self) -> None:
        """Count what the open requests may still bring as given up (they were lost, or failed)."""
        self.given_up += self.outstanding
        self.outstanding = 0

    async def take(self, room: int, *, request_more: bool = True) -> list[Delivery]:
        """Messages that have arrived; opens a request for at most `room` when none is open.

        Returns [] when the open requests ended without messages (or there is
        none and `request_more` is False).
        """
        if self.outstanding == 0:
            if not request_more or room <= 0:
                return []
            await self.open(room)
        queue = self._queue
        try:
            first = await asyncio.wait_for(queue.get(), self.expires + 1.0)
        except TimeoutError:
            self.give_up()  # the requests were lost (a reconnect): open a new one
            return []
        taken = []
        sub = self._sub
        msg = first
        while True:
            sub._pending_size -= len(msg.data)
            headers = msg.headers
            if headers is not None and _STATUS in headers:
                status = headers[_STATUS]
                if status != "100":  # anything but a heartbeat ends a request
                    self._ended(headers.get(_PENDING_MESSAGES))
                    # 404/408: nothing there (yet); 409: consumer deleted, too many waiting, ...;
                    # 503: no consumer. A worker that lost the partition sees the latter until it notices.
                    self.refused = status == "503" or (
                        status == "409" and headers.get(_DESCRIPTION) != _BYTES_DELIVERED
                    )
            elif msg.reply:
                taken.append(Delivery(msg))
                if self.outstanding > 0:  # else a late message of a request given up as lost
                    self.outstanding -= 1
                    self.received += 1
            if queue.empty():
                break
            msg = queue.get_nowait()
        return taken

    def _ended(self, pending: str | None) -> None:
        """A request ended short: with the count of messages it will not bring, or (a refusal, a
        deleted consumer: no count) ending every open request."""
        if pending is None:
            self.give_up()
            return
        unbrought = min(self.outstanding, int(pending))
        self.outstanding -= unbrought
        self.given_up += unbrought
