-- The operator console (issue 19).
--
-- Every change made through the console (cancel, signal, dead-letter retry) is
-- written here first, with who made it (the token's name) and what it was
-- about, then its outcome once it is done: an interrupted change still leaves
-- its row. The console only inserts and completes rows; nothing deletes them.
CREATE TABLE ordo.console_audit (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    who             text NOT NULL,
    -- The tenant the token is bound to; NULL for an operator token.
    token_tenant    text,
    action          text NOT NULL,
    execution_id    uuid,
    dead_letter_id  bigint,
    detail          jsonb NOT NULL DEFAULT '{}',
    -- NULL while the change runs; 'ok' or the error once it is done.
    outcome         text
);
CREATE INDEX console_audit_by_execution ON ordo.console_audit (execution_id) WHERE execution_id IS NOT NULL;

-- The console lists a tenant's executions newest first, paged by keyset on
-- (created_at, execution_id); an operator's list over all tenants walks this
-- index once per tenant and merges. Without it, a page of a 10M-row ledger
-- sorts the tenant's whole share.
CREATE INDEX executions_by_created ON ordo.executions (tenant, created_at, execution_id);
