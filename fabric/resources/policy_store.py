"""NetworkPolicies, Namespaces and Pods in etcd, as their Kubernetes documents (JSON):

    <prefix>/policy/networkpolicies/<namespace>/<name>
    <prefix>/policy/namespaces/<name>
    <prefix>/policy/pods/<namespace>/<name>

Invariants: only validated objects are written (the codec decodes every stored document
back to an equal object); ``apply`` writes a batch under compare-and-swap of every key it
read, in one transaction per ``MAX_TXN_OPS`` objects, so a concurrent writer is never
overwritten silently; a label change is a read-modify-write under compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from fabric.resources.policy_codec import NAMESPACE, NETPOL, POD, check_labels, decode
from fabric.resources.policy_model import (
    NAMESPACE_NAME_LABEL,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyObject,
    to_document,
)
from ipam.errors import ConflictError, NotFoundError, ValidationError
from ipam.resources import dumps, loads
from ipam.retry import cas_retry
from ipam.store import KV, Cmp, Op, Store

POLICY = "policy/"
NETWORKPOLICIES = POLICY + "networkpolicies/"
NAMESPACES = POLICY + "namespaces/"
PODS = POLICY + "pods/"
PREFIX_OF = {NETPOL: NETWORKPOLICIES, NAMESPACE: NAMESPACES, POD: PODS}
# etcd's default --max-txn-ops is 128: bigger batches are written in several transactions.
MAX_TXN_OPS = 128


def kind_of(obj: PolicyObject) -> str:
    return (
        NETPOL
        if isinstance(obj, NetworkPolicy)
        else NAMESPACE
        if isinstance(obj, Namespace)
        else POD
    )


def key_of(kind: str, name: str, namespace: str | None = None) -> str:
    return PREFIX_OF[kind] + (name if kind == NAMESPACE else f"{namespace}/{name}")


def object_key(obj: PolicyObject) -> str:
    return key_of(kind_of(obj), obj.name, getattr(obj, "namespace", None))


def describe(obj: PolicyObject) -> str:
    ns = getattr(obj, "namespace", None)
    return f"{kind_of(obj)} {ns}/{obj.name}" if ns else f"{kind_of(obj)} {obj.name}"


def parse_kv(kv: KV) -> PolicyObject:
    """The object stored at ``kv`` (stored documents were validated on the way in)."""
    return decode(loads(kv.value), kv.key)


class PolicyStore:
    """CRUD of the policy kinds over ipam's Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def list_objects(self, kind: str, namespace: str | None = None) -> list[PolicyObject]:
        """Every object of ``kind`` (in ``namespace`` when given), by namespace and name."""
        prefix = PREFIX_OF[kind] + (f"{namespace}/" if namespace and kind != NAMESPACE else "")
        kvs, _ = await self.store.list(prefix)
        return [parse_kv(kv) for kv in sorted(kvs, key=lambda kv: kv.key)]

    async def snapshot(self) -> tuple[list[NetworkPolicy], list[Namespace], list[Pod], int]:
        """Every policy, namespace and pod, read at one revision (one range request)."""
        kvs, rev = await self.store.list(POLICY)
        objs = [parse_kv(kv) for kv in sorted(kvs, key=lambda kv: kv.key)]
        return ([o for o in objs if isinstance(o, NetworkPolicy)],
                [o for o in objs if isinstance(o, Namespace)],
                [o for o in objs if isinstance(o, Pod)], rev)  # fmt: skip

    async def get(self, kind: str, name: str, namespace: str | None = None) -> PolicyObject:
        kv = await self.store.get(key_of(kind, name, namespace))
        if kv is None:
            where = f"{namespace}/{name}" if kind != NAMESPACE else name
            raise NotFoundError(f"{kind} {where} not found")
        return parse_kv(kv)

    async def apply(self, objs: Sequence[PolicyObject]) -> list[str]:
        """Create or replace ``objs`` (already validated); per object ``created``,
        ``configured`` or ``unchanged``. Later duplicates of a key win."""
        results: list[str] = []
        for i in range(0, len(objs), MAX_TXN_OPS):
            results += await self._apply_batch(objs[i : i + MAX_TXN_OPS])
        return results

    async def _apply_batch(self, objs: Sequence[PolicyObject]) -> list[str]:
        async def attempt(_: int) -> list[str]:
            cmps: dict[str, Cmp] = {}
            puts: dict[str, Op] = {}
            out: list[str] = []
            for obj in objs:
                key = object_key(obj)
                kv = await self.store.get(key)
                old = parse_kv(kv) if kv else None
                cmps[key] = Cmp.mod(key, kv.mod if kv else 0)
                if old == obj:
                    out.append("unchanged")
                    puts.pop(key, None)
                    continue
                puts[key] = Op.put(key, dumps(to_document(obj)))
                out.append("created" if kv is None else "configured")
            if puts:
                r = await self.store.txn(list(cmps.values()), list(puts.values()))
                if not r.succeeded:
                    raise ConflictError("policy objects changed concurrently")
            return out

        return await cas_retry("apply policy objects", attempt)

    async def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        if not await self.store.delete(key_of(kind, name, namespace)):
            where = f"{namespace}/{name}" if kind != NAMESPACE else name
            raise NotFoundError(f"{kind} {where} not found")

    async def label(self, kind: str, name: str, namespace: str | None,
                    sets: Mapping[str, str], removes: Iterable[str],
                    create: bool = True) -> tuple[PolicyObject, PolicyObject | None]:  # fmt: skip
        """Set and remove labels of a Pod or Namespace under compare-and-swap; returns
        (new, old). A missing object is created with just those labels when ``create``
        (a pod attached by the CNI plugin has no Pod object until one is applied)."""
        key = key_of(kind, name, namespace)
        resource = f"{kind} {namespace}/{name}" if kind != NAMESPACE else f"{kind} {name}"
        check_labels(sets, resource)
        drop = set(removes)
        if kind == NAMESPACE and (NAMESPACE_NAME_LABEL in sets or NAMESPACE_NAME_LABEL in drop):
            raise ValidationError(f"metadata.labels.{NAMESPACE_NAME_LABEL}",
                                  "is set by the system to the namespace's name", resource)  # fmt: skip

        async def attempt(_: int) -> tuple[PolicyObject, PolicyObject | None]:
            kv = await self.store.get(key)
            old: PolicyObject | None = parse_kv(kv) if kv else None
            if old is None and not create:
                raise NotFoundError(f"{resource} not found")
            base: PolicyObject = old or _blank(kind, name, namespace)
            labels: dict[str, str] = {k: v for k, v in base.labels.items() if k not in drop}
            labels.update(sets)
            new = replace(base, labels=labels)
            if new == old:
                return new, old
            r = await self.store.txn([Cmp.mod(key, kv.mod if kv else 0)],
                                     [Op.put(key, dumps(to_document(new)))])  # fmt: skip
            if not r.succeeded:
                raise ConflictError(f"{resource} changed concurrently")
            return new, old

        return await cas_retry(f"label {resource}", attempt)


def _blank(kind: str, name: str, namespace: str | None) -> PolicyObject:
    if kind == NAMESPACE:
        return Namespace(name, {NAMESPACE_NAME_LABEL: name})
    if kind == POD:
        return Pod(namespace or "default", name)
    raise NotFoundError(f"{kind} {namespace}/{name} not found")
