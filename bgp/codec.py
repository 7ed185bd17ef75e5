"""ExaBGP 5 API line codec. Pure: no I/O.

Inbound, ``parse_line`` turns one line that ExaBGP wrote to its API process into:

- a list of ``bgp.model`` events (``PeerState``, ``PeerUpdate``, ``EndOfRib``,
  ``PeerNotification``; empty for JSON messages we do not consume, such as ``open``);
- an ``Ack`` (``done`` / ``error``: plain text even with ``encoder json``);
- ``SpeakerShutdown`` (ExaBGP is stopping: its ``"notification": "shutdown"`` message);
- ``RelayNotice`` (a line added by ``bgp.relay``: it (re)connected, or dropped lines);
- ``Reply`` for any other text line (answers to ``version`` and ``show`` commands).

A line that starts like JSON but does not decode raises ``SpeakerError``.
ExaBGP 4.2's flat ``as-path`` list is accepted as well as 5.x's segment object, and NLRIs
as plain strings (``exabgp.api.compact``) as well as ``{"nlri": ...}`` objects.

Outbound, the ``*_command(s)`` functions format API commands. Adverts with the same next
hop, communities and family share ``announce attributes ... nlri p1 p2 ...`` lines of at
most ``MAX_PER_LINE`` prefixes, the pattern the probe measured fastest on ExaBGP 5.0.15
(about 3k prefixes/s with at most 4 lines awaiting their ack). Every command takes an
optional ``neighbor`` to scope it to one peer (``neighbor <ip> announce ...``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bgp import wire
from bgp.errors import SpeakerError, ValidationError
from bgp.interned import address as _ip
from bgp.interned import nlri4, nlri6
from bgp.interned import prefix as _net
from bgp.model import (
    Advert,
    Announce,
    EndOfRib,
    Event,
    IPAddress,
    IPNetwork,
    PathAttrs,
    PeerGracefulRestart,
    PeerNotification,
    PeerState,
    PeerUpdate,
    SessionState,
)

# 100 prefixes per line: 2.7 s per 10k on ExaBGP 5.0.15, against 4.1 s with one route per
# line; 1000 per line was slower (7.7 s) because ExaBGP's per-line work is superlinear.
MAX_PER_LINE = 100
FAMILIES = ("ipv4 unicast", "ipv6 unicast", "ipv4 multicast", "ipv6 multicast")
VERSION_COMMAND = "version"
_COMMUNITY = re.compile(r"^\d{1,10}:\d{1,10}$")
_LARGE_COMMUNITY = re.compile(r"^\d{1,10}:\d{1,10}:\d{1,10}$")

_STATES = {
    "connected": SessionState.CONNECTED,
    "up": SessionState.ESTABLISHED,
    "down": SessionState.DOWN,
}


class Ack(StrEnum):
    """ExaBGP's answer to one command line."""

    DONE = "done"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    """A text line that is neither JSON nor an ack (e.g. ``exabgp 5.0.15``)."""

    text: str


@dataclass(frozen=True, slots=True)
class SpeakerShutdown:
    """ExaBGP announced its own shutdown; EOF on the API pipe follows."""


@dataclass(frozen=True, slots=True)
class RelayNotice:
    """The relay (re)connected (``connected``) and/or dropped ``dropped`` lines so far.

    ``dropped`` is cumulative over the relay's life; ``pid`` tells relays apart (ExaBGP
    respawns a relay that died, and the new one does not replay anything).
    """

    pid: int
    connected: bool
    dropped: int


Control = Ack | Reply | SpeakerShutdown | RelayNotice
Parsed = list[Event] | Control


def parse_line(line: bytes) -> Parsed:
    """Decode one line (with or without its newline). See the module docstring."""
    if line[:1] != b"{":
        text = line.strip().decode("utf-8", "replace")
        if text == "done":
            return Ack.DONE
        if text == "error":
            return Ack.ERROR
        return Reply(text)
    try:
        msg = json.loads(line)
        return _decode(msg)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        shown = line[:200].decode("utf-8", "replace")
        raise SpeakerError(f"failed to decode ExaBGP message {shown!r}: {e!r}") from e


def _decode(msg: dict[str, Any]) -> Parsed:
    kind = msg.get("type")
    neighbor = msg.get("neighbor")
    if isinstance(neighbor, dict) and "category" in (neighbor.get("message") or ()):
        return _packet(neighbor)
    if kind == "update":
        return _update(msg["neighbor"])
    if kind == "state":
        return _state(msg["neighbor"])
    if kind == "notification":
        if msg.get("notification") == "shutdown":
            return SpeakerShutdown()
        nb: Mapping[str, Any] = msg.get("neighbor") or {}
        note = nb.get("notification")
        if not isinstance(note, Mapping) or nb.get("direction", "receive") != "receive":
            return []
        peer = ipaddress.ip_address(nb["address"]["peer"])
        return [
            PeerNotification(
                peer, int(note["code"]), int(note["subcode"]), str(note.get("message", ""))
            )
        ]
    if kind == "open":
        return _open(msg["neighbor"])
    if kind == "relay":
        return RelayNotice(int(msg["pid"]), bool(msg["connected"]), int(msg["dropped"]))
    return []


def _open(nb: Mapping[str, Any]) -> list[Event]:
    """A received OPEN: its graceful-restart capability (RFC 4724). ExaBGP 5 labels the
    per-family F bit (0x80, forwarding state preserved) "restart" in its JSON."""
    if nb.get("direction", "receive") != "receive":
        return []
    opened = nb.get("open")
    if not isinstance(opened, Mapping):
        return []
    peer = ipaddress.ip_address(nb["address"]["peer"])
    caps = opened.get("capabilities") or {}
    gr = caps.get("graceful-restart") if isinstance(caps, Mapping) else None
    if not isinstance(gr, Mapping):
        return [PeerGracefulRestart(peer, None)]
    forwarding = frozenset(
        fam.replace("/", " ")
        for fam, flags in (gr.get("address-family-flags") or {}).items()
        if isinstance(flags, list) and "restart" in flags
    )
    return [PeerGracefulRestart(peer, int(gr.get("time", 0)), forwarding)]


def _state(nb: Mapping[str, Any]) -> list[Event]:
    state = _STATES.get(nb.get("state", ""))
    if state is None:
        return []
    addr = nb["address"]
    local = addr.get("local")
    peer_as = nb.get("asn", {}).get("peer")
    return [
        PeerState(
            peer=ipaddress.ip_address(addr["peer"]),
            state=state,
            reason=str(nb.get("reason", "")),
            local=ipaddress.ip_address(local) if local else None,
            peer_as=int(peer_as) if peer_as is not None else None,
        )
    ]


def _update(nb: Mapping[str, Any]) -> list[Event]:
    if nb.get("direction", "receive") != "receive":
        return []
    peer = _ip(nb["address"]["peer"])
    message = nb["message"]
    eor = message.get("eor")
    if eor is not None:
        return [EndOfRib(peer, f"{eor['afi']} {eor['safi']}")]
    update = message.get("update")
    if update is None:
        return []
    announced: list[Announce] = []
    withdrawn: list[IPNetwork] = []
    ann = update.get("announce")
    if ann:
        attrs = _attrs(update.get("attribute") or {})
        for family, by_hop in ann.items():
            if family in FAMILIES:
                _announces(by_hop, attrs, announced)
    wd = update.get("withdraw")
    if wd:
        for family, items in wd.items():
            if family in FAMILIES:
                withdrawn.extend(map(_net, _nlris(items)))
    if not announced and not withdrawn:
        return []
    return [PeerUpdate(peer, tuple(announced), tuple(withdrawn))]


def _announces(by_hop: Mapping[str, Any], attrs: PathAttrs, out: list[Announce]) -> None:
    hops = list(by_hop)
    if len(hops) > 1:
        # An IPv6 MP_REACH carrying a global and a link-local next hop is rendered as the
        # same NLRIs listed under each: keep the global one only, or every route would
        # look like a two-way ECMP.
        global_hops = [h for h in hops if not h.lower().startswith("fe80")]
        if global_hops:
            hops = global_hops
    for hop in hops:
        if hop == "null":
            continue
        nh = _ip(hop)
        out.extend(Announce(_net(text), nh, attrs) for text in _nlris(by_hop[hop]))


def _nlris(items: Iterable[Any]) -> Iterable[str]:
    """The prefixes of a JSON NLRI list: plain strings with ``exabgp.api.compact`` (what
    fabricd runs ExaBGP with: half the JSON, for ExaBGP to build and for us to decode), or
    ``{"nlri": ...}`` objects (ExaBGP's default, and always when ADD-PATH adds a path id)."""
    for item in items:
        if item.__class__ is str:
            yield item
        elif "nlri" in item:
            yield item["nlri"]


def _packet(nb: Mapping[str, Any]) -> list[Event]:
    """A message ExaBGP passed on as bytes (``receive { packets; }``): UPDATE, OPEN or
    NOTIFICATION, decoded by ``bgp.wire``. ``negotiated`` says whether AS numbers are 4
    octets (absent: assumed, as every peer fabricd meets negotiates it)."""
    if nb.get("direction", "receive") != "receive":
        return []
    peer = _ip(nb["address"]["peer"])
    message = nb["message"]
    category = int(message["category"])
    body = bytes.fromhex(message["body"][2:])
    if category == 2:
        asn4 = bool((nb.get("negotiated") or {}).get("asn4", True))
        return wire.update(peer, body, asn4, nlri4, nlri6, _ip)
    if category == 1:
        return [wire.open_message(peer, body)]
    if category == 3:
        return [wire.notification(peer, body)]
    return []


def _attrs(a: Mapping[str, Any]) -> PathAttrs:
    if not a:
        return PathAttrs()
    orig = a.get("originator-id")
    comms = [f"{c[0]}:{c[1]}" for c in a.get("community") or ()]
    comms += [f"{c[0]}:{c[1]}:{c[2]}" for c in a.get("large-community") or ()]
    lp = a.get("local-preference")
    return PathAttrs(
        as_path=_as_path(a.get("as-path")),
        originator_id=ipaddress.IPv4Address(orig) if orig else None,
        cluster_list=tuple(str(c) for c in a.get("cluster-list") or ()),
        local_pref=int(lp) if lp is not None else None,
        communities=tuple(comms),
    )


def _as_path(p: Any) -> tuple[int, ...]:
    """5.x: ``{"0": {"element": "as-sequence", "value": [..]}, ..}``; 4.2: ``[a, b, [c]]``.

    Every AS of every segment, in order (sets included, so loop checks see them).
    """
    if not p:
        return ()
    out: list[int] = []
    if isinstance(p, Mapping):
        for key in sorted(p, key=int):
            _flatten(p[key].get("value", ()), out)
    else:
        _flatten(p, out)
    return tuple(out)


def _flatten(v: Any, out: list[int]) -> None:
    for x in v:
        if isinstance(x, list | tuple):
            _flatten(x, out)
        else:
            out.append(int(x))


def neighbor_descriptions(lines: Iterable[str]) -> dict[IPAddress, str]:
    """Peer address -> description from the reply lines of ``show neighbor configuration``."""
    out: dict[IPAddress, str] = {}
    peer: IPAddress | None = None
    for line in lines:
        words = line.split()
        if len(words) == 3 and words[0] == "neighbor" and words[2] == "{":
            try:
                peer = ipaddress.ip_address(words[1])
            except ValueError:
                peer = None
        elif words[:1] == ["description"] and peer is not None:
            out[peer] = line.strip().removeprefix("description").strip().rstrip(";").strip('"')
    return out


# ---------------------------------------------------------------------------- commands


def family_of(prefix: IPNetwork) -> str:
    return "ipv4 unicast" if prefix.version == 4 else "ipv6 unicast"


def _scope(neighbor: IPAddress | None) -> str:
    return f"neighbor {neighbor} " if neighbor is not None else ""


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValidationError("family", f"{family!r} is not one of {', '.join(FAMILIES)}")
    return family


def community_clause(communities: tuple[str, ...]) -> str:
    """`` community [ a:b ]`` / `` large-community [ a:b:c ]`` (empty for none)."""
    std = [c for c in communities if _COMMUNITY.match(c)]
    large = [c for c in communities if _LARGE_COMMUNITY.match(c)]
    if len(std) + len(large) != len(communities):
        bad = next(c for c in communities if c not in std and c not in large)
        raise ValidationError("communities", f"{bad!r} is not aa:nn or aa:nn:mm")
    out = ""
    if std:
        out += f" community [ {' '.join(std)} ]"
    if large:
        out += f" large-community [ {' '.join(large)} ]"
    return out


GroupKey = tuple[str, IPAddress | None, tuple[str, ...]]


def group_adverts(adverts: Iterable[Advert]) -> dict[GroupKey, list[IPNetwork]]:
    """Prefixes keyed by (family, next hop or None for self, communities), input order kept."""
    groups: dict[GroupKey, list[IPNetwork]] = {}
    for a in adverts:
        key = (family_of(a.prefix), a.next_hop, a.communities)
        groups.setdefault(key, []).append(a.prefix)
    return groups


def announce_line(
    next_hop: IPAddress | None,
    communities: tuple[str, ...],
    prefixes: Iterable[IPNetwork],
    neighbor: IPAddress | None = None,
) -> str:
    """One ``announce attributes`` command; ``next_hop`` None is ``self``."""
    nh = "self" if next_hop is None else str(next_hop)
    nlri = " ".join(map(str, prefixes))
    return f"{_scope(neighbor)}announce attributes next-hop {nh}{community_clause(communities)} nlri {nlri}"


def withdraw_line(prefixes: Iterable[IPNetwork], neighbor: IPAddress | None = None) -> str:
    """One ``withdraw attributes nlri`` command (5.0.15 needs no next hop to withdraw)."""
    return f"{_scope(neighbor)}withdraw attributes nlri {' '.join(map(str, prefixes))}"


def announce_commands(
    adverts: Iterable[Advert],
    neighbor: IPAddress | None = None,
    max_per_line: int = MAX_PER_LINE,
) -> list[str]:
    """Announce ``adverts``, grouped by (family, next hop, communities), ≤ ``max_per_line``
    prefixes per line. A prefix given twice is announced twice (the last one wins)."""
    out = []
    for (_, nh, comms), prefixes in group_adverts(adverts).items():
        for i in range(0, len(prefixes), max_per_line):
            out.append(announce_line(nh, comms, prefixes[i : i + max_per_line], neighbor))
    return out


def withdraw_commands(
    prefixes: Iterable[IPNetwork],
    neighbor: IPAddress | None = None,
    max_per_line: int = MAX_PER_LINE,
) -> list[str]:
    """Withdraw ``prefixes``, one family per line, ≤ ``max_per_line`` per line.

    ExaBGP answers ``done`` (and still sends a WITHDRAW) for a prefix it never announced.
    """
    by_family: dict[str, list[IPNetwork]] = {}
    for p in prefixes:
        by_family.setdefault(family_of(p), []).append(p)
    out = []
    for group in by_family.values():
        for i in range(0, len(group), max_per_line):
            out.append(withdraw_line(group[i : i + max_per_line], neighbor))
    return out


def eor_command(family: str, neighbor: IPAddress | None = None) -> str:
    """End-of-RIB for ``family`` (needed with ``manual-eor``). ExaBGP answers ``error`` at
    once when no matching session is established."""
    return f"{_scope(neighbor)}announce eor {_check_family(family)}"


def route_refresh_command(family: str, neighbor: IPAddress | None = None) -> str:
    """Ask the peer(s) to resend ``family`` (needs the route-refresh capability)."""
    return f"{_scope(neighbor)}announce route-refresh {_check_family(family)}"
