"""The console's pages: executions (search and one execution), dead letters, workflows, the audit trail.

Each page reads through ledger/ (ledger/console.py, and daemon/inspect.py's
`inspect` for one execution, so the console shows what `ordo inspect`
prints) and shows a tenant token only its tenant: another tenant's
execution, letter or workflow is "not found", the same answer as an id that
does not exist, so ids do not leak.
"""

from __future__ import annotations

import difflib
import uuid
from datetime import UTC, datetime

import orjson
from aiohttp import web

from ledger import console as queries
from ledger import rollouts

from ..inspect import _brief as brief
from ..inspect import _span as span
from ..inspect import inspect
from ..rollout_commands import percent, report, stage_key
from ..topology import execution_id_for
from .html import bar, chart, esc, link, page, post_button, segment, table, url, when
from .state import CONSOLE, csrf_of, identity_of

#: Executions on one page of a search.
PAGE_SIZE = 50


def html_page(request: web.Request, title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=page(title, body, identity_of(request), csrf_of(request)), content_type="text/html", status=status
    )


def not_found(request: web.Request, what: str) -> web.HTTPNotFound:
    """The answer for what does not exist and for what is another tenant's alike."""
    body = page("Not found", f"<p>{esc(what)} is not there.</p>", identity_of(request), csrf_of(request))
    return web.HTTPNotFound(text=body, content_type="text/html")


def bad_request(request: web.Request, message: str) -> web.HTTPBadRequest:
    body = page("Bad request", f'<p class="error">{esc(message)}</p>', identity_of(request), csrf_of(request))
    return web.HTTPBadRequest(text=body, content_type="text/html")


def execution_uuid(request: web.Request) -> str:
    """The execution id of the URL, in canonical form; not a UUID: not found."""
    raw = request.match_info["execution_id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise not_found(request, f"Execution {raw}") from None


def _moment(request: web.Request, field: str, raw: str) -> datetime | None:
    """A time from a search form (ISO-8601; without a zone, UTC)."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise bad_request(request, f"{field}: {raw!r} is not a time (ISO-8601, e.g. 2026-12-06T05:00)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _age(created: datetime, now: datetime) -> str:
    return span((now - created).total_seconds() * 1000)


# -- executions --------------------------------------------------------------------------


async def executions(request: web.Request) -> web.Response:
    """Search executions, newest first, a page at a time (keyset: each page starts below the last row shown)."""
    console = request.app[CONSOLE]
    identity = identity_of(request)
    q = {name: request.query.get(name, "").strip() for name in (
        "tenant", "workflow", "status", "subject_type", "subject", "event", "from", "to", "after",
    )}  # fmt: skip
    if identity.tenant is not None:
        q["tenant"] = identity.tenant
    if q["status"] and q["status"] not in queries.STATUSES:
        raise bad_request(request, f"status: {q['status']!r} is not one of {', '.join(queries.STATUSES)}")
    after = None
    if q["after"]:
        at, _, last_id = q["after"].partition("|")
        try:
            after = (datetime.fromisoformat(at), str(uuid.UUID(last_id)))
        except ValueError:
            raise bad_request(request, f"after: {q['after']!r} is not a page cursor") from None
    tenants = (q["tenant"],) if q["tenant"] else identity.tenants
    execution_ids = None
    async with console.pool.acquire() as conn:
        if q["event"]:
            # An event enrols each workflow's execution under an id derived from it: no index needed.
            keys = await queries.workflow_keys(conn, tenants)
            execution_ids = tuple(
                execution_id_for(tenant, workflow_id, q["event"])
                for tenant, workflow_id in keys
                if not q["workflow"] or workflow_id == q["workflow"]
            )
        search = queries.ExecutionSearch(
            tenants=tenants,
            workflow_id=q["workflow"] or None,
            status=q["status"] or None,
            subject_type=q["subject_type"] or None,
            subject_id=q["subject"] or None,
            execution_ids=execution_ids,
            created_from=_moment(request, "from", q["from"]),
            created_to=_moment(request, "to", q["to"]),
        )
        rows = [] if execution_ids == () else await queries.search_executions(conn, search, after, PAGE_SIZE + 1)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    now = datetime.now(UTC)
    cells = []
    for r in rows:
        status = r["status"] + (f" ({r['waiting']})" if r["waiting"] else "")
        cells.append(
            [
                link(f"/executions/{r['execution_id']}", r["execution_id"]),
                esc(r["tenant"]),
                esc(f"{r['workflow_id']} v{r['workflow_version']}"),
                f'<span class="status {esc(r["status"])}">{esc(status)}</span>',
                esc(r["step"] if r["step"] is not None else "-"),
                esc(f"{r['subject_type']} {r['subject_id']}"),
                esc(r["event_id"]),
                f'<span title="{esc(when(r["created_at"]))}">{esc(_age(r["created_at"], now))}</span>',
            ]
        )
    body = _search_form(q, identity.tenant is None) + table(
        ["execution", "tenant", "workflow", "status", "current step", "subject", "trigger event", "age"],
        cells,
        "No execution matches.",
    )
    if more:
        last = rows[-1]
        cursor = f"{last['created_at'].isoformat()}|{last['execution_id']}"
        params = {k: v for k, v in q.items() if k != "after"}
        body += f'<p class="pager">{link(url("/executions", **params, after=cursor), "Older executions →")}</p>'
    return html_page(request, "Executions", body)


def _search_form(q: dict[str, str], any_tenant: bool) -> str:
    def field(name: str, label: str, placeholder: str = "", kind: str = "text") -> str:
        return (
            f'<label>{esc(label)} <input type="{kind}" name="{name}" value="{esc(q[name])}"'
            f' placeholder="{esc(placeholder)}"></label>'
        )

    statuses = "".join(
        f'<option value="{s}"{" selected" if q["status"] == s else ""}>{s}</option>' for s in ("", *queries.STATUSES)
    )
    return (
        '<form class="search" method="get" action="/executions">'
        + (field("tenant", "Tenant") if any_tenant else "")
        + field("workflow", "Workflow")
        + f'<label>Status <select name="status">{statuses}</select></label>'
        + field("subject", "Subject id")
        + field("subject_type", "Subject type", "contact")
        + field("event", "Trigger event id")
        + field("from", "Created from", "2026-12-06T05:00 (UTC)")
        + field("to", "Created before", "2026-12-06T06:00 (UTC)")
        + '<button type="submit" id="search">Search</button></form>'
    )


async def execution(request: web.Request) -> web.Response:
    """One execution: where it stands, what it waits for, its steps drawn to scale, its transitions, its context."""
    console = request.app[CONSOLE]
    identity = identity_of(request)
    execution_id = execution_uuid(request)
    async with console.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        doc = await inspect(conn, execution_id)  # in this snapshot, so that `whose` has each of its letters
        letter_ids = [d["id"] for d in doc["dead_letters"]] if doc else []
        whose = await queries.whose_letters(conn, letter_ids, console.topology.prefix) if letter_ids else {}
    if doc is None or not identity.may_see(doc["tenant"]):
        raise not_found(request, f"Execution {execution_id}")
    csrf = csrf_of(request)
    now = datetime.now(UTC)
    status = doc["status"] + (f" for {doc['waiting']}" if doc["waiting"] else "")
    facts = [
        ("workflow", f"{doc['tenant']} / {doc['workflow_id']} v{doc['workflow_version']}"),
        ("subject", f"{doc['subject_type']} {doc['subject_id']}"),
        ("trigger event", doc["event_id"]),
        ("status", status),
        ("created", doc["created_at"]),
        ("updated", doc["updated_at"]),
        ("finished", doc["finished_at"] or "-"),
        ("partition / seq / pc", f"{doc['partition']} / {doc['seq']} / {doc['pc']}"),
    ]
    if doc["timer"] is not None:
        t = doc["timer"]
        facts.append(("pending timer", f"{t['purpose']} at step {t['step']}, fires {t['fire_at']}"))
    if doc["event_wait"] is not None:
        w = doc["event_wait"]
        facts.append(("waiting for event", f"{w['event_type']} at step {w['step']}"))
    body = "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>"
    body += _execution_actions(doc, csrf)
    if doc["dead_letters"]:
        body += "<h2>Dead letters</h2>" + table(
            ["id", "at", "reason", "step", "attempts", "error", ""],
            (
                [
                    esc(d["id"]),
                    esc(d["at"]),
                    esc(d["reason"]),
                    esc(d["step"]),
                    esc(d["attempts"]),
                    esc(d["error"]),
                    _retry_or_whose(whose[d["id"]], csrf),
                ]
                for d in doc["dead_letters"]
            ),
        )
    body += "<h2>Steps</h2>" + _step_bars(doc, now)
    body += "<h2>Transitions</h2>" + _transitions(doc)
    context = orjson.dumps(doc["context"], option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    body += f'<h2>Context</h2><pre class="json">{esc(context)}</pre>'
    return html_page(request, f"Execution {execution_id}", body)


def _retry_or_whose(letter, csrf: str) -> str:
    """A Retry button on the console's deployment's letter; on another's, whose it is instead: an execution's
    letters need not all be its deployment's (a message for it taken from another's subjects is that one's),
    and the console refuses to retry another deployment's letter, which stays open for that one to retry."""
    if letter["ours"]:
        return post_button(f"/dead-letters/{letter['id']}/retry", "Retry", csrf)
    whose = f"deployment {letter['deployment']}'s" if letter["deployment"] else "another deployment's"
    return f'<span title="retried from its own deployment">{esc(whose)}</span>'


def _execution_actions(doc: dict, csrf: str) -> str:
    if doc["status"] not in ("running", "waiting"):
        return ""
    base = f"/executions/{doc['execution_id']}"
    return (
        '<div class="actions">'
        + post_button(f"{base}/cancel", "Cancel execution", csrf, danger=True)
        + f'<form class="inline" method="post" action="{esc(base)}/signal">'
        + f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        # A fresh id per page: submitting the same form twice sends one signal (JetStream's dedupe).
        + f'<input type="hidden" name="signal_id" value="{uuid.uuid4()}">'
        + '<label>Signal <input type="text" name="name" required placeholder="name"></label> '
        + '<label>Data <input type="text" name="data" placeholder="JSON, optional"></label> '
        + '<button type="submit">Send signal</button></form></div>'
    )


def _step_bars(doc: dict, now: datetime) -> str:
    """Each run of transitions at one step, as a bar from its first transition to the next step's, to scale."""
    transitions = doc["transitions"]
    if not transitions:
        return '<p class="empty">No transitions.</p>'
    moments = [datetime.fromisoformat(t["at"]) for t in transitions]
    start = moments[0]
    end = datetime.fromisoformat(doc["finished_at"]) if doc["finished_at"] else max(now, moments[-1])
    total = max((end - start).total_seconds(), 0.001)
    runs: list[tuple[str, int, int]] = []  # (step, first index, last index)
    for i, t in enumerate(transitions):
        step = t["step"] or "-"
        if runs and runs[-1][0] == step:
            runs[-1] = (step, runs[-1][1], i)
        else:
            runs.append((step, i, i))
    rows = []
    for n, (step, first, last) in enumerate(runs):
        begin = moments[first]
        finish = moments[runs[n + 1][1]] if n + 1 < len(runs) else end
        kinds = [transitions[i]["kind"] for i in range(first, last + 1)]
        failed = any(transitions[i]["error"] for i in range(first, last + 1))
        seconds = (finish - begin).total_seconds()
        rows.append(
            [
                esc(step),
                esc(", ".join(kinds)),
                esc(span(seconds * 1000)),
                bar((begin - start).total_seconds() / total, seconds / total, "failed" if failed else "ok"),
            ]
        )
    return f'<p class="scale">0 … {esc(span(total * 1000))}</p>' + table(["step", "transitions", "took", "when"], rows)


def _transitions(doc: dict) -> str:
    start = datetime.fromisoformat(doc["transitions"][0]["at"]) if doc["transitions"] else None
    rows = []
    for t in doc["transitions"]:
        elapsed = span((datetime.fromisoformat(t["at"]) - start).total_seconds() * 1000) if start else ""
        tail = f'<span class="error">{esc(t["error"])}</span>' if t["error"] else esc(brief(t["detail"], 120))
        rows.append(
            [
                esc(t["seq"]),
                esc(_seconds(t["at"])),
                esc("+" + elapsed),
                esc(t["step"] or "-"),
                esc(t["kind"]),
                esc("" if t["attempt"] is None else t["attempt"]),
                tail,
            ]
        )
    return table(["seq", "at (UTC)", "elapsed", "step", "kind", "try", "detail / error"], rows)


# -- dead letters --------------------------------------------------------------------------


async def dead_letters(request: web.Request) -> web.Response:
    """Open dead letters by (reason, action, tenant) with counts, each group retried at once (its button
    counts the letters that retry takes, up to a click's worth); then the newest.

    The console's own deployment's letters, the ones its retry takes, as `ordo dlq list` shows them; with
    `all=1` every deployment's sharing the ledger, each naming whose it is, and a Retry button only on
    this deployment's (another's is retried from its own console).
    """
    console = request.app[CONSOLE]
    identity = identity_of(request)
    csrf = csrf_of(request)
    reason = request.query.get("reason") or None
    everyone = request.query.get("all") == "1"
    deployment = console.topology.prefix
    async with console.pool.acquire() as conn:
        groups = await queries.letter_groups(conn, identity.tenants, deployment, all_deployments=everyone)
        letters = await queries.open_letters(conn, identity.tenants, deployment, reason, 100, all_deployments=everyone)

    def whose(r) -> list[str]:
        """The deployment column, on the page of every deployment's letters (`-`: that cannot be told)."""
        return [esc(r["deployment"] or "-")] if everyone else []

    def retry_button(r, action: str, label: str, fields: dict[str, object] | None = None) -> str:
        """A Retry button where the letters are this deployment's: its retry refuses another's."""
        return post_button(action, label, csrf, fields) if r["ours"] else ""

    def group_retry_button(g) -> str:
        """A group's Retry button offers the letters its retry takes: it passes over those it cannot retry
        (they stay open), so a group of those alone has none, and says why instead."""
        if g["ours"] and not g["retriable"]:
            why = "a retry would leave each of them open (e.g. a message with no subject to republish it to)"
            return f'<span title="{esc(why)}">None to retry</span>'
        fields = {"reason": g["reason"], "action": g["action"] or "", "tenant": g["tenant"] or ""}
        return retry_button(g, "/dead-letters/retry-group", group_retry_label(g["retriable"]), fields)

    group_rows = [
        [
            link(url("/dead-letters", reason=g["reason"], all="1" if everyone else None), g["reason"]),
            *whose(g),
            esc(g["action"] or "-"),
            esc(g["tenant"] or "-"),
            esc(f"{g['letters']:,}"),
            esc(when(g["first_at"])),
            esc(when(g["last_at"])),
            group_retry_button(g),
        ]
        for g in groups
    ]
    letter_rows = [
        [
            esc(r["id"]),
            esc(when(r["at"])),
            esc(r["reason"]),
            *whose(r),
            esc(r["action"] or "-"),
            esc(r["tenant"] or "-"),
            link(f"/executions/{r['execution_id']}", r["execution_id"]) if r["execution_id"] else "-",
            esc(r["step_id"] or "-"),
            esc(r["error"]),
            retry_button(r, f"/dead-letters/{r['id']}/retry", "Retry"),
        ]
        for r in letters
    ]
    deployment_column = ["deployment"] if everyone else []
    body = (
        _letters_scope(deployment, everyone, reason)
        + "<h2>Open, by reason, action and tenant</h2>"
        + table(
            ["reason", *deployment_column, "action", "tenant", "letters", "first", "last", ""],
            group_rows,
            "No open dead letter.",
        )
        + f"<h2>Newest open letters{esc(' (' + reason + ')') if reason else ''}</h2>"
        + table(
            ["id", "at", "reason", *deployment_column, "action", "tenant", "execution", "step", "error", ""],
            letter_rows,
            "None.",
        )
    )
    return html_page(request, "Dead letters", body)


def group_retry_label(retriable: int) -> str:
    """A group's Retry button says how many letters one click retries: of a group larger than a group retry
    takes, that many of all (the rest stay open for the next click)."""
    limit = queries.GROUP_RETRY_LIMIT
    return f"Retry {limit:,} of {retriable:,}" if retriable > limit else f"Retry {retriable:,}"


def _letters_scope(deployment: str, everyone: bool, reason: str | None) -> str:
    """Whose letters the page shows, and the link to the other choice (the reason filter kept): deployments
    that share the ledger share its dead-letter table, and each retries only its own letters."""
    if everyone:
        return (
            "<p>Every deployment's letters on this ledger; each is retried from its own deployment. "
            + link(url("/dead-letters", reason=reason), f"Only deployment {deployment}'s")
            + "</p>"
        )
    return (
        f"<p>Deployment <b>{esc(deployment)}</b>'s letters, the ones its retry takes. "
        + link(url("/dead-letters", reason=reason, all="1"), "All deployments")
        + "</p>"
    )


# -- workflows -------------------------------------------------------------------------------


async def workflows(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    identity = identity_of(request)
    async with console.pool.acquire() as conn:
        rows = await queries.workflow_versions(conn, identity.tenants)
    cells = [
        [
            esc(r["tenant"]),
            link(f"/workflows/{segment(r['tenant'])}/{segment(r['workflow_id'])}", r["workflow_id"]),
            esc(f"v{r['version']}"),
            esc(r["steps"]),
            esc(when(r["deployed_at"])),
            f"<code>{esc(r['digest'][:12])}</code>",
        ]
        for r in rows
    ]
    body = table(["tenant", "workflow", "version", "steps", "deployed", "digest"], cells, "No workflow deployed.")
    return html_page(request, "Workflows", body)


async def workflow(request: web.Request) -> web.Response:
    """A workflow's versions, and the unified diff of two of them (`?a=1&b=2`)."""
    console = request.app[CONSOLE]
    identity = identity_of(request)
    tenant, workflow_id = request.match_info["tenant"], request.match_info["workflow_id"]
    what = f"Workflow {tenant}/{workflow_id}"
    if not identity.may_see(tenant):
        raise not_found(request, what)
    async with console.pool.acquire() as conn:
        rows = [r for r in await queries.workflow_versions(conn, (tenant,)) if r["workflow_id"] == workflow_id]
        if not rows:
            raise not_found(request, what)
        versions = [r["version"] for r in rows]
        try:
            a = int(request.query.get("a") or (versions[1] if len(versions) > 1 else versions[0]))
            b = int(request.query.get("b") or versions[0])
        except ValueError:
            raise bad_request(request, "a and b must be version numbers") from None
        found = await queries.definitions(conn, tenant, workflow_id, [a, b])
        open_now = await queries.open_per_version(conn, tenant, workflow_id)
        latest = await rollouts.latest(conn, workflow_id, tenant)
        rollout = await report(conn, latest[0]) if latest else None
    for v in (a, b):
        if v not in found:
            raise not_found(request, f"Version {v} of {what}")

    def chooser(name: str, chosen: int) -> str:
        options = "".join(f'<option value="{v}"{" selected" if v == chosen else ""}>v{v}</option>' for v in versions)
        return f'<label>{name} <select name="{name}">{options}</select></label>'

    def lines(v: int) -> list[str]:
        return orjson.dumps(found[v], option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode().splitlines()

    diff = "\n".join(difflib.unified_diff(lines(a), lines(b), f"v{a}", f"v{b}", lineterm="")) or "(identical)"

    def still_open(v: int) -> list[str]:
        counts = open_now.get(v)
        return [esc(counts["running"] if counts else 0), esc(counts["waiting"] if counts else 0)]

    listing = table(
        ["version", "steps", "deployed", "running", "waiting", "digest"],
        (
            [
                esc(f"v{r['version']}"),
                esc(r["steps"]),
                esc(when(r["deployed_at"])),
                *still_open(r["version"]),
                f"<code>{esc(r['digest'])}</code>",
            ]
            for r in rows
        ),
    )
    body = (
        listing
        + (
            _rollout_section(rollout)
            if rollout
            else "<h2>Rollout</h2><p>None: new executions run the latest version.</p>"
        )
        + f'<h2>Diff</h2><form class="search" method="get">{chooser("a", a)} {chooser("b", b)}'
        + '<button type="submit">Compare</button></form>'
        + f'<pre class="diff">{esc(diff)}</pre>'
    )
    return html_page(request, what, body)


def _seconds(moment: str) -> str:
    """An ISO time of the rollout document, to the second: '2026-12-06 08:55:25'."""
    return moment[:19].replace("T", " ")


def _rollout_section(doc: dict) -> str:
    """The workflow's latest rollout: state and share, each stage, both versions' numbers this stage,
    shadow runs, and every logged change (what `ordo rollout status` prints)."""
    r = doc["rollout"]
    baseline, candidate = stage_key(r, False), stage_key(r, True)
    stages = " → ".join(
        f"<b>{esc(percent(share))}</b>" if i == r["stage"] else esc(percent(share))
        for i, share in enumerate(r["stages"])
    )
    head = (
        f"<h2>Rollout {esc(r['rollout_id'])}: v{esc(baseline)} → v{esc(candidate)}, {esc(r['state'])}</h2>"
        f"<p>Candidate share {esc(percent(r['share']))}; stages {stages}"
        + (f"; shadow {esc(percent(r['shadow_share']))}" if r["shadow_share"] else "")
        + f"; stage {esc(r['stage'] + 1)} since {esc(_seconds(r['stage_started_at']))}.</p>"
    )

    def numbers(version: str, role: str) -> list[str]:
        stage = doc["stage"][version]
        started = stage.get("started", 0)
        failed = stage.get("failed", 0)
        p99 = stage.get("p99_step_ms")
        return [
            esc(f"{role} v{version}"),
            esc(started),
            esc(stage.get("completed", 0)),
            esc(failed),
            esc(f"{100 * failed / started:.2f}%" if started else "–"),
            esc(f"{p99:.1f} ms" if p99 is not None else "–"),
        ]

    stage_table = table(
        ["version", "started", "completed", "failed", "failure rate", "p99 action step"],
        [numbers(baseline, "baseline"), numbers(candidate, "candidate")],
    )
    shadow = ""
    if r["shadow_share"]:
        counts = doc["shadow"]
        shadow = "<p>Shadow runs this stage: " + esc(
            ", ".join(f"{counts.get(k, 0)} {k}" for k in ("identical", "diverged", "error", "pending"))
        )
        shadow += "</p>"
    changes = table(
        ["#", "at", "action", "share", "by", "reason"],
        (
            [
                esc(t["seq"]),
                esc(_seconds(t["at"])),
                esc(t["action"]),
                esc(f"{percent(t['share_before'])} → {percent(t['share_after'])}"),
                esc(t["actor"]),
                esc(t["reason"]),
            ]
            for t in doc["transitions"]
        ),
    )
    return head + stage_table + shadow + "<h3>Changes</h3>" + changes


# -- audit -------------------------------------------------------------------------------------


async def audit(request: web.Request) -> web.Response:
    """The newest changes made through the console (a tenant token sees its tenant's tokens' changes)."""
    console = request.app[CONSOLE]
    identity = identity_of(request)
    async with console.pool.acquire() as conn:
        rows = await queries.audit_trail(conn, identity.tenant, 200)
    cells = [
        [
            esc(when(r["at"])),
            esc(r["who"]),
            esc(r["action"]),
            link(f"/executions/{r['execution_id']}", r["execution_id"]) if r["execution_id"] else "-",
            esc(r["dead_letter_id"] if r["dead_letter_id"] is not None else "-"),
            f"<code>{esc(r['detail'])}</code>",
            esc(r["outcome"] if r["outcome"] is not None else "(unfinished)"),
        ]
        for r in rows
    ]
    body = table(
        ["at (UTC)", "who", "action", "execution", "dead letter", "detail", "outcome"], cells, "No change yet."
    )
    return html_page(request, "Audit", body)


# -- live ----------------------------------------------------------------------------------------


async def live(request: web.Request) -> web.Response:
    """Throughput, failure rate, latency and lag over the last minutes, from the workers' metrics (operators only:
    they count every tenant)."""
    identity = identity_of(request)
    if identity.tenant is not None:
        raise not_found(request, "Live")
    sampler = request.app[CONSOLE].live
    if sampler is None:
        body = "<p>Set <code>metrics_port</code> (ORDO_METRICS_PORT) as the workers have it to see them live.</p>"
        return html_page(request, "Live", body)
    points = sampler.points()
    if not points:
        return html_page(request, "Live", f"<p>Sampling every {sampler.interval_s:g} s: reload in a moment.</p>")

    def values(pick) -> list[float | None]:
        return [None if p is None else pick(p) for p in points]

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000

    latest = next((p for p in reversed(points) if p is not None), None)
    workers = "" if latest is None else f"{latest.workers} of {len(sampler.urls)} worker(s) answering. "
    body = (
        f"<p>{esc(workers)}One bar per {sampler.interval_s:g} s, the oldest left.</p>"
        + chart(values(lambda p: p.per_second), "executions finished/s")
        + chart(values(lambda p: None if p.failure_rate is None else p.failure_rate * 100), "failed", " %")
        + chart(values(lambda p: ms(p.p50_s)), "end-to-end latency p50 (at most)", " ms", 0)
        + chart(values(lambda p: ms(p.p99_s)), "end-to-end latency p99 (at most)", " ms", 0)
        + chart(values(lambda p: p.dead_letters), "new dead letters", "", 0)
        + chart(values(lambda p: p.lag), "consumer lag (messages)", "", 0)
    )
    return html_page(request, "Live", body)
