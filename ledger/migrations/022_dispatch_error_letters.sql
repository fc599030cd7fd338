-- A rollback names the candidate's executions its dispatcher raised on: ledger/rollouts.py
-- `dispatch_errored` reads a workflow's `dispatch_error` letters since its stage began. The
-- dead-letter table had no index for that (only the open letters by reason), so every rollback
-- read all of it: every reason, tenant and workflow, ever. This one holds the dispatch errors
-- alone, in the order the scan asks for them.
CREATE INDEX dead_letters_dispatch_errors ON ordo.dead_letters (tenant, workflow_id, at)
    WHERE reason = 'dispatch_error';
