-- Smaller writes per execution (issue 15: WAL per W1 execution).
--
-- An execution's updated_at and finished_at come from the statement that wrote it.
--
-- Until now their defaults were clock_timestamp(), a volatile function, and a
-- COPY that has to evaluate a volatile default inserts its rows one at a time:
-- the workers COPY every execution that a commit enrolls and finishes straight
-- into ordo.executions, so each one cost a WAL record (and a heap insert) of its
-- own. With statement_timestamp() (the start of the COPY, a few milliseconds
-- before its rows are written) Postgres inserts them in batches: one WAL record
-- per heap page of rows. The merge of the slow path keeps clock_timestamp().
ALTER TABLE ordo.executions ALTER COLUMN updated_at SET DEFAULT statement_timestamp();
ALTER TABLE ordo.executions ALTER COLUMN finished_at SET DEFAULT statement_timestamp();

-- A new execution's subject is NULL when it is the one its trigger event names
-- (the event's contact, or its subject less the type): the engine derives it
-- from the event when it loads the row (ledger/executions.py, subject_from), and
-- the row stops carrying the contact twice.
ALTER TABLE ordo.executions ALTER COLUMN subject DROP NOT NULL;
