"""Links and addresses over rtnetlink: veth pairs, link state, addresses, pod routes.

Hand-encoded like :mod:`fabric.dataplane.netlink.routes` (pyroute2 costs ~0.7 ms per message, these
~10 us). :class:`LinkSocket` sends a batch of requests in one ``send`` and reads every ack, so
a pod's whole configuration is one round trip; the first refusal is raised as a
:class:`NetlinkError` carrying its errno, what was being done and the kernel's ext-ack text.

Used by :mod:`fabric.dataplane.pods`, which owns the attachment layout (docs/design/cni-dataplane.md).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from contextlib import suppress
from errno import EINTR, ENODEV
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface, IPv6Network
from typing import NamedTuple

from fabric.dataplane.netlink.core import (
    _ERR,
    _HDR,
    _IFINFO,
    _U32,
    IFLA_IFNAME,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTM_GETLINK,
    RTM_NEWLINK,
    NetlinkError,
    _attr,
    _attrs,
    _ext_ack_message,
    _Interrupted,
    _messages,
)
from fabric.dataplane.netlink.routes import (
    _RTMSG,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_TABLE,
    RTM_NEWROUTE,
    RTN_UNICAST,
    IPAddress,
    IPNetwork,
    RouteSocket,
)

IPInterface = IPv4Interface | IPv6Interface

RTM_DELLINK, RTM_NEWADDR, RTM_GETADDR = 17, 20, 22
IFLA_ADDRESS, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_AF_SPEC, IFLA_NET_NS_FD = 1, 4, 5, 18, 26, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
IFA_ADDRESS, IFA_LOCAL, IFA_F_NODAD = 1, 2, 0x02
IFF_UP, RTPROT_BOOT = 0x1, 3  # RTPROT_BOOT: what ``ip route add`` uses

_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


class Request(NamedTuple):
    """One rtnetlink request of a batch: type, flags, body after the header, and what it does
    (for the error message: ``failed to <what>``).
    """

    kind: int
    flags: int
    body: bytes
    what: str


class Link(NamedTuple):
    """What a link dump says about one interface. ``peer_index``: IFLA_LINK (a veth's peer
    ifindex, in the peer's namespace); ``kind``: IFLA_INFO_KIND, "" for none.
    """

    ifindex: int
    name: str
    kind: str
    mac: str
    mtu: int
    up: bool
    peer_index: int

    def problems(self, kind: str, mac: str | None, mtu: int) -> list[str]:
        """How this link differs from one of ``kind``, ``mac`` (None: any) and ``mtu``, up."""
        out = []
        if self.kind != kind:
            out.append(f"{self.name} is a {self.kind or 'device'} link, not a {kind}")
        if not self.up:
            out.append(f"{self.name} is down")
        if mac is not None and self.mac != mac:
            out.append(f"{self.name} has MAC {self.mac}, not {mac}")
        if self.mtu != mtu:
            out.append(f"{self.name} has MTU {self.mtu}, not {mtu}")
        return out


# ---------------------------------------------------------------- encoding


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _name(name: str) -> bytes:
    return _attr(IFLA_IFNAME, name.encode() + b"\0")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes | bytearray | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def random_mac() -> str:
    """A random unicast, locally administered MAC, as the kernel would pick."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return mac_text(raw)


def veth_request(
    name: str, mac: str, mtu: int, peer: str, peer_mac: str, peer_netns_fd: int
) -> Request:
    """Create veth ``name`` here (down) with its peer ``peer`` made directly inside the
    namespace ``peer_netns_fd`` (down too: a peer cannot be set up before its other end is
    registered, the kernel says ENOTCONN). Refused with EEXIST when either name is taken.
    """
    peer_info = _IFINFO.pack(0, 0, 0, 0, 0) + _name(peer) + _u32(IFLA_MTU, mtu)
    peer_info += _attr(IFLA_ADDRESS, mac_bytes(peer_mac))
    peer_info += _attr(IFLA_NET_NS_FD, struct.pack("=i", peer_netns_fd))
    info = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(
        IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info)
    )
    body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(name) + _u32(IFLA_MTU, mtu)
    body += _attr(IFLA_ADDRESS, mac_bytes(mac)) + _attr(IFLA_LINKINFO, info)
    return Request(RTM_NEWLINK, _CREATE | NLM_F_ECHO, body, f"create veth {name}")


def up_request(index: int, name: str) -> Request:
    """Set link ``index`` up."""
    body = _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP)
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body, f"set {name} up")


def no_ipv6_autoconf_request(index: int, name: str) -> Request:
    """Address generation mode "none" on link ``index``: no link-local address of the
    kernel's making (nor its DAD and router solicitations) when it comes up. Must precede
    the up request: the kernel applies flags before IFLA_AF_SPEC in one message.
    """
    mode = _attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    spec = _attr(IFLA_AF_SPEC, _attr(socket.AF_INET6, mode))
    body = _IFINFO.pack(0, 0, index, 0, 0) + spec
    return Request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body, f"set addrgenmode none on {name}")


def address_request(index: int, name: str, address: IPInterface, nodad: bool = True) -> Request:
    """Add ``address`` (its own prefix length) to link ``index``; IPv6 without DAD."""
    v6 = address.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    flags = IFA_F_NODAD if v6 and nodad else 0
    raw = address.ip.packed
    body = _IFADDR.pack(family, address.network.prefixlen, flags, 0, index)
    body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    return Request(RTM_NEWADDR, _CREATE, body, f"add address {address} to {name}")


def route_request(
    dst: IPNetwork, index: int, name: str, gateway: IPAddress | None = None
) -> Request:
    """Add ``dst [via gateway] dev <index>`` to the main table (proto boot; scope link for an
    IPv4 route without gateway). EEXIST when the table has ``dst`` already.
    """
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    scope = RT_SCOPE_LINK if gateway is None and dst.version == 4 else RT_SCOPE_UNIVERSE
    body = _RTMSG.pack(
        family, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0
    )
    body += _u32(RTA_TABLE, RT_TABLE_MAIN) + _u32(RTA_OIF, index)
    if dst.prefixlen:
        body += _attr(RTA_DST, dst.network_address.packed)
    if gateway is not None:
        body += _attr(RTA_GATEWAY, gateway.packed)
    via = f" via {gateway}" if gateway is not None else ""
    return Request(RTM_NEWROUTE, _CREATE, body, f"add route {dst}{via} dev {name}")


def delete_request(name: str = "", index: int = 0) -> Request:
    """Delete a link by ``index`` or, when 0, by ``name``; a veth takes its peer with it."""
    body = _IFINFO.pack(0, 0, index, 0, 0) + (_name(name) if not index else b"")
    return Request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, body, f"delete link {name or index}")


# ---------------------------------------------------------------- decoding


def decode_link(msg: memoryview) -> Link:
    """The :class:`Link` in one RTM_NEWLINK message (header included)."""
    _, _, index, flags, _ = _IFINFO.unpack_from(msg, 16)
    attrs = _attrs(msg, 32, len(msg))
    kind = ""
    if (info := attrs.get(IFLA_LINKINFO)) is not None:
        raw = _attrs(info, 0, len(info)).get(IFLA_INFO_KIND)
        kind = bytes(raw).rstrip(b"\0").decode() if raw is not None else ""
    name = bytes(attrs.get(IFLA_IFNAME, b"")).rstrip(b"\0").decode()
    mac = mac_text(attrs.get(IFLA_ADDRESS, b""))

    def u32(kind: int) -> int:
        raw = attrs.get(kind)
        return _U32.unpack(raw)[0] if raw is not None and len(raw) == 4 else 0

    return Link(index, name, kind, mac, u32(IFLA_MTU), bool(flags & IFF_UP), u32(IFLA_LINK))


def _decode_address(msg: memoryview) -> tuple[int, IPInterface] | None:
    family, prefixlen, _, _, index = _IFADDR.unpack_from(msg, 16)
    attrs = _attrs(msg, 24, len(msg))
    raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
    if raw is None:
        return None
    if family == socket.AF_INET:
        return index, IPv4Interface((IPv4Address(bytes(raw)), prefixlen))
    return index, IPv6Interface((IPv6Network((bytes(raw), 128)).network_address, prefixlen))


# ---------------------------------------------------------------- socket


class LinkSocket(RouteSocket):
    """A :class:`RouteSocket` that also creates, reads and deletes links and addresses.

    Blocking and not thread-safe: one thread at a time. It acts in the namespace it was made
    in, whichever thread uses it.
    """

    def apply(self, requests: Sequence[Request]) -> list[memoryview]:
        """Send ``requests`` in one batch and wait for every ack. The kernel runs them in
        order; NetlinkError for the first refused (the rest ran too), with its errno. Returns
        the echoed messages (NLM_F_ECHO), each a copy.
        """
        pending: dict[int, int] = {}  # seq -> position in requests
        parts = []
        for i, r in enumerate(requests):
            pending[self._next_seq()] = i
            parts.append(_HDR.pack(16 + len(r.body), r.kind, r.flags, self._seq, 0) + r.body)
        self._send(b"".join(parts), requests[0].what if len(requests) == 1 else "send batch")
        echoed: list[memoryview] = []
        failed: list[tuple[int, int, str]] = []  # position, errno, ext-ack text
        while pending:
            for kind, flags, seq, msg in _messages(self._recv("read acks")):
                if seq not in pending:
                    continue  # a late answer to an earlier request that timed out
                if kind != NLMSG_ERROR:
                    echoed.append(memoryview(bytes(msg)))
                elif code := -_ERR.unpack_from(msg, 16)[0]:
                    failed.append((pending.pop(seq), code, _ext_ack_message(msg, flags)))
                else:
                    del pending[seq]
        if failed:
            position, code, text = min(failed)
            raise _refused(requests[position].what, code, text)
        return echoed

    def create_veth(
        self, name: str, mac: str, mtu: int, peer: str, peer_mac: str, peer_netns_fd: int
    ) -> Link:
        """Create a veth pair as :func:`veth_request` says; the new local end as a Link whose
        ``peer_index`` is the peer's ifindex in its namespace.
        """
        request = veth_request(name, mac, mtu, peer, peer_mac, peer_netns_fd)
        for msg in self.apply([request]):
            if _HDR.unpack_from(msg)[1] == RTM_NEWLINK:
                return decode_link(msg)
        link = self.get_link(name)  # kernels before 6.3 do not echo a new link
        if link is None:
            raise NetlinkError(f"failed to find veth {name} just created", ENODEV)
        return link

    def get_link(self, name: str) -> Link | None:
        """The link called ``name``; None when there is none."""
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(name)
        seq = self._next_seq()
        self._send(_HDR.pack(16 + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body, "get link")
        while True:
            for kind, _, mseq, msg in _messages(self._recv("get link")):
                if mseq != seq:
                    continue
                if kind == RTM_NEWLINK:
                    return decode_link(msg)
                code = -_ERR.unpack_from(msg, 16)[0] if kind == NLMSG_ERROR else 0
                if code == ENODEV:
                    return None
                raise _refused(f"get link {name}", code, "")

    def delete_link(self, name: str = "", index: int = 0) -> bool:
        """Delete a link by index or name; False when it was not there (ENODEV)."""
        try:
            self.apply([delete_request(name, index)])
        except NetlinkError as e:
            if e.errno == ENODEV:
                return False
            raise
        return True

    def addresses(self, index: int) -> list[IPInterface]:
        """The addresses on link ``index`` (both families). A dump the kernel marks
        interrupted (addresses changed meanwhile) is redone."""
        for _ in range(5):
            with suppress(_Interrupted):
                out = []
                for kind, msg in self._dump(RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, index)):
                    if (
                        kind == RTM_NEWADDR
                        and (found := _decode_address(msg))
                        and found[0] == index
                    ):
                        out.append(found[1])
                return out
        raise NetlinkError("failed to dump addresses: interrupted 5 times", EINTR)


def _refused(what: str, code: int, text: str) -> NetlinkError:
    detail = f"{os.strerror(code)}" + (f" ({text})" if text else "")
    return NetlinkError(f"failed to {what}: {detail}", code)
