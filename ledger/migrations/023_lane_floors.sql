-- Where each trigger lane had settled (its consumer's ack floor: everything at or below it
-- enrolled, routed, committed and acked), as the worker taking it last measured it. A lane's
-- consumers keep their state in JetStream's memory, not on its disk (each durable consumer's
-- state written and fsynced up to ten times a second outnumbered the stream's own synchronous
-- writes under many quiet tenants); when a server restart loses them, the lane resumes after
-- this. `stream_created` names the triggers stream the sequence counts in: a stream created
-- again starts its sequences again, and an older floor would skip its first triggers.
CREATE TABLE ordo.lane_floors (
    deployment text NOT NULL,
    lane int NOT NULL,
    stream_created text NOT NULL,
    settled bigint NOT NULL,
    PRIMARY KEY (deployment, lane)
);
