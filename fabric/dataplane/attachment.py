"""What a pod attachment is, before any of it touches the kernel: the attachment to make
(:class:`Attachment`, validated), what was made (:class:`Attached`), a veth pair between
create and configure (:class:`Veth`), the host end's name, the constants of Calico's layout
(docs/design/cni-dataplane.md) and the dataplane's error tree.

Pure: no netlink, no namespaces. :mod:`fabric.dataplane.pods` and
:mod:`fabric.dataplane.pod_netns` build on it.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from types import MappingProxyType

from fabric.dataplane.netlink import IPAddress
from fabric.dataplane.netlink.links import (
    LinkSocket,
)
from fabric.dataplane.netlink.sysctls import sysctl_path

Families = frozenset[int]  # IP versions: {4}, {6} or {4, 6}


HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host end: pods see one gateway MAC wherever they move


HOST_LL = IPv6Interface("fe80::ecee:eeff:feee:eeee/64")  # EUI-64 of HOST_MAC


GATEWAY_V4 = IPv4Address("169.254.1.1")  # never answered by anyone but proxy ARP


IFNAMSIZ = 16  # with the NUL: names are 1..15 bytes


MIN_MTU, MIN_MTU_V6, MAX_MTU = 68, 1280, 65535


class DataplaneError(Exception):
    """Attaching or detaching a pod failed; ``errno`` when the kernel said why.

    Tree: DataplaneError > InvalidAttachment (bad input, ``field`` names it), NetnsNotFound
    (the netns path is missing or not a network namespace), InterfaceExists (the pod already
    has an interface of that name). Anything else is a kernel refusal or a failed sysctl.
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class InvalidAttachment(DataplaneError, ValueError):
    """A value the dataplane refuses before touching the kernel. ``field``: which one."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}", errno.EINVAL)
        self.field = field


class NetnsNotFound(DataplaneError):
    """The netns path does not exist or is not a network namespace."""


class InterfaceExists(DataplaneError):
    """The pod's netns has an interface of the requested name already (nothing was made)."""


def host_ifname(container_id: str, ifname: str) -> str:
    """The host end's name: ``fab`` + 11 hex digits of sha1("<container_id>.<ifname>")."""
    digest = hashlib.sha1(f"{container_id}.{ifname}".encode(), usedforsecurity=False)
    return "fab" + digest.hexdigest()[:11]


def validate_ifname(ifname: str, field: str = "ifname") -> None:
    """InvalidAttachment unless ``ifname`` is a name the kernel accepts (dev_valid_name)."""
    if not 0 < len(ifname.encode()) < IFNAMSIZ:
        raise InvalidAttachment(field, f"{ifname!r} must be 1..{IFNAMSIZ - 1} bytes")
    if ifname in (".", "..") or "/" in ifname or ":" in ifname:
        raise InvalidAttachment(field, f"{ifname!r} must not be '.', '..' or hold '/' or ':'")
    if any(c.isspace() or not c.isprintable() for c in ifname):
        raise InvalidAttachment(field, f"{ifname!r} must not hold whitespace")


def _sysctl_key(key: str) -> None:
    try:
        sysctl_path(key)
    except ValueError as e:
        raise InvalidAttachment(f"sysctls[{key!r}]", str(e)) from e


@dataclass(frozen=True, slots=True)
class Attachment:
    """One pod interface to make. ``netns`` is a path (/run/netns/x, /proc/<pid>/ns/net).

    ``ips`` become /32 and /128 (Calico forces them too: the pod has no on-link subnet).
    ``sysctls`` are written in the pod's netns; only ``net.*`` keys. Raises InvalidAttachment.
    """

    container_id: str
    ifname: str
    netns: str
    ips: tuple[IPv4Interface | IPv6Interface, ...]
    mtu: int = 1500
    sysctls: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        ips = tuple(type(ip)(ip.ip) for ip in self.ips)  # /32, /128
        if not ips or len(set(ips)) != len(ips):
            raise InvalidAttachment("ips", "one or more addresses, each once")
        low = MIN_MTU_V6 if any(ip.version == 6 for ip in ips) else MIN_MTU
        validate_link(self.container_id, self.ifname, self.netns, self.mtu, low)
        for key, value in self.sysctls.items():
            _sysctl_key(key)
            if not value or "\n" in value or "\0" in value:
                raise InvalidAttachment(f"sysctls[{key!r}]", f"bad value {value!r}")
        object.__setattr__(self, "ips", ips)
        object.__setattr__(self, "sysctls", MappingProxyType(dict(self.sysctls)))


def validate_link(container_id: str, ifname: str, netns: str, mtu: int, low: int = MIN_MTU) -> None:
    if not container_id or not container_id.isprintable():
        raise InvalidAttachment("container_id", f"{container_id!r} must be printable")
    validate_ifname(ifname)
    if not netns:
        raise InvalidAttachment("netns", "a path is needed")
    if not low <= mtu <= MAX_MTU:
        raise InvalidAttachment("mtu", f"{mtu} must be {low}..{MAX_MTU}")


@dataclass(frozen=True, slots=True)
class Attached:
    """What :meth:`Dataplane.attach` made (for the CNI result: interfaces and ips)."""

    host_ifname: str
    host_mac: str
    pod_ifname: str
    pod_mac: str
    netns: str
    ips: tuple[IPv4Interface | IPv6Interface, ...]
    pod_ifindex: int


@dataclass(slots=True, eq=False)
class Veth:
    """A pair :meth:`Dataplane.create` made and nobody configured yet (both ends down, no
    address). Holds the claim on ``host_ifname``, the pod's netns (``fd``) and a netlink
    socket made inside it (``sock``), until :meth:`Dataplane.configure` or
    :meth:`Dataplane.discard` (then ``sock`` is None).
    """

    container_id: str
    ifname: str
    netns: str
    mtu: int
    families: Families
    host_ifname: str
    pod_mac: str
    host_index: int
    pod_index: int
    fd: int
    sock: LinkSocket | None

    def fits(self, a: Attachment) -> None:
        """InvalidAttachment unless ``a`` is the attachment this pair was made for."""
        made = (self.container_id, self.ifname, self.netns, self.mtu)
        if made != (a.container_id, a.ifname, a.netns, a.mtu):
            raise InvalidAttachment("attachment", f"{a} is not what {self.host_ifname} is for")

    def attached(self, a: Attachment) -> Attached:
        return Attached(self.host_ifname, HOST_MAC, self.ifname, self.pod_mac, self.netns, a.ips,
                        self.pod_index)  # fmt: skip


def families(ips: Iterable[IPv4Interface | IPv6Interface | IPAddress]) -> Families:
    """The IP versions of ``ips``: what :meth:`Dataplane.create` prepares for."""
    return frozenset(ip.version for ip in ips)


def has_version(a: Attachment, version: int) -> bool:
    return any(ip.version == version for ip in a.ips)
