"""BGP data model shared by the planner, the RIB and the speaker. Pure: no I/O.

Nodes as the planner sees them (``NodeInfo``), the sessions it plans (``Session``), and what
crosses the speaker boundary: adverts out, events in. The datastore documents (``BGPConfig``,
``Peer``) are in ``bgp.config``.

Speaker events (``PeerState``, ``PeerUpdate``, ``EndOfRib``, ``PeerNotification``,
``SpeakerRestarted``) are what the ExaBGP codec produces and the RIB consumes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_AS = 64512
BGP_PORT = 179
# Hold time when nothing is configured: RFC 4271's suggested 90 s; keepalive = hold / 3.
DEFAULT_HOLD_TIME = 90
# Graceful-restart time we announce: long enough for fabricd + ExaBGP to restart (about
# 2 s here) many times over, short enough that a node that really died is not a black
# hole for long on routers that keep its routes as stale (Calico/BIRD use 120 s too).
DEFAULT_RESTART_TIME = 120
MD5_MAX = 80  # RFC 2385 keys: ExaBGP and the kernel refuse longer ones


class PeerType(StrEnum):
    """What a session is, as ``fabricctl bgp status`` shows it (calicoctl's wording)."""

    MESH = "node-to-node mesh"
    GLOBAL = "global"
    NODE = "node specific"
    RR = "route reflector"


class SessionState(StrEnum):
    IDLE = "idle"
    CONNECTED = "connected"
    ESTABLISHED = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A fabric node as the planner sees it."""

    name: str
    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None
    as_number: int | None = None  # None: the cluster AS from BGPConfig
    labels: Mapping[str, str] = field(default_factory=dict)
    rr_cluster_id: str | None = None

    @property
    def router_id(self) -> ipaddress.IPv4Address:
        """The node's IPv4 address, else a stable hash of its name (as Calico's ``hash``)."""
        if self.ipv4 is not None:
            return self.ipv4.ip
        digest = hashlib.sha256(self.name.encode()).digest()
        return ipaddress.IPv4Address(int.from_bytes(digest[:4], "big") | 0x01000000)


@dataclass(frozen=True, slots=True)
class Session:
    """One planned BGP session of the local node. ``key`` (the peer address) is unique."""

    name: str  # Calico-style: Mesh_10_0_0_2, Global_10_0_0_1, Node_10_0_0_1, RR_10_0_0_5
    kind: PeerType
    peer_ip: IPAddress
    peer_as: int
    local_as: int
    local_address: IPAddress
    router_id: ipaddress.IPv4Address
    peer_port: int = BGP_PORT
    passive: bool = False
    hold_time: int = DEFAULT_HOLD_TIME
    keepalive_time: int | None = None
    password_file: str | None = None
    password_credential: str | None = None  # a file under $CREDENTIALS_DIRECTORY
    restart_time: int = DEFAULT_RESTART_TIME
    rr_client: bool = False  # the local node reflects routes to this peer
    cluster_id: str | None = None
    max_prefixes: int | None = None
    required: bool = False
    peer_node: str | None = None  # the fabric node on the far side, if any
    allow_local_as: int = 0  # Peer.num_allowed_local_as
    ttl_security: int = 0  # GTSM: the peer is at most this many hops away (0: off)
    source_auto: bool = False  # sourceAddress None: the kernel picks the source address
    families: tuple[str, ...] = ("ipv4 unicast", "ipv6 unicast")

    @property
    def key(self) -> IPAddress:
        return self.peer_ip


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PathAttrs:
    as_path: tuple[int, ...] = ()
    originator_id: ipaddress.IPv4Address | None = None
    cluster_list: tuple[str, ...] = ()
    local_pref: int | None = None
    communities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Announce:
    prefix: IPNetwork
    next_hop: IPAddress
    attrs: PathAttrs = PathAttrs()


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """One UPDATE from ``peer``: routes announced and prefixes withdrawn."""

    peer: IPAddress
    announced: tuple[Announce, ...] = ()
    withdrawn: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerState:
    peer: IPAddress
    state: SessionState
    reason: str = ""
    local: IPAddress | None = None
    peer_as: int | None = None


@dataclass(frozen=True, slots=True)
class EndOfRib:
    peer: IPAddress
    family: str  # "ipv4 unicast"


@dataclass(frozen=True, slots=True)
class PeerNotification:
    peer: IPAddress
    code: int
    subcode: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class PeerGracefulRestart:
    """The graceful-restart capability in the OPEN ``peer`` sent: its restart time (None:
    no capability at all) and the families for which it preserves forwarding state across
    a restart (RFC 4724 F bit). Only those families' routes are worth keeping as stale
    when its session drops: a router that lists none (FRR's default helper mode) flushes
    its own forwarding table when it stops."""

    peer: IPAddress
    restart_time: int | None
    forwarding: frozenset[str] = frozenset()  # "ipv4 unicast", "ipv6 unicast"


@dataclass(frozen=True, slots=True)
class SpeakerRestarted:
    """The ExaBGP process was (re)started; every session starts from scratch."""

    restarts: int


Event = (
    PeerUpdate | PeerState | EndOfRib | PeerNotification | PeerGracefulRestart | SpeakerRestarted
)


@dataclass(frozen=True, slots=True)
class Advert:
    """A route the local node announces: prefix, next hop, communities (literal values).

    ``next_hop`` None means "self": each session uses its own local address, which is what
    a node homed to several routers on different subnets needs. IPv6 prefixes carried over
    an IPv4 session need an explicit IPv6 next hop (ExaBGP refuses "self" across families).
    """

    prefix: IPNetwork
    next_hop: IPAddress | None = None
    communities: tuple[str, ...] = ()
