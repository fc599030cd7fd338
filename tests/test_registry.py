"""The worker's registry of deployed workflows: which triggers need routing to waiting executions."""

from daemon.definitions import WorkflowRegistry


def _workflow(version: int, steps: list, tenant: str = "acme") -> dict:
    return {
        "id": "nurture",
        "tenant": tenant,
        "version": version,
        "trigger": {"event": "contact.created"},
        "steps": steps,
    }


WAITS_FOR_REPLY = [
    {"id": "reply", "type": "wait_for_event", "event": "sms.replied", "timeout": "2d"},
    {"id": "done", "type": "end"},
]
NO_WAIT = [{"id": "done", "type": "end"}]


def test_an_event_is_awaited_only_where_a_workflow_waits_for_it():
    registry = WorkflowRegistry()
    registry.load([_workflow(1, WAITS_FOR_REPLY)], {"acme", "globex"})
    assert registry.awaited("acme", "sms.replied")
    assert not registry.awaited("acme", "contact.created")
    assert not registry.awaited("globex", "sms.replied")  # another tenant's workflow waits, not globex's


def test_an_older_version_still_waiting_keeps_its_event_awaited():
    # Executions of v1 may still be waiting after v2 (which no longer waits) is deployed.
    registry = WorkflowRegistry()
    registry.load([_workflow(1, WAITS_FOR_REPLY), _workflow(2, NO_WAIT)], {"acme"})
    assert registry.awaited("acme", "sms.replied")
    assert registry.candidates("acme", "contact.created")[0].version == 2


def test_a_reload_forgets_what_no_deployed_version_waits_for():
    registry = WorkflowRegistry()
    registry.load([_workflow(1, WAITS_FOR_REPLY)], {"acme"})
    registry.load([_workflow(1, NO_WAIT)], {"acme"})
    assert not registry.awaited("acme", "sms.replied")
