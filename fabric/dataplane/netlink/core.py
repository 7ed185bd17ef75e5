"""What every rtnetlink user here shares: namespaces, raw sockets, message framing.

* Namespaces: :func:`in_netns` runs a function on the calling thread switched into a netns
  and back (sockets keep the netns they were made in, so a socket made there can be used
  from any thread, in any netns); :func:`open_netns` opens and checks a netns path once;
  :func:`iproute` yields a pyroute2 ``IPRoute`` there.
* :class:`NetlinkSocket`: a raw ``NETLINK_ROUTE`` socket with large buffers, extended acks
  and strict dumps; :mod:`fabric.dataplane.netlink.routes` and :mod:`fabric.dataplane.netlink.links` build on it.
* Framing helpers (``_attr``, ``_attrs``, ``_messages``, ``_ext_ack_message``): package
  private, shared by the codecs of this package.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any, TypeVar

T = TypeVar("T")

# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h); NLM_F_ACK_TLVS is on NLMSG_ERROR
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK, IFLA_IFNAME = 16, 18, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO, NLM_F_DUMP_INTR, NLM_F_ACK_TLVS = 0x1, 0x4, 0x8, 0x10, 0x200
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK = 270, 10, 11, 12
SO_SNDBUFFORCE, SO_RCVBUFFORCE, NLMSGERR_ATTR_MSG = 32, 33, 1
_BUFFER_OPTIONS = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
NS_GET_NSTYPE, CLONE_NEWNET = 0xB703, 0x40000000  # linux/nsfs.h ioctl, linux/sched.h

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR, _U32_ATTR = struct.Struct("=HH"), struct.Struct("=HHI")
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_ERR, _U32 = struct.Struct("=i"), struct.Struct("=I")
_SOCKET_BUFFER = 32 << 20  # holds the acks of a 10,000-message send that all fail (~1 KiB each)
_TIMEOUT = 30.0
_LIBC = ctypes.CDLL(None, use_errno=True)  # setns(2): Python 3.11 has no os.setns


class NetlinkError(Exception):
    """A netlink operation failed as a whole (socket, namespace, dump). ``errno`` when known."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


# ---------------------------------------------------------------- namespaces and sockets


def in_netns(netns: str | int | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in ``netns`` (a name under /run/netns, a path, or an open netns fd, which
    stays open; None: right here) on the calling thread, which is switched into ``netns``
    for the call and back when it returns or raises. OSError when the switch is refused
    (nothing ran).

    Invariant: no thread stays in a foreign netns. The way back is in a ``finally``, and if
    the kernel refuses it the process aborts rather than go on in the wrong namespace.
    ``fn`` must be short and blocking (no await, no thread that outlives it: a thread
    started inside inherits the foreign netns).
    """
    if netns is None:
        return fn()
    if isinstance(netns, int):
        return _in_netns_fd(netns, str(netns), fn)
    path = netns if "/" in netns else f"/run/netns/{netns}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetlinkError(f"failed to open netns {netns}: {e.strerror}", e.errno or 0) from e
    try:
        return _in_netns_fd(fd, netns, fn)
    finally:
        os.close(fd)


def _in_netns_fd(fd: int, name: str, fn: Callable[[], T]) -> T:
    # setns() on this thread, not a thread of its own: starting a thread per call cost
    # 0.7-0.9 ms in fabricd (GIL hand-offs), a switch there and back ~10 us
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)  # refused: still at home, nothing ran
        try:
            return fn()
        finally:
            _return_home(own, name)
    finally:
        os.close(own)


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _return_home(own: int, name: str) -> None:
    """Back to the thread's own netns, or the end of the process: every later socket,
    sysctl and route of this thread would otherwise land in ``name``."""
    try:
        _setns(own)
    except BaseException as e:
        with suppress(OSError):
            os.write(2, f"fatal: failed to leave netns {name}: {e}; aborting\n".encode())
        os.abort()


def open_netns(path: str) -> int:
    """An O_CLOEXEC fd for the network namespace at ``path`` (the caller closes it).

    NetlinkError with errno ENOENT when nothing is there, EINVAL when it is not a network
    namespace (a plain file, a directory, another kind of namespace).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        code = e.errno or errno_mod.ENOENT
        raise NetlinkError(f"failed to open netns {path}: {e.strerror}", code) from e
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)  # ENOTTY: not a namespace file at all
    except OSError:
        kind = 0
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetlinkError(f"{path} is not a network namespace", errno_mod.EINVAL)
    return fd


def configure_socket(s: socket.socket, size: int, options: tuple[int, ...], what: str) -> None:
    """Set up netlink socket ``s``: send and receive buffers of ``size`` bytes, extended acks
    (``NETLINK_CAP_ACK``, ``NETLINK_EXT_ACK``) and ``options``, bound, with a timeout. On
    failure ``s`` is closed and NetlinkError raised (``what`` names the socket)."""
    try:
        for force, plain in _BUFFER_OPTIONS:
            try:
                s.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:  # needs CAP_NET_ADMIN; plain is capped by rmem_max
                s.setsockopt(socket.SOL_SOCKET, plain, size)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, *options):
            with suppress(OSError):  # older kernels: only less detail, or a wider dump
                s.setsockopt(SOL_NETLINK, opt, 1)
        s.bind((0, 0))
        s.settimeout(_TIMEOUT)
    except OSError as e:
        s.close()
        raise NetlinkError(f"failed to set up {what} socket: {e}", e.errno or 0) from e


def netlink_socket(netns: str | None = None, kind: int = socket.SOCK_RAW) -> socket.socket:
    """A ``NETLINK_ROUTE`` socket living in ``netns``."""
    try:
        return in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE))
    except OSError as e:
        raise NetlinkError(f"failed to open netlink socket in {netns}: {e}", e.errno or 0) from e


@contextmanager
def iproute(netns: str | None = None) -> Iterator[Any]:
    """A pyroute2 ``IPRoute`` in ``netns``, closed on exit. Blocking, and refused in a thread
    running an asyncio loop: call it under ``asyncio.to_thread``. pyroute2 is imported here,
    at the first call (diagnostics only): ~0.1 s of fabricd's start otherwise.
    """
    from pyroute2 import IPRoute

    with closing(IPRoute(fileno=netlink_socket(netns, socket.SOCK_DGRAM).detach())) as ipr:
        yield ipr


def link_indexes(netns: str | None = None) -> dict[str, int]:
    """Interface name -> ifindex in ``netns``."""
    with closing(NetlinkSocket(netns)) as sock:
        return sock.link_indexes()


# ---------------------------------------------------------------- framing


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size & 3)


def _attrs(data: memoryview, off: int, end: int) -> dict[int, memoryview]:
    out = {}
    while off + 4 <= end:
        size, kind = _ATTR.unpack_from(data, off)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[off + 4 : off + size]
        off += (size + 3) & ~3
    return out


class _Interrupted(Exception):
    """NLM_F_DUMP_INTR: the table changed during the dump."""


def _messages(data: memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, whole message) for each netlink message in one datagram."""
    off = 0
    while off + 16 <= len(data):
        size, kind, flags, seq, _ = _HDR.unpack_from(data, off)
        if size < 16:
            return
        yield kind, flags, seq, data[off : off + size]
        off += (size + 3) & ~3


def _ext_ack_message(msg: memoryview, flags: int) -> str:
    """The kernel's extended-ack text, when it sent one (needs NETLINK_CAP_ACK: no echo)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    raw = _attrs(msg, 16 + 4 + 16, len(msg)).get(NLMSGERR_ATTR_MSG)
    return bytes(raw).rstrip(b"\0").decode(errors="replace") if raw is not None else ""


# ---------------------------------------------------------------- socket


class NetlinkSocket:
    """A raw rtnetlink socket in one namespace: sends, receives, dumps.

    Blocking and not thread-safe: use one from one thread at a time.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns, self._seq = netns, 0
        self._buf = bytearray(1 << 20)  # reused: a fresh 1 MiB bytes per ack costs page faults
        self._sock = s = netlink_socket(netns)
        configure_socket(s, _SOCKET_BUFFER, (NETLINK_GET_STRICT_CHK,), "netlink")

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1  # never 0: the kernel's own messages use it
        return self._seq

    def _send(self, data: bytes, what: str) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise NetlinkError(f"failed to {what}: {e}", e.errno or errno_mod.EIO) from e

    def _recv(self, what: str) -> memoryview:
        try:
            n = self._sock.recv_into(self._buf)
        except OSError as e:  # ENOBUFS: the kernel dropped messages; timeout: no answer
            raise NetlinkError(f"failed to {what}: {e}", e.errno or errno_mod.ETIMEDOUT) from e
        return memoryview(self._buf)[:n]

    def link_indexes(self) -> dict[str, int]:
        """Interface name -> ifindex in this socket's netns. A dump the kernel marks
        interrupted (links changed meanwhile: pods starting) is redone."""
        for _ in range(5):
            with suppress(_Interrupted):
                return self._link_indexes()
        raise NetlinkError("failed to dump links: interrupted 5 times", errno_mod.EINTR)

    def indexes_of(self, names: Iterable[str]) -> dict[str, int]:
        """Interface name -> ifindex for those of ``names`` that exist: one get per name,
        sent together. Unlike a dump, never interrupted by links coming and going (pods
        starting), and its cost does not grow with the number of links."""
        keys = [(0, _attr(IFLA_IFNAME, n.encode() + b"\0")) for n in dict.fromkeys(names)]
        return dict(self._get_links(keys))

    def _get_links(self, keys: list[tuple[int, bytes]]) -> Iterator[tuple[str, int]]:
        """(name, ifindex) of each link found by (ifindex, name attribute); missing ones
        (ENODEV) are left out."""
        for start in range(0, len(keys), 256):
            pending = {}
            parts = []
            for index, name_attr in keys[start : start + 256]:
                body = _IFINFO.pack(0, 0, index, 0, 0) + name_attr
                seq = self._next_seq()
                pending[seq] = index
                parts.append(_HDR.pack(16 + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body)
            self._send(b"".join(parts), "get links")
            while pending:
                for kind, _, seq, msg in _messages(self._recv("get links")):
                    if pending.pop(seq, None) is None:
                        continue  # a late answer to an earlier request that timed out
                    if kind == RTM_NEWLINK:
                        name = _attrs(msg, 32, len(msg)).get(IFLA_IFNAME)
                        if name is not None:
                            yield bytes(name).rstrip(b"\0").decode(), _ERR.unpack_from(msg, 20)[0]
                        continue
                    code = -_ERR.unpack_from(msg, 16)[0] if kind == NLMSG_ERROR else 0
                    if code not in (errno_mod.ENODEV, 0):
                        raise NetlinkError(f"failed to get links: {os.strerror(code)}", code)

    def names_of(self, indexes: Iterable[int]) -> dict[int, str]:
        """Ifindex -> interface name for those of ``indexes`` that exist, like
        :meth:`indexes_of` (one get per index, sent together; never interrupted)."""
        return {i: n for n, i in self._get_links([(i, b"") for i in dict.fromkeys(indexes)])}

    def _link_indexes(self) -> dict[str, int]:
        out = {}
        for kind, msg in self._dump(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0)):
            name = _attrs(msg, 32, len(msg)).get(IFLA_IFNAME) if kind == RTM_NEWLINK else None
            if name is not None:
                out[bytes(name).rstrip(b"\0").decode()] = _ERR.unpack_from(msg, 20)[0]
        return out

    def _dump(self, kind: int, body: bytes) -> Iterator[tuple[int, memoryview]]:
        """The messages answering one dump request, each valid until the next is taken.
        _Interrupted at the end when the kernel flagged the dump inconsistent.
        """
        seq = self._next_seq()
        flags = NLM_F_REQUEST | NLM_F_DUMP
        self._send(_HDR.pack(16 + len(body), kind, flags, seq, 0) + body, "dump")
        interrupted = False
        while True:
            for mkind, mflags, mseq, msg in _messages(self._recv("dump")):
                if mseq != seq:
                    continue  # a late answer to an earlier, timed-out request
                interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                if mkind == NLMSG_DONE and interrupted:
                    raise _Interrupted
                if mkind == NLMSG_DONE:
                    return
                if mkind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(msg, 16)[0]
                    raise NetlinkError(f"failed to dump: {os.strerror(code)}", code)
                yield mkind, msg
