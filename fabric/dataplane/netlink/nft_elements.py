"""nftables set and map elements written as raw nfnetlink messages, without libnftables.

A pod ADD, a DEL or a label change changes set and map elements of ``table inet
fabric_filter`` and nothing else. Written through libnftables (nft 1.0.6), each such write
first fetches the table's chains, sets and the elements of every interval set (its cache:
~2.4 ms at the benchmark's table, whatever the write); this module sends the same change as
``NFT_MSG_NEWSETELEM`` / ``NFT_MSG_DELSETELEM`` messages in ONE nfnetlink batch
(``NFNL_MSG_BATCH_BEGIN`` ... ``NFNL_MSG_BATCH_END``): the kernel applies it as one
transaction, as it does nft's, and refuses it whole.

Only the element kinds the policy table changes per pod are encoded (``encodable``):
``ipv4_addr``, ``ipv6_addr``, ``ifname`` and their concatenations with ``inet_proto`` and
``inet_service`` (``a . tcp . 80``, ``"fab1" . "fab1"``), keys of sets or of verdict maps
(``accept``, ``drop``, ``continue``, ``return``, ``jump X``, ``goto X``). Interval sets and
anything else are left to libnftables (the caller falls back). Element texts are those
``fabric.dataplane.nft`` renders and reads back, so the kernel lists what was written
(tested against ``nft list``). Layouts: linux/netfilter/nf_tables.h, nfnetlink.h; a
concatenation's fields are each padded to 4 bytes (NFT_REG32), as nft does.
"""

from __future__ import annotations

import errno as errno_mod
import os
import select
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address

from fabric.dataplane.netlink.core import (
    _HDR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkError,
    _attr,
    _ext_ack_message,
    _messages,
    configure_socket,
    in_netns,
)
from fabric.dataplane.nft import SetDef

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NLA_F_NESTED = 0x8000
NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "return": -5}  # NF_*, NFT_*
JUMPS = {"jump": -3, "goto": -4}  # NFT_JUMP, NFT_GOTO (with the chain's name)
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
IFNAMSIZ = 16
MAX_ELEMENTS = 4096  # per batch; more goes through libnftables (one transaction either way)
_PER_MESSAGE = 512  # elements per NEWSETELEM/DELSETELEM message
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian)
_BE32, _BE16 = struct.Struct(">i"), struct.Struct(">H")
_ERR = struct.Struct("=i")
_BUFFER = 8 << 20
_ENCODABLE = frozenset({"ipv4_addr", "ipv6_addr", "ifname", "inet_proto", "inet_service"})


@dataclass(frozen=True, slots=True)
class ElementOp:
    """Add (``add=True``) or delete ``elements`` (texts as fabric.dataplane.nft renders them)
    of set or map ``name`` whose key is ``types`` (a concatenation when several); ``verdict``
    for a verdict map."""

    add: bool
    name: str
    types: tuple[str, ...]
    elements: tuple[str, ...]
    verdict: bool = False


def encodable(types: Sequence[str], flags: Sequence[str], map_to: str | None) -> bool:
    """Whether elements of a set of this shape are written here (else: libnftables)."""
    return (
        bool(types)
        and all(t in _ENCODABLE for t in types)
        and not flags
        and map_to in (None, "verdict")
    )


def encode_batch(table: str, ops: Iterable[ElementOp], seq: int, family: str = "inet") -> bytes:
    """The whole nfnetlink batch (begin, one message per op and chunk, end), every message
    but begin and end asking for an ack, sequence numbers from ``seq`` on. ValueError for an
    element text that is not of its set's key type."""
    fam = NFPROTO[family]
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    head = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    for op in ops:
        kind = NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.add else 0)
        name = _attr(NFTA_SET_ELEM_LIST_SET, op.name.encode() + b"\0")
        for i in range(0, len(op.elements), _PER_MESSAGE):
            items = b"".join(_element(e, op.types, op.verdict)
                             for e in op.elements[i : i + _PER_MESSAGE])  # fmt: skip
            seq += 1
            body = head + name + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, items)
            parts.append(_message(kind, flags, seq, fam, 0, body))
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(parts)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    subsys = NFNL_SUBSYS_NFTABLES << 8 if kind < NFNL_MSG_BATCH_BEGIN else 0
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HDR.pack(16 + len(payload), subsys | kind, flags, seq, 0) + payload


def _nest(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _element(text: str, types: tuple[str, ...], verdict: bool) -> bytes:
    key_text, _, data = text.rpartition(" : ") if verdict else (text, "", "")
    body = _nest(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, _key(key_text, types)))
    if verdict:
        body += _nest(NFTA_SET_ELEM_DATA, _nest(NFTA_DATA_VERDICT, _verdict(data)))
    return _nest(NFTA_LIST_ELEM, body)


@lru_cache(maxsize=1 << 14)
def _key(text: str, types: tuple[str, ...]) -> bytes:
    fields = text.split(" . ") if len(types) > 1 else [text]
    if len(fields) != len(types):
        raise ValueError(f"set element {text!r} is not of type {' . '.join(types)}")
    out = b""
    for value, t in zip(fields, types, strict=True):
        raw = _field(value.strip(), t)
        out += raw + b"\0" * (-len(raw) & 3) if len(types) > 1 else raw
    return out


def _field(value: str, t: str) -> bytes:
    try:
        if t == "ipv4_addr":
            return IPv4Address(value).packed
        if t == "ipv6_addr":
            return IPv6Address(value).packed
        if t == "inet_service":
            return _BE16.pack(int(value))
        if t == "inet_proto":
            return bytes([PROTOCOLS[value] if value in PROTOCOLS else int(value)])
    except (ValueError, KeyError, struct.error, OverflowError) as e:
        raise ValueError(f"set element field {value!r} is not a valid {t}") from e
    if t == "ifname" and len(value) >= 2 and value[0] == value[-1] == '"':
        name = value[1:-1].encode()
        if len(name) < IFNAMSIZ and b"\0" not in name:
            return name + b"\0" * (IFNAMSIZ - len(name))
    raise ValueError(f"set element field {value!r} is not a valid {t}")


def _verdict(text: str) -> bytes:
    words = text.split()
    if len(words) == 1 and words[0] in VERDICTS:
        return _attr(NFTA_VERDICT_CODE, _BE32.pack(VERDICTS[words[0]]))
    if len(words) == 2 and words[0] in JUMPS:
        return _attr(NFTA_VERDICT_CODE, _BE32.pack(JUMPS[words[0]])) + _attr(
            NFTA_VERDICT_CHAIN, words[1].encode() + b"\0"
        )
    raise ValueError(f"map element data {text!r} is not a verdict")


class ElementSocket:
    """A ``NETLINK_NETFILTER`` socket in one netns (made there, usable from any thread):
    ``write`` sends one batch and waits for every message's ack. Blocking, not thread-safe."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns, self._seq = netns, 0
        self._buf = bytearray(1 << 16)
        try:
            s = in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                                      NETLINK_NETFILTER))  # fmt: skip
        except OSError as e:
            raise NetlinkError(f"failed to open nfnetlink socket in {netns}: {e}",
                               e.errno or 0) from e  # fmt: skip
        self._sock = s
        configure_socket(s, _BUFFER, (), "nfnetlink")

    def close(self) -> None:
        self._sock.close()

    def write(self, table: str, ops: Sequence[ElementOp], family: str = "inet") -> int:
        """Apply ``ops`` in one kernel transaction; the bytes sent. NetlinkError (errno and
        the kernel's words, the set named) when the kernel refused it: nothing applied.
        ValueError (nothing sent) for an element that does not encode."""
        first = self._seq % 0x3FFFFFFF + 1
        data = encode_batch(table, ops, first, family)
        pending = set(range(first + 1, first + 1 + _count(ops)))
        self._seq = first + len(pending) + 1
        names = {first + 1 + i: n for i, n in enumerate(_names(ops))}
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise NetlinkError(f"failed to send nft elements: {e}", e.errno or errno_mod.EIO) from e
        # the kernel runs the batch inside send(): every answer is queued when it returns.
        # One per element message (acks asked); an error on any message of ours (begin and
        # end included) means the kernel aborted the whole batch, successful acks or not
        last, failure = first + len(pending) + 1, None
        while pending or select.select([self._sock], [], [], 0)[0]:
            try:
                n = self._sock.recv_into(self._buf)
            except OSError as e:
                raise NetlinkError(f"failed to write nft elements: {e}",
                                   e.errno or errno_mod.ETIMEDOUT) from e  # fmt: skip
            for kind, flags, seq, msg in _messages(memoryview(self._buf)[:n]):
                if kind != NLMSG_ERROR or not first <= seq <= last:
                    continue
                pending.discard(seq)
                code = -_ERR.unpack_from(msg, 16)[0]
                if code and failure is None:
                    text = _ext_ack_message(msg, flags)
                    what = names.get(seq, "nft element batch")
                    failure = NetlinkError(
                        f"{what}: {os.strerror(code)}" + (f" ({text})" if text else ""), code
                    )
        if failure is not None:
            raise failure
        return len(data)


def _count(ops: Sequence[ElementOp]) -> int:
    return sum(-(-len(op.elements) // _PER_MESSAGE) for op in ops)


def _names(ops: Sequence[ElementOp]) -> Iterable[str]:
    for op in ops:
        for _ in range(0, len(op.elements), _PER_MESSAGE):
            yield f"{'add' if op.add else 'delete'} element {op.name}"


def element_ops(have: Mapping[str, SetDef], want: Mapping[str, SetDef]) -> list[ElementOp] | None:
    """The element changes making the sets and maps ``have`` into ``want`` (both holding
    the same names and shapes: an element-only change), sets before maps, a set's deletes
    before its adds (a map element changing its verdict); None when one of them is not
    ``encodable`` or there are more than ``MAX_ELEMENTS``: the caller writes it with nft."""
    sets: list[ElementOp] = []
    maps: list[ElementOp] = []
    total = 0
    for name, new in sorted(want.items()):
        old = have.get(name)
        if old is None or old.elements is new.elements:
            continue
        gone, added = old.elements - new.elements, new.elements - old.elements
        if not gone and not added:
            continue
        if not encodable(new.type, new.flags, new.map_to):
            return None
        out, verdict = (maps, True) if new.map_to else (sets, False)
        if gone:
            out.append(ElementOp(False, name, new.type, tuple(sorted(gone)), verdict))
        if added:
            out.append(ElementOp(True, name, new.type, tuple(sorted(added)), verdict))
        total += len(gone) + len(added)
        if total > MAX_ELEMENTS:
            return None
    return sets + maps
