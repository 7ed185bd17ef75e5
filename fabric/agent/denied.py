"""Denied traffic made visible: the nflog collector (the counters: policy_metrics.py).

``DeniedCollector`` reads the packets the policy table logs at its default deny (nflog
group ``policy.deniedLogGroup``, see fabric.dataplane.policy_log), names them with the
compiled model the table was rendered from (fabric.policy.denied.describe), keeps the newest
``KEEP`` in a ring and publishes them under ``denied/<node>`` (the node's lease), at most
every ``PUBLISH_INTERVAL`` seconds and only when something new arrived; ``fabricctl policy
denied`` reads and watches that key. The kernel rate-limits what it logs, so neither the
reader nor etcd sees a flood under a scan.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from fabric.agent.config import PolicyConfig
from fabric.agent.policy import PolicyAgent
from fabric.dataplane import policy_log
from fabric.dataplane.netlink import in_netns
from fabric.dataplane.nflog import LoggedPacket, NflogSocket
from fabric.policy.denied import KEEP, Denial, describe, document, endpoint_names, key
from fabric.policy.model import Compiled, IPAddress

log = logging.getLogger("fabric.agent.denied")

PUBLISH_INTERVAL = 0.5  # s between writes of denied/<node>: a probe shows within a second


class DeniedCollector:
    """See the module docstring. ``compiled`` and ``names`` give the current model and
    every endpoint's addresses; ``publish`` writes one document (etcd, under the lease)."""

    def __init__(
        self,
        node: str,
        group: int,
        compiled: Callable[[], Compiled | None],
        names: Callable[[], Mapping[IPAddress, str]],
        publish: Callable[[str, bytes], Any],
        netns: str | None = None,
    ) -> None:
        self.node, self.group, self.netns = node, group, netns
        self.compiled, self.names, self.publish = compiled, names, publish
        self.ring: collections.deque[Denial] = collections.deque(maxlen=KEEP)
        self.total = 0
        self.problem: str | None = None
        self.sock: NflogSocket | None = None
        self._new = asyncio.Event()
        self._seq = 0
        self._names: tuple[object, Mapping[IPAddress, str]] = (None, {})

    def open(self) -> None:
        if self.group < 0:
            return  # policy.deniedLogGroup -1: no log
        try:
            self.sock = NflogSocket(self.group, self.netns)
        except OSError as e:
            self.problem = str(e)
            log.error("denied-traffic log disabled: %s", e)
            return
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            packets = self.sock.read()
        except OSError as e:
            log.warning("%s", e)
            return
        for p in packets:
            self.add(p)

    def add(self, p: LoggedPacket, now: float | None = None) -> Denial | None:
        """One logged packet into the ring; None when it is no default-deny log."""
        if not p.prefix.startswith(policy_log.PREFIX):
            return None
        ingress = p.prefix.endswith("ingress")
        index = p.outdev if ingress else p.indev
        try:
            ifname = in_netns(self.netns, lambda: socket.if_indextoname(index)) if index else None
        except OSError:  # the veth went away since
            ifname = None
        self._seq += 1
        compiled = self.compiled()
        if self._names[0] is not compiled:  # the addresses as of the model's last batch
            self._names = (compiled, self.names())
        d = describe(compiled, self._names[1], seq=self._seq,
                     time=now if now is not None else time.time(), node=self.node,
                     ingress=ingress, ifname=ifname, saddr=p.src, daddr=p.dst,
                     protocol=p.protocol, port=p.dport)  # fmt: skip
        self.ring.append(d)
        self.total += 1
        self._new.set()
        return d

    def document(self) -> dict[str, Any]:
        lost = self.sock.lost if self.sock is not None else 0
        return document(self.node, self.ring, lost, self.total)

    async def run(self) -> None:
        """Open the socket, publish what arrives; runs until cancelled."""
        self.open()
        try:
            while True:
                await self._new.wait()
                self._new.clear()
                body = json.dumps({**self.document(), "updated": time.time()}).encode()
                try:
                    await self.publish(key(self.node), body)
                except Exception as e:  # etcd down: the ring keeps them, next time
                    log.warning("failed to publish denied connections: %s", e)
                    self._new.set()
                await asyncio.sleep(PUBLISH_INTERVAL)
        finally:
            self.close()


class DeniedTraffic:
    """fabricd's part: the table's log settings and the collector."""

    def __init__(self, node: str, cfg: PolicyConfig, policy: PolicyAgent,
                 publish: Callable[[str, bytes], Any]) -> None:  # fmt: skip
        if cfg.denied_log_group >= 0:
            policy.log = policy_log.DeniedLog(cfg.denied_log_group, cfg.denied_log_rate,
                                              2 * cfg.denied_log_rate, cfg.denied_log_cap)  # fmt: skip
        self.policy = policy
        self._names: tuple[object, dict[IPAddress, str]] = (None, {})
        self.collector = DeniedCollector(node, cfg.denied_log_group, lambda: policy.compiled,
                                         self.names, publish)  # fmt: skip

    def names(self) -> dict[IPAddress, str]:
        """Every endpoint's addresses, computed again only when the blocks changed (a policy
        change leaves them as they are: walking 5,000 allocations on the first denied packet
        after every batch cost the event loop tens of ms while the next batch waited)."""
        blocks = self.policy.read().blocks
        if self._names[0] is not blocks:
            self._names = (blocks, endpoint_names(blocks))
        return self._names[1]

    async def run(self) -> None:
        await self.collector.run()
