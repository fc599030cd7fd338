"""Where things live on NATS: stream names, subjects, consumers and partitions.

One place that knows the naming, so that publishers, workers and tests agree.
The names an action worker needs too (execution, action and dead-letter
subjects, partitions) are defined in actions/transport.py; `Topology` adds
the engine's own and creates the streams and consumers.
"""

import asyncio
import hashlib
import json
import uuid
from dataclasses import replace
from typing import Any

import nats.js.api as jsapi
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError, ServerError

from actions.transport import Subjects, partition_of

from .config import Config

__all__ = [
    "ATOMIC_PUBLISH_SERVER",
    "EXECUTION_NAMESPACE",
    "StreamSetupError",
    "Topology",
    "TriggerMappingError",
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


def settled_by(info) -> int:
    """The stream sequence at or below which a consumer has settled everything (its ack floor;
    before its first ack, the sequence before the one it was created to start at)."""
    return max(info.ack_floor.stream_seq or 0, (info.config.opt_start_seq or 1) - 1)


class StreamSetupError(RuntimeError):
    """JetStream refused one of Ordo's streams as configured (e.g. more replicas than servers)."""


class TriggerMappingError(StreamSetupError):
    """trigger_streams > 1, and the NATS account does not file the triggers subjects under their lanes."""


#: The event type of the publishes that check the lanes' subject mapping: each is refused by the
#: stream it reaches (an impossible Nats-Expected-Last-Sequence), so none is ever stored.
_MAPPING_PROBE_TYPE = "ordo-mapping-probe"
_NEVER_A_SEQUENCE = str(2**63)
#: JetStream's error codes: the stream that got a publish is not the one it expected; the
#: stream's last sequence is not the one expected (the probe's answer when the mapping is right).
_STREAM_NOT_MATCH = 10060
_WRONG_LAST_SEQUENCE = 10071


class Topology(Subjects):
    """Stream, subject and consumer names under one configured prefix, and the JetStream set-up."""

    def __init__(self, config: Config):
        super().__init__(config.prefix, config.partitions)
        self.triggers_stream = f"{self.stream_prefix}_TRIGGERS"
        self.lanes = config.trigger_lanes
        #: 1: every lane in `triggers_stream`; N > 1: lane i in `<triggers_stream>_<i % N>`.
        self.trigger_streams = config.trigger_streams
        self._config = config

    def trigger_subject(self, tenant: str, event_type: str) -> str:
        return f"{self.prefix}.triggers.{tenant}.{event_type}"

    def trigger_lane_mapping(self) -> tuple[str, str]:
        """`<prefix>.triggers.<tenant>.<rest>` is filed as `<prefix>.triggers.<lane>.<tenant>.<rest>`.

        The lane is NATS's own partition() of the tenant token (FNV-1a % lanes,
        daemon/lanes.py `lane_of`): publishers keep their subjects, and every
        event of a tenant lands in one lane, in the order the stream stored it.
        With one triggers stream, the stream applies this itself (`trigger_transform`);
        with more, the NATS account must (`nats_mapping`), before a stream is chosen.
        """
        head = f"{self.prefix}.triggers"
        return f"{head}.*.>", f"{head}.{{{{partition({self.lanes},1)}}}}.{{{{wildcard(1)}}}}.>"

    def trigger_transform(self) -> jsapi.SubjectTransform:
        """The one triggers stream's own filing of each event under its lane (trigger_streams = 1)."""
        src, dest = self.trigger_lane_mapping()
        return jsapi.SubjectTransform(src=src, dest=dest)

    def nats_mapping(self) -> str:
        """The NATS server configuration that trigger_streams > 1 needs: the account's mapping of the
        triggers subjects to their lanes (top level for the global account, else in the account)."""
        src, dest = self.trigger_lane_mapping()
        return f"mappings {{\n  {json.dumps(src)}: {json.dumps(dest)}\n}}\n"

    def trigger_stream_of(self, lane: int) -> str:
        """The stream that holds a lane's events."""
        if self.trigger_streams == 1:
            return self.triggers_stream
        return f"{self.triggers_stream}_{lane % self.trigger_streams}"

    def tenant_stream(self, tenant: str) -> str:
        """The stream that holds a tenant's events (its lane's)."""
        from .lanes import lane_of

        return self.trigger_stream_of(lane_of(tenant, self.lanes))

    def trigger_stream_names(self) -> list[str]:
        if self.trigger_streams == 1:
            return [self.triggers_stream]
        return [f"{self.triggers_stream}_{group}" for group in range(self.trigger_streams)]

    def stream_names(self) -> list[str]:
        """Every stream of this deployment."""
        return [*self.trigger_stream_names(), self.exec_stream, self.dlq_stream, self.actions_stream]

    def lane_filter(self, lane: int) -> str:
        return f"{self.prefix}.triggers.{lane}.>"

    def lane_consumer(self, lane: int, epoch: int) -> str:
        """The durable consumer of one lane under one ownership (epoch) of the partition that serves it."""
        return f"triggers-l{lane}-e{epoch}"

    def lanes_of(self, partition: int) -> list[int]:
        """The lanes the owner of `partition` consumes: lane i is served by partition i % partitions."""
        return list(range(partition, self.lanes, self.partitions))

    def published_tenant(self, published: str) -> str:
        """The tenant token of the subject a trigger was published to: what filed it under its lane."""
        return published[len(f"{self.prefix}.triggers.") :].split(".", 1)[0]

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
        head = f"{self.prefix}.triggers"
        if self.trigger_streams == 1:
            # A tenant token and at least one more: a subject the lanes' transform cannot file is refused.
            triggers = [(self.triggers_stream, [f"{head}.*.>"])]
        else:
            triggers = [
                (name, [self.lane_filter(lane) for lane in range(group, self.lanes, self.trigger_streams)])
                for group, name in enumerate(self.trigger_stream_names())
            ]
        await self._retire_triggers_streams(js, dict(triggers))
        streams = [(name, subjects, 1 * day) for name, subjects in triggers]
        streams += [
            (self.exec_stream, [f"{self.prefix}.exec.>"], 7 * day),
            (self.dlq_stream, [f"{self.prefix}.dlq.>"], 30 * day),
            (self.actions_stream, [f"{self.prefix}.actions.>"], 7 * day),
        ]
        for name, subjects, max_age in streams:
            is_triggers = name.startswith(self.triggers_stream)
            config = jsapi.StreamConfig(
                name=name,
                subjects=subjects,
                storage=jsapi.StorageType.FILE,
                # Action requests are a work queue: a request is gone once an action worker acked it.
                retention=jsapi.RetentionPolicy.WORK_QUEUE
                if name == self.actions_stream
                else jsapi.RetentionPolicy.LIMITS,
                max_age=max_age,
                duplicate_window=120,
                max_msg_size=self._config.max_message_bytes * 4,
                # Publishers of triggers, signals and results may batch (one fsync per batch).
                allow_atomic=True if atomic and (is_triggers or name == self.exec_stream) else None,
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
        if self.trigger_streams > 1:
            await self.check_trigger_mapping(js)
        # A partition's consumer, and its lanes' consumers, are created by the worker that
        # claims it (resume_partition, resume_lane).

    async def _retire_triggers_streams(self, js, wanted: dict[str, list[str]]) -> None:
        """Delete the triggers streams of another trigger_streams setting, once drained.

        Going from one triggers stream to N (or from N to M) moves lanes to other
        streams, and the new streams' subjects overlap the old ones'. A stream whose
        every event was enrolled (its lanes' consumers have nothing pending or unacked)
        is deleted; one that still holds events that were not is refused, naming it:
        its workers must drain it under the old setting first (README, Fairness).
        """
        group = f"{self.triggers_stream}_"
        stale = []
        for info in await self._streams_info(js):
            name = info.config.name
            if name in wanted:
                # A group stream of another N keeps its name, and its lanes move.
                moved = name != self.triggers_stream and sorted(info.config.subjects or []) != sorted(wanted[name])
            else:
                moved = name == self.triggers_stream or (name.startswith(group) and name[len(group) :].isdigit())
            if moved:
                stale.append(info)
        for info in stale:
            name = info.config.name
            if await self._still_consumed(js, name):
                raise StreamSetupError(
                    f"the triggers stream {name} is still being consumed by workers with another "
                    f"trigger_streams setting than {self.trigger_streams}: stop every worker before changing it"
                )
            left = await self._not_enrolled(js, info)
            if left:
                raise StreamSetupError(
                    f"the triggers stream {name} still holds {left} event(s) not yet enrolled, and "
                    f"trigger_streams = {self.trigger_streams} would file their lanes elsewhere: run the "
                    "workers with the trigger_streams setting that made it until it is drained "
                    "(stop the publishers first), then change it"
                )
            try:
                await js.delete_stream(name)
            except NotFoundError:
                pass

    async def _still_consumed(self, js, stream: str, grace_s: float = 3.0) -> bool:
        """Whether a worker still pulls from the stream: one of its consumers has a pull waiting
        after `grace_s` (longer than a pull's expiry, so that a worker that just stopped is not one)."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while True:
            try:
                consumers = await self._consumers_info(js, stream)
            except NotFoundError:
                return False
            if not any(c.num_waiting for c in consumers):
                return False
            if asyncio.get_running_loop().time() >= deadline:
                return True
            await asyncio.sleep(0.1)

    async def _not_enrolled(self, js, info) -> int:
        """How many of a triggers stream's events (`info`, as listed) its lanes' consumers have not
        settled; an event in a lane that has no consumer counts as not enrolled."""
        stream = info.config.name
        if not info.state.messages:
            return 0
        newest: dict[int, tuple[int, Any]] = {}  # lane -> (epoch, its newest epoch's consumer)
        try:
            consumers = await self._consumers_info(js, stream)
        except NotFoundError:
            return 0
        for consumer in consumers:
            lane, _, epoch = consumer.name.removeprefix("triggers-l").partition("-e")
            if lane.isdigit() and epoch.isdigit() and int(epoch) > newest.get(int(lane), (-1, None))[0]:
                newest[int(lane)] = (int(epoch), consumer)
        left = sum(c.num_pending + c.num_ack_pending for _, c in newest.values())
        lanes = (
            range(self.lanes)
            if stream == self.triggers_stream
            else {int(subject.split(".")[-2]) for subject in info.config.subjects or []}
        )
        if any(lane not in newest for lane in lanes):
            left = max(left, info.state.messages)
        return left

    async def check_trigger_mapping(self, js) -> None:
        """With trigger_streams > 1, check that the NATS account files each lane's events into the
        lane's stream: one probe per lane, published as a tenant of that lane and refused by the
        stream it reaches, so nothing is stored. Without the mapping, an event reaches no stream
        (or the wrong one) and its publisher's PubAck says so; the workers refuse to start instead."""
        from .lanes import lane_of

        probes: dict[int, str] = {}
        n = 0
        while len(probes) < self.lanes:
            tenant = f"ordo-probe-{n}"
            probes.setdefault(lane_of(tenant, self.lanes), tenant)
            n += 1
        for lane, tenant in sorted(probes.items()):
            stream = self.trigger_stream_of(lane)
            subject = self.trigger_subject(tenant, _MAPPING_PROBE_TYPE)
            try:
                await js.publish(
                    subject, b"", stream=stream, headers={"Nats-Expected-Last-Sequence": _NEVER_A_SEQUENCE}
                )
            except NoStreamResponseError:
                why = f"a publish to {subject} reached no stream"
            except APIError as exc:
                if exc.err_code == _WRONG_LAST_SEQUENCE:
                    continue  # reached the lane's stream, which refused it as it should
                if exc.err_code != _STREAM_NOT_MATCH:
                    raise
                why = f"a publish to {subject} (lane {lane}) reached another stream than {stream}"
            else:
                why = f"a publish to {subject} was stored: the stream ignored Nats-Expected-Last-Sequence"
            raise TriggerMappingError(
                f"trigger_streams = {self.trigger_streams} needs the NATS account to file the triggers "
                f"subjects under their lanes, and {why}. Add this to the NATS server configuration "
                f"(`ordo nats-mapping` prints it) and reload the server:\n{self.nats_mapping()}"
            )

    @staticmethod
    async def _streams_info(js) -> list:
        infos: list = []
        while True:  # STREAM.LIST is paged
            page = await js.streams_info_iterator(offset=len(infos))
            batch = list(page)
            infos += batch
            if not batch or len(infos) >= page.total:
                return infos

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
        after AckWait behind younger messages of the same execution. The ledger
        keeps the partition's position, so its consumer keeps its state in memory
        (a server restart loses it, and the worker creates it again after the
        watermark: daemon/partitions.py).
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
            js, self.exec_stream, durable, self.partition_filter(partition), start_seq=after_seq + 1, in_memory=True
        )

    async def resume_lane(self, js, lane: int, epoch: int, after_seq: int = 0) -> tuple[str, int]:
        """Create this epoch's consumer of a trigger lane, delivering from where the earlier
        owners' consumers had settled everything (or after `after_seq`, if that is later), and
        delete those; returns its name and the sequence it resumes after.

        Where a partition resumes after its ledger watermark, a lane resumes after the
        ack floor of the newest earlier consumer (everything at or below it was enrolled,
        routed, committed and acked). Whatever an earlier owner left unacked above it comes
        again, in stream order and before anything younger: enrolments dedupe on the
        ledger's primary key, routed events on their Nats-Msg-Id.

        A lane's consumers keep their state in memory (JetStream writes and fsyncs a durable
        consumer's state up to ten times a second otherwise), so a server restart loses them:
        `after_seq` is then where the lane had settled by the ledger (ledger/lane_floors.py),
        or by this epoch's own consumer when last measured (daemon/partitions.py).
        """
        durable = self.lane_consumer(lane, epoch)
        stream = self.trigger_stream_of(lane)
        prefix = f"triggers-l{lane}-e"
        settled = after_seq
        older = []
        for name in await self._consumer_names(js, stream):
            tail = name[len(prefix) :]
            if name.startswith(prefix) and tail.isdigit() and int(tail) < epoch:
                older.append(name)
        for name in older:
            try:
                info = await js.consumer_info(stream, name)
            except NotFoundError:
                continue
            settled = max(settled, settled_by(info))
        await self._ensure_consumer(
            js, stream, durable, self.lane_filter(lane), start_seq=settled + 1, max_waiting=8, in_memory=True
        )
        for name in older:
            try:
                await js.delete_consumer(stream, name)
            except NotFoundError:
                pass
        return durable, settled

    @classmethod
    async def _consumer_names(cls, js, stream: str) -> list[str]:
        return [info.name for info in await cls._consumers_info(js, stream)]

    @staticmethod
    async def _consumers_info(js, stream: str) -> list:
        infos: list = []
        while True:  # JetStream lists 256 consumers a page
            page = await js.consumers_info(stream, offset=len(infos) or None)
            infos += page
            if len(page) < 256:
                return infos

    async def _ensure_consumer(
        self,
        js,
        stream: str,
        durable: str,
        filter_subject,
        start_seq: int = 0,
        max_waiting: int = 512,
        in_memory: bool = False,
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
            # Its state (what it delivered, its acks) kept in memory, not written and fsynced to
            # disk up to ten times a second: for a consumer whose position the ledger also keeps.
            mem_storage=in_memory or None,
        )
        try:
            await js.add_consumer(stream, config)
        except BadRequestError as exc:
            if "already in use" not in str(exc) and "exists" not in str(exc):
                raise
