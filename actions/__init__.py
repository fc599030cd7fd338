"""Actions: the contract (contract.py), the built-ins (builtin/), the plug-in loader (plugins.py), and
the SDK for external action workers (sdk.py, worker.py). See contract.py for the shapes."""

from .contract import (
    Action,
    ActionContext,
    ActionError,
    ActionRegistry,
    decode_request,
    decode_result,
    idempotency_key,
    invoke,
    request,
    result_error,
    result_ok,
)

__all__ = [
    "Action",
    "ActionContext",
    "ActionError",
    "ActionRegistry",
    "decode_request",
    "decode_result",
    "idempotency_key",
    "invoke",
    "request",
    "result_error",
    "result_ok",
]
