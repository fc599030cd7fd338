-- A watermark counts sequences of one particular stream. If the execution
-- stream is recreated (purged by hand, a new cluster), its sequences start
-- again and an old watermark would skip the new stream's first messages:
-- remember which stream (its creation time) the watermark belongs to.
ALTER TABLE ordo.partitions ADD COLUMN stream_created text;
