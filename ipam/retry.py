"""The one bounded compare-and-swap retry loop of the ipam package.

Every IPAM write is read -> change in memory -> compare-and-swap. ``cas_retry`` runs such an
attempt again only when it lost a compare (ConflictError); every other error surfaces at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ipam.errors import ConflictError

T = TypeVar("T")

# Calico uses 100 datastore retries; with one round trip per attempt that is well under a
# second of contention before the caller hears about it.
MAX_RETRIES = 100
# Backoff cap: short, because a failed attempt already brought back fresh data to retry with.
MAX_BACKOFF = 0.05


async def cas_retry(
    what: str, attempt: Callable[[int], Awaitable[T]], retries: int = MAX_RETRIES
) -> T:
    """Run ``attempt(n)`` until it does not raise ConflictError, at most ``retries`` times.

    The first retry is immediate (jittered below a millisecond); later ones back off
    exponentially with full jitter up to MAX_BACKOFF, so contenders spread out.
    """
    for n in range(retries):
        try:
            return await attempt(n)
        except ConflictError as e:
            if n == retries - 1:
                raise ConflictError(f"failed to {what}: {retries} attempts conflicted: {e}") from e
            await asyncio.sleep(random.uniform(0, min(0.0005 * 2**n, MAX_BACKOFF)))
    raise AssertionError("unreachable")
