-- What the workers counted of each rollout stage, per version (issue 16).
--
-- The judge weighed a stage by counting its executions in ordo.executions
-- every second: at 10,000 executions/s a stage of ten minutes is six million
-- rows read each round. Instead each worker counts the executions it enrols
-- and ends in a stage (created at or after the stage began, as before) and adds
-- its counts here once a round; the judge, `ordo rollout status` and the
-- console sum a few rows. A worker that dies loses at most its last second of
-- counts, and a commit is counted once, by the worker whose commit it was.
CREATE TABLE ordo.rollout_counts (
    rollout_id        bigint NOT NULL REFERENCES ordo.rollouts (rollout_id) ON DELETE CASCADE,
    stage_started_at  timestamptz NOT NULL,
    version           int NOT NULL,
    started           bigint NOT NULL DEFAULT 0,
    completed         bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, stage_started_at, version)
);
