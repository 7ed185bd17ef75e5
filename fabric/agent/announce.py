"""The ADD of a borrowed address waits for its announcement (docs/design/cni.md, "Borrowed
addresses").

An address inside one of this node's blocks that was announced a while ago is reachable
as soon as its host route is in. An address anywhere else (borrowed from another node's
block, by an ``IP=`` request or because no block could be claimed) is reachable only once
this node announces its /32: until then the rest of the fabric sends its traffic to the
block's owner, which blackholes its block. The first address of a block claimed for this
ADD races the new block's announcement the same way. So the ADD of an address that no
acknowledged advert covers waits (``cni.announceWait`` seconds at most, default 2) until
one does (its /32, or its new block). The announcement itself needs no help: the IPAM
commit reaches this node's watch, the reconcile adds the /32 to the desired set, the speaker
sends it (meanwhile the ADD wires the veth), often before the ADD gets here. A wait that
times out does not fail the ADD (the pod works once the route is out): it is logged and
counted (``fabric_cni_announce_waits_total{result="timeout"}``).

ExaBGP's ack is the last thing this node can observe; the routers on the way still have to
pass the route on (measured in the two-rack lab: ~30-55 ms at the FRR ToR, which holds a
received route up to 50 ms before its best-path run, ~50 ms more through the other rack's
ToR to its hosts). So the ADD returns only ``cni.announceSettle`` (default 0.2 s; only when
the node has BGP sessions) after the covering advert was acknowledged: an allowance for the
fabric's propagation time, which the operator knows and this node cannot see. An address in
a block acknowledged long ago pays one lookup (``Speaker.covered_since``), no wait; an own
block seen announced is not looked up again (after an ExaBGP restart, when every advert is
acknowledged anew, its peers kept it: no wait either).

Addresses of a pool with ``disableBGPExport`` are never announced and never waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from bgp.model import IPAddress, IPNetwork
from fabric.agent.intent import Intent
from fabric.agent.metrics import Metrics

Wait = Callable[[IPAddress, float], Awaitable[bool]]  # Speaker.wait_covered
Since = Callable[[IPAddress], float | None]  # Speaker.covered_since


class AnnounceGate:
    """``fabric.workloads.deps.Announcer`` for the agent (see the module docstring)."""

    def __init__(self, intent: Callable[[], Intent | None], since: Since, wait: Wait,
                 timeout: float, settle: float, metrics: Metrics, log: logging.Logger) -> None:  # fmt: skip
        self._intent = intent
        self._since = since
        self._wait = wait
        self.timeout = timeout
        self.settle = settle
        self._metrics = metrics
        self._log = log
        self._seen: set[IPNetwork] = set()  # own blocks seen announced for settle s

    def needs_wait(self, ip: IPAddress, now: float | None = None) -> bool:
        """``ip`` is in an exported pool and not announced for ``settle`` s yet: nothing
        acknowledged covers it, or what covers it (its /32, its new block) was acknowledged
        less than ``settle`` s ago (the routers on the way may not have it yet). An own block
        seen announced before never waits again: after an ExaBGP restart its peers keep it
        while ExaBGP's acknowledged set fills up again."""
        intent = self._intent()
        if intent is None or self.timeout <= 0 or not any(ip in c for c in intent.export_cidrs):
            return False
        block = next((b for b in intent.blackholes if ip in b), None)
        if block is not None and block in self._seen:
            return False
        since = self._since(ip)
        settle = self.settle if intent.sessions else 0.0
        if since is not None and (now or time.monotonic()) - since >= settle:
            if block is not None:
                self._seen.add(block)
            return False
        return True

    async def announced(self, ips: Sequence[IPAddress], handle: str) -> None:
        """Return once each of ``ips`` that needs it has been covered by an acknowledged
        announcement for ``settle`` s (when there are BGP sessions), or after ``timeout`` s
        without one (logged and counted). Never raises."""
        started = time.monotonic()
        intent = self._intent()
        if intent is not None and not self._seen <= intent.blackholes:
            self._seen &= intent.blackholes  # blocks given up since
        todo = [ip for ip in ips if self.needs_wait(ip, started)]
        if not todo:
            return
        got = await asyncio.gather(*(self._wait(ip, self.timeout) for ip in todo))
        intent = self._intent()
        if intent is not None and intent.sessions:
            acked = [t for ip, ok in zip(todo, got, strict=True) if ok and (t := self._since(ip))]
            left = max(acked, default=0.0) + self.settle - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)  # the routers between us and the other pods
        took = time.monotonic() - started
        for ip, ok in zip(todo, got, strict=True):
            self._metrics.announce_waited("announced" if ok else "timeout", took)
            if ok:
                self._log.debug("%s of %s announced; answered after %.3f s", ip, handle, took)
            else:
                self._log.warning("%s of %s is not announced after %.1f s (cni.announceWait); "
                                  "answering the ADD anyway: the pod is reachable from other "
                                  "nodes once the announcement is out", ip, handle, took)  # fmt: skip
