-- Rollouts of a candidate engine (a dispatcher build shipped beside Ordo's own), issue 16.
--
-- An engine rollout keeps the workflow's version and changes the build that runs it:
-- `engine` names the candidate (daemon/engines.py: compiled, pure, an `ordo.engines`
-- entry point or module:PACKAGE.MODULE), and its baseline and candidate are the same
-- version. NULL: a rollout of a version, as before. Its counts (ordo.rollout_counts,
-- migration 018) keep the baseline's under that version and the candidate engine's
-- under version 0, which no workflow has (versions start at 1).
ALTER TABLE ordo.rollouts ADD COLUMN engine text;
ALTER TABLE ordo.rollouts DROP CONSTRAINT rollouts_check;
ALTER TABLE ordo.rollouts ADD CONSTRAINT rollouts_candidate_differs
    CHECK (to_version <> from_version OR engine IS NOT NULL);

-- The engine an execution was enrolled on, written with its enrolment and kept to its end:
-- every later step, on any worker, after a restart and in a replay runs on it. NULL (every
-- execution outside an engine rollout, and every row written before this migration): the
-- worker's own build. A nullable column without a default: adding it rewrites nothing.
ALTER TABLE ordo.executions ADD COLUMN engine text;
