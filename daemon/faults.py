"""Seeded fault injection, for soaks and fault tests only (setting `inject_faults`).

    inject_faults = "seed=7,nats=0.03,pg=0.03"

- `nats`: the share of this worker's JetStream publishes (routed events,
  action requests and results, emitted events, dead-letter copies) and of its
  `+ACK` / `-NAK` replies that fail. A failed publish raises
  `nats.errors.TimeoutError`, half of the time before anything was sent and
  half of the time after JetStream stored the message (its PubAck "was lost").
  A failed ack is dropped without a word, as a lost ack is: the message comes
  back after AckWait and must be recognised as a duplicate.
- `pg`: the share of ledger commits that fail: half of them before COMMIT
  (the transaction rolls back) and half after it (the transaction committed,
  but the worker is told that the connection timed out and retries).
- `seed`: the same seed gives the same sequence of decisions, per worker.

Every injected fault counts in `ordo_injected_faults_total{kind}`. Nothing is
wrapped or hooked when the setting is empty.
"""

import logging
import random
from dataclasses import dataclass

import asyncpg
import nats.errors

from . import metrics

log = logging.getLogger("ordo.faults")

#: The kinds of fault, as counted by ordo_injected_faults_total{kind}.
PUBLISH_FAILED = "nats_publish_failed"
PUBLISH_TIMEOUT = "nats_publish_timeout"  # stored by JetStream, but the publisher sees a timeout
ACK_DROPPED = "nats_ack_dropped"
COMMIT_FAILED = "pg_commit_failed"
COMMIT_TIMEOUT = "pg_commit_timeout"  # committed, but the worker sees a timeout

_ACK_SUBJECT_PREFIX = "$JS.ACK."


@dataclass(frozen=True)
class FaultSpec:
    seed: int
    #: Share of JetStream publishes and acks that fail, 0..1.
    nats: float = 0.0
    #: Share of ledger commits that fail, 0..1.
    pg: float = 0.0


def parse(spec: str) -> FaultSpec | None:
    """`"seed=7,nats=0.03,pg=0.03"` -> FaultSpec; "" -> None. Anything else is a ValueError naming its part."""
    if not spec.strip():
        return None
    values: dict = {}
    for part in spec.split(","):
        key, sep, raw = (s.strip() for s in part.partition("="))
        if not sep or not key or not raw:
            raise ValueError(f"inject_faults: {part.strip()!r} is not key=value (in {spec!r})")
        if key not in ("seed", "nats", "pg"):
            raise ValueError(f"inject_faults: unknown key {key!r} in {spec!r} (known: seed, nats, pg)")
        if key in values:
            raise ValueError(f"inject_faults: {key!r} given twice in {spec!r}")
        if key == "seed":
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"inject_faults: seed={raw!r} is not an integer") from None
        else:
            try:
                share = float(raw)
            except ValueError:
                raise ValueError(f"inject_faults: {key}={raw!r} is not a number") from None
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"inject_faults: {key}={raw!r} is not a share between 0 and 1")
            values[key] = share
    if "seed" not in values:
        raise ValueError(f"inject_faults: {spec!r} has no seed (e.g. seed=7), so a run could not be repeated")
    return FaultSpec(**values)


class FaultInjector:
    """Draws the faults; NATS and Postgres from separate streams, so that one's pace does not shift the other's."""

    def __init__(self, spec: FaultSpec, worker: int = 0):
        self.spec = spec
        self._nats = random.Random(f"{spec.seed}:{worker}:nats")
        self._pg = random.Random(f"{spec.seed}:{worker}:pg")
        #: The fault the commit in progress gets after its COMMIT (drawn before it).
        self._after_commit: Exception | None = None

    def publish_fault(self) -> str | None:
        """PUBLISH_FAILED, PUBLISH_TIMEOUT or None for the next JetStream publish."""
        if self._nats.random() >= self.spec.nats:
            return None
        return _count(PUBLISH_FAILED if self._nats.random() < 0.5 else PUBLISH_TIMEOUT)

    def ack_fault(self) -> str | None:
        """ACK_DROPPED or None for the next ack or nak."""
        if self._nats.random() >= self.spec.nats:
            return None
        return _count(ACK_DROPPED)

    def commit_fault(self, phase: str) -> None:
        """The ledger batcher's hook: called at the end of a commit's transaction
        ("before_commit") and after COMMIT returned ("after_commit"); raises the fault."""
        if phase == "before_commit":
            self._after_commit = None
            if self._pg.random() >= self.spec.pg:
                return
            if self._pg.random() < 0.5:
                _count(COMMIT_FAILED)
                raise asyncpg.exceptions.ConnectionDoesNotExistError("injected fault: connection lost before COMMIT")
            self._after_commit = TimeoutError("injected fault: COMMIT timed out (it did commit)")
        elif self._after_commit is not None:
            error, self._after_commit = self._after_commit, None
            _count(COMMIT_TIMEOUT)
            raise error


def _count(kind: str) -> str:
    metrics.injected_faults.labels(kind).inc()
    return kind


def install(spec: str, nc, js, batcher, *, worker: int = 0) -> FaultInjector | None:
    """Wrap the worker's NATS client and JetStream context and hook its batcher, when `spec` asks for faults."""
    parsed = parse(spec)
    if parsed is None:
        return None
    injector = FaultInjector(parsed, worker)
    log.warning(
        "INJECTING FAULTS (inject_faults=%r): %.1f%% of NATS publishes and acks, %.1f%% of ledger "
        "commits fail on purpose; never run this in production",
        spec,
        parsed.nats * 100,
        parsed.pg * 100,
    )
    publish = nc.publish
    js_publish = js.publish

    async def publish_with_faults(subject: str, *args, **kwargs):
        # Only acks and naks: pull requests are not publishes the worker could lose work by.
        if subject.startswith(_ACK_SUBJECT_PREFIX) and injector.ack_fault() is not None:
            return None
        return await publish(subject, *args, **kwargs)

    async def js_publish_with_faults(subject: str, *args, **kwargs):
        fault = injector.publish_fault()
        if fault == PUBLISH_FAILED:
            raise nats.errors.TimeoutError
        ack = await js_publish(subject, *args, **kwargs)
        if fault == PUBLISH_TIMEOUT:
            raise nats.errors.TimeoutError
        return ack

    nc.publish = publish_with_faults
    js.publish = js_publish_with_faults
    batcher.fault_hook = injector.commit_fault
    return injector
