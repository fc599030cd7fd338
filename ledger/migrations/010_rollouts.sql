-- Progressive rollouts of a workflow version, and their logged transitions.
--
-- A rollout moves the new executions of one workflow from a baseline version
-- to a candidate version in stages (shares of new executions, in basis points:
-- 100 = 1%). The workers read the rollouts of the ledger and choose, at
-- enrolment, the version of each new execution from its id and the current
-- share; the execution keeps that version in executions.workflow_version.
CREATE TABLE ordo.rollouts (
    rollout_id           bigserial PRIMARY KEY,
    tenant               text NOT NULL,
    workflow_id          text NOT NULL,
    from_version         int  NOT NULL,
    to_version           int  NOT NULL CHECK (to_version <> from_version),
    -- The candidate's share at each stage, ascending, the last one 10000 (all); the first may be 0
    -- (shadow only) when shadow_share is above 0.
    stages               int[] NOT NULL,
    stage                int  NOT NULL DEFAULT 0,
    -- The candidate's share now: stages[stage + 1] while running or paused, 10000 once
    -- completed, 0 once rolled back or aborted.
    share                int  NOT NULL CHECK (share BETWEEN 0 AND 10000),
    -- The share of new executions on the baseline that the candidate also runs beside, in shadow.
    shadow_share         int  NOT NULL DEFAULT 0 CHECK (shadow_share BETWEEN 0 AND 10000),
    min_dwell_s          double precision NOT NULL CHECK (min_dwell_s >= 0),
    min_sample           int  NOT NULL CHECK (min_sample >= 1),
    -- Thresholds: how far the candidate may be worse than the baseline (NULL: not checked).
    max_failure_rate     double precision,
    max_p99_ms           double precision,
    max_divergence_rate  double precision,
    state                text NOT NULL
        CHECK (state IN ('running', 'paused', 'completed', 'rolled_back', 'aborted')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    stage_started_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant, workflow_id, from_version) REFERENCES ordo.workflows (tenant, workflow_id, version),
    FOREIGN KEY (tenant, workflow_id, to_version) REFERENCES ordo.workflows (tenant, workflow_id, version)
);
-- At most one rollout of a workflow in progress.
CREATE UNIQUE INDEX rollouts_in_progress ON ordo.rollouts (tenant, workflow_id) WHERE state IN ('running', 'paused');

-- Every change of a rollout, by whom and why, with the values it was decided on.
CREATE TABLE ordo.rollout_transitions (
    rollout_id    bigint NOT NULL REFERENCES ordo.rollouts (rollout_id),
    seq           int    NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),
    action        text   NOT NULL
        CHECK (action IN ('started', 'advanced', 'paused', 'resumed', 'completed', 'rolled_back', 'aborted')),
    share_before  int    NOT NULL,
    share_after   int    NOT NULL,
    actor         text   NOT NULL,
    reason        text   NOT NULL,
    detail        jsonb,
    PRIMARY KEY (rollout_id, seq)
);

-- Shadow runs: for a share of new executions on the baseline, the candidate ran beside
-- the primary on the same inputs with its effects dropped, and its decisions were
-- compared with the primary's. 'pending': the same so far, the primary has not ended
-- yet (its whole history is replayed through the candidate once it has). A run that
-- diverged keeps the first transition where the two differ.
CREATE TABLE ordo.shadow_runs (
    rollout_id          bigint NOT NULL REFERENCES ordo.rollouts (rollout_id),
    execution_id        uuid   NOT NULL,
    at                  timestamptz NOT NULL DEFAULT now(),
    outcome             text   NOT NULL CHECK (outcome IN ('pending', 'identical', 'diverged', 'error')),
    compared            int    NOT NULL DEFAULT 0,
    seq                 int,
    step_id             text,
    primary_decision    jsonb,
    candidate_decision  jsonb,
    error               text,
    PRIMARY KEY (rollout_id, execution_id)
);
CREATE INDEX shadow_runs_pending ON ordo.shadow_runs (rollout_id) WHERE outcome = 'pending';
