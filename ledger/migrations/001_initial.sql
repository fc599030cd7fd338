-- The ledger: Postgres is the record of truth, JetStream only delivers.

CREATE TABLE ordo.tenants (
    tenant      text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every deployed version of every workflow; a running execution keeps its version.
CREATE TABLE ordo.workflows (
    tenant       text NOT NULL REFERENCES ordo.tenants (tenant),
    workflow_id  text NOT NULL,
    version      int  NOT NULL CHECK (version >= 1),
    definition   jsonb NOT NULL,
    digest       text NOT NULL,
    deployed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, workflow_id, version)
);

-- One row per execution: its current state. The id is derived from
-- (tenant, workflow, trigger event id), so enrolment is idempotent.
CREATE TABLE ordo.executions (
    execution_id      uuid PRIMARY KEY,
    tenant            text NOT NULL,
    workflow_id       text NOT NULL,
    workflow_version  int  NOT NULL,
    contact_id        text NOT NULL,
    event_id          text NOT NULL,
    partition         int  NOT NULL,
    status            text NOT NULL
        CHECK (status IN ('running', 'waiting', 'completed', 'failed', 'cancelled')),
    seq               int  NOT NULL,      -- last transition seq; the optimistic-concurrency check
    pc                int  NOT NULL,
    steps             int  NOT NULL,
    waiting           text,
    -- Highest sequence of the execution stream applied to this execution: a
    -- redelivered message at or below it has committed already.
    last_stream_seq   bigint NOT NULL DEFAULT 0,
    context           jsonb NOT NULL,
    contact           jsonb NOT NULL,
    event             jsonb NOT NULL,
    created_at        timestamptz NOT NULL,
    -- Both are the ledger's clock at commit time, filled in by these defaults
    -- during the batch's COPY (the engine omits the columns), so latency is
    -- measured to the commit. finished_at is given explicitly as NULL for an
    -- execution that has not ended.
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz DEFAULT clock_timestamp()
);
CREATE INDEX executions_by_workflow ON ordo.executions (tenant, workflow_id, status);
CREATE INDEX executions_by_contact ON ordo.executions (tenant, contact_id);

-- Append-only history; (execution_id, seq) is the transition's unique key.
CREATE TABLE ordo.transitions (
    execution_id  uuid NOT NULL,
    seq           int  NOT NULL CHECK (seq >= 1),
    step_id       text NOT NULL,
    kind          text NOT NULL,
    at            timestamptz NOT NULL,
    detail        jsonb,
    PRIMARY KEY (execution_id, seq)
);

-- Partition ownership: a worker claims a partition by bumping its epoch; every
-- commit that touches the partition's executions checks the epoch it holds.
CREATE TABLE ordo.partitions (
    partition   int PRIMARY KEY,
    epoch       bigint NOT NULL DEFAULT 0,
    owner       text,
    claimed_at  timestamptz
);

CREATE TABLE ordo.dead_letters (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,
    error         text NOT NULL,
    tenant        text,
    workflow_id   text,
    execution_id  uuid,
    subject       text NOT NULL,
    stream        text NOT NULL,
    stream_seq    bigint NOT NULL,
    payload       bytea NOT NULL,
    status        text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'retried', 'discarded')),
    UNIQUE (stream, stream_seq, reason, workflow_id)
);
CREATE INDEX dead_letters_open ON ordo.dead_letters (reason) WHERE status = 'open';
