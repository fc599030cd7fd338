"""The engine's pull consumer: actions/transport.py's, which action workers use too.

Imported from here by the worker; defined there so that an action worker needs
nothing of the engine.
"""

from actions.transport import Delivery, PullConsumer

__all__ = ["Delivery", "PullConsumer"]
