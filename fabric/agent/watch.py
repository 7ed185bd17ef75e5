"""A local copy of etcd key prefixes, kept current by one watch per prefix.

Contract:
- ``load()`` lists every prefix once (a consistent snapshot per prefix) and remembers the
  revision it was read at; ``run()`` then watches each prefix from that revision + 1, so no
  change between the list and the watch is lost. The store's watch already re-creates a
  broken stream from the last delivered revision + 1 on the next endpoint.
- If etcd compacted the history a watch needs, or anything else fails, that prefix is
  listed again and watched anew (after a short backoff) — a full resync of that source.
- Every ``resync_interval`` seconds every prefix is listed again regardless (a periodic
  full resync backs up every event stream). Keys that changed are reported like events.
- ``on_change(prefix)`` is called (synchronously, from the event loop) after each batch of
  changes under a prefix; the callback only marks work, it must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence

from ipam.errors import IPAMError
from ipam.store import KV, EventType, Store

log = logging.getLogger("fabric.agent.watch")


class Cache:
    """Keys under each watched prefix (relative to the store prefix) mapped to their KV."""

    def __init__(
        self,
        store: Store,
        prefixes: Sequence[str],
        on_change: Callable[[str], None],
        resync_interval: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.prefixes = list(prefixes)
        self.on_change = on_change
        self.on_error = on_error or (lambda _op: None)
        self.resync_interval = resync_interval
        self.data: dict[str, dict[str, KV]] = {p: {} for p in self.prefixes}
        self.revision: dict[str, int] = dict.fromkeys(self.prefixes, 0)
        self.resyncs = 0
        self._tasks: list[asyncio.Task[None]] = []

    def items(self, prefix: str) -> dict[str, KV]:
        return self.data[prefix]

    async def load(self) -> None:
        """List every prefix (the initial full resync), all at once: a start waits for the
        slowest listing, not for the sum of them."""
        await asyncio.gather(*(self._list(p) for p in self.prefixes))

    async def _list(self, prefix: str) -> bool:
        """Replace the copy of ``prefix`` with a fresh listing; True if anything differed."""
        kvs, rev = await self.store.list(prefix)
        fresh = {kv.key: kv for kv in kvs}
        old = self.data[prefix]
        changed = fresh.keys() != old.keys() or any(old[k].mod != kv.mod for k, kv in fresh.items())
        self.data[prefix] = fresh
        self.revision[prefix] = rev
        self.resyncs += 1
        return changed

    async def run(self) -> None:
        """Watch every prefix and resync periodically until cancelled."""
        self._tasks = [
            asyncio.create_task(self._watch(p), name=f"watch {p}") for p in self.prefixes
        ]
        self._tasks.append(asyncio.create_task(self._periodic(), name="periodic resync"))
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _watch(self, prefix: str) -> None:
        backoff = 0.2
        while True:
            try:
                await self._follow(prefix)
            except IPAMError as e:
                self.on_error("watch")
                log.warning("watch of %s failed (%s); listing it again", prefix, e)
            # Re-list, then watch from the new revision: a full resync of this source.
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)
            try:
                if await self._list(prefix):
                    self.on_change(prefix)
                backoff = 0.2
            except IPAMError as e:
                self.on_error("list")
                log.warning("failed to list %s: %s", prefix, e)

    async def _follow(self, prefix: str) -> None:
        stream = self.store.watch(prefix, self.revision[prefix] + 1)
        async for ev in stream:
            items = self.data[prefix]
            have = items.get(ev.kv.key)
            if have is not None and have.mod >= ev.kv.mod:
                continue  # a resync listing already holds this key at a newer revision
            if ev.type == EventType.DELETE:
                items.pop(ev.kv.key, None)
            else:
                items[ev.kv.key] = ev.kv
            self.revision[prefix] = max(self.revision[prefix], ev.kv.mod)
            self.on_change(prefix)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval * (0.9 + 0.2 * random.random()))
            for p in self.prefixes:
                try:
                    if await self._list(p):
                        log.info("periodic resync of %s found changes the watch missed", p)
                        self.on_change(p)
                except IPAMError as e:
                    self.on_error("list")
                    log.warning("periodic resync of %s failed: %s", p, e)
