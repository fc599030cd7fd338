"""The engine's configuration: defaults, then a TOML file, then ORDO_* environment variables.

The settings an external action worker reads too (NATS, the prefix, the
partitions, ...) and the loader are actions/settings.py's; Config adds the
engine's own. Secrets (the NATS credentials and the Postgres DSN) come from
the file or the environment only, never from the command line, so they do
not show up in `ps`.
"""

from dataclasses import dataclass

from actions import settings
from actions.settings import DEFAULT_CONFIG_FILE, Settings
from ledger import connection

from . import tenant_limits

__all__ = ["DEFAULT_CONFIG_FILE", "Config", "load"]


@dataclass(frozen=True)
class Config(Settings):
    pg_dsn: str = ""
    #: Seconds of silence after which a worker (and `ordo`, `ordo dev`, the console) and Postgres give up
    #: a connection between them (TCP keepalive and TCP_USER_TIMEOUT on both ends, ledger/connection.py):
    #: one cut without a word (a host gone, a NAT or proxy dropping the flow, a failover moving an
    #: address) fails then, and its work is retried on a new one, instead of after the 120 s command
    #: timeout, or ~15 minutes for a COPY. Also how long Postgres may leave sent data unacknowledged, or
    #: stop reading a COPY (a lock wait), before the connection is given up. At least 1.
    pg_tcp_timeout_s: float = connection.TCP_TIMEOUT_S
    workers: int = 0  # 0: one per core
    worker_index: int = -1  # -1: the supervisor; >= 0: one worker
    #: JetStream fetch size and the bound on messages held by one worker (backpressure).
    fetch_batch: int = 2048
    max_ack_pending: int = 8192
    ring_capacity: int = 16384
    ack_wait_s: float = 30.0
    #: Copies JetStream keeps of each of Ordo's streams (and their consumers): 1 on one
    #: server; 3 on a cluster of three or more, so that losing a node loses nothing and
    #: stalls only until the stream elects a new leader. Applied when a worker creates the
    #: streams, and to existing ones at start-up (JetStream changes the count in place).
    stream_replicas: int = 1
    #: Where JetStream places those copies: comma-separated server tags the nodes must all
    #: have (`server_tags` in nats-server's configuration, e.g. "region:eu"); empty: anywhere
    #: in the cluster the worker is connected to. Applied like stream_replicas.
    stream_placement: str = ""
    #: A partition's lease: a worker that stops renewing loses it after lease_ttl_s
    #: (takeover within lease_ttl_s + lease_renew_s).
    lease_ttl_s: float = 10.0
    lease_renew_s: float = 2.0
    #: A ledger batch holds at most this many rows (executions, transitions, dead letters);
    #: it commits as soon as the ledger connection is free, after waiting batch_max_ms for
    #: more (0: no wait: a batch is what came in while the previous commit ran, as Postgres'
    #: own group commit does).
    batch_max_rows: int = 20000
    batch_max_ms: float = 0.0
    #: A pull request delivers at most this many bytes (more than the largest
    #: message a stream takes, 4 x max_message_bytes): with trigger batches of
    #: up to 1,000 events, a count of messages alone would not bound memory.
    fetch_max_bytes: int = 8 * 1024 * 1024
    #: An execution's context (its variables and step outputs, as JSON) may not
    #: grow past this: the execution that would grow it fails with `context_too_large`.
    max_context_bytes: int = 64 * 1024
    #: Timers due within this horizon are held in memory; the rest stay on disk. Short: each
    #: load reads the whole horizon, and an action step's deadline timer (30 s by default) is
    #: replaced by its result long before it comes within a short horizon.
    timer_horizon_s: float = 5.0
    timer_load_interval_ms: int = 1000
    timer_tick_ms: int = 20
    #: In-process calls of one action (webhook, log, ...) that may run at once, to begin with;
    #: each action's limit then follows its latency (daemon/call_limits.py), up to
    #: action_concurrency_max. Fetching pauses while twice the limits are queued or running.
    action_concurrency: int = 256
    action_concurrency_max: int = 4096
    #: More in-process actions besides the installed `ordo.actions` entry points: comma-separated
    #: MODULE:OBJECT, each an Action or a factory of one (actions/plugins.py).
    action_plugins: str = ""
    #: More context types besides the installed `ordo.context_types` entry points: comma-separated
    #: MODULE:OBJECT, each a ContextType or a factory of one (daemon/context_types.py).
    context_type_plugins: str = ""
    metrics_port: int = 0  # 0: no metrics endpoint; else base port + worker index
    #: Address of the metrics/health endpoint; loopback unless a remote Prometheus scrapes it.
    metrics_host: str = "127.0.0.1"
    #: Who may use `ordo console`: comma-separated NAME:SECRET (an operator) or
    #: tenant=TENANT:SECRET (one tenant's executions only); daemon/console/auth.py.
    console_tokens: str = ""
    #: For fault tests and soaks only: seeded failures injected into this worker's
    #: NATS publishes/acks and ledger commits, e.g. "seed=7,nats=0.02,pg=0.02". Empty: none.
    inject_faults: str = ""
    data_dir: str = ".ordo"
    #: How long the ledger keeps finished executions, e.g. "14d" (at least a day): the workers
    #: drop the day partitions older than that (ledger/partitioning.py), after carrying forward
    #: what is still running or waiting. Empty: nothing is dropped (`ordo ledger retention`
    #: still can be run by hand).
    retention_keep: str = ""
    #: How long one ledger day (one partition) lasts: "1d". Shorter days (at least "1m") are for
    #: soaks and tests that show retention at work within minutes, on a fresh ledger only: their
    #: partitions are named by dates counted one per short day (ledger/partitioning.py).
    ledger_day: str = "1d"
    #: The share of executions traced with OpenTelemetry, 0 to 1 (0: tracing off). Which ones is
    #: decided by the execution id, the same on every worker (daemon/tracing.py); needs `ordo[otel]`.
    trace_sample: float = 0.0
    #: Where spans are exported over OTLP/HTTP (protobuf): a collector's base URL; /v1/traces is added.
    otlp_endpoint: str = "http://127.0.0.1:4318"
    #: Trigger lanes (daemon/lanes.py): the triggers stream files each tenant's events under one of
    #: this many lanes, by NATS's partition() of the tenant token. Fixed at set-up, like partitions.
    trigger_lanes: int = 16
    #: Triggers streams (daemon/topology.py): 1 keeps every lane in one stream, which files each
    #: event under its lane itself. N > 1 spreads the lanes over N streams (lane i in stream
    #: i % N), so that a burst in one lane's stream does not hold up the others' PubAcks; the lane
    #: must then be chosen before a stream stores the event, by a subject mapping in the NATS
    #: account (`ordo nats-mapping` prints it), which the workers check at start-up.
    trigger_streams: int = 1
    #: Each busy lane gets trigger_quantum x its weight events per turn of the fair round-robin.
    trigger_quantum: int = 256
    #: A paying tier's share: comma-separated TENANT=WEIGHT (an integer >= 1; others weigh 1).
    #: A lane weighs as much as the heaviest tenant in it. SIGHUP reloads it.
    tenant_weights: str = ""
    #: Limits per tenant (daemon/tenant_limits.py), one entry per line or `;`: an enrolment rate
    #: ("acme enrolments=200/s"), an action's rate and concurrency ("acme action=sms.send rate=50/s"),
    #: a workflow's max_running ("acme workflow=onboarding max_running=100"). SIGHUP reloads it.
    tenant_limits: str = ""


def load(path: str | None = None, **overrides) -> Config:
    """Defaults < TOML file (`ORDO_CONFIG` or /etc/ordo/ordo.toml if present) < ORDO_* env < overrides.

    A setting in the file that Config does not know is an error (a typo).
    """
    config = settings.load(Config, path, **overrides)
    tenant_limits.parse(config.tenant_limits)  # a malformed entry is an error naming it
    if not 1 <= config.trigger_streams <= config.trigger_lanes:
        raise ValueError(
            f"trigger_streams must be between 1 and trigger_lanes ({config.trigger_lanes}), "
            f"not {config.trigger_streams!r}"
        )
    if config.pg_tcp_timeout_s < 1:
        raise ValueError(f"pg_tcp_timeout_s must be at least 1, not {config.pg_tcp_timeout_s!r}")
    if not 0.0 <= config.trace_sample <= 1.0:
        raise ValueError(f"trace_sample must be between 0 and 1, not {config.trace_sample!r}")
    return config
