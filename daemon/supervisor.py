"""The per-core supervisor: one worker process per core, restarted when it dies.

`ordo run` uses it; under systemd each worker is its own unit instance
(`ordo run --worker-index I`) and systemd is the supervisor instead.

Its workers run with the options it was given (`--config`, `--log-level`), so
they read the same file, and SIGHUP re-reads it in every worker: the
supervisor passes the signal on (signals as daemon/service.py maps them).
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("ordo.supervisor")


def _worker_name(index: int, pid: int) -> str:
    """The name a worker process logs under (daemon.worker.Worker.name), for lines about it."""
    return f"{socket.gethostname()}/{pid}/w{index}"


class Supervisor:
    def __init__(self, workers: int, extra_env: dict | None = None, worker_options: list[str] | None = None):
        self.workers = workers
        self.env = dict(os.environ, **(extra_env or {}))
        #: `ordo`'s own options for every worker, before `run` (`--config FILE`, `--log-level LEVEL`).
        self.worker_options = list(worker_options or [])
        self.children: dict[int, subprocess.Popen] = {}
        self._restarts: dict[int, float] = {}
        self.stopping = False

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "daemon", *self.worker_options, "run"]
        cmd += ["--worker-index", str(index), "--workers", str(self.workers)]
        self.children[index] = subprocess.Popen(cmd, env=self.env)
        pid = self.children[index].pid
        log.info("worker %d started (pid %d)", index, pid, extra={"worker": _worker_name(index, pid)})

    def start(self) -> None:
        for index in range(self.workers):
            self._spawn(index)

    def check(self) -> None:
        """Restart workers that exited, with a short back-off against crash loops."""
        for index, child in list(self.children.items()):
            code = child.poll()
            if code is None or self.stopping:
                continue
            last = self._restarts.get(index, 0.0)
            if time.monotonic() - last < 1.0:
                continue
            log.warning(
                "worker %d exited with %s; restarting",
                index,
                code,
                extra={"worker": _worker_name(index, child.pid), "reason": "worker_exited", "code": code},
            )
            self._restarts[index] = time.monotonic()
            self._spawn(index)

    async def watch(self) -> None:
        """Keep the workers alive from an event loop (used by `ordo dev`)."""
        import asyncio

        while not self.stopping:
            self.check()
            await asyncio.sleep(0.2)

    def reload(self) -> None:
        """SIGHUP every running worker: each re-reads its config file (daemon/service.py)."""
        running = [child for child in self.children.values() if child.poll() is None]
        for child in running:
            child.send_signal(signal.SIGHUP)
        log.info("SIGHUP: passed on to %d worker(s)", len(running))

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM every worker (they drain) and wait; SIGKILL what is left. True if all drained."""
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        clean = True
        for child in self.children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                clean = False
            clean = clean and child.returncode == 0
        return clean

    async def stop_async(self, timeout: float = 60.0) -> bool:
        """stop() in a thread, for callers on an event loop: the loop runs on while the workers drain."""
        import asyncio

        return await asyncio.to_thread(self.stop, timeout)


def run_supervisor(workers: int, worker_options: list[str] | None = None) -> int:
    supervisor = Supervisor(workers, worker_options=worker_options)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    # Left to its default, SIGHUP would end the supervisor and leave its workers running unwatched.
    reload = []
    signal.signal(signal.SIGHUP, lambda *_: reload.append(True))
    supervisor.start()
    while not stop:
        if reload:
            reload.clear()
            supervisor.reload()
        supervisor.check()
        time.sleep(0.2)
    return 0 if supervisor.stop() else 1
