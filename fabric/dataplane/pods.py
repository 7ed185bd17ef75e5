"""Pod attachment for the CNI verbs: a veth pair, the pod's addresses and routes, sysctls.

Layout (Calico's, docs/design/cni-dataplane.md)::

    pod netns                                   host netns (fabricd's)
    <ifname>  10.0.0.5/32, fd00::5/128 nodad    fab<11 hex>  ee:ee:ee:ee:ee:ee, up
      169.254.1.1 dev <ifname> scope link         proxy_arp=1, neigh proxy_delay=0, forwarding=1
      default via 169.254.1.1 dev <ifname>        v6: fe80::ecee:eeff:feee:eeee/64 nodad,
      default via fe80::ecee:eeff:feee:eeee       addrgenmode none, proxy_ndp=1, forwarding=1
                                                  accept_ra=0
The host route ``<pod ip>/32 dev fab...`` is NOT made here: the caller adds it through
:class:`fabric.dataplane.route_table.RouteTable`, so fabricd owns it under its route protocol.

Contracts:

* :meth:`Dataplane.attach` makes all of it or nothing: on any failure what it made is removed
  before the error is raised (pod-side sysctls, which belong to the runtime's namespace, are
  not restored).
* :meth:`Dataplane.detach` is idempotent: a missing netns or link is success.
* Attach and detach of one (container, ifname) must not overlap; a second one that does is
  refused with EBUSY rather than allowed to tear down the first one's veth.
* This module never imports pyroute2; the kernel side is :mod:`fabric.dataplane.netlink.links`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import TypeVar

from fabric.dataplane.attachment import (
    HOST_LL,
    HOST_MAC,
    MIN_MTU,
    MIN_MTU_V6,
    Attached,
    Attachment,
    DataplaneError,
    Families,
    InterfaceExists,
    InvalidAttachment,
    Veth,
    families,
    has_version,
    host_ifname,
    validate_ifname,
    validate_link,
)
from fabric.dataplane.netlink import NetlinkError, in_netns, open_netns
from fabric.dataplane.netlink.links import (
    IPInterface,
    Link,
    LinkSocket,
    address_request,
    no_ipv6_autoconf_request,
    random_mac,
    up_request,
)
from fabric.dataplane.netlink.sysctls import Sysctl, sysctl_problems, write_sysctls
from fabric.dataplane.pod_netns import (
    configure_pod,
    in_pod,
    open_pod_netns,
    pod_netns,
    pod_problems,
    prepare_pod,
    remove_pod_end,
)

T = TypeVar("T")


class Dataplane:
    """Attaches pods to this node. One per fabricd; the async methods may run concurrently.

    ``netns``: the namespace host ends go to (a name or path; None: the caller's own, which
    is what fabricd uses). Tests run it in a "node" namespace that way. Blocking work runs in
    worker threads; one persistent netlink socket serves the host side of attach.
    """

    def __init__(self, log: logging.Logger | None = None, *, netns: str | None = None) -> None:
        self.log = log or logging.getLogger(__name__)
        self.netns = netns
        self._sock: LinkSocket | None = None
        self._lock = threading.RLock()  # the socket: one request batch at a time
        self._busy: set[str] = set()  # host ends being attached or detached
        self._busy_lock = threading.Lock()

    async def attach(self, a: Attachment) -> Attached:
        """Make the veth pair, addresses, routes and sysctls of ``a``; all or nothing.

        NetnsNotFound, InterfaceExists or DataplaneError; nothing of this call is left then.
        A stale host end of the same name (an earlier attach never detached) is replaced.
        """
        veth = await self.create(a.container_id, a.ifname, a.netns, a.mtu, families(a.ips))
        return await self.configure(veth, a)

    async def create(
        self, container_id: str, ifname: str, netns: str, mtu: int, fams: Families
    ) -> Veth:
        """The first half of :meth:`attach`: everything but the pod's addresses and sysctls,
        for the IP versions ``fams``, so it can run while IPAM picks the addresses. Checks the
        netns, makes the pair, configures the host end (sysctls, up, IPv6 link-local), and in
        the pod opens a netlink socket, sets the interface up and adds the routes. All or
        nothing, with attach's errors.

        The returned :class:`Veth` holds the host name's claim and two descriptors until
        :meth:`configure` or :meth:`discard` is called with it; the caller must call one.
        """
        if not fams or not fams <= {4, 6}:
            raise InvalidAttachment("families", f"{sorted(fams)}: 4, 6 or both")
        validate_link(container_id, ifname, netns, mtu, MIN_MTU_V6 if 6 in fams else MIN_MTU)
        return await asyncio.to_thread(self._create_pair, container_id, ifname, netns, mtu, fams)

    async def configure(self, veth: Veth, a: Attachment) -> Attached:
        """The second half of :meth:`attach`: host side (sysctls, up, IPv6 link-local), then
        the pod side (up, addresses, routes, sysctls). All or nothing: on failure the pair is
        removed before the error is raised. Closes ``veth`` in every case. An attachment of
        other IP versions than ``veth`` was made for gets a new pair (the slow way).

        Uncontended and without pod sysctls it runs right here: one netlink batch on the pod's
        socket, ~0.1 ms, less than handing it to a worker thread.
        """
        if veth.sock is None:
            raise DataplaneError(f"failed to configure {veth.host_ifname}: closed", errno.EBADF)
        try:
            veth.fits(a)
        except InvalidAttachment:
            await self.discard(veth)
            raise
        if veth.families != families(a.ips):  # IPAM gave other versions than expected
            await self.discard(veth)
            return await self.attach(a)
        if a.sysctls or not self._lock.acquire(False):
            return await asyncio.to_thread(self._configure, veth, a)
        try:
            try:
                self._configure_steps(veth, a)
            finally:
                self._lock.release()
        except BaseException:
            await asyncio.to_thread(self._roll_back_veth, veth)  # a deletion blocks ~20 ms
            raise
        self._close(veth)
        return veth.attached(a)

    async def discard(self, veth: Veth) -> None:
        """Remove the pair :meth:`create` made (gone already: nothing to do) and close
        ``veth``. Idempotent; for undoing an attachment that does not go on."""
        await asyncio.to_thread(self._discard, veth)

    async def detach(self, container_id: str, ifname: str, netns: str | None) -> bool:
        """Remove the pod's veth pair; whether something was removed. Idempotent: a missing
        netns, a missing link or a never-seen container is success (False).
        """
        validate_ifname(ifname)
        return await asyncio.to_thread(self._detach, container_id, ifname, netns)

    async def check(self, a: Attachment) -> list[str]:
        """What differs from what :meth:`attach` makes (empty: all there). NetnsNotFound when
        the pod's netns is gone.
        """
        return await asyncio.to_thread(self._check, a)

    async def close(self) -> None:
        """Close the netlink socket. Idempotent."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ------------------------------------------------------------ attach

    def _create_pair(
        self, container_id: str, ifname: str, netns: str, mtu: int, fams: Families
    ) -> Veth:

        host = host_ifname(container_id, ifname)
        pod_mac = random_mac()
        self._claim(host)
        fd = -1
        try:
            fd = open_pod_netns(netns)
            if _same_file(fd, self.netns or "/proc/thread-self/ns/net"):
                raise InvalidAttachment("netns", f"{netns} is the host's own namespace")
            link = self._create(container_id, ifname, netns, mtu, host, pod_mac, fd)
            try:
                self._configure_host(fams, host, link.ifindex)
                sock = in_pod(fd, lambda: prepare_pod(ifname, link.peer_index, fams))
            except NetlinkError as e:
                self._roll_back(host)
                raise DataplaneError(f"{e} (in {netns})", e.errno) from e
            except BaseException:
                self._roll_back(host)
                raise
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self._release(host)
            raise
        return Veth(container_id, ifname, netns, mtu, fams, host, pod_mac, link.ifindex,
                    link.peer_index, fd, sock)  # fmt: skip

    def _configure(self, veth: Veth, a: Attachment) -> Attached:
        try:
            self._configure_steps(veth, a)
        except BaseException:
            self._roll_back_veth(veth)
            raise
        self._close(veth)
        return veth.attached(a)

    def _configure_steps(self, veth: Veth, a: Attachment) -> None:
        """The pod's addresses and sysctls; raises without undoing (the caller discards)."""
        assert veth.sock is not None
        configure_pod(a, veth.pod_index, veth.sock, veth.fd)

    def _discard(self, veth: Veth) -> None:
        if veth.sock is None:  # configured or discarded: no claim held any more
            with self._claimed(veth.host_ifname):
                self._remove(veth.host_ifname)
            return
        try:
            self._remove(veth.host_ifname)
        finally:
            self._close(veth)

    def _roll_back_veth(self, veth: Veth) -> None:
        try:
            self._discard(veth)
        except DataplaneError as e:  # the error that made us roll back matters more
            self.log.error("failed to roll back veth %s: %s", veth.host_ifname, e)

    def _close(self, veth: Veth) -> None:
        """Close the pod socket and netns fd and give the host name's claim back. Once."""
        if veth.sock is None:
            return
        veth.sock.close()
        os.close(veth.fd)
        veth.sock, veth.fd = None, -1
        self._release(veth.host_ifname)

    def _create(
        self, container_id: str, ifname: str, netns: str, mtu: int, host: str, pod_mac: str,
        fd: int,
    ) -> Link:  # fmt: skip
        def create(sock: LinkSocket) -> Link:
            return sock.create_veth(host, HOST_MAC, mtu, ifname, pod_mac, fd)

        try:
            return self._host_call(create)
        except DataplaneError as e:
            if e.errno != errno.EEXIST:
                raise
        if self._remove(host):  # EEXIST from the host end: an old pair, never detached
            self.log.warning("attach %s: replaced the stale veth %s", container_id, host)
            try:
                return self._host_call(create)
            except DataplaneError as e:
                if e.errno != errno.EEXIST:
                    raise
        raise InterfaceExists(
            f"failed to create {ifname} in {netns}: an interface of that name exists",
            errno.EEXIST,
        )

    def _configure_host(self, fams: Families, host: str, index: int) -> None:
        v6 = 6 in fams
        try:
            self._in_host(lambda: write_sysctls(_host_sysctls(fams, host)))
        except NetlinkError as e:
            raise DataplaneError(str(e), e.errno) from e
        requests = [no_ipv6_autoconf_request(index, host)] if v6 else []
        requests.append(up_request(index, host))
        if v6:
            requests.append(address_request(index, host, HOST_LL))
        self._host_call(lambda sock: sock.apply(requests))

    # ------------------------------------------------------------ detach

    def _detach(self, container_id: str, ifname: str, netns: str | None) -> bool:
        host = host_ifname(container_id, ifname)
        with self._claimed(host):
            if self._remove(host):
                return True
            if not netns:
                return False
            try:
                fd = open_netns(netns)
            except NetlinkError as e:  # gone, or nothing of ours can be in it
                self.log.debug("detach %s: netns %s: %s", host, netns, e)
                return False
            try:
                return in_pod(fd, lambda: remove_pod_end(ifname))
            finally:
                os.close(fd)

    # ------------------------------------------------------------ check

    def _check(self, a: Attachment) -> list[str]:
        host = host_ifname(a.container_id, a.ifname)
        v6 = has_version(a, 6)

        def read_host(sock: LinkSocket) -> tuple[Link | None, list[IPInterface]]:
            link = sock.get_link(host)
            return link, sock.addresses(link.ifindex) if link is not None and v6 else []

        link, addresses = self._host_call(read_host)
        out = []
        if link is None:
            out.append(f"host end {host} is missing")
        else:
            out += link.problems("veth", HOST_MAC, a.mtu)
            if v6 and HOST_LL not in addresses:
                out.append(f"{host} lacks its address {HOST_LL}")
            out += self._in_host(lambda: sysctl_problems(_host_sysctls(families(a.ips), host)))
        with pod_netns(a.netns) as fd:
            out += in_pod(fd, lambda: pod_problems(a, link.ifindex if link else None))
        return out

    # ------------------------------------------------------------ helpers

    def _remove(self, host: str) -> bool:
        """Delete host end ``host`` (its peer goes with it); False when there is none. On a
        socket of its own: a veth deletion waits ~15 ms for the kernel, which must not hold up
        other attaches.
        """
        try:
            with closing(LinkSocket(self.netns)) as sock:
                return sock.delete_link(host)
        except NetlinkError as e:
            raise DataplaneError(f"failed to delete veth {host}: {e}", e.errno) from e

    def _roll_back(self, host: str) -> None:
        try:
            self._remove(host)
        except DataplaneError as e:  # the error that made us roll back matters more
            self.log.error("failed to roll back veth %s: %s", host, e)

    def _host_call(self, fn: Callable[[LinkSocket], T]) -> T:
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = LinkSocket(self.netns)
                return fn(self._sock)
            except NetlinkError as e:
                raise DataplaneError(str(e), e.errno) from e

    def _in_host(self, fn: Callable[[], T]) -> T:
        return in_netns(self.netns, fn) if self.netns else fn()

    @contextmanager
    def _claimed(self, host: str) -> Iterator[None]:
        self._claim(host)
        try:
            yield
        finally:
            self._release(host)

    def _claim(self, host: str) -> None:
        with self._busy_lock:
            if host in self._busy:
                raise DataplaneError(f"failed to claim {host}: in use by another call", errno.EBUSY)
            self._busy.add(host)

    def _release(self, host: str) -> None:
        with self._busy_lock:
            self._busy.discard(host)


def _host_sysctls(families: Families, host: str) -> list[Sysctl]:
    """(key with '/', value, required) for the host end; accept_ra=0 is best effort when the
    pod has no IPv6 (the node may have no IPv6 at all).
    """
    v6 = 6 in families
    out = [(f"net/ipv6/conf/{host}/accept_ra", "0", v6)]  # a pod must not route the node
    if 4 in families:
        out += [
            (f"net/ipv4/conf/{host}/proxy_arp", "1", True),  # answers for 169.254.1.1
            (f"net/ipv4/neigh/{host}/proxy_delay", "0", True),  # ... at once
            (f"net/ipv4/conf/{host}/forwarding", "1", True),
        ]
    if v6:
        out += [
            (f"net/ipv6/conf/{host}/disable_ipv6", "0", True),
            (f"net/ipv6/conf/{host}/proxy_ndp", "1", True),
            (f"net/ipv6/conf/{host}/forwarding", "1", True),
        ]
    return out


def _same_file(fd: int, netns: str) -> bool:
    """Whether ``fd`` is the namespace ``netns`` (a name under /run/netns or a path)."""
    try:
        host = os.stat(netns if "/" in netns else f"/run/netns/{netns}")
    except OSError:  # the host netns is unknown: what follows fails with a clear error
        return False
    return os.path.samestat(os.fstat(fd), host)
