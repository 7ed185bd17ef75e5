"""The lab plan: namespaces, wires, addresses and BGP peerings derived from a topology.

Pure functions only; ``runner`` carries the plan out. Every address lives inside the lab's
own namespaces, so two labs may (and do) reuse the same ranges:

- management: ``mgmt.ipv4-subnet`` (default 10.255.0.0/24), ``eth0`` of every non-bridge
  node, on a bridge inside the lab's ``<prefix>_mgmt`` namespace (containerlab's mgmt net);
- bridge segments: 10.255.8.0/21, one /24 per bridge node, members numbered from .1 in
  link order;
- point-to-point links: 10.255.16.0/20, one /30 per link, ``a`` gets .1 and ``b`` .2;
- router loopbacks (router ids): 10.255.255.0/24.

Peering: a router peers statically with every adjacent router and listens for hosts on
each host-facing subnet (a dynamic range, route-reflector clients when the AS is shared).
A host peers with its adjacent routers; a host with no adjacent router peers with every
other host (full mesh). Hosts get a default route through their adjacent routers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field

from lab.topology import Endpoint, Role, Topology, TopologyError

IPv4 = ipaddress.IPv4Address
IPv4If = ipaddress.IPv4Interface
IPv4Net = ipaddress.IPv4Network

SEGMENTS = IPv4Net("10.255.8.0/21")
P2P_LINKS = IPv4Net("10.255.16.0/20")
LOOPBACKS = IPv4Net("10.255.255.0/24")
# etcd.py gives member i the ports 2379 + 10 i / 2380 + 10 i inside a namespace.
ETCD_CLIENT_PORT = 2379
MGMT_BRIDGE = "br0"
# Labels that describe the lab itself, not the node: not handed on to fabricd.
TOPOLOGY_LABELS = frozenset({"fabric.role", "fabric.asn", "fabric.accept", "fabric.etcd.members"})


def lab_prefix(name: str) -> str:
    """Namespace prefix of a lab: ``fl`` + 5 hex digits of the name's hash + ``-``."""
    return "fl" + hashlib.sha1(name.encode()).hexdigest()[:5] + "-"


def _natural(ifname: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d*)$", ifname)
    assert m is not None
    return (m.group(1), int(m.group(2) or 0))


@dataclass(frozen=True, slots=True)
class Neighbor:
    name: str
    address: IPv4
    asn: int


@dataclass(frozen=True, slots=True)
class Range:
    """Hosts that may connect from ``subnet`` (dynamic neighbors)."""

    subnet: IPv4Net
    asn: int
    rr_client: bool


@dataclass(frozen=True, slots=True)
class Wire:
    """One veth pair, created directly inside its two namespaces."""

    a_ns: str
    a_if: str
    b_ns: str
    b_if: str


@dataclass(slots=True)
class NodePlan:
    name: str
    role: Role
    netns: str
    asn: int | None = None
    mgmt: IPv4If | None = None
    ifaces: dict[str, IPv4If | None] = field(default_factory=dict)
    loopback: IPv4 | None = None
    neighbors: list[Neighbor] = field(default_factory=list)
    ranges: list[Range] = field(default_factory=list)
    default_via: list[IPv4] = field(default_factory=list)
    bridge_ports: list[str] = field(default_factory=list)
    accept: tuple[IPv4Net, ...] = ()
    etcd_members: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # the node's own (fabric.rack, ...)

    @property
    def address(self) -> IPv4 | None:
        """The node address: its first data interface's, else its loopback or mgmt one."""
        for name in sorted(self.ifaces, key=_natural):
            addr = self.ifaces[name]
            if addr is not None:
                return addr.ip
        if self.loopback is not None:
            return self.loopback
        return self.mgmt.ip if self.mgmt else None

    @property
    def router_id(self) -> IPv4 | None:
        return self.loopback or self.address


@dataclass(slots=True)
class Plan:
    name: str
    prefix: str
    mgmt_ns: str
    nodes: dict[str, NodePlan]
    wires: list[Wire]
    etcd_endpoints: list[str]

    @property
    def namespaces(self) -> list[str]:
        return [self.mgmt_ns, *(n.netns for n in self.nodes.values())]


def _segment_members(topo: Topology) -> dict[str, list[Endpoint]]:
    members: dict[str, list[Endpoint]] = {
        n.name: [] for n in topo.nodes.values() if n.role == Role.BRIDGE
    }
    for link in topo.links:
        for near, far in ((link.a, link.b), (link.b, link.a)):
            if near.node in members:
                members[near.node].append(far)
    return members


def _mgmt(topo: Topology, plan: dict[str, NodePlan]) -> None:
    hosts = topo.mgmt_subnet.hosts()
    next(hosts)  # .1 stays free, as containerlab keeps it for the gateway
    taken = {n.mgmt_ipv4 for n in topo.nodes.values() if n.mgmt_ipv4}
    for node in topo.nodes.values():
        if node.role == Role.BRIDGE:
            continue
        ip = node.mgmt_ipv4
        while ip is None:
            cand = next(hosts)
            ip = None if cand in taken else cand
        plan[node.name].mgmt = IPv4If(f"{ip}/{topo.mgmt_subnet.prefixlen}")


def _addresses(topo: Topology, plan: dict[str, NodePlan]) -> dict[str, IPv4Net]:
    """Assign link and segment addresses; returns each segment's subnet by bridge name."""
    segments = list(SEGMENTS.subnets(new_prefix=24))
    p2p = P2P_LINKS.subnets(new_prefix=30)
    subnets: dict[str, IPv4Net] = {}
    for k, (bridge, eps) in enumerate(_segment_members(topo).items()):
        if k >= len(segments):
            raise TopologyError(f"topology.nodes.{bridge}: more than {len(segments)} bridges")
        subnets[bridge] = segments[k]
        for j, ep in enumerate(eps):
            plan[ep.node].ifaces[ep.ifname] = IPv4If(f"{segments[k][j + 1]}/24")
    for link in topo.links:
        ends = (link.a, link.b)
        port = next((e for e in ends if topo.nodes[e.node].role == Role.BRIDGE), None)
        if port is not None:
            plan[port.node].bridge_ports.append(port.ifname)
            continue
        net = next(p2p)
        for ep, host in zip(ends, (net[1], net[2]), strict=True):
            plan[ep.node].ifaces[ep.ifname] = IPv4If(f"{host}/30")
    loops = LOOPBACKS.hosts()
    for node in plan.values():
        if node.role.is_router:
            node.loopback = next(loops)
    return subnets


def _adjacent(
    topo: Topology, plan: dict[str, NodePlan], subnets: dict[str, IPv4Net]
) -> dict[str, list[tuple[str, IPv4Net]]]:
    """For each node: (neighbor node, shared subnet) for every L3 adjacency."""
    adj: dict[str, list[tuple[str, IPv4Net]]] = {n: [] for n in plan}
    for bridge, eps in _segment_members(topo).items():
        for x in eps:
            for y in eps:
                if x.node != y.node:
                    adj[x.node].append((y.node, subnets[bridge]))
    for link in topo.links:
        addr = plan[link.a.node].ifaces.get(link.a.ifname)
        if addr is not None and topo.nodes[link.b.node].role != Role.BRIDGE:
            adj[link.a.node].append((link.b.node, addr.network))
            adj[link.b.node].append((link.a.node, addr.network))
    return adj


def _ip_on(node: NodePlan, subnet: IPv4Net) -> IPv4:
    for addr in node.ifaces.values():
        if addr is not None and addr.network == subnet:
            return addr.ip
    raise AssertionError(f"{node.name} has no address on {subnet}")


def _peerings(plan: dict[str, NodePlan], adj: dict[str, list[tuple[str, IPv4Net]]]) -> None:
    for name, node in plan.items():
        if node.role.is_router:
            for other, subnet in adj[name]:
                peer = plan[other]
                if peer.role.is_router:
                    node.neighbors.append(Neighbor(other, _ip_on(peer, subnet), peer.asn or 0))
                elif peer.role == Role.NODE and peer.asn is not None:
                    rng = Range(subnet, peer.asn, rr_client=peer.asn == node.asn)
                    clash = [r for r in node.ranges if r.subnet == subnet and r.asn != peer.asn]
                    if clash:
                        raise TopologyError(
                            f"topology.nodes.{other}.labels.fabric.asn: hosts sharing "
                            f"{subnet} with router {name} must share one AS"
                        )
                    if rng not in node.ranges:
                        node.ranges.append(rng)
        elif node.role == Role.NODE:
            routers = [(o, s) for o, s in adj[name] if plan[o].role.is_router]
            for other, subnet in routers:
                addr = _ip_on(plan[other], subnet)
                node.neighbors.append(Neighbor(other, addr, plan[other].asn or 0))
                node.default_via.append(addr)
    meshed = [n for n in plan.values() if n.role == Role.NODE and not n.neighbors]
    for node in meshed:
        node.neighbors = [
            Neighbor(h.name, h.address, h.asn or 0)
            for h in meshed
            if h is not node and h.address is not None
        ]


def build(topo: Topology, name: str | None = None) -> Plan:
    """The full plan for ``topo`` run as lab ``name`` (default: the topology's name)."""
    lab_name = name or topo.name
    prefix = lab_prefix(lab_name)
    nodes = {
        n.name: NodePlan(
            name=n.name,
            role=n.role,
            netns=prefix + n.name,
            asn=n.asn,
            accept=n.accept if n.role.is_router else (),
            etcd_members=n.etcd_members if n.role == Role.ETCD else 0,
            labels={k: v for k, v in n.labels.items() if k not in TOPOLOGY_LABELS},
        )
        for n in topo.nodes.values()
    }
    _mgmt(topo, nodes)
    subnets = _addresses(topo, nodes)
    _peerings(nodes, _adjacent(topo, nodes, subnets))
    mgmt_ns = prefix + "_mgmt"
    wires = [
        Wire(n.netns, "eth0", mgmt_ns, f"m{i}")
        for i, n in enumerate(nodes.values())
        if n.role != Role.BRIDGE
    ]
    wires += [
        Wire(nodes[lk.a.node].netns, lk.a.ifname, nodes[lk.b.node].netns, lk.b.ifname)
        for lk in topo.links
    ]
    etcd = [
        f"{n.mgmt.ip}:{ETCD_CLIENT_PORT + 10 * i}"
        for n in nodes.values()
        if n.role == Role.ETCD and n.mgmt is not None
        for i in range(n.etcd_members)
    ]
    return Plan(
        name=lab_name, prefix=prefix, mgmt_ns=mgmt_ns, nodes=nodes, wires=wires, etcd_endpoints=etcd
    )
