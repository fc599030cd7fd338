"""The engine's pull consumer: actions/transport.py's, which action workers use too.

Defined there so that an action worker needs nothing of the engine. A
`Delivery` is also one of the worker's work items (kind "message",
daemon/work_items.py): it carries every attribute the pipeline reads.
"""

from actions.transport import Delivery, PullConsumer

__all__ = ["Delivery", "PullConsumer"]
