"""Settings: defaults, then a TOML file, then ORDO_* environment variables.

The engine and external action workers read the same file and environment.
The settings an action worker needs are defined here, once; the engine's
Config (daemon/config.py) extends them with its own. Secrets (the NATS
credentials and the Postgres DSN) come from the file or the environment
only, never from the command line, so they do not show up in `ps`.
"""

import os
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Self, TypeVar

from .logs import FORMATS as LOG_FORMATS

DEFAULT_CONFIG_FILE = "/etc/ordo/ordo.toml"


@dataclass(frozen=True)
class Settings:
    """What an action worker reads: where NATS is, the naming, the size of a message, the logs."""

    #: One server, or every node of a cluster comma-separated (nats://a:4222,nats://b:4222):
    #: the client then connects to any that answers and fails over to the others.
    nats_url: str = ""
    #: Subject and stream prefix: subjects are `<prefix>.triggers.…`, streams `<PREFIX>_TRIGGERS`.
    prefix: str = "ordo"
    #: Fixed at set-up: an execution's partition is crc32(execution id) % partitions.
    partitions: int = 16
    max_message_bytes: int = 256 * 1024
    #: Comma-separated CIDRs the webhook action may reach although they are
    #: private, loopback or link-local (the SSRF guard refuses those otherwise).
    webhook_allow: str = ""
    log_level: str = "info"
    #: auto (readable lines on a terminal, JSON lines otherwise), json or text.
    log_format: str = "auto"

    @property
    def nats_servers(self) -> list[str]:
        """`nats_url` as the list of servers nats-py connects to (it does not split a comma list itself)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    def with_(self, **changes) -> Self:
        return replace(self, **changes)


S = TypeVar("S", bound=Settings)


def _coerce(kind, raw: str):
    if kind is int or kind == "int":
        return int(raw)
    if kind is float or kind == "float":
        return float(raw)
    return raw


def load(kind: type[S] = Settings, path: str | None = None, *, strict: bool = True, **overrides) -> S:
    """Defaults < TOML file (`ORDO_CONFIG` or /etc/ordo/ordo.toml if present) < ORDO_* env < overrides.

    `strict`: a setting in the file that `kind` does not know is an error (a
    typo). An action worker is not strict: the file it reads may be the
    engine's, which holds the engine's settings too.
    """
    values: dict = {}
    path = path or os.environ.get("ORDO_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path:
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh))
    known = {f.name: f.type for f in fields(kind)}
    unknown = set(values) - set(known)
    if unknown and strict:
        raise ValueError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
    for name in unknown:
        del values[name]
    for name, type_ in known.items():
        raw = os.environ.get(f"ORDO_{name.upper()}")
        if raw is not None and raw != "":
            values[name] = _coerce(type_, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = kind(**values)
    if settings.log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {settings.log_format!r}")
    return settings
