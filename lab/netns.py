"""Network namespaces, veth pairs, addresses and routes, through iproute2.

Both ends of every veth pair are created directly inside their namespaces, so no link
ever appears in the machine's root namespace, and deleting a namespace deletes its links.
Commands run in batches (``ip -batch``) to keep a lab's start fast.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    """An iproute2 command failed."""


def _run(argv: list[str], stdin: str | None = None) -> str:
    r = subprocess.run(argv, input=stdin, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsError(f"failed to run {' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def listed() -> list[str]:
    """Every namespace name known to iproute2."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add(ns: str) -> None:
    """Create ``ns``; an existing one is an error (it may belong to someone else)."""
    _run(["ip", "netns", "add", ns])


def delete(ns: str) -> bool:
    """Delete ``ns``. Idempotent: returns False when it was already gone."""
    if not exists(ns):
        return False
    r = subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, text=True)
    if r.returncode != 0 and exists(ns):
        raise NetnsError(f"failed to delete namespace {ns}: {r.stderr.strip()}")
    return True


def batch(ns: str | None, commands: list[str]) -> None:
    """Run iproute2 ``commands`` (one per line, without the leading ``ip``) in ``ns``."""
    if not commands:
        return
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    _run(argv, "\n".join(commands) + "\n")


def veth_command(a_ns: str, a_if: str, b_ns: str, b_if: str) -> str:
    return f"link add name {a_if} netns {a_ns} type veth peer name {b_if} netns {b_ns}"


def sysctls(ns: str, values: dict[str, str]) -> None:
    """Set sysctls inside ``ns`` only (``ip netns exec`` remounts /proc/sys for it)."""
    if values:
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *(f"{k}={v}" for k, v in values.items())])


def run_in(
    ns: str, argv: list[str], timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``ns`` (``input`` on its stdin); never raises on a non-zero exit."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=input,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
