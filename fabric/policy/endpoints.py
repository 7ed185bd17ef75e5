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

import bisect
import json
import operator
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


def _group(allocs: Iterable[Allocation]) -> dict[tuple[str, str], list[Allocation]]:
    by_key: dict[tuple[str, str], list[Allocation]] = {}
    for a in allocs:
        if a.attrs.get("containerID"):
            by_key.setdefault(endpoint_key(a.attrs), []).append(a)
    return by_key


def _endpoint(ns: str, name: str, group: list[Allocation], pod: Pod | None,
              local_node: str | None, host_ifname: HostIfname | None) -> Endpoint:  # fmt: skip
    group = sorted(group, key=lambda a: (a.attrs.get("ifname") != "eth0", a.ip.version, a.ip))
    labels = {}
    for a in group:
        labels.update(cni_labels(a.attrs))
    if pod is not None:
        labels.update(pod.labels)
    node = group[0].node
    ifname = None
    if host_ifname is not None and node == local_node:
        first = group[0].attrs
        ifname = host_ifname(first.get("containerID", ""), first.get("ifname", "eth0"))
    ips = tuple(dict.fromkeys(a.ip for a in group))
    ports = tuple(p for p in pod.ports if p.name) if pod is not None else ()
    return Endpoint(ns, name, ips, labels, ports, node, ifname)


def build_endpoints(allocs: Iterable[Allocation], pods: Iterable[Pod], local_node: str | None,
                    host_ifname: HostIfname | None = None) -> list[Endpoint]:  # fmt: skip
    """One Endpoint per pod that holds addresses, sorted by key. ``host_ifname`` names the
    host end of a local attachment (the dataplane's naming; None leaves ifname unset)."""
    pod_of = {(p.namespace, p.name): p for p in pods}
    return [_endpoint(ns, name, group, pod_of.get((ns, name)), local_node, host_ifname)
            for (ns, name), group in sorted(_group(allocs).items())]  # fmt: skip


def _pods_changed(pod_of: dict[tuple[str, str], Pod], old: tuple[Pod, ...],
                  pods: tuple[Pod, ...], affected: set[tuple[str, str]]) -> dict[tuple[str, str], Pod]:  # fmt: skip
    """``{(ns, name): pod for pod in pods}``, from ``pod_of`` (that of ``old``) moving only
    the Pods that are new or gone objects (ids compared in C, not every key in Python); their
    keys go into ``affected``. Duplicate keys on either side: built again as a whole."""
    if len(pod_of) == len(old):
        old_ids, new_ids = set(map(id, old)), set(map(id, pods))
        out = dict(pod_of)
        for p in (p for p in old if id(p) not in new_ids):
            k = (p.namespace, p.name)
            if out.get(k) is p:
                del out[k]
            affected.add(k)
        for p in (p for p in pods if id(p) not in old_ids):
            k = (p.namespace, p.name)
            out[k] = p
            affected.add(k)
        if len(out) == len(pods):
            return out
    out = {(p.namespace, p.name): p for p in pods}
    affected.update(k for k in out.keys() | pod_of.keys() if out.get(k) is not pod_of.get(k))
    return out


class EndpointCache:
    """``build_endpoints(allocations(blocks), pods, ...)`` with memory, for fabricd's batches:
    only the allocations of Block objects that are new or gone since the last call are
    looked at (the agent's BlockIndex re-parses only blocks whose revision changed), and an
    endpoint is rebuilt only when its allocations or its Pod object changed; unchanged
    endpoints come back as the same objects (what the incremental compile compares first).
    ``pod_of`` and ``keys`` are the last call's Pods by (namespace, name) and endpoint keys."""

    def __init__(self, local_node: str | None, host_ifname: HostIfname | None = None) -> None:
        self.local_node, self.host_ifname = local_node, host_ifname
        self._blocks: dict[int, tuple[Block, list[Allocation]]] = {}  # the Block pins its id
        self._groups: dict[tuple[str, str], list[Allocation]] = {}
        self._eps: dict[tuple[str, str], Endpoint] = {}
        self._sorted: list[Endpoint] = []
        self._order: list[tuple[str, str]] = []  # the keys of _eps, sorted
        self._pods: tuple[Pod, ...] = ()
        self.pod_of: dict[tuple[str, str], Pod] = {}
        self.keys: set[tuple[str, str]] = set()

    def build(self, blocks: Iterable[Block], pods: Iterable[Pod]) -> list[Endpoint]:
        """The endpoints, sorted by key (a new list each call)."""
        now = {id(b): b for b in blocks}
        gone = [al for k, (_, al) in self._blocks.items() if k not in now]
        new = {k: (b, allocations([b])) for k, b in now.items() if k not in self._blocks}
        pods = tuple(pods)
        affected: set[tuple[str, str]] = set()
        if len(pods) != len(self._pods) or any(map(operator.is_not, pods, self._pods)):
            pod_of = _pods_changed(self.pod_of, self._pods, pods, affected)
            self.pod_of, self._pods = pod_of, pods
        pod_of = self.pod_of
        for al in gone:
            for a in al:
                if a.attrs.get("containerID"):
                    key = endpoint_key(a.attrs)
                    affected.add(key)
                    group = [x for x in self._groups.get(key, ()) if x is not a]
                    if group:
                        self._groups[key] = group
                    else:
                        self._groups.pop(key, None)
        for _, al in new.values():
            for key, group in _group(al).items():
                affected.add(key)
                self._groups.setdefault(key, []).extend(group)
        self._blocks = {k: self._blocks.get(k) or new[k] for k in now}
        if not affected:
            return list(self._sorted)
        for key in affected:  # _order and _sorted change in place (no walk of every key)
            members = self._groups.get(key)
            if members:
                e = _endpoint(*key, members, pod_of.get(key), self.local_node, self.host_ifname)
                i = bisect.bisect_left(self._order, key)
                if key in self._eps:
                    self._sorted[i] = e
                else:
                    self._order.insert(i, key)
                    self._sorted.insert(i, e)
                    self.keys.add(key)
                self._eps[key] = e
            elif self._eps.pop(key, None) is not None:
                i = bisect.bisect_left(self._order, key)
                del self._order[i], self._sorted[i]
                self.keys.discard(key)
        return list(self._sorted)
