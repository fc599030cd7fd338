-- One history row per execution per commit, instead of one row per transition.
--
-- A commit records an execution's transitions as a run of consecutive seqs, all
-- at the same time and from the same source message. Storing that run as one
-- row (a JSON array of [step_id, kind] or [step_id, kind, detail], seq =
-- first_seq + position) writes one heap tuple and one index entry where there
-- were one per transition: W1 went from 11 WAL records and ~2.2 KB of WAL per
-- execution to about half of that (bench: the WAL line).
--
-- `ordo.transitions` stays, as a view with the columns and rows it always had,
-- so `ordo inspect`, `replay`, `check`, the DLQ and an operator's own SQL read
-- it unchanged. The engine writes `ordo.history` only.
CREATE TABLE ordo.history (
    execution_id  uuid NOT NULL,
    first_seq     int  NOT NULL CHECK (first_seq >= 1),
    at            timestamptz NOT NULL,
    source_seq    bigint,
    steps         json NOT NULL,
    PRIMARY KEY (execution_id, first_seq)
);

INSERT INTO ordo.history (execution_id, first_seq, at, source_seq, steps)
SELECT execution_id, seq, at, source_seq,
       CASE WHEN detail IS NULL THEN json_build_array(json_build_array(step_id, kind))
            ELSE json_build_array(json_build_array(step_id, kind, detail)) END
FROM ordo.transitions;

DROP TABLE ordo.transitions;

CREATE VIEW ordo.transitions AS
SELECT h.execution_id,
       (h.first_seq + s.position - 1)::int AS seq,
       s.step ->> 0 AS step_id,
       s.step ->> 1 AS kind,
       h.at,
       (s.step -> 2)::jsonb AS detail,
       h.source_seq
FROM ordo.history h
CROSS JOIN LATERAL json_array_elements(h.steps) WITH ORDINALITY AS s(step, position);
