"""The built-in, in-process actions: noop, log and webhook."""

from .egress import EgressPolicy, EgressRefused
from .log import LogAction
from .noop import NoopAction
from .webhook import WebhookAction

__all__ = ["EgressPolicy", "EgressRefused", "LogAction", "NoopAction", "WebhookAction"]
