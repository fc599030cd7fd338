"""Where things live on NATS: stream names, subjects, consumers and partitions.

One place that knows the naming, so that publishers, workers and tests agree.
The names an action worker needs too (execution, action and dead-letter
subjects, partitions) are defined in actions/transport.py; `Topology` adds
the engine's own and creates the streams and consumers.
"""

import hashlib
import uuid
from dataclasses import replace

import nats.js.api as jsapi
from nats.js.errors import BadRequestError, NotFoundError, ServerError

from actions.transport import Subjects, partition_of

from .config import Config

__all__ = [
    "ATOMIC_PUBLISH_SERVER",
    "EXECUTION_NAMESPACE",
    "StreamSetupError",
    "Topology",
    "execution_id_for",
    "partition_of",
    "trigger_msg_id",
]

#: Namespace of the deterministic execution ids (uuid5).
EXECUTION_NAMESPACE = uuid.UUID("6f7a6e4e-0b1d-4d55-9a8e-0e7d0c0f0a11")


_NAMESPACE_BYTES = EXECUTION_NAMESPACE.bytes


#: The first nats-server with atomic batch publish (Nats-Batch-Id headers).
ATOMIC_PUBLISH_SERVER = (2, 12, 0)


def execution_id_for(tenant: str, workflow_id: str, event_id: str) -> str:
    """The same trigger event enrols a contact into a workflow once: its id is derived.

    This is uuid.uuid5(EXECUTION_NAMESPACE, "tenant\\x1fworkflow\\x1fevent") spelled
    out without UUID objects, which cost more than the hash on the enrolment path.
    """
    name = f"{tenant}\x1f{workflow_id}\x1f{event_id}".encode()
    raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def trigger_msg_id(event: dict) -> str:
    """The Nats-Msg-Id of a trigger event. JetStream's duplicate window is per stream, not
    per tenant: the event id is qualified by its tenant, or one tenant's event would
    silently suppress another's with the same id."""
    return f"{event['tenant']}:{event['event_id']}"


class StreamSetupError(RuntimeError):
    """JetStream refused one of Ordo's streams as configured (e.g. more replicas than servers)."""


class Topology(Subjects):
    """Stream, subject and consumer names under one configured prefix, and the JetStream set-up."""

    def __init__(self, config: Config):
        super().__init__(config.prefix, config.partitions)
        self.triggers_stream = f"{self.stream_prefix}_TRIGGERS"
        self.lanes = config.trigger_lanes
        self._config = config

    def trigger_subject(self, tenant: str, event_type: str) -> str:
        return f"{self.prefix}.triggers.{tenant}.{event_type}"

    def trigger_transform(self) -> jsapi.SubjectTransform:
        """The triggers stream files `<prefix>.triggers.<tenant>.<rest>` as `<prefix>.triggers.<lane>.<tenant>.<rest>`.

        The lane is NATS's own partition() of the tenant token (FNV-1a % lanes,
        daemon/lanes.py `lane_of`): publishers keep their subjects, and every
        event of a tenant lands in one lane, in the order the stream stored it.
        """
        head = f"{self.prefix}.triggers"
        return jsapi.SubjectTransform(
            src=f"{head}.*.>", dest=f"{head}.{{{{partition({self.lanes},1)}}}}.{{{{wildcard(1)}}}}.>"
        )

    def lane_filter(self, lane: int) -> str:
        return f"{self.prefix}.triggers.{lane}.>"

    def lane_consumer(self, lane: int, epoch: int) -> str:
        """The durable consumer of one lane under one ownership (epoch) of the partition that serves it."""
        return f"triggers-l{lane}-e{epoch}"

    def lanes_of(self, partition: int) -> list[int]:
        """The lanes the owner of `partition` consumes: lane i is served by partition i % partitions."""
        return list(range(partition, self.lanes, self.partitions))

    def published_subject(self, stored: str) -> str:
        """The subject a trigger was published to, from the one the stream stored (the lane token dropped)."""
        head = f"{self.prefix}.triggers."
        rest = stored[len(head) :]
        return head + rest[rest.index(".") + 1 :]

    def partition_consumer(self, partition: int, epoch: int) -> str:
        """The durable consumer of one ownership (epoch) of a partition.

        One name per epoch: a worker that lost the partition and has not
        noticed yet keeps pulling from its own, deleted, consumer. With one
        name for all owners it pulled from the new owner's consumer and took
        its messages; they came back to the new owner only after AckWait,
        behind younger messages of the same executions, which then counted
        them as already applied.
        """
        return f"exec-p{partition}-e{epoch}"

    async def ensure(self, js) -> None:
        """Create the streams and durable consumers if they are missing (idempotent).

        Each stream keeps `stream_replicas` copies (its consumers inherit the
        count); an existing stream with another count is changed in place, so
        raising the setting and restarting the workers moves a deployment from
        R1 to R3. On nats-server 2.12+ the triggers stream accepts atomic batch publishes:
        a Triggers service that publishes its events in batches pays one fsync
        per batch under `sync_interval: always` instead of one per event, and
        each event is still its own message (with its own Nats-Msg-Id).
        """
        from .servers import parse_version

        atomic = parse_version(js._nc._server_info.get("version", "0.0.0")) >= ATOMIC_PUBLISH_SERVER
        day = 24 * 3600
        streams = [
            # A tenant token and at least one more: a subject the lanes' transform cannot file is refused.
            (self.triggers_stream, f"{self.prefix}.triggers.*.>", 1 * day),
            (self.exec_stream, f"{self.prefix}.exec.>", 7 * day),
            (self.dlq_stream, f"{self.prefix}.dlq.>", 30 * day),
        ]
        streams.append((self.actions_stream, f"{self.prefix}.actions.>", 7 * day))
        for name, subject, max_age in streams:
            config = jsapi.StreamConfig(
                name=name,
                subjects=[subject],
                storage=jsapi.StorageType.FILE,
                # Action requests are a work queue: a request is gone once an action worker acked it.
                retention=jsapi.RetentionPolicy.WORK_QUEUE
                if name == self.actions_stream
                else jsapi.RetentionPolicy.LIMITS,
                max_age=max_age,
                duplicate_window=120,
                max_msg_size=self._config.max_message_bytes * 4,
                # Publishers of triggers, signals and results may batch (one fsync per batch).
                allow_atomic=True if atomic and name in (self.triggers_stream, self.exec_stream) else None,
                num_replicas=self._config.stream_replicas,
                placement=self._placement(),
                subject_transform=self.trigger_transform() if name == self.triggers_stream else None,
            )
            try:
                await self._ensure_stream(js, config)
            except (BadRequestError, ServerError) as exc:  # not a 503: JetStream refused the stream
                raise StreamSetupError(
                    f"stream {name} with {config.num_replicas} replica(s) (the stream_replicas setting)"
                    f"{f' on servers tagged {config.placement.tags} (stream_placement)' if config.placement else ''} "
                    f"refused by NATS: {exc.description}"
                ) from exc
        # A partition's consumer, and its lanes' consumers, are created by the worker that
        # claims it (resume_partition, resume_lane).

    def _placement(self) -> jsapi.Placement | None:
        tags = [tag.strip() for tag in self._config.stream_placement.split(",") if tag.strip()]
        return jsapi.Placement(tags=tags) if tags else None

    @staticmethod
    async def _ensure_stream(js, config: jsapi.StreamConfig) -> None:
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError as exc:  # created concurrently by another worker
                if "already in use" not in str(exc):
                    raise
            return
        changes: dict = {}
        if config.allow_atomic and not info.config.allow_atomic:
            changes["allow_atomic"] = True
        if (info.config.num_replicas or 1) != config.num_replicas:
            changes["num_replicas"] = config.num_replicas
        wanted_tags = sorted(config.placement.tags or []) if config.placement else []
        if sorted((info.config.placement.tags or []) if info.config.placement else []) != wanted_tags:
            changes["placement"] = config.placement or jsapi.Placement()
        if config.subject_transform is not None and info.config.subject_transform != config.subject_transform:
            changes["subject_transform"] = config.subject_transform
            changes["subjects"] = config.subjects
        if changes:
            await js.update_stream(replace(info.config, **changes))

    async def resume_partition(self, js, partition: int, epoch: int, after_seq: int) -> None:
        """Create this epoch's consumer of the partition, delivering from `after_seq + 1` in
        stream order, and delete the consumers of earlier epochs.

        Called by the worker that just claimed the partition, with the ledger's
        watermark: whatever an earlier owner left unacked is forgotten by
        JetStream and delivered again in order, instead of being redelivered
        after AckWait behind younger messages of the same execution.
        """
        durable = self.partition_consumer(partition, epoch)
        prefix = f"exec-p{partition}-e"
        for name in await self._consumer_names(js, self.exec_stream):
            older = name.startswith(prefix) and name[len(prefix) :].isdigit() and int(name[len(prefix) :]) < epoch
            if older or name == f"exec-p{partition}":  # (the one name of every epoch, before epochs had names)
                try:
                    await js.delete_consumer(self.exec_stream, name)
                except NotFoundError:
                    pass
        await self._ensure_consumer(
            js, self.exec_stream, durable, self.partition_filter(partition), start_seq=after_seq + 1
        )

    async def resume_lane(self, js, lane: int, epoch: int) -> str:
        """Create this epoch's consumer of a trigger lane, delivering from where the earlier
        owners' consumers had settled everything, and delete those; returns its name.

        Where a partition resumes after its ledger watermark, a lane resumes after the
        ack floor of the newest earlier consumer (everything at or below it was enrolled,
        routed, committed and acked). Whatever an earlier owner left unacked above it comes
        again, in stream order and before anything younger: enrolments dedupe on the
        ledger's primary key, routed events on their Nats-Msg-Id.
        """
        durable = self.lane_consumer(lane, epoch)
        prefix = f"triggers-l{lane}-e"
        settled = 0
        older = []
        for name in await self._consumer_names(js, self.triggers_stream):
            tail = name[len(prefix) :]
            if name.startswith(prefix) and tail.isdigit() and int(tail) < epoch:
                older.append(name)
        for name in older:
            try:
                info = await js.consumer_info(self.triggers_stream, name)
            except NotFoundError:
                continue
            start = info.config.opt_start_seq or 1
            settled = max(settled, info.ack_floor.stream_seq or 0, start - 1)
        await self._ensure_consumer(
            js, self.triggers_stream, durable, self.lane_filter(lane), start_seq=settled + 1, max_waiting=8
        )
        for name in older:
            try:
                await js.delete_consumer(self.triggers_stream, name)
            except NotFoundError:
                pass
        return durable

    @staticmethod
    async def _consumer_names(js, stream: str) -> list[str]:
        names: list[str] = []
        while True:  # JetStream lists 256 consumers a page
            page = await js.consumers_info(stream, offset=len(names) or None)
            names += [info.name for info in page]
            if len(page) < 256:
                return names

    async def _ensure_consumer(
        self, js, stream: str, durable: str, filter_subject, start_seq: int = 0, max_waiting: int = 512
    ) -> None:
        try:
            await js.consumer_info(stream, durable)
            return
        except NotFoundError:
            pass
        config = jsapi.ConsumerConfig(
            durable_name=durable,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else jsapi.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            ack_wait=self._config.ack_wait_s,
            max_ack_pending=self._config.max_ack_pending,
            # Never drop a message after N deliveries: a poison message is
            # dead-lettered by the worker, with its reason, not by the server.
            max_deliver=-1,
            filter_subject=filter_subject,
            max_waiting=max_waiting,
        )
        try:
            await js.add_consumer(stream, config)
        except BadRequestError as exc:
            if "already in use" not in str(exc) and "exists" not in str(exc):
                raise
