"""What fabricd's /livez and /readyz check, and the cached etcd probe CNI requests share.

Live: the event loop answers (this code runs) and ExaBGP answers a ping. Ready: etcd
answers, ExaBGP answers, the required peers are Established (``bgp.requiredPeers``,
decided by ``sessions.required_peers_up``) and the policy table is programmed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from bgp.speaker import Speaker
from fabric.agent.health import Check
from fabric.agent.metrics import Metrics
from ipam.errors import IPAMError
from ipam.store import Store

ETCD_PROBE_TTL = 2.0  # s: a burst of CNI requests costs etcd one status call, not one each
PING_TIMEOUT = 1.5  # s: under the health server's request timeout


class Probes:
    def __init__(self, store: Store, speaker: Speaker, metrics: Metrics,
                 peers: Callable[[], tuple[bool, str]],
                 policy: Callable[[], Awaitable[tuple[bool, str]]]) -> None:  # fmt: skip
        self.store, self.speaker, self.metrics, self.peers = store, speaker, metrics, peers
        self.policy = policy  # the policy table programmed (or why not)
        self._etcd_ok = (0.0, False)  # (when, answer)

    async def etcd_reachable(self) -> bool:
        at, ok = self._etcd_ok
        if time.monotonic() - at < ETCD_PROBE_TTL:
            return ok
        try:
            await self.store.status(deadline=1.0)
            ok = True
        except IPAMError:
            self.metrics.etcd_error("status")
            ok = False
        self._etcd_ok = (time.monotonic(), ok)
        return ok

    async def live(self) -> Check:
        speaker = await self.speaker.ping(timeout=PING_TIMEOUT)
        return Check(speaker, {"eventLoop": "ok", "exabgp": "ok" if speaker else "not answering"})

    async def ready(self) -> Check:
        detail: dict[str, str] = {}
        etcd = await self.etcd_reachable()
        detail["etcd"] = "ok" if etcd else "unreachable"
        speaker = await self.speaker.ping(timeout=PING_TIMEOUT)
        detail["exabgp"] = "ok" if speaker else "not answering"
        peers_ok, detail["peers"] = self.peers()
        policy_ok, detail["policy"] = await self.policy()
        return Check(etcd and speaker and peers_ok and policy_ok, detail)
