"""``net.*`` sysctls of the calling thread's network namespace, through /proc/sys.

/proc/sys/net resolves against the namespace of the thread that opens a file, so these run
inside :func:`fabric.dataplane.netlink.in_netns` to reach another namespace's values. A key is dotted
(``net.ipv4.ip_forward``) or, when a part holds dots (``eth0.100``), uses '/' throughout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from fabric.dataplane.netlink.core import NetlinkError

SYSCTL_ROOT = "/proc/sys"

Sysctl = tuple[str, str, bool]  # key, value, required (a best-effort one may fail)


def sysctl_path(key: str) -> str:
    """The /proc/sys path of a ``net.*`` key; ValueError for any other key or a bad name."""
    parts = key.split("/" if "/" in key else ".")
    if len(parts) < 3 or parts[0] != "net":
        raise ValueError("only net.* sysctls can be set")
    if any(p in ("", ".", "..") or not p.isprintable() or " " in p for p in parts):
        raise ValueError("not a sysctl name")
    return "/".join((SYSCTL_ROOT, *parts))


def sysctl_name(key: str) -> str:
    return key.replace("/", ".")


def read_sysctl(key: str) -> str:
    """The value of ``key``, whitespace-trimmed; OSError when it cannot be read."""
    with open(sysctl_path(key)) as f:
        return f.read().strip()


def write_sysctls(items: Iterable[Sysctl], only_if_differs: bool = False) -> None:
    """Write each ``(key, value, required)`` in order; NetlinkError (with errno) for the
    first required one that fails. ``only_if_differs``: read first and leave equal values
    (writing some, such as disable_ipv6, takes the rtnl lock even when nothing changes).
    """
    for key, value, required in items:
        path = sysctl_path(key)
        try:
            if only_if_differs and read_sysctl(key).split() == value.split():
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as e:
            if required:
                message = f"failed to set sysctl {sysctl_name(key)}={value}: {e.strerror}"
                raise NetlinkError(message, e.errno or 0) from e


def sysctl_problems(items: Iterable[Sysctl]) -> list[str]:
    """The required sysctls among ``items`` that do not hold their value (whitespace-split
    comparison, so "1024 65535" equals "1024\\t65535").
    """
    out = []
    for key, value, required in items:
        if not required:
            continue
        try:
            have = read_sysctl(key)
        except OSError as e:
            out.append(f"sysctl {sysctl_name(key)} unreadable: {e.strerror}")
            continue
        if have.split() != value.split():
            out.append(f"sysctl {sysctl_name(key)} is {have!r}, not {value!r}")
    return out
