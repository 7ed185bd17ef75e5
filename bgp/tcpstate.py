"""The kernel's view of the speaker's BGP connections, read from ``/proc/<pid>/net`` (the
network namespace ExaBGP runs in). Read-only, no privileges beyond reading /proc.

ExaBGP's API says nothing while a connection attempt gets no answer: a peer that drops our
SYN (wrong TCP MD5 key, a key on one side only, GTSM, a filter) leaves ExaBGP's socket in
SYN-SENT for the kernel's whole retry time (~2 min) without a single event. These are the
two things the kernel does tell: the sockets to each peer with their TCP state, and the
namespace's counters of segments it dropped for MD5 or TTL reasons (``/proc/net/netstat``;
the far end's drops are counted on the far end, not here).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from bgp.model import IPAddress

# /proc/net/tcp "st" column (include/net/tcp_states.h)
STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING", "0C": "NEW_SYN_RECV",
}  # fmt: skip
# TcpExt counters of segments the kernel dropped before any socket saw them
DROP_COUNTERS = ("TCPMD5NotFound", "TCPMD5Unexpected", "TCPMD5Failure", "TCPMinTTLDrop")


@dataclass(frozen=True, slots=True)
class Conn:
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    state: str  # a STATES value


def _address(hexaddr: str) -> IPAddress:
    """The kernel prints each 32-bit word of the (network order) address as a host-order
    integer: packing the words back in host order gives the address bytes."""
    words = [int(hexaddr[i : i + 8], 16) for i in range(0, len(hexaddr), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


def parse_tcp(text: str) -> list[Conn]:
    """The sockets of a /proc/net/tcp or tcp6 table."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 4:
            continue
        local, remote = cols[1].split(":"), cols[2].split(":")
        out.append(
            Conn(
                _address(local[0]),
                int(local[1], 16),
                _address(remote[0]),
                int(remote[1], 16),
                STATES.get(cols[3].upper(), cols[3]),
            )
        )
    return out


def parse_netstat(text: str, group: str = "TcpExt") -> dict[str, int]:
    """The counters of one group of /proc/net/netstat or /proc/net/snmp (a header line,
    then a value line, both starting with ``<group>:``)."""
    lines = text.splitlines()
    tag = group + ":"
    for head, values in itertools.pairwise(lines):
        if head.startswith(tag) and values.startswith(tag):
            return dict(zip(head.split()[1:], (int(v) for v in values.split()[1:]), strict=False))
    return {}


def read_connections(pid: int) -> list[Conn]:
    """Every TCP socket of ``pid``'s network namespace ([] if it is gone)."""
    out: list[Conn] = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            out += parse_tcp(Path(f"/proc/{pid}/net/{name}").read_text())
    return out


def read_drops(pid: int) -> dict[str, int]:
    """The MD5 and minimum-TTL drop counters of ``pid``'s network namespace, and
    ``AttemptFails`` (connect attempts answered with a reset: refused)."""
    try:
        counters = parse_netstat(Path(f"/proc/{pid}/net/netstat").read_text())
        snmp = parse_netstat(Path(f"/proc/{pid}/net/snmp").read_text(), "Tcp")
    except OSError:
        return {}
    out = {k: counters.get(k, 0) for k in DROP_COUNTERS}
    out["AttemptFails"] = snmp.get("AttemptFails", 0)
    return out


def peer_parent(sock: socket.socket | None) -> int | None:
    """The parent pid of the process at the other end of a unix socket (the ExaBGP that runs
    a relay), or None when the kernel does not say."""
    if sock is None:
        return None
    size = struct.calcsize("3i")
    try:
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))[0]
        stat = Path(f"/proc/{pid}/stat").read_text()  # "pid (comm) state ppid ..."
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (AttributeError, OSError, ValueError, IndexError, struct.error):
        return None
