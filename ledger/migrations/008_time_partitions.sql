-- Time partitions (issue 15): what grows with traffic, `executions` and
-- `history`, is RANGE-partitioned by day, so that retention drops whole
-- partitions (no DELETE, no vacuum debt) and each day's B-trees stay the size
-- of one day's traffic.
--
-- The key is `ledger_day`, the UTC day of the trigger message's JetStream
-- timestamp (the same on every redelivery, so a redelivered trigger still
-- collides on the primary key, now (execution_id, ledger_day)). An
-- execution's history rows carry its key: one execution sits in one partition.
-- Retention carries what is still open forward into the current day's
-- partition before it drops a day (ledger/partitioning.py).
--
-- The tables as they were become one partition each, `*_legacy`, covering
-- every day up to the migration's: their rows are neither copied nor
-- rewritten (the new column is a constant default), only the primary keys
-- are rebuilt. Retention drops them as a whole, `retention_keep` after the
-- migration. Then the day partitions from the next day on, a week ahead, and
-- a DEFAULT partition that catches a row whose day has no partition yet
-- (`ordo ledger maintain` moves such rows out).
DO $migration$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    day date;
BEGIN
    DROP VIEW ordo.transitions;

    ALTER TABLE ordo.executions RENAME TO executions_legacy;
    ALTER INDEX ordo.executions_by_workflow RENAME TO executions_legacy_by_workflow;
    ALTER INDEX ordo.executions_by_subject RENAME TO executions_legacy_by_subject;
    EXECUTE format('ALTER TABLE ordo.executions_legacy ADD COLUMN ledger_day date NOT NULL DEFAULT %L', today);
    ALTER TABLE ordo.executions_legacy ALTER COLUMN ledger_day DROP DEFAULT;
    ALTER TABLE ordo.executions_legacy DROP CONSTRAINT executions_pkey;
    ALTER TABLE ordo.executions_legacy ADD CONSTRAINT executions_legacy_pkey PRIMARY KEY (execution_id, ledger_day);

    CREATE TABLE ordo.executions (LIKE ordo.executions_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (ledger_day);
    ALTER TABLE ordo.executions ADD PRIMARY KEY (execution_id, ledger_day);
    CREATE INDEX executions_by_workflow ON ordo.executions (tenant, workflow_id, status);
    CREATE INDEX executions_by_subject ON ordo.executions (tenant, subject_type, subject_id);
    -- The executions still running or waiting, which retention carries forward out of a day
    -- it drops: an entry only while an execution is open (a W1 execution, enrolled and
    -- finished in one commit, never has one).
    CREATE INDEX executions_open ON ordo.executions (ledger_day) WHERE status IN ('running', 'waiting');
    EXECUTE format('ALTER TABLE ordo.executions ATTACH PARTITION ordo.executions_legacy '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', today + 1);

    ALTER TABLE ordo.history RENAME TO history_legacy;
    EXECUTE format('ALTER TABLE ordo.history_legacy ADD COLUMN ledger_day date NOT NULL DEFAULT %L', today);
    ALTER TABLE ordo.history_legacy ALTER COLUMN ledger_day DROP DEFAULT;
    ALTER TABLE ordo.history_legacy DROP CONSTRAINT history_pkey;
    ALTER TABLE ordo.history_legacy ADD CONSTRAINT history_legacy_pkey
        PRIMARY KEY (execution_id, first_seq, ledger_day);

    CREATE TABLE ordo.history (LIKE ordo.history_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (ledger_day);
    ALTER TABLE ordo.history ADD PRIMARY KEY (execution_id, first_seq, ledger_day);
    EXECUTE format('ALTER TABLE ordo.history ATTACH PARTITION ordo.history_legacy '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', today + 1);

    CREATE TABLE ordo.executions_default PARTITION OF ordo.executions DEFAULT;
    CREATE TABLE ordo.history_default PARTITION OF ordo.history DEFAULT;
    FOR i IN 1..7 LOOP
        day := today + i;
        EXECUTE format('CREATE TABLE ordo.%I PARTITION OF ordo.executions FOR VALUES FROM (%L) TO (%L)',
                       'executions_' || to_char(day, 'YYYYMMDD'), day, day + 1);
        EXECUTE format('CREATE TABLE ordo.%I PARTITION OF ordo.history FOR VALUES FROM (%L) TO (%L)',
                       'history_' || to_char(day, 'YYYYMMDD'), day, day + 1);
    END LOOP;
END
$migration$;

CREATE VIEW ordo.transitions AS
SELECT h.execution_id,
       (h.first_seq + s.position - 1)::int AS seq,
       s.step ->> 0 AS step_id,
       s.step ->> 1 AS kind,
       h.at,
       (s.step -> 2)::jsonb AS detail,
       h.source_seq
FROM ordo.history h
CROSS JOIN LATERAL json_array_elements(h.steps) WITH ORDINALITY AS s(step, position);
