-- Timers at scale (issue 15): a worker walks each of its partitions' timers in
-- (fire_at, execution_id) order, every page starting right after the row the
-- previous one ended on (ledger/timers.py), instead of reading all the timers
-- due within its horizon at every load. The execution id in the index makes
-- the walk's order total, so a page ends on a row even where thousands of
-- timers share one fire_at ("wait until 9:00"), and each page is an index
-- range read in order, with no sort.
DROP INDEX ordo.timers_due;
CREATE INDEX timers_due ON ordo.timers (partition, fire_at, execution_id);
