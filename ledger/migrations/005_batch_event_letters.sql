-- A trigger batch message carries many events; each bad event is dead-lettered
-- alone. Its letter names its place in the batch (NULL for a whole message),
-- and the unique key includes it, or two bad events of one batch with the
-- same reason would be one letter.
ALTER TABLE ordo.dead_letters ADD COLUMN batch_index integer;
ALTER TABLE ordo.dead_letters DROP CONSTRAINT dead_letters_source_key;
ALTER TABLE ordo.dead_letters ADD CONSTRAINT dead_letters_source_key
    UNIQUE NULLS NOT DISTINCT (stream, stream_seq, batch_index, reason, workflow_id, execution_id);
