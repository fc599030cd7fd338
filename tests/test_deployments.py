"""Two deployments (two prefixes: their own streams) sharing one ledger.

Each has its own partitions, leases, epochs and watermarks (migration 011),
and its workers' fair share counts only its own live workers. An operator's
cancel, signal or dead-letter retry goes only to an execution of the
deployment it is sent from (migration 021), and a worker applies nothing to
another deployment's execution that reaches its subjects some other way.
"""

import asyncio
import html
import re
import time
import uuid
from contextlib import asynccontextmanager

import asyncpg
import nats as nats_py
import pytest
from aiohttp.test_utils import TestClient, TestServer
from harness import FAILING, NO_PROBLEMS, WAITER, WELCOME, Clock, Harness, ordo

from bench.generator import trigger_event
from daemon import metrics
from daemon.advance import apply
from daemon.console import changes
from daemon.console.app import make_app
from daemon.console.auth import Sessions, Tokens
from daemon.console.state import Console
from daemon.dlq import OthersLetter, list_letters, retry, show_letter
from daemon.enrolment import event_message
from daemon.timers import TimerFire
from hotpath import ExecutionState
from ledger import console as console_queries
from ledger.executions import ExecutionRecord, deployment_of


async def _owners(h: Harness) -> dict[tuple[str, str], int]:
    rows = await h.db.fetch(
        "SELECT deployment, owner, count(*) AS n FROM ordo.partitions WHERE owner IS NOT NULL GROUP BY 1, 2"
    )
    return {(r["deployment"], r["owner"]): r["n"] for r in rows}


async def _until_shares(h: Harness, wanted: dict[str, list[int]], timeout: float = 20.0) -> None:
    """Until each deployment's owners hold these counts of its partitions (in any order)."""
    deadline = time.monotonic() + timeout
    while True:
        owners = await _owners(h)
        shares = {d: sorted(n for (deployment, _), n in owners.items() if deployment == d) for d in wanted}
        if shares == wanted:
            return
        assert time.monotonic() < deadline, f"partitions held {owners}, wanted {wanted}"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def _two_deployments(nats_url: str, pg_dsn: str, prefix: str):
    """Deployments A (the fixture's prefix) and B on one ledger. B's prefix is not under the
    fixture's stream prefix: its streams are deleted here."""
    a = Harness(nats_url, pg_dsn, prefix)
    b = Harness(nats_url, pg_dsn, f"{prefix}x")
    async with a, b:
        try:
            yield a, b
        finally:
            await _delete_streams(nats_url, b)


async def _delete_streams(nats_url: str, h: Harness) -> None:
    nc = await nats_py.connect(nats_url)
    try:
        js = nc.jetstream()
        t = h.topology
        for name in (t.triggers_stream, t.exec_stream, t.dlq_stream, t.actions_stream):
            await js.delete_stream(name)
    finally:
        await nc.close()


async def test_two_prefixes_on_one_ledger_own_their_own_partitions_and_count_their_own_workers(
    nats_server_url, pg_dsn, prefix
):
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(WELCOME)  # one ledger: the workflows are both deployments'
        async with a.worker(0, 2), a.worker(1, 2):
            await _until_shares(a, {prefix: [2, 2]})
            epochs_before = dict(
                await a.db.fetch("SELECT partition, epoch FROM ordo.partitions WHERE deployment = $1", prefix)
            )
            async with b.worker(0, 1):
                # Three live workers on the ledger, but B's one takes all of B's partitions,
                # and A's two keep theirs: nobody's share is ceil(4 / 3).
                await _until_shares(a, {prefix: [2, 2], other: [4]})
                # Distinct event ids: the two deployments share the ledger's executions too.
                a_events = [trigger_event("dep-a", i, tenant="acme", event_type="contact.created") for i in range(200)]
                b_events = [trigger_event("dep-b", i, tenant="acme", event_type="contact.created") for i in range(200)]
                await a.publish_triggers(a_events)
                await b.publish_triggers(b_events)
                await a.wait_until(
                    "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=400, timeout=60
                )
                await a.wait_triggers_drained()
                await b.wait_triggers_drained()
                # B's claims bumped none of A's epochs: A's workers were never fenced.
                epochs_after = dict(
                    await a.db.fetch("SELECT partition, epoch FROM ordo.partitions WHERE deployment = $1", prefix)
                )
                assert epochs_after == epochs_before
        assert await a.ledger_problems() == NO_PROBLEMS
        # Each deployment's watermarks count in its own execution stream.
        streams = await a.db.fetch("SELECT DISTINCT deployment, stream_created FROM ordo.partitions")
        assert len({r["stream_created"] for r in streams}) == 2


async def test_the_partitions_of_before_migration_011_are_adopted_by_the_first_deployment(pg_dsn):
    import asyncpg

    from ledger import leases
    from ledger.schema import migrate

    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        # As the migration leaves them: a ledger's partitions, owned and fenced, of no deployment yet.
        await conn.execute(
            "INSERT INTO ordo.partitions (deployment, partition, epoch, watermark, stream_created) "
            "SELECT '', p, 7, 100 + p, 'stream-a' FROM generate_series(0, 3) p"
        )
        await leases.create_partitions(conn, "ordo", 4)
        await leases.create_partitions(conn, "staging", 4)
        rows = await conn.fetch("SELECT deployment, partition, epoch, watermark FROM ordo.partitions ORDER BY 1, 2")
        assert [tuple(r) for r in rows] == [
            *(("ordo", p, 7, 100 + p) for p in range(4)),
            *(("staging", p, 0, 0) for p in range(4)),
        ]
        # The adopted epochs go on counting: the next claim fences whatever held them before.
        claimed = await leases.claim(conn, "ordo", "w0", 10.0, 4, 4, "stream-a")
        assert claimed == {p: (8, 100 + p) for p in range(4)}
    finally:
        await conn.close()


async def test_a_lanes_floor_only_moves_forward_in_its_stream_and_is_its_deployments_own(pg_dsn):
    """ledger/lane_floors.py: a late, lower floor never moves a lane back; a floor of another
    incarnation of the triggers stream is neither used nor kept; deployments sharing the ledger
    each have their own lanes' floors."""
    from ledger import lane_floors
    from ledger.schema import migrate

    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        await lane_floors.record(conn, "ordo", {0: ("stream-a", 100), 1: ("stream-a", 7)})
        await lane_floors.record(conn, "staging", {0: ("stream-a", 5)})
        await lane_floors.record(conn, "ordo", {0: ("stream-a", 90)})  # a worker that measured earlier
        assert await lane_floors.settled(conn, "ordo", {0: "stream-a", 1: "stream-a", 2: "stream-a"}) == {
            0: 100,
            1: 7,
        }
        assert await lane_floors.settled(conn, "staging", {0: "stream-a"}) == {0: 5}
        # The stream was created again: its sequences start again, and the old floor means nothing.
        assert await lane_floors.settled(conn, "ordo", {0: "stream-b"}) == {}
        await lane_floors.record(conn, "ordo", {0: ("stream-b", 3)})
        assert await lane_floors.settled(conn, "ordo", {0: "stream-b", 1: "stream-a"}) == {0: 3, 1: 7}
    finally:
        await conn.close()


# A session waits an hour for a page view about its contact, then ends either way.
VIEWER = {
    "id": "viewer",
    "tenant": "acme",
    "trigger": {"event": "session.started"},
    "steps": [
        {"id": "view", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h", "on_timeout": "gone"},
        {"id": "seen", "type": "set", "values": {"outcome": "seen"}, "next": "done"},
        {"id": "gone", "type": "set", "values": {"outcome": "timed out"}},
        {"id": "done", "type": "end"},
    ],
}


def _sessions(h: Harness, run_id: str, contacts: int) -> tuple[list[dict], list[str]]:
    """A session.started trigger per contact c-0 .. c-(n-1), and the executions they start."""
    events = []
    for i in range(contacts):
        event = trigger_event(run_id, i, tenant="acme", event_type="session.started")
        event["contact"] = {"id": f"c-{i}", "first_name": "Ada"}
        events.append(event)
    return events, [h.execution_id("acme", "viewer", e["event_id"]) for e in events]


def _views(run_id: str, contacts: range) -> list[dict]:
    views = []
    for i in contacts:
        view = trigger_event(run_id, i, tenant="acme", event_type="page.viewed")
        view["contact"] = {"id": f"c-{i}"}
        views.append(view)
    return views


async def _kinds(h: Harness, execution_ids: list[str]) -> dict[str, list[str]]:
    """Each execution's transition kinds after its start, in order."""
    rows = await h.db.fetch(
        "SELECT execution_id::text, kind FROM ordo.transitions WHERE execution_id = ANY($1::uuid[]) AND seq > 1"
        " ORDER BY execution_id, seq",
        execution_ids,
    )
    kinds: dict[str, list[str]] = {e: [] for e in execution_ids}
    for r in rows:
        kinds[r["execution_id"]].append(r["kind"])
    return kinds


async def test_two_deployments_fire_their_own_timers_once_and_route_events_only_to_their_own_executions(
    nats_server_url, pg_dsn, prefix
):
    """The same partition numbers, the same contacts waiting in both: each deployment's timers fire
    by its own clock, once, and a page view published to one wakes only that one's sessions."""
    contacts = 24
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(VIEWER)
        a_sessions, a_ids = _sessions(a, "sess-a", contacts)
        b_sessions, b_ids = _sessions(b, "sess-b", contacts)
        waits = "SELECT count(*) FROM ordo.event_waits w JOIN ordo.timers t USING (execution_id, deployment)"
        a_clock, b_clock = Clock(), Clock()
        async with a.worker(clock_ms=a_clock), b.worker(clock_ms=b_clock):
            await _until_shares(a, {prefix: [4], other: [4]})
            await a.publish_triggers(a_sessions)
            await b.publish_triggers(b_sessions)
            await a.wait_until(waits, expect=2 * contacts)
            # Both deployments wait in every partition number, on the same contacts' page views.
            rows = await a.db.fetch(
                "SELECT w.deployment, e.partition, w.execution_id::text FROM ordo.event_waits w"
                " JOIN ordo.executions e USING (execution_id)"
            )
            assert {r["execution_id"] for r in rows if r["deployment"] == prefix} == set(a_ids)
            assert {r["execution_id"] for r in rows if r["deployment"] == other} == set(b_ids)
            assert {r["partition"] for r in rows if r["deployment"] == prefix} == set(range(4))
            assert {r["partition"] for r in rows if r["deployment"] == other} == set(range(4))

            # Page views of the first half of the contacts, published to A only: A's sessions of
            # those contacts see them, B's (same contacts, same tenant) go on waiting.
            seen = range(contacts // 2)
            await a.publish_triggers(_views("view-a", seen))
            await a.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=len(seen))
            await a.wait_triggers_drained()

            # An hour passes for A alone: A's other sessions time out; B's, in the same
            # partition numbers and due by A's clock, are not A's to fire.
            a_clock.advance(2 * 3600 * 1000)
            await a.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=contacts)
            for p in range(4):
                await a.wait_partition_drained(p)
            a_kinds = await _kinds(a, a_ids)
            assert [a_kinds[e] for e in a_ids] == [
                ["waiting", "event_received", "set", "completed"]
                if i in seen
                else ["waiting", "timed_out", "set", "completed"]
                for i in range(contacts)
            ]
            assert await a.db.fetchval(waits) == contacts  # B's waits and timers, all of them
            assert all(kinds == ["waiting"] for kinds in (await _kinds(b, b_ids)).values())

            # Then B's hour: each of B's timers fires once, in B.
            b_clock.advance(2 * 3600 * 1000)
            await a.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=2 * contacts)
            b_kinds = await _kinds(b, b_ids)
            assert all(b_kinds[e] == ["waiting", "timed_out", "set", "completed"] for e in b_ids)
        assert await a.db.fetchval("SELECT count(*) FROM ordo.timers") == 0
        assert await a.ledger_problems() == NO_PROBLEMS


async def test_a_cancel_or_signal_for_another_deployments_execution_is_refused_not_sent_to_this_one(
    nats_server_url, pg_dsn, prefix
):
    """The ledger is shared, so B's `ordo` and console find A's execution; sent on B's subjects, B's
    worker would apply it to the row both share. It is refused, naming the execution and its deployment."""
    operator = "op-0123456789abcdef"
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(WAITER)
        async with a.worker(), b.worker():
            await a.publish_triggers([trigger_event("op", 0, tenant="acme", event_type="session.started")])
            execution_id = a.execution_id("acme", "waiter", "op-0")
            await a.wait_status(execution_id, "waiting")
            refusal = f"execution {execution_id} belongs to deployment {prefix!r}, not to this one ({other!r})"

            for command in (("execution", "cancel", execution_id), ("signal", execution_id, "done")):
                refused = ordo(*command, env_extra=b.env())
                assert refused.returncode == 1 and refusal in refused.stderr, refused.stderr
            pool = await asyncpg.create_pool(b.config.pg_dsn, min_size=1, max_size=2)
            console = Console(pool, b.js, b.topology, Tokens(f"alice:{operator}"), Sessions())
            try:
                async with TestClient(TestServer(make_app(console))) as client:
                    headers = {"Authorization": f"Bearer {operator}"}
                    for change, form in (("cancel", {}), ("signal", {"name": "done"})):
                        page = await client.post(f"/executions/{execution_id}/{change}", data=form, headers=headers)
                        assert page.status == 409 and html.escape(refusal) in await page.text()
            finally:
                await pool.close()
            outcomes = await a.db.fetch("SELECT action, outcome FROM ordo.console_audit ORDER BY id")
            assert [(r["action"], r["outcome"]) for r in outcomes] == [
                ("cancel", f"refused: {refusal}: not sent"),
                ("signal", f"refused: {refusal}: not sent"),
            ]
            # Nothing reached B's execution stream, and A's execution still waits.
            assert (await b.js.stream_info(b.topology.exec_stream)).state.messages == 0
            assert (
                await a.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
                == "waiting"
            )

            # From A, the same cancel is sent, and A's worker applies it.
            sent = ordo("execution", "cancel", execution_id, env_extra=a.env())
            assert sent.returncode == 0 and f"cancel sent to {execution_id}" in sent.stdout, sent.stderr
            await a.wait_status(execution_id, "cancelled")
            # A row of before migration 021 names no deployment: of two on the ledger, none can tell whose.
            await a.db.execute(
                "UPDATE ordo.executions SET deployment = NULL WHERE execution_id = $1::uuid", execution_id
            )
            legacy = ordo("signal", execution_id, "done", env_extra=a.env())
            assert legacy.returncode == 1 and "a deployment the ledger cannot name" in legacy.stderr
            unknown = ordo("signal", "00000000-0000-0000-0000-000000000000", "done", env_extra=a.env())
            assert unknown.returncode == 1 and "no execution 00000000-0000-0000-0000-000000000000" in unknown.stderr


async def test_an_execution_is_written_as_its_deployments_and_one_of_before_as_the_only_deployments(
    nats_server_url, pg_dsn, prefix
):
    """Migration 021: the batcher's connection names the deployment and the column's default records it;
    a row of before it names none, and on a ledger of one deployment it is that one's."""
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker():
            execution_id = await h.enrol_waiter("own")
        stored = "SELECT deployment FROM ordo.executions WHERE execution_id = $1::uuid"
        assert await h.db.fetchval(stored, execution_id) == prefix
        assert await deployment_of(h.db, execution_id) == (True, prefix)
        await h.db.execute("UPDATE ordo.executions SET deployment = NULL WHERE execution_id = $1::uuid", execution_id)
        assert await deployment_of(h.db, execution_id) == (True, prefix)
        assert await deployment_of(h.db, "not-an-execution-id") == (False, None)


# A session waits for a page view, then for a form: each wait with its timeout.
FOLLOW_UP = {
    "id": "follow-up",
    "tenant": "acme",
    "trigger": {"event": "session.started"},
    "steps": [
        {"id": "view", "type": "wait_for_event", "event": "page.viewed", "timeout": "1h", "on_timeout": "gone"},
        {"id": "form", "type": "wait_for_event", "event": "form.sent", "timeout": "2h", "on_timeout": "gone"},
        {"id": "sent", "type": "set", "values": {"outcome": "sent"}, "next": "done"},
        {"id": "gone", "type": "set", "values": {"outcome": "gone"}},
        {"id": "done", "type": "end"},
    ],
}


async def test_a_timer_and_wait_rewritten_by_another_deployments_commit_are_filed_under_it(
    nats_server_url, pg_dsn, prefix
):
    """A row of before migration 021 names no deployment, and every deployment's worker takes it as its
    own. When B's worker advances it past A's wait, the timer and wait its commit writes in place of A's
    are B's: B's walk fires the timer and B's triggers wake the wait (not A's, which never sees them)."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(FOLLOW_UP)
        async with a.worker(), b.worker():
            session = trigger_event("legacy", 0, tenant="acme", event_type="session.started")
            session["contact"] = {"id": "c-0"}
            execution_id = a.execution_id("acme", "follow-up", session["event_id"])
            await a.publish_triggers([session])
            await a.wait_timer(execution_id, "event_timeout")
            filed = (
                "SELECT t.deployment, w.deployment, w.event_type FROM ordo.timers t"
                " JOIN ordo.event_waits w USING (execution_id) WHERE execution_id = $1::uuid"
            )
            assert tuple(await a.db.fetchrow(filed, execution_id)) == (prefix, prefix, "page.viewed")
            await a.db.execute(
                "UPDATE ordo.executions SET deployment = NULL WHERE execution_id = $1::uuid", execution_id
            )

            # The page view reaches B's subject for it; B's commit replaces the timer and the wait.
            (view,) = _views("legacy-view", range(1))
            await b.publish_raw(b.topology.exec_subject(execution_id), *event_message(execution_id, view))
            waiting_for = "SELECT event_type FROM ordo.event_waits WHERE execution_id = $1::uuid"
            await a.wait_until(waiting_for, execution_id, expect="form.sent")
            assert tuple(await a.db.fetchrow(filed, execution_id)) == (other, other, "form.sent")

            # B's form wakes it: B's trigger routing finds the wait as B's.
            form = trigger_event("legacy-form", 0, tenant="acme", event_type="form.sent")
            form["contact"] = {"id": "c-0"}
            await b.publish_triggers([form])
            await a.wait_status(execution_id, "completed")
        assert await a.db.fetchval("SELECT count(*) FROM ordo.timers") == 0


async def _statuses(h: Harness, letter_ids: list[int]) -> list[str]:
    rows = await h.db.fetch("SELECT status FROM ordo.dead_letters WHERE id = ANY($1::bigint[]) ORDER BY id", letter_ids)
    return [r["status"] for r in rows]


async def test_a_dead_letter_retry_takes_only_its_own_deployments_letters(nats_server_url, pg_dsn, prefix):
    """The dead-letter table is shared too: B's `ordo dlq retry --all` would have put a retry of A's
    failed step onto B's execution subject, for B's worker to apply to A's execution. B leaves A's
    letters open, says so, and publishes nothing; A retries its own."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(FAILING)
        async with a.worker(), b.worker():
            await a.publish_triggers([trigger_event("dlq", 0, tenant="acme", event_type="order.placed")])
            await a.publish_raw(a.topology.trigger_subject("acme", "order.placed"), b"{not json", msg_id="bad-0")
            await a.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=2)

            letters = [r["id"] for r in await a.db.fetch("SELECT id FROM ordo.dead_letters")]
            left = (await retry(b.db, b.js, b.topology)).lines
            assert left == [
                f"2 letter(s) of another deployment than {other!r} left open: retry them from their own deployment"
            ]
            assert await _statuses(a, letters) == ["open", "open"]
            assert (await b.js.stream_info(b.topology.exec_stream)).state.messages == 0

            execution_id = a.execution_id("acme", "failing", "dlq-0")
            retried = (await retry(a.db, a.js, a.topology)).lines
            assert len(retried) == 2 and any(f"execution {execution_id} resumes at step call" in r for r in retried)
            assert await _statuses(a, letters) == ["retried", "retried"]  # (and fail again: new letters)


async def _letters_of_both(a: Harness, b: Harness) -> dict[int, str]:
    """Two open letters of each deployment, a failed step of its execution and a message taken from its
    subjects, in the shared table; each letter's id with the prefix of the deployment whose it is."""
    await a.deploy(FAILING)
    async with a.worker(), b.worker():
        for h in (a, b):
            run = f"list-{h.config.prefix}"
            await h.publish_triggers([trigger_event(run, 0, tenant="acme", event_type="order.placed")])
            subject = h.topology.trigger_subject("acme", "order.placed")
            await h.publish_raw(subject, b"{not json", msg_id=f"bad-{run}")
        await a.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=4)
    prefix, other = a.config.prefix, b.config.prefix
    theirs = {a.execution_id("acme", "failing", f"list-{prefix}-0"), a.topology.triggers_stream}
    rows = await a.db.fetch("SELECT id, execution_id::text, stream FROM ordo.dead_letters")
    whose = {r["id"]: prefix if theirs & {r["execution_id"], r["stream"]} else other for r in rows}
    assert sorted(whose.values()) == sorted([prefix, prefix, other, other])
    return whose


async def test_a_dead_letter_list_shows_its_own_deployments_letters_and_everyones_on_request(
    nats_server_url, pg_dsn, prefix
):
    """`ordo dlq list` shows the letters its `retry` would take: a failed step of its own execution and a
    message from its own subjects, not the other deployment's in the shared table. `--all-deployments`
    shows both deployments' letters, each naming whose it is."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        whose = await _letters_of_both(a, b)
        other = b.config.prefix

        def listed(lines: list[str]) -> set[int]:
            return {int(line.split()[0]) for line in lines}

        assert listed(await list_letters(a.db, a.topology)) == {i for i, d in whose.items() if d == prefix}
        assert listed(await list_letters(b.db, b.topology)) == {i for i, d in whose.items() if d == other}
        # The deployment stands after the reason: id, at, reason, deployment, tenant, ...
        everyone = await list_letters(b.db, b.topology, all_deployments=True)
        assert {int(fields[0]): fields[3] for fields in map(str.split, everyone)} == whose


async def test_a_dead_letter_of_another_deployment_is_shown_only_on_request(nats_server_url, pg_dsn, prefix):
    """`ordo dlq show ID` is `list`'s letter in full: another deployment's letter is refused, naming its
    id and whose it is, as `list` leaves it out; `--all-deployments` shows it with its deployment."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        whose = await _letters_of_both(a, b)
        other = b.config.prefix
        theirs = min(i for i, d in whose.items() if d == prefix)
        ours = min(i for i, d in whose.items() if d == other)

        def refused(*argv: str, then: str) -> None:
            """B's `ordo` about A's letter: exit 1, nothing on stdout, a refusal naming the letter and A."""
            result = ordo(*argv, env_extra=b.env())
            assert result.returncode == 1 and result.stdout == "", result
            whose = f"belongs to deployment {prefix!r}, not to this one ({other!r})"
            assert f"ordo: dead letter {theirs} {whose}: {then}" in result.stderr

        refused("dlq", "show", str(theirs), then="pass --all-deployments to show it")
        shown = ordo("dlq", "show", str(theirs), "--all-deployments", env_extra=b.env())
        assert shown.returncode == 0, shown.stderr
        assert f"dead letter {theirs}  (open)" in shown.stdout and f"  deployment    {prefix}\n" in shown.stdout
        own = ordo("dlq", "show", str(ours), env_extra=b.env())
        assert own.returncode == 0 and f"dead letter {ours}  (open)" in own.stdout, own.stderr
        retry = ordo("dlq", "retry", "--all", "--all-deployments", env_extra=b.env())
        assert retry.returncode == 1 and "retry takes only this deployment's letters" in retry.stderr
        # A retry by id of another deployment's letter is refused as `show` is, and the letter stays open.
        refused("dlq", "retry", str(theirs), then="left open, for its own deployment to retry")
        assert await b.db.fetchval("SELECT retried_at IS NULL FROM ordo.dead_letters WHERE id = $1", theirs)
        # B's `--all` counts what it retried, and says how many it left open (A's among them).
        retry = ordo("dlq", "retry", "--all", env_extra=b.env())
        assert retry.returncode == 0, retry.stderr
        retried = sum(1 for d in whose.values() if d == other)
        left = len(whose) - retried
        assert retry.stdout.endswith(f"{retried} dead letter(s) retried, {left} left open\n"), retry.stdout

        # B's message, as if taken from a prefix no deployment on the ledger has: nobody's, whose cannot be told.
        message = await b.db.fetchval("SELECT id FROM ordo.dead_letters WHERE stream = $1", b.topology.triggers_stream)
        await b.db.execute("UPDATE ordo.dead_letters SET subject = 'gone.triggers.acme.x' WHERE id = $1", message)
        with pytest.raises(OthersLetter) as nobodys:
            await show_letter(b.db, b.topology, message)
        assert str(nobodys.value) == (
            f"dead letter {message} is not this deployment's, and whose it is cannot be told ({other!r})"
        )
        assert "  deployment    -\n" in await show_letter(b.db, b.topology, message, all_deployments=True)


OPERATOR = "op-0123456789abcdef"


@asynccontextmanager
async def _console(h: Harness):
    """The console of `h`'s deployment, and the headers of an operator's request to it."""
    pool = await asyncpg.create_pool(h.config.pg_dsn, min_size=1, max_size=2)
    console = Console(pool, h.js, h.topology, Tokens(f"alice:{OPERATOR}"), Sessions())
    try:
        async with TestClient(TestServer(make_app(console))) as client:
            yield client, {"Authorization": f"Bearer {OPERATOR}"}
    finally:
        await pool.close()


def _rows(page: str) -> list[list[str]]:
    """Each table row of the page as the text of its cells (tags dropped, entities read)."""
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
        for body in re.findall(r"<tbody>.*?</tbody>", page, re.DOTALL)
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    ]


async def test_the_consoles_dead_letters_are_its_deployments_and_everyones_on_request(nats_server_url, pg_dsn, prefix):
    """B's console lists and counts B's letters, those its retry takes, as `ordo dlq list` does; `all=1`
    lists and counts both deployments', each naming whose it is, with a Retry button on B's only."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        whose = await _letters_of_both(a, b)
        other = b.config.prefix
        async with _console(b) as (client, headers):

            async def page(path: str) -> tuple[str, list[list[str]], list[list[str]]]:
                """The page; its group rows (the first cell a reason) and its letter rows (an id)."""
                text = await (await client.get(path, headers=headers)).text()
                rows = _rows(text)
                return text, [r for r in rows if not r[0].isdigit()], [r for r in rows if r[0].isdigit()]

            text, groups, letters = await page("/dead-letters")
            assert {int(r[0]) for r in letters} == {i for i, d in whose.items() if d == other}
            # reason, action, tenant, letters, first, last, retry
            assert sum(int(g[3]) for g in groups) == 2 and all(g[6] == f"Retry {g[3]}" for g in groups)
            assert "<th>deployment</th>" not in text and 'href="/dead-letters?all=1"' in text

            text, groups, letters = await page("/dead-letters?all=1")
            # id, at, reason, deployment, ..., retry
            assert {int(r[0]): r[3] for r in letters} == whose
            assert all((r[-1] == "Retry") == (r[3] == other) for r in letters)
            # reason, deployment, action, tenant, letters, first, last, retry
            assert sum(int(g[4]) for g in groups) == 4 and {g[1] for g in groups} == {prefix, other}
            assert all((g[7] == f"Retry {g[4]}") == (g[1] == other) for g in groups)
            assert f"Only deployment {other}" in text and text.count("<th>deployment</th>") == 2


async def test_a_console_retry_of_another_deployments_letter_is_refused_and_audited(nats_server_url, pg_dsn, prefix):
    """B's console refuses to retry A's letter as it refuses to cancel A's execution: 409, naming the
    letter and whose it is (or that it cannot be told), audited "refused", nothing published and the
    letter left open for A. It once answered 200 "Done", audited "ok"; then "Not sent", every refusal's
    title, and now a title that says what happened. B's own letter still retries, once."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        whose = await _letters_of_both(a, b)
        other = b.config.prefix
        rows = await a.db.fetch("SELECT id, reason, stream FROM ordo.dead_letters ORDER BY id")
        theirs = next(r["id"] for r in rows if whose[r["id"]] == prefix and r["reason"] == "step_failed")
        nobodys = next(r["id"] for r in rows if whose[r["id"]] == prefix and r["reason"] != "step_failed")
        ours = next(r["id"] for r in rows if whose[r["id"]] == other and r["reason"] != "step_failed")
        # A's message, as if taken from a prefix no deployment on the ledger has: whose it is cannot be told.
        await a.db.execute("UPDATE ordo.dead_letters SET subject = 'gone.triggers.acme.x' WHERE id = $1", nobodys)
        refusals = {
            theirs: f"dead letter {theirs} belongs to deployment {prefix!r}, not to this one ({other!r}): "
            "left open, for its own deployment to retry",
            nobodys: f"dead letter {nobodys} is not this deployment's, and whose it is cannot be told ({other!r}): "
            "left open, for its own deployment to retry",
        }
        streams = (b.topology.exec_stream, b.topology.triggers_stream)

        async def published() -> list[int]:
            return [(await b.js.stream_info(stream)).state.messages for stream in streams]

        before = await published()
        async with _console(b) as (client, headers):
            for letter_id, refusal in refusals.items():
                page = await client.post(f"/dead-letters/{letter_id}/retry", headers=headers)
                assert page.status == 409, await page.text()
                assert html.escape(refusal) in await page.text()
                title = "Not retried: another deployment's letter"
                assert f"<title>{html.escape(title)} · Ordo</title>" in await page.text()
            assert await published() == before
            assert await _statuses(a, [theirs, nobodys]) == ["open", "open"]

            own = await client.post(f"/dead-letters/{ours}/retry", headers=headers)
            assert own.status == 200
            assert f"{ours}: republished to {b.topology.trigger_subject('acme', 'order.placed')}" in await own.text()
            # Once more: nothing to retry, so nothing is sent, and it says so (it once answered "Done", "ok").
            again = await client.post(f"/dead-letters/{ours}/retry", headers=headers)
            assert again.status == 409 and f"dead letter {ours} is not open (retried already?)" in await again.text()
            assert "<title>Not retried: the letter is no longer open · Ordo</title>" in await again.text()
        assert await _statuses(a, [ours]) == ["retried"]
        trail = await a.db.fetch("SELECT action, dead_letter_id, outcome FROM ordo.console_audit ORDER BY id")
        assert [tuple(r) for r in trail] == [
            ("dlq_retry", theirs, f"refused: {refusals[theirs]}"),
            ("dlq_retry", nobodys, f"refused: {refusals[nobodys]}"),
            ("dlq_retry", ours, "ok"),
            ("dlq_retry", ours, f"refused: dead letter {ours} is not open (retried already?)"),
        ]


async def test_an_executions_page_shows_a_retry_button_on_its_deployments_letters_only(nats_server_url, pg_dsn, prefix):
    """An execution's page showed a Retry button on each of its letters, though the console refuses to retry
    another deployment's (409): on another's it shows whose the letter is instead, as the dead-letter page
    shows another's letter without a button. Each console's page of each deployment's failed execution."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        await _letters_of_both(a, b)
        failed = {h.config.prefix: h.execution_id("acme", "failing", f"list-{h.config.prefix}-0") for h in (a, b)}
        letter_of = {
            deployment: await a.db.fetchval("SELECT id FROM ordo.dead_letters WHERE execution_id = $1::uuid", e)
            for deployment, e in failed.items()
        }
        for h in (a, b):
            async with _console(h) as (client, headers):
                for deployment, execution_id in failed.items():
                    page = await (await client.get(f"/executions/{execution_id}", headers=headers)).text()
                    letters = _rows(page.split("<h2>Dead letters</h2>")[1].split("<h2>Steps</h2>")[0])
                    # id, at, reason, step, attempts, error, retry or whose
                    assert [r[0] for r in letters] == [str(letter_of[deployment])]
                    button = f'action="/dead-letters/{letter_of[deployment]}/retry"' in page
                    if deployment == h.config.prefix:
                        assert button and letters[0][-1] == "Retry"
                    else:
                        assert not button and letters[0][-1] == f"deployment {deployment}'s"


async def test_a_group_retry_from_the_console_takes_its_deployments_letters_and_counts_what_it_left_open(
    nats_server_url, pg_dsn, prefix
):
    """A group retry takes B's letters of the group alone, and counts only those (A's once counted as
    retried, and could fill the group's limit). A letter it takes but cannot retry (no subject to
    republish it to) stays open, and the count says so and why: it once counted as retried."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        whose = await _letters_of_both(a, b)
        other = b.config.prefix
        theirs = [i for i, d in whose.items() if d == prefix]
        rows = await a.db.fetch("SELECT id, reason, tenant FROM ordo.dead_letters ORDER BY id")
        message = next(r for r in rows if whose[r["id"]] == other and r["reason"] != "step_failed")
        # B's refused message, as if its subject was lost: B's still (a letter of no subject is everyone's).
        await a.db.execute("UPDATE ordo.dead_letters SET subject = '' WHERE id = $1", message["id"])
        async with _console(b) as (client, headers):
            group = {"reason": "step_failed", "action": "webhook", "tenant": "acme"}
            retried = await client.post("/dead-letters/retry-group", data=group, headers=headers)
            assert retried.status == 200 and "1 dead letter(s) retried</p>" in await retried.text()
            group = {"reason": message["reason"], "action": "", "tenant": message["tenant"] or ""}
            left = await client.post("/dead-letters/retry-group", data=group, headers=headers)
            assert left.status == 200
            assert (
                f"0 dead letter(s) retried, 1 left open: {message['id']}: nothing to retry it with (no subject)"
            ) in html.unescape(await left.text())
        rows = await a.db.fetch("SELECT id, reason, status FROM ordo.dead_letters")
        assert {r["id"]: r["status"] for r in rows if r["id"] in theirs} == dict.fromkeys(theirs, "open")
        b_step = next(r for r in rows if whose[r["id"]] == other and r["reason"] == "step_failed")
        assert b_step["status"] == "retried"
        assert next(r for r in rows if r["id"] == message["id"])["status"] == "open"


async def test_a_group_retry_passes_over_the_letters_it_cannot_retry_and_says_why(
    nats_server_url, pg_dsn, prefix, monkeypatch
):
    """A group retry takes at most GROUP_RETRY_LIMIT letters, oldest first. It once took them whether it could
    retry them or not: a group whose oldest letters had no subject to republish to took those at every retry,
    left them open again, and never reached the rest. It takes the ones it can retry; the others it counts as
    left open, naming the first few with why, in the words of `ordo dlq retry` (other_deployment's too)."""
    monkeypatch.setattr(console_queries, "GROUP_RETRY_LIMIT", 2)
    monkeypatch.setattr(changes, "LEFT_OPEN_NAMED", 2)
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WAITER)
        async with h.worker():
            subject = h.topology.trigger_subject("acme", "order.placed")
            for i in range(4):
                await h.publish_raw(subject, b"{not json", msg_id=f"bad-{i}")
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=4)
            elsewhere = await h.enrol_waiter("elsewhere")
        letters = await h.db.fetch("SELECT id, reason, tenant FROM ordo.dead_letters ORDER BY id")
        ids = [r["id"] for r in letters]
        # The three oldest, as if their subject was lost: more than the limit, before the one that can be retried.
        await h.db.execute("UPDATE ordo.dead_letters SET subject = '' WHERE id = ANY($1::bigint[])", ids[:3])
        group = {"reason": letters[0]["reason"], "action": "", "tenant": letters[0]["tenant"] or ""}
        # Two messages for executions with no subject to send them to: one gone, one of a deployment with no
        # partitions (the worker checks each message's execution when it takes it: these are made up here).
        gone = str(uuid.uuid4())
        await h.db.execute(
            "UPDATE ordo.executions SET deployment = 'elsewhere' WHERE execution_id = $1::uuid", elsewhere
        )
        for seq, execution_id in enumerate((gone, elsewhere)):
            await h.db.execute(
                "INSERT INTO ordo.dead_letters (reason, error, tenant, execution_id, subject, stream, stream_seq,"
                " payload) VALUES ('other_deployment', 'made up', 'acme', $1::uuid, $2, $3, $4, '{}')",
                execution_id,
                h.topology.exec_subject(execution_id),
                h.topology.exec_stream,
                seq,
            )
        no_subject = "nothing to retry it with (no subject)"
        async with _console(h) as (client, headers):
            page = await client.post("/dead-letters/retry-group", data=group, headers=headers)
            assert page.status == 200
            assert (
                f"1 dead letter(s) retried, 3 left open: {ids[0]}: {no_subject}; {ids[1]}: {no_subject}; 1 more</p>"
            ) in html.unescape(await page.text())
            assert await _statuses(h, ids) == ["open", "open", "open", "retried"]
            again = await client.post("/dead-letters/retry-group", data=group, headers=headers)
            assert "0 dead letter(s) retried, 3 left open: " in html.unescape(await again.text())

            others = {"reason": "other_deployment", "action": "", "tenant": "acme"}
            page = await client.post("/dead-letters/retry-group", data=others, headers=headers)
            told = html.unescape(await page.text())
        said = (await retry(h.db, h.js, h.topology, reason="other_deployment")).left_open
        assert len(said) == 2 and f"0 dead letter(s) retried, 2 left open: {'; '.join(said)}</p>" in told
        assert await h.db.fetchval("SELECT count(*) FROM ordo.dead_letters WHERE status = 'open'") == 5


async def test_a_retried_other_deployment_letter_goes_to_its_executions_own_deployment(nats_server_url, pg_dsn, prefix):
    """A signal that reached B's subject for A's execution is dead-lettered there (`other_deployment`).
    Its retry goes to A's subject for it, where A's worker applies it; republished to its own subject,
    B's, it was dead-lettered again. One for an execution whose deployment cannot be told stays open."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        await a.deploy(WAITER)
        async with a.worker(), b.worker():
            events = [trigger_event("home", i, tenant="acme", event_type="session.started") for i in range(2)]
            await a.publish_triggers(events)
            theirs, legacy = (a.execution_id("acme", "waiter", e["event_id"]) for e in events)
            for execution_id in (theirs, legacy):
                await a.wait_status(execution_id, "waiting")
                await b.signal(execution_id, "done")
            letters = "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'other_deployment'"
            await a.wait_until(letters, expect=2)
            ids = {
                r["execution_id"]: r["id"]
                for r in await a.db.fetch("SELECT id, execution_id::text FROM ordo.dead_letters")
            }
            # A row of before migration 021, on a ledger of two deployments: whose it is cannot be told.
            await a.db.execute("UPDATE ordo.executions SET deployment = NULL WHERE execution_id = $1::uuid", legacy)
            sent_before = (await a.js.stream_info(a.topology.exec_stream)).state.messages

            lines = (await retry(b.db, b.js, b.topology)).lines
            assert sorted(lines) == sorted(
                [
                    f"{ids[theirs]}: sent to {a.topology.exec_subject(theirs)}, "
                    f"the subject of execution {theirs} in its deployment {prefix!r}",
                    f"{ids[legacy]}: left open: execution {legacy} belongs to a deployment the ledger cannot name "
                    "(enrolled before migration 021 by one of several): assign it, then retry",
                ]
            )
            await a.wait_status(theirs, "completed")
            assert (await a.js.stream_info(a.topology.exec_stream)).state.messages == sent_before + 1
            assert [await _statuses(a, [ids[e]]) for e in (theirs, legacy)] == [["retried"], ["open"]]
            assert await a.db.fetchval(letters) == 2  # not dead-lettered again
            assert (await b.js.stream_info(b.topology.exec_stream)).state.messages == 2  # B's two signals only
            assert await a.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", legacy) == (
                "waiting"
            )
            # B's console's group retry passes it over, and says why in the words `ordo dlq retry` just said it.
            async with _console(b) as (client, headers):
                group = {"reason": "other_deployment", "action": "", "tenant": "acme"}
                page = await client.post("/dead-letters/retry-group", data=group, headers=headers)
                told = next(line for line in lines if line.startswith(f"{ids[legacy]}: "))
                assert f"0 dead letter(s) retried, 1 left open: {told}</p>" in html.unescape(await page.text())


async def _dead_lettered_metric(reason: str, expect: float, timeout: float = 10.0) -> None:
    """Until ordo_dead_letters_total{reason} reads `expect` (it counts after the commit, with the DLQ copy)."""
    deadline = time.monotonic() + timeout
    while (value := metrics.dead_letters.labels(reason)._value.get()) != expect:
        assert time.monotonic() < deadline, f"ordo_dead_letters_total{{reason={reason!r}}} is {value}, not {expect}"
        await asyncio.sleep(0.05)


async def test_a_message_on_this_deployments_subject_for_anothers_execution_is_dead_lettered_not_applied(
    nats_server_url, pg_dsn, prefix
):
    """A message that reaches B's execution subject for A's execution some other way than `ordo` (a raw
    publish, an old script, a mis-set prefix): B's worker would apply it to the row both share, under B's
    fencing and out of A's order. It dead-letters it (`other_deployment`), acks it and goes on with its own
    work; A's worker applies A's, and takes a row of before migration 021 (no deployment) as its own."""
    async with _two_deployments(nats_server_url, pg_dsn, prefix) as (a, b):
        other = b.config.prefix
        await a.deploy(WAITER)
        async with a.worker(), b.worker():
            await a.publish_triggers([trigger_event("theirs", 0, tenant="acme", event_type="session.started")])
            await b.publish_triggers([trigger_event("ours", 0, tenant="acme", event_type="session.started")])
            theirs = a.execution_id("acme", "waiter", "theirs-0")
            ours = b.execution_id("acme", "waiter", "ours-0")
            await a.wait_status(theirs, "waiting")
            await b.wait_status(ours, "waiting")
            row = "SELECT seq, last_stream_seq FROM ordo.executions WHERE execution_id = $1::uuid"
            seq, last_stream_seq = await a.db.fetchrow(row, theirs)
            counted = metrics.dead_letters.labels("other_deployment")._value.get()
            letters = "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'other_deployment'"

            # A raw signal on B's subject for A's execution, then B's own signal for its own.
            await b.signal(theirs, "done")
            await b.signal(ours, "done")
            await b.wait_status(ours, "completed")
            await a.wait_until(letters, expect=1)
            # A's row counts its last message in A's stream: another of B's, at a lower seq of
            # B's own stream, is no redelivery of it (nor settled quietly as one).
            await a.db.execute(
                "UPDATE ordo.executions SET last_stream_seq = 1000 WHERE execution_id = $1::uuid", theirs
            )
            await b.signal(theirs, "done")
            await a.wait_until(letters, expect=2)
            for p in range(b.config.partitions):
                await b.wait_partition_drained(p)  # acked: not redelivered
            await _dead_lettered_metric("other_deployment", counted + 2)
            rows = await a.db.fetch(
                "SELECT error, execution_id::text, tenant, workflow_id, subject, stream FROM ordo.dead_letters"
                " WHERE reason = 'other_deployment'"
            )
            refusal = f"execution {theirs} belongs to deployment {prefix!r}, not to this one ({other!r})"
            assert {tuple(r) for r in rows} == {
                (refusal, theirs, "acme", "waiter", b.topology.exec_subject(theirs), b.topology.exec_stream)
            }
            # A's execution is as A left it: still waiting, no step of B's in its history.
            assert tuple(await a.db.fetchrow(row, theirs)) == (seq, 1000)
            assert await _kinds(a, [theirs]) == {theirs: ["waiting"]}

            # From A, its own signal is applied; and so is one for a row of before migration 021.
            await a.db.execute(
                "UPDATE ordo.executions SET last_stream_seq = $2, deployment = NULL WHERE execution_id = $1::uuid",
                theirs,
                last_stream_seq,
            )
            await a.signal(theirs, "done")
            await a.wait_status(theirs, "completed")
        assert await a.db.fetchval("SELECT count(*) FROM ordo.dead_letters") == 2


def test_a_timer_of_anothers_execution_is_dead_lettered_and_its_row_goes():
    """A timer this deployment's walk found for another's execution (one its worker set on that
    execution before migration 021's check) is not fired: it is dead-lettered, and its row goes
    with the letter, so that it is not fired again at every load."""
    execution_id = "00000000-0000-0000-0000-000000000021"
    record = ExecutionRecord(
        execution_id, "acme", "waiter", 1, "c-0", "e-0", 0, None, 0, ExecutionState(execution_id), deployment="a"
    )
    fire = TimerFire(execution_id, "t-1", 0)
    doc = {"kind": "timer", "execution_id": execution_id, "timer_id": "t-1"}
    unit = apply(None, record, fire, doc, None, 0, deployment="b")
    assert unit is not None and not unit.changes
    assert [(d.reason, d.error, d.execution_id) for d in unit.dead_letters] == [
        ("other_deployment", f"execution {execution_id} belongs to deployment 'a', not to this one ('b')", execution_id)
    ]
    assert unit.stale_timers == [(execution_id, "t-1")]
