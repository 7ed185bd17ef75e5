"""The pod's side of an attachment: what runs inside the pod's network namespace (its
interface up, routes via 169.254.1.1 and the host's link-local address, addresses and
sysctls; removal of its veth end; the check of all of it) and entering that namespace.

Each function states which netns it runs in; :mod:`fabric.dataplane.pods` calls them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from ipaddress import ip_network
from typing import TypeVar

from fabric.dataplane.attachment import (
    GATEWAY_V4,
    HOST_LL,
    Attachment,
    DataplaneError,
    Families,
    NetnsNotFound,
    families,
)
from fabric.dataplane.netlink import IPAddress, IPNetwork, NetlinkError, in_netns, open_netns
from fabric.dataplane.netlink.links import (
    LinkSocket,
    address_request,
    route_request,
    up_request,
)
from fabric.dataplane.netlink.sysctls import sysctl_problems, write_sysctls

T = TypeVar("T")


def prepare_pod(ifname: str, index: int, fams: Families) -> LinkSocket:
    """Run by the calling thread while it is inside the pod's netns (:func:`in_netns`): a
    netlink socket there (it stays in that netns, usable from any thread), IPv6 enabled on
    the interface if it was not (runtimes may disable it in pods; its addresses and route
    would be refused), up, the pod's routes.
    """
    enable_v6 = [(f"net/ipv6/conf/{ifname}/disable_ipv6", "0", True)] if 6 in fams else []
    requests = [up_request(index, ifname)]
    requests += [route_request(dst, index, ifname, via) for dst, via in pod_routes(fams)]
    sock = LinkSocket()
    try:
        write_sysctls(enable_v6, only_if_differs=True)
        sock.apply(requests)
    except BaseException:
        sock.close()
        raise
    return sock


def configure_pod(a: Attachment, index: int, sock: LinkSocket, fd: int) -> None:
    """The pod's addresses (one batch on ``sock``, in the pod's netns), then its sysctls,
    written from inside the pod's netns (``fd``) only when there are some."""
    try:
        sock.apply([address_request(index, a.ifname, ip) for ip in a.ips])
        if a.sysctls:
            items = [(key, value, True) for key, value in a.sysctls.items()]
            in_pod(fd, lambda: write_sysctls(items))
    except NetlinkError as e:
        raise DataplaneError(f"{e} (in {a.netns})", e.errno) from e


def pod_routes(families: Families) -> list[tuple[IPNetwork, IPAddress | None]]:
    """(destination, gateway) of the pod's routes; no gateway: a device route."""
    out: list[tuple[IPNetwork, IPAddress | None]] = []
    if 4 in families:
        out += [(ip_network(GATEWAY_V4), None), (ip_network("0.0.0.0/0"), GATEWAY_V4)]
    if 6 in families:
        out.append((ip_network("::/0"), HOST_LL.ip))
    return out


def remove_pod_end(ifname: str) -> bool:
    """Delete the veth ``ifname`` in this thread's netns (never a link of another kind)."""
    try:
        with closing(LinkSocket()) as sock:
            link = sock.get_link(ifname)
            return link is not None and link.kind == "veth" and sock.delete_link("", link.ifindex)
    except NetlinkError as e:
        raise DataplaneError(f"failed to delete {ifname} in the pod: {e}", e.errno) from e


def pod_problems(a: Attachment, host_index: int | None) -> list[str]:
    """What :func:`configure_pod` would make and is not there: run in the pod's netns."""
    try:
        with closing(LinkSocket()) as sock:
            link = sock.get_link(a.ifname)
            if link is None:
                return [f"{a.ifname} is missing in {a.netns}"]
            addresses = set(sock.addresses(link.ifindex))
            routes = {(d.route.dst, d.route.gateways, d.route.dev) for d in sock.dump()}
    except NetlinkError as e:
        raise DataplaneError(f"failed to read {a.ifname} in {a.netns}: {e}", e.errno) from e
    out = link.problems("veth", None, a.mtu)
    if host_index is not None and link.peer_index != host_index:
        out.append(f"{a.ifname} is not the peer of the host end")
    out += [f"{a.ifname} lacks its address {ip}" for ip in a.ips if ip not in addresses]
    for dst, via in pod_routes(families(a.ips)):
        if (dst, (via,) if via else (), None if via else a.ifname) not in routes:
            how = f"via {via}" if via else f"dev {a.ifname}"
            out.append(f"route {dst} {how} is missing in {a.netns}")
    return out + sysctl_problems([(key, value, True) for key, value in a.sysctls.items()])


@contextmanager
def pod_netns(path: str) -> Iterator[int]:
    fd = open_pod_netns(path)
    try:
        yield fd
    finally:
        os.close(fd)


def open_pod_netns(path: str) -> int:
    try:
        return open_netns(path)
    except NetlinkError as e:
        raise NetnsNotFound(str(e), e.errno) from e


def in_pod(fd: int, fn: Callable[[], T]) -> T:
    try:
        return in_netns(fd, fn)
    except OSError as e:  # setns into the pod refused (nothing ran)
        raise DataplaneError(f"failed to enter the pod netns: {e}", e.errno or 0) from e
