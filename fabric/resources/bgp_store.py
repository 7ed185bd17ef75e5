"""BGP resources in etcd: peers, the cluster BGP configuration, node labels, and the status
documents each fabricd publishes. Typed reads and compare-and-swap writes over ipam's Store.

Invariants: every stored peer and configuration parses back with the bgp model's
``from_json`` (they are re-validated before every write); a read-modify-write (BGP
configuration, node labels) commits only if the key is unchanged since it was read, and is
retried by ``cas_retry`` otherwise, so no concurrent change is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bgp.config import BGPConfig, Peer
from bgp.errors import ValidationError
from ipam import keys, selector
from ipam.errors import ConflictError, NotFoundError
from ipam.errors import ValidationError as IPAMValidationError
from ipam.resources import Node, dumps, loads
from ipam.retry import cas_retry
from ipam.store import KV, Cmp, Op, Store

Status = dict[str, Any]


def check_selector(text: str) -> None:
    """The selector check the bgp model asks for: ipam's parser, ValueError when malformed."""
    try:
        selector.parse(text)
    except IPAMValidationError as e:
        raise ValueError(e.problem) from None


class BGPStore:
    """CRUD for BGP peers and configuration; reads of the per-node status documents."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # peers -----------------------------------------------------------------------------

    @staticmethod
    def _peer(kv: KV) -> Peer:
        return Peer.from_json(kv.key[len(keys.PEERS) :], loads(kv.value), check_selector)

    async def list_peers(self) -> list[Peer]:
        kvs, _ = await self.store.list(keys.PEERS)
        return sorted((self._peer(kv) for kv in kvs), key=lambda p: p.name)

    async def get_peer(self, name: str) -> Peer:
        kv = await self.store.get(keys.peer(name))
        if kv is None:
            raise NotFoundError(f"BGPPeer {name} not found")
        return self._peer(kv)

    async def put_peer(self, peer: Peer, create_only: bool = False) -> None:
        """Write ``peer`` (validated again first). ``create_only`` refuses an existing name
        in the same transaction as the write, so two concurrent creations cannot both win."""
        doc = Peer.from_json(peer.name, peer.to_json(), check_selector).to_json()
        key = keys.peer(peer.name)
        if not create_only:
            await self.store.put(key, dumps(doc))
            return
        r = await self.store.txn([Cmp.absent(key)], [Op.put(key, dumps(doc))])
        if not r.succeeded:
            raise ValidationError("metadata.name", "a BGPPeer with this name already exists",
                                  f"BGPPeer {peer.name}")  # fmt: skip

    async def delete_peer(self, name: str) -> None:
        if not await self.store.delete(keys.peer(name)):
            raise NotFoundError(f"BGPPeer {name} not found")

    # configuration ---------------------------------------------------------------------

    async def get_config(self) -> tuple[int, BGPConfig]:
        """The configuration and its mod revision; the defaults at revision 0 when unset."""
        kv = await self.store.get(keys.CONFIG_BGP)
        if kv is None:
            return 0, BGPConfig()
        return kv.mod, BGPConfig.from_json(loads(kv.value))

    async def set_config(self, cfg: BGPConfig) -> BGPConfig:
        """Replace the whole configuration."""
        return await self.update_config(lambda _old: cfg)

    async def update_config(self, change: Callable[[BGPConfig], BGPConfig]) -> BGPConfig:
        """Read-modify-write under compare-and-swap; no write when nothing changes."""

        async def attempt(_: int) -> BGPConfig:
            rev, old = await self.get_config()
            new = change(old)
            doc = BGPConfig.from_json(new.to_json()).to_json()
            if new == old:
                return new
            r = await self.store.txn([Cmp.mod(keys.CONFIG_BGP, rev)],
                                     [Op.put(keys.CONFIG_BGP, dumps(doc))])  # fmt: skip
            if not r.succeeded:
                raise ConflictError("BGP configuration changed concurrently")
            return new

        return await cas_retry("update BGPConfiguration default", attempt)

    # nodes -----------------------------------------------------------------------------

    async def update_node(self, name: str, change: Callable[[Node], Node]) -> tuple[Node, Node]:
        """Read-modify-write of a node (labels, for peer selectors) under compare-and-swap.

        The node key keeps the lease it was written with (fabricd keeps it alive). Returns
        (old, new); nothing is written when they are equal.
        """
        key = keys.node(name)

        async def attempt(_: int) -> tuple[Node, Node]:
            kv = await self.store.get(key)
            if kv is None:
                raise NotFoundError(f"Node {name} not found")
            old = Node.from_json(name, loads(kv.value))
            new = change(old)
            if new == old:
                return old, new
            r = await self.store.txn([Cmp.mod(key, kv.mod)],
                                     [Op.put(key, dumps(new.to_json()), lease=kv.lease)])  # fmt: skip
            if not r.succeeded:
                raise ConflictError(f"Node {name} changed concurrently")
            return old, new

        return await cas_retry(f"update Node {name}", attempt)

    # status ----------------------------------------------------------------------------

    async def list_status(self) -> list[Status]:
        """Every node's status document, ordered by node name."""
        kvs, _ = await self.store.list(keys.STATUS)
        return sorted((_status(kv) for kv in kvs), key=lambda d: str(d.get("node")))

    async def get_status(self, node: str) -> Status | None:
        kv = await self.store.get(keys.status(node))
        return _status(kv) if kv else None


def _status(kv: KV) -> Status:
    """A status document as published; one that does not parse becomes ``{node, error}``
    so a single bad document does not hide every other node's status."""
    node = kv.key[len(keys.STATUS) :]
    try:
        doc = json.loads(kv.value)
    except (ValueError, UnicodeDecodeError) as e:
        return {"node": node, "error": f"unreadable status document: {e}"}
    if not isinstance(doc, dict):
        return {"node": node, "error": "unreadable status document: not a JSON object"}
    doc.setdefault("node", node)
    return doc
