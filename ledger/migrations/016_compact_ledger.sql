-- Compact writes (issue 15): at most 1 KB of WAL per W1 execution.
--
-- pg_waldump over a W1 run under migration 015 (150,000 executions, each enrolled and
-- completed in one commit) gave 1,320 bytes of WAL per execution: its executions row 573,
-- its one ordo.history row 193, and one B-tree entry (with its share of page splits) in each
-- of five indexes: by subject 142, by created 115, the primary keys of executions and of
-- history 104 each, by workflow 89. The heap and index records are nearly all of it; commit
-- records and full-page images are noise between checkpoints.
--
-- 1. An execution that ends in the commit that enrols it keeps that commit's transitions in
--    its own row, `enrolment_steps` (ordo.history.steps' encoding: [step_id, kind] or
--    [step_id, kind, detail], seq = position), and no ordo.history row: one heap tuple and
--    one primary-key entry less. Their `at` is the row's created_at and their source_seq
--    NULL (an enrolment comes from a trigger, not from the execution stream). A first
--    `started` whose detail names the row's own workflow and version, as every enrolment's
--    does, is written ["", "started"] and read back with that detail.
--    Only for an execution that ended there: one that goes on waiting is updated by later
--    commits, and every update would copy the steps again; it writes ordo.history as before.
--    The column is nullable, without a default: adding it rewrites no row.
ALTER TABLE ordo.executions ADD COLUMN enrolment_steps json;

-- 2. The by-workflow index holds the executions that did not complete. What reads it asks for
--    a workflow's open executions (the console's versions table) or its failed ones (a
--    rollout's judge); a completed execution is found through executions_by_created (tenant,
--    created_at), as the console's searches always did. Building it reads the table once.
DROP INDEX ordo.executions_by_workflow;
CREATE INDEX executions_by_workflow ON ordo.executions (tenant, workflow_id, status) WHERE status <> 'completed';

-- 3. (No DDL.) From here on a new execution's `event` leaves out `tenant` and `event_id` where
--    they are its row's own columns' values: 47 bytes of a W1 row. Every reader puts them back
--    (ledger/executions.py `event_from`, ledger/history.py); rows written before keep them.

-- The transitions of an execution kept in its row, one row per transition, with the
-- columns of ordo.transitions and the row's day (what the archive joins on).
CREATE VIEW ordo.enrolment_transitions AS
SELECT e.execution_id,
       e.ledger_day,
       s.position::int AS seq,
       s.step ->> 0 AS step_id,
       s.step ->> 1 AS kind,
       e.created_at AS at,
       CASE WHEN s.position = 1 AND s.step ->> 1 = 'started' AND json_array_length(s.step) = 2
            THEN jsonb_build_object('workflow_id', e.workflow_id, 'version', e.workflow_version)
            ELSE (s.step -> 2)::jsonb END AS detail,
       NULL::bigint AS source_seq
FROM ordo.executions e
CROSS JOIN LATERAL json_array_elements(e.enrolment_steps) WITH ORDINALITY AS s(step, position);

-- `ordo.transitions` keeps its columns and its rows: `ordo inspect`, `replay`, `check`, the DLQ,
-- export and an operator's own SQL read every transition there, wherever it is stored.
CREATE OR REPLACE VIEW ordo.transitions AS
SELECT h.execution_id,
       (h.first_seq + s.position - 1)::int AS seq,
       s.step ->> 0 AS step_id,
       s.step ->> 1 AS kind,
       h.at,
       (s.step -> 2)::jsonb AS detail,
       h.source_seq
FROM ordo.history h
CROSS JOIN LATERAL json_array_elements(h.steps) WITH ORDINALITY AS s(step, position)
UNION ALL
SELECT execution_id, seq, step_id, kind, at, detail, source_seq
FROM ordo.enrolment_transitions;
