"""Endpoints (pods as policy sees them) from the IPAM blocks' allocations, the Pod objects
and the CNI ``args.cni.labels`` recorded on the allocations.

An allocation is a pod's when it carries ``containerID`` (the CNI ADD records network,
containerID, ifname, and pod/namespace from the K8S_* arguments; see
fabric.workloads.pod_ipam.Owner). The endpoint is ``namespace/pod``; without Kubernetes
arguments it is ``default/<containerID>``. Its labels are the CNI labels overlaid by the Pod
object's (the Pod object is the API's truth), its named ports are the Pod object's, its node
is the allocation's ``node`` (else the block's affinity). Several attachments of one pod
(several networks or interfaces) make one endpoint with all their addresses; its ``ifname``
is the host end of the first attachment on ``local_node`` (``eth0`` first).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fabric.policy.model import Endpoint, IPAddress
from fabric.resources.policy_model import Pod
from ipam.block import Block

DEFAULT_NAMESPACE = "default"
HostIfname = Callable[[str, str], str]  # (containerID, ifname) -> host-side veth name


@dataclass(frozen=True, slots=True)
class Allocation:
    """One allocated address and who it is for (the block attribute's secondary map)."""

    ip: IPAddress
    attrs: Mapping[str, str] = field(default_factory=dict)
    node: str = ""


def allocations(blocks: Iterable[Block]) -> list[Allocation]:
    """Every allocation of ``blocks`` (pure: the caller read the blocks from etcd)."""
    return [Allocation(b.ip(o), a.secondary, a.secondary.get("node") or b.affinity or "")
            for b in blocks for o, a in b.allocated()]  # fmt: skip


def cni_labels(attrs: Mapping[str, str]) -> dict[str, str]:
    """The ``labels`` attribute (a JSON object of strings); anything else reads as none."""
    try:
        raw = json.loads(attrs.get("labels") or "{}")
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items()}


def endpoint_key(attrs: Mapping[str, str]) -> tuple[str, str]:
    return (attrs.get("namespace") or DEFAULT_NAMESPACE,
            attrs.get("pod") or attrs.get("containerID", ""))  # fmt: skip


def build_endpoints(allocs: Iterable[Allocation], pods: Iterable[Pod], local_node: str | None,
                    host_ifname: HostIfname | None = None) -> list[Endpoint]:  # fmt: skip
    """One Endpoint per pod that holds addresses, sorted by key. ``host_ifname`` names the
    host end of a local attachment (the dataplane's naming; None leaves ifname unset)."""
    by_key: dict[tuple[str, str], list[Allocation]] = {}
    for a in allocs:
        if a.attrs.get("containerID"):
            by_key.setdefault(endpoint_key(a.attrs), []).append(a)
    pod_of = {(p.namespace, p.name): p for p in pods}
    out: list[Endpoint] = []
    for (ns, name), group in sorted(by_key.items()):
        group.sort(key=lambda a: (a.attrs.get("ifname") != "eth0", a.ip.version, a.ip))
        labels = {}
        for a in group:
            labels.update(cni_labels(a.attrs))
        pod = pod_of.get((ns, name))
        if pod is not None:
            labels.update(pod.labels)
        node = group[0].node
        ifname = None
        if host_ifname is not None and node == local_node:
            first = group[0].attrs
            ifname = host_ifname(first.get("containerID", ""), first.get("ifname", "eth0"))
        ips = tuple(dict.fromkeys(a.ip for a in group))
        ports = tuple(p for p in pod.ports if p.name) if pod is not None else ()
        out.append(Endpoint(ns, name, ips, labels, ports, node, ifname))
    return out
