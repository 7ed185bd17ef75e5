"""Topology files in containerlab's format, parsed into a small typed model.

A file is what containerlab deploys: ``name``, optional ``mgmt``, and ``topology`` with
``defaults``, ``kinds``, ``nodes`` and ``links`` (``endpoints: ["a:eth1", "b:eth1"]``).
Node settings merge in containerlab's order: ``defaults`` <- ``kinds[kind]`` <- the node.

The lab reads the fabric role of a node from its ``fabric.role`` label, falling back to the
kind: ``bridge`` is an L2 segment, ``linux`` a host that will run fabricd. Roles:

- ``node``: a host (fabricd later). Label ``fabric.asn`` (default 64512).
- ``frr`` / ``bird``: a router. Labels ``fabric.asn`` (required), ``fabric.accept`` (comma
  separated prefixes accepted from hosts, default ``10.244.0.0/16``; any length inside).
- ``etcd``: the etcd service, label ``fabric.etcd.members`` (1 or 3, default 1).
- ``bridge``: an L2 segment joining every endpoint linked to it.

Parsing never touches the system; errors name the offending field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

TOPOLOGY_DIR = Path(__file__).parent / "topologies"
DEFAULT_HOST_ASN = 64512
DEFAULT_ACCEPT = (ipaddress.IPv4Network("10.244.0.0/16"),)
# Interface names: kernel limit is 15 characters (IFNAMSIZ - 1).
_IFNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,14}$")
_NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


class TopologyError(ValueError):
    """A topology file is invalid; the message names the field."""


class Role(StrEnum):
    NODE = "node"
    FRR = "frr"
    BIRD = "bird"
    ETCD = "etcd"
    BRIDGE = "bridge"

    @property
    def is_router(self) -> bool:
        return self in (Role.FRR, Role.BIRD)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    kind: str
    role: Role
    image: str
    labels: Mapping[str, str]
    asn: int | None
    accept: tuple[ipaddress.IPv4Network, ...]
    etcd_members: int
    mgmt_ipv4: ipaddress.IPv4Address | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    node: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.node}:{self.ifname}"


@dataclass(frozen=True, slots=True)
class Link:
    a: Endpoint
    b: Endpoint


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    mgmt_subnet: ipaddress.IPv4Network
    nodes: Mapping[str, Node]
    links: tuple[Link, ...]
    raw: Mapping[str, Any]

    def role_nodes(self, role: Role) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role]


def resolve_path(topo: str | Path) -> Path:
    """A file path, or the name of a bundled topology (``two-rack`` -> lab/topologies/...)."""
    p = Path(topo)
    if p.is_file():
        return p
    for cand in (TOPOLOGY_DIR / f"{topo}.clab.yml", TOPOLOGY_DIR / f"{topo}.clab.yaml"):
        if cand.is_file():
            return cand
    known = sorted(x.name.split(".")[0] for x in TOPOLOGY_DIR.glob("*.clab.y*ml"))
    raise TopologyError(f"topology {topo!r}: no such file or bundled topology (known: {known})")


def load(topo: str | Path | Mapping[str, Any]) -> Topology:
    """Load and validate a topology from a path, a bundled name or an already parsed dict."""
    if isinstance(topo, Mapping):
        return parse(topo)
    path = resolve_path(topo)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TopologyError(f"failed to read topology {path}: {e}") from e
    if not isinstance(data, Mapping):
        raise TopologyError(f"topology {path}: top level must be a mapping")
    return parse(data)


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TopologyError(f"{field}: must be a mapping")
    return value


def _role(kind: str, labels: Mapping[str, str], field: str) -> Role:
    name = labels.get("fabric.role") or {"linux": "node"}.get(kind, kind)
    try:
        return Role(name)
    except ValueError:
        raise TopologyError(f"{field}.labels.fabric.role: unknown role {name!r}") from None


def _int_label(labels: Mapping[str, str], key: str, field: str) -> int | None:
    if key not in labels:
        return None
    try:
        return int(labels[key])
    except ValueError:
        raise TopologyError(f"{field}.labels.{key}: not an integer: {labels[key]!r}") from None


def _node(
    name: str, spec: Mapping[str, Any], defaults: Mapping[str, Any], kinds: Mapping[str, Any]
) -> Node:
    field = f"topology.nodes.{name}"
    if not _NODE_NAME.match(name):
        raise TopologyError(f"{field}: node names are [a-z][a-z0-9-]{{0,23}}")
    kind = str(spec.get("kind") or defaults.get("kind") or "linux")
    merged: dict[str, Any] = {}
    for layer in (defaults, _mapping(kinds.get(kind), f"topology.kinds.{kind}"), spec):
        for k, v in layer.items():
            if k == "labels":
                merged["labels"] = {**merged.get("labels", {}), **_mapping(v, f"{field}.labels")}
            else:
                merged[k] = v
    labels = {str(k): str(v) for k, v in merged.get("labels", {}).items()}
    role = _role(kind, labels, field)
    asn = _int_label(labels, "fabric.asn", field)
    if role.is_router and asn is None:
        raise TopologyError(f"{field}.labels.fabric.asn: required for a {role} router")
    if role == Role.NODE and asn is None:
        asn = DEFAULT_HOST_ASN
    members = _int_label(labels, "fabric.etcd.members", field) or 1
    if members not in (1, 3, 5):
        raise TopologyError(f"{field}.labels.fabric.etcd.members: must be 1, 3 or 5")
    try:
        accept = (
            tuple(ipaddress.IPv4Network(p.strip()) for p in labels["fabric.accept"].split(","))
            if "fabric.accept" in labels
            else DEFAULT_ACCEPT
        )
        mgmt = merged.get("mgmt-ipv4")
        mgmt_ip = ipaddress.IPv4Address(str(mgmt).split("/")[0]) if mgmt else None
    except ValueError as e:
        raise TopologyError(f"{field}: bad address: {e}") from e
    return Node(
        name=name,
        kind=kind,
        role=role,
        image=str(merged.get("image", "")),
        labels=labels,
        asn=asn,
        accept=accept,
        etcd_members=members,
        mgmt_ipv4=mgmt_ip,
    )


def _endpoint(text: object, field: str, nodes: Mapping[str, Node]) -> Endpoint:
    if not isinstance(text, str) or text.count(":") != 1:
        raise TopologyError(f"{field}: endpoints are 'node:ifname', got {text!r}")
    node, ifname = text.split(":")
    if node not in nodes:
        raise TopologyError(f"{field}: unknown node {node!r}")
    if not _IFNAME.match(ifname) or ifname == "eth0":
        raise TopologyError(f"{field}: bad interface name {ifname!r} (eth0 is management)")
    return Endpoint(node, ifname)


def parse(data: Mapping[str, Any]) -> Topology:
    """Validate a containerlab document and build the model. Raises TopologyError."""
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise TopologyError("name: required string")
    topo = _mapping(data.get("topology"), "topology")
    defaults = _mapping(topo.get("defaults"), "topology.defaults")
    kinds = _mapping(topo.get("kinds"), "topology.kinds")
    specs = _mapping(topo.get("nodes"), "topology.nodes")
    if not specs:
        raise TopologyError("topology.nodes: at least one node is required")
    nodes = {
        str(n): _node(str(n), _mapping(s, f"topology.nodes.{n}"), defaults, kinds)
        for n, s in specs.items()
    }
    links: list[Link] = []
    seen: set[Endpoint] = set()
    raw_links = topo.get("links") or []
    if not isinstance(raw_links, list):
        raise TopologyError("topology.links: must be a list")
    for i, item in enumerate(raw_links):
        field = f"topology.links[{i}].endpoints"
        eps = _mapping(item, f"topology.links[{i}]").get("endpoints")
        if not isinstance(eps, list) or len(eps) != 2:
            raise TopologyError(f"{field}: exactly two endpoints")
        a, b = (_endpoint(e, field, nodes) for e in eps)
        for ep in (a, b):
            if ep in seen:
                raise TopologyError(f"{field}: endpoint {ep} used twice")
            seen.add(ep)
        if nodes[a.node].role == Role.BRIDGE and nodes[b.node].role == Role.BRIDGE:
            raise TopologyError(f"{field}: bridge-to-bridge links are not supported")
        links.append(Link(a, b))
    mgmt = _mapping(data.get("mgmt"), "mgmt")
    try:
        subnet = ipaddress.IPv4Network(str(mgmt.get("ipv4-subnet", "10.255.0.0/24")))
    except ValueError as e:
        raise TopologyError(f"mgmt.ipv4-subnet: {e}") from e
    etcds = [n for n in nodes.values() if n.role == Role.ETCD]
    if len(etcds) > 1:
        raise TopologyError("topology.nodes: at most one etcd service node")
    return Topology(name=name, mgmt_subnet=subnet, nodes=nodes, links=tuple(links), raw=data)
