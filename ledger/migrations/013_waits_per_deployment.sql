-- Timers and event waits belong to a deployment (its subject/stream prefix),
-- as its partitions and workers do since migration 011. Before this, the
-- timers walk read `(partition, fire_at)` of the whole ledger: a worker fired
-- the timers of another deployment's executions that fell in a partition
-- number it owned, onto its own execution stream, and a trigger routed its
-- event to the executions of another deployment waiting for it.
--
-- The batcher writes the committing worker's deployment into each row (an
-- execution is only ever committed by its own deployment's owner). The walk's
-- index keeps its order, now within a deployment: (deployment, partition,
-- fire_at). The event waits keep their index: a key (tenant, subject, event
-- type) has a row or two, and the deployment is checked on them.
--
-- The rows of before belong to the ledger's one deployment if it has exactly
-- one (the usual case); otherwise to none yet (''): the first deployment
-- to start while it is the only one adopts them (ledger/timers.py, adopt).
-- Where several deployments shared the ledger before, no one can tell whose
-- they were: `ordo check` counts them (waits_no_deployment).

ALTER TABLE ordo.timers ADD COLUMN deployment text NOT NULL DEFAULT '';
ALTER TABLE ordo.timers ALTER COLUMN deployment DROP DEFAULT;
ALTER TABLE ordo.event_waits ADD COLUMN deployment text NOT NULL DEFAULT '';
ALTER TABLE ordo.event_waits ALTER COLUMN deployment DROP DEFAULT;

UPDATE ordo.timers SET deployment = (SELECT min(deployment) FROM ordo.partitions)
WHERE (SELECT count(DISTINCT deployment) FROM ordo.partitions) = 1;
UPDATE ordo.event_waits SET deployment = (SELECT min(deployment) FROM ordo.partitions)
WHERE (SELECT count(DISTINCT deployment) FROM ordo.partitions) = 1;

DROP INDEX ordo.timers_due;
CREATE INDEX timers_due ON ordo.timers (deployment, partition, fire_at);
