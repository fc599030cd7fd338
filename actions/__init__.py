"""Actions: the contract (contract.py), the built-ins (builtin/), and the SDK for
external action workers (sdk.py, worker.py). See contract.py for the shapes."""

from .contract import (
    Action,
    ActionContext,
    ActionError,
    ActionRegistry,
    decode_request,
    decode_result,
    default_registry,
    idempotency_key,
    invoke,
    request,
    result_error,
    result_ok,
)

__all__ = ["Action", "ActionContext", "ActionError", "ActionRegistry", "decode_request", "decode_result",
           "default_registry", "idempotency_key", "invoke", "request", "result_error", "result_ok"]
