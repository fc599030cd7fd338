"""The engine's pull consumer: actions/transport.py's, which action workers use too.

Defined there so that an action worker needs nothing of the engine; what only
the engine reads of a delivery (it is one of the worker's work items,
daemon/work_items.py) is added here.
"""

from typing import Literal, cast

from actions import transport


class Delivery(transport.Delivery):
    """A stream message as the worker carries it: a work item of kind "message", acked once it commits."""

    __slots__ = ()
    kind: Literal["message"] = "message"
    #: A message stands for itself, never for one event of a batch (that is a daemon/enrolment.py BatchPart).
    batch_index = None


class PullConsumer(transport.PullConsumer):
    """actions/transport.py's pull consumer, delivering the engine's `Delivery`."""

    # A list of the subclass: to a type checker an incompatible override, as list is invariant.
    async def take(self, room: int, *, request_more: bool = True) -> list[Delivery]:  # type: ignore[override]
        taken = await super().take(room, request_more=request_more)
        for delivery in taken:
            # The same object, with the engine's attributes (no copy: __slots__ are shared).
            delivery.__class__ = Delivery
        return cast(list[Delivery], taken)


__all__ = ["Delivery", "PullConsumer"]
