"""Every Prometheus metric of fabricd, on a registry of its own (``Metrics.registry``).

Names start with ``fabric_``; docs/design/agent.md lists them (a test keeps the list complete).
Callers use the typed helpers below rather than the prometheus_client objects. Gauges that
describe the present (sessions, prefixes, routes) are set from a full picture each time, so
a peer that went away loses its series instead of reporting its last value for ever;
counters keep their series (their history is the point).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bgp.model import SessionState


class Reconciler(StrEnum):
    ROUTES = "routes"
    ANNOUNCEMENTS = "announcements"
    FULL_RESYNC = "full_resync"
    NAT = "nat"
    POLICY = "policy"  # one NetworkPolicy batch: compile, render, nft transaction
    POLICY_RESYNC = "policy_resync"  # the same, reading the kernel's table first


class RouteKind(StrEnum):
    UNICAST = "unicast"  # learned over BGP, via other nodes
    BLACKHOLE = "blackhole"  # this node's own blocks
    LOCAL = "local"  # a pod on this node: <podIP> dev <veth>


@dataclass(frozen=True, slots=True)
class SessionSample:
    """One BGP session as the status pass sees it: ``state`` is a SessionState value,
    ``type`` a PeerType value; prefix counts are those of the received-route table."""

    peer: str
    type: str
    state: str
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    failed_attempts: int = 0  # connection attempts that failed since fabricd started


# Reconciles take milliseconds normally; a full resync of a large cluster takes seconds.
_RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# CNI ADD creates a veth and talks to etcd: tens of milliseconds, seconds when etcd is slow.
_CNI_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


PolicyKey = tuple[str, str, str, str]  # namespace, policy, direction, verdict


class PolicyPackets(Collector):
    """``fabric_policy_packets_total``: the packet counters of the nftables policy table as
    last read (``set``); series appear and go with the rules that count them (a deleted
    policy's counter goes, a re-created one starts at 0: a counter reset to Prometheus)."""

    def __init__(self) -> None:
        self.samples: dict[PolicyKey, int] = {}

    def set(self, samples: dict[PolicyKey, int]) -> None:
        self.samples = dict(samples)

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "fabric_policy_packets",
            "Packets of new connections NetworkPolicy allowed (per policy) or denied "
            "(default deny), as nftables counted them on this node",
            labels=["namespace", "policy", "direction", "verdict"],
        )
        for key, packets in sorted(self.samples.items()):
            fam.add_metric(list(key), packets)
        yield fam


class Metrics:
    """The agent's metrics. One instance per agent; the registry is its own, so tests and
    several agents in one process do not collide."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.session_state = Gauge(
            "fabric_bgp_session_state",
            "1 for the state each BGP session is in, 0 for the others",
            ["peer", "type", "state"],
            registry=r,
        )
        self.sessions = Gauge(
            "fabric_bgp_sessions", "BGP sessions per state", ["state"], registry=r
        )
        self.received = Gauge(
            "fabric_bgp_received_prefixes", "Prefixes received from a peer", ["peer"], registry=r
        )
        self.accepted = Gauge(
            "fabric_bgp_accepted_prefixes",
            "Prefixes from a peer accepted into the routing table",
            ["peer"],
            registry=r,
        )
        self.rejected = Gauge(
            "fabric_bgp_rejected_prefixes",
            "Prefixes from a peer currently rejected by policy or limits",
            ["peer"],
            registry=r,
        )
        self.failed_attempts = Counter(
            "fabric_bgp_session_failed_attempts",
            "Connection attempts to a peer that failed (refused, reset, timed out, no OPEN, "
            "NOTIFICATION) since start",
            ["peer"],
            registry=r,
        )
        self._failed_seen: dict[str, int] = {}
        self.rejections = Counter(
            "fabric_bgp_prefix_rejections",
            "Prefixes rejected from a peer since start",
            ["peer"],
            registry=r,
        )
        self.announcements = Gauge(
            "fabric_bgp_announcements", "Prefixes this node announces", registry=r
        )
        self.routes = Gauge(
            "fabric_routes_installed", "Kernel routes fabricd owns, per kind", ["type"], registry=r
        )
        self.route_failures = Counter(
            "fabric_route_programming_failures",
            "Kernel route changes that failed (retried at the next flush or resync)",
            registry=r,
        )
        self.ipam_blocks = Gauge(
            "fabric_ipam_blocks", "IPAM blocks affine to this node", registry=r
        )
        self.ipam_ips = Gauge(
            "fabric_ipam_allocated_ips", "IP addresses allocated on this node", registry=r
        )
        self.reconcile_duration = Histogram(
            "fabric_reconcile_duration_seconds",
            "Time one reconcile pass took",
            ["reconciler"],
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )
        self.etcd_errors = Counter(
            "fabric_etcd_errors", "etcd requests that failed, per operation", ["op"], registry=r
        )
        self.exabgp_restarts = Counter(
            "fabric_exabgp_restarts", "Times the ExaBGP child was restarted", registry=r
        )
        self.cni_requests = Counter(
            "fabric_cni_requests",
            "CNI requests, per verb and result",
            ["verb", "result"],
            registry=r,
        )
        self.cni_duration = Histogram(
            "fabric_cni_request_duration_seconds",
            "Time a CNI request took",
            ["verb"],
            buckets=_CNI_BUCKETS,
            registry=r,
        )
        self.announce_waits = Counter(
            "fabric_cni_announce_waits",
            "CNI ADDs of borrowed addresses that waited for their announcement, per result",
            ["result"],
            registry=r,
        )
        self.announce_wait = Histogram(
            "fabric_cni_announce_wait_seconds",
            "Time an ADD of a borrowed address waited for its announcement",
            buckets=_CNI_BUCKETS,
            registry=r,
        )
        for result in ("announced", "timeout"):
            self.announce_waits.labels(result)
        self.policy_packets = PolicyPackets()
        self.start_phase = Gauge(
            "fabric_start_phase_seconds",
            "Seconds from the process start to the end of each start-up phase "
            "(fabric/agent/startup.py; 'policy': the first table computed from etcd written)",
            ["phase"],
            registry=r,
        )
        r.register(self.policy_packets)
        ProcessCollector(namespace="fabric", registry=r)  # fabric_process_* (CPU, memory, fds)
        # The label sets present, so series of sessions that went away can be removed.
        self._session_labels: set[tuple[str, str, str]] = set()
        self._peers: set[str] = set()
        self._states: set[str] = set(SessionState)
        for name in Reconciler:  # series exist from the start: rate() and absent() work
            self.reconcile_duration.labels(name)
        for kind in RouteKind:
            self.routes.labels(kind).set(0)
        for state in SessionState:
            self.sessions.labels(state).set(0)

    # BGP ---------------------------------------------------------------------------------

    def set_sessions(self, samples: Iterable[SessionSample]) -> None:
        """Replace the session and prefix gauges with ``samples`` (every session there is)."""
        samples = list(samples)
        labels = {(s.peer, s.type, st) for s in samples for st in {*SessionState, s.state}}
        for stale in self._session_labels - labels:
            self.session_state.remove(*stale)
        for peer in self._peers - {s.peer for s in samples}:
            for gauge in (self.received, self.accepted, self.rejected):
                gauge.remove(peer)
        state_of = {s.peer: s.state for s in samples}
        for peer, typ, state in labels:
            self.session_state.labels(peer, typ, state).set(int(state_of[peer] == state))
        counts = collections.Counter(state_of.values())
        self._states.update(counts)
        for state in self._states:
            self.sessions.labels(state).set(counts[state])
        for s in samples:
            seen = self._failed_seen.get(s.peer, 0)
            if s.failed_attempts > seen:
                self.failed_attempts.labels(s.peer).inc(s.failed_attempts - seen)
            elif s.peer not in self._failed_seen:
                self.failed_attempts.labels(s.peer)  # the series exists from the start
            self._failed_seen[s.peer] = max(seen, s.failed_attempts)
            self.received.labels(s.peer).set(s.received)
            self.accepted.labels(s.peer).set(s.accepted)
            self.rejected.labels(s.peer).set(s.rejected)
        self._session_labels, self._peers = labels, {s.peer for s in samples}

    def prefixes_rejected(self, peer: str, n: int = 1) -> None:
        self.rejections.labels(peer).inc(n)

    def set_announcements(self, n: int) -> None:
        self.announcements.set(n)

    def exabgp_restart(self) -> None:
        self.exabgp_restarts.inc()

    # kernel routes -----------------------------------------------------------------------

    def set_routes(self, unicast: int, blackhole: int, local: int) -> None:
        """Routes fabricd owns now, by kind (all of them, not a capped list)."""
        for kind, n in ((RouteKind.UNICAST, unicast), (RouteKind.BLACKHOLE, blackhole),
                        (RouteKind.LOCAL, local)):  # fmt: skip
            self.routes.labels(kind).set(n)

    def route_programming_failed(self, n: int = 1) -> None:
        self.route_failures.inc(n)

    # IPAM, reconcilers, etcd, CNI ----------------------------------------------------------

    def set_ipam(self, blocks: int, ips: int | None = None) -> None:
        """Blocks affine to this node and (when known) addresses allocated on it."""
        self.ipam_blocks.set(blocks)
        if ips is not None:
            self.ipam_ips.set(ips)

    def observe_reconcile(self, reconciler: str, seconds: float) -> None:
        self.reconcile_duration.labels(reconciler).observe(seconds)

    @contextmanager
    def time_reconcile(self, reconciler: str) -> Iterator[None]:
        """Observe how long the ``with`` block took (also when it raised)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.observe_reconcile(reconciler, time.monotonic() - started)

    def set_start_phases(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.start_phase.labels(phase).set(seconds)

    def etcd_error(self, op: str) -> None:
        self.etcd_errors.labels(op).inc()

    def cni_request(self, verb: str, result: str, seconds: float) -> None:
        """One CNI request: ``verb`` ADD/DEL/CHECK/GC/STATUS, ``result`` "ok" or a CNI code."""
        self.cni_requests.labels(verb, result).inc()
        self.cni_duration.labels(verb).observe(seconds)

    def announce_waited(self, result: str, seconds: float) -> None:
        """An ADD waited ``seconds`` for its borrowed address's announcement: ``result``
        "announced" or "timeout"."""
        self.announce_waits.labels(result).inc()
        self.announce_wait.observe(seconds)

    def names(self) -> list[str]:
        """Every metric family name in the registry (for docs and tests)."""
        return sorted({m.name for m in self.registry.collect()})
