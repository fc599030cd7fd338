"""Operator tools over the dead-letter table: list, show, retry.

Two kinds of letters, two kinds of retry:
- a step that failed for good (`step_failed`, it names an execution and a
  step): a `retry` message goes onto the execution's subject, ordered with its
  other messages; the execution resumes at that step with the same
  idempotency key;
- a message that could not be taken (bad input, an unknown tenant, a
  definition that could not load): its original payload is published again
  to its original subject, under a new message id, after the operator fixed
  what was wrong.
A message that reached this deployment's execution subject for another
deployment's execution (`other_deployment`) is published to where it belongs
instead: that execution's subject in its own deployment.
A retried letter is marked `retried`, so `--all` does not retry it twice.

Deployments that share a ledger share its dead-letter table. A failed step's
retry goes onto the retrying deployment's own execution subject, where its
worker would apply it to another deployment's execution: so only the
deployment's own letters are retried (a failed step of its own execution,
migration 021; a message taken from its own subjects), and another's stay
open for that deployment's own `ordo dlq retry`; asked to retry one letter
by id that is another's, `ordo dlq retry ID` and the console refuse it
(`refuse_others`), as they refuse a cancel of another's execution. `list` shows the same letters, or
everyone's with the deployment of each; `show` shows one of them, or anyone's
with its deployment (ledger/dead_letters.py tells whose a letter is, for all
three).
"""

from dataclasses import dataclass, field

import orjson

from actions.transport import Subjects
from ledger import dead_letters, leases
from ledger.executions import deployment_of


async def list_letters(conn, topology, *, all_deployments=False, reason=None, tenant=None, limit=100) -> list[str]:
    """A line per open letter of this deployment, the ones its `retry` would take; of every deployment
    sharing the ledger with `all_deployments`, each line naming whose it is (`-`: that cannot be told)."""
    deployment = None if all_deployments else topology.prefix
    lines = []
    for r in await dead_letters.open_letters(conn, deployment, reason, tenant, limit):
        if r["step_id"]:
            where = f"{r['execution_id']} step {r['step_id']}"
        else:  # a message, or one event of a trigger batch message
            where = f"{r['stream']}:{r['stream_seq']}" + ("" if r["batch_index"] is None else f"[{r['batch_index']}]")
        whose = f"{r['deployment'] or '-':<12} " if all_deployments else ""
        lines.append(
            f"{r['id']:>6}  {r['at'].isoformat(timespec='seconds')}  {r['reason']:<20} "
            f"{whose}{r['tenant'] or '-':<12} {where}  {r['error']}"
        )
    return lines


class OthersLetter(Exception):
    """The letter asked for by id is another deployment's: `show` shows it only when every deployment's
    are asked for, as `list` lists it only then; a retry with `refuse_others` refuses it, and it stays
    open. `then`, if given, ends the message: what came of it."""

    def __init__(self, letter_id: int, deployment: str | None, this_deployment: str, then: str = ""):
        whose = (
            f"belongs to deployment {deployment!r}, not to this one"
            if deployment
            else "is not this deployment's, and whose it is cannot be told"
        )
        super().__init__(f"dead letter {letter_id} {whose} ({this_deployment!r})" + (f": {then}" if then else ""))
        self.letter_id = letter_id
        self.deployment = deployment


async def show_letter(conn, topology, letter_id: int, *, all_deployments=False, tenant=None) -> str | None:
    """The letter, every field and its payload; None if there is none (of the tenant, if given). Another
    deployment's letter raises OthersLetter, unless `all_deployments`: then it is shown with the deployment
    whose it is (`-`: that cannot be told)."""
    r = await dead_letters.letter(conn, letter_id, topology.prefix, tenant)
    if r is None:
        return None
    if not r["ours"] and not all_deployments:
        raise OthersLetter(letter_id, r["deployment"], topology.prefix)
    payload = bytes(r["payload"])
    try:
        body = payload.decode()
    except UnicodeDecodeError:
        body = repr(payload)
    lines = [f"dead letter {r['id']}  ({r['status']})"]
    if all_deployments:
        lines.append(f"  {'deployment':<13} {r['deployment'] or '-'}")
    for name in (
        "at",
        "reason",
        "error",
        "tenant",
        "workflow_id",
        "execution_id",
        "step_id",
        "subject",
        "stream",
        "stream_seq",
        "batch_index",
        "retried_at",
    ):
        if r[name] is not None and r[name] != "":
            lines.append(f"  {name:<13} {r[name]}")
    if r["attempts"]:
        lines.append("  attempts")
        for attempt in orjson.loads(r["attempts"]):
            lines.append(f"    {orjson.dumps(attempt).decode()}")
    lines.append(f"  payload       {body}")
    return "\n".join(lines)


@dataclass(slots=True)
class Retries:
    """What a retry did."""

    #: What `ordo dlq retry` prints: a line per letter, then one for the other deployments' letters left open.
    lines: list[str] = field(default_factory=list)
    #: How many letters were retried (marked `retried`: no longer open).
    retried: int = 0
    #: A line per letter taken and left open, saying why (another deployment's among them).
    left_open: list[str] = field(default_factory=list)


async def retry(
    conn, js, topology, *, letter_id=None, reason=None, action=None, tenant=None, refuse_others=False
) -> Retries:
    """Retry open letters (one by id, or all that match) of this deployment: a line per letter, and one
    for the other deployments' letters left open; counted.

    With `refuse_others`, a letter asked for by id that is another deployment's raises OthersLetter
    (naming whose it is, if that can be told) and nothing is published or marked; without, it is left
    open and counted among the other deployments' letters, as every letter `--all` leaves to its own.
    """
    done = Retries()
    others = 0
    async with conn.transaction():
        for r in await dead_letters.pick_for_retry(conn, topology.prefix, letter_id, reason, tenant, action):
            if not r["ours"]:
                if refuse_others and letter_id is not None:
                    # Whose it is, by the rule that just said it is not ours (NULL: that cannot be told).
                    theirs = await dead_letters.letter(conn, r["id"], topology.prefix, None)
                    raise OthersLetter(
                        r["id"],
                        theirs["deployment"] if theirs else None,
                        topology.prefix,
                        "left open, for its own deployment to retry",
                    )
                others += 1
                done.left_open.append(f"{r['id']}: another deployment's: retry it from its own deployment")
                continue
            if r["reason"] == "step_failed" and r["execution_id"]:
                body = {"v": 1, "kind": "retry", "execution_id": r["execution_id"], "step_id": r["step_id"]}
                await js.publish(
                    topology.exec_subject(r["execution_id"]),
                    orjson.dumps(body),
                    headers={"Nats-Msg-Id": f"dlq-retry:{r['id']}"},
                )
                line = f"{r['id']}: execution {r['execution_id']} resumes at step {r['step_id']}"
            elif r["reason"] == "other_deployment":
                home, why = await _home_subject(conn, r["execution_id"])
                if home is None:
                    _leave_open(done, f"{r['id']}: left open: {why}")
                    continue
                await js.publish(home, bytes(r["payload"]), headers={"Nats-Msg-Id": f"dlq-retry:{r['id']}"})
                line = f"{r['id']}: sent to {home}, {why}"
            elif r["subject"]:
                await js.publish(r["subject"], bytes(r["payload"]), headers={"Nats-Msg-Id": f"dlq-retry:{r['id']}"})
                line = f"{r['id']}: republished to {r['subject']}"
            else:
                _leave_open(done, f"{r['id']}: nothing to retry it with (no subject)")
                continue
            await dead_letters.mark_retried(conn, r["id"])
            done.lines.append(line)
            done.retried += 1
    if others:
        done.lines.append(
            f"{others} letter(s) of another deployment than {topology.prefix!r} left open: "
            "retry them from their own deployment"
        )
    return done


def summary(retried: int, left_open: int, named: list[str] | None = None) -> str:
    """A retry's last line, for `ordo dlq retry` and the console: how many letters were retried and how
    many left open, and, if `named` (lines saying why, perhaps of only the first few), those."""
    left = f", {left_open} left open" if left_open else ""
    if left_open and named:
        unnamed = f"; {left_open - len(named)} more" if left_open > len(named) else ""
        left += ": " + "; ".join(named) + unnamed
    return f"{retried} dead letter(s) retried{left}"


def _leave_open(done: Retries, line: str) -> None:
    """One of this deployment's letters stays open: `line` says why."""
    done.lines.append(line)
    done.left_open.append(line)


async def _home_subject(conn, execution_id: str | None) -> tuple[str | None, str]:
    """The execution subject of the execution in its own deployment, or None; and a line that says whose
    it is, or why it cannot be told. Republished to its letter's subject, the message would be
    dead-lettered again: that is the subject of a deployment the execution does not belong to."""
    exists, deployment = await deployment_of(conn, execution_id) if execution_id else (False, None)
    if not exists:
        return None, f"no execution {execution_id} to send it to"
    if not deployment:
        return None, (
            f"execution {execution_id} belongs to a deployment the ledger cannot name "
            "(enrolled before migration 021 by one of several): assign it, then retry"
        )
    partitions = await leases.partition_count(conn, deployment)
    if not partitions:
        return None, f"execution {execution_id} belongs to deployment {deployment!r}, which has no partitions"
    subject = Subjects(deployment, partitions).exec_subject(execution_id)
    return subject, f"the subject of execution {execution_id} in its deployment {deployment!r}"
