"""NetworkPolicy, Namespace and Pod as ``fabricctl apply|get|delete`` kinds (hooked into
fabric.resources.documents, which owns the document envelope of the Calico-style kinds).

Unlike the Calico-style kinds these keep Kubernetes' ``apiVersion`` (networking.k8s.io/v1,
v1) in and out, so ``kubectl get namespaces,pods,networkpolicies -A -o yaml | fabricctl
apply -f -`` works as it is, and ``fabricctl get ... -o yaml`` gives Kubernetes documents.
NetworkPolicy and Pod are namespaced: ``metadata.namespace`` defaults to ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fabric.resources.policy_codec import NAMESPACE, NETPOL, POD, decode
from fabric.resources.policy_model import (
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyObject,
    to_document,
)
from fabric.resources.policy_store import PolicyStore, describe
from ipam.store import Store

KINDS = (NETPOL, NAMESPACE, POD)
NAMESPACED = (NETPOL, POD)
ALIASES = {
    NETPOL: ("networkpolicy", "networkpolicies", "netpol", "netpols"),
    NAMESPACE: ("namespace", "namespaces", "ns"),
    POD: ("pod", "pods", "po"),
}


def split_name(kind: str, name: str, namespace: str | None) -> tuple[str, str | None]:
    """``NS/NAME`` or ``NAME`` (in ``namespace``, else ``default``) for namespaced kinds."""
    if kind not in NAMESPACED:
        return name, None
    if "/" in name:
        ns, _, name = name.partition("/")
        return name, ns
    return name, namespace or "default"


def parse(d: Mapping[str, Any], where: str) -> PolicyObject:
    """The validated object of a document of one of these kinds (ValidationError else)."""
    return decode(d, where)


async def apply(store: Store, objs: Sequence[PolicyObject]) -> list[str]:
    return await PolicyStore(store).apply(objs)


async def get(store: Store, kind: str, name: str | None,
              namespace: str | None) -> list[dict[str, Any]]:  # fmt: skip
    """Documents of ``kind``; ``namespace`` None = every namespace; NotFoundError if NAME
    is given and absent."""
    ps = PolicyStore(store)
    if name is not None:
        n, ns = split_name(kind, name, namespace)
        return [to_document(await ps.get(kind, n, ns))]
    return [to_document(o) for o in await ps.list_objects(kind, namespace)]


async def delete(store: Store, kind: str, name: str, namespace: str | None) -> str:
    n, ns = split_name(kind, name, namespace)
    await PolicyStore(store).delete(kind, n, ns)
    return f"{kind} {ns}/{n} deleted" if ns else f"{kind} {n} deleted"


def resource(obj: PolicyObject) -> str:
    return describe(obj)


def _labels(d: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((d["metadata"].get("labels") or {}).items()))


def _selector(sel: Mapping[str, Any]) -> str:
    terms = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        vals = ",".join(e.get("values") or [])
        terms.append({"In": f"{e['key']} in ({vals})", "NotIn": f"{e['key']} notin ({vals})",
                      "Exists": e["key"], "DoesNotExist": f"!{e['key']}"}[e["operator"]])  # fmt: skip
    return ",".join(terms) or "<none>"


def table_rows(kind: str, docs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    if kind == NETPOL:
        headers = ["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES", "INGRESS", "EGRESS"]
        rows = [[d["metadata"]["namespace"], d["metadata"]["name"],
                 _selector(d["spec"].get("podSelector") or {}),
                 ",".join(d["spec"].get("policyTypes", [])),
                 len(d["spec"].get("ingress", [])), len(d["spec"].get("egress", []))]
                for d in docs]  # fmt: skip
    elif kind == NAMESPACE:
        headers = ["NAME", "LABELS"]
        rows = [[d["metadata"]["name"], _labels(d)] for d in docs]
    else:
        headers = ["NAMESPACE", "NAME", "LABELS", "PORTS"]
        rows = [[d["metadata"]["namespace"], d["metadata"]["name"], _labels(d),
                 ",".join(f"{p.get('name', '')}{':' if p.get('name') else ''}"
                          f"{p['containerPort']}/{p['protocol']}"
                          for c in d["spec"]["containers"] for p in c.get("ports", []))]
                for d in docs]  # fmt: skip
    return headers, rows


__all__ = ["ALIASES", "KINDS", "NAMESPACED", "Namespace", "NetworkPolicy", "Pod", "PolicyObject", "apply",
           "delete", "get", "parse", "resource", "split_name", "table_rows"]  # fmt: skip
