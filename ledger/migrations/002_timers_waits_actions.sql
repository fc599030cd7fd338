-- Actions, waits, timers and signals (issue 3).

-- The dispatcher's runtime state beyond pc/seq: the current action attempt,
-- the one timer the execution waits on, per-step visit counts (loop guard and
-- idempotency keys) and the failed attempts of the current step.
ALTER TABLE ordo.executions ADD COLUMN runtime jsonb NOT NULL DEFAULT '{}';

-- Durable timers: at most one per execution (a wait, a retry back-off, an
-- action deadline or an event timeout). A million waiting executions cost a
-- million rows here, not worker memory: a worker loads only the timers of
-- its partitions that are due soon.
CREATE TABLE ordo.timers (
    execution_id  uuid PRIMARY KEY,
    partition     int  NOT NULL,
    timer_id      text NOT NULL,
    fire_at       timestamptz NOT NULL,
    purpose       text NOT NULL,
    step_id       text NOT NULL
);
CREATE INDEX timers_due ON ordo.timers (partition, fire_at);

-- Executions waiting for an event (wait_for_event), looked up in batches by
-- the trigger path to route arriving events onto the executions' subjects.
CREATE TABLE ordo.event_waits (
    execution_id  uuid PRIMARY KEY,
    tenant        text NOT NULL,
    contact_id    text NOT NULL,
    event_type    text NOT NULL,
    step_id       text NOT NULL
);
CREATE INDEX event_waits_by_contact ON ordo.event_waits (tenant, contact_id, event_type);

-- A failed step's dead letter names the step and carries its attempt history.
ALTER TABLE ordo.dead_letters ADD COLUMN step_id text;
ALTER TABLE ordo.dead_letters ADD COLUMN attempts jsonb;
ALTER TABLE ordo.dead_letters ADD COLUMN retried_at timestamptz;

-- A step that fails on a timer (an action deadline) has no stream sequence of
-- its own: its letter is keyed by the execution and the failing transition's
-- seq, so the unique key must include the execution (NULL for message letters).
ALTER TABLE ordo.dead_letters DROP CONSTRAINT dead_letters_stream_stream_seq_reason_workflow_id_key;
ALTER TABLE ordo.dead_letters ADD CONSTRAINT dead_letters_source_key
    UNIQUE NULLS NOT DISTINCT (stream, stream_seq, reason, workflow_id, execution_id);

-- The execution-stream sequence of the message a transition came from (NULL
-- for an enrolment or a timer). Within one execution it never decreases: the
-- invariant checker reads "applied in publish order" straight off the ledger.
ALTER TABLE ordo.transitions ADD COLUMN source_seq bigint;

-- Progress in the ledger: every message of the partition's execution stream
-- at or below this sequence has settled (committed, deduplicated or dead-
-- lettered). Written in the same transaction as the transitions it covers; a
-- worker that claims the partition resumes its consumer right after it, so
-- the per-execution order is the stream's order whatever JetStream redelivers.
ALTER TABLE ordo.partitions ADD COLUMN watermark bigint NOT NULL DEFAULT 0;
