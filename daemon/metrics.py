"""Prometheus metrics of one worker process (served on base port + worker index).

Labels stay bounded: reasons, kinds and outcomes, never execution or contact ids.
"""

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

triggers_received = Counter("ordo_triggers_received_total", "Trigger events taken from JetStream.")
triggers_unmatched = Counter("ordo_triggers_unmatched_total", "Trigger events that matched no workflow.")
enrolments = Counter("ordo_enrolments_total", "Enrolments by outcome.", ["outcome"])  # enrolled | deduplicated
exec_messages = Counter("ordo_exec_messages_total", "Messages on execution subjects by outcome.", ["outcome"])
transitions = Counter("ordo_transitions_total", "Transitions committed to the ledger.")
executions_finished = Counter("ordo_executions_finished_total", "Executions that reached an end.", ["status"])
dead_letters = Counter("ordo_dead_letters_total", "Dead-letter entries by reason.", ["reason"])
redeliveries = Counter("ordo_redeliveries_total", "Messages JetStream delivered more than once.", ["stream"])
commit_seconds = Histogram("ordo_ledger_commit_seconds", "Ledger batch commit latency.", buckets=COMMIT_BUCKETS)
commit_rows = Histogram(
    "ordo_ledger_batch_rows", "Rows per ledger batch.", buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000)
)
commit_retries = Counter("ordo_ledger_commit_retries_total", "Commit attempts that failed and were retried.")
fenced = Counter("ordo_fenced_commits_total", "Commits refused because partition ownership moved.")
fetch_seconds = Histogram("ordo_nats_fetch_seconds", "JetStream fetch latency.", ["stream"], buckets=COMMIT_BUCKETS)
ack_seconds = Histogram(
    "ordo_nats_ack_seconds",
    "From a committed batch's first ack being written until NATS has all of its acks (a PING/PONG after them).",
    buckets=COMMIT_BUCKETS,
)
acks_not_sent = Counter(
    "ordo_acks_not_sent_total",
    "Acks or naks of committed messages that could not be written to NATS (the message is redelivered and deduped).",
)
consumers_created_again = Counter(
    "ordo_consumers_created_again_total",
    "Consumers of this worker's partitions and trigger lanes that JetStream no longer had (deleted, or lost"
    " with a server's state), created again where their work had settled.",
    ["kind"],
)
in_flight = Gauge("ordo_messages_in_flight", "Messages fetched and not yet acked.")
ring_occupancy = Gauge("ordo_ring_occupancy", "Items held by the ordering ring.")
owned_partitions = Gauge("ordo_owned_partitions", "Partitions this worker owns.")
ledger_default_rows = Gauge(
    "ordo_ledger_default_partition_rows",
    "Rows in a ledger table's DEFAULT partition (a day with no partition; the upkeep moves them out).",
    ["table"],
)
ledger_upkeep = Counter("ordo_ledger_upkeep_total", "Ledger upkeep runs by outcome.", ["outcome"])
ledger_retention_dropped = Counter(
    "ordo_ledger_retention_dropped_executions",
    "Finished executions dropped by retention with their day partitions (`retention_keep`).",
)


events_routed = Counter("ordo_events_routed_total", "Trigger events handed to executions waiting for them.")
timers_pending = Gauge("ordo_timers_pending", "Timers due within the horizon, held in memory.")
timer_lateness = Histogram("ordo_timer_lateness_seconds", "How late a timer fired.", buckets=COMMIT_BUCKETS)
timers_deferred = Counter(
    "ordo_timers_deferred_total",
    "Timer fires put off because their execution's stored row cannot be read (tried again a minute later).",
)
stale_applied_again = Counter(
    "ordo_stale_applied_again_total",
    "Messages whose execution changed in the ledger between their load and their commit, applied again.",
)

end_to_end_seconds = Histogram(
    "ordo_end_to_end_seconds",
    "Trigger event ts to the commit that ended its execution.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
actions = Counter(
    "ordo_actions_total",
    "Action results applied, by action and outcome (ok, retryable error, final error, late).",
    ["action", "outcome"],
)
# Action limits (daemon/limits.py, ledger/limits.py).
limit_waiting = Gauge(
    "ordo_limit_waiting", "Calls queued behind an action's limits, per action (the ledger's queue).", ["action"]
)
limit_waits = Counter("ordo_limit_waits_total", "Calls of limited action steps queued for their turn.", ["action"])
limit_grants = Counter(
    "ordo_limit_tokens_granted_total", "Queued calls granted their turn (a rate token and/or a slot).", ["action"]
)
# Start gates (a tenant's enrolment rate): only tenants with a rate set and executions waiting at it.
tenant_enrolment_waiting = Gauge(
    "ordo_tenant_enrolment_waiting", "New executions waiting at their tenant's enrolment rate.", ["tenant"]
)
tenant_enrolment_behind = Gauge(
    "ordo_tenant_enrolment_behind_seconds",
    "How long the oldest new execution waiting at its tenant's enrolment rate has waited.",
    ["tenant"],
)
action_concurrency_limit = Gauge(
    "ordo_action_concurrency_limit",
    "In-process calls of an action that may run at once in this worker, following its latency (daemon/call_limits.py).",
    ["action"],
)
actions_in_process = Gauge("ordo_actions_in_process", "In-process action calls queued or running in this worker.")
actions_expired_queued = Counter(
    "ordo_actions_expired_queued_total",
    "In-process action calls not made because their deadline passed while they waited for a slot.",
    ["action"],
)
action_stage_seconds = Histogram(
    "ordo_action_stage_seconds",
    "The stages of an in-process action step: queued (request committed -> call started), call (started -> "
    "result), apply (result -> committed, results applied by this worker).",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
local_results = Counter(
    "ordo_local_results_total",
    "In-process action results: applied by this worker (local), or published to the execution's subject because "
    "it was draining, no longer owned the partition, or its ring was full.",
    ["outcome"],
)
resident_executions = Gauge(
    "ordo_resident_executions", "Executions kept in memory between their messages (waiting for a local result)."
)
resident_reads = Counter(
    "ordo_execution_reads_total",
    "Executions a dispatch needed, by where they came from (memory or ledger).",
    ["source"],
)
advance_seconds = Histogram(
    "ordo_advance_seconds",
    "Dispatcher time to advance one execution for one message or timer (all its steps).",
    buckets=(0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1),
)


def observe_all(histogram: Histogram, values) -> None:
    """`histogram.observe(v)` for every v, with one increment per bucket touched instead of per value.

    Each observation takes the sum's lock and a bucket's; at thousands of
    executions a second per worker that showed up in profiles.
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        counts[bisect_left(bounds, value)] += 1
        total += value
    if not any(counts):
        return
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class Observations:
    """Values for a histogram, gathered in a list and observed in bulk by `flush` (or every `size`)."""

    def __init__(self, histogram: Histogram, size: int = 4096):
        self.histogram = histogram
        self._size = size
        self._values: list = []

    def add(self, value: float) -> None:
        self._values.append(value)
        if len(self._values) >= self._size:
            self.flush()

    def flush(self) -> None:
        if self._values:
            values, self._values = self._values, []
            observe_all(self.histogram, values)


#: The dispatcher's timings, handed to advance_seconds once per fetched batch.
advance_timings = Observations(advance_seconds)
#: The stages of in-process action steps, handed to action_stage_seconds once per committed batch.
action_queued_timings = Observations(action_stage_seconds.labels("queued"))
action_call_timings = Observations(action_stage_seconds.labels("call"))
action_apply_timings = Observations(action_stage_seconds.labels("apply"))
consumer_lag = Gauge("ordo_consumer_lag", "Messages waiting in JetStream for this worker's consumers.", ["stream"])
injected_faults = Counter(
    "ordo_injected_faults_total",
    "Faults injected on purpose by the inject_faults setting (soaks and tests only).",
    ["kind"],
)

rollout_started_total = Counter(
    "ordo_rollout_started_total",
    "New executions of workflows under rollout, by workflow (tenant/id) and the version chosen for them "
    "(a duplicate trigger counts again).",
    ["workflow", "version"],
)
rollout_ended_total = Counter(
    "ordo_rollout_ended_total",
    "Executions of a rollout's stage that ended, by workflow (tenant/id), version and status (completed, "
    "failed): the numbers the rollout is judged on, as this worker counted them.",
    ["workflow", "version", "status"],
)
rollout_execution_seconds = Histogram(
    "ordo_rollout_execution_seconds",
    "How long the executions of a rollout's stage took, enrolment to end, by workflow (tenant/id) and "
    "version: the candidate's latency beside the baseline's.",
    ["workflow", "version"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400),
)
rollout_share = Gauge(
    "ordo_rollout_candidate_share",
    "The share of new executions (0 to 1) that the candidate of the workflow's last rollout takes now.",
    ["workflow"],
)
rollout_rolled_back = Gauge(
    "ordo_rollout_rolled_back",
    "1 while the workflow's last rollout is rolled back automatically (an alert: see `ordo rollout status`).",
    ["workflow"],
)
shadow_runs = Counter(
    "ordo_shadow_runs_total",
    "Shadow runs of rollout candidates beside new executions, by outcome at enrolment (identical, diverged, "
    "error, pending: the same so far, replayed once the execution ends) or dropped (the buffer was full).",
    ["outcome"],
)
#: Its children, bound once: a shadow run is counted at enrolment.
shadow_outcomes = {o: shadow_runs.labels(o) for o in ("identical", "diverged", "error", "pending", "dropped")}
rollout_decisions = Counter(
    "ordo_rollout_decisions_total",
    "Rollout changes made by this worker's controller, by action (advanced, completed, rolled_back).",
    ["action"],
)

_action_outcomes: dict = {}
_rollout_started: dict = {}


def rollout_started(tenant: str, workflow_id: str, version: int | str):
    """ordo_rollout_started_total's child for the workflow and version ('3', or '3@pure' on a candidate
    engine), bound once."""
    key = (tenant, workflow_id, version)
    child = _rollout_started.get(key)
    if child is None:
        child = _rollout_started[key] = rollout_started_total.labels(f"{tenant}/{workflow_id}", str(version))
    return child


def action_outcome(action: str, outcome: str):
    """ordo_actions_total's child for (action, outcome), bound once: `.labels()` per result showed in profiles."""
    child = _action_outcomes.get((action, outcome))
    if child is None:
        child = _action_outcomes[(action, outcome)] = actions.labels(action, outcome)
    return child


# Children bound once: `.labels()` on every message showed up in profiles.
enrolled = enrolments.labels("enrolled")
deduplicated = enrolments.labels("deduplicated")
exec_applied = exec_messages.labels("applied")
exec_duplicate = exec_messages.labels("duplicate")
fetch_triggers_seconds = fetch_seconds.labels("triggers")
fetch_exec_seconds = fetch_seconds.labels("exec")
local_applied = local_results.labels("local")
local_published_draining = local_results.labels("published_draining")
local_published_not_owner = local_results.labels("published_not_owner")
local_published_ring_full = local_results.labels("published_ring_full")
read_resident = resident_reads.labels("memory")
read_ledger = resident_reads.labels("ledger")

# Every end an execution can reach exports a series from the start, so that the
# failure rate (failed / finished) reads 0 rather than "no data" before the first failure.
for _status in ("completed", "failed", "cancelled"):
    executions_finished.labels(_status)

# Trigger lanes (daemon/lanes.py): labelled by lane number, so at most `trigger_lanes` children each.
lane_taken = Counter("ordo_trigger_lane_taken_total", "Trigger events taken from each lane.", ["lane"])
lane_backlog = Gauge("ordo_trigger_lane_backlog", "Trigger messages waiting in each lane this worker takes.", ["lane"])
lane_behind = Gauge(
    "ordo_trigger_lane_behind_seconds",
    "How far behind each lane with a backlog is: now minus when the newest trigger taken from it was stored.",
    ["lane"],
)
