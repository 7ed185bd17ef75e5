"""Received prefixes and addresses, interned: the same object for the same value while
anything holds it. Pure: no I/O. Used by ``bgp.codec`` (JSON text) and ``bgp.wire`` (bytes).

A received prefix is hashed about 15 times on its way to the kernel (Adj-RIB-In, best
paths, agent, route table) and looked up again when it is withdrawn. Interned values with
a cached hash make each of those lookups match by identity, without ipaddress's
``__hash__`` and ``__eq__`` in Python.
"""

from __future__ import annotations

import ipaddress
import socket
import weakref
from collections.abc import Iterator

from bgp.model import IPAddress, IPNetwork

# Peer and next-hop addresses by their text: a handful, seen in every update. The same
# object each time lets the RIB's per-prefix {peer: route} lookups match by identity instead
# of running ipaddress's __hash__ and __eq__ in Python for every prefix.
ADDRESSES: dict[str, IPAddress] = {}


def address(text: str) -> IPAddress:
    """The interned address of ``text`` (a peer or a next hop)."""
    addr = ADDRESSES.get(text)
    if addr is None:
        if len(ADDRESSES) >= 4096:
            ADDRESSES.clear()
        addr = ADDRESSES[text] = Address4(text) if ":" not in text else ipaddress.ip_address(text)
    return addr


class Address4(ipaddress.IPv4Address):
    """An ``IPv4Address`` that computes its hash once (ipaddress hashes ``hex(int(self))``
    on every call); equal to, and hashing like, the plain ``IPv4Address``."""

    __slots__ = ("_hash",)

    def __init__(self, address: str | int) -> None:
        super().__init__(address)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"IPv4Address('{self}')"


class Prefix4(ipaddress.IPv4Network):
    """An ``IPv4Network`` that computes its hash once. ipaddress recomputes it in Python on
    every call (~0.2 us), and a received prefix is hashed about 15 times on its way to the
    kernel (Adj-RIB-In, best paths, agent, route table). Equal to, and hashing like, the
    ``IPv4Network`` of the same value."""

    __slots__ = ("_hash",)

    def __init__(self, address: str | tuple[int, int], strict: bool = True) -> None:
        super().__init__(address, strict)
        self._hash = super().__hash__()

    @classmethod
    def of(cls, n: int, plen: int) -> Prefix4:
        """The prefix ``n/plen`` (host bits of ``n`` cleared), built without ipaddress's
        parser: 3x faster, and without the per-object closure that ``IPv4Network`` gives a
        /32 or /31 for ``hosts()`` (the class method below answers the same)."""
        mask, hmask = _MASKS[plen]
        net = object.__new__(cls)
        addr = object.__new__(ipaddress.IPv4Address)
        addr._ip = n = n & hmask  # type: ignore[attr-defined]  # ipaddress's own slot
        net.network_address, (net.netmask, net._prefixlen) = addr, mask  # type: ignore[attr-defined]
        net._hash = hash(n ^ hmask)
        return net

    def hosts(self) -> Iterator[ipaddress.IPv4Address]:
        if self.prefixlen >= 31:
            return iter(self) if self.prefixlen == 31 else iter((self.network_address,))
        return super().hosts()

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"IPv4Network('{self}')"


# prefix length -> ((netmask, prefix length), netmask as int), as IPv4Network keeps them
_MASKS = [
    (ipaddress.IPv4Network._make_netmask(p), int(ipaddress.IPv4Network._make_netmask(p)[0]))  # type: ignore[attr-defined]
    for p in range(33)
]


# Received prefixes by their text, while anything else holds them (the RIB does until they
# are withdrawn). A withdrawal or a re-announcement then yields the very object the RIB and
# the route table hold: no parsing, and every dict lookup on the way matches by identity
# instead of ipaddress's __eq__ (~0.5 us each). Halves the CPU of withdrawing 100k prefixes.
# A plain dict of weak references rather than a WeakValueDictionary: its Python-level get()
# was a third of parsing a withdrawal.
PREFIXES: dict[str | bytes, _TextRef] = {}


class _TextRef(weakref.ref[IPNetwork]):
    """A weak reference to an interned prefix that knows its text: one shared callback
    removes the entry (a closure per prefix cost ~100 bytes each)."""

    __slots__ = ("text",)
    text: str | bytes

    def __new__(cls, net: IPNetwork, text: str | bytes) -> _TextRef:
        ref = _new_ref(cls, net, _forget)
        ref.text = text
        return ref

    # No __init__: weakref.ref's own (C) accepts the two arguments and does nothing with
    # them. A Python one (and super() in __new__) was ~15% of interning a new prefix.


_new_ref = weakref.ref.__new__


def _forget(ref: _TextRef) -> None:
    # one dict operation in the common case (runs for each prefix a withdrawal frees)
    other = PREFIXES.pop(ref.text, None)
    if other is not None and other is not ref:  # a newer object's reference: put it back
        PREFIXES[ref.text] = other


def prefix(text: str) -> IPNetwork:
    """``a.b.c.d/n`` or an IPv6 CIDR, interned (see ``PREFIXES``); the IPv4 path avoids
    ipaddress's string parser (2x)."""
    ref = PREFIXES.get(text)
    if ref is not None and (net := ref()) is not None:
        return net
    if ":" in text:
        net = ipaddress.IPv6Network(text)
    else:
        addr, _, plen = text.partition("/")
        packed = socket.inet_pton(socket.AF_INET, addr)
        net = Prefix4((int.from_bytes(packed, "big"), int(plen) if plen else 32))
    PREFIXES[text] = _TextRef(net, text)
    return net


def nlri4(key: bytes) -> IPNetwork:
    """An IPv4 NLRI as it is on the wire (length octet, then the significant bytes),
    interned by those bytes (see ``PREFIXES``); host bits are cleared."""
    ref = PREFIXES.get(key)
    if ref is not None and (net := ref()) is not None:
        return net
    net = Prefix4.of(int.from_bytes(key[1:5].ljust(4, b"\0"), "big"), key[0])
    PREFIXES[key] = _TextRef(net, key)
    return net


def nlri6(key: bytes) -> IPNetwork:
    """An IPv6 NLRI from the wire (see ``nlri4``), interned by its bytes."""
    ref = PREFIXES.get(key)
    if ref is not None and (net := ref()) is not None:
        return net
    plen = key[0]
    bits = int.from_bytes(key[1:17].ljust(16, b"\0"), "big")
    net = ipaddress.IPv6Network((bits >> (128 - plen) << (128 - plen), plen))
    PREFIXES[key] = _TextRef(net, key)
    return net
