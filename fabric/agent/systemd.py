"""systemd integration without libsystemd: sd_notify and the watchdog, at run time.

``notify`` speaks the sd_notify protocol: one datagram to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd (no
variable) every call is a no-op returning False, so the agent calls them unconditionally.

The unit file itself (what systemd is told about fabricd) is :mod:`fabric.unit`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("fabric.agent.systemd")

SEND_TIMEOUT = 1.0  # a wedged systemd must not stall the event loop for long


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to systemd; False when not under systemd or when
    the message could not be sent (logged), True when it was."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is not a unix socket address: ignored", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("failed to notify systemd (%s): %s", state.split("\n", maxsplit=1)[0], e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1 (with a STATUS= line when given)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free text ``systemctl status`` shows."""
    return notify(f"STATUS={text}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds while the event loop runs (a stuck loop
    stops the pings and systemd restarts fabricd)."""
    while True:
        watchdog_ping()
        await asyncio.sleep(interval)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when the watchdog is
    off, or meant for another process (``$WATCHDOG_PID``), or malformed."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) without systemd's per-process variables, for children such as
    ExaBGP: a child must not notify, nor think the watchdog is its own."""
    drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"}
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in drop}
