"""YAML resources for ``fabricctl apply|get|delete``: IPPool, IPReservation, IPAMConfig, Node,
and (converted in fabric.resources.bgp) BGPPeer and BGPConfiguration.

Documents look like Calico's (``apiVersion``, ``kind``, ``metadata.name``, ``spec`` with
Calico's field names); ``apiVersion`` may be ``projectcalico.org/v3`` or ``fabric/v1``. What
``get -o yaml`` prints is valid input for ``apply -f`` (output uses ``fabric/v1``: the schema
is our subset of Calico's). A ``kind: List`` (or ``IPPoolList``...) with ``items`` is
accepted as well, so ``get -o json`` output can be applied too.

NetworkPolicy (networking.k8s.io/v1), Namespace and Pod (v1) keep their Kubernetes envelope
(fabric.resources.policy_documents), so kubectl's output applies as it is.

Node follows Calico's shape: labels in ``metadata.labels``, ``spec.addresses`` as a list of
``{address: ...}`` (plain strings accepted), ``spec.bgp.asNumber`` and
``spec.bgp.routeReflectorClusterID``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from bgp.config import Peer
from fabric.errors import CLIError
from fabric.resources import bgp as rb
from fabric.resources import policy_documents as pd
from fabric.resources.bgp_store import BGPStore
from ipam import keys
from ipam.errors import NotFoundError, ValidationError
from ipam.gc import GCResult, Maintenance
from ipam.pool import IPAMConfig, Pool, Reservation
from ipam.resources import Node, Resources

API_VERSIONS = ("projectcalico.org/v3", "fabric/v1")
OUTPUT_API_VERSION = "fabric/v1"
IPAM_CONFIG_NAME = "default"  # the singleton's name, as Calico's IPAMConfiguration

IPPOOL, IPRESERVATION, IPAMCONFIG, NODE = "IPPool", "IPReservation", "IPAMConfig", "Node"
BGPPEER, BGPCONFIG = rb.BGPPEER, rb.BGPCONFIG
KINDS = (IPPOOL, IPRESERVATION, IPAMCONFIG, NODE, *rb.KINDS, *pd.KINDS)
SINGLETONS = (IPAMCONFIG, BGPCONFIG)  # one resource named "default"; `get` shows it alone
_ALIASES = {
    IPPOOL: ("ippool", "ippools", "pool", "pools", "ipp", "ipps"),
    IPRESERVATION: ("ipreservation", "ipreservations", "reservation", "reservations"),
    IPAMCONFIG: ("ipamconfig", "ipamconfigs", "ipamconfiguration", "ipamconfigurations"),
    NODE: ("node", "nodes", "no"),
    **rb.ALIASES,
    **pd.ALIASES,
}
KIND_NAMES = {alias: kind for kind, aliases in _ALIASES.items() for alias in aliases}

Progress = Callable[[str], None]


def kind_of(text: str) -> str:
    """The canonical kind for a name or alias typed on the command line (case-insensitive)."""
    kind = KIND_NAMES.get(text.lower())
    if kind is None:
        raise CLIError(f"unknown kind {text!r} (use one of: ippool, ipreservation, ipamconfig, "
                       "node, bgppeer, bgpconfiguration, networkpolicy, namespace, pod, or their plurals)")  # fmt: skip
    return kind


@dataclass(frozen=True, slots=True)
class Document:
    """One resource read from YAML, with where it came from (for error messages)."""

    kind: str
    name: str
    spec: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    where: str = ""
    obj: pd.PolicyObject | None = None  # NetworkPolicy/Namespace/Pod: validated already

    @property
    def resource(self) -> str:
        return pd.resource(self.obj) if self.obj is not None else f"{self.kind} {self.name}"


# parsing -----------------------------------------------------------------------------------


def parse_documents(text: str, source: str) -> list[Document]:
    """Every resource in ``text`` (one or many YAML documents), validated for shape only."""
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise CLIError(f"not valid YAML: {e}", source) from e
    docs: list[Document] = []
    for i, d in enumerate(raw, 1):
        where = f"{source} document {i}"
        items = _expand_list(d, where)
        if items is None:
            docs.append(_document(d, where))
        else:
            docs.extend(_document(item, f"{where} item {j}") for j, item in enumerate(items))
    if not docs:
        raise CLIError("no resources found", source)
    return docs


def _expand_list(d: object, where: str) -> list[object] | None:
    """The items of a ``kind: List`` (or ``IPPoolList``...), None for a single resource."""
    if isinstance(d, Mapping) and str(d.get("kind", "")).endswith("List"):
        items = d.get("items")
        if not isinstance(items, list):
            raise CLIError("must be a list of resources", where, "items")
        return list(items)
    return None


def _document(d: object, where: str) -> Document:
    if not isinstance(d, Mapping):
        raise CLIError("a resource must be a mapping with apiVersion, kind, metadata, spec", where)
    if d.get("kind") in pd.KINDS:
        obj = pd.parse(d, where)
        return Document(str(d["kind"]), obj.name, {}, obj.labels, where, obj)
    api = d.get("apiVersion")
    if api not in API_VERSIONS:
        raise CLIError(f"{api!r} is not supported (use one of {', '.join(API_VERSIONS)})",
                       where, "apiVersion")  # fmt: skip
    raw_kind = d.get("kind")
    kind = KIND_NAMES.get(str(raw_kind).lower()) if isinstance(raw_kind, str) else None
    if kind is None:
        raise CLIError(f"{raw_kind!r} is not a known kind (known: {', '.join(KINDS)})",
                       where, "kind")  # fmt: skip
    meta = d.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise CLIError("is required (a string)", f"{where} ({kind})", "metadata.name")
    name = meta["name"]
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise CLIError("must be a mapping of strings", f"{kind} {name}", "metadata.labels")
    spec = d.get("spec", {}) if kind in SINGLETONS else d.get("spec")
    if not isinstance(spec, Mapping):
        raise CLIError("is required (a mapping)", f"{kind} {name}", "spec")
    return Document(kind, name, spec, {str(k): str(v) for k, v in labels.items()}, where)


# conversions -------------------------------------------------------------------------------


def _resource(kind: str, name: str, spec: Mapping[str, Any],
              labels: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": OUTPUT_API_VERSION, "kind": kind, "metadata": meta, "spec": dict(spec)}


def pool_resource(pool: Pool) -> dict[str, Any]:
    return _resource(IPPOOL, pool.name, pool.spec())


def reservation_resource(res: Reservation) -> dict[str, Any]:
    return _resource(IPRESERVATION, res.name, res.spec())


def config_resource(cfg: IPAMConfig) -> dict[str, Any]:
    return _resource(IPAMCONFIG, IPAM_CONFIG_NAME, cfg.to_json())


def node_resource(node: Node) -> dict[str, Any]:
    spec: dict[str, Any] = {"addresses": [{"address": a} for a in node.addresses]}
    bgp: dict[str, Any] = {}
    if node.as_number is not None:
        bgp["asNumber"] = node.as_number
    if node.route_reflector_cluster_id:
        bgp["routeReflectorClusterID"] = node.route_reflector_cluster_id
    if bgp:
        spec["bgp"] = bgp
    return _resource(NODE, node.name, spec, node.labels)


def peer_resource(peer: Peer) -> dict[str, Any]:
    return _resource(BGPPEER, peer.name, rb.peer_spec(peer))


def config_from(doc: Document) -> IPAMConfig:
    if doc.name != IPAM_CONFIG_NAME:
        raise CLIError(f"must be {IPAM_CONFIG_NAME!r} (IPAMConfig is a singleton)",
                       doc.resource, "metadata.name")  # fmt: skip
    spec = dict(doc.spec)
    if spec.pop("autoAllocateBlocks", True) is not True:
        raise CLIError("only true is supported", doc.resource, "spec.autoAllocateBlocks")
    for k in spec:
        if k not in ("strictAffinity", "maxBlocksPerHost"):
            raise CLIError("unknown field", doc.resource, f"spec.{k}")
    try:
        return IPAMConfig.from_json(spec)
    except ValidationError as e:
        raise ValidationError(f"spec.{e.field}", e.problem, doc.resource) from e


def node_from(doc: Document) -> Node:
    spec = doc.spec
    for k in spec:
        if k not in ("addresses", "bgp"):
            raise CLIError("unknown field (known: addresses, bgp)", doc.resource, f"spec.{k}")
    addrs = spec.get("addresses") or []
    if not isinstance(addrs, list):
        raise CLIError("must be a list", doc.resource, "spec.addresses")
    plain = []
    for i, a in enumerate(addrs):
        value = a.get("address") if isinstance(a, Mapping) else a
        if not isinstance(value, str):
            raise CLIError("must be an address string or {address: ...}", doc.resource,
                           f"spec.addresses[{i}]")  # fmt: skip
        plain.append(value)
    bgp = spec.get("bgp") or {}
    if not isinstance(bgp, Mapping):
        raise CLIError("must be a mapping", doc.resource, "spec.bgp")
    try:
        return Node.from_json(doc.name, {
            "labels": doc.labels, "addresses": plain, "asNumber": bgp.get("asNumber"),
            "routeReflectorClusterID": bgp.get("routeReflectorClusterID")})  # fmt: skip
    except ValidationError as e:
        fld = "spec.bgp.asNumber" if e.field == "spec.asNumber" else e.field
        raise ValidationError(fld, e.problem, doc.resource) from e


_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")  # fmt: skip
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def parse_labels(resource: str, args: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """kubectl-style ``key=value`` (set) and ``key-`` (remove) arguments, validated."""
    sets: dict[str, str] = {}
    removes: set[str] = set()
    for a in args:
        if "=" in a:
            k, _, v = a.partition("=")
            if not _LABEL_VALUE.fullmatch(v):
                raise CLIError(
                    f"{v!r} is not a valid label value", resource, f"metadata.labels.{k}"
                )
            sets[k] = v
        elif a.endswith("-"):
            k = a[:-1]
            removes.add(k)
        else:
            raise CLIError(f"{a!r} is neither KEY=VALUE nor KEY-", resource)
        if not _LABEL_KEY.fullmatch(k):
            raise CLIError(f"{k!r} is not a valid label key", resource, f"metadata.labels.{k}")
        if k in sets and k in removes:
            raise CLIError("both set and removed", resource, f"metadata.labels.{k}")
    return sets, removes


def check(doc: Document) -> None:
    """Validate what can be checked without the datastore (BGP kinds), so `apply -f` writes
    nothing when any BGP document is bad."""
    if doc.kind == BGPPEER:
        rb.peer_from_spec(doc.name, doc.spec)
    elif doc.kind == BGPCONFIG:
        rb.config_from_spec(doc.name, doc.spec)


# apply / get / delete ------------------------------------------------------------------------


async def apply(res: Resources, doc: Document) -> str:
    """Create or update one resource; returns ``created``, ``configured`` or ``unchanged``.

    An existing IPPool keeps its blockSize when the document leaves it out; a changed cidr
    or blockSize is refused (ValidationError naming the field).
    """
    try:
        return await _apply(res, doc)
    except ValidationError as e:
        if e.resource:
            raise
        raise ValidationError(e.field, e.problem, doc.resource) from e


async def _apply(res: Resources, doc: Document) -> str:
    if doc.obj is not None:
        return (await pd.apply(res.store, [doc.obj]))[0]
    if doc.kind in rb.KINDS:
        return await rb.apply(BGPStore(res.store), doc.kind, doc.name, doc.spec)
    if doc.kind == IPPOOL:
        return await _apply_pool(res, doc)
    if doc.kind == IPRESERVATION:
        new_res = Reservation.from_spec(doc.name, doc.spec)
        old = {r.name: r for r in await res.list_reservations()}.get(doc.name)
        if old == new_res:
            return "unchanged"
        await res.put_reservation(new_res)
        return "created" if old is None else "configured"
    if doc.kind == IPAMCONFIG:
        cfg = config_from(doc)
        if cfg == await res.get_config():
            return "unchanged"
        await res.set_config(cfg)
        return "configured"
    node = node_from(doc)
    old_node = await res.get_node(doc.name)
    if old_node == node:
        return "unchanged"
    await res.put_node(node)
    return "created" if old_node is None else "configured"


async def _apply_pool(res: Resources, doc: Document) -> str:
    try:
        _, old = await res.get_pool(doc.name)
    except NotFoundError:
        await res.create_pool(Pool.from_spec(doc.name, doc.spec))
        return "created"
    spec = dict(doc.spec)
    spec.setdefault("blockSize", old.block_size)
    new = old.updated(spec)  # validates; refuses cidr/blockSize changes naming the field
    if new == old:
        return "unchanged"
    await res.update_pool(new)
    return "configured"


async def get(res: Resources, kind: str, name: str | None,
              namespace: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Resources of ``kind`` (all, or the one named), as documents; NotFoundError if named
    and absent. ``namespace`` (None = all) only matters for NetworkPolicy and Pod."""
    out: list[dict[str, Any]]
    if kind in pd.KINDS:
        return await pd.get(res.store, kind, name, namespace)
    if kind in rb.KINDS:
        return [_resource(kind, n, s) for n, s in await rb.get(BGPStore(res.store), kind, name)]
    if kind == IPPOOL:
        if name is not None:
            return [pool_resource((await res.get_pool(name))[1])]
        out = [pool_resource(p) for p in await res.list_pools()]
    elif kind == IPRESERVATION:
        out = [reservation_resource(r) for r in await res.list_reservations()]
    elif kind == IPAMCONFIG:
        out = [config_resource(await res.get_config())]
    else:
        out = [node_resource(n) for n in sorted(await res.list_nodes(), key=lambda n: n.name)]
    if name is not None:
        out = [r for r in out if r["metadata"]["name"] == name]
        if not out:
            raise NotFoundError(f"{kind} {name} not found")
    return out


async def delete(maint: Maintenance, kind: str, name: str, progress: Progress,
                 namespace: str | None = None) -> str:  # fmt: skip
    """Delete one resource; a pool in use is refused (InUseError), a node's addresses and
    blocks are released first. Returns a line saying what was done."""
    res = maint.resources
    if kind in pd.KINDS:
        return await pd.delete(res.store, kind, name, namespace)
    if kind in rb.KINDS:
        return await rb.delete(BGPStore(res.store), kind, name)
    if kind == IPPOOL:
        await maint.delete_pool(name, force=False)
        return f"IPPool {name} deleted"
    if kind == IPRESERVATION:
        await res.delete_reservation(name)
        return f"IPReservation {name} deleted"
    if kind == IPAMCONFIG:
        if name != IPAM_CONFIG_NAME:
            raise NotFoundError(f"IPAMConfig {name} not found (the only one is 'default')")
        await res.store.delete(keys.CONFIG_IPAM)
        return "IPAMConfig default deleted (defaults apply)"
    result = await delete_node(maint, name, progress)
    return (f"Node {name} deleted (released {sum(len(v) for v in result.released.values())} "
            f"addresses, {len(result.released_blocks)} blocks)")  # fmt: skip


async def delete_node(maint: Maintenance, name: str, progress: Progress) -> GCResult:
    """Release a node's allocations and blocks, then delete its key and BGP status document.

    Also cleans up after a node whose key is already gone but whose blocks remain; a name
    with neither is NotFoundError.
    """
    node = await maint.resources.get_node(name)
    affs = await maint.blocks.affinities(name)
    if node is None and not affs:
        raise NotFoundError(f"Node {name} not found")
    progress(f"Releasing addresses and blocks of node {name} ({len(affs)} blocks)...")
    result = await maint.release_node(name)
    await maint.resources.store.delete(keys.node(name))
    await maint.resources.store.delete(keys.status(name))
    return result


# tables ------------------------------------------------------------------------------------


def table_rows(kind: str, docs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for ``get KIND`` (and ``pool list``/``node list``/``peer list``)."""
    if kind in pd.KINDS:
        return pd.table_rows(kind, docs)
    if kind in rb.KINDS:
        return rb.table_rows(kind, docs)
    if kind == IPPOOL:
        headers = ["NAME", "CIDR", "BLOCKSIZE", "NAT", "DISABLED", "DISABLEBGPEXPORT", "SELECTOR"]
        rows = [[d["metadata"]["name"], s["cidr"], s["blockSize"], s["natOutgoing"],
                 s["disabled"], s["disableBGPExport"], s["nodeSelector"]]
                for d in docs for s in [d["spec"]]]  # fmt: skip
    elif kind == IPRESERVATION:
        headers = ["NAME", "CIDRS"]
        rows = [[d["metadata"]["name"], ",".join(d["spec"]["reservedCIDRs"])] for d in docs]
    elif kind == IPAMCONFIG:
        headers = ["NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST"]
        rows = [[d["metadata"]["name"], d["spec"]["strictAffinity"],
                 d["spec"]["maxBlocksPerHost"]] for d in docs]  # fmt: skip
    else:
        headers = ["NAME", "ADDRESSES", "ASN", "LABELS"]
        rows = [[d["metadata"]["name"],
                 ",".join(a["address"] for a in d["spec"].get("addresses", [])),
                 d["spec"].get("bgp", {}).get("asNumber", ""),
                 ",".join(f"{k}={v}" for k, v in sorted(d["metadata"].get("labels", {}).items()))]
                for d in docs]  # fmt: skip
    return headers, rows
