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
-- are rebuilt, and their other indexes (whichever migration made them) are
-- made again on the new tables, whose legacy partitions keep the old ones.
-- Retention drops them as a whole, `retention_keep` after the migration.
-- Then the day partitions from the next day on, a week ahead, and
-- a DEFAULT partition that catches a row whose day has no partition yet
-- (`ordo ledger maintain` moves such rows out).
DO $migration$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    day date;
    tbl text;
    pk text;
    idx record;
BEGIN
    DROP VIEW ordo.transitions;

    FOREACH tbl IN ARRAY ARRAY['executions', 'history'] LOOP
        pk := CASE tbl WHEN 'executions' THEN 'execution_id, ledger_day' ELSE 'execution_id, first_seq, ledger_day' END;
        EXECUTE format('ALTER TABLE ordo.%I RENAME TO %I', tbl, tbl || '_legacy');
        EXECUTE format('ALTER TABLE ordo.%I ADD COLUMN ledger_day date NOT NULL DEFAULT %L', tbl || '_legacy', today);
        EXECUTE format('ALTER TABLE ordo.%I ALTER COLUMN ledger_day DROP DEFAULT', tbl || '_legacy');
        EXECUTE format('ALTER TABLE ordo.%I DROP CONSTRAINT %I', tbl || '_legacy', tbl || '_pkey');
        EXECUTE format('ALTER TABLE ordo.%I ADD CONSTRAINT %I PRIMARY KEY (%s)', tbl || '_legacy', tbl || '_legacy_pkey', pk);

        EXECUTE format('CREATE TABLE ordo.%I (LIKE ordo.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                       'PARTITION BY RANGE (ledger_day)', tbl, tbl || '_legacy');
        EXECUTE format('ALTER TABLE ordo.%I ADD PRIMARY KEY (%s)', tbl, pk);
        -- Every other index of the table (whichever migrations made) moves to the new table under its
        -- name; the old one, renamed, becomes its legacy partition's index when it is attached.
        FOR idx IN SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS def
                   FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE i.indrelid = format('ordo.%I', tbl || '_legacy')::regclass AND NOT i.indisprimary LOOP
            EXECUTE format('ALTER INDEX ordo.%I RENAME TO %I', idx.name, idx.name || '_legacy');
            EXECUTE replace(idx.def, format(' ON ordo.%s_legacy USING ', tbl), format(' ON ordo.%s USING ', tbl));
        END LOOP;
        IF tbl = 'executions' THEN
            -- The executions still running or waiting, which retention carries forward out of a day
            -- it drops: an entry only while an execution is open (a W1 execution, enrolled and
            -- finished in one commit, never has one).
            CREATE INDEX executions_open ON ordo.executions (ledger_day) WHERE status IN ('running', 'waiting');
        END IF;
        EXECUTE format('ALTER TABLE ordo.%I ATTACH PARTITION ordo.%I FOR VALUES FROM (MINVALUE) TO (%L)',
                       tbl, tbl || '_legacy', today + 1);
        EXECUTE format('CREATE TABLE ordo.%I PARTITION OF ordo.%I DEFAULT', tbl || '_default', tbl);
        FOR i IN 1..7 LOOP
            day := today + i;
            EXECUTE format('CREATE TABLE ordo.%I PARTITION OF ordo.%I FOR VALUES FROM (%L) TO (%L)',
                           tbl || '_' || to_char(day, 'YYYYMMDD'), tbl, day, day + 1);
        END LOOP;
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
