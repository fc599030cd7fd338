-- Start gates (issue 18): a tenant's enrolment rate and a workflow's max_running reuse the
-- action limits' queue (migration 014). A new execution behind them waits in ordo.limit_queue
-- with the bucket 'enrolments|<tenant>' or 'running|<tenant>|<workflow>' before its first step.
--
-- A running execution holds its 'running|...' slot until it ends, and may meanwhile hold an
-- action's slot too: a slot is now per execution and bucket.
ALTER TABLE ordo.limit_slots DROP CONSTRAINT limit_slots_pkey;
ALTER TABLE ordo.limit_slots ADD PRIMARY KEY (execution_id, bucket);
-- A gate's row has no lease: its slot counts until the execution ends (NULL: 'infinity').
ALTER TABLE ordo.limit_queue ALTER COLUMN lease_ms DROP NOT NULL;
