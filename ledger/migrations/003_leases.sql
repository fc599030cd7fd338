-- Partition ownership by lease (issue 4): a worker owns a partition while its
-- lease is fresh; a worker that stalls or dies loses it when the lease runs
-- out, and the next owner's claim bumps the epoch that fences its commits.

ALTER TABLE ordo.partitions ADD COLUMN lease_until timestamptz;

-- Live workers, for a fair share: partitions / workers with a fresh heartbeat.
CREATE TABLE ordo.workers (
    name          text PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
