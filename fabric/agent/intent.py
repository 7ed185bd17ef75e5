"""What the node should look like, computed from the datastore copy. Pure: no I/O.

``decode`` turns the watched etcd keys into typed inputs (skipping, and reporting, any
document that does not parse, so one bad peer cannot stop a node); ``compute`` turns the
inputs into the node's intent: BGP sessions, announcements, blackholes for its own blocks,
the import policy for what it learns, and the NAT sets.

Invariants:
- Only *confirmed* affine blocks are announced and blackholed (never pending ones), one
  aggregate per block. A block of a pool with ``disableBGPExport`` is not announced but
  still blackholed: the blackhole is about this node, not about BGP. It drops traffic to a
  free address of the block here instead of sending it up the default route to a ToR that
  may route it back (a loop until the TTL runs out), and pods' host routes, more specific,
  win over it either way (the mesh3 lab test checks it stays when export is disabled).
- A /32 (/128) is announced only for an address this node borrowed from another node's
  block.
- The import policy accepts prefixes inside IP pools (and ``importCIDRs``), never one equal
  to or covering this node's own blocks or adverts.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bgp.config import BGPConfig, Peer
from bgp.errors import BGPError
from bgp.import_policy import ImportPolicy
from bgp.model import Advert, IPAddress, IPInterface, IPNetwork, NodeInfo, Session
from bgp.plan import plan_sessions
from ipam import keys
from ipam.block import Block
from ipam.blocks import Affinity, AffinityState, node_of
from ipam.errors import IPAMError
from ipam.pool import Pool
from ipam.resources import Node, loads
from ipam.store import KV

log = logging.getLogger("fabric.agent.intent")

Matcher = Callable[[str, Mapping[str, str]], bool]


@dataclass(frozen=True, slots=True)
class Inputs:
    local: NodeInfo
    local_interfaces: tuple[IPInterface, ...]
    pools: tuple[Pool, ...]
    bgp: BGPConfig
    peers: tuple[Peer, ...]
    nodes: tuple[NodeInfo, ...]
    own_blocks: tuple[IPNetwork, ...]  # confirmed affinities of this node
    borrowed: tuple[IPAddress, ...]  # this node's addresses inside other nodes' blocks
    problems: tuple[str, ...] = ()  # documents that did not parse


@dataclass(frozen=True, slots=True)
class Intent:
    sessions: tuple[Session, ...]
    adverts: frozenset[Advert]
    blackholes: frozenset[IPNetwork]
    policy: ImportPolicy
    nat_cidrs: tuple[IPNetwork, ...]
    pool_cidrs: tuple[IPNetwork, ...]
    limits: Mapping[IPAddress, int | None] = field(default_factory=dict)
    export_cidrs: tuple[IPNetwork, ...] = ()  # pools whose addresses are announced


def node_info(node: Node) -> NodeInfo:
    """The planner's view of a registered node (first address of each family)."""
    v4: ipaddress.IPv4Interface | None = None
    v6: ipaddress.IPv6Interface | None = None
    for a in node.addresses:
        try:
            iface = ipaddress.ip_interface(a)
        except ValueError:
            continue
        if isinstance(iface, ipaddress.IPv4Interface) and v4 is None:
            v4 = iface
        elif isinstance(iface, ipaddress.IPv6Interface) and v6 is None:
            v6 = iface
    return NodeInfo(
        name=node.name,
        ipv4=v4,
        ipv6=v6,
        as_number=node.as_number,
        labels=dict(node.labels),
        rr_cluster_id=node.route_reflector_cluster_id,
    )


class BlockIndex:
    """Parsed blocks, re-parsed only when a block's revision changes."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[int, Block | None]] = {}

    def blocks(self, kvs: Mapping[str, KV]) -> list[Block]:
        out = []
        for k in list(self._parsed):
            if k not in kvs:
                del self._parsed[k]
        for k, kv in kvs.items():
            have = self._parsed.get(k)
            if have is None or have[0] != kv.mod:
                try:
                    have = (kv.mod, Block.loads(kv.value))
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("skipping block %s that does not parse: %s", k, e)
                    have = (kv.mod, None)
                self._parsed[k] = have
            if have[1] is not None:
                out.append(have[1])
        return out


def borrowed_ips(blocks: Sequence[Block], node: str) -> list[IPAddress]:
    """Addresses allocated to ``node`` inside blocks affine to another node (or none)."""
    out: list[IPAddress] = []
    for b in blocks:
        if node_of(b) == node:
            continue
        for ordinal, attr in b.allocated():
            if attr.secondary.get("node") == node:
                out.append(b.ip(ordinal))
    return out


def decode(
    local: NodeInfo,
    local_interfaces: Sequence[IPInterface],
    data: Mapping[str, Mapping[str, KV]],
    block_index: BlockIndex,
    check_selector: Callable[[str], None] | None = None,
) -> Inputs:
    """Typed inputs from the cache (``data`` maps watched prefix -> key -> KV)."""
    problems: list[str] = []

    def parse(kind: str, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (IPAMError, BGPError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{kind} {key}: {e}")
            return None

    def name(kv: KV, prefix: str) -> str:
        return kv.key[len(prefix) :]

    pools: list[Pool] = []
    for kv in data.get(keys.POOLS, {}).values():
        pool = parse(
            "IPPool", kv.key, partial(Pool.from_spec, name(kv, keys.POOLS), loads(kv.value))
        )
        if pool is not None:
            pools.append(pool)
    bgp = BGPConfig()
    cfg_kv = data.get(keys.CONFIG_BGP, {}).get(keys.CONFIG_BGP)
    if cfg_kv is not None:
        bgp = (
            parse("BGPConfiguration", "default", partial(BGPConfig.from_json, loads(cfg_kv.value)))
            or bgp
        )
    peers: list[Peer] = []
    for kv in data.get(keys.PEERS, {}).values():
        doc = loads(kv.value)
        peer = parse(
            "BGPPeer", kv.key, partial(Peer.from_json, name(kv, keys.PEERS), doc, check_selector)
        )
        if peer is not None:
            peers.append(peer)
    nodes: list[NodeInfo] = []
    for kv in data.get(keys.NODES, {}).values():
        node = parse("Node", kv.key, partial(Node.from_json, name(kv, keys.NODES), loads(kv.value)))
        if node is not None:
            nodes.append(node_info(node))
    own: list[IPNetwork] = []
    for kv in data.get(keys.node_affinities(local.name), {}).values():
        aff = parse("affinity", kv.key, partial(Affinity.from_kv, kv))
        if aff is not None and aff.node == local.name and aff.state == AffinityState.CONFIRMED:
            own.append(aff.cidr)
    blocks = block_index.blocks(data.get(keys.BLOCKS, {}))
    for p in problems:
        log.warning("ignoring a document that does not parse: %s", p)
    known = [n for n in nodes if n.name != local.name]
    return Inputs(
        local=local,
        local_interfaces=tuple(local_interfaces),
        pools=tuple(pools),
        bgp=bgp,
        peers=tuple(peers),
        nodes=(local, *sorted(known, key=lambda n: n.name)),
        own_blocks=tuple(sorted(own, key=lambda n: (n.version, n))),
        borrowed=tuple(borrowed_ips(blocks, local.name)),
        problems=tuple(problems),
    )


def _pool_of(pools: Sequence[Pool], net: IPNetwork) -> Pool | None:
    for p in pools:
        if net.version == p.cidr.version and net.subnet_of(p.cidr):  # type: ignore[arg-type]
            return p
    return None


def compute(inp: Inputs, match: Matcher) -> Intent:
    """The node's intent from its inputs (see the module docstring for the invariants)."""
    local = inp.local
    sessions = plan_sessions(local, inp.nodes, inp.peers, inp.bgp, match, inp.local_interfaces)
    v6_next_hop = local.ipv6.ip if local.ipv6 is not None else None

    def advert(prefix: IPNetwork, communities: tuple[str, ...] = ()) -> Advert | None:
        if prefix.version == 6:
            if v6_next_hop is None:
                return None  # no IPv6 address to offer as next hop
            return Advert(prefix, v6_next_hop, communities)
        return Advert(prefix, None, communities)

    exported: list[IPNetwork] = []
    for cidr in inp.own_blocks:
        pool = _pool_of(inp.pools, cidr)
        if pool is not None and not pool.disable_bgp_export:
            exported.append(cidr)
    adverts = {advert(c) for c in exported}
    for ip in inp.borrowed:
        pool = _pool_of(inp.pools, ipaddress.ip_network(ip))
        if pool is not None and not pool.disable_bgp_export:
            adverts.add(advert(ipaddress.ip_network(ip)))
    for a in inp.bgp.advertisements():
        adverts.add(advert(a.cidr, a.communities))
    clean = frozenset(a for a in adverts if a is not None)
    own_addresses = {i.ip for i in inp.local_interfaces}
    own_addresses |= {i.ip for i in (local.ipv4, local.ipv6) if i is not None}
    pool_cidrs = tuple(p.cidr for p in inp.pools)
    policy = ImportPolicy.for_node(
        inp.bgp,
        pool_cidrs,
        {*inp.own_blocks, *(a.prefix for a in clean)},
        local.as_number or inp.bgp.as_number,
        local.router_id,
        own_addresses,
        {s.peer_ip: s.allow_local_as for s in sessions if s.allow_local_as},
    )
    return Intent(
        sessions=tuple(sessions),
        adverts=clean,
        blackholes=frozenset(inp.own_blocks),
        policy=policy,
        nat_cidrs=tuple(p.cidr for p in inp.pools if p.nat_outgoing and not p.disabled),
        pool_cidrs=pool_cidrs,
        limits={s.peer_ip: s.max_prefixes for s in sessions},
        export_cidrs=tuple(p.cidr for p in inp.pools if not p.disable_bgp_export),
    )
