"""The ADD of a borrowed address waits for its announcement (docs/design/cni.md, "Borrowed
addresses").

An address inside one of this node's confirmed blocks is reachable as soon as its host
route is in: the block is announced already. An address anywhere else (borrowed from another
node's block, an ``IP=`` request, or a block claimed so recently that the watch has not
brought its affinity yet) is reachable only once this node announces it: until then the
rest of the fabric sends its traffic to the block's owner, which blackholes its block. So
the ADD of such an address waits (``cni.announceWait`` seconds at most, default 2) until
an advert ExaBGP acknowledged covers it: the /32 of a borrowed address, or the new block.
The announcement itself needs no help: the IPAM commit reaches this node's watch, the
reconcile adds the /32 to the desired set, the speaker sends it (meanwhile the ADD wires the
veth). A wait that times out does not fail the ADD (the pod works once the route is out):
it is logged and counted (``fabric_cni_announce_waits_total{result="timeout"}``).

ExaBGP's ack is the last thing this node can observe; the routers on the way still have to
pass the /32 on (measured in the two-rack lab: ~30-55 ms at the FRR ToR, which holds a
received route up to 50 ms before its best-path run, ~50 ms more through the other rack's
ToR to its hosts). So after the ack the ADD waits ``cni.announceSettle`` more (default
0.2 s; only when the node has BGP sessions): an allowance for the fabric's propagation time,
which the operator knows and this node cannot see.

Addresses of a pool with ``disableBGPExport`` are never announced and never waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from bgp.model import IPAddress
from fabric.agent.intent import Intent
from fabric.agent.metrics import Metrics

Wait = Callable[[IPAddress, float], Awaitable[bool]]  # Speaker.wait_covered


class AnnounceGate:
    """``fabric.workloads.deps.Announcer`` for the agent (see the module docstring)."""

    def __init__(self, intent: Callable[[], Intent | None], wait: Wait, timeout: float,
                 settle: float, metrics: Metrics, log: logging.Logger) -> None:  # fmt: skip
        self._intent = intent
        self._wait = wait
        self.timeout = timeout
        self.settle = settle
        self._metrics = metrics
        self._log = log

    def needs_wait(self, ip: IPAddress) -> bool:
        """``ip`` is announced only once it is itself (or its new block is): it is outside
        every confirmed block of this node and inside a pool that is exported."""
        intent = self._intent()
        if intent is None or self.timeout <= 0:
            return False
        if any(ip in block for block in intent.blackholes):
            return False
        return any(ip in cidr for cidr in intent.export_cidrs)

    async def announced(self, ips: Sequence[IPAddress], handle: str) -> None:
        """Return once each of ``ips`` that needs it is covered by an acknowledged
        announcement (then ``settle`` s later, when there are BGP sessions), or after
        ``timeout`` s (logged and counted). Never raises."""
        todo = [ip for ip in ips if self.needs_wait(ip)]
        if not todo:
            return
        started = time.monotonic()
        got = await asyncio.gather(*(self._wait(ip, self.timeout) for ip in todo))
        took = time.monotonic() - started
        intent = self._intent()
        if any(got) and self.settle > 0 and intent is not None and intent.sessions:
            await asyncio.sleep(self.settle)  # the routers between us and the other pods
        for ip, ok in zip(todo, got, strict=True):
            self._metrics.announce_waited("announced" if ok else "timeout", took)
            if ok:
                self._log.debug("%s of %s announced after %.3f s", ip, handle, took)
            else:
                self._log.warning("%s of %s is not announced after %.1f s (cni.announceWait); "
                                  "answering the ADD anyway: the pod is reachable from other "
                                  "nodes once the announcement is out", ip, handle, took)  # fmt: skip
