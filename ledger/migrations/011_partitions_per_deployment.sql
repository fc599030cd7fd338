-- Partitions and live workers belong to a deployment (its subject/stream
-- prefix): two deployments on one ledger each have partitions 0..n-1 of
-- their own execution stream, with their own leases, epochs and watermarks,
-- and a worker's fair share counts only the live workers of its deployment.
-- Before this, they claimed each other's partitions, halved each other's
-- share and reset each other's watermarks (another stream's, to them).
--
-- The rows of before belong to no deployment yet (''): the first deployment
-- whose workers start with none of their own adopts them, epochs and
-- watermarks included (ledger/leases.py, create_partitions).

ALTER TABLE ordo.partitions ADD COLUMN deployment text NOT NULL DEFAULT '';
ALTER TABLE ordo.partitions ALTER COLUMN deployment DROP DEFAULT;
ALTER TABLE ordo.partitions DROP CONSTRAINT partitions_pkey;
ALTER TABLE ordo.partitions ADD PRIMARY KEY (deployment, partition);

ALTER TABLE ordo.workers ADD COLUMN deployment text NOT NULL DEFAULT '';
ALTER TABLE ordo.workers ALTER COLUMN deployment DROP DEFAULT;
ALTER TABLE ordo.workers DROP CONSTRAINT workers_pkey;
ALTER TABLE ordo.workers ADD PRIMARY KEY (deployment, name);
