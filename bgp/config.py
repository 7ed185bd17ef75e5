"""Cluster-wide BGP configuration and explicit peers, as stored in the datastore
(``/fabric/v1/config/bgp`` and ``/fabric/v1/peers/<name>``). Pure: no I/O.

``from_json`` parses and validates, raising ``ValidationError`` naming the field;
``to_json`` is the exact inverse. Selectors are checked through a callable the caller
injects, because the selector grammar lives with IPAM and the bgp package imports neither
ipam nor fabric. The planner (``bgp.plan``) turns these documents into ``Session``s.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bgp.errors import ValidationError
from bgp.model import (
    BGP_PORT,
    DEFAULT_AS,
    DEFAULT_HOLD_TIME,
    DEFAULT_RESTART_TIME,
    IPAddress,
    IPNetwork,
)

SelectorCheck = Callable[[str], None]
_COMMUNITY = re.compile(r"^\d{1,10}:\d{1,10}(:\d{1,10})?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# systemd credential names: file names under $CREDENTIALS_DIRECTORY (no "/", not . or ..)
_CREDENTIAL = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.@:-]{1,255}$")
SOURCE_ADDRESSES = ("UseNodeIP", "None")  # Calico's BGPPeer sourceAddress values


def _as_number(v: Any, fld: str, res: str, optional: bool = True) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v):  # asdot notation
        hi, lo = (int(x) for x in v.split("."))
        if hi < 2**16 and lo < 2**16:
            return hi * 65536 + lo
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**32:
        raise ValidationError(fld, f"{v!r} is not an AS number (1..4294967295)", res)
    return v


def _int(v: Any, fld: str, res: str, lo: int, hi: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError(fld, f"{v!r} must be an integer in {lo}..{hi}", res)
    return v


def _net(v: Any, fld: str, res: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(v), strict=True)
    except ValueError as e:
        raise ValidationError(fld, f"{v!r} is not a CIDR: {e}", res) from None


def _nets(v: Any, fld: str, res: str) -> tuple[IPNetwork, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ValidationError(fld, "must be a list", res)
    out = []
    for i, item in enumerate(v):
        cidr = item.get("cidr") if isinstance(item, Mapping) else item
        out.append(
            _net(cidr, f"{fld}[{i}].cidr" if isinstance(item, Mapping) else f"{fld}[{i}]", res)
        )
    return tuple(out)


def _password(
    d: Mapping[str, Any], file_key: str, cred_key: str, res: str
) -> tuple[str | None, str | None]:
    """(file, credential) of an MD5 password: an absolute file path, or the name of a
    systemd credential (a file under ``$CREDENTIALS_DIRECTORY``, read when rendering)."""
    pw, cred = d.get(file_key), d.get(cred_key)
    if pw is not None and (not isinstance(pw, str) or not pw.startswith("/")):
        raise ValidationError(file_key, "must be an absolute file path", res)
    if cred is not None and (not isinstance(cred, str) or not _CREDENTIAL.match(cred)):
        raise ValidationError(
            cred_key, f"{cred!r} is not a credential name (a file name, no '/')", res
        )
    if pw is not None and cred is not None:
        raise ValidationError(cred_key, f"set at most one of {file_key} and {cred_key}", res)
    return pw, cred


@dataclass(frozen=True, slots=True)
class Community:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class PrefixAdvertisement:
    """An extra prefix to announce (service CIDRs and the like) with its communities
    (names from ``BGPConfig.communities`` or literal ``aa:nn`` / ``aa:nn:mm`` values)."""

    cidr: IPNetwork
    communities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BGPConfig:
    """Cluster-wide BGP settings (Calico's BGPConfiguration ``default``)."""

    as_number: int = DEFAULT_AS
    node_to_node_mesh: bool = True
    listen_port: int = BGP_PORT
    mesh_hold_time: int = DEFAULT_HOLD_TIME
    mesh_max_restart_time: int = DEFAULT_RESTART_TIME
    mesh_password_file: str | None = None
    mesh_password_credential: str | None = None
    communities: tuple[Community, ...] = ()
    prefix_advertisements: tuple[PrefixAdvertisement, ...] = ()
    service_cluster_ips: tuple[IPNetwork, ...] = ()
    service_external_ips: tuple[IPNetwork, ...] = ()
    # Import policy beyond the IP pools: extra accepted prefixes and the default route.
    import_cidrs: tuple[IPNetwork, ...] = ()
    import_default_route: bool = False

    def resolve_communities(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Literal community values for names or literals (validated at parse time)."""
        table = {c.name: c.value for c in self.communities}
        return tuple(table.get(n, n) for n in names)

    def advertisements(self) -> list[PrefixAdvertisement]:
        """Every extra prefix to announce, communities resolved to literal values."""
        out = [
            PrefixAdvertisement(a.cidr, self.resolve_communities(a.communities))
            for a in self.prefix_advertisements
        ]
        seen = {a.cidr for a in out}
        for cidr in (*self.service_cluster_ips, *self.service_external_ips):
            if cidr not in seen:
                out.append(PrefixAdvertisement(cidr))
                seen.add(cidr)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "asNumber": self.as_number,
            "nodeToNodeMeshEnabled": self.node_to_node_mesh,
            "listenPort": self.listen_port,
            "nodeMeshHoldTime": self.mesh_hold_time,
            "nodeMeshMaxRestartTime": self.mesh_max_restart_time,
            "nodeMeshPasswordFile": self.mesh_password_file,
            "nodeMeshPasswordCredential": self.mesh_password_credential,
            "communities": [{"name": c.name, "value": c.value} for c in self.communities],
            "prefixAdvertisements": [
                {"cidr": str(a.cidr), "communities": list(a.communities)}
                for a in self.prefix_advertisements
            ],
            "serviceClusterIPs": [{"cidr": str(c)} for c in self.service_cluster_ips],
            "serviceExternalIPs": [{"cidr": str(c)} for c in self.service_external_ips],
            "importCIDRs": [str(c) for c in self.import_cidrs],
            "importDefaultRoute": self.import_default_route,
        }

    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], resource: str = "BGPConfiguration default"
    ) -> BGPConfig:
        """Parse and validate; unknown keys are refused so a typo is not silently ignored."""
        res = resource
        known = set(cls().to_json()) | {"nodeToNodeMesh"}
        for k in d:
            if k not in known:
                raise ValidationError(k, f"unknown field (known: {', '.join(sorted(known))})", res)
        mesh = d.get("nodeToNodeMeshEnabled", d.get("nodeToNodeMesh", True))
        if not isinstance(mesh, bool):
            raise ValidationError("nodeToNodeMeshEnabled", "must be true or false", res)
        comms = []
        for i, c in enumerate(d.get("communities") or []):
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise ValidationError(f"communities[{i}].name", "must be a string", res)
            if not _COMMUNITY.match(str(c.get("value", ""))):
                raise ValidationError(
                    f"communities[{i}].value", f"{c.get('value')!r} is not aa:nn or aa:nn:mm", res
                )
            comms.append(Community(c["name"], str(c["value"])))
        names = {c.name for c in comms}
        advs = []
        for i, a in enumerate(d.get("prefixAdvertisements") or []):
            if not isinstance(a, Mapping):
                raise ValidationError(f"prefixAdvertisements[{i}]", "must be a mapping", res)
            cs = tuple(str(x) for x in a.get("communities") or [])
            for j, c in enumerate(cs):
                if c not in names and not _COMMUNITY.match(c):
                    raise ValidationError(
                        f"prefixAdvertisements[{i}].communities[{j}]",
                        f"{c!r} is neither a defined community name nor aa:nn[:mm]",
                        res,
                    )
            advs.append(
                PrefixAdvertisement(_net(a.get("cidr"), f"prefixAdvertisements[{i}].cidr", res), cs)
            )
        default_route = d.get("importDefaultRoute", False)
        if not isinstance(default_route, bool):
            raise ValidationError("importDefaultRoute", "must be true or false", res)
        pw, cred = _password(d, "nodeMeshPasswordFile", "nodeMeshPasswordCredential", res)
        return cls(
            as_number=_as_number(d.get("asNumber", DEFAULT_AS), "asNumber", res, optional=False)
            or DEFAULT_AS,
            node_to_node_mesh=mesh,
            listen_port=_int(d.get("listenPort", BGP_PORT), "listenPort", res, 1, 65535)
            or BGP_PORT,
            mesh_hold_time=_int(
                d.get("nodeMeshHoldTime", DEFAULT_HOLD_TIME), "nodeMeshHoldTime", res, 3, 65535
            )
            or DEFAULT_HOLD_TIME,
            mesh_max_restart_time=_int(
                d.get("nodeMeshMaxRestartTime", DEFAULT_RESTART_TIME),
                "nodeMeshMaxRestartTime",
                res,
                1,
                4095,
            )
            or DEFAULT_RESTART_TIME,
            mesh_password_file=pw,
            mesh_password_credential=cred,
            communities=tuple(comms),
            prefix_advertisements=tuple(advs),
            service_cluster_ips=_nets(d.get("serviceClusterIPs"), "serviceClusterIPs", res),
            service_external_ips=_nets(d.get("serviceExternalIPs"), "serviceExternalIPs", res),
            import_cidrs=_nets(d.get("importCIDRs"), "importCIDRs", res),
            import_default_route=default_route,
        )


@dataclass(frozen=True, slots=True)
class Peer:
    """An explicit BGP peer (Calico's BGPPeer).

    Scope: ``node`` (one node), ``node_selector`` (matching nodes), or neither (every
    node: a global peer). Remote side: ``peer_ip`` + ``as_number`` (an external router), or
    ``peer_selector`` (every fabric node matching it, at its own address and AS: how route
    reflectors are wired). ``required`` says whether this session counts for readiness;
    by default external peers and peers selected by ``peer_selector`` do.
    """

    name: str
    peer_ip: IPAddress | None = None
    peer_port: int | None = None
    as_number: int | None = None
    node: str | None = None
    node_selector: str | None = None
    peer_selector: str | None = None
    local_as_number: int | None = None
    password_file: str | None = None
    password_credential: str | None = None  # a systemd credential (LoadCredential=) name
    hold_time: int | None = None
    keepalive_time: int | None = None
    max_restart_time: int | None = None
    max_prefixes: int | None = None
    required: bool | None = None
    # Calico's numAllowedLocalASNumbers (BIRD "allow local as", FRR "allowas-in"): accept
    # routes whose AS path holds our own AS up to this many times. Needed with one AS per
    # rack, where routes between hosts of the same rack come back through the ToR.
    num_allowed_local_as: int = 0
    # Calico's ttlSecurity: GTSM (RFC 5082), the peer is at most this many hops away; we
    # send with TTL 255 and accept only TTL >= 256 - hops. None or 0: off.
    ttl_security: int | None = None
    # Calico's sourceAddress: "UseNodeIP" (the node's address of the family), "None" (the
    # kernel chooses); unset: the local interface facing the peer, else the node address.
    source_address: str | None = None

    FIELDS = (
        "peerIP", "asNumber", "node", "nodeSelector", "peerSelector", "localASNumber",
        "passwordFile", "holdTime", "keepaliveTime", "maxRestartTime", "maxPrefixes", "required",
        "numAllowedLocalASNumbers", "passwordCredential", "ttlSecurity", "sourceAddress",
    )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        ip = None
        if self.peer_ip is not None:
            ip = str(self.peer_ip)
            if self.peer_port is not None:
                ip = (
                    f"[{ip}]:{self.peer_port}"
                    if self.peer_ip.version == 6
                    else f"{ip}:{self.peer_port}"
                )
        out = {
            "peerIP": ip,
            "asNumber": self.as_number,
            "node": self.node,
            "nodeSelector": self.node_selector,
            "peerSelector": self.peer_selector,
            "localASNumber": self.local_as_number,
            "passwordFile": self.password_file,
            "holdTime": self.hold_time,
            "keepaliveTime": self.keepalive_time,
            "maxRestartTime": self.max_restart_time,
            "maxPrefixes": self.max_prefixes,
            "required": self.required,
            "numAllowedLocalASNumbers": self.num_allowed_local_as or None,
            "passwordCredential": self.password_credential,
            "ttlSecurity": self.ttl_security,
            "sourceAddress": self.source_address,
        }
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(
        cls, name: str, d: Mapping[str, Any], check_selector: SelectorCheck | None = None
    ) -> Peer:
        res = f"BGPPeer {name}"
        if not _NAME.match(name):
            raise ValidationError("metadata.name", f"{name!r} is not a DNS-1123 name", res)
        for k in d:
            if k not in cls.FIELDS:
                raise ValidationError(k, f"unknown field (known: {', '.join(cls.FIELDS)})", res)
        ip, port = _peer_ip(d.get("peerIP"), res)
        asn = _as_number(d.get("asNumber"), "asNumber", res)
        sel = d.get("peerSelector")
        if (ip is None) == (sel is None):
            raise ValidationError("peerIP", "set exactly one of peerIP and peerSelector", res)
        if ip is not None and asn is None:
            raise ValidationError("asNumber", "required with peerIP", res)
        if sel is not None and asn is not None:
            raise ValidationError(
                "asNumber",
                "not allowed with peerSelector (the selected nodes' own AS is used)",
                res,
            )
        if d.get("node") is not None and d.get("nodeSelector") is not None:
            raise ValidationError("nodeSelector", "set at most one of node and nodeSelector", res)
        for fld in ("nodeSelector", "peerSelector"):
            v = d.get(fld)
            if v is None:
                continue
            if not isinstance(v, str):
                raise ValidationError(fld, "must be a selector string", res)
            if check_selector is not None:
                try:
                    check_selector(v)
                except ValueError as e:
                    raise ValidationError(fld, f"invalid selector: {e}", res) from None
        node = d.get("node")
        if node is not None and not isinstance(node, str):
            raise ValidationError("node", "must be a node name", res)
        pw, cred = _password(d, "passwordFile", "passwordCredential", res)
        source = d.get("sourceAddress")
        if source is not None and source not in SOURCE_ADDRESSES:
            raise ValidationError(
                "sourceAddress", f"{source!r} is not one of {', '.join(SOURCE_ADDRESSES)}", res
            )
        hold = _int(d.get("holdTime"), "holdTime", res, 0, 65535)
        if hold is not None and 0 < hold < 3:
            raise ValidationError("holdTime", "must be 0 or at least 3 seconds (RFC 4271)", res)
        keep = _int(d.get("keepaliveTime"), "keepaliveTime", res, 0, 21845)
        if hold and keep and keep >= hold:
            raise ValidationError("keepaliveTime", f"must be less than holdTime ({hold})", res)
        required = d.get("required")
        if required is not None and not isinstance(required, bool):
            raise ValidationError("required", "must be true or false", res)
        return cls(
            name=name,
            peer_ip=ip,
            peer_port=port,
            as_number=asn,
            node=node,
            node_selector=d.get("nodeSelector"),
            peer_selector=sel,
            local_as_number=_as_number(d.get("localASNumber"), "localASNumber", res),
            password_file=pw,
            password_credential=cred,
            hold_time=hold,
            keepalive_time=keep,
            max_restart_time=_int(d.get("maxRestartTime"), "maxRestartTime", res, 1, 4095),
            max_prefixes=_int(d.get("maxPrefixes"), "maxPrefixes", res, 1, 2**31),
            required=required,
            num_allowed_local_as=_int(
                d.get("numAllowedLocalASNumbers"), "numAllowedLocalASNumbers", res, 0, 10
            )
            or 0,
            ttl_security=_int(d.get("ttlSecurity"), "ttlSecurity", res, 0, 255),
            source_address=source,
        )


def _peer_ip(v: Any, res: str) -> tuple[IPAddress | None, int | None]:
    """``IPv4``, ``IPv4:port``, ``IPv6`` or ``[IPv6]:port`` (Calico's peerIP syntax)."""
    if v is None:
        return None, None
    if not isinstance(v, str):
        raise ValidationError("peerIP", f"{v!r} is not an IP address", res)
    host, port = v, None
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)", v) or re.fullmatch(r"([0-9.]+):(\d+)", v)
    if m:
        host, port = m.group(1), int(m.group(2))
        if not 0 < port < 65536:
            raise ValidationError("peerIP", f"port {port} out of range", res)
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        raise ValidationError("peerIP", f"{v!r} is not an IP address (or IP:port)", res) from None
