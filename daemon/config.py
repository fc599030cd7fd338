"""Configuration: defaults, then a TOML file, then ORDO_* environment variables.

Secrets (the NATS credentials and the Postgres DSN) come from the file or the
environment only, never from the command line, so they do not show up in `ps`.
"""

import os
import tomllib
from dataclasses import dataclass, fields, replace

DEFAULT_CONFIG_FILE = "/etc/ordo/ordo.toml"


@dataclass(frozen=True)
class Config:
    nats_url: str = ""
    pg_dsn: str = ""
    #: Subject and stream prefix: subjects are `<prefix>.triggers.…`, streams `<PREFIX>_TRIGGERS`.
    prefix: str = "ordo"
    #: Fixed at set-up: an execution's partition is crc32(execution id) % partitions.
    partitions: int = 16
    workers: int = 0  # 0: one per core
    worker_index: int = -1  # -1: the supervisor; >= 0: one worker
    #: JetStream fetch size and the bound on messages held by one worker (backpressure).
    fetch_batch: int = 2048
    max_ack_pending: int = 8192
    ring_capacity: int = 16384
    ack_wait_s: float = 30.0
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
    max_message_bytes: int = 256 * 1024
    #: An execution's context (its variables and step outputs, as JSON) may not
    #: grow past this: the execution that would grow it fails with `context_too_large`.
    max_context_bytes: int = 64 * 1024
    #: Timers due within this horizon are held in memory; the rest stay on disk. Short: each
    #: load reads the whole horizon, and an action step's deadline timer (30 s by default) is
    #: replaced by its result long before it comes within a short horizon.
    timer_horizon_s: float = 5.0
    timer_load_interval_ms: int = 1000
    timer_tick_ms: int = 20
    #: Comma-separated CIDRs the webhook action may reach although they are
    #: private, loopback or link-local (the SSRF guard refuses those otherwise).
    webhook_allow: str = ""
    #: In-process action calls (webhook, log, ...) run at most this many at a time;
    #: fetching pauses while twice as many are queued or running.
    action_concurrency: int = 256
    metrics_port: int = 0  # 0: no metrics endpoint; else base port + worker index
    #: Address of the metrics/health endpoint; loopback unless a remote Prometheus scrapes it.
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    #: For fault tests and soaks only: seeded failures injected into this worker's
    #: NATS publishes/acks and ledger commits, e.g. "seed=7,nats=0.02,pg=0.02". Empty: none.
    inject_faults: str = ""
    data_dir: str = ".ordo"

    def with_(self, **changes) -> "Config":
        return replace(self, **changes)


def _coerce(kind, raw: str):
    if kind is int or kind == "int":
        return int(raw)
    if kind is float or kind == "float":
        return float(raw)
    return raw


def load(path: str | None = None, **overrides) -> Config:
    """Defaults < TOML file (`ORDO_CONFIG` or /etc/ordo/ordo.toml if present) < ORDO_* env < overrides."""
    values: dict = {}
    path = path or os.environ.get("ORDO_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path:
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh))
    known = {f.name: f.type for f in fields(Config)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
    for name, kind in known.items():
        raw = os.environ.get(f"ORDO_{name.upper()}")
        if raw is not None and raw != "":
            values[name] = _coerce(kind, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)
