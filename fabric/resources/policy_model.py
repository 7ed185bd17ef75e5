"""NetworkPolicy (networking.k8s.io/v1), Namespace (v1) and Pod (v1, the part policy reads)
as frozen dataclasses, and their Kubernetes-shaped documents.

These are the validated, defaulted objects: ``policy_types`` is always explicit (the API
server's defaulting: Ingress, plus Egress when egress rules exist), an absent or empty
``from``/``to``/``ports`` is ``None`` ("all"), CIDRs are ``ipaddress`` networks with host
bits cleared. Building them from untrusted documents is ``fabric.resources.policy_codec``'s
job; ``to_document`` gives back what ``fabricctl get -o yaml`` prints and etcd stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from typing import Any

IPNetwork = IPv4Network | IPv6Network

NETPOL_API, CORE_API = "networking.k8s.io/v1", "v1"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every Namespace automatically


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class Direction(StrEnum):
    """A policyType, and the direction of a rule."""

    INGRESS = "Ingress"
    EGRESS = "Egress"


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class NamedPort:
    """A container port (``spec.containers[].ports[]``); ``name`` may be empty."""

    name: str
    port: int
    protocol: Protocol = Protocol.TCP


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels (sorted pairs) AND matchExpressions; empty = selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    except_: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """Exactly one of: an ip_block, or one or both selectors (both = AND)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class PolicyPort:
    """``port`` is a number, a port name, or None (every port of ``protocol``)."""

    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One ingress/egress rule; ``peers``/``ports`` None = all peers / all ports."""

    peers: tuple[Peer, ...] | None = None
    ports: tuple[PolicyPort, ...] | None = None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: tuple[Direction, ...]
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)  # includes NAMESPACE_NAME_LABEL


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[NamedPort, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


PolicyObject = NetworkPolicy | Namespace | Pod


# documents -----------------------------------------------------------------------------------


def selector_document(s: LabelSelector) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if s.match_labels:
        d["matchLabels"] = dict(s.match_labels)
    if s.match_expressions:
        d["matchExpressions"] = [
            {"key": r.key, "operator": str(r.operator), **({"values": list(r.values)}
                                                           if r.values else {})}
            for r in s.match_expressions
        ]  # fmt: skip
    return d


def _peer_document(p: Peer) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if p.ip_block is not None:
        d["ipBlock"] = {"cidr": str(p.ip_block.cidr)}
        if p.ip_block.except_:
            d["ipBlock"]["except"] = [str(e) for e in p.ip_block.except_]
    if p.namespace_selector is not None:
        d["namespaceSelector"] = selector_document(p.namespace_selector)
    if p.pod_selector is not None:
        d["podSelector"] = selector_document(p.pod_selector)
    return d


def _port_document(p: PolicyPort) -> dict[str, Any]:
    d: dict[str, Any] = {"protocol": str(p.protocol)}
    if p.port is not None:
        d["port"] = p.port
    if p.end_port is not None:
        d["endPort"] = p.end_port
    return d


def _rule_document(r: PolicyRule, peers_key: str) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if r.ports is not None:
        d["ports"] = [_port_document(p) for p in r.ports]
    if r.peers is not None:
        d[peers_key] = [_peer_document(p) for p in r.peers]
    return d


def _metadata(name: str, namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(sorted(labels.items()))
    return meta


def to_document(obj: PolicyObject) -> dict[str, Any]:
    """The Kubernetes document of ``obj`` (valid ``apply -f`` input; what etcd stores)."""
    if isinstance(obj, NetworkPolicy):
        spec: dict[str, Any] = {"podSelector": selector_document(obj.pod_selector)}
        if obj.ingress:
            spec["ingress"] = [_rule_document(r, "from") for r in obj.ingress]
        if obj.egress:
            spec["egress"] = [_rule_document(r, "to") for r in obj.egress]
        spec["policyTypes"] = [str(t) for t in obj.policy_types]
        return {"apiVersion": NETPOL_API, "kind": "NetworkPolicy",
                "metadata": _metadata(obj.name, obj.namespace, obj.labels), "spec": spec}  # fmt: skip
    if isinstance(obj, Namespace):
        return {"apiVersion": CORE_API, "kind": "Namespace",
                "metadata": _metadata(obj.name, None, obj.labels)}  # fmt: skip
    ports = [{**({"name": p.name} if p.name else {}), "containerPort": p.port,
              "protocol": str(p.protocol)} for p in obj.ports]  # fmt: skip
    container: dict[str, Any] = {"name": "main"}
    if ports:
        container["ports"] = ports
    return {"apiVersion": CORE_API, "kind": "Pod",
            "metadata": _metadata(obj.name, obj.namespace, obj.labels),
            "spec": {"containers": [container]}}  # fmt: skip
