"""Keeps the policy table's snapshot (fabric.dataplane.policy_snapshot) current.

The policy programmer calls ``wrote(want)`` after every batch that succeeded (the kernel
holds ``want``, computed from etcd). ``run`` writes the newest one to the state directory
once batches have paused for ``quiet`` seconds, or ``max_delay`` after the first unsaved
one while they never pause; the full-table script is rendered and written on a worker thread
(the loop keeps running: fabricd's switch interval is 0.5 ms). ``flush`` writes what is left
synchronously at a clean stop, so a restart after SIGTERM finds the table as it was at the
stop. After SIGKILL the snapshot is at most ``max_delay`` (plus one write) behind, and the
first compile after the restore repairs that difference.

A failure to write is logged and retried at the next batch; it never touches the kernel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from fabric.dataplane import policy_snapshot
from fabric.dataplane.policy_table import Desired, diff

log = logging.getLogger("fabric.agent.snapshots")

QUIET = 2.0  # seconds without a batch before the snapshot is written
MAX_DELAY = 30.0  # ... or this long after the first unsaved batch, whichever comes first


class SnapshotWriter:
    def __init__(
        self, path: Path, table: str, node: str, quiet: float = QUIET, max_delay: float = MAX_DELAY
    ) -> None:
        self.path, self.table, self.node = path, table, node
        self.quiet, self.max_delay = quiet, max_delay
        self.saves = 0  # snapshots written
        self.last_seconds = 0.0  # how long the last one took (render and write)
        self._want: Desired | None = None  # the newest table not saved yet
        self._since = 0.0  # when the first unsaved batch came
        self._last = 0.0  # when the newest one came
        self._event = asyncio.Event()
        self._lock = threading.Lock()  # one write at a time (thread, or flush at stop)
        self._gen = 0  # batches seen; a write never replaces a newer one (``_saved``)
        self._saved = 0

    def wrote(self, want: Desired) -> None:
        """The kernel now holds ``want`` (a batch succeeded)."""
        now = time.monotonic()
        if self._want is None:
            self._since = now
        self._gen += 1
        self._want, self._last = want, now
        self._event.set()

    async def run(self) -> None:
        """Write the newest table after a pause of the batches; runs until cancelled."""
        while True:
            await self._event.wait()
            now = time.monotonic()
            due = min(self._last + self.quiet, self._since + self.max_delay)
            if now < due:
                await asyncio.sleep(due - now)
                continue
            self._event.clear()
            want, self._want = self._want, None
            if want is None:
                continue
            try:
                await asyncio.to_thread(self._save, want, self._gen)
            except Exception as e:
                log.warning("failed to write the policy snapshot %s: %s", self.path, e)
                if self._want is None:  # retried with the next batch (or this one)
                    self._want, self._since = want, time.monotonic()

    def flush(self) -> None:
        """Write the newest unsaved table now (a clean stop); logs a failure."""
        want, self._want = self._want, None
        if want is None:
            return
        try:
            self._save(want, self._gen)
        except Exception as e:
            log.warning("failed to write the policy snapshot %s: %s", self.path, e)

    def _save(self, want: Desired, gen: int) -> None:
        started = time.monotonic()
        script = diff(None, want, self.table).script
        text = policy_snapshot.encode(script, self.table, self.node)
        with self._lock:
            if gen <= self._saved:
                return  # a newer table was written meanwhile (flush at a stop)
            policy_snapshot.save(self.path, text)
            self._saved = gen
        self.saves += 1
        self.last_seconds = time.monotonic() - started
        log.debug("policy snapshot written: %d bytes in %.3f s", len(text), self.last_seconds)
