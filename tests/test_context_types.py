"""Context types: workflows about any kind of subject (issue #20), and README's "Add a context type".

The end-to-end tests run a real worker (NATS, Postgres) with the how-to's
package pip-installed as README has it: an `opportunity` workflow with a set
step and a branch on `{{opportunity.stage}}` and a wait for an event about the
same opportunity; old contact triggers (contracts 1.0 and 1.1) still enrol
contact workflows; a bad subject or an unknown subject type is dead-lettered
alone, named. pip installs with `--target` into a directory of the test's put
first on sys.path, not into the virtualenv, which other checkouts share.
"""

import importlib
import time
from pathlib import Path

import orjson
import pytest
from harness import NO_PROBLEMS, Harness, importable, pip_install_how_to, readme_how_to

from actions.plugins import PluginError
from actions.settings import Settings
from bench.generator import trigger_event
from daemon import context_types
from daemon.definitions import WorkflowRegistry, compile_entry
from hotpath.context_types import ContextType
from hotpath.definition import DefinitionError, validate
from hotpath.envelope import BadMessage, decode_triggers, subject_key, subject_of
from ledger.executions import subject_from

ROOT = Path(__file__).resolve().parent.parent

#: About an opportunity: a branch and a set step on its stage, then a wait for its next update.
DEALS = {
    "id": "deals",
    "tenant": "acme",
    "subject": "opportunity",
    "trigger": {"event": "opportunity.updated", "filter": {"ne": ["{{opportunity.stage}}", "lost"]}},
    "steps": [
        {"id": "stage", "type": "set", "values": {"stage": "{{opportunity.stage}}", "by": "{{event.data.by}}"}},
        {"id": "won", "type": "if", "condition": {"eq": ["{{opportunity.stage}}", "won"]}, "then": "book"},
        {"id": "open", "type": "set", "values": {"path": "open"}, "next": "next-update"},
        {"id": "book", "type": "set", "values": {"path": "won", "amount": "{{opportunity.amount}}"}},
        {"id": "next-update", "type": "wait_for_event", "event": "deal.touched", "timeout": "7d"},
        {"id": "done", "type": "end"},
    ],
}
#: About a contact, waiting for the same event type as DEALS.
CONTACTS = {
    "id": "contacts",
    "tenant": "acme",
    "trigger": {"event": "contact.created"},
    "steps": [
        {"id": "hello", "type": "set", "values": {"greeting": "Hi {{contact.first_name}}"}},
        {"id": "next-update", "type": "wait_for_event", "event": "deal.touched", "timeout": "7d"},
    ],
}


def opportunity_event(event_id: str, event_type: str, opportunity_id: str, **fields) -> dict:
    subject = {"type": "opportunity", "id": opportunity_id, **fields}
    return {
        "v": "1.2",
        "event_id": event_id,
        "tenant": "acme",
        "type": event_type,
        "subject": subject,
        "data": {"by": "ann"},
        "ts": time.time() * 1000,
    }


# -- the contract --------------------------------------------------------------------


def test_a_1_2_trigger_carries_a_typed_subject_and_old_ones_are_about_a_contact():
    event = decode_triggers(orjson.dumps(opportunity_event("e", "x", "o-1", stage="won")), 1 << 20)
    assert subject_of(event) == ("opportunity", {"id": "o-1", "stage": "won"})
    assert subject_key(event) == ("opportunity", "o-1")
    for v in (1, "1.0", "1.1", "1.2"):
        old = dict(trigger_event("old", 1, tenant="acme"), v=v)
        decoded = decode_triggers(orjson.dumps(old), 1 << 20)
        subject_type, record = subject_of(decoded)
        assert subject_type == "contact" and record is decoded["contact"]  # no copy on the old path
        assert subject_key(decoded) == ("contact", old["contact"]["id"])


@pytest.mark.parametrize(
    ("change", "reason", "names"),
    [
        ({"contact": {"id": "c-1"}}, "wrong_type", "'subject' and 'contact' are exclusive"),
        ({"subject": {"id": "o-1"}}, "wrong_type", "'subject.type'"),
        ({"subject": {"type": "Opportunity!", "id": "o-1"}}, "wrong_type", "'subject.type'"),
        ({"subject": {"type": "opportunity", "id": ""}}, "missing_field", "'subject.id'"),
        ({"subject": {"type": "opportunity", "id": 1.5}}, "missing_field", "'subject.id'"),
        ({"subject": ["opportunity"]}, "wrong_type", "'subject'"),
    ],
)
def test_a_malformed_subject_is_refused_naming_the_field(change, reason, names):
    event = dict(opportunity_event("e", "x", "o-1"), **change)
    with pytest.raises(BadMessage) as refused:
        decode_triggers(orjson.dumps(event), 1 << 20)
    assert refused.value.reason == reason and names in refused.value.message


# -- context types and definitions ---------------------------------------------------------


def test_contact_is_ordo_s_own_context_type_and_others_come_from_the_setting():
    own = context_types.default_registry()
    assert list(own) == ["contact"]
    assert own["contact"].problem({"id": "c-1", "anything": True}) is None
    assert own["contact"].problem({"first_name": "Ann"}) == "subject must contain ['id'] properties"
    with pytest.raises(PluginError, match="context type plug-in 'hotpath.context_types:CONTACT'.*not a ContextType"):
        context_types.registry(Settings(), "hotpath.context_types:CONTACT")
    with pytest.raises(PluginError, match="context type 'contact' is already declared by"):
        context_types.registry(Settings(), "hotpath.context_types:contact")


def test_a_context_type_needs_a_usable_name_and_schema():
    for name in ("Opportunity", "event", "context", "", "x" * 65):
        with pytest.raises(ValueError, match="lowercase identifier"):
            ContextType(name, {"type": "object"})
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        ContextType("deal", {"type": "thing"})


def test_a_workflow_about_an_unregistered_type_cannot_load_and_says_which_are():
    entry = compile_entry(DEALS, context_types.default_registry())
    assert entry.program is None and entry.subject_type == "opportunity"
    assert "subject: context type 'opportunity' is not registered (registered: contact)" in entry.error
    registry = WorkflowRegistry({"contact": context_types.default_registry()["contact"], "opportunity": OPPORTUNITY})
    registry.load([DEALS, CONTACTS], {"acme"})
    [deals] = registry.candidates("acme", "opportunity.updated")
    assert deals.program is not None and deals.subject_type == deals.program.subject_type == "opportunity"


OPPORTUNITY = ContextType(
    "opportunity",
    {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": ["string", "integer"]}, "stage": {"type": "string"}, "amount": {}},
        "additionalProperties": False,
    },
)


def test_templates_name_the_subject_by_its_type_and_closed_schemas_are_checked_at_load():
    types = {"opportunity": OPPORTUNITY}
    validate(DEALS, types)
    wrong_root = dict(DEALS, steps=[{"id": "s", "type": "set", "values": {"x": "{{contact.first_name}}"}}])
    with pytest.raises(DefinitionError) as refused:
        validate(wrong_root, types)
    assert refused.value.errors == [
        "steps[0] (id 's'): template '{{contact.first_name}}' uses unknown root 'contact' "
        "(expected context, opportunity or event)"
    ]
    typo = dict(DEALS, steps=[{"id": "s", "type": "set", "values": {"x": "{{opportunity.stag}}"}}])
    with pytest.raises(DefinitionError, match="names 'stag', which the opportunity schema does not declare"):
        validate(typo, types)
    validate(typo)  # without the registered types only the form is checked


# -- end to end, with README's how-to installed -------------------------------------------


@pytest.fixture(scope="module")
def crm_pip_installed(tmp_path_factory) -> tuple[Path, Path]:
    """The how-to's package, written as the README has it, and the directory `pip install` put it in."""
    files = readme_how_to("Add a context type", {"test_crm.py", "pyproject.toml", "ordo_crm.py"})
    return pip_install_how_to(tmp_path_factory.mktemp("how-to"), "ordo-crm", files)


@pytest.fixture
def crm(crm_pip_installed, monkeypatch) -> Path:
    """The installed package on sys.path for one test, forgotten afterwards; the project's directory."""
    project, target = crm_pip_installed
    with importable(project, target, monkeypatch):
        yield project


def test_the_how_to_s_own_test_passes(crm, monkeypatch):
    monkeypatch.syspath_prepend(str(crm))  # the author runs their test from the project
    importlib.import_module("test_crm").test_opportunity()


async def _context(h: Harness, execution_id: str) -> dict:
    raw = await h.db.fetchval("SELECT context FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
    return orjson.loads(raw)


async def test_an_opportunity_workflow_end_to_end_beside_old_contact_triggers(
    crm, nats_server_url, pg_dsn, prefix, caplog
):
    won = opportunity_event("deal-1", "opportunity.updated", "o-1", stage="won", amount=1200)
    still_open = opportunity_event("deal-2", "opportunity.updated", "o-2", stage="open")
    lost = opportunity_event("deal-3", "opportunity.updated", "o-3", stage="lost")  # the trigger filter says no
    contact_1_0 = dict(trigger_event("old", 1, tenant="acme"), v=1)
    contact_1_1 = dict(trigger_event("old", 2, tenant="acme"), v="1.1")
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(DEALS)
        await h.deploy(CONTACTS)
        deal_1, deal_2 = (h.execution_id("acme", "deals", e["event_id"]) for e in (won, still_open))
        old_1, old_2 = (h.execution_id("acme", "contacts", e["event_id"]) for e in (contact_1_0, contact_1_1))
        with caplog.at_level("INFO", logger="ordo.context_types"):
            async with h.worker():  # a restart: the worker loads the context types as it starts
                await h.publish_triggers([won, still_open, lost, contact_1_0, contact_1_1])
                for execution_id in (deal_1, deal_2, old_1, old_2):
                    await h.wait_status(execution_id, "waiting")
                assert await _context(h, deal_1) == {"stage": "won", "by": "ann", "path": "won", "amount": 1200}
                assert await _context(h, deal_2) == {"stage": "open", "by": "ann", "path": "open"}
                assert (await _context(h, old_1))["greeting"] == f"Hi {contact_1_0['contact']['first_name']}"
                rows = await h.db.fetch(
                    "SELECT subject_type, subject_id FROM ordo.event_waits ORDER BY subject_type, subject_id"
                )
                assert [tuple(r) for r in rows] == [
                    ("contact", contact_1_0["contact"]["id"]),
                    ("contact", contact_1_1["contact"]["id"]),
                    ("opportunity", "o-1"),
                    ("opportunity", "o-2"),
                ]
                # A contact whose id is the opportunity's: another subject, it wakes no deal.
                touch_contact = dict(trigger_event("touch", 1, tenant="acme", event_type="deal.touched"))
                touch_contact["contact"] = {"id": "o-1"}
                # An event about the first contact wakes only its execution; one about o-1 only the deal.
                touch_old = dict(trigger_event("touch", 2, tenant="acme", event_type="deal.touched"))
                touch_old["contact"] = contact_1_0["contact"]
                touch_deal = opportunity_event("touch-3", "deal.touched", "o-1", stage="won")
                await h.publish_triggers([touch_contact, touch_old])
                await h.wait_status(old_1, "completed")
                await h.publish_triggers([touch_deal])
                await h.wait_status(deal_1, "completed")
                assert (
                    await h.db.fetchval("SELECT status FROM ordo.executions WHERE execution_id = $1::uuid", deal_2)
                    == "waiting"
                )
        assert "context types: contact, opportunity" in caplog.text
        received = await h.db.fetch(
            "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'event_received'", deal_1
        )
        assert [orjson.loads(r["detail"])["event_id"] for r in received] == ["touch-3"]
        stored = await h.db.fetchrow(
            "SELECT subject_type, subject_id, subject, event FROM ordo.executions WHERE execution_id = $1::uuid",
            deal_1,
        )
        assert (stored["subject_type"], stored["subject_id"]) == ("opportunity", "o-1")
        # The record is the event's subject less its type, stored once: in the event (migration 015).
        assert stored["subject"] is None
        subject = subject_from(stored["subject"], orjson.loads(stored["event"]))
        assert subject == {"id": "o-1", "stage": "won", "amount": 1200}
        assert await h.db.fetchval("SELECT count(*) FROM ordo.executions") == 4  # the lost deal enrolled nowhere
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_bad_subject_or_an_unknown_subject_type_is_dead_lettered_and_the_rest_completes(
    crm, nats_server_url, pg_dsn, prefix
):
    workflow = dict(DEALS, steps=[*DEALS["steps"][:4], {"id": "next-update", "type": "end"}])  # no wait
    good = [opportunity_event(f"good-{i}", "opportunity.updated", f"o-{i}", stage="open") for i in range(3)]
    bad_stage = opportunity_event("bad-stage", "opportunity.updated", "o-9", stage="maybe")
    unknown = dict(good[0], event_id="unknown", subject={"type": "invoice", "id": 7})
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow)
        async with h.worker():
            await h.publish_triggers([good[0], bad_stage, good[1], unknown, good[2]])
            for event in good:
                await h.wait_status(h.execution_id("acme", "deals", event["event_id"]), "completed")
            await h.wait_until("SELECT count(*) FROM ordo.dead_letters", expect=2)
        letters = {r["reason"]: r["error"] for r in await h.db.fetch("SELECT reason, error FROM ordo.dead_letters")}
        assert (
            "opportunity 'o-9' fails its schema: subject.stage must be one of ['open', 'won', 'lost']"
            in (letters["invalid_subject"])
        )
        assert (
            "subject type 'invoice' is not a registered context type (registered: contact, opportunity)"
            in (letters["unknown_subject_type"])
        )
        assert await h.db.fetchval("SELECT count(*) FROM ordo.executions") == 3
        assert await h.ledger_problems() == NO_PROBLEMS
