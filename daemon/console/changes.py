"""The console's changes: cancel an execution, send it a signal, retry dead letters.

Each is what the command line does (`ordo execution cancel`, `ordo signal`,
`ordo dlq retry`), through the same functions: daemon/operator_messages.py's
messages, daemon/dlq.py's `retry`. Before anything is
sent the change is written to the audit trail (who, what, which execution or
letter), and its outcome after; a tenant token's change to what is not its
tenant's is "not found", like a page. A cancel or signal for another
deployment's execution (the ledger is shared) is refused, 409, and audited as such,
and so is a retry of another deployment's letter: it stays open, for that
deployment to retry (daemon/dlq.py's `retry` tells whose it is, by the ledger's rule).
So is a change that finds nothing to do it to: an execution gone since the console looked
(404), a letter no longer open or with nowhere to send it (409). Each refusal's page
is titled with what was not done and why, and answered with its status (`REFUSALS`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ledger import console as queries

from .. import operator_messages
from ..dlq import OthersLetter, retry, summary
from .html import esc, link
from .state import CONSOLE, Console, identity_of
from .views import bad_request, execution_uuid, html_page, not_found

#: The most letters a group retry leaves open that its answer names, with why (it counts them all).
LEFT_OPEN_NAMED = 10


class LetterNotOpen(Exception):
    """The letter asked for was not open when its retry looked (retried since, or being retried): nothing sent."""


class NowhereToSend(Exception):
    """The letter asked for was left open: a retry has nowhere to send it (no subject to republish it to, no
    execution or deployment of one to send it to), said in the words of `ordo dlq retry`."""


#: A refused change's page by the change and the refusal (the exception that said so): its title, what was not
#: done and why, and its status. Nothing was sent or marked; any other exception is the change failing.
REFUSALS: dict[tuple[str, type[Exception]], tuple[str, int]] = {
    ("cancel", operator_messages.NoSuchExecution): ("Not cancelled: no such execution", 404),
    ("cancel", operator_messages.OthersExecution): ("Not cancelled: another deployment's execution", 409),
    ("signal", operator_messages.NoSuchExecution): ("Not signalled: no such execution", 404),
    ("signal", operator_messages.OthersExecution): ("Not signalled: another deployment's execution", 409),
    ("dlq_retry", OthersLetter): ("Not retried: another deployment's letter", 409),
    ("dlq_retry", LetterNotOpen): ("Not retried: the letter is no longer open", 409),
    ("dlq_retry", NowhereToSend): ("Not retried: nowhere to send it", 409),
}


def _refusal(action: str, exc: Exception) -> tuple[str, int] | None:
    """The title and status of `action` refused by `exc` (`REFUSALS`, its most specific kind); None if `exc`
    is no refusal."""
    return next((REFUSALS[action, kind] for kind in type(exc).__mro__ if (action, kind) in REFUSALS), None)


async def _audited(
    request: web.Request,
    action: str,
    execution_id: str | None,
    letter_id: int | None,
    detail: dict[str, Any],
    change: Callable[[Console], Awaitable[str]],
) -> web.Response:
    """Write the audit row, make the change, record its outcome; a page saying what was done."""
    console = request.app[CONSOLE]
    identity = identity_of(request)
    if console.js is None:
        return html_page(request, "Not sent", "<p>The console has no NATS (set ORDO_NATS_URL).</p>", 503)
    async with console.pool.acquire() as conn:
        audit_id = await queries.audit_begin(
            conn, identity.name, identity.tenant, action, execution_id, letter_id, detail
        )
    try:
        done = await change(console)
    except Exception as exc:
        refusal = _refusal(action, exc)
        async with console.pool.acquire() as conn:
            await queries.audit_end(conn, audit_id, f"{'error' if refusal is None else 'refused'}: {exc}")
        if refusal is None:
            return html_page(request, "Failed", f'<p class="error">{esc(action)} failed: {esc(exc)}</p>', 502)
        title, status = refusal
        return html_page(request, title, f'<p class="error">{esc(exc)}</p>', status)
    async with console.pool.acquire() as conn:
        await queries.audit_end(conn, audit_id, "ok")
    back = link(f"/executions/{execution_id}", "Back to the execution") if execution_id else ""
    return html_page(request, "Done", f'<p class="done">{esc(done)}</p><p>{back}</p>')


async def _own_execution(request: web.Request) -> str:
    """The URL's execution id, if it exists and this identity may change it; else not found."""
    execution_id = execution_uuid(request)
    async with request.app[CONSOLE].pool.acquire() as conn:
        tenant = await queries.execution_tenant(conn, execution_id)
    if tenant is None or not identity_of(request).may_see(tenant):
        raise not_found(request, f"Execution {execution_id}")
    return execution_id


async def cancel(request: web.Request) -> web.Response:
    """Cancel: a `cancel` message onto the execution's subject, as `ordo execution cancel` sends it."""
    execution_id = await _own_execution(request)
    form = await request.post()
    reason = str(form.get("reason") or "") or f"cancelled in the console by {identity_of(request).name}"

    async def change(console: Console) -> str:
        message = operator_messages.cancel(execution_id, reason)
        async with console.pool.acquire() as conn:
            seq = await operator_messages.send(console.js, conn, console.topology, message)
        return f"cancel sent to {execution_id} (stream seq {seq})"

    return await _audited(request, "cancel", execution_id, None, {"reason": reason}, change)


async def signal(request: web.Request) -> web.Response:
    """A signal, as `ordo signal` sends it; the form's signal id makes a double submit one signal."""
    execution_id = await _own_execution(request)
    form = await request.post()
    name = str(form.get("name") or "").strip()
    if not name:
        raise bad_request(request, "name: a signal needs a name")
    raw = str(form.get("data") or "").strip()
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise bad_request(request, f"data: not valid JSON ({exc})") from None
    try:
        signal_id = str(uuid.UUID(str(form.get("signal_id") or uuid.uuid4())))
    except ValueError:
        raise bad_request(request, "signal_id: not a UUID") from None

    async def change(console: Console) -> str:
        message = operator_messages.signal(execution_id, name, data, signal_id)
        async with console.pool.acquire() as conn:
            seq = await operator_messages.send(console.js, conn, console.topology, message)
        return f"signal {name!r} sent to {execution_id} (stream seq {seq})"

    detail = {"name": name, "data": data, "signal_id": signal_id}
    return await _audited(request, "signal", execution_id, None, detail, change)


async def retry_letter(request: web.Request) -> web.Response:
    """Retry one open dead letter (daemon/dlq.py: a failed step resumes, a refused message is republished).

    Another deployment's letter is refused, 409, as a cancel of its execution is: it stays open. So is a
    letter that is not retried (no longer open, or nowhere to send it), saying why.
    """
    raw = request.match_info["letter_id"]
    if not raw.isdigit():
        raise not_found(request, f"Dead letter {raw}")
    letter_id = int(raw)
    async with request.app[CONSOLE].pool.acquire() as conn:
        exists, tenant = await queries.letter_tenant(conn, letter_id)
    if not exists or not identity_of(request).may_see(tenant):
        raise not_found(request, f"Dead letter {letter_id}")

    async def change(console: Console) -> str:
        async with console.pool.acquire() as conn:
            done = await retry(conn, console.js, console.topology, letter_id=letter_id, refuse_others=True)
        if not done.retried:  # nothing sent: refused, and audited so, with why (as `ordo dlq retry ID` exits 1)
            if done.left_open:
                raise NowhereToSend("; ".join(done.lines))
            raise LetterNotOpen(f"dead letter {letter_id} is not open (retried already?)")
        return "; ".join(done.lines)

    return await _audited(request, "dlq_retry", None, letter_id, {}, change)


async def retry_group(request: web.Request) -> web.Response:
    """Retry every open letter of one (reason, action, tenant) group that is this deployment's, up to
    GROUP_RETRY_LIMIT (ledger/console.py): what the dead-letter page's button offers (another deployment's
    are that one's to retry). Letters a retry would leave open (e.g. no subject to republish to) are not
    taken, so they never fill the limit; the answer counts the letters retried, and those left open, the
    first few with why."""
    identity = identity_of(request)
    form = await request.post()
    reason = str(form.get("reason") or "")
    action = str(form.get("action") or "") or None
    tenant = str(form.get("tenant") or "") or None
    if not reason:
        raise bad_request(request, "reason: a group is named by its reason")
    if not identity.may_see(tenant):
        raise not_found(request, "That group of dead letters")

    async def change(console: Console) -> str:
        async with console.pool.acquire() as conn:
            deployment = console.topology.prefix
            limit = queries.GROUP_RETRY_LIMIT
            # One more than it takes: whether more remain (a group of exactly the limit leaves none).
            ids = await queries.group_letter_ids(conn, deployment, reason, action, tenant, limit + 1)
            skipped, skipped_why = await queries.group_letters_left_open(
                conn, deployment, reason, action, tenant, LEFT_OPEN_NAMED
            )
            retried, left_open = 0, []
            for letter_id in ids[:limit]:
                done = await retry(conn, console.js, console.topology, letter_id=letter_id)
                retried += done.retried
                left_open += done.left_open  # picked, but left open all the same (it changed since): not retried
        more = " (more remain: retry the group again)" if len(ids) > limit else ""
        return summary(retried, len(left_open) + skipped, left_open + skipped_why) + more

    detail = {"reason": reason, "action": action, "tenant": tenant}
    return await _audited(request, "dlq_retry_group", None, None, detail, change)
