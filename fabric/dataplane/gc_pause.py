"""Cyclic GC paused around bulk route work. Process-wide
(Python has one collector): ``gc_paused`` is the one instance, used by the route table on the
event loop thread.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class GCPause:
    """Cyclic GC off while any flush, adopt or burst runs (all on the event loop thread; they
    nest).

    A 100k-route flush builds ~5 objects per route in a process holding a few hundred
    thousand: full collections took 60% of a dump and 85% of planning 100k deletions
    (100k delete flush 2.6 s -> 1.5 s). Those objects die by reference counting right after.
    A burst of learned routes builds ~10 that live on (RIB, routes): with GC on, the heap
    growing from 0.1M to 1.1M objects cost 8 full collections, 1.1 s of fabricd's 2.1 s CPU
    for 100k routes (lab.bench routes); paused, one collection runs after the burst.
    """

    def __init__(self) -> None:
        self.depth, self.was_enabled = 0, False

    def pause(self) -> None:
        if self.depth == 0:
            self.was_enabled = gc.isenabled()
            gc.disable()
        self.depth += 1

    def resume(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.was_enabled:
            gc.enable()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()


gc_paused = GCPause()
