"""What an operator sends to a running execution: a cancel or a signal, the same from `ordo` and the console.

Each goes onto the execution's subject with a message id that makes a repeat
one message (JetStream's duplicate window): a cancel per execution, a signal
per signal id. The dispatcher applies it in order with the execution's other
messages.

Only to an execution of the sending deployment: deployments that share a ledger
share its executions, and a message on this deployment's subjects for another's
execution would be applied here, by this deployment's owner of that partition
number, to the row both share. The ledger says whose it is (migration 021).
"""

from dataclasses import dataclass
from typing import Any

import orjson

from ledger.connection import Queryable
from ledger.executions import deployment_of

from .topology import Topology


class NotSent(Exception):
    """The message was refused before anything was published: no such execution, or another deployment's (the
    console titles and answers each by its kind)."""


class NoSuchExecution(NotSent):
    """Refused for there is no such execution (none ever, or gone since it was looked up: retention)."""


class OthersExecution(NotSent):
    """Refused for whose the execution is: another deployment's, or one the ledger cannot name."""


@dataclass(frozen=True, slots=True)
class OperatorMessage:
    execution_id: str
    body: dict[str, Any]
    #: Nats-Msg-Id: the same change sent twice is stored once.
    msg_id: str

    @property
    def kind(self) -> str:
        kind: str = self.body["kind"]
        return kind


def cancel(execution_id: str, reason: str | None) -> OperatorMessage:
    body = {"v": 1, "kind": "cancel", "execution_id": execution_id, "reason": reason}
    return OperatorMessage(execution_id, body, f"cancel:{execution_id}")


def signal(execution_id: str, name: str, data: Any, signal_id: str) -> OperatorMessage:
    body = {"v": 1, "kind": "signal", "execution_id": execution_id, "signal_id": signal_id, "name": name, "data": data}
    return OperatorMessage(execution_id, body, f"signal:{execution_id}:{signal_id}")


async def send(js: Any, conn: Queryable, topology: Topology, message: OperatorMessage) -> int:
    """Publish `message` onto its execution's subject; the stream sequence it got.

    NotSent, and nothing published, unless the ledger holds the execution as this
    deployment's (`topology.prefix`): NoSuchExecution when it holds none, OthersExecution
    when it holds it as another's.
    """
    exists, deployment = await deployment_of(conn, message.execution_id)
    if not exists:
        raise NoSuchExecution(f"no execution {message.execution_id}")
    if deployment != topology.prefix:
        owner = (
            f"deployment {deployment!r}"
            if deployment
            else "a deployment the ledger cannot name (enrolled before migration 021 by one of several)"
        )
        raise OthersExecution(
            f"execution {message.execution_id} belongs to {owner}, not to this one ({topology.prefix!r}): not sent"
        )
    ack = await js.publish(
        topology.exec_subject(message.execution_id), orjson.dumps(message.body), headers={"Nats-Msg-Id": message.msg_id}
    )
    seq: int = ack.seq
    return seq
