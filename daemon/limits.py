"""Action limits in a worker: grant queued calls their turn, as the shared limits allow.

An action step with `limits` does not request its call at once: its commit
queues it in the ledger (`ledger/limits.py`) and the execution waits (its
state says `limit`). This loop, in every worker, walks the buckets that have
calls waiting and takes each one's turn in a Postgres transaction (rate
tokens and concurrency slots are rows, so two workers share one limit
exactly), then publishes each granted call's `limit_granted` message onto its
execution's subject. The execution applies it in order with its other
messages and only then requests the call, with the step's timeout starting
there; so a wait is not a failure, uses no attempt, and however many calls
wait, they cost ledger rows, not worker memory.

A new execution behind start gates (a tenant's enrolment rate, a workflow's
max_running) waits in the same queue before its first step, and is granted
by the same loop; `requeue` gives what waits the config's new limits on a
reload.
"""

import asyncio
import collections
import logging
import time
from collections.abc import Callable

import asyncpg
import orjson

from ledger import connection
from ledger import limits as ledger_limits
from ledger.connection import CONNECTION_ERRORS

from . import background, logs, metrics
from .tenant_limits import TenantLimits
from .topology import Topology

log = logging.getLogger("ordo.limits")

#: Seconds between two turns while calls wait (a 50/s limit earns a token every 20 ms).
TURN_S = 0.01
#: Seconds between two reads of which buckets have calls waiting: while some wait, and while none do.
SCAN_BUSY_S = 1.0
SCAN_IDLE_S = 0.1
#: The most calls one turn of one bucket grants.
MOST_PER_TURN = 1000


#: A block of call tokens is at most this many seconds' worth (at least one token): calls let go
#: together reach the provider together, and a busy event loop bunches them further (blocks of
#: 5 ms at 500/s let the provider see 533 calls in a 1 s window; one token a round trip, 501).
CALL_BLOCK_S = 0.002


def block_of(rate_per_s: float) -> int:
    return max(1, int(rate_per_s * CALL_BLOCK_S))


class CallTokens:
    """The rate tokens calls take as they are made, one worker's calls of a bucket in line.

    The grant that let a call out of the queue took a token already; this one
    is taken as the call is made, so that no delay between the two (a commit,
    a busy event loop) can bunch calls up at the provider. A worker's calls of
    one bucket wait in line, and one task per bucket takes tokens for as many
    of them as the bucket holds, in one round trip (tokens in blocks: at 500/s
    a round trip per call was the limit's bottleneck), then sleeps until the
    next token is due.
    """

    def __init__(self, pool):
        self._pool = pool
        #: bucket -> the calls waiting for a token, first come first served.
        self._lines: dict[str, collections.deque] = {}

    async def take(self, bucket: str, rate_per_s: float) -> None:
        line = self._lines.get(bucket)
        if line is None:
            line = self._lines[bucket] = collections.deque()
            background.start(self._serve(bucket, rate_per_s, line), f"handing out rate-limit tokens of {bucket}")
        ready = asyncio.get_running_loop().create_future()
        line.append(ready)
        await ready

    async def _serve(self, bucket: str, rate_per_s: float, line: collections.deque) -> None:
        """Hand tokens to the bucket's line until it is empty (the next call starts another)."""
        try:
            while line:
                try:
                    want = min(len(line), block_of(rate_per_s))
                    taken, wait = await ledger_limits.take_call_tokens(self._pool, bucket, rate_per_s, want)
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    log.warning("rate tokens for %s not taken (%s); trying again", bucket, exc)
                    taken, wait = 0, 0.1
                for _ in range(taken):
                    ready = line.popleft()
                    if not ready.done():  # a cancelled call's token goes unused: the rate stays under
                        ready.set_result(None)
                if not taken:
                    await asyncio.sleep(wait)
        finally:
            del self._lines[bucket]
            for ready in line:  # left by an error (logged by background.start): failed, not waiting for good
                if not ready.done():
                    ready.set_exception(RuntimeError(f"the rate-limit line of {bucket} stopped"))


#: A tenant's enrolment gate's bucket is this and the tenant (hotpath.vocabulary.enrolment_bucket).
ENROLMENTS = "enrolments|"


async def requeue(
    conn: asyncpg.Connection,
    before: TenantLimits,
    after: TenantLimits,
    max_running: Callable[[str, str], int | None],
) -> int:
    """Give what waits at the start gates and action limits the config's new per-tenant limits
    (a SIGHUP): queued rows carry their limits, and the head's rule a bucket's turn. How many rows.

    `max_running` is a workflow's as compiled now (the config's, else its definition's).
    """
    changed = 0
    async with conn.transaction():
        for bucket, rate_per_s, concurrency in after.gate_limits(before, max_running):
            changed += await ledger_limits.relimit_gate(conn, bucket, rate_per_s, concurrency)
        for tenant, action, rate_per_s, concurrency in after.action_limits():
            changed += await ledger_limits.relimit_action(conn, tenant, action, rate_per_s, concurrency)
    return changed


def grant_message(grant: ledger_limits.Grant) -> tuple[bytes, str]:
    """The `limit_granted` message for one grant, and its message id (the same for a repeat)."""
    body = {
        "v": 1,
        "kind": "limit_granted",
        "execution_id": grant.execution_id,
        "step_id": grant.step_id,
        "attempt": grant.attempt,
    }
    queued_us = int(grant.queued_at.timestamp() * 1_000_000)
    return orjson.dumps(body), f"grant:{grant.execution_id}:{grant.step_id}:{grant.attempt}:{queued_us}"


class LimitGrants:
    """The loop that grants queued calls, and the metrics of what waits."""

    def __init__(self, dsn: str, js, topology: Topology, *, tcp_timeout_s: float):
        self._dsn = dsn
        self._tcp_timeout_s = tcp_timeout_s
        self._js = js
        self._topology = topology
        self._conn: asyncpg.Connection | None = None
        #: Actions whose waiting gauge is set (to zero them once nothing of theirs waits).
        self._exported: set[str] = set()
        #: Tenants whose enrolment gauges are set (likewise).
        self._tenants_exported: set[str] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        buckets: list[ledger_limits.Waiting] = []
        next_scan = 0.0
        while not stopping.is_set():
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await connection.connect(self._dsn, tcp_timeout_s=self._tcp_timeout_s, timeout=10)
                if time.monotonic() >= next_scan:
                    buckets = await ledger_limits.waiting(self._conn)
                    self._export(buckets)
                    next_scan = time.monotonic() + (SCAN_BUSY_S if buckets else SCAN_IDLE_S)
                for bucket in buckets:
                    await self.turn(bucket.bucket)
                await asyncio.sleep(TURN_S if buckets else SCAN_IDLE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres or NATS away: nothing was granted; try again shortly
                log.warning("limit grants failed: %s; trying again", exc, extra=logs.failure("limit_grants", exc))
                await self._close()
                await asyncio.sleep(1.0)
        await self._close()

    async def turn(self, bucket: str) -> int:
        """Grant what the bucket's limits allow now; how many calls were granted."""
        assert self._conn is not None
        grants = await ledger_limits.grant(self._conn, bucket, MOST_PER_TURN, self._deliver)
        for grant in grants or ():
            metrics.limit_grants.labels(grant.action).inc()
        return len(grants or ())

    async def _deliver(self, grants: list[ledger_limits.Grant]) -> None:
        """Publish the grants onto their executions' subjects; raises if JetStream did not store one."""

        async def publish(grant: ledger_limits.Grant) -> None:
            body, msg_id = grant_message(grant)
            await self._js.publish(
                self._topology.exec_subject(grant.execution_id), body, headers={"Nats-Msg-Id": msg_id}
            )

        await asyncio.gather(*(publish(grant) for grant in grants))

    def _export(self, buckets: list[ledger_limits.Waiting]) -> None:
        per_action: dict[str, int] = {}
        behind: dict[str, tuple[int, float]] = {}
        for bucket in buckets:
            if bucket.bucket.startswith(ENROLMENTS):
                # One series per tenant with an enrolment rate and executions waiting at it: bounded
                # by the config, not by the tenants.
                behind[bucket.bucket[len(ENROLMENTS) :]] = (bucket.count, bucket.oldest_s)
            per_action[bucket.action] = per_action.get(bucket.action, 0) + bucket.count
        for tenant in self._tenants_exported - behind.keys():
            metrics.tenant_enrolment_waiting.labels(tenant).set(0)
            metrics.tenant_enrolment_behind.labels(tenant).set(0)
        for tenant, (count, oldest_s) in behind.items():
            metrics.tenant_enrolment_waiting.labels(tenant).set(count)
            metrics.tenant_enrolment_behind.labels(tenant).set(oldest_s)
        self._tenants_exported = set(behind)
        for action in self._exported - per_action.keys():
            metrics.limit_waiting.labels(action).set(0)
        for action, count in per_action.items():
            metrics.limit_waiting.labels(action).set(count)
        self._exported = set(per_action)

    async def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=5)
            except Exception:  # closing a broken connection: nothing left to do with it
                conn.terminate()
