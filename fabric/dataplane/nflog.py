"""Packets the kernel logs with ``log group N`` (nfnetlink_log), read from an NFLOG socket.

``NflogSocket(group)`` binds one netlink socket (NETLINK_NETFILTER) to log group ``group``
in the calling thread's network namespace (or ``netns``), asking for the first
``COPY_RANGE`` bytes of each packet: enough for the IP header and the ports. ``read()``
drains what is queued without blocking; ``decode()`` turns the datagrams into
``LoggedPacket`` (prefix, in/out interface index, addresses, protocol, ports). pyroute2 has
no nfnetlink_log codec, so the few attributes needed are decoded here by hand
(include/uapi/linux/netfilter/nfnetlink_log.h).

Bounds: the kernel queues at most the socket's receive buffer; when the reader falls behind
it drops packets and the next read reports ENOBUFS, counted in ``lost`` (the log is a
sample, never a flood). Only one socket per namespace can bind a group: the second gets
``NflogError`` with EBUSY.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from fabric.dataplane.netlink import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = (
    1,
    2,
    3,
    4,
    5,
)
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 2, 1, 4
COPY_RANGE = 128  # IPv4/IPv6 header + TCP/UDP/SCTP ports, with room for options
RCVBUF = 1 << 20  # ~4,000 queued packets of 128 bytes; beyond, the kernel drops (ENOBUFS)
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (the group, big-endian)
_ATTR = struct.Struct("=HH")
PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


class NflogError(OSError):
    """The log socket could not be opened, bound or read (``errno`` set)."""


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """One logged packet: the rule's ``log prefix``, interfaces (index, 0 = none) and the
    header fields; ``sport``/``dport`` None for protocols without ports."""

    prefix: str
    indev: int
    outdev: int
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    sport: int | None
    dport: int | None

    @property
    def protocol(self) -> str:
        return PROTOCOLS.get(self.proto, str(self.proto))


def _attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def config_message(group: int, attrs: bytes, seq: int) -> bytes:
    """One NFULNL_MSG_CONFIG request for ``group`` asking for an ack."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, group) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + _ATTR.size <= len(data):
        size, kind = _ATTR.unpack_from(data, i)
        if size < _ATTR.size:
            break
        out[kind & 0x3FFF] = data[i + _ATTR.size : i + size]
        i += (size + 3) & ~3
    return out


def decode(datagram: bytes) -> list[LoggedPacket]:
    """The packets in one netlink datagram; messages of other kinds and packets whose
    headers were not copied are skipped. Pure."""
    out: list[LoggedPacket] = []
    i = 0
    while i + _NLMSG.size <= len(datagram):
        size, kind, _flags, _seq, _pid = _NLMSG.unpack_from(datagram, i)
        if size < _NLMSG.size:
            break
        msg = datagram[i + _NLMSG.size : i + size]
        i += (size + 3) & ~3
        if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET or len(msg) < _NFGEN.size:
            continue
        attrs = _attrs(msg[_NFGEN.size :])
        packet = _packet(attrs)
        if packet is not None:
            out.append(packet)
    return out


def _packet(attrs: dict[int, bytes]) -> LoggedPacket | None:
    payload = attrs.get(NFULA_PAYLOAD, b"")
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
    indev = struct.unpack("!I", attrs[NFULA_IFINDEX_INDEV])[0] if NFULA_IFINDEX_INDEV in attrs \
        else 0  # fmt: skip
    outdev = struct.unpack("!I", attrs[NFULA_IFINDEX_OUTDEV])[0] if NFULA_IFINDEX_OUTDEV in attrs \
        else 0  # fmt: skip
    if len(payload) >= 20 and payload[0] >> 4 == 4:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src, dst = ip_address(payload[12:16]), ip_address(payload[16:20])
        frag = struct.unpack("!H", payload[6:8])[0] & 0x1FFF
        l4 = payload[ihl:] if frag == 0 else b""
    elif len(payload) >= 40 and payload[0] >> 4 == 6:
        proto = payload[6]
        src, dst = ip_address(payload[8:24]), ip_address(payload[24:40])
        l4 = payload[40:]  # extension headers are not followed: ports then stay unknown
    else:
        return None
    sport = dport = None
    if proto in (6, 17, 132) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
    return LoggedPacket(prefix, indev, outdev, src, dst, proto, sport, dport)


class NflogSocket:
    """A non-blocking socket bound to log group ``group`` (see the module docstring)."""

    def __init__(self, group: int, netns: str | None = None, rcvbuf: int = RCVBUF) -> None:
        if not 0 <= group <= 65535:
            raise ValueError(f"log group {group} is not 0-65535")
        self.group = group
        self.lost = 0  # times the kernel dropped log messages because we were behind
        self.sock = in_netns(netns, lambda: socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER))  # fmt: skip
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._configure()
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _configure(self) -> None:
        bind = _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
        self._request(bind, 1)
        mode = _attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET))
        # deliver each packet at once (no batching: a denied probe shows within the second)
        mode += _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
        mode += _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 0))
        self._request(mode, 2)

    def _request(self, attrs: bytes, seq: int) -> None:
        self.sock.settimeout(5.0)
        self.sock.send(config_message(self.group, attrs, seq))
        while True:
            data = self.sock.recv(65536)
            _size, kind, _f, got, _p = _NLMSG.unpack_from(data)
            if kind == NLMSG_ERROR and got == seq:
                code = -struct.unpack_from("=i", data, _NLMSG.size)[0]
                if code:
                    what = "bind" if seq == 1 else "configure"
                    raise NflogError(code, f"failed to {what} nflog group {self.group}: "
                                           f"{os.strerror(code)}")  # fmt: skip
                return

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int = 256) -> list[LoggedPacket]:
        """What is queued (at most ``limit`` datagrams), without blocking."""
        out: list[LoggedPacket] = []
        for _ in range(limit):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise NflogError(e.errno or 0, f"failed to read nflog group {self.group}: {e}") \
                    from e  # fmt: skip
            out += decode(data)
        return out

    def close(self) -> None:
        self.sock.close()
