"""Naming and identity: ids and partitions are a contract, they must never drift."""

import uuid

from hypothesis import given
from hypothesis import strategies as st

from daemon.config import Config
from daemon.topology import EXECUTION_NAMESPACE, Topology, execution_id_for, partition_of


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_execution_id_is_uuid5_of_tenant_workflow_and_event(tenant, workflow_id, event_id):
    expected = uuid.uuid5(EXECUTION_NAMESPACE, f"{tenant}\x1f{workflow_id}\x1f{event_id}")
    assert execution_id_for(tenant, workflow_id, event_id) == str(expected)


def test_known_ids_and_partitions_stay_fixed():
    # Changing either would re-route live executions: pinned on purpose.
    assert execution_id_for("acme", "welcome", "evt-1") == "b8fab159-f511-50ca-9fbe-c6b1265d84b9"
    assert partition_of("b8fab159-f511-50ca-9fbe-c6b1265d84b9", 16) == 3


def test_subjects_and_streams_follow_the_prefix():
    t = Topology(Config(prefix="ordo", partitions=16))
    eid = execution_id_for("acme", "welcome", "evt-1")
    assert t.trigger_subject("acme", "contact.created") == "ordo.triggers.acme.contact.created"
    assert t.exec_subject(eid) == f"ordo.exec.{partition_of(eid, 16)}.{eid}"
    assert (t.triggers_stream, t.exec_stream, t.dlq_stream) == ("ORDO_TRIGGERS", "ORDO_EXEC", "ORDO_DLQ")
