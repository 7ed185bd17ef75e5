"""Checks on a CNI request that need the system or a record, not just the spec: is
CNI_NETNS a network namespace, does a prevResult describe the attachment we made."""

from __future__ import annotations

import fcntl
import ipaddress
import os

from cni.errors import CNIError, Code
from cni.result import IPAddress, IPInterface, Result

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): the namespace type of an nsfs file
CLONE_NEWNET = 0x40000000


def check_netns(path: str) -> None:
    """``path`` is a network namespace. A missing one means the container is gone (3); a
    path that exists but is something else is an invalid CNI_NETNS (4)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CNIError(
            Code.UNKNOWN_CONTAINER, f"CNI_NETNS {path}: no such network namespace"
        ) from None
    except OSError as e:
        raise CNIError(Code.INVALID_ENVIRONMENT, f"CNI_NETNS {path}: {e.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1  # not an nsfs file at all
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise CNIError(Code.INVALID_ENVIRONMENT, f"CNI_NETNS {path}: not a network namespace")


def gateway_v6(host_mac: str) -> IPAddress | None:
    """The host end's IPv6 link-local address (EUI-64 from its MAC), the pods' gateway."""
    try:
        octets = bytes(int(x, 16) for x in host_mac.split(":"))
    except ValueError:
        return None
    if len(octets) != 6:
        return None
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + eui)


def check_result(
    prev: Result | None, ifname: str, netns: str, ips: tuple[IPInterface, ...]
) -> None:
    """prevResult names the pod interface ``ifname`` in ``netns`` with exactly ``ips``."""
    if prev is None:
        raise CNIError(Code.INVALID_CONFIG, "CHECK needs prevResult")
    idx = next(
        (n for n, i in enumerate(prev.interfaces) if i.name == ifname and i.sandbox == netns),
        None,
    )
    if idx is None:
        raise CNIError(
            Code.CHECK_FAILED, f"prevResult has no interface {ifname} in sandbox {netns}"
        )
    theirs = sorted({c.address for c in prev.ips if c.interface in (idx, None)}, key=str)
    ours = sorted(set(ips), key=str)
    if theirs != ours:
        raise CNIError(
            Code.CHECK_FAILED,
            f"prevResult has addresses {[str(a) for a in theirs]} on {ifname}, "
            f"the attachment {[str(a) for a in ours]}",
        )
