"""What a node publishes about itself: BGP sessions and installed routes.

The document lives at ``status/<node>`` under the node's lease (it disappears with the
node) and is rewritten only when its content changed, at most every couple of seconds.
``fabricctl bgp status`` and ``fabricctl routes`` read it. The route list is capped so the
document stays far below etcd's request size limit; ``truncated`` says when it was cut.
The same pass refreshes the Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bgp.model import SessionState
from fabric.agent.metrics import SessionSample
from ipam import keys
from ipam.errors import IPAMError
from ipam.resources import dumps

if TYPE_CHECKING:
    from fabric.agent.agent import Agent
    from fabric.dataplane.netlink import IPNetwork, KernelRoute

log = logging.getLogger("fabric.agent.status")

ITEMS_MAX_AGE = 10.0  # s: the route list may lag the counts this long during a burst
MAX_ROUTES = 2000  # about 150 kB of JSON; etcd refuses requests above 1.5 MiB by default


def _info(state: SessionState, info: str) -> str:
    return info or {"up": "Established", "connected": "OpenSent", "down": "Active"}.get(
        str(state), str(state)
    )


def build(agent: Agent, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The status document; ``items`` (the route list) is computed when not given."""
    status = agent.speaker.sessions_status()
    sessions = []
    for s in agent.intent.sessions if agent.intent is not None else ():
        st = status.get(s.peer_ip)
        stats = agent.rib.stats(s.peer_ip)
        state = st.state if st is not None else SessionState.IDLE
        sessions.append(
            {
                "name": s.name,
                "peerIP": str(s.peer_ip),
                "peerAS": s.peer_as,
                "localAS": s.local_as,
                "type": str(s.kind),
                "state": str(state),
                "since": st.since if st is not None else None,
                "info": _info(state, st.info if st is not None else "Idle"),
                "required": s.required,
                "passive": s.passive,
                "received": stats.received,
                "accepted": stats.accepted,
                "rejected": stats.rejected,
                # the current run of connection attempts while the session is not up
                "attempts": st.attempts if st is not None else 0,
                "connectingSince": st.connecting_since if st is not None else None,
                "lastFailure": st.last_failure if st is not None else "",
                "hint": st.hint if st is not None else "",
                "failedAttempts": st.failures if st is not None else 0,
            }
        )
    counts = agent.routes.stats()
    if items is None:
        items = route_items(agent.routes.installed())
    return {
        "node": agent.cfg.node_name,
        "speaker": {
            "running": agent.speaker.pid is not None,
            "pid": agent.speaker.pid,
            "restarts": agent.speaker.restarts,
        },
        "sessions": sessions,
        "announcements": sorted(str(a.prefix) for a in agent.speaker.announced()),
        "routes": {
            "installed": counts.installed,
            "blackholes": counts.blackholes,
            "local": counts.devices,
            "truncated": counts.installed > MAX_ROUTES,
            "items": items,
        },
        "converged": agent.converged,
        "pid": os.getpid(),
    }


def route_items(installed: Mapping[IPNetwork, KernelRoute]) -> list[dict[str, Any]]:
    """The first MAX_ROUTES installed routes by address, as the document lists them."""
    # Without sorting (or copying) the whole table: at 100,000 routes a full sort every
    # publish cost up to a second and a large heap.
    first = heapq.nsmallest(
        MAX_ROUTES, installed, key=lambda d: (d.version, int(d.network_address), d.prefixlen)
    )
    items: list[dict[str, Any]] = []
    for dst in first:
        r = installed[dst]
        kind = "blackhole" if r.blackhole else "local" if r.dev is not None else "unicast"
        item: dict[str, Any] = {"dst": str(dst), "type": kind, "via": [str(g) for g in r.gateways]}
        if r.dev is not None:
            item["dev"] = r.dev
        items.append(item)
    return items


def update_metrics(agent: Agent, doc: dict[str, Any]) -> None:
    m = agent.metrics
    m.set_sessions(
        SessionSample(
            s["peerIP"],
            s["type"],
            s["state"],
            s["received"],
            s["accepted"],
            s["rejected"],
            s["failedAttempts"],
        )
        for s in doc["sessions"]
    )
    routes = doc["routes"]
    blackhole, local = routes["blackholes"], routes["local"]
    m.set_routes(unicast=routes["installed"] - blackhole - local, blackhole=blackhole, local=local)
    m.set_announcements(len(doc["announcements"]))
    if agent.intent is not None:
        m.set_ipam(len(agent.intent.blackholes))


class StatusPublisher:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._last = b""
        self._items: list[dict[str, Any]] | None = None
        self._items_generation = -1
        self._items_at = 0.0

    def _route_items(self) -> list[dict[str, Any]]:
        """The route list, rebuilt when the table changed, but not while a burst of changes
        is being written (100k withdrawals): listing 2,000 routes each publish took CPU
        from the burst itself. Counts are always current; the list is at most
        ITEMS_MAX_AGE old."""
        routes, now = self.agent.routes, time.monotonic()
        generation = routes.generation
        stale = generation != self._items_generation
        if self._items is None or (
            stale and (not routes.busy() or now - self._items_at >= ITEMS_MAX_AGE)
        ):
            self._items = route_items(routes.installed())
            self._items_generation, self._items_at = generation, now
        return self._items

    async def publish(self) -> None:
        doc = build(self.agent, self._route_items())
        update_metrics(self.agent, doc)
        body = json.dumps(doc, sort_keys=True).encode()
        if body == self._last:
            return
        doc["updated"] = time.time()
        key = keys.status(self.agent.cfg.node_name)
        await self.agent.store.put(key, dumps(doc), self.agent.registration.lease)
        self._last = body

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.publish()
            except IPAMError as e:
                self.agent.metrics.etcd_error("status")
                log.warning("failed to publish node status: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.agent.registration.renewed.wait(), interval)
            if self.agent.registration.renewed.is_set():
                self.agent.registration.renewed.clear()
                self._last = b""  # re-register: write again under the new lease
