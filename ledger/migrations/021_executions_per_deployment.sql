-- An execution belongs to the deployment that enrolled it (its subject/stream prefix),
-- as its timers and event waits do since migration 013. Deployments that share a
-- ledger share its executions: before this, `ordo execution cancel`, `ordo signal`
-- and the console of deployment B found an execution of A by its id and sent the
-- message onto B's subjects, where B's owner of that partition number loaded A's
-- row and applied it (and recorded B's stream sequence as the row's last one).
-- They now look here first and refuse (daemon/operator_messages.py).
--
-- The batcher's connection names its deployment in `ordo.deployment`
-- (ledger/batcher.py), and this column's default writes it into each new row:
-- the commit's COPY and its columns are unchanged. A nullable column added
-- without a default rewrites nothing; the default applies to new rows only.
-- NULL: a row written before this migration (ledger/executions.py
-- `deployment_of` takes it as the ledger's one deployment, if it has one).
ALTER TABLE ordo.executions ADD COLUMN deployment text;
ALTER TABLE ordo.executions ALTER COLUMN deployment
    SET DEFAULT nullif(current_setting('ordo.deployment', true), '');
