"""What ``explain`` reads, in two round trips to etcd, and the endpoints resolved from it.

First read: every block, affinity, node and pool (four range reads at once); second: the
status documents of the nodes the two endpoints live on. Nothing else is read: the walk
(:mod:`fabric.explain.walk`) is pure over this snapshot, so what it says is what was read.

An endpoint is ``NAMESPACE/POD`` (the allocation whose attributes record that pod, as the
CNI ADD writes them), an IP address (its allocation if a block holds it, else the node
whose address it is) or a node name. A pod nobody records, an address neither in a pool nor
a node's, an unknown node are user errors (exit 1): the question cannot be asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fabric.errors import CLIError
from fabric.resources.bgp_store import BGPStore, Status
from ipam.block import Block, IPNetwork
from ipam.blocks import Affinity, BlockStore, node_of
from ipam.pool import Pool
from ipam.resources import Node, Resources
from ipam.store import Store

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(StrEnum):
    POD = "pod"  # NAMESPACE/POD, or an IP with an allocation
    ADDRESS = "address"  # an IP inside a pool that no allocation holds
    NODE = "node"  # a node name, or a node's own address


@dataclass(frozen=True, slots=True)
class Allocation:
    """One address as IPAM holds it: its block, and who took it."""

    ip: IPAddress
    block: IPNetwork
    handle: str
    attrs: Mapping[str, str]
    block_owner: str | None  # the block's affinity (host:<node>), None when orphaned

    @property
    def node(self) -> str | None:
        """Where the address lives: the node recorded at assignment, else the block's."""
        return self.attrs.get("node") or self.block_owner

    @property
    def borrowed(self) -> bool:
        return self.node is not None and self.node != self.block_owner

    @property
    def pod(self) -> str | None:
        ns, pod = (
            self.attrs.get("namespace"),
            self.attrs.get("pod") or self.attrs.get("containerID"),
        )
        return f"{ns or 'default'}/{pod}" if pod else None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of the question, resolved."""

    given: str
    kind: Kind
    ip: IPAddress | None
    node: str | None
    allocation: Allocation | None = None
    block: IPNetwork | None = None  # the block holding ``ip``, allocated or not
    all_ips: tuple[IPAddress, ...] = ()

    @property
    def label(self) -> str:
        if self.allocation is not None and self.allocation.pod:
            return self.allocation.pod
        if self.kind is Kind.NODE:
            return f"node {self.node}"
        return str(self.ip)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"given": self.given, "kind": str(self.kind),
                             "ip": str(self.ip) if self.ip else None, "node": self.node}  # fmt: skip
        a = self.allocation
        if a is not None:
            d.update(pod=a.pod, handle=a.handle, block=str(a.block), blockOwner=a.block_owner,
                     borrowed=a.borrowed)  # fmt: skip
        elif self.block is not None:
            d["block"] = str(self.block)
        return d


@dataclass
class Snapshot:
    """Everything the walk looks at, as read."""

    blocks: dict[IPNetwork, Block]
    affinities: dict[tuple[str, IPNetwork], Affinity]
    nodes: dict[str, Node]
    pools: list[Pool]
    statuses: dict[str, Status | None] = field(default_factory=dict)

    def pool_of(self, net: IPNetwork) -> Pool | None:
        for p in self.pools:
            if net.version == p.cidr.version and net.subnet_of(p.cidr):  # type: ignore[arg-type]
                return p
        return None

    def block_of(self, ip: IPAddress) -> Block | None:
        for cidr, b in self.blocks.items():
            if ip.version == cidr.version and ip in cidr:
                return b
        return None

    def node_of_address(self, ip: IPAddress) -> str | None:
        for n in self.nodes.values():
            for a in n.addresses:
                try:
                    if ipaddress.ip_interface(a).ip == ip:
                        return n.name
                except ValueError:
                    continue
        return None


async def read(store: Store) -> Snapshot:
    """Blocks, affinities, nodes and pools, read concurrently."""
    bs, res = BlockStore(store), Resources(store)
    (blocks, _), affs, nodes, pools = await asyncio.gather(
        bs.list_blocks(), bs.affinities(), res.list_nodes(), res.list_pools()
    )
    return Snapshot(
        blocks={c: b for c, (_, b) in blocks.items()},
        affinities={(a.node, a.cidr): a for a in affs},
        nodes={n.name: n for n in nodes},
        pools=pools,
    )


async def read_statuses(store: Store, snap: Snapshot, nodes: set[str]) -> None:
    """The status documents of ``nodes`` into ``snap`` (None where none is published)."""
    bgp = BGPStore(store)
    names = sorted(nodes)
    docs = await asyncio.gather(*(bgp.get_status(n) for n in names))
    snap.statuses.update(zip(names, docs, strict=True))


# ------------------------------------------------------------------------ endpoints


def _allocation(block: Block, ip: IPAddress) -> Allocation | None:
    owner = block.owner(block.ordinal(ip))
    if owner is None:
        return None
    return Allocation(ip, block.cidr, owner.handle, dict(owner.secondary), node_of(block))


def resolve(snap: Snapshot, text: str, what: str) -> Endpoint:
    """``text`` (NAMESPACE/POD, an IP or a node name) as an endpoint; CLIError naming
    ``what`` (SRC, DST) when it names nothing the fabric knows."""
    text = text.strip()
    if "/" in text:
        return _pod(snap, text, what)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return _node(snap, text, what)
    block = snap.block_of(ip)
    if block is not None:
        alloc = _allocation(block, ip)
        if alloc is not None:
            return Endpoint(text, Kind.POD, ip, alloc.node, alloc, block.cidr, (ip,))
        return Endpoint(text, Kind.ADDRESS, ip, node_of(block), None, block.cidr, (ip,))
    node = snap.node_of_address(ip)
    if node is not None:
        return Endpoint(text, Kind.NODE, ip, node, all_ips=(ip,))
    if snap.pool_of(ipaddress.ip_network(ip)) is not None:
        return Endpoint(text, Kind.ADDRESS, ip, None, all_ips=(ip,))
    raise CLIError(f"{ip} is in no IP pool and is no node's address: explain covers pods and "
                   "nodes of the fabric", what)  # fmt: skip


def _pod(snap: Snapshot, text: str, what: str) -> Endpoint:
    ns, _, pod = text.partition("/")
    if not ns or not pod or "/" in pod:
        raise CLIError(f"{text!r} is not NAMESPACE/POD", what)
    found: list[Allocation] = []
    for b in snap.blocks.values():
        for ordinal, attr in b.allocated():
            sec = attr.secondary
            # the policy endpoint's name: the pod, else (no Kubernetes arguments) the container
            name = sec.get("pod") or sec.get("containerID")
            if name == pod and (sec.get("namespace") or "default") == ns:
                found.append(Allocation(b.ip(ordinal), b.cidr, attr.handle, dict(sec),
                                        node_of(b)))  # fmt: skip
    if not found:
        raise CLIError(f"no pod {ns}/{pod}: no IPAM allocation records it", what)
    found.sort(key=lambda a: (a.ip.version, int(a.ip)))
    first = found[0]
    return Endpoint(text, Kind.POD, first.ip, first.node, first, first.block,
                    tuple(a.ip for a in found))  # fmt: skip


def _node(snap: Snapshot, name: str, what: str) -> Endpoint:
    n = snap.nodes.get(name)
    known = n is not None or any(node == name for node, _ in snap.affinities)
    if not known:
        raise CLIError(f"{name!r} is not NAMESPACE/POD, an IP address or a known node", what)
    ips: list[IPAddress] = []
    for a in n.addresses if n is not None else ():
        try:
            ips.append(ipaddress.ip_interface(a).ip)
        except ValueError:
            continue
    return Endpoint(name, Kind.NODE, ips[0] if ips else None, name, all_ips=tuple(ips))


def same_family(src: Endpoint, dst: Endpoint, snap: Snapshot) -> tuple[Endpoint, Endpoint]:
    """Both ends in one IP family (IPv4 first) when a pod or node has addresses of both."""
    for version in (4, 6):
        s = next((ip for ip in src.all_ips if ip.version == version), None)
        d = next((ip for ip in dst.all_ips if ip.version == version), None)
        if s is not None and d is not None:
            return _with_ip(src, s, snap), _with_ip(dst, d, snap)
    return src, dst


def _with_ip(e: Endpoint, ip: IPAddress, snap: Snapshot) -> Endpoint:
    if e.ip == ip or e.kind is not Kind.POD:
        return Endpoint(e.given, e.kind, ip, e.node, e.allocation, e.block, e.all_ips)
    block = snap.block_of(ip)
    alloc = _allocation(block, ip) if block is not None else None
    return Endpoint(e.given, e.kind, ip, alloc.node if alloc else e.node, alloc or e.allocation,
                    block.cidr if block else None, e.all_ips)  # fmt: skip
