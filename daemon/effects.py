"""What a committed transition asks of the world: actions to run, events to emit.

These run only after the transition that asked for them has committed, so a
crash can repeat them but never run one whose cause was lost. Every action
call carries the step's idempotency key (the same on every retry); an action
whose request or result is lost is retried when its deadline timer fires.

In-process actions (the registry's) run as tasks of this worker; any other
action is requested on `<prefix>.actions.<name>.v<major>` for external action
workers. Either way the result comes back as an `action_result` message on the
execution's subject, ordered with the execution's other messages.
"""

import asyncio
import logging
import time

import orjson

from actions import contract

from .topology import Topology, trigger_msg_id

log = logging.getLogger("ordo.effects")


class Effects:
    def __init__(self, js, topology: Topology, actions=None, *, concurrency: int = 256):
        self._js = js
        self._topology = topology
        self._actions = actions  # an actions.contract.ActionRegistry, or None
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set = set()

    async def carry_out(self, record_tenant: str, execution_id: str, effects: list) -> None:
        for kind, data in effects:
            if kind == "action":
                await self._action(record_tenant, execution_id, data)
            elif kind == "emit":
                event = data["event"]
                await self._js.publish(self._topology.trigger_subject(event["tenant"], event["type"]),
                                       orjson.dumps(event), headers={"Nats-Msg-Id": trigger_msg_id(event)})

    async def _action(self, tenant: str, execution_id: str, data: dict) -> None:
        request = contract.request(
            execution_id=execution_id, step_id=data["step_id"], attempt=data["attempt"],
            idempotency_key=data["idempotency_key"], action=data["action"], major=data["major"],
            input=data["input"],
            # The action's own deadline is wall-clock time: it bounds a real call.
            deadline=int(time.time() * 1000) + int(data.get("timeout_ms") or 30_000),
            tenant=tenant, request_seq=data.get("request_seq", 0),
        )
        action = self._actions.get(data["action"], data["major"]) if self._actions is not None else None
        if action is None:
            subject = self._topology.action_subject(data["action"], data["major"])
            msg_id = f"request:{execution_id}:{data['step_id']}:{data['attempt']}:{request.get('request_seq', 0)}"
            await self._js.publish(subject, contract.encode(request), headers={"Nats-Msg-Id": msg_id})
            return
        task = asyncio.get_running_loop().create_task(self._run_in_process(action, request))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_in_process(self, action, request: dict) -> None:
        async with self._slots:
            result = await contract.invoke(action, contract.ActionContext.from_request(request, log), request["input"])
        await self.publish_result(result)

    async def publish_result(self, result: dict) -> None:
        """Hand an action result to its execution (ordered with its other messages)."""
        try:
            await self._js.publish(self._topology.exec_subject(result["execution_id"]), contract.encode(result),
                                   headers={"Nats-Msg-Id": contract.result_msg_id(result)})
        except Exception as exc:  # the step's deadline timer retries it
            log.warning("action result for %s not published: %s", result["execution_id"], exc)

    async def close(self, timeout: float = 10.0) -> None:
        """Let in-process actions finish and publish their results (bounded), then close them."""
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)
        if self._actions is not None:
            await self._actions.aclose()
