"""The walk: from a snapshot (and, with ``--live``, the local kernel's answers) to the hops
of the path from SRC to DST, in order, stopping at the first broken one. Pure.

Layers, in path order (the first that breaks is named in the summary):

1. ``ipam``: each end's allocation (handle, pod, node) and its block's affinity: confirmed
   (announced), pending or pendingDeletion (never announced), missing;
2. ``node``: the node of each end is registered (its lease-backed ``nodes/`` key), publishes
   its status (fabricd runs) and runs its BGP speaker;
3. ``announcement``: the destination's block (a borrowed address's /32) is exportable (its
   pool has no ``disableBGPExport``), in its node's announcements, that node has an
   established session, and the source node learned the prefix (with next hops); the same
   for the way back (the destination node learned the source's block);
4. ``forwarding``: the route the source node installed for the destination (and the
   kernel's own lookup with ``--live`` on that node), the destination node's /32 to the
   pod's veth, and the way back;
5. ``policy``: the egress verdict on the source and the ingress verdict on the destination.

Node addresses are the underlay: fabricd neither announces nor routes them, so their
forwarding is only checked live.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fabric.explain.evidence import Endpoint, IPAddress, Kind, Snapshot
from ipam.blocks import AffinityState

RESYNC_HINT = "fabricd's periodic route resync (routes.resyncInterval) puts it back"


class Layer(StrEnum):
    IPAM = "ipam"
    NODE = "node"
    ANNOUNCEMENT = "announcement"
    FORWARDING = "forwarding"
    POLICY = "policy"


class State(StrEnum):
    OK = "ok"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"  # the evidence was not there to read (a truncated list)
    SKIPPED = "skipped"  # not part of this path (same node, underlay address)


@dataclass(frozen=True, slots=True)
class Hop:
    layer: Layer
    name: str
    state: State
    detail: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": str(self.layer), "hop": self.name,
                             "state": str(self.state), "detail": self.detail,
                             "evidence": dict(self.evidence)}  # fmt: skip
        if self.fix:
            d["fix"] = self.fix
        return d


@dataclass(frozen=True, slots=True)
class Live:
    """The local fabricd's answers (``GET /route``): its node, its route protocol and the
    kernel's FIB entry per looked-up address."""

    node: str
    protocol: int
    routes: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Report:
    src: Endpoint
    dst: Endpoint
    port: int | None
    protocol: str | None
    hops: tuple[Hop, ...]
    live_node: str | None = None

    @property
    def blocked(self) -> Hop | None:
        return next((h for h in self.hops if h.state is State.BLOCKED), None)

    @property
    def summary(self) -> str:
        b = self.blocked
        return "reachable" if b is None else f"blocked at {b.layer}: {b.detail}"

    def to_json(self) -> dict[str, Any]:
        b = self.blocked
        return {
            "source": self.src.to_json(),
            "destination": self.dst.to_json(),
            "port": self.port,
            "protocol": self.protocol,
            "live": self.live_node,
            "verdict": "reachable" if b is None else "blocked",
            "blockedAt": str(b.layer) if b else None,
            "reason": b.detail if b else None,
            "fix": b.fix if b else None,
            "summary": self.summary,
            "hops": [h.to_json() for h in self.hops],
        }


# A policy check: (src, dst) -> its hops (filled in by fabric.explain.policy once merged).
PolicyCheck = Callable[[Endpoint, Endpoint], Sequence[Hop]]


def walk(snap: Snapshot, src: Endpoint, dst: Endpoint, port: int | None = None,
         protocol: str | None = None, live: Live | None = None,
         policy: PolicyCheck | None = None) -> Report:  # fmt: skip
    """The hops from ``src`` to ``dst`` up to and including the first blocked one."""
    hops: list[Hop] = []

    def steps() -> Iterable[Hop]:
        for role, e in (("source", src), ("destination", dst)):
            yield _ipam(snap, role, e)
        for node in dict.fromkeys(n for n in (src.node, dst.node) if n is not None):
            yield _node(snap, node)
        yield from _announcement(snap, dst, src.node, "")
        yield from _announcement(snap, src, dst.node, "return: ")
        yield from _forwarding(snap, src, dst, live)
        if policy is not None:
            yield from policy(src, dst)

    for hop in steps():
        hops.append(hop)
        if hop.state is State.BLOCKED:
            break
    return Report(src, dst, port, protocol, tuple(hops), live.node if live else None)


# ------------------------------------------------------------------------ ipam


def _ipam(snap: Snapshot, role: str, e: Endpoint) -> Hop:
    name = f"{role} {e.label}"
    if e.kind is Kind.NODE:
        return Hop(Layer.IPAM, name, State.SKIPPED, f"{e.ip} is node {e.node}'s own address "
                   "(not from IPAM)", {"ip": str(e.ip) if e.ip else None, "node": e.node})  # fmt: skip
    a = e.allocation
    if a is None:
        where = f"block {e.block} ({e.node or 'no node'})" if e.block else "no block"
        return Hop(Layer.IPAM, name, State.BLOCKED,
                   f"{e.ip} is not assigned to anything ({where} holds it free)",
                   {"ip": str(e.ip), "block": str(e.block) if e.block else None},
                   f"the pod holding it was deleted or never started; `fabricctl ipam show --ip "
                   f"{e.ip}`")  # fmt: skip
    ev: dict[str, Any] = {"ip": str(a.ip), "handle": a.handle, "pod": a.pod, "node": a.node,
                          "block": str(a.block), "blockOwner": a.block_owner,
                          "borrowed": a.borrowed, "attributes": dict(a.attrs)}  # fmt: skip
    pool = snap.pool_of(a.block)
    ev["pool"] = pool.name if pool else None
    who = f"{a.pod or a.handle} on {a.node}, handle {a.handle}"
    if pool is None:
        return Hop(Layer.IPAM, name, State.BLOCKED, f"block {a.block} is outside every IP pool",
                   ev, "`fabricctl ipam check` lists it; recreate the pool or move the pod")  # fmt: skip
    if a.borrowed:
        ev["affinity"] = None
        return Hop(Layer.IPAM, name, State.OK, f"{who}; borrowed from block {a.block} of "
                   f"{a.block_owner or 'no node'} (announced as a /{a.ip.max_prefixlen})", ev)  # fmt: skip
    owner = a.block_owner
    aff = snap.affinities.get((owner, a.block)) if owner else None
    ev["affinity"] = str(aff.state) if aff else None
    if owner is None or aff is None:
        return Hop(Layer.IPAM, name, State.BLOCKED,
                   f"block {a.block} has no affinity record for {owner or 'any node'}: no node "
                   "announces it", ev,
                   "`fabricctl ipam check -o report.json`, then `fabricctl ipam release "
                   "--from-report report.json`")  # fmt: skip
    if aff.state is AffinityState.PENDING:
        return Hop(Layer.IPAM, name, State.BLOCKED,
                   f"block {a.block}'s affinity for {owner} is pending (a claim that never "
                   f"completed): {owner} neither announces nor routes it", ev,
                   "`fabricctl ipam check -o report.json` lists it as a stuck affinity; "
                   "`fabricctl ipam release --from-report report.json` finishes it")  # fmt: skip
    if aff.state is AffinityState.PENDING_DELETION:
        return Hop(Layer.IPAM, name, State.BLOCKED,
                   f"block {a.block} of {owner} is being released (pendingDeletion): it is no "
                   "longer announced", ev,
                   "`fabricctl ipam check` and `ipam release --from-report` finish the release; "
                   "the pod needs a new address")  # fmt: skip
    return Hop(Layer.IPAM, name, State.OK,
               f"{who}; block {a.block} affine to {owner} (confirmed)", ev)  # fmt: skip


# ------------------------------------------------------------------------ node


def _node(snap: Snapshot, node: str) -> Hop:
    name = f"node {node}"
    n = snap.nodes.get(node)
    st = snap.statuses.get(node)
    ev: dict[str, Any] = {"registered": n is not None, "addresses": list(n.addresses) if n else [],
                          "status": st is not None}  # fmt: skip
    if n is None:
        return Hop(Layer.NODE, name, State.BLOCKED,
                   f"node {node} is not registered (its lease expired: the node is down, or "
                   "fabricd there stopped or cannot reach etcd)", ev,
                   f"bring {node} back, or check fabricd there (`systemctl status fabricd`) and "
                   f"its path to etcd; if it is gone for good, `fabricctl node delete {node}`")  # fmt: skip
    if st is None:
        return Hop(Layer.NODE, name, State.BLOCKED,
                   f"node {node} publishes no status: fabricd is not running there", ev,
                   f"start fabricd on {node} (`systemctl start fabricd`)")  # fmt: skip
    sp = st.get("speaker") or {}
    ready = st.get("readiness") or {}
    ev.update(speaker=sp, readiness=ready, converged=st.get("converged"),
              updated=st.get("updated"))  # fmt: skip
    if not sp.get("running"):
        return Hop(Layer.NODE, name, State.BLOCKED,
                   f"the BGP speaker (ExaBGP) is not running on {node} "
                   f"({sp.get('restarts', 0)} restarts)", ev,
                   f"fabricd restarts it; see fabricd's log on {node}")  # fmt: skip
    detail = ready.get("detail") or {}
    if not ready:  # a fabricd older than the readiness field
        state = "readiness not published"
    elif ready.get("ok"):
        state = "ready"
    else:
        state = f"not ready ({'; '.join(f'{k}: {v}' for k, v in sorted(detail.items()))})"
    return Hop(Layer.NODE, name, State.OK, f"registered, fabricd running, {state}", ev)


# ------------------------------------------------------------------------ announcement


def _items(st: Mapping[str, Any] | None, section: str) -> tuple[list[Mapping[str, Any]], bool]:
    sec = (st or {}).get(section) or {}
    return list(sec.get("items") or ()), bool(sec.get("truncated"))


def _lpm(items: Iterable[Mapping[str, Any]], ip: IPAddress) -> Mapping[str, Any] | None:
    """The item whose ``dst`` is the longest prefix holding ``ip``."""
    best, plen = None, -1
    for it in items:
        try:
            net = ipaddress.ip_network(str(it.get("dst")), strict=False)
        except ValueError:
            continue
        if net.version == ip.version and ip in net and net.prefixlen > plen:
            best, plen = it, net.prefixlen
    return best


def _sessions(st: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """(established sessions, the others with their state) as short texts."""
    up, down = [], []
    for s in (st or {}).get("sessions") or ():
        text = f"{s.get('name') or s.get('peerIP')} {s.get('peerIP')}"
        if s.get("state") == "up":
            up.append(text)
        else:
            down.append(f"{text} {s.get('state')} ({s.get('info')})")
    return up, down


def _announcement(snap: Snapshot, owner: Endpoint, learner: str | None, tag: str) -> list[Hop]:
    """``owner``'s prefix announced by its node and learned by ``learner``."""
    a = owner.allocation
    if owner.kind is not Kind.POD or a is None or a.node is None or learner is None:
        return []
    node = a.node
    prefix = ipaddress.ip_network(a.ip) if a.borrowed else a.block
    name = f"{tag}{node} announces {prefix}"
    if node == learner:
        return [Hop(Layer.ANNOUNCEMENT, f"{tag}{prefix}", State.SKIPPED,
                    f"both ends on {node}: no BGP on this path", {"node": node})]  # fmt: skip
    pool = snap.pool_of(prefix)
    ev: dict[str, Any] = {"node": node, "prefix": str(prefix), "pool": pool.name if pool else None}
    if pool is not None and pool.disable_bgp_export:
        return [Hop(Layer.ANNOUNCEMENT, name, State.BLOCKED,
                    f"IP pool {pool.name} has disableBGPExport: {node} does not announce "
                    f"{prefix}, so {learner} has no route to it", ev,
                    f"set disableBGPExport: false on IPPool {pool.name} (`fabricctl get ippool "
                    f"{pool.name} -o yaml`, edit, `fabricctl apply -f`)")]  # fmt: skip
    st = snap.statuses.get(node)
    announced = [str(x) for x in (st or {}).get("announcements") or ()]
    up, down = _sessions(st)
    ev.update(announced=str(prefix) in announced, established=up, notEstablished=down)
    if str(prefix) not in announced:
        return [Hop(Layer.ANNOUNCEMENT, name, State.BLOCKED,
                    f"{node} does not announce {prefix} (it announces "
                    f"{', '.join(announced) or 'nothing'})", ev,
                    f"see `fabricctl bgp status --node {node}` and fabricd's log on {node}")]  # fmt: skip
    if not up:
        return [Hop(Layer.ANNOUNCEMENT, name, State.BLOCKED,
                    f"{node} announces {prefix} but has no established BGP session "
                    f"({'; '.join(down) or 'no sessions planned'})", ev,
                    f"`fabricctl bgp status --node {node}`; check its BGPPeers (`fabricctl peer "
                    f"list`) and the router's side of each session")]  # fmt: skip
    hops = [Hop(Layer.ANNOUNCEMENT, name, State.OK,
                f"announced; {len(up)} session(s) established: {', '.join(up)}", ev)]  # fmt: skip
    hops.append(_learned(snap, learner, prefix, owner.ip, tag))
    return hops


def _learned(snap: Snapshot, learner: str, prefix: Any, ip: Any, tag: str) -> Hop:
    st = snap.statuses.get(learner)
    items, truncated = _items(st, "learned")
    got = _lpm(items, ip)
    name = f"{tag}{learner} learned {prefix}"
    up, down = _sessions(st)
    ev: dict[str, Any] = {"node": learner, "learned": dict(got) if got else None,
                          "established": up, "notEstablished": down}  # fmt: skip
    if got is not None:
        return Hop(Layer.ANNOUNCEMENT, name, State.OK,
                   f"{learner} learned {got.get('dst')} via {', '.join(got.get('via') or ())}", ev)  # fmt: skip
    if truncated:
        return Hop(Layer.ANNOUNCEMENT, name, State.UNKNOWN,
                   f"not in {learner}'s published list (truncated); use --live on {learner}", ev)  # fmt: skip
    why = (f"its own sessions are down ({'; '.join(down)})" if not up and down else
           "the routers between them did not pass it on")  # fmt: skip
    return Hop(Layer.ANNOUNCEMENT, name, State.BLOCKED,
               f"{learner} has not learned {prefix}: {why}", ev,
               f"`fabricctl bgp status --node {learner}`; look for {prefix} in the top-of-rack "
               "routers' BGP tables")  # fmt: skip


# ------------------------------------------------------------------------ forwarding


def _forwarding(snap: Snapshot, src: Endpoint, dst: Endpoint, live: Live | None) -> list[Hop]:
    hops: list[Hop] = []
    if src.node is not None and dst.ip is not None:
        hops.append(_route(snap, src.node, dst, live, ""))
        if hops[-1].state is State.BLOCKED:
            return hops
    if dst.kind is Kind.POD and dst.node is not None and dst.node != src.node:
        hops.append(_host_route(snap, dst, live))
        if hops[-1].state is State.BLOCKED:
            return hops
    if dst.node is not None and src.ip is not None and src.node != dst.node:
        hops.append(_route(snap, dst.node, src, live, "return: "))
    return hops


def _live_route(live: Live | None, node: str, ip: IPAddress) -> Mapping[str, Any] | None:
    if live is None or live.node != node:
        return None
    return live.routes.get(str(ip))


def _route(snap: Snapshot, node: str, to: Endpoint, live: Live | None, tag: str) -> Hop:
    """``node``'s route to ``to`` (fabricd's table; the kernel's with --live there)."""
    assert to.ip is not None
    name = f"{tag}{node} -> {to.ip}"
    kernel = _live_route(live, node, to.ip)
    if to.kind is Kind.NODE:
        return _underlay(name, node, to, kernel)
    if to.node == node:
        return _host_route(snap, to, live, tag)
    items, truncated = _items(snap.statuses.get(node), "routes")
    got = _lpm(items, to.ip)
    ev: dict[str, Any] = {"node": node, "installed": dict(got) if got else None,
                          "kernel": dict(kernel) if kernel else None}  # fmt: skip
    if got is None and not truncated:
        return Hop(Layer.FORWARDING, name, State.BLOCKED,
                   f"fabricd on {node} installed no route to {to.ip}", ev,
                   f"see fabricd's log on {node}; `fabricctl routes --node {node}`")  # fmt: skip
    if got is not None and got.get("type") == "blackhole":
        return Hop(Layer.FORWARDING, name, State.BLOCKED,
                   f"{node} blackholes {got.get('dst')} (its own block): {to.ip} is no pod there",
                   ev, f"`fabricctl ipam show --ip {to.ip}`")  # fmt: skip
    if kernel is not None and live is not None:
        return _kernel_check(name, node, to.ip, got, kernel, live, ev)
    if got is None:
        return Hop(Layer.FORWARDING, name, State.UNKNOWN,
                   f"not in {node}'s published route list (truncated); use --live on {node}", ev)  # fmt: skip
    how = f"via {', '.join(got.get('via') or ())}" if got.get("via") else f"dev {got.get('dev')}"
    return Hop(Layer.FORWARDING, name, State.OK,
               f"{node} routes {got.get('dst')} {how} (fabricd's table)", ev)  # fmt: skip


def _kernel_check(name: str, node: str, ip: IPAddress, want: Mapping[str, Any] | None,
                  kernel: Mapping[str, Any], live: Live, ev: dict[str, Any]) -> Hop:  # fmt: skip
    ktype, kprefix, kproto = kernel.get("type"), kernel.get("prefix"), kernel.get("protocol")
    kvia = list(kernel.get("gateways") or ()) or [f"dev {d}" for d in kernel.get("devices") or ()]
    ours = ktype == "unicast" and kproto == live.protocol
    if ours and (want is None or kprefix == want.get("dst")):
        return Hop(Layer.FORWARDING, name, State.OK,
                   f"the kernel on {node} routes {kprefix} via {', '.join(kvia)} (fabricd's "
                   f"route, protocol {kproto}; live lookup)", ev)  # fmt: skip
    seen = (f"{ktype} {kprefix or ''} protocol {kproto} via {', '.join(kvia)}"
            if ktype == "unicast" else str(ktype))  # fmt: skip
    expected = f"fabricd's route {want.get('dst')}" if want else "a route of fabricd's"
    return Hop(Layer.FORWARDING, name, State.BLOCKED,
               f"the kernel on {node} routes {ip} by {seen}, not by {expected} (in fabricd's "
               "table, so removed or replaced behind its back)", ev,
               f"{RESYNC_HINT}; find what changes routes of protocol {live.protocol} on {node}")  # fmt: skip


def _underlay(name: str, node: str, to: Endpoint, kernel: Mapping[str, Any] | None) -> Hop:
    ev: dict[str, Any] = {"node": node, "kernel": dict(kernel) if kernel else None}
    if kernel is None:
        return Hop(Layer.FORWARDING, name, State.SKIPPED,
                   f"{to.ip} is a node address (the underlay, not routed by fabricd); "
                   f"--live on {node} checks the kernel's route", ev)  # fmt: skip
    if kernel.get("type") in ("unicast", "local"):
        via = list(kernel.get("gateways") or ()) or list(kernel.get("devices") or ())
        return Hop(Layer.FORWARDING, name, State.OK,
                   f"the kernel on {node} routes it by {kernel.get('prefix')} via "
                   f"{', '.join(via)} (live lookup)", ev)  # fmt: skip
    return Hop(Layer.FORWARDING, name, State.BLOCKED,
               f"the kernel on {node} has no usable route to {to.ip} ({kernel.get('type')})", ev,
               f"check {node}'s underlay routes (`ip route get {to.ip}`)")  # fmt: skip


def _host_route(snap: Snapshot, pod: Endpoint, live: Live | None, tag: str = "") -> Hop:
    """The pod's node routes its /32 to the pod's veth."""
    assert pod.ip is not None and pod.node is not None
    node, ip = pod.node, pod.ip
    name = f"{tag}{node} -> {ip} (host route)"
    items, truncated = _items(snap.statuses.get(node), "routes")
    host = f"{ip}/{ip.max_prefixlen}"
    got = next((i for i in items if i.get("dst") == host), None)
    kernel = _live_route(live, node, ip)
    ev: dict[str, Any] = {"node": node, "installed": dict(got) if got else None,
                          "kernel": dict(kernel) if kernel else None}  # fmt: skip
    if kernel is not None and live is not None:
        devs = list(kernel.get("devices") or ())
        if kernel.get("prefix") == host and kernel.get("protocol") == live.protocol and devs:
            return Hop(Layer.FORWARDING, name, State.OK,
                       f"the kernel on {node} routes {host} to dev {', '.join(devs)} (live "
                       "lookup)", ev)  # fmt: skip
        return Hop(Layer.FORWARDING, name, State.BLOCKED,
                   f"the kernel on {node} has no host route {host} to the pod's veth (it "
                   f"answers {kernel.get('type')} {kernel.get('prefix') or ''})", ev,
                   f"{RESYNC_HINT}; if fabricd lacks it too, the pod's attachment is gone: "
                   "its runtime's CNI CHECK, or DEL and ADD")  # fmt: skip
    if got is not None and got.get("dev"):
        return Hop(Layer.FORWARDING, name, State.OK,
                   f"{node} routes {host} to dev {got.get('dev')} (the pod's veth)", ev)  # fmt: skip
    if truncated:
        return Hop(Layer.FORWARDING, name, State.UNKNOWN,
                   f"not in {node}'s published route list (truncated); use --live on {node}", ev)  # fmt: skip
    return Hop(Layer.FORWARDING, name, State.BLOCKED,
               f"{node} has no host route {host} to a pod veth: the pod's attachment is gone "
               "or its ADD did not finish", ev,
               "the runtime's CNI CHECK for the pod, or DEL and ADD again")  # fmt: skip


__all__ = ["Hop", "Layer", "Live", "PolicyCheck", "Report", "State", "walk"]
