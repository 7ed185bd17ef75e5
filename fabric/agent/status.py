"""What a node publishes about itself: BGP sessions, announcements, learned and installed
routes, and its readiness.

The document lives at ``status/<node>`` under the node's lease (it disappears with the
node) and is rewritten only when its content changed, at most every couple of seconds.
``fabricctl bgp status`` and ``fabricctl routes`` read it. The route list is capped so the
document stays far below etcd's request size limit; ``truncated`` says when it was cut.
The same pass refreshes the Prometheus gauges. ``fabricctl explain`` reads the document too:
``learned`` (the RIB's best routes with their next hops, capped like the route list) tells
"the node learned it" apart from "fabricd installed it", and ``readiness`` says what
``/readyz`` would answer about the peers and the speaker (without pinging ExaBGP: the
speaker's process state stands in).

The publisher never sees the agent: it reads a ``NodeView`` (a frozen snapshot the agent
builds on request) and the route table, so this module imports nothing of ``agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from bgp.model import Session, SessionState
from bgp.rib import PeerStats, Rib
from bgp.sessions import SessionStatus
from bgp.speaker import Speaker
from fabric.agent.metrics import Metrics, SessionSample
from fabric.agent.registration import Registration
from fabric.dataplane.netlink import IPNetwork, KernelRoute
from fabric.dataplane.route_table import RouteStats, RouteTable
from ipam import keys
from ipam.errors import IPAMError
from ipam.resources import dumps
from ipam.store import Store

log = logging.getLogger("fabric.agent.status")

ITEMS_MAX_AGE = 30.0  # s: the route list may lag the counts this long while routes churn
MAX_ROUTES = 2000  # about 150 kB of JSON; etcd refuses requests above 1.5 MiB by default
# The order of the lists: IPv4 before IPv6, then by address, then by prefix length. C-level
# attribute reads (ipaddress's own slots) instead of a Python key function: ~20% less for
# 100,000 routes than (d.version, int(d.network_address), d.prefixlen), same order.
_ORDER = attrgetter("_version", "network_address._ip", "_prefixlen")


def _info(state: SessionState, info: str) -> str:
    return info or {"up": "Established", "connected": "OpenSent", "down": "Active"}.get(
        str(state), str(state)
    )


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the status document shows of the agent, taken at one moment."""

    node: str
    sessions: tuple[tuple[Session, SessionStatus | None, PeerStats], ...]  # planned ones
    speaker_pid: int | None
    speaker_restarts: int
    announcements: tuple[str, ...]  # sorted prefixes
    converged: bool
    own_blocks: int | None  # None before the first intent
    peers: tuple[bool, str] = (True, "")  # required peers up, and what /readyz says of them
    local_ips: int = 0  # addresses of this node's pods (their host routes)


def node_view(node: str, sessions: Iterable[Session], speaker: Speaker, rib: Rib,
              converged: bool, own_blocks: int | None, peers: tuple[bool, str],
              local_ips: int = 0) -> NodeView:  # fmt: skip
    """The view of the planned ``sessions`` as the speaker and the RIB see them now;
    ``peers``: the /readyz required-peers check."""
    status = speaker.sessions_status()
    return NodeView(
        node=node,
        sessions=tuple((s, status.get(s.peer_ip), rib.stats(s.peer_ip)) for s in sessions),
        speaker_pid=speaker.pid,
        speaker_restarts=speaker.restarts,
        announcements=tuple(sorted(str(a.prefix) for a in speaker.announced())),
        converged=converged,
        own_blocks=own_blocks,
        peers=peers,
        local_ips=local_ips,
    )


def build(view: NodeView, counts: RouteStats, items: list[dict[str, Any]],
          learned: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The status document; ``items`` is the route list (``route_items``), ``learned`` the
    RIB's best routes (``learned_section``)."""
    sessions = []
    for s, st, stats in view.sessions:
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
    return {
        "node": view.node,
        "speaker": {
            "running": view.speaker_pid is not None,
            "pid": view.speaker_pid,
            "restarts": view.speaker_restarts,
        },
        "sessions": sessions,
        "announcements": list(view.announcements),
        "routes": {
            "installed": counts.installed,
            "blackholes": counts.blackholes,
            "local": counts.devices,
            "truncated": counts.installed > MAX_ROUTES,
            "items": items,
        },
        "learned": learned if learned is not None else learned_section({}),
        "readiness": {
            "ok": view.speaker_pid is not None and view.peers[0],
            "detail": {
                "etcd": "ok",  # this document reached etcd
                "exabgp": "running" if view.speaker_pid is not None else "not running",
                "peers": view.peers[1],
            },
        },
        "converged": view.converged,
        "pid": os.getpid(),
    }


def route_items(installed: Mapping[IPNetwork, KernelRoute]) -> list[dict[str, Any]]:
    """The first MAX_ROUTES installed routes by address, as the document lists them."""
    # Without sorting (or copying) the whole table: at 100,000 routes a full sort every
    # publish cost up to a second and a large heap.
    first = heapq.nsmallest(MAX_ROUTES, installed, key=_ORDER)
    items: list[dict[str, Any]] = []
    for dst in first:
        r = installed[dst]
        kind = "blackhole" if r.blackhole else "local" if r.dev is not None else "unicast"
        item: dict[str, Any] = {"dst": str(dst), "type": kind, "via": [str(g) for g in r.gateways]}
        if r.dev is not None:
            item["dev"] = r.dev
        items.append(item)
    return items


def learned_section(best: Mapping[IPNetwork, frozenset[Any]]) -> dict[str, Any]:
    """The RIB's best routes (the first MAX_ROUTES by address) with their next hops."""
    first = heapq.nsmallest(MAX_ROUTES, best, key=_ORDER)
    items = [{"dst": str(d), "via": sorted(str(g) for g in best[d])} for d in first]
    return {"count": len(best), "truncated": len(best) > MAX_ROUTES, "items": items}


def update_metrics(
    m: Metrics, doc: dict[str, Any], own_blocks: int | None, local_ips: int = 0
) -> None:
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
    if own_blocks is not None:
        m.set_ipam(own_blocks, local_ips)


class RouteList:
    """The document's route list of one route table, rebuilt only when worth it.

    ``settle``: the list (and the learned section) is rebuilt once the table has held still
    that long (the publisher passes its interval), or when it is ITEMS_MAX_AGE old while
    routes keep changing. Listing the first 2,000 of 100k routes costs ~0.1 s; done between
    two UPDATEs of a burst (a loaded machine leaves such gaps) it took CPU from the burst
    itself, several times per burst."""

    def __init__(self, routes: RouteTable,
                 best: Callable[[], Mapping[IPNetwork, frozenset[Any]]] | None = None,
                 settle: float = 0.0) -> None:  # fmt: skip
        self.routes = routes
        self.best = best
        self.settle = settle
        self._items: list[dict[str, Any]] | None = None
        self._learned: dict[str, Any] = learned_section({})
        self._items_generation = (-1, -1)
        self._items_at = 0.0

    def items(self) -> list[dict[str, Any]]:
        """The route list, rebuilt when the table changed and then held still for
        ``settle`` with nothing pending, or when it is ITEMS_MAX_AGE old. Counts are always
        current (``RouteTable.stats``). The learned list (``learned()``) is rebuilt with it:
        every change of the RIB's best routes reaches ``RouteTable.update``, but not always
        the kernel (a route fabricd restarted over is adopted as it was), so both count."""
        routes = self.routes
        generation = (routes.generation, routes.updates)
        if self._items is not None and generation == self._items_generation:
            return self._items
        now = time.monotonic()
        settled = now - routes.changed_at >= self.settle and not routes.busy()
        if self._items is None or settled or now - self._items_at >= ITEMS_MAX_AGE:
            self._items = route_items(routes.installed_view())
            if self.best is not None:
                self._learned = learned_section(self.best())
            self._items_generation, self._items_at = generation, now
        return self._items

    def learned(self) -> dict[str, Any]:
        """The learned section as of the last ``items()``."""
        return self._learned


class StatusPublisher:
    """Writes ``status/<node>`` (see the module docstring) from ``view()`` and ``routes``."""

    def __init__(self, view: Callable[[], NodeView], routes: RouteTable, metrics: Metrics,
                 store: Store, registration: Registration,
                 best: Callable[[], Mapping[IPNetwork, frozenset[Any]]] | None = None,
                 ) -> None:  # fmt: skip
        self.view, self.routes, self.metrics = view, routes, metrics
        self.store, self.registration = store, registration
        self.route_list = RouteList(routes, best)  # settle: run()'s interval
        self._last = b""
        # what the last written document was built from: the same again (an idle node,
        # every interval) needs no document, JSON or gauges built to find out
        self._inputs: tuple[Any, ...] = ()

    async def publish(self) -> None:
        view = self.view()
        items, counts = self.route_list.items(), self.routes.stats()
        learned = self.route_list.learned()
        inputs = (view, counts, items, learned)
        last = self._inputs
        if (
            last
            and last[0] == view
            and last[1] == counts
            and last[2] is items
            and last[3] is learned
        ):
            return
        doc = build(view, counts, items, learned)
        update_metrics(self.metrics, doc, view.own_blocks, view.local_ips)
        body = json.dumps(doc, sort_keys=True).encode()
        if body != self._last:
            doc["updated"] = time.time()
            await self.store.put(keys.status(view.node), dumps(doc), self.registration.lease)
            self._last = body
        self._inputs = inputs

    async def run(self, interval: float) -> None:
        self.route_list.settle = interval  # a whole interval without route changes
        while True:
            try:
                await self.publish()
            except IPAMError as e:
                self.metrics.etcd_error("status")
                log.warning("failed to publish node status: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.registration.renewed.wait(), interval)
            if self.registration.renewed.is_set():
                self.registration.renewed.clear()
                self._last, self._inputs = b"", ()  # re-register: write again under the new lease
