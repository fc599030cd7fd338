-- Action limits (issue 18): rate and concurrency limits shared by every worker.
--
-- A call of an action step with `limits` first waits its turn here: one row
-- per waiting execution, written by the commit that made it wait (so a worker
-- killed after that commit loses nothing), granted in `id` order per bucket.
-- A bucket is "<action>@<major>|<tenant>[|<key>]". The rate and concurrency
-- ride on each row, as the step that queued it declared them.
CREATE TABLE ordo.limit_queue (
    id            bigserial PRIMARY KEY,
    bucket        text NOT NULL,
    execution_id  uuid NOT NULL UNIQUE,
    step_id       text NOT NULL,
    attempt       int NOT NULL,
    action        text NOT NULL,
    rate_per_s    double precision,
    concurrency   int,
    -- How long a granted call holds its concurrency slot at most (the step's timeout).
    lease_ms      bigint NOT NULL,
    queued_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX limit_queue_by_bucket ON ordo.limit_queue (bucket, id);

-- Each bucket's token bucket: the tokens left when it was last refilled.
CREATE TABLE ordo.limit_buckets (
    bucket       text PRIMARY KEY,
    tokens       double precision NOT NULL,
    refilled_at  timestamptz NOT NULL
);

-- The calls in flight under a concurrency limit: one row per execution, from
-- its grant until the commit that applies its result, timeout or cancel
-- deletes it; a row past `lease_until` no longer counts (its worker died and
-- nothing released it).
CREATE TABLE ordo.limit_slots (
    execution_id  uuid PRIMARY KEY,
    bucket        text NOT NULL,
    lease_until   timestamptz NOT NULL
);
CREATE INDEX limit_slots_by_bucket ON ordo.limit_slots (bucket, lease_until);

-- Rate tokens for calls about to be made (their bucket is the grant bucket's
-- name + '#calls'): up to `p_want` of them, as many as the bucket holds now;
-- when it holds none, `wait` says in how many seconds it will hold one.
-- Grants pace how many calls are let out of the queue; this makes the calls
-- themselves keep the rate, whatever delays them between grant and call.
CREATE FUNCTION ordo.take_limit_tokens(
    p_bucket text, p_rate double precision, p_burst double precision, p_want int,
    OUT taken int, OUT wait double precision
) LANGUAGE plpgsql AS $$
DECLARE
    held double precision;
    since timestamptz;
    at timestamptz;
BEGIN
    INSERT INTO ordo.limit_buckets (bucket, tokens, refilled_at)
    VALUES (p_bucket, p_burst, clock_timestamp()) ON CONFLICT (bucket) DO NOTHING;
    SELECT tokens, refilled_at INTO held, since FROM ordo.limit_buckets WHERE bucket = p_bucket FOR UPDATE;
    -- The time is read once the row is ours: a waiter must not refill for time another has counted.
    at := clock_timestamp();
    held := least(p_burst, held + greatest(0, extract(epoch FROM at - since)) * p_rate);
    taken := least(p_want, floor(held))::int;
    UPDATE ordo.limit_buckets SET tokens = held - taken, refilled_at = at WHERE bucket = p_bucket;
    wait := CASE WHEN taken > 0 THEN 0 ELSE (1 - held) / p_rate END;
END
$$;
