-- What retention dropped (issue 15): one row per day partition it dropped, with the number of
-- finished executions that went with it. The ledger keeps the account of what it no longer holds:
-- an operator sees when each day went, and a soak run with minute-long retention checks that
-- every execution it enrolled is either still in the ledger or counted here.
CREATE TABLE ordo.retention_drops (
    dropped_at  timestamptz NOT NULL DEFAULT now(),
    partition   text        NOT NULL,
    low         date,
    high        date,
    executions  bigint      NOT NULL
);
