"""`ordo console` on a real ledger and real JetStream: tokens and sessions, search, one execution,
changes (cancel, signal, dead-letter retry) and their audit trail, a tenant token kept to its
tenant, escaped output; and once in a real browser (headless Chromium through chromedriver).

The application is driven with aiohttp's test client (a real HTTP server on a free port); the
executions are made by a real worker in the test's event loop.
"""

import asyncio
import base64
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from harness import GIVEN_UP_AFTER_8_S, ROOT, WAITER, WELCOME, engine, http, silence_limits

from bench.generator import trigger_event
from daemon.config import Config
from daemon.console import views
from daemon.console.app import make_app, open_console
from daemon.console.auth import Identity, Sessions, TokenError, Tokens
from daemon.console.live import Live
from daemon.console.state import Console
from ledger import console as queries
from ledger import rollouts
from ledger.schema import migrate

OPERATOR = "op-0123456789abcdef"
ACME = "acme-0123456789abcdef"
GLOBEX = "globex-0123456789abcdef"
TOKENS = f"alice:{OPERATOR}, tenant=acme:{ACME}, tenant=globex:{GLOBEX}"
SCRIPT = "<script>alert(1)</script>"


def failing_hook(url: str) -> dict:
    """A workflow whose webhook call fails for good the first time (a 400 is not retried)."""
    return {
        "id": "hook",
        "tenant": "acme",
        "trigger": {"event": "order.placed"},
        "steps": [
            {"id": "call", "type": "action", "action": "webhook", "input": {"url": url, "body": {}}},
            {"id": "done", "type": "set", "values": {"called": True}},
        ],
    }


class Scene:
    """Executions of two tenants, waiting or dead-lettered, and the console's client over them."""

    def __init__(self, h, client: TestClient):
        self.h = h
        self.client = client
        self.waiting: list[str] = []  # acme WAITER executions, the first about SCRIPT
        self.events: list[dict] = []
        self.globex = ""
        self.failed = ""

    async def login(self, token: str) -> str:
        """Log in; the CSRF token of the session's forms."""
        response = await self.client.post("/login", data={"token": token}, allow_redirects=False)
        assert response.status == 303, await response.text()
        page = await (await self.client.get("/executions")).text()
        return csrf_in(page)


def csrf_in(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


@asynccontextmanager
async def scene(nats_server_url, pg_dsn, prefix, target):
    target.script["hook"] = [400, 200]
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        globex_waiter = dict(copy.deepcopy(WAITER), tenant="globex")
        for definition in (WAITER, globex_waiter, failing_hook(target.url("hook"))):
            await h.deploy(definition)
        events = [trigger_event("con", i, tenant="acme", event_type="session.started") for i in range(3)]
        events[0]["contact"]["id"] = SCRIPT
        other = trigger_event("con-g", 0, tenant="globex", event_type="session.started")
        order = trigger_event("con-o", 0, tenant="acme", event_type="order.placed")
        pool = await asyncpg.create_pool(h.config.pg_dsn, min_size=1, max_size=4)
        console = Console(pool, h.js, h.topology, Tokens(TOKENS), Sessions())
        async with h.worker(), TestClient(TestServer(make_app(console))) as client:
            s = Scene(h, client)
            s.events = events
            s.waiting = [h.execution_id("acme", "waiter", e["event_id"]) for e in events]
            s.globex = h.execution_id("globex", "waiter", other["event_id"])
            s.failed = h.execution_id("acme", "hook", order["event_id"])
            await h.publish_triggers([*events, other, order])
            for execution_id in [*s.waiting, s.globex]:
                await h.wait_status(execution_id, "waiting")
            await h.wait_status(s.failed, "failed")
            try:
                yield s
            finally:
                await pool.close()


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_name_an_operator_or_one_tenant_and_bad_entries_are_refused_by_number():
    tokens = Tokens(TOKENS)
    alice, acme = tokens.identify(OPERATOR), tokens.identify(ACME)
    assert alice.tenant is None and alice.name.startswith("alice#") and alice.tenants is None
    assert acme.tenant == "acme" and acme.name.startswith("tenant=acme#") and acme.tenants == ("acme",)
    assert tokens.identify("op-0123456789abcdeX") is None and tokens.identify("") is None
    assert acme.may_see("acme") and not acme.may_see("globex") and not acme.may_see(None)
    assert isinstance(alice, Identity) and alice.may_see("globex")
    for setting, problem in [
        ("alice", "entry 1 (alice): expected NAME:SECRET"),
        (f"alice:{OPERATOR},bob:short", "entry 2 (bob): the secret must be at least 16 characters"),
        (f"tenant=:{ACME}", "entry 1 (tenant=): tenant= names no tenant"),
        (f"alice:{OPERATOR},bob:{OPERATOR}", "entry 2 (bob): the same secret is given twice"),
    ]:
        with pytest.raises(TokenError) as refused:
            Tokens(setting)
        assert problem in str(refused.value)
    assert not Tokens("")


# -- the console over HTTP ---------------------------------------------------------------------


async def test_no_page_and_no_change_without_a_token(nats_server_url, pg_dsn, prefix, target):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        c = s.client
        page = await c.get("/executions", allow_redirects=False)
        assert (page.status, page.headers["Location"]) == (303, "/login")
        one = await c.get(f"/executions/{s.waiting[1]}", allow_redirects=False)
        assert one.status == 303
        change = await c.post(f"/executions/{s.waiting[1]}/cancel", data={"csrf": "x"}, allow_redirects=False)
        assert change.status == 401
        wrong = await c.get("/executions", headers={"Authorization": "Bearer not-a-token-at-all"})
        assert wrong.status == 401
        refused = await c.post("/login", data={"token": "not-a-token-at-all"}, allow_redirects=False)
        assert refused.status == 401 and "not known" in await refused.text()
        assert "Set-Cookie" not in refused.headers
        forged = await c.get("/executions", cookies={"ordo_console": "made-up"}, allow_redirects=False)
        assert forged.status == 303
        login = await c.get("/login")
        assert login.status == 200 and "default-src 'none'" in login.headers["Content-Security-Policy"]
        # A bearer token is enough for a script.
        assert (await c.get("/executions", headers={"Authorization": f"Bearer {OPERATOR}"})).status == 200
        assert await s.h.db.fetchval("SELECT count(*) FROM ordo.console_audit") == 0
        status = await s.h.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1", s.waiting[1])
        assert status == "waiting"


async def test_log_in_search_and_open_an_execution_whose_subject_is_markup(nats_server_url, pg_dsn, prefix, target):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        c = s.client
        response = await c.post("/login", data={"token": OPERATOR}, allow_redirects=False)
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie

        listing = await (await c.get("/executions")).text()
        assert all(execution_id in listing for execution_id in [*s.waiting, s.globex, s.failed])
        assert "waiter v1" in listing and ">wait<" in listing  # workflow version, current step
        assert SCRIPT not in listing and "&lt;script&gt;alert(1)&lt;/script&gt;" in listing

        by_subject = await (await c.get("/executions", params={"subject": SCRIPT})).text()
        assert s.waiting[0] in by_subject and s.waiting[1] not in by_subject
        by_event = await (await c.get("/executions", params={"event": s.events[2]["event_id"]})).text()
        assert s.waiting[2] in by_event and s.waiting[1] not in by_event
        failed = await (await c.get("/executions", params={"status": "failed", "tenant": "acme"})).text()
        assert s.failed in failed and s.waiting[1] not in failed
        globex = await (await c.get("/executions", params={"tenant": "globex"})).text()
        assert s.globex in globex and s.waiting[1] not in globex
        future = await (await c.get("/executions", params={"from": "2100-01-01T00:00"})).text()
        assert "No execution matches." in future
        bad = await c.get("/executions", params={"from": "yesterday"})
        assert bad.status == 400 and "from: &#x27;yesterday&#x27; is not a time" in await bad.text()
        bad_status = await c.get("/executions", params={"status": "sleeping"})
        assert bad_status.status == 400

        page = await (await c.get(f"/executions/{s.waiting[0]}")).text()
        assert SCRIPT not in page and "contact &lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "waiting for done" in page and '<svg class="bar"' in page
        assert ">started<" in page and ">waiting<" in page  # the transitions
        assert "Cancel execution" in page and "Send signal" in page
        failed_page = await (await c.get(f"/executions/{s.failed}")).text()
        assert "step_failed" in failed_page and "http_400" in failed_page and "/retry" in failed_page
        assert (await c.get("/executions/00000000-0000-0000-0000-000000000000")).status == 404
        assert (await c.get("/executions/not-a-uuid")).status == 404


async def test_the_executions_list_pages_by_keyset_without_gaps_or_repeats(nats_server_url, pg_dsn, prefix, target):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        search = queries.ExecutionSearch(tenants=None)
        seen, after = [], None
        while True:
            rows = await queries.search_executions(s.h.db, search, after, limit=2)
            seen += [r["execution_id"] for r in rows]
            if len(rows) < 2:
                break
            after = (rows[-1]["created_at"], rows[-1]["execution_id"])
        everything = await s.h.db.fetch(
            "SELECT execution_id::text FROM ordo.executions ORDER BY created_at DESC, execution_id DESC"
        )
        assert seen == [r[0] for r in everything] and len(seen) == 5
        step = await queries.search_executions(s.h.db, queries.ExecutionSearch(tenants=("globex",)))
        assert [(r["execution_id"], r["step"], r["status"]) for r in step] == [(s.globex, "wait", "waiting")]


async def test_a_tenant_token_cannot_see_or_change_another_tenants_executions(nats_server_url, pg_dsn, prefix, target):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        c = s.client
        csrf = await s.login(GLOBEX)
        listing = await (await c.get("/executions", params={"tenant": "acme"})).text()
        assert s.globex in listing and not any(execution_id in listing for execution_id in s.waiting)
        nowhere = await c.get("/executions/00000000-0000-0000-0000-000000000000")
        elsewhere = await c.get(f"/executions/{s.waiting[1]}")
        # Another tenant's execution is "not found", exactly like one that does not exist.
        assert nowhere.status == elsewhere.status == 404
        assert (await nowhere.text()).replace("00000000-0000-0000-0000-000000000000", "ID") == (
            await elsewhere.text()
        ).replace(s.waiting[1], "ID")
        by_event = await (await c.get("/executions", params={"event": s.events[1]["event_id"]})).text()
        assert s.waiting[1] not in by_event
        for path, data in [
            (f"/executions/{s.waiting[1]}/cancel", {}),
            (f"/executions/{s.waiting[1]}/signal", {"name": "done"}),
            ("/dead-letters/retry-group", {"reason": "step_failed", "action": "webhook", "tenant": "acme"}),
        ]:
            assert (await c.post(path, data={"csrf": csrf, **data})).status == 404, path
        letter = await s.h.db.fetchval("SELECT id FROM ordo.dead_letters WHERE execution_id = $1", s.failed)
        assert (await c.post(f"/dead-letters/{letter}/retry", data={"csrf": csrf})).status == 404
        assert s.failed not in await (await c.get("/dead-letters")).text()
        assert (await c.get("/workflows/acme/waiter")).status == 404
        workflows = await (await c.get("/workflows")).text()
        assert "globex" in workflows and "acme" not in workflows
        assert await s.h.db.fetchval("SELECT count(*) FROM ordo.console_audit") == 0
        statuses = await s.h.db.fetch("SELECT DISTINCT status FROM ordo.executions WHERE tenant = 'acme'")
        assert {r[0] for r in statuses} == {"waiting", "failed"}
        # Its own execution it may change.
        done = await c.post(f"/executions/{s.globex}/signal", data={"csrf": csrf, "name": "done"})
        assert done.status == 200
        await s.h.wait_status(s.globex, "completed")


async def test_changes_need_the_csrf_token_and_each_is_audited(nats_server_url, pg_dsn, prefix, target):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        c = s.client
        csrf = await s.login(ACME)
        for data in ({}, {"csrf": "wrong"}):
            refused = await c.post(f"/executions/{s.waiting[1]}/cancel", data=data)
            assert refused.status == 403
        foreign = await c.post(
            f"/executions/{s.waiting[1]}/cancel", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert foreign.status == 403
        assert await s.h.db.fetchval("SELECT count(*) FROM ordo.console_audit") == 0

        bad = await c.post(f"/executions/{s.waiting[2]}/signal", data={"csrf": csrf, "name": "done", "data": "{"})
        assert bad.status == 400 and "data: not valid JSON" in await bad.text()
        signal_id = "3f8a3c52-4b0e-4d4b-9a7a-2a1d7f9d1c11"
        for _ in range(2):  # submitted twice: one signal
            sent = await c.post(
                f"/executions/{s.waiting[2]}/signal",
                data={"csrf": csrf, "name": "done", "data": '{"by": "console"}', "signal_id": signal_id},
            )
            assert sent.status == 200 and "signal &#x27;done&#x27; sent" in await sent.text()
        await s.h.wait_status(s.waiting[2], "completed")
        signals = await s.h.db.fetchval(
            "SELECT count(*) FROM ordo.transitions WHERE execution_id = $1 AND kind = 'signal'", s.waiting[2]
        )
        assert signals == 1

        cancelled = await c.post(f"/executions/{s.waiting[1]}/cancel", data={"csrf": csrf})
        assert cancelled.status == 200
        await s.h.wait_status(s.waiting[1], "cancelled")

        letters = await (await c.get("/dead-letters")).text()
        assert "step_failed" in letters and "webhook" in letters and "Retry 1" in letters
        retried = await c.post(
            "/dead-letters/retry-group",
            data={"csrf": csrf, "reason": "step_failed", "action": "webhook", "tenant": "acme"},
        )
        assert retried.status == 200 and "1 dead letter(s) retried" in await retried.text()
        await s.h.wait_status(s.failed, "completed")  # the webhook answers 200 this time
        assert len(target.named("hook")) == 2

        trail = await s.h.db.fetch(
            "SELECT who, token_tenant, action, execution_id::text, detail, outcome FROM ordo.console_audit ORDER BY id"
        )
        assert [(r["action"], r["execution_id"], r["outcome"]) for r in trail] == [
            ("signal", s.waiting[2], "ok"),
            ("signal", s.waiting[2], "ok"),
            ("cancel", s.waiting[1], "ok"),
            ("dlq_retry_group", None, "ok"),
        ]
        assert {(r["who"].split("#")[0], r["token_tenant"]) for r in trail} == {("tenant=acme", "acme")}
        assert json.loads(trail[0]["detail"])["data"] == {"by": "console"}
        audit = await (await c.get("/audit")).text()
        assert "dlq_retry_group" in audit and "tenant=acme#" in audit

        # Logging out ends the session: the cookie no longer opens a page.
        await c.post("/logout", data={"csrf": csrf})
        assert (await c.get("/executions", allow_redirects=False)).status == 303


async def test_a_refused_cancel_or_signal_of_another_deployments_execution_is_titled_for_what_and_why(
    nats_server_url, pg_dsn, prefix, target
):
    """A cancel or signal of another deployment's execution (the ledger is shared) is refused, 409: the page
    was titled "Not sent", as any refusal, where a retry of another deployment's letter says what it did not
    do and why. Each says so too, and nothing reaches the execution."""
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        theirs = s.waiting[1]
        await s.h.db.execute("UPDATE ordo.executions SET deployment = 'elsewhere' WHERE execution_id = $1", theirs)
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        for change, form, title in [
            ("cancel", {}, "Not cancelled: another deployment&#x27;s execution"),
            ("signal", {"name": "done"}, "Not signalled: another deployment&#x27;s execution"),
        ]:
            page = await s.client.post(f"/executions/{theirs}/{change}", data=form, headers=headers)
            text = await page.text()
            assert page.status == 409 and f"<title>{title} · Ordo</title>" in text, text
            assert "belongs to deployment &#x27;elsewhere&#x27;" in text
        trail = await s.h.db.fetch("SELECT action, outcome FROM ordo.console_audit ORDER BY id")
        assert [r["action"] for r in trail] == ["cancel", "signal"]
        assert all(r["outcome"].startswith(f"refused: execution {theirs} belongs to") for r in trail)
        status = await s.h.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1", theirs)
        assert status == "waiting"


async def test_a_cancel_or_signal_of_an_execution_gone_since_the_console_looked_is_titled_for_what_and_why(
    nats_server_url, pg_dsn, prefix, target, monkeypatch
):
    """An execution can go between the console's look at it and the send (retention drops its day): the send
    is refused, and the page was titled "Not sent", 409, as any refusal. It says what was not done and why,
    404: there is no such execution. Nothing is published."""
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        looked = queries.execution_tenant

        async def looked_then_gone(conn, execution_id: str) -> str | None:
            tenant = await looked(conn, execution_id)
            await conn.execute("DELETE FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
            return tenant

        monkeypatch.setattr(queries, "execution_tenant", looked_then_gone)
        before = (await s.h.js.stream_info(s.h.topology.exec_stream)).state.messages
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        for execution_id, change, form, title in [
            (s.waiting[1], "cancel", {}, "Not cancelled: no such execution"),
            (s.waiting[2], "signal", {"name": "done"}, "Not signalled: no such execution"),
        ]:
            page = await s.client.post(f"/executions/{execution_id}/{change}", data=form, headers=headers)
            text = await page.text()
            assert page.status == 404 and f"<title>{title} · Ordo</title>" in text, text
            assert f"no execution {execution_id}" in text
        trail = await s.h.db.fetch("SELECT action, outcome FROM ordo.console_audit ORDER BY id")
        assert [tuple(r) for r in trail] == [
            ("cancel", f"refused: no execution {s.waiting[1]}"),
            ("signal", f"refused: no execution {s.waiting[2]}"),
        ]
        assert (await s.h.js.stream_info(s.h.topology.exec_stream)).state.messages == before


async def test_a_refused_retry_of_a_letter_is_titled_for_what_and_why(nats_server_url, pg_dsn, prefix, target):
    """A retry of a letter that is no longer open, or that a retry leaves open (nowhere to send it), is refused,
    409: the page was titled "Not sent", though nothing was to be sent. It says what was not done and why."""
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        retried = await s.h.db.fetchval("SELECT id FROM ordo.dead_letters WHERE execution_id = $1", s.failed)
        nowhere = await s.h.db.fetchval(
            "INSERT INTO ordo.dead_letters (reason, error, tenant, subject, stream, stream_seq, payload)"
            " VALUES ('invalid_subject', 'made up', 'acme', '', $1, 1, '{}') RETURNING id",
            s.h.topology.triggers_stream,
        )
        assert (await s.client.post(f"/dead-letters/{retried}/retry", headers=headers)).status == 200
        await s.h.wait_status(s.failed, "completed")
        for letter_id, title, why in [
            (retried, "Not retried: the letter is no longer open", f"dead letter {retried} is not open"),
            (nowhere, "Not retried: nowhere to send it", f"{nowhere}: nothing to retry it with (no subject)"),
        ]:
            page = await s.client.post(f"/dead-letters/{letter_id}/retry", headers=headers)
            text = await page.text()
            assert page.status == 409 and f"<title>{title} · Ordo</title>" in text, text
            assert why in text
        trail = await s.h.db.fetch("SELECT dead_letter_id, outcome FROM ordo.console_audit ORDER BY id")
        assert [r["dead_letter_id"] for r in trail] == [retried, retried, nowhere]
        assert [r["outcome"].split(":")[0] for r in trail] == ["ok", "refused", "refused"]
        statuses = await s.h.db.fetch(
            "SELECT status FROM ordo.dead_letters WHERE id = ANY($1) ORDER BY id", [retried, nowhere]
        )
        assert [r[0] for r in statuses] == ["retried", "open"]


async def test_a_groups_retry_button_counts_the_letters_a_group_retry_takes(nats_server_url, pg_dsn, prefix, target):
    """A group's Retry button counted every open letter of the group, those a group retry passes over (no
    subject to republish to) among them: "Retry 3" retried 2. It offers the letters it retries, next to the
    group's count of them all; a group with none it can retry has no button, and says why."""
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        subject = s.h.topology.trigger_subject("acme", "session.started")
        for seq, (tenant, to) in enumerate([("acme", subject), ("acme", subject), ("acme", ""), ("globex", "")]):
            await s.h.db.execute(
                "INSERT INTO ordo.dead_letters (reason, error, tenant, subject, stream, stream_seq, payload)"
                " VALUES ('invalid_subject', 'made up', $1, $2, $3, $4, '{}')",
                tenant,
                to,
                s.h.topology.triggers_stream,
                seq,
            )
        page = await (await s.client.get("/dead-letters", headers={"Authorization": f"Bearer {OPERATOR}"})).text()
        groups = {(r[0], r[2]): r for r in _rows(page) if r[0] == "invalid_subject"}
        # reason, action, tenant, letters, first, last, retry
        assert groups["invalid_subject", "acme"][3] == "3" and groups["invalid_subject", "acme"][6] == "Retry 2"
        assert groups["invalid_subject", "globex"][3] == "1"
        assert groups["invalid_subject", "globex"][6] == "None to retry"
        assert 'title="a retry would leave each of them open' in page
        assert page.count('action="/dead-letters/retry-group"') == 2  # the webhook's failed step, and acme's


async def test_a_groups_retry_button_says_how_many_of_its_letters_one_click_retries(
    nats_server_url, pg_dsn, prefix, target, monkeypatch
):
    """A group retry takes at most GROUP_RETRY_LIMIT letters a click, but the button offered them all: "Retry
    6" retried 3. It says "Retry 3 of 6", the answer that more remain, and the next click's button the rest;
    that click's answer says no more remain (a group of exactly the limit once answered that more did). The
    letters column says 1,234 as the button does, not 1234."""
    monkeypatch.setattr(queries, "GROUP_RETRY_LIMIT", 3)
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        subject = s.h.topology.trigger_subject("acme", "session.started")
        for seq in range(6):
            await s.h.db.execute(
                "INSERT INTO ordo.dead_letters (reason, error, tenant, subject, stream, stream_seq, payload)"
                " VALUES ('invalid_subject', 'made up', 'acme', $1, $2, $3, '{}')",
                subject,
                s.h.topology.triggers_stream,
                seq,
            )
        headers = {"Authorization": f"Bearer {OPERATOR}"}

        async def button() -> str:
            """The group's button: reason, action, tenant, letters, first, last, retry."""
            page = await (await s.client.get("/dead-letters", headers=headers)).text()
            return next(r[6] for r in _rows(page) if r[0] == "invalid_subject")

        group = {"reason": "invalid_subject", "action": "", "tenant": "acme"}
        assert await button() == "Retry 3 of 6"
        first = await s.client.post("/dead-letters/retry-group", data=group, headers=headers)
        assert "3 dead letter(s) retried (more remain: retry the group again)</p>" in await first.text()
        assert await button() == "Retry 3"
        second = await s.client.post("/dead-letters/retry-group", data=group, headers=headers)
        assert "3 dead letter(s) retried</p>" in await second.text()
        opened = await s.h.db.fetchval(
            "SELECT count(*) FROM ordo.dead_letters WHERE reason = 'invalid_subject' AND status = 'open'"
        )
        assert opened == 0
        # The letters column counts as the button does: "1,234" beside "Retry 3 of 1,234", not "1234".
        await s.h.db.execute(
            "INSERT INTO ordo.dead_letters (reason, error, tenant, subject, stream, stream_seq, payload)"
            " SELECT 'invalid_subject', 'made up', 'acme', $1, $2, 100 + n, '{}' FROM generate_series(1, 1234) n",
            subject,
            s.h.topology.triggers_stream,
        )
        page = await (await s.client.get("/dead-letters", headers=headers)).text()
        row = next(r for r in _rows(page) if r[0] == "invalid_subject")
        assert (row[3], row[6]) == ("1,234", "Retry 3 of 1,234")
        monkeypatch.setattr(queries, "GROUP_RETRY_LIMIT", 1000)
        assert views.group_retry_label(1234) == "Retry 1,000 of 1,234"


def _cells(page: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`, as text."""
    row = re.search(rf"<tr><td>{re.escape(first)}</td>(.*?)</tr>", page, re.DOTALL)
    assert row, f"no row {first!r} on the page"
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row.group(1), re.DOTALL)]


def _rows(page: str) -> list[list[str]]:
    """Each table body row of the page as the text of its cells (tags dropped)."""
    return [
        [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.DOTALL)]
        for body in re.findall(r"<tbody>.*?</tbody>", page, re.DOTALL)
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    ]


async def test_workflows_show_their_versions_a_diff_their_open_executions_and_rollout(
    nats_server_url, pg_dsn, prefix, target
):
    async with scene(nats_server_url, pg_dsn, prefix, target) as s:
        changed = copy.deepcopy(WAITER)
        changed["steps"][1]["values"] = {"finished": "yes"}
        assert await s.h.deploy(changed) == 2
        headers = {"Authorization": f"Bearer {OPERATOR}"}
        listing = await (await s.client.get("/workflows", headers=headers)).text()
        assert "/workflows/acme/waiter" in listing and "v2" in listing and "globex" in listing
        diff = await (await s.client.get("/workflows/acme/waiter", headers=headers)).text()
        assert "--- v1" in diff and "+++ v2" in diff
        assert re.search(r"^-\s+&quot;finished&quot;: true,?$", diff, re.MULTILINE)
        assert re.search(r"^\+\s+&quot;finished&quot;: &quot;yes&quot;,?$", diff, re.MULTILINE)
        missing = await s.client.get("/workflows/acme/waiter", params={"a": "9"}, headers=headers)
        assert missing.status == 404

        # version, steps, deployed, running, waiting, digest: the three acme executions wait on v1.
        assert _cells(diff, "v1")[2:4] == ["0", "3"]
        assert _cells(diff, "v2")[2:4] == ["0", "0"]
        assert "None: new executions run the latest version." in diff

        plan = rollouts.Plan("waiter", 2, tenant="acme", from_version=1, stages=(1_000, 5_000, rollouts.ALL))
        await rollouts.start(s.h.db, plan, "tester@console")
        page = await (await s.client.get("/workflows/acme/waiter", headers=headers)).text()
        assert re.search(r"Rollout \d+: v1 → v2, running", page)
        assert "Candidate share 10%" in page and "<b>10%</b> → 50% → 100%" in page
        assert _cells(page, "baseline v1")[0] == "0" and _cells(page, "candidate v2")[0] == "0"
        assert "tester@console" in page

        # A tenant's token sees its own rollout, and another tenant's workflow page not at all.
        acme = {"Authorization": f"Bearer {ACME}"}
        assert "Rollout" in await (await s.client.get("/workflows/acme/waiter", headers=acme)).text()
        globex = {"Authorization": f"Bearer {GLOBEX}"}
        assert (await s.client.get("/workflows/acme/waiter", headers=globex)).status == 404


# -- in a real browser -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP to chromedriver (no client library)."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.read().decode()}") from None

    def start(self, chromium: str) -> None:
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": args}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        # Finding an element waits up to 10 s for it, as a person waits for a page to load.
        self.call("POST", f"/session/{self.session}/timeouts", {"implicit": 10_000})

    def go(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def find(self, css: str) -> str:
        found = self.call("POST", f"/session/{self.session}/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def type(self, css: str, text: str) -> None:
        self.call("POST", f"/session/{self.session}/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.call("POST", f"/session/{self.session}/element/{self.find(css)}/click", {})

    def text(self, css: str = "body") -> str:
        return self.call("GET", f"/session/{self.session}/element/{self.find(css)}/text")

    def url(self) -> str:
        return self.call("GET", f"/session/{self.session}/url")

    def url_once_it_has(self, part: str, seconds: float = 20) -> str:
        """The page's URL once it holds `part` (a click's navigation may still be loading), else as it is."""
        deadline = time.monotonic() + seconds
        url = self.url()
        while part not in url and time.monotonic() < deadline:
            time.sleep(0.05)
            url = self.url()
        return url

    def screenshot(self, path: str) -> None:
        """The window as a PNG file."""
        self.call("POST", f"/session/{self.session}/window/rect", {"width": 1280, "height": 860})
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot")))

    def alert_open(self) -> bool:
        """Whether the page opened an alert (an injected `<script>alert(1)</script>` would)."""
        try:
            self.call("GET", f"/session/{self.session}/alert/text")
        except AssertionError as exc:
            if "no such alert" in str(exc):
                return False
            raise
        return True

    def quit(self) -> None:
        if self.session is not None:
            self.call("DELETE", f"/session/{self.session}")


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium and chromedriver here: apt-get install -y chromium chromium-driver")
    return chromium, driver


async def test_in_a_browser_log_in_search_and_open_an_execution(nats_server_url, pg_dsn, prefix, target):
    chromium, driver_path = _browser()
    driver_port = _free_port()
    chromedriver = subprocess.Popen(
        [driver_path, f"--port={driver_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with scene(nats_server_url, pg_dsn, prefix, target) as s:
            base = str(s.client.make_url("")).rstrip("/")
            browser = WebDriver(driver_port)
            deadline = time.monotonic() + 20
            while True:  # chromedriver takes a moment to listen
                try:
                    await asyncio.to_thread(browser.call, "GET", "/status")
                    break
                except (OSError, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            b = browser
            try:
                await asyncio.to_thread(b.start, chromium)
                await asyncio.to_thread(b.go, base + "/executions")
                assert (await asyncio.to_thread(b.url)).endswith("/login")  # no token, no page
                await asyncio.to_thread(b.type, "input[name=token]", ACME)
                await asyncio.to_thread(b.click, "#login")
                assert (await asyncio.to_thread(b.url_once_it_has, "/executions")).endswith("/executions")
                await asyncio.to_thread(b.type, "input[name=subject]", SCRIPT)
                await asyncio.to_thread(b.click, "#search")
                assert "subject=" in await asyncio.to_thread(b.url_once_it_has, "subject=")  # the results' page
                listing = await asyncio.to_thread(b.text, "table")
                assert s.waiting[0] in listing and s.waiting[1] not in listing
                await asyncio.to_thread(b.click, f"a[href='/executions/{s.waiting[0]}']")
                assert (await asyncio.to_thread(b.url_once_it_has, s.waiting[0])).endswith(s.waiting[0])
                page = await asyncio.to_thread(b.text)
                assert f"contact {SCRIPT}" in page  # shown as text, not run
                assert not await asyncio.to_thread(b.alert_open)
                await asyncio.to_thread(b.go, f"{base}/executions/{s.globex}")
                assert "is not there" in await asyncio.to_thread(b.text)
                # ORDO_CONSOLE_SCREENSHOTS=docs/console: the README's pictures, taken here.
                shots = os.environ.get("ORDO_CONSOLE_SCREENSHOTS")
                if shots:
                    changed = copy.deepcopy(WAITER)
                    changed["steps"][1]["values"] = {"finished": "yes"}
                    await s.h.deploy(changed)
                    stages = (1_000, 5_000, rollouts.ALL)
                    await rollouts.start(s.h.db, rollouts.Plan("waiter", 2, "acme", stages=stages), "alice@ops")
                    for name, path in [
                        ("executions", "/executions"),
                        ("execution", f"/executions/{s.failed}"),
                        ("dead-letters", "/dead-letters"),
                        ("workflow", "/workflows/acme/waiter?a=1&b=2"),
                    ]:
                        await asyncio.to_thread(b.go, base + path)
                        await asyncio.to_thread(b.screenshot, os.path.join(shots, f"{name}.png"))
            finally:
                await asyncio.to_thread(b.quit)
    finally:
        chromedriver.terminate()
        chromedriver.wait(10)


def test_the_console_command_refuses_to_start_without_tokens():
    from harness import ordo

    env = {"ORDO_PG_DSN": os.environ.get("ORDO_PG_DSN") or "postgresql://nobody@127.0.0.1:1/none"}
    started = ordo("console", env_extra={**env, "ORDO_CONSOLE_TOKENS": ""})
    assert started.returncode != 0 and "ORDO_CONSOLE_TOKENS is not set" in started.stderr
    bad = ordo("console", env_extra={**env, "ORDO_CONSOLE_TOKENS": "alice:short"})
    assert bad.returncode != 0 and "entry 1 (alice): the secret must be at least 16 characters" in bad.stderr


async def test_the_console_command_serves_on_loopback_by_default(pg_dsn):
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    port = _free_port()
    env = dict(os.environ, ORDO_PG_DSN=pg_dsn, ORDO_NATS_URL="", ORDO_CONSOLE_TOKENS=TOKENS, ORDO_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "console", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == f"ordo console on http://127.0.0.1:{port}/ (Ctrl-C stops it)"

        def get(headers: str = "") -> bytes:
            return f"GET /executions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode()

        status, head, _ = await http(port, "/executions", raw=get())
        assert status == 303 and "Location: /login" in head
        status, _, body = await http(port, "/executions", raw=get(f"Authorization: Bearer {OPERATOR}\r\n"))
        assert status == 200 and b"No execution matches." in body
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


async def test_the_consoles_connections_are_given_up_after_pg_tcp_timeout_s_of_silence(pg_dsn):
    """The console's pool opened its connections with asyncpg alone: no keepalive on either end, so a page read
    on a connection cut without a word waited for the command timeout. They are opened as a worker's are, JIT
    still off."""
    console, nc = await open_console(Config(pg_dsn=pg_dsn, pg_tcp_timeout_s=8), Tokens(TOKENS))
    try:
        assert nc is None
        async with console.pool.acquire() as conn:
            assert await silence_limits(conn) == GIVEN_UP_AFTER_8_S
            assert await conn.fetchval("SHOW jit") == "off"
    finally:
        await console.pool.close()


async def test_live_draws_the_workers_throughput_from_their_metrics(nats_server_url, pg_dsn, prefix):
    port = _free_port()
    async with engine(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        h.spawn_worker(0, 1, metrics_port=port)
        live = Live([f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{_free_port()}/metrics"], interval_s=0.2)
        sampling = asyncio.create_task(live.run())
        pool = await asyncpg.create_pool(h.config.pg_dsn, min_size=1, max_size=2)
        try:
            events = [trigger_event("live", i, tenant="acme") for i in range(300)]
            await h.publish_triggers(events)
            await h.wait_until("SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=300)
            deadline = time.monotonic() + 20
            while sum(p.per_second for p in live.points() if p is not None) <= 0:
                assert time.monotonic() < deadline, live.points()
                await asyncio.sleep(0.1)
            seen = [p for p in live.points() if p is not None and p.per_second > 0]
            assert seen[-1].workers == 1 and seen[-1].failure_rate == 0.0 and seen[-1].p50_s is not None
            console = Console(pool, h.js, h.topology, Tokens(TOKENS), Sessions(), live)
            async with TestClient(TestServer(make_app(console))) as client:
                page = await client.get("/live", headers={"Authorization": f"Bearer {OPERATOR}"})
                text = await page.text()
                assert page.status == 200 and "1 of 2 worker(s) answering" in text
                assert "executions finished/s: now" in text and "<rect" in text
                tenant = await client.get("/live", headers={"Authorization": f"Bearer {ACME}"})
                assert tenant.status == 404
        finally:
            sampling.cancel()
            await pool.close()
