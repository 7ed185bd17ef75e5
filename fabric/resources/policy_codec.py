"""Decoding and validation of NetworkPolicy, Namespace and Pod documents, as the API server
validates them (k8s pkg/apis/networking/validation and core validation), before anything is
stored. Every error is an ``ipam.errors.ValidationError`` naming the resource and the field
path (``spec.ingress[0].ports[1].endPort``).

Strictness follows what ``kubectl apply`` against a real API server does: a NetworkPolicy's
``spec`` is checked field by field (unknown fields refused); for Pods only metadata and
``spec.containers[].ports[]`` are read (every other field, ``status``, ``managedFields``...
is ignored); a Namespace's labels are read and ``kubernetes.io/metadata.name`` is set to its
name. Metadata other than name, namespace and labels is ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from fabric.resources.policy_model import (
    CORE_API,
    NAMESPACE_NAME_LABEL,
    NETPOL_API,
    Direction,
    IPBlock,
    IPNetwork,
    LabelSelector,
    NamedPort,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyObject,
    PolicyPort,
    PolicyRule,
    Protocol,
    Requirement,
)
from ipam.errors import ValidationError

NETPOL, NAMESPACE, POD = "NetworkPolicy", "Namespace", "Pod"
API_OF = {NETPOL: NETPOL_API, NAMESPACE: CORE_API, POD: CORE_API}
DEFAULT_NAMESPACE = "default"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


class _Ctx:
    """The resource being decoded, for error messages."""

    def __init__(self, resource: str) -> None:
        self.resource = resource

    def bad(self, fld: str, problem: str) -> ValidationError:
        return ValidationError(fld, problem, self.resource)


# names and labels ---------------------------------------------------------------------------


def label_key_problem(key: str) -> str | None:
    """None if ``key`` is a valid label key (``[prefix/]name``), else why not."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"{key!r}: the prefix must be a DNS subdomain (lowercase, at most 253 characters)"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (f"{key!r}: the name part must be 1-63 characters, alphanumeric, '-', '_' or "
                "'.', starting and ending alphanumeric")  # fmt: skip
    return None


def label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return (f"{value!r}: a label value must be at most 63 characters, alphanumeric, "
                "'-', '_' or '.', starting and ending alphanumeric")  # fmt: skip
    return None


def check_labels(labels: Mapping[str, str], resource: str, fld: str = "metadata.labels") -> None:
    for k, v in labels.items():
        problem = label_key_problem(k) or label_value_problem(v)
        if problem:
            raise ValidationError(f"{fld}.{k}", problem, resource)


def _labels(c: _Ctx, raw: Any, fld: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise c.bad(fld, "must be a mapping of label keys to strings")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise c.bad(f"{fld}.{k}", f'must be a string (quote it: {k}: "{v}")')
        out[k] = v
    check_labels(out, c.resource, fld)
    return out


def dns_label_problem(name: str) -> str | None:
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        return f"{name!r} must be a DNS label (lowercase alphanumeric and '-', at most 63)"
    return None


def dns_subdomain_problem(name: str) -> str | None:
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        return f"{name!r} must be a DNS subdomain (lowercase alphanumeric, '-', '.')"
    return None


# the envelope -------------------------------------------------------------------------------


def decode(doc: Mapping[str, Any], where: str = "") -> PolicyObject:
    """The validated object of one document whose ``kind`` is NetworkPolicy, Namespace or
    Pod; ValidationError naming the field otherwise."""
    kind = doc.get("kind")
    c = _Ctx(where or str(kind))
    if kind not in API_OF:
        raise c.bad("kind", f"{kind!r} is not one of {', '.join(API_OF)}")
    if doc.get("apiVersion") != API_OF[kind]:
        raise c.bad("apiVersion", f"{doc.get('apiVersion')!r}: {kind} is {API_OF[kind]}")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise c.bad("metadata.name", "is required (a string)")
    name = meta["name"]
    namespace = None
    if kind != NAMESPACE:
        namespace = meta.get("namespace", DEFAULT_NAMESPACE)
        if not isinstance(namespace, str) or dns_label_problem(namespace):
            raise c.bad("metadata.namespace", dns_label_problem(str(namespace)) or "")
    c.resource = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    problem = dns_label_problem(name) if kind == NAMESPACE else dns_subdomain_problem(name)
    if problem:
        raise c.bad("metadata.name", problem)
    labels = _labels(c, meta.get("labels"), "metadata.labels")
    if kind == NAMESPACE:
        return Namespace(name, {**labels, NAMESPACE_NAME_LABEL: name})
    assert namespace is not None
    if kind == POD:
        return Pod(namespace, name, labels, _pod_ports(c, doc.get("spec")))
    for k in doc:
        if k not in ("apiVersion", "kind", "metadata", "spec", "status"):
            raise c.bad(str(k), "unknown field (known: apiVersion, kind, metadata, spec)")
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise c.bad("spec", "must be a mapping")
    return _netpol(c, namespace, name, labels, spec)


def _mapping(c: _Ctx, raw: Any, fld: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise c.bad(fld, "must be a mapping")
    for k in raw:
        if k not in known:
            raise c.bad(f"{fld}.{k}", f"unknown field (known: {', '.join(known)})")
    return raw


def _list(c: _Ctx, raw: Any, fld: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise c.bad(fld, "must be a list")
    return raw


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# pods ---------------------------------------------------------------------------------------


def _pod_ports(c: _Ctx, spec: Any) -> tuple[NamedPort, ...]:
    if spec is None:
        return ()
    if not isinstance(spec, Mapping):
        raise c.bad("spec", "must be a mapping")
    ports: list[NamedPort] = []
    names: set[str] = set()
    for i, ctr in enumerate(_list(c, spec.get("containers"), "spec.containers")):
        if not isinstance(ctr, Mapping):
            raise c.bad(f"spec.containers[{i}]", "must be a mapping")
        for j, p in enumerate(_list(c, ctr.get("ports"), f"spec.containers[{i}].ports")):
            fld = f"spec.containers[{i}].ports[{j}]"
            if not isinstance(p, Mapping):
                raise c.bad(fld, "must be a mapping")
            num = p.get("containerPort")
            if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 65535:
                raise c.bad(f"{fld}.containerPort", f"{num!r} must be a port number 1-65535")
            name = p.get("name", "")
            if name:
                if not isinstance(name, str) or svc_name_problem(name):
                    raise c.bad(f"{fld}.name", svc_name_problem(str(name)) or "")
                if name in names:
                    raise c.bad(f"{fld}.name", f"{name!r} is a duplicate port name")
                names.add(name)
            ports.append(NamedPort(name, num, _protocol(c, p.get("protocol"), f"{fld}.protocol")))
    return tuple(ports)


def svc_name_problem(name: str) -> str | None:
    """A port name is an IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', with a letter,
    no leading, trailing or double '-'."""
    if (len(name) > 15 or not _SVC_NAME.fullmatch(name) or "--" in name
            or not re.search("[a-z]", name)):  # fmt: skip
        return (
            f"{name!r} must be a port name: 1-15 lowercase letters, digits or '-', "
            "with at least one letter, no leading, trailing or double '-'"
        )
    return None


def _protocol(c: _Ctx, raw: Any, fld: str) -> Protocol:
    if raw is None:
        return Protocol.TCP
    if raw not in tuple(Protocol):
        raise c.bad(fld, f"unsupported value {raw!r} (supported: TCP, UDP, SCTP)")
    return Protocol(raw)


# network policies ---------------------------------------------------------------------------


def _netpol(c: _Ctx, namespace: str, name: str, labels: dict[str, str],
            raw: Mapping[str, Any]) -> NetworkPolicy:  # fmt: skip
    spec = _mapping(c, raw, "spec", ("podSelector", "ingress", "egress", "policyTypes"))
    sel = _selector(c, spec.get("podSelector") or {}, "spec.podSelector")
    ingress = tuple(_rule(c, r, f"spec.ingress[{i}]", "from")
                    for i, r in enumerate(_list(c, spec.get("ingress"), "spec.ingress")))  # fmt: skip
    egress = tuple(_rule(c, r, f"spec.egress[{i}]", "to")
                   for i, r in enumerate(_list(c, spec.get("egress"), "spec.egress")))  # fmt: skip
    raw_types = spec.get("policyTypes")
    types: list[Direction] = []
    if raw_types is None:  # the API server's defaulting
        types = [Direction.INGRESS, *([Direction.EGRESS] if egress else [])]
    for i, t in enumerate(_list(c, raw_types, "spec.policyTypes")):
        if t not in tuple(Direction):
            raise c.bad(f"spec.policyTypes[{i}]",
                        f"unsupported value {t!r} (supported: Ingress, Egress)")  # fmt: skip
        if Direction(t) not in types:
            types.append(Direction(t))
    if raw_types is not None and len(raw_types) > 2:
        raise c.bad("spec.policyTypes", "may not specify more than two policyTypes")
    return NetworkPolicy(namespace, name, sel, tuple(types), ingress, egress, labels)


def _rule(c: _Ctx, raw: Any, fld: str, peers_key: str) -> PolicyRule:
    r = _mapping(c, raw, fld, ("ports", peers_key))
    ports = tuple(_port(c, p, f"{fld}.ports[{i}]")
                  for i, p in enumerate(_list(c, r.get("ports"), f"{fld}.ports")))  # fmt: skip
    peers = tuple(_peer(c, p, f"{fld}.{peers_key}[{i}]")
                  for i, p in enumerate(_list(c, r.get(peers_key), f"{fld}.{peers_key}")))  # fmt: skip
    return PolicyRule(peers or None, ports or None)


def _port(c: _Ctx, raw: Any, fld: str) -> PolicyPort:
    p = _mapping(c, raw, fld, ("protocol", "port", "endPort"))
    proto = _protocol(c, p.get("protocol"), f"{fld}.protocol")
    port, end = p.get("port"), p.get("endPort")
    if port is not None:
        if _int(port):
            if not 1 <= port <= 65535:
                raise c.bad(f"{fld}.port", f"{port} must be between 1 and 65535, inclusive")
        elif not isinstance(port, str) or svc_name_problem(port):
            raise c.bad(f"{fld}.port", svc_name_problem(str(port)) or "")
    if end is not None:
        if port is None:
            raise c.bad(f"{fld}.endPort", "may not be specified when `port` is not specified")
        if not _int(port):
            raise c.bad(f"{fld}.endPort", "may not be specified when `port` is non-numeric")
        if not _int(end) or not 1 <= end <= 65535:
            raise c.bad(f"{fld}.endPort", f"{end!r} must be between 1 and 65535, inclusive")
        if end < port:
            raise c.bad(f"{fld}.endPort", f"{end} must be greater than or equal to `port` {port}")
    return PolicyPort(proto, port, end)


def _peer(c: _Ctx, raw: Any, fld: str) -> Peer:
    p = _mapping(c, raw, fld, ("podSelector", "namespaceSelector", "ipBlock"))
    pod = p.get("podSelector")
    ns = p.get("namespaceSelector")
    block = p.get("ipBlock")
    if pod is None and ns is None and block is None:
        raise c.bad(fld, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
    if block is not None and (pod is not None or ns is not None):
        raise c.bad(fld, "may not specify more than 1 peer: ipBlock with a selector")
    if block is not None:
        return Peer(ip_block=_ip_block(c, block, f"{fld}.ipBlock"))
    return Peer(None if pod is None else _selector(c, pod, f"{fld}.podSelector"),
                None if ns is None else _selector(c, ns, f"{fld}.namespaceSelector"))  # fmt: skip


def _cidr(c: _Ctx, raw: Any, fld: str) -> IPNetwork:
    if not isinstance(raw, str) or "/" not in raw:
        raise c.bad(fld, f"{raw!r} must be a CIDR, like 10.0.0.0/8 or fd00::/64")
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError as e:
        raise c.bad(fld, f"{raw!r} is not a valid CIDR: {e}") from None


def _ip_block(c: _Ctx, raw: Any, fld: str) -> IPBlock:
    b = _mapping(c, raw, fld, ("cidr", "except"))
    if b.get("cidr") is None:
        raise c.bad(f"{fld}.cidr", "is required")
    cidr = _cidr(c, b["cidr"], f"{fld}.cidr")
    excepts: list[IPNetwork] = []
    for i, e in enumerate(_list(c, b.get("except"), f"{fld}.except")):
        ex = _cidr(c, e, f"{fld}.except[{i}]")
        inside = ex.version == cidr.version and ex.subnet_of(cidr)  # type: ignore[arg-type]
        if not inside or ex.prefixlen <= cidr.prefixlen:
            raise c.bad(f"{fld}.except[{i}]", f"{e!r} must be a strict subset of `cidr` {cidr}")
        excepts.append(ex)
    return IPBlock(cidr, tuple(excepts))


def _selector(c: _Ctx, raw: Any, fld: str) -> LabelSelector:
    s = _mapping(c, raw, fld, ("matchLabels", "matchExpressions"))
    labels = _labels(c, s.get("matchLabels"), f"{fld}.matchLabels")
    reqs: list[Requirement] = []
    for i, e in enumerate(_list(c, s.get("matchExpressions"), f"{fld}.matchExpressions")):
        efld = f"{fld}.matchExpressions[{i}]"
        r = _mapping(c, e, efld, ("key", "operator", "values"))
        key = r.get("key")
        if not isinstance(key, str) or label_key_problem(key):
            raise c.bad(f"{efld}.key", label_key_problem(str(key)) or "must be a string")
        op = r.get("operator")
        if op not in tuple(Operator):
            raise c.bad(f"{efld}.operator", f"{op!r} is not a valid selector operator "
                        "(In, NotIn, Exists, DoesNotExist)")  # fmt: skip
        values = _list(c, r.get("values"), f"{efld}.values")
        if op in (Operator.IN, Operator.NOT_IN) and not values:
            raise c.bad(f"{efld}.values", "must be specified when `operator` is 'In' or 'NotIn'")
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
            raise c.bad(f"{efld}.values",
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'")  # fmt: skip
        for j, v in enumerate(values):
            if not isinstance(v, str) or label_value_problem(v):
                raise c.bad(f"{efld}.values[{j}]", label_value_problem(str(v)) or "a string")
        reqs.append(Requirement(key, Operator(op), tuple(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(reqs))
