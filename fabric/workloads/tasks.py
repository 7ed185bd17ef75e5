"""Concurrency helpers of the verbs: one lock per attachment, and awaiting work to its end
even when the request that started it is cancelled (its undo must know what it made)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T")


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def busy(self) -> frozenset[str]:
        return frozenset(self._locks)


async def finish(task: asyncio.Future[T]) -> T:
    """Await ``task`` to its end even when cancelled meanwhile, then re-raise: its work (a
    thread in the kernel, a batched etcd commit) runs on, and undoing it before it ended would
    miss what it made."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def finish_all(*tasks: asyncio.Future[Any]) -> None:
    """Await every task to its end, failed or not, even when cancelled meanwhile (then
    re-raise): what each did must be known before anything is undone."""
    try:
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
    except asyncio.CancelledError:
        await asyncio.wait(tasks)
        raise
