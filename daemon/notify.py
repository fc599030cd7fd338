"""The systemd notify protocol (sd_notify(3)) without a dependency.

systemd passes an AF_UNIX datagram socket in $NOTIFY_SOCKET; a worker writes
newline-separated `KEY=value` lines to it: READY=1 once it consumes, STATUS=
for `systemctl status`, STOPPING=1 when it drains, and WATCHDOG=1 at least
once per WatchdogSec, or systemd kills and restarts it.
"""

import asyncio
import logging
import os
import socket

from . import logs

log = logging.getLogger("ordo.notify")


def _address(raw: str) -> str | bytes:
    # A leading '@' names a socket in the abstract namespace: a NUL byte on the wire.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=consuming") in one datagram.

    False when there is no $NOTIFY_SOCKET (not under systemd) or the send fails;
    a worker must never die because its supervisor stopped listening.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not states:
        return False
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _address(raw))
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc, extra=logs.failure("sd_notify", exc))
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds when systemd asks this process for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the pings are expected from; a child that
    # inherited the environment must not ping on its parent's behalf.
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec, extra=logs.failure("bad_watchdog_usec"))
        return None
    return value / 1e6 if value > 0 else None


async def watchdog(interval: float) -> None:
    """Ping WATCHDOG=1 every interval/2 from the event loop, until cancelled.

    The pings come from the loop on purpose: when a callback blocks the loop
    the pings stop, and systemd restarts the worker that no longer makes
    progress. A thread would keep pinging for a dead loop.
    """
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)
