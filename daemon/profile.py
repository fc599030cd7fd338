"""`ordo profile`: a flame graph of a live worker, recorded by py-spy.

py-spy reads the worker's memory from outside (ptrace and process_vm_readv),
so the worker needs no change and no restart; the recording side needs root
or CAP_SYS_PTRACE (see systemd/README.md).
"""

import os
import shutil
import subprocess
import sys

#: What py-spy and the kernel say when ptrace is refused.
_PTRACE_REFUSED = ("permission denied", "operation not permitted", "ptrace")


class ProfileError(Exception):
    """A worker that cannot be found or profiled; the message says what to do."""


def py_spy() -> str:
    """The py-spy binary: the one installed next to this Python (a dependency of Ordo), else PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("py-spy")
    if found is None:
        raise ProfileError("py-spy is not installed: pip install py-spy (it is a dependency of ordo)")
    return found


def profile(pid: int, seconds: int, out: str, native: bool = True) -> int:
    """Record `seconds` of worker `pid` into the flame graph `out` (SVG); returns py-spy's exit code."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--format", "flamegraph", "-o", out]
    if native:
        # Native frames show time spent inside the Cython hot path and C extensions.
        cmd.append("--native")
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0 and any(s in proc.stderr.lower() for s in _PTRACE_REFUSED):
        raise ProfileError(
            f"py-spy may not attach to pid {pid}: attaching needs root or CAP_SYS_PTRACE"
            " (and kernel.yama.ptrace_scope <= 2); run it as root, e.g. `sudo ordo profile ...`"
        )
    return proc.returncode


def _systemd_main_pid(index: int) -> int | None:
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemctl") is None:
        return None  # not booted with systemd
    proc = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", f"ordo@{index}"], capture_output=True, text=True
    )
    try:
        pid = int(proc.stdout.strip())
    except ValueError:
        return None
    return pid or None  # 0: the unit is not running


def is_worker_cmdline(argv: list[str], index: int) -> bool:
    """True for `ordo run --worker-index I` and `python -m daemon run --worker-index I`."""
    if "run" not in argv:
        return False
    rest = argv[argv.index("run") + 1 :]
    wanted = str(index)
    has_index = any(
        (a == "--worker-index" and i + 1 < len(rest) and rest[i + 1] == wanted) or a == f"--worker-index={wanted}"
        for i, a in enumerate(rest)
    )
    head = argv[: argv.index("run")]
    is_ordo = any(os.path.basename(a) == "ordo" for a in head) or any(
        a == "-m" and i + 1 < len(head) and head[i + 1] == "daemon" for i, a in enumerate(head)
    )
    return has_index and is_ordo


def _scan_proc(index: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone, or not ours to read
        if is_worker_cmdline([a for a in argv if a], index):
            pids.append(int(entry))
    return sorted(pids)


def find_worker_pid(index: int) -> int:
    """The pid of worker `index`: the MainPID of ordo@I under systemd, else found in /proc."""
    pid = _systemd_main_pid(index)
    if pid is not None:
        return pid
    pids = _scan_proc(index)
    if not pids:
        raise ProfileError(f"no running worker {index} (ordo@{index} or `ordo run --worker-index {index}`)")
    if len(pids) > 1:
        raise ProfileError(f"several processes look like worker {index} ({', '.join(map(str, pids))}): pass --pid")
    return pids[0]
