-- An execution of action steps is updated once per step. Pages filled to the
-- brim (the default) leave no room for the new row version, so every update
-- wrote it to another page and a new entry into each of the table's indexes.
-- With room on the page, and no indexed column changed (status stays
-- 'waiting' from one action step to the next), Postgres updates in place
-- (HOT): no index writes, and the old versions are pruned from the page.
ALTER TABLE ordo.executions SET (fillfactor = 50);
