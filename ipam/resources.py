"""Pools, IPAM config, reservations and nodes in etcd: typed reads and compare-and-swap writes.

Pool creation checks overlap against every other pool and commits only if no pool was added
or changed since that check (a compare over the whole pools prefix), so two concurrent
creations of overlapping pools cannot both succeed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipam import keys
from ipam.errors import ConflictError, NotFoundError, ValidationError
from ipam.pool import IPAMConfig, Pool, Reservation, check_overlap, validate_name
from ipam.retry import cas_retry
from ipam.store import KV, Cmp, Op, Store


def dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(raw: bytes) -> dict[str, Any]:
    return dict(json.loads(raw))


@dataclass(frozen=True, slots=True)
class Node:
    """A node as IPAM and BGP see it: name, addresses, AS number, labels."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    as_number: int | None = None
    route_reflector_cluster_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": dict(self.labels),
            "addresses": list(self.addresses),
            "asNumber": self.as_number,
            "routeReflectorClusterID": self.route_reflector_cluster_id,
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> Node:
        labels = d.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise ValidationError("spec.labels", "must be a mapping of strings", f"Node {name}")
        asn = d.get("asNumber")
        if asn is not None and (not isinstance(asn, int) or not 0 < asn < 2**32):
            raise ValidationError("spec.asNumber", f"{asn!r} is not an AS number", f"Node {name}")
        return cls(
            name=name,
            labels={str(k): str(v) for k, v in labels.items()},
            addresses=tuple(str(a) for a in d.get("addresses") or ()),
            as_number=asn,
            route_reflector_cluster_id=d.get("routeReflectorClusterID"),
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """What an allocation depends on besides blocks, with the revisions it was read at."""

    pools: dict[str, tuple[int, Pool]]
    reservations: tuple[Reservation, ...]
    reservations_rev: int
    config: IPAMConfig
    config_rev: int


class Resources:
    """CRUD for the cluster-scoped resources IPAM depends on."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # pools -----------------------------------------------------------------------------

    async def list_pools(self) -> list[Pool]:
        kvs, _ = await self.store.list(keys.POOLS)
        return sorted((self._pool(kv) for kv in kvs), key=lambda p: p.name)

    @staticmethod
    def _pool(kv: KV) -> Pool:
        return Pool.from_spec(kv.key[len(keys.POOLS) :], loads(kv.value))

    async def get_pool(self, name: str) -> tuple[int, Pool]:
        kv = await self.store.get(keys.pool(name))
        if kv is None:
            raise NotFoundError(f"IPPool {name} not found")
        return kv.mod, self._pool(kv)

    async def create_pool(self, pool: Pool) -> None:
        """Create ``pool``; refuses a duplicate name or an overlap with any other pool."""

        async def attempt(_: int) -> None:
            kvs, rev = await self.store.list(keys.POOLS)
            others = [self._pool(kv) for kv in kvs]
            if any(p.name == pool.name for p in others):
                raise ValidationError("metadata.name", "a pool with this name already exists",
                                      f"IPPool {pool.name}")  # fmt: skip
            check_overlap(pool, others)
            r = await self.store.txn(
                [Cmp.prefix_unchanged_since(keys.POOLS, rev), Cmp.absent(keys.pool(pool.name))],
                [Op.put(keys.pool(pool.name), dumps(pool.spec()))],
            )
            if not r.succeeded:
                raise ConflictError("pools changed while checking for overlap")

        await cas_retry(f"create IPPool {pool.name}", attempt)

    async def update_pool(self, pool: Pool) -> None:
        """Replace a pool's mutable fields (cidr and blockSize are immutable)."""

        async def attempt(_: int) -> None:
            rev, old = await self.get_pool(pool.name)
            new = old.updated(pool.spec())
            r = await self.store.txn(
                [Cmp.mod(keys.pool(pool.name), rev)],
                [Op.put(keys.pool(pool.name), dumps(new.spec()))],
            )
            if not r.succeeded:
                raise ConflictError(f"IPPool {pool.name} changed concurrently")

        await cas_retry(f"update IPPool {pool.name}", attempt)

    async def set_pool_disabled(self, name: str, disabled: bool) -> Pool:
        _, pool = await self.get_pool(name)
        new = pool.with_disabled(disabled)
        await self.update_pool(new)
        return new

    # settings --------------------------------------------------------------------------

    async def settings(self) -> Settings:
        """Pools, reservations and IPAM config in one round trip."""
        r = await self.store.txn(
            [],
            [Op.get(keys.POOLS, prefix=True), Op.get(keys.RESERVATIONS, prefix=True),
             Op.get(keys.CONFIG_IPAM)],
        )  # fmt: skip
        pools_kv, res_kv, cfg_kv = r.gets
        pools = {}
        for kv in pools_kv:
            p = self._pool(kv)
            pools[p.name] = (kv.mod, p)
        reservations = tuple(
            Reservation.from_spec(kv.key[len(keys.RESERVATIONS) :], loads(kv.value))
            for kv in res_kv
        )
        cfg = IPAMConfig.from_json(loads(cfg_kv[0].value)) if cfg_kv else IPAMConfig()
        return Settings(pools, reservations, r.revision, cfg, cfg_kv[0].mod if cfg_kv else 0)

    async def get_config(self) -> IPAMConfig:
        kv = await self.store.get(keys.CONFIG_IPAM)
        return IPAMConfig.from_json(loads(kv.value)) if kv else IPAMConfig()

    async def set_config(self, cfg: IPAMConfig) -> None:
        await self.store.put(keys.CONFIG_IPAM, dumps(cfg.to_json()))

    async def update_config(self, change: Callable[[IPAMConfig], IPAMConfig]) -> IPAMConfig:
        """Read-modify-write of the IPAM config under compare-and-swap."""

        async def attempt(_: int) -> IPAMConfig:
            kv = await self.store.get(keys.CONFIG_IPAM)
            new = change(IPAMConfig.from_json(loads(kv.value)) if kv else IPAMConfig())
            r = await self.store.txn([Cmp.mod(keys.CONFIG_IPAM, kv.mod if kv else 0)],
                                     [Op.put(keys.CONFIG_IPAM, dumps(new.to_json()))])  # fmt: skip
            if not r.succeeded:
                raise ConflictError("IPAM config changed concurrently")
            return new

        return await cas_retry("update IPAM config", attempt)

    async def list_reservations(self) -> list[Reservation]:
        kvs, _ = await self.store.list(keys.RESERVATIONS)
        return [
            Reservation.from_spec(kv.key[len(keys.RESERVATIONS) :], loads(kv.value)) for kv in kvs
        ]

    async def put_reservation(self, res: Reservation) -> None:
        await self.store.put(keys.reservation(res.name), dumps(res.spec()))

    async def delete_reservation(self, name: str) -> None:
        if not await self.store.delete(keys.reservation(name)):
            raise NotFoundError(f"IPReservation {name} not found")

    # nodes -----------------------------------------------------------------------------

    async def list_nodes(self) -> list[Node]:
        kvs, _ = await self.store.list(keys.NODES)
        return [Node.from_json(kv.key[len(keys.NODES) :], loads(kv.value)) for kv in kvs]

    async def get_node(self, name: str) -> Node | None:
        kv = await self.store.get(keys.node(name))
        return Node.from_json(name, loads(kv.value)) if kv else None

    async def put_node(self, node: Node, lease: int = 0) -> None:
        validate_name(node.name, "Node")
        await self.store.put(keys.node(node.name), dumps(node.to_json()), lease=lease)
