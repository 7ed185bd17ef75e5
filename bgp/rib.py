"""Received routes: Adj-RIB-In per peer, best path with ECMP, graceful restart; the import
policy each route passes is ``bgp.import_policy``. Pure: no I/O, no clock (time is passed
in), no datastore.

Invariants:

- Every announcement received is kept (accepted or not) until the peer withdraws it, its
  session is lost, or it is swept as stale, so a policy or limit change can accept it later.
- A route is *accepted* when it passes the policy and fits in the peer's prefix limit. The
  limit admits the earliest passing prefixes: an accepted prefix is never displaced by a
  newer one, and a freed slot goes to the oldest waiting one (deterministic, and O(1)).
  Admission order is kept only while a peer has a limit; a limit given to a peer that had
  none takes arrival order (the order its prefixes were first received) instead.
- ``best()`` holds, for each prefix with at least one accepted route (stale ones included:
  RFC 4724 keeps forwarding on them), the next hops of the routes with the shortest AS path.
- Every mutating call returns exactly the difference of ``best()`` before and after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from bgp.bestpath import Entry as _Entry
from bgp.bestpath import with_path as _with
from bgp.bestpath import without as _without
from bgp.import_policy import ImportPolicy
from bgp.model import (
    DEFAULT_RESTART_TIME,
    Announce,
    EndOfRib,
    Event,
    IPAddress,
    IPNetwork,
    PeerGracefulRestart,
    PeerNotification,
    PeerState,
    PeerUpdate,
    SessionState,
    SpeakerRestarted,
)

Changes = dict[IPNetwork, frozenset[IPAddress] | None]
Best = frozenset[IPAddress]
# Prefixes whose candidate routes changed during one call -> their best path before it (None:
# no route), recorded at the first change; _commit compares it with the entry's now.
_Touched = dict[IPNetwork, Best | None]
RejectHook = Callable[[IPAddress, IPNetwork, str], None]
MAX_PREFIXES = "max prefixes"
_NOT_THERE = object()

_FAMILIES = {"ipv4 unicast": 4, "ipv6 unicast": 6}
# Session-loss reasons (ExaBGP's wording) that drop the peer's routes at once. RFC 4724 keeps
# routes only across a loss *without* NOTIFICATION; RFC 8538 extends that to NOTIFICATIONs
# (hold timer expiry, reported as "notification sent (4,0)") only with its "N" bit, which
# ExaBGP does not negotiate. "stop": a deliberate teardown (neighbour removed, shutdown).
_NOT_GRACEFUL = ("notification sent", "notification received", "stop")


def graceful_down(reason: str) -> bool:
    """Whether a session lost for ``reason`` keeps its routes as stale (RFC 4724 helper).

    True for a TCP loss without NOTIFICATION ("closing connection", a collision, an unknown
    reason); False for a NOTIFICATION sent or received, hold timer expiry and a deliberate stop.
    """
    text = reason.strip().lower()
    return not any(text.startswith(p) or f"[{p}" in text for p in _NOT_GRACEFUL)


@dataclass(frozen=True, slots=True)
class PeerStats:
    """Current counts of one peer's Adj-RIB-In; ``rejected_total`` is cumulative."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    stale: int = 0
    rejected_total: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """One received route as ``routes_from`` shows it. ``reason`` None: accepted."""

    announce: Announce
    reason: str | None
    stale: bool


class _Table:
    """One peer's Adj-RIB-In. Every key of ``routes`` is in exactly one of ``refused``
    (failed the policy), accepted or ``overflow`` (passed, over the prefix limit). With a
    limit, ``accepted`` holds the accepted ones: the two ordered sets are in admission order,
    every overflow entry younger than every accepted one. Without one (the common case:
    ``accepted`` None, ``overflow`` empty) every key of ``routes`` not in ``refused`` is
    accepted: no second 100k-entry table, and one dict operation less per learned and per
    withdrawn prefix (in a random order across 100k entries, each a likely cache miss)."""

    __slots__ = ("accepted", "deadline", "limit", "overflow", "refused", "routes", "stale")

    def __init__(self, limit: int | None) -> None:
        self.routes: dict[IPNetwork, Announce] = {}
        self.refused: dict[IPNetwork, str] = {}
        self.accepted: dict[IPNetwork, None] | None = None if limit is None else {}
        self.overflow: OrderedDict[IPNetwork, None] = OrderedDict()
        self.stale: set[IPNetwork] = set()
        self.deadline: float | None = None
        self.limit = limit

    def has_room(self) -> bool:
        return self.limit is None or self.accepted is None or len(self.accepted) < self.limit

    def accepted_count(self) -> int:
        return len(self.routes) - len(self.refused) if self.accepted is None else len(self.accepted)

    def accepted_prefixes(self) -> Iterable[IPNetwork]:
        a = self.accepted
        return [p for p in self.routes if p not in self.refused] if a is None else a

    def set_limit(self, limit: int | None) -> None:
        """A table given a limit starts ``accepted`` in arrival order; one without a limit
        drops it once ``overflow`` is empty."""
        self.limit = limit
        if limit is not None and self.accepted is None:
            self.accepted = dict.fromkeys(p for p in self.routes if p not in self.refused)
        elif limit is None and self.accepted is not None and not self.overflow:
            self.accepted = None

    def reason(self, prefix: IPNetwork) -> str | None:
        return self.refused.get(prefix) or (MAX_PREFIXES if prefix in self.overflow else None)


class Rib:
    """The received-route table of the local node (see the module invariants)."""

    def __init__(self, policy: ImportPolicy, on_reject: RejectHook | None = None) -> None:
        self._policy = policy
        self._on_reject = on_reject
        self._tables: dict[IPAddress, _Table] = {}
        self._limits: dict[IPAddress, int | None] = {}
        self._restart: dict[IPAddress, float] = {}
        self._rejected_total: dict[IPAddress, int] = {}
        self._notified: set[IPAddress] = set()
        # From each peer's last OPEN: its restart time and the families it preserves
        # forwarding for (absent: no OPEN seen, treated as preserving everything).
        self._peer_gr: dict[IPAddress, tuple[int | None, frozenset[str]]] = {}
        # prefix -> its best path and candidates (bgp.bestpath), for every prefix with an
        # accepted route: best() is read from it, there is no second table
        self._paths: dict[IPNetwork, _Entry] = {}

    # ------------------------------------------------------------------ reading

    @property
    def policy(self) -> ImportPolicy:
        return self._policy

    def best(self) -> dict[IPNetwork, Best]:
        return {prefix: entry[0] for prefix, entry in self._paths.items()}

    def best_view(self) -> Mapping[IPNetwork, Best]:
        """``best()`` read-only and live, without copying it: read it in one go."""
        return _BestView(self._paths)

    def peers(self) -> list[IPAddress]:
        """Peers with an Adj-RIB-In (routes received and not yet removed)."""
        return sorted(self._tables, key=lambda p: (p.version, int(p)))

    def routes_from(self, peer: IPAddress) -> list[Route]:
        """Everything received from ``peer``, accepted or not, in address order."""
        t = self._tables.get(peer) or _Table(None)
        order = sorted(t.routes, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
        return [Route(t.routes[p], t.reason(p), p in t.stale) for p in order]

    def stats(self, peer: IPAddress) -> PeerStats:
        total = self._rejected_total.get(peer, 0)
        t = self._tables.get(peer)
        if t is None:
            return PeerStats(rejected_total=total)
        return PeerStats(
            received=len(t.routes),
            accepted=t.accepted_count(),
            rejected=len(t.refused) + len(t.overflow),
            stale=len(t.stale),
            rejected_total=total,
        )

    def stale_count(self) -> int:
        return sum(len(t.stale) for t in self._tables.values())

    def restart_time(self, peer: IPAddress) -> float:
        return self._restart.get(peer, DEFAULT_RESTART_TIME)

    # ----------------------------------------------------------------- mutating

    def apply(self, event: Event, now: float) -> Changes:
        """Feed one speaker event; ``now`` is a monotonic time in seconds."""
        if isinstance(event, PeerUpdate):
            return self._update(event)
        if isinstance(event, PeerState):
            if event.state is SessionState.DOWN:
                graceful = event.peer not in self._notified and graceful_down(event.reason)
                self._notified.discard(event.peer)
                restart = self.restart_time(event.peer)
                time_, forwarding = self._peer_gr.get(event.peer, (None, None))
                if forwarding is not None:
                    # RFC 4724: keep stale only what the peer forwards across its restart
                    # (no family, e.g. FRR in helper mode: its FIB dies with it), and
                    # never longer than the restart time it announced.
                    graceful = graceful and bool(forwarding) and bool(time_)
                    restart = min(restart, time_ or 0)
                return self.peer_down(event.peer, graceful, now, restart)
            if event.state is SessionState.ESTABLISHED:
                self._notified.discard(event.peer)
            return {}
        if isinstance(event, EndOfRib):
            version = _FAMILIES.get(event.family)
            return {} if version is None else self.sweep_stale(event.peer, version)
        if isinstance(event, PeerGracefulRestart):
            self._peer_gr[event.peer] = (event.restart_time, event.forwarding)
            return {}
        if isinstance(event, PeerNotification):
            self._notified.add(event.peer)  # the session is going down, and not gracefully
            return {}
        if isinstance(event, SpeakerRestarted):
            self._notified.clear()
            for peer, t in self._tables.items():
                self._mark_stale(t, now, self.restart_time(peer))
            return {}
        raise TypeError(f"not a speaker event: {event!r}")

    def peer_down(
        self, peer: IPAddress, graceful: bool, now: float, restart_time: float
    ) -> Changes:
        """The session with ``peer`` was lost. Graceful: its routes turn stale and stay in
        use until it re-announces them and sends End-of-RIB, or until ``now + restart_time``
        (a second loss before that never pushes the deadline later, so a flapping peer
        cannot keep stale routes forever). Not graceful: they are removed now."""
        t = self._tables.get(peer)
        if t is None:
            return {}
        if graceful and restart_time > 0:
            self._mark_stale(t, now, restart_time)
            return {}
        touched: _Touched = {}
        for prefix in t.accepted_prefixes():
            self._del_path(prefix, peer, touched)
        del self._tables[peer]
        return self._commit(touched)

    def sweep_stale(self, peer: IPAddress, version: int | None = None) -> Changes:
        """Remove the routes of ``peer`` still stale (of one IP version, or all)."""
        touched: _Touched = {}
        self._sweep(peer, version, touched)
        return self._commit(touched)

    def expire(self, now: float) -> Changes:
        """Sweep the stale routes of every peer whose restart deadline has passed."""
        touched: _Touched = {}
        due = [p for p, t in self._tables.items() if t.deadline is not None and t.deadline <= now]
        for peer in due:
            self._sweep(peer, None, touched)
        return self._commit(touched)

    def set_policy(self, policy: ImportPolicy) -> Changes:
        """Replace the policy and re-evaluate every route received so far."""
        self._policy = policy
        touched: _Touched = {}
        for peer, t in self._tables.items():
            passing: list[IPNetwork] = []
            for prefix, ann in t.routes.items():
                reason = policy.check(peer, ann)
                old = t.refused.get(prefix)
                if reason is None:
                    if old is not None:
                        del t.refused[prefix]
                        passing.append(prefix)
                    continue
                if old is None:
                    self._unadmit(peer, t, prefix, touched, refill=False)
                t.refused[prefix] = reason
                if old != reason:
                    self._reject(peer, prefix, reason)
            self._refill(peer, t, touched)  # older waiting prefixes before newly passing ones
            for prefix in passing:
                self._admit(peer, t, prefix, t.routes[prefix], touched)
        return self._commit(touched)

    def set_limits(self, limits: Mapping[IPAddress, int | None]) -> Changes:
        """Replace every peer's prefix limit (a peer not named has none)."""
        self._limits = dict(limits)
        touched: _Touched = {}
        for peer, t in self._tables.items():
            t.set_limit(self._limits.get(peer))
            while t.limit is not None and t.accepted is not None and len(t.accepted) > t.limit:
                prefix, _ = t.accepted.popitem()  # the youngest go back to waiting
                t.overflow[prefix] = None
                t.overflow.move_to_end(prefix, last=False)
                self._del_path(prefix, peer, touched)
                self._reject(peer, prefix, MAX_PREFIXES)
            self._refill(peer, t, touched)
            t.set_limit(t.limit)  # no limit and no overflow left: accepted goes
        return self._commit(touched)

    def set_restart_times(self, times: Mapping[IPAddress, float]) -> None:
        """How long each peer's routes stay stale after a graceful loss (default
        ``DEFAULT_RESTART_TIME``): the restart time of its session."""
        self._restart = dict(times)

    # ------------------------------------------------------------------ internals

    def _update(self, event: PeerUpdate) -> Changes:
        peer = event.peer
        t = self._tables.get(peer)
        if t is None:
            if not event.announced:
                return {}
            t = self._tables[peer] = _Table(self._limits.get(peer))
        touched: _Touched = {}
        out: Changes = {}
        # Withdrawals first: RFC 4271 treats a prefix in both lists as announced. An UPDATE
        # that only withdraws (a burst's) puts a prefix whose last path went straight into
        # the result: nothing later in the call can touch that prefix again.
        if event.withdrawn:
            self._withdraw(peer, t, event.withdrawn, touched, None if event.announced else out)
        policy = self._policy
        attrs = hop = path_reason = None
        for ann in event.announced:
            prefix = ann.prefix
            t.routes[prefix] = ann
            if t.stale:
                t.stale.discard(prefix)
            if ann.attrs is not attrs or ann.next_hop is not hop:  # once per UPDATE, mostly
                attrs, hop = ann.attrs, ann.next_hop
                path_reason = policy.check_path(peer, hop, attrs)
            reason = path_reason or policy.check_prefix(prefix)
            if reason is not None:
                if prefix not in t.refused:
                    self._unadmit(peer, t, prefix, touched)
                t.refused[prefix] = reason
                self._reject(peer, prefix, reason)
            elif t.accepted is None or prefix in t.accepted:
                if t.refused:  # no limit: accepted unless refused so far
                    t.refused.pop(prefix, None)
                self._add_path(prefix, peer, ann, touched)
            elif t.overflow and prefix in t.overflow:
                self._reject(peer, prefix, MAX_PREFIXES)
            else:
                if t.refused:
                    t.refused.pop(prefix, None)
                self._admit(peer, t, prefix, ann, touched)
        if not t.stale:
            t.deadline = None
        if not t.routes:
            del self._tables[peer]
        return self._commit(touched, out)

    def _sweep(self, peer: IPAddress, version: int | None, touched: _Touched) -> None:
        t = self._tables.get(peer)
        if t is None or not t.stale:
            return
        for prefix in [p for p in t.stale if version is None or p.version == version]:
            self._drop(peer, t, prefix, touched)
        if not t.stale:
            t.deadline = None
        if not t.routes:
            del self._tables[peer]

    def _admit(
        self, peer: IPAddress, t: _Table, prefix: IPNetwork, ann: Announce, touched: _Touched
    ) -> None:
        """A prefix newly passing the policy: accepted if there is room, else waiting."""
        if t.has_room():
            if t.accepted is not None:
                t.accepted[prefix] = None
            self._add_path(prefix, peer, ann, touched)
        else:
            t.overflow[prefix] = None
            self._reject(peer, prefix, MAX_PREFIXES)

    def _withdraw(self, peer: IPAddress, t: _Table, prefixes: Iterable[IPNetwork],
                  touched: _Touched, out: Changes | None) -> None:  # fmt: skip
        """``_drop`` for each of ``prefixes`` that ``peer`` sent, inlined: withdrawing 100k
        routes runs this loop 100k times, and each dict operation on a table that size is a
        likely cache miss. ``out``: where a prefix whose last path went is booked at once
        (None: in ``touched``, for ``_commit``)."""
        routes, accepted, paths_of = t.routes, t.accepted, self._paths
        for prefix in prefixes:
            if routes.pop(prefix, None) is None:
                continue
            if t.stale:
                t.stale.discard(prefix)
            if t.refused and t.refused.pop(prefix, None) is not None:
                continue
            if accepted is not None and accepted.pop(prefix, _NOT_THERE) is _NOT_THERE:
                t.overflow.pop(prefix, None)
                continue
            entry = paths_of.pop(prefix, None)  # one dict operation for the common case
            if entry is None:
                continue
            if len(entry) == 3 and entry[1] is peer:  # its only path: no _without call
                if out is None:
                    touched.setdefault(prefix, entry[0])
                else:
                    out[prefix] = None
            elif (rest := _without(entry, peer)) is not None:
                touched.setdefault(prefix, entry[0])
                if rest:
                    paths_of[prefix] = rest
            else:
                paths_of[prefix] = entry  # none of it was the peer's: put back
        if t.overflow:
            self._refill(peer, t, touched)

    def _drop(self, peer: IPAddress, t: _Table, prefix: IPNetwork, touched: _Touched) -> None:
        del t.routes[prefix]
        t.stale.discard(prefix)
        if t.refused.pop(prefix, None) is None:
            self._unadmit(peer, t, prefix, touched)

    def _unadmit(
        self, peer: IPAddress, t: _Table, prefix: IPNetwork, touched: _Touched, refill: bool = True
    ) -> None:
        if t.accepted is None:  # no limit: accepted (or never had a path: a no-op)
            self._del_path(prefix, peer, touched)
        elif prefix in t.accepted:
            del t.accepted[prefix]
            self._del_path(prefix, peer, touched)
            if refill:
                self._refill(peer, t, touched)
        else:
            t.overflow.pop(prefix, None)

    def _refill(self, peer: IPAddress, t: _Table, touched: _Touched) -> None:
        while t.overflow and t.has_room():
            prefix, _ = t.overflow.popitem(last=False)
            if t.accepted is not None:
                t.accepted[prefix] = None
            self._add_path(prefix, peer, t.routes[prefix], touched)

    def _mark_stale(self, t: _Table, now: float, restart_time: float) -> None:
        t.stale = set(t.routes)
        end = now + restart_time
        t.deadline = end if t.deadline is None else min(t.deadline, end)

    def _reject(self, peer: IPAddress, prefix: IPNetwork, reason: str) -> None:
        self._rejected_total[peer] = self._rejected_total.get(peer, 0) + 1
        if self._on_reject is not None:
            self._on_reject(peer, prefix, reason)

    def _add_path(
        self, prefix: IPNetwork, peer: IPAddress, ann: Announce, touched: _Touched
    ) -> None:
        entry = self._paths.get(prefix)
        touched.setdefault(prefix, entry[0] if entry is not None else None)
        self._paths[prefix] = _with(entry, peer, ann)

    def _del_path(self, prefix: IPNetwork, peer: IPAddress, touched: _Touched) -> None:
        entry = self._paths.get(prefix)
        if entry is not None and (rest := _without(entry, peer)) is not None:
            touched.setdefault(prefix, entry[0])
            if rest:
                self._paths[prefix] = rest
            else:
                del self._paths[prefix]

    def _commit(self, touched: _Touched, out: Changes | None = None) -> Changes:
        """The changes of best paths: each touched prefix's best before the call against
        its entry's now (``out``: changes booked already, added to)."""
        out = {} if out is None else out
        paths = self._paths
        for prefix, old in touched.items():
            entry = paths.get(prefix)
            new = entry[0] if entry is not None else None
            if new is not old and new != old:
                out[prefix] = new
        return out


class _BestView(Mapping[IPNetwork, Best]):
    """``Rib.best()`` read-only and live, over the RIB's own table (nothing copied)."""

    __slots__ = ("_paths",)

    def __init__(self, paths: dict[IPNetwork, _Entry]) -> None:
        self._paths = paths

    def __getitem__(self, prefix: IPNetwork) -> Best:
        entry: Best = self._paths[prefix][0]
        return entry

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, prefix: object) -> bool:
        return prefix in self._paths
