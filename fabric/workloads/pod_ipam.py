"""IPAM for pod attachments: which addresses an attachment gets, and which ones GC frees.

An attachment's addresses belong to the IPAM handle ``<network>.<containerID>.<ifname>``, so
DEL releases exactly them and a second ADD for the same attachment gets the same ones back
(the allocator is idempotent per handle). Every allocation records who it is for (node, pod,
namespace, network, containerID, ifname): GC matches on those, never on parsing a handle.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cni.result import IPAddress, IPInterface
from cni.spec import Env, IPAMConf
from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.commit import AssignedIP
from ipam.errors import IPAMError, ValidationError
from ipam.request import AssignRequest


def handle_id(network: str, container_id: str, ifname: str) -> str:
    return f"{network}.{container_id}.{ifname}"


@dataclass(frozen=True, slots=True)
class Owner:
    network: str
    container_id: str
    ifname: str
    pod: str = ""
    namespace: str = ""
    infra_container_id: str = ""  # K8S_POD_INFRA_CONTAINER_ID (the sandbox)
    labels: str = ""  # args.cni.labels as a sorted JSON object (policy reads it)

    @property
    def handle(self) -> str:
        return handle_id(self.network, self.container_id, self.ifname)

    def attrs(self) -> dict[str, str]:
        a = {"network": self.network, "containerID": self.container_id, "ifname": self.ifname}
        if self.pod:
            a["pod"] = self.pod
        if self.namespace:
            a["namespace"] = self.namespace
        if self.infra_container_id:
            a["infraContainerID"] = self.infra_container_id
        if self.labels:
            a["labels"] = self.labels
        return a

    @classmethod
    def of(cls, network: str, env: Env, conf_args: Mapping[str, Any] | None = None) -> Owner:
        """``conf_args`` (the network config's ``args``) only matters for ADD: its
        ``cni.labels`` are recorded on the allocation for NetworkPolicy."""
        a = env.args
        return cls(network, env.container_id, env.ifname, a.pod_name, a.pod_namespace,
                   a.infra_container_id, cni_labels(conf_args or {}))  # fmt: skip


def cni_labels(conf_args: Mapping[str, Any]) -> str:
    """``args.cni.labels`` (``[{"key": k, "value": v}, ...]``, the CNI convention) as a sorted
    JSON object, "" when absent; ValidationError naming the entry when malformed."""
    cni = conf_args.get("cni")
    raw = cni.get("labels") if isinstance(cni, Mapping) else None
    if raw is None:
        return ""
    if not isinstance(raw, list):
        raise ValidationError("args.cni.labels", "must be a list of {key, value}")
    labels: dict[str, str] = {}
    for i, e in enumerate(raw):
        if not (isinstance(e, Mapping) and isinstance(e.get("key"), str)
                and isinstance(e.get("value"), str)):  # fmt: skip
            raise ValidationError(f"args.cni.labels[{i}]", "must be {key: string, value: string}")
        labels[e["key"]] = e["value"]
    return json.dumps(labels, sort_keys=True, separators=(",", ":")) if labels else ""


class PodIPAM:
    """Assign, look up and release the addresses of attachments on one node."""

    def __init__(self, alloc: Allocator, batch: BatchingAllocator, node: str) -> None:
        self.alloc = alloc
        self.batch = batch
        self.node = node

    async def assign(
        self, owner: Owner, conf: IPAMConf, requested: tuple[IPAddress, ...] = ()
    ) -> list[AssignedIP]:
        """The attachment's addresses: those it already holds, else ``requested`` (``IP=``),
        else one per family from the configured (or the node's) pools. Never a second set
        for the same attachment. Partial work is the caller's to release (by handle).
        """
        handle = owner.handle
        if requested:
            held = await self.alloc.ips_by_handle(handle)
            if held:
                return held
            return [
                await self.alloc.assign_ip(handle, ip, self.node, owner.attrs()) for ip in requested
            ]
        req = await self._request(owner, conf)
        return await self.batch.assign(req)  # idempotent per handle

    async def families(
        self, conf: IPAMConf, requested: tuple[IPAddress, ...] = ()
    ) -> frozenset[int]:
        """The IP versions :meth:`assign` will most likely give, without asking etcd (the
        pools come from the cached settings): the dataplane is prepared for them while the
        assignment runs. A guess: a handle holding addresses already may hold others, and an
        invalid config is refused by assign itself."""
        if requested:
            return frozenset(ip.version for ip in requested)
        try:
            req = await self._request(Owner("", "", ""), conf)
        except (IPAMError, ValueError):
            return frozenset({4})
        return frozenset(v for v, n in ((4, req.num_v4), (6, req.num_v6)) if n)

    async def _request(self, owner: Owner, conf: IPAMConf) -> AssignRequest:
        pools: dict[int, list[str]] = {4: [], 6: []}
        if conf.pools:
            s = await self.alloc.settings()
            for name in conf.pools:
                version: int
                if "/" in name:
                    version = ipaddress.ip_network(name).version
                elif name in s.pools:
                    version = s.pools[name][1].version
                else:
                    raise ValidationError("ipam.pools", f"no IP pool named {name!r}")
                pools[version].append(name)
            want4 = bool(pools[4]) and conf.assign_ipv4 is not False
            want6 = bool(pools[6]) and conf.assign_ipv6 is not False
        else:
            want4 = conf.assign_ipv4 is not False
            want6 = conf.assign_ipv6 is True
        if not want4 and not want6:
            raise ValidationError("ipam", "no address family left to assign")
        return AssignRequest(
            handle=owner.handle,
            node=self.node,
            num_v4=int(want4),
            num_v6=int(want6),
            attrs=owner.attrs(),
            pools_v4=tuple(pools[4]),
            pools_v6=tuple(pools[6]),
        )

    async def held(self, handle: str) -> list[AssignedIP]:
        return await self.alloc.ips_by_handle(handle)

    async def release(self, handle: str) -> list[IPAddress]:
        """Idempotent: a handle that holds nothing (or never existed) releases nothing."""
        return await self.alloc.release_handle(handle)

    async def release_exact(self, seqs: Mapping[IPAddress, int]) -> list[IPAddress]:
        """Release each address only if it still holds the allocation of sequence number
        ``seqs[ip]`` (one given later has another): returns the stale ones, left alone."""
        _, stale = await self.alloc.release_ips(dict(seqs))
        return stale

    async def prefix_lengths(self, assigned: list[AssignedIP], how: str) -> list[IPInterface]:
        """The addresses with the prefix length ``how`` asks for: host (/32, /128), the
        block's, or the pool's."""
        out: list[IPInterface] = []
        s = await self.alloc.settings() if how == "pool" else None
        for a in assigned:
            if how == "block":
                plen = a.block.prefixlen
            elif s is not None and a.pool in s.pools:
                plen = s.pools[a.pool][1].cidr.prefixlen
            else:
                plen = a.ip.max_prefixlen
            out.append(ipaddress.ip_interface((a.ip, plen)))
        return out

    async def leaked(
        self, network: str, valid: Collection[tuple[str, str]], busy: Collection[str]
    ) -> list[str]:
        """Handles of this node's allocations in ``network`` whose (containerID, ifname) is
        not in ``valid``; handles in ``busy`` (a request in flight) are left alone."""
        blocks, _ = await self.alloc.blocks.list_blocks()
        dead: set[str] = set()
        for _, blk in blocks.values():
            for _, attr in blk.allocated():
                sec: Mapping[str, str] = attr.secondary
                if sec.get("node") != self.node or sec.get("network") != network:
                    continue
                key = (sec.get("containerID", ""), sec.get("ifname", ""))
                if key not in valid and attr.handle not in busy:
                    dead.add(attr.handle)
        return sorted(dead)

    async def usable_pools(self, wanted: tuple[str, ...]) -> list[str]:
        """Names of enabled pools that can serve this node: ``wanted`` ones (names or
        CIDRs) if given, else those whose nodeSelector matches the node's labels."""
        s = await self.alloc.settings(fresh=True)
        pools = [p for _, p in s.pools.values() if not p.disabled]
        if wanted:
            return [p.name for p in pools if p.name in wanted or str(p.cidr) in wanted]
        node = await self.alloc.resources.get_node(self.node)
        labels = node.labels if node is not None else {}
        return [p.name for p in pools if p.selects(labels)]
