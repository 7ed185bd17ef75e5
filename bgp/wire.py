"""Received BGP messages decoded from their bytes (RFC 4271, 4760, 4724, 6793, 1997, 8092).
Pure: no I/O.

fabricd runs ExaBGP with ``receive { packets; }`` (``bgp.render``): ExaBGP hands over each
received UPDATE, OPEN and NOTIFICATION as the message's bytes, and ``bgp/exabgp_main.py``
keeps it from parsing UPDATEs itself. Parsing them into objects and formatting those as JSON
was ~75% of ExaBGP's CPU for 100,000 learned routes, and decoding that JSON back into
prefixes half of fabricd's; a /32 here is 5 bytes read straight into the RIB's prefix.

``update(peer, body, asn4)`` gives the events of one UPDATE body (after the 19-byte header):
one ``PeerUpdate`` (IPv4 NLRI and withdrawn routes, and those of ``MP_REACH``/``MP_UNREACH``
for IPv4/IPv6 unicast and multicast), an ``EndOfRib``, or nothing. Error handling follows
RFC 7606 where it can: a malformed path attribute makes the UPDATE's announced prefixes
withdrawals ("treat-as-withdraw"); a body whose prefix fields cannot be framed raises
``WireError`` (ExaBGP would have reset the session; fabricd logs and counts it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from bgp.errors import SpeakerError
from bgp.model import (
    Announce,
    EndOfRib,
    Event,
    IPAddress,
    IPNetwork,
    PathAttrs,
    PeerGracefulRestart,
    PeerNotification,
    PeerUpdate,
)


class WireError(SpeakerError):
    """A received message that cannot be framed (lengths that do not add up)."""


_AFI = {1: "ipv4", 2: "ipv6"}
_SAFI = {1: "unicast", 2: "multicast"}
ORIGIN, AS_PATH, NEXT_HOP, LOCAL_PREF, COMMUNITIES = 1, 2, 3, 5, 8
ORIGINATOR_ID, CLUSTER_LIST, MP_REACH, MP_UNREACH, AS4_PATH, LARGE_COMMUNITY = 9, 10, 14, 15, 17, 32
AS_SET, AS_SEQUENCE = 1, 2  # confederation segments (3, 4) are not part of the AS path
CAPABILITIES, GRACEFUL_RESTART = 2, 64  # OPEN optional parameter, capability code


class _Malformed(Exception):
    """A path attribute that fails its checks: the UPDATE is treated as a withdrawal."""


Decoder = Callable[[bytes], IPNetwork]


def update(
    peer: IPAddress,
    body: bytes,
    asn4: bool,
    v4: Decoder,
    v6: Decoder,
    ip: Callable[[str], IPAddress],
) -> list[Event]:
    """The events of one received UPDATE ``body``. ``asn4``: 4-octet AS numbers negotiated.
    ``v4``/``v6`` turn an NLRI's bytes (length octet first) into the interned prefix, ``ip``
    a next hop's text into the interned address (``bgp.codec`` passes its caches)."""
    if body == b"\x00\x00\x00\x00":
        return [EndOfRib(peer, "ipv4 unicast")]
    end = len(body)
    if end < 4:
        raise WireError(f"UPDATE from {peer}: {end} bytes")
    wlen = int.from_bytes(body[0:2], "big")
    if 2 + wlen + 2 > end:
        raise WireError(f"UPDATE from {peer}: withdrawn routes length {wlen} beyond the message")
    withdrawn = _nlris(body, 2, 2 + wlen, 32, v4, peer)
    alen = int.from_bytes(body[2 + wlen : 4 + wlen], "big")
    astart = 4 + wlen
    if astart + alen > end:
        raise WireError(f"UPDATE from {peer}: path attributes length {alen} beyond the message")
    nlri = _nlris(body, astart + alen, end, 32, v4, peer)
    groups: list[tuple[IPAddress, list[IPNetwork]]] = []
    try:
        attrs, hop, reach, unreach = _attributes(body, astart, astart + alen, asn4, v4, v6, peer)
    except _Malformed:
        # RFC 7606 treat-as-withdraw: what it announces is withdrawn. MP_REACH's prefixes
        # were framed before the failure or the failure is in MP_REACH itself: those are lost.
        withdrawn.extend(nlri)
        return [PeerUpdate(peer, (), tuple(withdrawn))] if withdrawn else []
    if unreach is not None:
        family, prefixes = unreach
        if not prefixes and not nlri and not withdrawn and reach is None and hop is None:
            return [EndOfRib(peer, family)]  # RFC 4724 §2: an MP_UNREACH of no prefixes
        withdrawn.extend(prefixes)
    if nlri:
        if hop is None:
            withdrawn.extend(nlri)  # RFC 7606 §7.3: NEXT_HOP missing for IPv4 NLRI
        else:
            groups.append((ip(hop), nlri))
    if reach is not None:
        groups.append((ip(reach[0]), reach[1]))
    announced = tuple(Announce(p, nh, attrs) for nh, prefixes in groups for p in prefixes)
    if not announced and not withdrawn:
        return []
    return [PeerUpdate(peer, announced, tuple(withdrawn))]


def _nlris(
    body: bytes, i: int, end: int, width: int, decode: Decoder, peer: IPAddress
) -> list[IPNetwork]:
    """The prefixes packed in ``body[i:end]`` (length octet, then its significant bytes)."""
    out = []
    while i < end:
        plen = body[i]
        j = i + 1 + ((plen + 7) >> 3)
        if plen > width or j > end:
            raise WireError(f"UPDATE from {peer}: malformed NLRI at byte {i} (/{plen})")
        out.append(decode(body[i:j]))
        i = j
    return out


def _attributes(
    body: bytes, i: int, end: int, asn4: bool, v4: Decoder, v6: Decoder, peer: IPAddress
) -> tuple[
    PathAttrs,
    str | None,
    tuple[str, list[IPNetwork]] | None,
    tuple[str, list[IPNetwork]] | None,
]:
    """(attributes, NEXT_HOP text, (MP_REACH next hop, prefixes), (MP_UNREACH family,
    prefixes)). Raises _Malformed (treat-as-withdraw) or WireError (cannot frame)."""
    seen: dict[int, bytes] = {}
    reach = unreach = None
    while i < end:
        if i + 3 > end:
            raise WireError(f"UPDATE from {peer}: truncated path attribute header")
        flags, code = body[i], body[i + 1]
        if flags & 0x10:  # extended length
            if i + 4 > end:
                raise WireError(f"UPDATE from {peer}: truncated path attribute header")
            size, start = int.from_bytes(body[i + 2 : i + 4], "big"), i + 4
        else:
            size, start = body[i + 2], i + 3
        i = start + size
        if i > end:
            raise WireError(f"UPDATE from {peer}: attribute {code} longer than the attributes")
        value = body[start:i]
        if code == MP_REACH:
            reach = _mp_reach(value, v4, v6, peer)
        elif code == MP_UNREACH:
            unreach = _mp_unreach(value, v4, v6, peer)
        elif code not in seen:  # RFC 7606 §3(g): of a repeated attribute the first counts
            seen[code] = value
    hop = None
    if (raw := seen.get(NEXT_HOP)) is not None:
        if len(raw) != 4:
            raise _Malformed("NEXT_HOP")
        hop = str(ipaddress.IPv4Address(raw))
    return _path_attrs(seen, asn4), hop, reach, unreach


def _path_attrs(seen: dict[int, bytes], asn4: bool) -> PathAttrs:
    if not seen.keys() - {ORIGIN, NEXT_HOP}:
        return _PLAIN
    path = _as_path(seen.get(AS_PATH, b""), 4 if asn4 else 2)
    if not asn4 and (as4 := seen.get(AS4_PATH)) is not None:  # RFC 6793 §4.2.3
        path4 = _as_path(as4, 4)
        if len(path4) <= len(path):
            path = path[: len(path) - len(path4)] + path4
    orig = seen.get(ORIGINATOR_ID)
    if orig is not None and len(orig) != 4:
        raise _Malformed("ORIGINATOR_ID")
    clusters = seen.get(CLUSTER_LIST, b"")
    if len(clusters) % 4:
        raise _Malformed("CLUSTER_LIST")
    lp = seen.get(LOCAL_PREF)
    if lp is not None and len(lp) != 4:
        raise _Malformed("LOCAL_PREF")
    comms = seen.get(COMMUNITIES, b"")
    large = seen.get(LARGE_COMMUNITY, b"")
    if len(comms) % 4 or len(large) % 12:
        raise _Malformed("COMMUNITIES")
    words = [int.from_bytes(comms[k : k + 2], "big") for k in range(0, len(comms), 2)]
    lwords = [int.from_bytes(large[k : k + 4], "big") for k in range(0, len(large), 4)]
    return PathAttrs(
        as_path=path,
        originator_id=ipaddress.IPv4Address(orig) if orig is not None else None,
        cluster_list=tuple(
            str(ipaddress.IPv4Address(clusters[k : k + 4])) for k in range(0, len(clusters), 4)
        ),
        local_pref=int.from_bytes(lp, "big") if lp is not None else None,
        communities=(
            *(f"{words[k]}:{words[k + 1]}" for k in range(0, len(words), 2)),
            *(f"{lwords[k]}:{lwords[k + 1]}:{lwords[k + 2]}" for k in range(0, len(lwords), 3)),
        ),
    )


_PLAIN = PathAttrs()


def _as_path(raw: bytes, width: int) -> tuple[int, ...]:
    """Every AS of the AS_SEQUENCE and AS_SET segments, in order (sets included, so loop
    checks see them; confederation segments left out, as ExaBGP's JSON did)."""
    out: list[int] = []
    i, end = 0, len(raw)
    while i < end:
        if i + 2 > end:
            raise _Malformed("AS_PATH segment header")
        kind, count = raw[i], raw[i + 1]
        j = i + 2 + count * width
        if j > end or kind not in (1, 2, 3, 4):
            raise _Malformed("AS_PATH segment")
        if kind in (AS_SET, AS_SEQUENCE):
            out += [int.from_bytes(raw[k : k + width], "big") for k in range(i + 2, j, width)]
        i = j
    return tuple(out)


def _family(value: bytes) -> tuple[str, int] | None:
    afi, safi = int.from_bytes(value[0:2], "big"), value[2]
    if afi not in _AFI or safi not in _SAFI:
        return None  # a family fabricd does not take (flowspec, VPN, ...): ignored
    return f"{_AFI[afi]} {_SAFI[safi]}", afi


def _mp_reach(
    value: bytes, v4: Decoder, v6: Decoder, peer: IPAddress
) -> tuple[str, list[IPNetwork]] | None:
    """(next hop text, prefixes) of MP_REACH_NLRI. Of a global and a link-local IPv6 next
    hop (32 bytes) the global one is kept."""
    if len(value) < 5:
        raise _Malformed("MP_REACH_NLRI")
    fam = _family(value)
    nhlen = value[3]
    start = 4 + nhlen + 1  # next hop, then one reserved octet
    if fam is None:
        return None
    if start > len(value) or nhlen not in (4, 16, 32):
        raise _Malformed("MP_REACH_NLRI next hop")
    raw = value[4 : 4 + (4 if nhlen == 4 else 16)]
    hop = str(ipaddress.IPv4Address(raw) if nhlen == 4 else ipaddress.IPv6Address(raw))
    v = fam[1]
    return hop, _nlris(value, start, len(value), 32 if v == 1 else 128, v4 if v == 1 else v6, peer)


def _mp_unreach(
    value: bytes, v4: Decoder, v6: Decoder, peer: IPAddress
) -> tuple[str, list[IPNetwork]] | None:
    if len(value) < 3:
        raise _Malformed("MP_UNREACH_NLRI")
    fam = _family(value)
    if fam is None:
        return None
    v = fam[1]
    return fam[0], _nlris(value, 3, len(value), 32 if v == 1 else 128, v4 if v == 1 else v6, peer)


def open_message(peer: IPAddress, body: bytes) -> PeerGracefulRestart:
    """The graceful-restart capability (RFC 4724) of a received OPEN ``body``: its restart
    time and the families whose forwarding state it preserves (F bit, 0x80)."""
    if len(body) < 10 or 10 + body[9] > len(body):
        raise WireError(f"OPEN from {peer}: {len(body)} bytes")
    i, end = 10, 10 + body[9]
    while i + 2 <= end:
        ptype, plen = body[i], body[i + 1]
        j, k = i + 2, i + 2 + plen
        while ptype == CAPABILITIES and j + 2 <= k:
            code, clen = body[j], body[j + 1]
            cap = body[j + 2 : j + 2 + clen]
            if code == GRACEFUL_RESTART and len(cap) >= 2:
                time_ = int.from_bytes(cap[0:2], "big") & 0x0FFF
                forwarding = frozenset(
                    fam[0]
                    for n in range(2, len(cap) - 3, 4)
                    if cap[n + 3] & 0x80 and (fam := _family(cap[n : n + 3])) is not None
                )
                return PeerGracefulRestart(peer, time_, forwarding)
            j += 2 + clen
        i = k
    return PeerGracefulRestart(peer, None)


def notification(peer: IPAddress, body: bytes) -> PeerNotification:
    """A received NOTIFICATION: code, subcode and its data as text."""
    if len(body) < 2:
        raise WireError(f"NOTIFICATION from {peer}: {len(body)} bytes")
    return PeerNotification(peer, body[0], body[1], body[2:].decode("utf-8", "replace"))
