"""Session planner: (local node, every node, explicit peers, BGP config) -> the local node's
BGP sessions. Pure: no I/O, no clock, no datastore.

Invariants of ``plan_sessions``' result:

- ``Session.key`` (the peer address) is unique, and is never one of the local node's own
  addresses (node addresses and ``local_interfaces``).
- Every session between two fabric nodes is planned on both nodes with the same family and
  the same Peer behind it, and exactly one of the two ends is passive, so the two nodes never
  race two TCP connections (which would abort a graceful restart; see Calico's mesh template).
- The order is deterministic: (kind, address family, peer address).

The selector grammar lives with IPAM; the caller injects ``match(selector, labels)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from bgp.config import BGPConfig, Peer
from bgp.errors import ValidationError
from bgp.model import (
    BGP_PORT,
    DEFAULT_HOLD_TIME,
    DEFAULT_RESTART_TIME,
    IPAddress,
    IPInterface,
    NodeInfo,
    PeerType,
    Session,
)

SelectorMatch = Callable[[str, Mapping[str, str]], bool]

V4 = "ipv4 unicast"
V6 = "ipv6 unicast"

_KIND_ORDER = {PeerType.MESH: 0, PeerType.GLOBAL: 1, PeerType.NODE: 2, PeerType.RR: 3}
_NAME_PREFIX = {
    PeerType.MESH: "Mesh",
    PeerType.GLOBAL: "Global",
    PeerType.NODE: "Node",
    PeerType.RR: "RR",
}

# Duplicate resolution: the lowest rank wins. Explicit peers (0) beat the mesh (1); among
# explicit peers the first name wins, a forward session beats a reverse one of the same peer;
# the node name is the last tie-breaker (two nodes claiming one address: a misconfiguration,
# but the result must still not depend on input order).
_Rank = tuple[int, str, int, str]


def session_name(kind: PeerType, peer_ip: IPAddress) -> str:
    """Calico's protocol name: ``Mesh_10_0_0_2``, ``RR_fd00__5`` (dots, colons -> ``_``)."""
    return f"{_NAME_PREFIX[kind]}_{str(peer_ip).replace('.', '_').replace(':', '_')}"


def node_as(node: NodeInfo, config: BGPConfig) -> int:
    """The node's own AS, else the cluster AS."""
    return node.as_number if node.as_number is not None else config.as_number


def peer_applies(peer: Peer, node: NodeInfo, match: SelectorMatch) -> bool:
    """Whether ``node`` is on the local side of ``peer`` (``node``, ``nodeSelector``, or
    global when neither is set)."""
    if peer.node is not None:
        return peer.node == node.name
    if peer.node_selector is not None:
        return match(peer.node_selector, node.labels)
    return True


def plan_sessions(
    local: NodeInfo,
    nodes: Sequence[NodeInfo],
    peers: Sequence[Peer],
    config: BGPConfig,
    match: SelectorMatch,
    local_interfaces: Sequence[IPInterface] = (),
) -> list[Session]:
    """Every BGP session ``local`` should have. ``nodes`` may include ``local`` itself.

    A session whose address family the local node lacks is left out, not an error: a node
    with no IPv6 address simply has no IPv6 sessions. Raises ``ValidationError`` only for a
    Peer that ``Peer.from_json`` would have refused (``peerIP`` without ``asNumber``).
    """
    planner = _Planner(local, nodes, config, match, local_interfaces)
    chosen: dict[IPAddress, tuple[_Rank, Session]] = {}
    for rank, session in planner.candidates(peers):
        if session.peer_ip in planner.own:
            continue
        held = chosen.get(session.peer_ip)
        if held is None or rank < held[0]:
            chosen[session.peer_ip] = (rank, session)
    return sorted(
        (s for _, s in chosen.values()),
        key=lambda s: (_KIND_ORDER[s.kind], s.peer_ip.version, int(s.peer_ip)),
    )


@dataclass(frozen=True, slots=True)
class _Settings:
    """What a Peer (or the mesh settings) says about its sessions, whatever their shape."""

    hold_time: int = DEFAULT_HOLD_TIME
    keepalive_time: int | None = None
    restart_time: int = DEFAULT_RESTART_TIME
    password_file: str | None = None
    password_credential: str | None = None
    max_prefixes: int | None = None
    allow_local_as: int = 0
    ttl_security: int = 0

    @classmethod
    def of(cls, peer: Peer) -> _Settings:
        # ``is None`` rather than ``or``: holdTime 0 is valid (RFC 4271: no keepalives).
        return cls(
            hold_time=DEFAULT_HOLD_TIME if peer.hold_time is None else peer.hold_time,
            keepalive_time=peer.keepalive_time,
            restart_time=peer.max_restart_time or DEFAULT_RESTART_TIME,
            password_file=peer.password_file,
            password_credential=peer.password_credential,
            max_prefixes=peer.max_prefixes,
            allow_local_as=peer.num_allowed_local_as,
            ttl_security=peer.ttl_security or 0,
        )


class _Planner:
    def __init__(
        self,
        local: NodeInfo,
        nodes: Sequence[NodeInfo],
        config: BGPConfig,
        match: SelectorMatch,
        local_interfaces: Sequence[IPInterface],
    ) -> None:
        self.local = local
        self.config = config
        self.match = match
        self.interfaces = tuple(local_interfaces)
        self.others = sorted((n for n in nodes if n.name != local.name), key=lambda n: n.name)
        self.own: frozenset[IPAddress] = frozenset(
            {i.ip for i in (local.ipv4, local.ipv6) if i is not None}
            | {i.ip for i in local_interfaces}
        )
        self.by_address: dict[IPAddress, NodeInfo] = {}
        for n in reversed(self.others):  # first name wins for a shared address
            for i in (n.ipv4, n.ipv6):
                if i is not None:
                    self.by_address[i.ip] = n

    def candidates(self, peers: Sequence[Peer]) -> Iterator[tuple[_Rank, Session]]:
        for peer in sorted(peers, key=lambda p: p.name):
            yield from self._explicit(peer)
        # Calico: a route-reflector node is not in the mesh, and the mesh skips RR nodes;
        # they are wired with peerSelector peers instead.
        if self.config.node_to_node_mesh and self.local.rr_cluster_id is None:
            for node in self.others:
                if node.rr_cluster_id is None:
                    s = self._mesh(node)
                    if s is not None:
                        yield (1, "", 0, node.name), s

    # ------------------------------------------------------------------ mesh

    def _mesh(self, node: NodeInfo) -> Session | None:
        c = self.config
        settings = _Settings(
            hold_time=c.mesh_hold_time,
            restart_time=c.mesh_max_restart_time,
            password_file=c.mesh_password_file,
            password_credential=c.mesh_password_credential,
        )
        return self._to_node(
            PeerType.MESH,
            node,
            None,
            settings,
            local_as=node_as(self.local, c),
            peer_as=node_as(node, c),
            port=c.listen_port,
            required=False,
            bidirectional=True,
        )

    # ------------------------------------------------------------- explicit

    def _explicit(self, peer: Peer) -> Iterator[tuple[_Rank, Session]]:
        here = peer_applies(peer, self.local, self.match)
        if peer.peer_ip is not None:
            if here:
                s = self._to_address(peer, peer.peer_ip)
                if s is not None:
                    yield (0, peer.name, 0, s.peer_node or ""), s
            if self._is_target(peer, peer.peer_ip):
                yield from self._reverse(peer, peer.peer_ip.version)
        elif peer.peer_selector is not None:
            if here:
                for node in self.others:
                    if self.match(peer.peer_selector, node.labels):
                        s = self._selected(peer, node)
                        if s is not None:
                            yield (0, peer.name, 0, node.name), s
            if self.match(peer.peer_selector, self.local.labels):
                yield from self._reverse(peer, None)

    def _to_address(self, peer: Peer, ip: IPAddress) -> Session | None:
        """A ``peerIP`` peer: an external router, or a fabric node given by address."""
        if peer.as_number is None:  # Peer.from_json refuses this; a Peer built in code may not
            raise ValidationError("asNumber", "required with peerIP", f"BGPPeer {peer.name}")
        local_as = peer.local_as_number or node_as(self.local, self.config)
        t = _Settings.of(peer)
        kind = (
            PeerType.GLOBAL if peer.node is None and peer.node_selector is None else PeerType.NODE
        )
        required = True if peer.required is None else peer.required
        node = self.by_address.get(ip)
        if node is not None:
            return self._to_node(
                kind,
                node,
                ip,
                t,
                local_as=local_as,
                peer_as=peer.as_number,
                port=peer.peer_port or self.config.listen_port,
                required=required,
                bidirectional=self._reversible(peer, node),
            )
        if peer.source_address == "UseNodeIP":  # Calico: the node's own address, always
            iface = self.local.ipv4 if ip.version == 4 else self.local.ipv6
            local_address = None if iface is None else iface.ip
        else:
            local_address = self._source_for(ip)
        if local_address is None:
            return None
        cluster_id = self._reflects(local_as, peer.as_number, None)
        return Session(
            name=session_name(kind, ip),
            kind=kind,
            peer_ip=ip,
            peer_as=peer.as_number,
            local_as=local_as,
            local_address=local_address,
            router_id=self.local.router_id,
            peer_port=peer.peer_port or BGP_PORT,
            hold_time=t.hold_time,
            keepalive_time=t.keepalive_time,
            password_file=t.password_file,
            password_credential=t.password_credential,
            restart_time=t.restart_time,
            max_prefixes=t.max_prefixes,
            allow_local_as=t.allow_local_as,
            ttl_security=t.ttl_security,
            # sourceAddress None: the kernel picks; local_address stays the expected one
            source_auto=peer.source_address == "None",
            required=required,
            # Calico: one BGPPeer per family towards routers; the session carries its own.
            families=(V4,) if ip.version == 4 else (V6,),
            rr_client=cluster_id is not None,
            cluster_id=cluster_id,
        )

    def _selected(self, peer: Peer, node: NodeInfo) -> Session | None:
        """A node picked by ``peerSelector``, at its own address and AS."""
        kind = PeerType.RR if self.local.rr_cluster_id or node.rr_cluster_id else PeerType.NODE
        return self._to_node(
            kind,
            node,
            None,
            _Settings.of(peer),
            local_as=self._as_towards(peer, self.local),
            peer_as=self._as_towards(peer, node),
            port=self.config.listen_port,
            required=True if peer.required is None else peer.required,
            bidirectional=True,
        )

    def _as_towards(self, peer: Peer, n: NodeInfo) -> int:
        """The AS ``n`` presents on sessions made by a ``peerSelector`` peer: its
        ``localASNumber`` when ``n`` is on the Peer's local side, else its own. Both ends of a
        pair compute the same two numbers, whichever end the Peer selected."""
        if peer.local_as_number is not None and peer_applies(peer, n, self.match):
            return peer.local_as_number
        return node_as(n, self.config)

    def _is_target(self, peer: Peer, ip: IPAddress) -> bool:
        """The local node is the far end of a ``peerIP`` peer (Calico's reverse peering)."""
        mine = {i.ip for i in (self.local.ipv4, self.local.ipv6) if i is not None}
        return ip in mine and self._reversible(peer, self.local)

    def _reversible(self, peer: Peer, target: NodeInfo) -> bool:
        return peer.as_number == node_as(target, self.config) and peer.peer_port in (
            None,
            self.config.listen_port,
        )

    def _reverse(self, peer: Peer, version: int | None) -> Iterator[tuple[_Rank, Session]]:
        """The local node is on the remote side of ``peer``: plan the far end of every
        session the nodes on its local side open towards us, so both ends exist.

        Never ``required``: that flag belongs to the side the Peer selects with node /
        nodeSelector (a route reflector must not wait for all of its clients)."""
        c = self.config
        for node in self.others:
            if not peer_applies(peer, node, self.match):
                continue
            address = None
            if version is None:  # peerSelector: the far end picked us by our labels
                rr = self.local.rr_cluster_id or node.rr_cluster_id
                kind = PeerType.RR if rr else PeerType.NODE
                local_as, peer_as = self._as_towards(peer, self.local), self._as_towards(peer, node)
            else:  # peerIP: the far end names our address
                iface = node.ipv4 if version == 4 else node.ipv6
                if iface is None:
                    continue
                address, kind = iface.ip, PeerType.NODE
                local_as, peer_as = node_as(self.local, c), peer.local_as_number or node_as(node, c)
            s = self._to_node(
                kind,
                node,
                address,
                _Settings.of(peer),
                local_as=local_as,
                peer_as=peer_as,
                port=c.listen_port,
                required=False,
                bidirectional=True,
            )
            if s is not None:
                yield (0, peer.name, 1, node.name), s

    # --------------------------------------------------------------- shared

    def _to_node(
        self,
        kind: PeerType,
        node: NodeInfo,
        address: IPAddress | None,
        t: _Settings,
        *,
        local_as: int,
        peer_as: int,
        port: int,
        required: bool,
        bidirectional: bool,
    ) -> Session | None:
        """A session to another fabric node. Sourced from the local node's own address of
        the family (the far end knows us by that address, not by an interface address).
        ``address`` None: IPv4 when both nodes have it (IPv6 rides along by MP-BGP when both
        have IPv6), else IPv6 when both have it, else no session."""
        pair = _pair(self.local, node, address)
        if pair is None:
            return None
        mine, theirs = pair
        cluster_id = self._reflects(local_as, peer_as, node.rr_cluster_id)
        if theirs.version == 4:
            families: tuple[str, ...] = (V4,)
            if self.local.ipv6 is not None and node.ipv6 is not None:
                families = (V4, V6)
        else:
            families = (V6,)
        return Session(
            name=session_name(kind, theirs),
            kind=kind,
            peer_ip=theirs,
            peer_as=peer_as,
            local_as=local_as,
            local_address=mine,
            router_id=self.local.router_id,
            peer_port=port,
            # Exactly one end of a node pair is passive: the one with the higher address.
            # (Calico's mirror image, passive when the peer is higher; either works as long
            # as both ends use the same rule, and only our planner plans our nodes.)
            passive=bidirectional and int(mine) > int(theirs),
            hold_time=t.hold_time,
            keepalive_time=t.keepalive_time,
            password_file=t.password_file,
            password_credential=t.password_credential,
            restart_time=t.restart_time,
            max_prefixes=t.max_prefixes,
            allow_local_as=t.allow_local_as,
            ttl_security=t.ttl_security,
            required=required,
            peer_node=node.name,
            families=families,
            rr_client=cluster_id is not None,
            cluster_id=cluster_id,
        )

    def _reflects(self, local_as: int, peer_as: int, peer_cluster: str | None) -> str | None:
        """The cluster ID when the local node reflects routes to this peer, else None.
        Calico: a route reflector treats an iBGP peer outside its own cluster as a client."""
        cid = self.local.rr_cluster_id
        if cid is not None and peer_as == local_as and peer_cluster != cid:
            return cid
        return None

    def _source_for(self, ip: IPAddress) -> IPAddress | None:
        """The local address facing ``ip``: the most specific local interface whose subnet
        holds it (a node homed to several routers), else the node address of its family."""
        facing = [i for i in self.interfaces if i.version == ip.version and ip in i.network]
        if facing:
            return min(facing, key=lambda i: (-i.network.prefixlen, int(i.ip))).ip
        iface = self.local.ipv4 if ip.version == 4 else self.local.ipv6
        return None if iface is None else iface.ip


def _pair(
    local: NodeInfo, node: NodeInfo, address: IPAddress | None
) -> tuple[IPAddress, IPAddress] | None:
    """(local address, remote address) of one family for a node-to-node session."""
    v4 = (local.ipv4, node.ipv4)
    v6 = (local.ipv6, node.ipv6)
    if address is not None:
        mine = local.ipv4 if address.version == 4 else local.ipv6
        return None if mine is None else (mine.ip, address)
    for a, b in (v4, v6):
        if a is not None and b is not None:
            return a.ip, b.ip
    return None


__all__ = [
    "V4",
    "V6",
    "SelectorMatch",
    "node_as",
    "peer_applies",
    "plan_sessions",
    "session_name",
]
