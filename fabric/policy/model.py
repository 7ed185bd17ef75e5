"""The compiled policy model: the contract between the compiler (fabric.policy) and the
dataplane renderer (fabric.dataplane.policy_table), and the input of verdict()/trace().

Everything is a frozen, slotted dataclass with ``ipaddress`` types.

Reading a ``Compiled`` (what the renderer must do, and what verdict() does):

- ``Compiled.endpoints`` holds one ``EndpointRules`` per endpoint the compile was asked for
  (the local node's, or every endpoint when compiled with ``local_node=None``), keyed by
  ``"namespace/name"``. Endpoints selected by no policy are present too, with both
  directions ``None``.
- Per direction: ``None`` = not isolated, accept. A ``DirectionRules`` = isolated: a packet
  is accepted iff some ``Rule`` in ``rules`` matches it (an empty tuple denies all).
  Ingress is evaluated at the destination endpoint on packets *to* it (peer = source
  address); egress at the source endpoint on packets *from* it (peer = destination).
- A ``Rule`` matches a packet iff its peer matches AND its port matches:
  peer: ``peer_sets is None`` (any peer) or the peer address is in ANY set named in
  ``peer_sets`` (sets of the other family simply never match).
  port: ``ports is None`` (all ports and protocols; then ``named_port_sets`` is empty), or
  some ``PortMatch`` matches (protocol equal and, unless ``port is None``, destination
  port in ``[port, end_port or port]``), or ``(daddr, protocol, dport)`` is in ANY set named
  in ``named_port_sets`` (egress named ports, resolved per destination pod).
  A rule with ``ports == ()`` and no ``named_port_sets`` matches nothing (e.g. an ingress
  named port the local pod does not declare); it is kept so trace() can say so, and the
  renderer may skip it.
- Not encoded as rules (the renderer adds them, verdict() models them): replies of
  accepted connections (conntrack established/related); a pod reaching itself (any of its
  own addresses, either direction); traffic from the node itself to its local pods.
- ``Compiled.sets`` holds every set a rule names. Set names are content-addressed by
  what *defines* the set (canonical selector + namespace, ipBlock, named port + protocol),
  never by its elements: a label change or a pod ADD changes elements only.

Producers and consumers (the rest of the public API):
``fabric.policy.compiler.compile(policies, namespaces, endpoints, local_node) -> Compiled``
with ``policies: Iterable[fabric.resources.policy_model.NetworkPolicy]``,
``namespaces: Iterable[fabric.resources.policy_model.Namespace]``,
``endpoints: Iterable[Endpoint]``, ``local_node: str | None`` (None = every endpoint);
``fabric.policy.verdict.verdict(compiled, src, dst, port, protocol) -> Verdict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from fabric.resources.policy_model import Direction, NamedPort, Protocol

__all__ = [
    "Compiled", "Direction", "DirectionRules", "Endpoint", "EndpointRules", "IPAddress",
    "IPNetwork", "NamedPort", "PortMatch", "Protocol", "Rule", "SetElement", "SetKind", "SetSpec",
]  # fmt: skip

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A pod as policy sees it. ``node`` is the node whose IPAM block holds its address;
    ``ifname`` is the host-side veth for local pods (None for remote ones or unknown)."""

    namespace: str
    name: str
    ips: tuple[IPAddress, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[NamedPort, ...] = ()
    node: str = ""
    ifname: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PortMatch:
    """Protocol plus an inclusive port range; ``port is None`` = every port of ``protocol``."""

    protocol: Protocol
    port: int | None = None
    end_port: int | None = None

    def matches(self, protocol: Protocol, port: int) -> bool:
        if protocol != self.protocol:
            return False
        if self.port is None:
            return True
        return self.port <= port <= (self.end_port if self.end_port is not None else self.port)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``ingress[index]`` / ``egress[index]`` rule of policy ``policy`` ("ns/name")."""

    policy: str
    index: int
    direction: Direction
    peer_sets: tuple[str, ...] | None
    ports: tuple[PortMatch, ...] | None
    named_port_sets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DirectionRules:
    """The endpoint is isolated in this direction by ``policies`` (sorted "ns/name")."""

    policies: tuple[str, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class EndpointRules:
    key: str
    ifname: str | None
    ips: tuple[IPAddress, ...]
    ingress: DirectionRules | None
    egress: DirectionRules | None


SetKind = Literal["addr4", "addr6", "net4", "net6", "addrport4", "addrport6"]
# addr*: IPv4Address/IPv6Address; net*: IPv4Network/IPv6Network (non-overlapping, the
# ipBlock cidr minus its excepts); addrport*: (address, Protocol, port) tuples.
SetElement = IPAddress | IPNetwork | tuple[IPAddress, Protocol, int]


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    kind: SetKind
    elements: frozenset[SetElement]
    origin: str = ""  # what defines it, for people (trace, nft comments): not part of the name


@dataclass(frozen=True, slots=True)
class Compiled:
    endpoints: Mapping[str, EndpointRules]
    sets: Mapping[str, SetSpec]
