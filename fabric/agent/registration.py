"""The node's registration in etcd: its Node document under a lease it keeps alive.

One lease, one long-lived keepalive stream (the store's ``keep_alive``). If etcd reports
the lease gone (it expired while etcd was unreachable) a new one is granted and the Node
document and the status document are written again under it. If someone deletes the Node
key while the agent runs, ``ensure()`` puts it back (the node is alive, after all).

The lease is *not* revoked on a normal stop: a restart within the TTL keeps the node known
to its peers, so they keep its routes (graceful restart). A node that stays down longer
disappears with its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from ipam import keys
from ipam.errors import IPAMError
from ipam.resources import Node, dumps, loads
from ipam.store import Store

log = logging.getLogger("fabric.agent.registration")


class Registration:
    def __init__(
        self, store: Store, node: Node, ttl: int, on_error: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.lease = 0
        self.on_error = on_error or (lambda _op: None)
        self.renewed = asyncio.Event()

    async def register(self) -> None:
        """Grant a lease and write the Node document under it."""
        self.lease = await self.store.grant_lease(self.ttl)
        await self.ensure()
        log.info("registered node %s (lease %x, ttl %d s)", self.node.name, self.lease, self.ttl)

    async def ensure(self) -> None:
        """Write the Node document under the current lease (idempotent).

        Labels an operator set with ``fabricctl node label`` are kept; the config file's
        labels win for the keys it names.
        """
        key = keys.node(self.node.name)
        old = await self.store.get(key)
        labels = dict(self.node.labels)
        if old is not None:
            try:
                labels = {**Node.from_json(self.node.name, loads(old.value)).labels, **labels}
            except (ValueError, IPAMError) as e:
                log.warning("replacing node document that does not parse: %s", e)
        self.node = replace(self.node, labels=labels)
        await self.store.put(key, dumps(self.node.to_json()), self.lease)

    async def keep_alive(self) -> None:
        """Keep the lease alive forever; re-register whenever it is lost."""
        while True:
            try:
                async for ttl in self.store.keep_alive(self.lease, self.ttl / 3):
                    if ttl <= 0:
                        log.warning("lease %x expired; registering again", self.lease)
                        break
                await self.register()
                self.renewed.set()
            except IPAMError as e:
                self.on_error("lease")
                log.warning("failed to keep node registration alive: %s", e)
                await asyncio.sleep(1.0)
