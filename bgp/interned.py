"""Received prefixes and addresses, interned: the same object for the same value while
anything holds it. Pure: no I/O. Used by ``bgp.codec`` (JSON text) and ``bgp.wire`` (bytes).

A received prefix is hashed about 15 times on its way to the kernel (Adj-RIB-In, best
paths, agent, route table) and looked up again when it is withdrawn. Interned values with
a cached hash make each of those lookups match by identity, without ipaddress's
``__eq__`` in Python.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
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


# Received prefixes by their text (JSON) or wire bytes. A withdrawal or a re-announcement
# then yields the very object the RIB and the route table hold: no parsing, and every dict
# lookup on the way matches by identity instead of ipaddress's __eq__ (~0.5 us each).
#
# Strong references, swept: when the table has doubled since the last sweep (and holds at
# least SWEEP_MIN), the prefixes nothing else holds any more are dropped. It held weak
# references before, whose callback removed an entry as its prefix died: a withdrawal of
# 100k routes then freed each prefix (its address, its weak reference, the callback's
# Python call and dict operation) in a random order across ~30 MB, 10-15% of fabricd's CPU
# for the withdrawal (docs/bench.md, routes). Now a withdrawal frees none; the next
# announcement of the same prefix finds it, and a sweep frees in table order. Interning is
# only a speed-up: a prefix dropped while something still holds it (no sweep does that, by
# its reference count) would just compare by value.
PREFIXES: dict[str | bytes, IPNetwork] = {}
SWEEP_MIN = 65536
_sweep_at = SWEEP_MIN


def _intern(key: str | bytes, net: IPNetwork) -> None:
    global _sweep_at
    if len(PREFIXES) >= _sweep_at:
        sweep()
        _sweep_at = max(SWEEP_MIN, 2 * len(PREFIXES))
    PREFIXES[key] = net


def sweep() -> int:
    """Drop the interned prefixes that nothing but this table holds; how many went."""
    table, count = PREFIXES, sys.getrefcount
    # count(table[key]): the table's reference and the argument's, and no other
    dead = [key for key in list(table) if count(table[key]) <= 2]
    for key in dead:
        del table[key]
    return len(dead)


def prefix(text: str) -> IPNetwork:
    """``a.b.c.d/n`` or an IPv6 CIDR, interned (see ``PREFIXES``); the IPv4 path avoids
    ipaddress's string parser (2x)."""
    net = PREFIXES.get(text)
    if net is not None:
        return net
    if ":" in text:
        net = ipaddress.IPv6Network(text)
    else:
        addr, _, plen = text.partition("/")
        packed = socket.inet_pton(socket.AF_INET, addr)
        net = Prefix4((int.from_bytes(packed, "big"), int(plen) if plen else 32))
    _intern(text, net)
    return net


def nlri4(key: bytes) -> IPNetwork:
    """An IPv4 NLRI as it is on the wire (length octet, then the significant bytes),
    interned by those bytes (see ``PREFIXES``); host bits are cleared."""
    net = PREFIXES.get(key)
    if net is not None:
        return net
    net = Prefix4.of(int.from_bytes(key[1:5].ljust(4, b"\0"), "big"), key[0])
    _intern(key, net)
    return net


def nlri6(key: bytes) -> IPNetwork:
    """An IPv6 NLRI from the wire (see ``nlri4``), interned by its bytes."""
    net = PREFIXES.get(key)
    if net is not None:
        return net
    plen = key[0]
    bits = int.from_bytes(key[1:17].ljust(16, b"\0"), "big")
    net = ipaddress.IPv6Network((bits >> (128 - plen) << (128 - plen), plen))
    _intern(key, net)
    return net
