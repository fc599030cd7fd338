"""The worker as a service: the systemd notify protocol, the watchdog, the health
endpoint, signals, and `ordo profile`, against a real worker process.

Timing is never asserted: the watchdog test counts pings in windows that the
test itself opens and closes, and proves a blocked loop by the count dropping
to zero while the same window on a live loop holds several.
"""

import asyncio
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from harness import ROOT, Harness, http
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.health import HealthServer
from daemon.notify import notify, watchdog, watchdog_interval
from daemon.profile import ProfileError, find_worker_pid, is_worker_cmdline, profile
from daemon.servers import free_port
from daemon.service import GC_YOUNG_THRESHOLD, tune_gc

# -- helpers ---------------------------------------------------------------------------


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd; a thread collects what arrives."""

    def __init__(self, abstract: bool = False):
        self._dir = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"ordo-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            # A short directory: sun_path holds 107 bytes, pytest's tmp_path can be longer.
            self._dir = tempfile.mkdtemp(prefix="ordo-n")
            self.address = os.path.join(self._dir, "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data)

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def lines(self, start: int = 0) -> list[str]:
        """Every KEY=value line received, from message `start` on."""
        return [line for m in self.snapshot()[start:] for line in m.decode().split("\n")]

    def count(self, line: str, start: int = 0) -> int:
        return self.lines(start).count(line)

    async def wait_for(self, predicate, timeout: float = 30.0, start: int = 0, proc=None) -> int:
        """Until some message from `start` on satisfies `predicate`; returns the index after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.snapshot()
            for i in range(start, len(messages)):
                if predicate(messages[i].decode().split("\n")):
                    return i + 1
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the worker exited with {proc.returncode}")
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing matching arrived; got {self.lines(start)[-20:]}")

    async def wait_count(self, line: str, count: int, timeout: float = 30.0, start: int = 0, proc=None) -> None:
        """Until `line` has come `count` times from message `start` on."""
        deadline = time.monotonic() + timeout
        while self.count(line, start) < count:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the worker exited with {proc.returncode}")
            assert time.monotonic() < deadline, f"{line} came {self.count(line, start)} times, not {count}"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def spawn_service(h: Harness, listener: NotifyListener, port: int, *, stderr=None, **extra_env) -> subprocess.Popen:
    """`python -m daemon run --worker-index 0 --workers 1` as systemd would start it."""
    env = h.env()
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000", ORDO_METRICS_PORT=str(port), **extra_env)
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--worker-index", "0", "--workers", "1"],
        env=env,
        cwd=ROOT,
        stderr=stderr,
    )
    h.processes.append(proc)
    return proc


# -- notify -------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notify_sends_exactly_the_states_in_one_datagram(abstract, monkeypatch):
    listener = NotifyListener(abstract=abstract)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        assert notify("READY=1", "STATUS=consuming: partitions 0,1") is True
        assert notify("WATCHDOG=1") is True
        await listener.wait_for(lambda lines: lines == ["WATCHDOG=1"])
        assert listener.snapshot() == [b"READY=1\nSTATUS=consuming: partitions 0,1", b"WATCHDOG=1"]
    finally:
        listener.close()


def test_notify_without_a_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    # A socket nobody listens on: reported as False, never raised.
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/ordo/notify.sock")
    assert notify("READY=1") is False


def test_watchdog_interval_reads_watchdog_usec_for_this_process_only(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "ten"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


async def test_watchdog_task_pings_until_cancelled(monkeypatch):
    listener = NotifyListener()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
        task = asyncio.create_task(watchdog(0.05))
        await listener.wait_for(lambda lines: True, start=2)  # a third ping arrived
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        settled = len(listener.snapshot())
        # A datagram of ours after the task has ended: once it is in, whatever the task sent is too
        # (a send completes into the socket's queue, which the listener reads in order).
        assert notify("X-TEST=after-cancel")
        after = await listener.wait_for(lambda lines: lines == ["X-TEST=after-cancel"], start=settled)
        pings = listener.snapshot()[: after - 1]
        assert set(pings) == {b"WATCHDOG=1"}
        assert len(pings) <= settled + 1  # at most one datagram was still in flight
    finally:
        listener.close()


# -- the health endpoint, in process ----------------------------------------------------------


async def test_health_server_routes():
    ready = {"value": False}
    server = HealthServer("127.0.0.1", 0, lambda: ready["value"])
    await server.start()
    try:
        status, head, body = await http(server.port, "/metrics")
        assert status == 200 and f"Content-Type: {CONTENT_TYPE_LATEST}" in head
        assert b"# TYPE ordo_transitions_total counter" in body
        assert "Connection: close" in head
        status, _, body = await http(server.port, "/metrics?name[]=ordo_executions_finished_total")
        families = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
        assert status == 200 and families == {"ordo_executions_finished_total"}
        assert (await http(server.port, "/healthz"))[0] == 200
        assert (await http(server.port, "/readyz"))[0] == 503
        ready["value"] = True
        assert (await http(server.port, "/readyz?verbose=1"))[0] == 200
        assert (await http(server.port, "/nope"))[0] == 404
        assert (await http(server.port, "/metrics", method="POST"))[0] == 405
        assert (await http(server.port, "/", raw=b"garbage\r\n\r\n"))[0] == 400
        status, head, body = await http(server.port, "/healthz", method="HEAD")
        assert status == 200 and body == b"" and "Content-Length: 3" in head
    finally:
        await server.close()


# -- garbage collection -------------------------------------------------------------------------
def test_tune_gc_collects_the_young_generation_less_often_and_freezes_start_up():
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, threshold[1], threshold[2])
        assert GC_YOUNG_THRESHOLD > threshold[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# -- a real worker process under a stand-in systemd ------------------------------------------


async def test_worker_notifies_pings_serves_health_and_drains(nats_server_url, pg_dsn, prefix):
    listener = NotifyListener()
    port = free_port()
    try:
        async with Harness(nats_server_url, pg_dsn, prefix) as h:
            proc = spawn_service(h, listener, port, ORDO_BLOCK_LOOP_ON_SIGUSR2="1", ORDO_BLOCK_SECONDS="4")

            after_ready = await listener.wait_for(lambda lines: "READY=1" in lines, proc=proc)
            ready_message = listener.snapshot()[after_ready - 1].decode().split("\n")
            assert any(line.startswith("STATUS=consuming: worker 0 of 1") for line in ready_message)
            # Pings keep coming after READY=1.
            await listener.wait_for(lambda lines: lines == ["WATCHDOG=1"], start=after_ready + 2, proc=proc)

            status, head, body = await http(port, "/metrics")
            assert status == 200 and "text/plain" in head
            series = {
                line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line.startswith("ordo_")
            }
            assert {"ordo_transitions_total", "ordo_owned_partitions", "ordo_messages_in_flight"} <= series
            assert "ordo_owned_partitions 4.0" in body.decode()
            assert (await http(port, "/readyz"))[0] == 200
            assert (await http(port, "/healthz"))[0] == 200

            # SIGHUP reloads and the worker runs on: RELOADING=1, then READY=1 again.
            mark = len(listener.snapshot())
            proc.send_signal(signal.SIGHUP)
            reloading = await listener.wait_for(lambda lines: "RELOADING=1" in lines, start=mark, proc=proc)
            assert any(line.startswith("MONOTONIC_USEC=") for line in listener.lines(reloading - 1))
            await listener.wait_for(lambda lines: "READY=1" in lines, start=reloading, proc=proc)
            assert (await http(port, "/healthz"))[0] == 200
            assert (await http(port, "/readyz"))[0] == 200
            assert proc.poll() is None

            # A live loop: several pings in a window, the one it takes to send three.
            mark = len(listener.snapshot())
            opened = time.monotonic()
            await listener.wait_count("WATCHDOG=1", 3, start=mark, proc=proc)
            window = time.monotonic() - opened
            live = listener.count("WATCHDOG=1", start=mark)

            # A blocked loop: the worker says so just before time.sleep(4), then no ping in the same
            # window, held open by a request the loop would answer at once (at least 1 s).
            mark = len(listener.snapshot())
            proc.send_signal(signal.SIGUSR2)
            blocked_at = await listener.wait_for(
                lambda lines: any(line.startswith("STATUS=blocking the event loop") for line in lines),
                start=mark,
                proc=proc,
            )
            with pytest.raises(asyncio.TimeoutError):
                await http(port, "/healthz", timeout=max(1.0, window))  # the loop that serves it is stuck
            assert listener.count("WATCHDOG=1", start=blocked_at) == 0 < live
            # Unblocked, it pings and answers again.
            await listener.wait_for(lambda lines: lines == ["WATCHDOG=1"], start=blocked_at, proc=proc)
            assert (await http(port, "/healthz"))[0] == 200

            mark = len(listener.snapshot())
            proc.send_signal(signal.SIGTERM)
            await listener.wait_for(lambda lines: "STOPPING=1" in lines, start=mark)
            assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        listener.close()


async def test_worker_exits_nonzero_when_its_metrics_port_is_taken(nats_server_url, pg_dsn, prefix):
    listener = NotifyListener()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        async with Harness(nats_server_url, pg_dsn, prefix) as h:
            proc = spawn_service(h, listener, taken.getsockname()[1], stderr=subprocess.PIPE)
            _, err = await asyncio.to_thread(proc.communicate, None, 60)
            assert proc.returncode == 1
            # A clear error naming the address, not a traceback.
            assert b"cannot serve metrics on 127.0.0.1:" in err and b"Traceback" not in err
            assert "READY=1" not in listener.lines()
    finally:
        taken.close()
        listener.close()


# -- ordo profile -----------------------------------------------------------------------------


def test_worker_command_lines_are_recognised():
    assert is_worker_cmdline(
        ["/opt/ordo/.venv/bin/python3", "/opt/ordo/.venv/bin/ordo", "run", "--worker-index", "3"], 3
    )
    assert is_worker_cmdline(["python", "-m", "daemon", "run", "--worker-index", "3", "--workers", "4"], 3)
    assert is_worker_cmdline(["ordo", "run", "--worker-index=3"], 3)
    assert not is_worker_cmdline(["ordo", "run", "--worker-index", "13"], 3)
    assert not is_worker_cmdline(["ordo", "run", "--workers", "3"], 3)
    assert not is_worker_cmdline(["ordo", "profile", "--worker", "3"], 3)
    assert not is_worker_cmdline(["python", "-m", "other", "run", "--worker-index", "3"], 3)


@pytest.fixture
def fake_worker():
    """A busy Python whose command line reads like worker 97's (busy: an idle
    process can leave py-spy with no stacks to draw in a one-second recording)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "while True: sum(range(100000))", "-m", "daemon", "run", "--worker-index", "97"]
    )
    # Until the child has exec'd, /proc/<pid>/cmdline still reads like its parent's.
    deadline = time.monotonic() + 10
    while b"--worker-index" not in open(f"/proc/{proc.pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, "the fake worker never started"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_find_worker_pid_and_profile_record_a_flame_graph(fake_worker, tmp_path):
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("booted with systemd: find_worker_pid asks systemctl for ordo@97, not /proc")
    with pytest.raises(ProfileError, match="no running worker 96"):
        find_worker_pid(96)
    assert find_worker_pid(97) == fake_worker.pid
    out = tmp_path / "flame.svg"
    try:
        code = profile(fake_worker.pid, 1, str(out))
    except ProfileError as exc:
        pytest.skip(f"ptrace is not permitted here: {exc}")
    assert code == 0
    assert b"<svg" in out.read_bytes()[:2000]


def test_profile_explains_a_refused_ptrace(fake_worker, tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run py-spy as an unprivileged user")
    # py-spy as `nobody`, against a worker owned by root: the kernel refuses the attach.
    code = (
        "import sys\n"
        "from daemon.profile import ProfileError, profile\n"
        "try:\n"
        f"    profile({fake_worker.pid}, 1, '/tmp/ordo-never.svg')\n"
        "except ProfileError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(7)\n"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    probe = subprocess.run([*as_nobody, "import daemon.profile"], cwd="/", capture_output=True, env=env, timeout=60)
    if probe.returncode != 0:
        pytest.skip("this Python or checkout is not readable by nobody")
    result = subprocess.run([*as_nobody, code], cwd="/", capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 7, result.stderr
    assert "root or CAP_SYS_PTRACE" in result.stdout
