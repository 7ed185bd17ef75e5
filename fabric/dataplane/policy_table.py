"""NetworkPolicy in the kernel: table ``inet fabric_filter``, fabricd's own and nobody else's.

``render(compiled)`` turns the compiled model (fabric.policy.model, pure data) into the
table fabricd wants (``Desired``: sets, maps and chains); ``PolicyTable`` makes the kernel
hold exactly that, writing only the difference, in one ``nft -f`` transaction per call:

    chain forward   (hook forward, priority filter, policy accept)
        ct state established,related accept           (cutEstablished: replies + related)
        iifname . oifname @hairpin accept             a pod reaching itself via the host
        iifname "fab*" iifname != @pods drop          unknown pod interface: fail closed
        oifname "fab*" oifname != @pods drop
        iifname vmap @from_pod                        egress: jump out_<h> | continue
        oifname vmap @to_pod                          ingress: jump in_<h> | accept
    chain in_<h> / out_<h>   (one per distinct rule list; h = digest of that list)
        ct state invalid drop
        <one rule per (peer set x protocol) of each policy rule, counter, comment>  accept|return
        counter goto deny_in|deny_out                 default deny (logged: policy_log)

Host-originated traffic to local pods (kubelet probes) takes OUTPUT, never this chain.
Chains are content-addressed: an endpoint whose policies change points its map element at
another chain, so a pod ADD, DEL or label change writes set and map elements only. Every
rule's comment is ``<policy> <direction>[<index>] #<id>`` (id: digest of label and text),
by which a chain read back from the kernel is compared, and per-rule counters are read.
Invariants and error taxonomy: docs/design/policy.md, "Dataplane".

Imports only fabric.dataplane and the pure data contract fabric.policy.model.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import weakref
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from fabric.dataplane import policy_log
from fabric.dataplane.netlink.core import NetlinkError
from fabric.dataplane.netlink.nft_elements import ElementSocket, element_ops
from fabric.dataplane.nft import (
    ChainDef,
    Hook,
    Nft,
    NftError,
    RuleDef,
    SetDef,
    check_name,
    quote,
)
from fabric.dataplane.policy_counters import RuleCounter, counters
from fabric.dataplane.policy_diff import BASE, TABLE, Change, Desired, Held, diff, held_from
from fabric.policy.model import (
    Compiled,
    DirectionRules,
    PortMatch,
    Protocol,
    Rule,
    SetSpec,
)

__all__ = [  # the diff (fabric.dataplane.policy_diff) is re-exported: one API, as before
    "BASE", "FROM_POD", "HAIRPIN", "OWN_NAMES", "PODS", "POD_IFACES", "TABLE", "TO_POD",
    "Change", "Desired", "Held", "PolicyTable", "RuleCounter", "counters", "diff",
    "endpoint_chain", "held_from", "render", "set_name",
]  # fmt: skip
log = logging.getLogger("fabric.dataplane.policy_table")
IDLE_CHAINS = 64  # unused endpoint chains kept for pods coming back (PolicyTable._with_idle)
_SET_REF = re.compile(r"@(\w+)")
_EXPR_SET_REF = re.compile(r'"@(\w+)"')  # a set lookup in nft -j's expressions


@functools.lru_cache(maxsize=1 << 12)
def _set_refs(chain: ChainDef) -> frozenset[str]:
    """The sets a chain's rules name (``@name``). Memoised: endpoint chains are built once."""
    return frozenset(m for r in chain.rules for m in _SET_REF.findall(r.text))


TO_POD, FROM_POD, PODS, HAIRPIN = "to_pod", "from_pod", "pods", "hairpin"
OWN_NAMES = frozenset({BASE, TO_POD, FROM_POD, PODS, HAIRPIN}) | policy_log.OWN_NAMES
POD_IFACES = "fab*"  # fabric.dataplane.pods.host_ifname: every host-side pod veth
_TYPES = {
    "addr4": (("ipv4_addr",), ()),
    "addr6": (("ipv6_addr",), ()),
    "net4": (("ipv4_addr",), ("interval",)),
    "net6": (("ipv6_addr",), ("interval",)),
    "addrport4": (("ipv4_addr", "inet_proto", "inet_service"), ()),
    "addrport6": (("ipv6_addr", "inet_proto", "inet_service"), ()),
}


# ---------------------------------------------------------------------- rendering


def render(
    compiled: Compiled,
    cut_established: bool = False,
    aliases: Mapping[str, Iterable[str]] | None = None,
    log: policy_log.DeniedLog | None = None,
) -> Desired:
    """The table for ``compiled``. Pure. ``aliases``: more host interfaces of an endpoint
    (key -> ifnames: a pod attached to several networks), dispatched like its ``ifname``.
    ValueError for a set name nft cannot take or one that collides with the table's own.
    ``log``: the denied-traffic log (fabric.dataplane.policy_log; None: counted, not logged)."""
    sets: dict[str, SetDef] = {}
    for spec in compiled.sets.values():
        s = _set(spec)
        if s.name in OWN_NAMES or s.name in sets:
            raise ValueError(f"policy set name {spec.name!r} collides with another set")
        sets[s.name] = s
    chains: dict[str, ChainDef] = {BASE: _base(cut_established)}
    chains.update(policy_log.chains(log or policy_log.DeniedLog(group=None)))  # default deny
    sets.update(policy_log.sets())
    to_pod: set[str] = set()
    from_pod: set[str] = set()
    pods: set[str] = set()
    hairpin: set[str] = set()
    checked: set[int] = set()  # the (interned) set kinds already checked in this call
    for ep in compiled.endpoints.values():
        ifnames = [*([ep.ifname] if ep.ifname else []), *(aliases or {}).get(ep.key, ())]
        for rules, ingress, elements in ((ep.ingress, True, to_pod), (ep.egress, False, from_pod)):
            if rules is None:
                verdict = "accept" if ingress else "continue"
            else:
                chain = endpoint_chain(rules, ingress, compiled.sets, checked)
                chains.setdefault(chain.name, chain)
                verdict = f"jump {chain.name}"
            elements.update(f"{quote(i)} : {verdict}" for i in ifnames)
        for i in ifnames:
            pods.add(quote(i))
            hairpin.add(f"{quote(i)} . {quote(i)}")
    sets[PODS] = SetDef(PODS, ("ifname",), elements=frozenset(pods))
    sets[HAIRPIN] = SetDef(HAIRPIN, ("ifname", "ifname"), elements=frozenset(hairpin))
    sets[TO_POD] = SetDef(TO_POD, ("ifname",), map_to="verdict", elements=frozenset(to_pod))
    sets[FROM_POD] = SetDef(FROM_POD, ("ifname",), map_to="verdict",
                            elements=frozenset(from_pod))  # fmt: skip
    return Desired(sets, chains)


def _base(cut_established: bool) -> ChainDef:
    conntrack = (
        [RuleDef("ct direction reply accept", "replies"),
         RuleDef("ct state related accept", "related")]
        if cut_established
        else [RuleDef("ct state established,related accept", "established")]
    )  # fmt: skip
    p = quote(POD_IFACES)
    return ChainDef(BASE, (
        *conntrack,
        RuleDef(f"iifname . oifname @{HAIRPIN} accept", "pod to itself"),
        RuleDef(f"iifname {p} iifname != @{PODS} counter drop", "unknown pod interface egress"),
        RuleDef(f"oifname {p} oifname != @{PODS} counter drop", "unknown pod interface ingress"),
        RuleDef(f"iifname vmap @{FROM_POD}", "egress dispatch"),
        RuleDef(f"oifname vmap @{TO_POD}", "ingress dispatch"),
    ), Hook("forward"))  # fmt: skip


def endpoint_chain(
    rules: DirectionRules,
    ingress: bool,
    sets: Mapping[str, SetSpec],
    checked: set[int] | None = None,
) -> ChainDef:
    """The chain of one isolated direction: allowed packets ``accept`` (ingress, the last
    check) or ``return`` (egress: the destination's ingress is checked next); the rest drop.
    Memoised: every batch renders every endpoint, most of them unchanged (the same
    ``DirectionRules`` objects, found by identity before anything is hashed). ``checked``:
    the ids of the (interned) name -> kind tuples already found in ``sets`` by this caller
    with these ``sets``, so that endpoints naming the same sets are checked once."""
    seen = _by_identity.get((id(rules), ingress))
    if seen and seen[0] is rules:
        held = seen[1]
        if checked is not None and id(held) in checked:
            return seen[2]
        if all(n in sets and sets[n].kind == k for n, k in held):
            if checked is not None:
                checked.add(id(held))
            return seen[2]
    kinds: dict[str, str] = {}
    for rule in rules.rules:
        for name in (*(rule.peer_sets or ()), *rule.named_port_sets):
            spec = sets.get(name)
            if spec is None:
                raise ValueError(f"policy rule names set {name!r}, which the compiled model lacks")
            kinds[name] = spec.kind
    if len(_by_identity) >= 8192:
        _by_identity.clear()
        _kinds.clear()
    kinds_t = tuple(sorted(kinds.items()))
    kinds_t = _kinds.setdefault(kinds_t, kinds_t)  # interned: equal tuples, one id
    chain = _endpoint_chain(rules, ingress, kinds_t)
    _by_identity[(id(rules), ingress)] = (rules, kinds_t, chain)  # pins ``rules``: id unique
    if checked is not None:
        checked.add(id(kinds_t))  # found in ``sets`` just above
    return chain


_Kinds = tuple[tuple[str, str], ...]
_by_identity: dict[tuple[int, bool], tuple[DirectionRules, _Kinds, ChainDef]] = {}
_kinds: dict[_Kinds, _Kinds] = {}


@functools.lru_cache(maxsize=8192)
def _endpoint_chain(
    rules: DirectionRules, ingress: bool, kinds: tuple[tuple[str, str], ...]
) -> ChainDef:
    families = {name: 4 if kind.endswith("4") else 6 for name, kind in kinds}
    direction = "ingress" if ingress else "egress"
    verdict = "accept" if ingress else "return"
    out = [RuleDef("ct state invalid counter drop", f"invalid {direction}")]
    for rule in rules.rules:
        label = f"{rule.policy} {direction}[{rule.index}]"
        out += [RuleDef(f"{m}counter {verdict}", label) for m in _matches(rule, ingress, families)]
    out.append(
        RuleDef(f"counter goto {policy_log.deny_chain(ingress)}", f"default-deny {direction}")
    )
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(",".join(rules.policies).encode())  # one chain per policy set: deny counters
    for r in out:
        digest.update(f"{r.label}\0{r.text}\n".encode())
    return ChainDef(f"{'in' if ingress else 'out'}_{digest.hexdigest()[:16]}", tuple(out))


def _matches(rule: Rule, ingress: bool, families: Mapping[str, int]) -> list[str]:
    """The match parts (each ending in a space, or empty) whose OR is ``rule``."""
    side = "saddr" if ingress else "daddr"
    peers: list[tuple[int | None, str]] = [(None, "")]
    if rule.peer_sets is not None:
        peers = []
        for name in rule.peer_sets:
            family = families[name]
            peers.append((family, f"{'ip' if family == 4 else 'ip6'} {side} @{set_name(name)} "))
    out: list[str] = []
    ports = [""] if rule.ports is None else _ports(rule.ports)
    out += [peer + port for _, peer in peers for port in ports]
    for name in rule.named_port_sets:
        family = families[name]
        ip = "ip" if family == 4 else "ip6"
        out += [f"{peer}{ip} daddr . meta l4proto . th dport @{set_name(name)} "
                for f, peer in peers if f in (None, family)]  # fmt: skip
    return out


@functools.lru_cache(maxsize=1 << 14)
def set_name(name: str) -> str:
    """The nft name of compiled set ``name`` (nft names take no '-')."""
    return check_name(name.replace("-", "_"), "set")


def _ports(ports: Iterable[PortMatch]) -> list[str]:
    """One match per protocol: ``meta l4proto tcp [th dport 80 | { 80, 90-99 }] ``."""
    by_proto: dict[Protocol, list[tuple[int, int]] | None] = {}
    for pm in ports:
        have = by_proto.setdefault(pm.protocol, [])
        if pm.port is None or have is None:
            by_proto[pm.protocol] = None  # every port of the protocol
        else:
            have.append((pm.port, pm.end_port if pm.end_port is not None else pm.port))
    out = []
    for proto in sorted(by_proto):
        ranges = by_proto[proto]
        match = f"meta l4proto {proto.lower()} "
        if ranges is not None:
            items = [f"{a}" if a == b else f"{a}-{b}" for a, b in _merge(ranges)]
            match += f"th dport {items[0]} " if len(items) == 1 else \
                f"th dport {{ {', '.join(items)} }} "  # fmt: skip
        out.append(match)
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping and adjacent ranges joined (nft refuses overlapping intervals)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@functools.lru_cache(maxsize=1 << 12)
def _set(spec: SetSpec) -> SetDef:
    """Memoised: the incremental compiler hands unchanged sets back as the same objects, and
    the same SetDef lets ``diff`` see an unchanged set without comparing its elements."""
    types, flags = _TYPES[spec.kind]
    last = _last_set.get(spec.name)
    if last is not None and last[0].kind == spec.kind and spec.kind.startswith("addr"):
        # a set one endpoint joined or left: only the elements that differ are rendered
        # (addresses and address . proto . port: one text per element and back)
        old, had = last
        gone = {_element(e) for e in old.elements - spec.elements}
        elements = (had.elements - gone) | {_element(e) for e in spec.elements - old.elements}
    else:
        elements = frozenset(_element(e) for e in spec.elements)
    if len(_last_set) >= 1 << 13:
        _last_set.clear()
    out = SetDef(set_name(spec.name), types, flags, elements=elements)
    _last_set[spec.name] = (spec, out)
    return out


_last_set: dict[str, tuple[SetSpec, SetDef]] = {}  # the last rendering of each set name


@functools.lru_cache(maxsize=1 << 17)
def _element(e: object) -> str:
    if isinstance(e, tuple):
        addr, proto, port = e
        return f"{addr} . {str(proto).lower()} . {int(port)}"
    if isinstance(e, IPv4Network | IPv6Network):
        return str(e.network_address) if e.prefixlen == e.max_prefixlen else str(e)
    if isinstance(e, IPv4Address | IPv6Address):
        return str(e)
    raise ValueError(f"set element {e!r} is not an address, network or (address, proto, port)")


# ---------------------------------------------------------------------- the table


class PolicyTable:
    """The table in the kernel. Calls are serialised; ``apply`` diffs against what it last
    wrote (reading the kernel only after a failure), ``sync`` against the kernel."""

    def __init__(
        self, nft: Nft | None = None, table: str = TABLE, netlink: bool | None = None
    ) -> None:
        """``netlink``: element-only changes as raw nfnetlink batches (None: when nft runs
        in process; fabric.dataplane.netlink.nft_elements), the rest through ``nft``."""
        self.nft = nft or Nft()
        self.table = check_name(table, "table")
        self._netlink = self.nft.backend == "lib" if netlink is None else netlink
        self._sock: ElementSocket | None = None
        self.netlink_writes = 0  # transactions written as raw element batches
        self._held: Held | None = None  # what the kernel holds as far as we know
        self._known: dict[tuple[str, str], str] = {}  # (chain, rule id) -> verified exprs
        self._chains: dict[str, ChainDef] = {}  # the chains written (and idle ones)
        self._idle: dict[str, None] = {}  # the idle chains, the least recently used first
        self._lock = asyncio.Lock()
        self.last = Change()

    @property
    def programmed(self) -> bool:
        """The last call succeeded (the kernel holds what was asked)."""
        return self._held is not None

    async def apply(self, want: Desired) -> Change:
        """Make the kernel hold ``want``, writing the difference from what was last written
        (the kernel is read first when that is unknown). NftError: nothing was applied."""
        async with self._lock:
            if self._held is None:
                return await self._sync(want)
            have = self._held
            written = self._with_idle(want, have)
            return await self._write(diff(have, written, self.table), written, have)

    async def sync(self, want: Desired) -> Change:
        """Read the kernel's table and repair only what differs from ``want`` (all of it
        when the table is missing): start-up adoption and the periodic resync."""
        async with self._lock:
            return await self._sync(want)

    async def _sync(self, want: Desired) -> Change:
        self._held = None
        listing = await self.nft.list_table(self.table)
        if listing is None:
            self._known.clear()
            return await self._write(diff(None, want, self.table), want)
        for name, chain in listing.chains.items():
            for r in chain.rules:
                if r.id is not None:
                    self._known.setdefault((name, r.id), r.expr)
        held = held_from(listing, self._known)
        written = self._with_idle(want, held)
        return await self._write(diff(held, written, self.table), written, held)

    def _with_idle(self, want: Desired, have: Held) -> Desired:
        """``want`` keeping the endpoint chains ``have`` holds that it no longer uses (with
        the sets they name, as ``have`` holds them), the IDLE_CHAINS most recently used: an
        ADD after the DEL of the last pod with those rules then writes elements only.
        Unused, they match nothing: no map element jumps to them. After a restart (or a
        failure) the kernel's unused endpoint chains are taken as idle: adoption keeps them."""
        fresh = [n for n in self._chains if n not in want.chains and n not in self._idle]
        older = [n for n in have.chains if n not in self._chains and n not in self._idle]
        keep: list[str] = []
        extra: dict[str, SetDef] = {}
        for name in (*fresh, *reversed(self._idle), *sorted(older)):  # most recent first
            held = have.chains.get(name)
            if (len(keep) >= IDLE_CHAINS or held is None or name in want.chains
                    or not name.startswith(("in_", "out_")) or None in held[1]):  # fmt: skip
                continue  # deleted: too many, not held, not an endpoint chain, or edited
            names = self._refs(name, held[1])
            if names is not None and all(m in want.sets or m in have.sets for m in names):
                keep.append(name)
                extra.update((m, have.sets[m]) for m in names if m not in want.sets)
        if not keep:
            return want
        return Desired({**want.sets, **extra}, want.chains, tuple(keep))

    def _refs(self, chain: str, ids: tuple[str | None, ...]) -> frozenset[str] | None:
        """The sets chain ``chain`` names, from what was written or read of it; None when
        that is not known."""
        written = self._chains.get(chain)
        if written is not None and written.ids() == ids:
            return _set_refs(written)
        exprs = [self._known.get((chain, i)) for i in ids if i is not None]
        if any(e is None for e in exprs):
            return None
        return frozenset(m for e in exprs if e for m in _EXPR_SET_REF.findall(e))

    async def _write(self, change: Change, want: Desired, have: Held | None = None) -> Change:
        """Write ``change`` (``have`` -> ``want``)."""
        self._held = None
        raw = self._netlink and have is not None and not change.empty and change.elements_only
        ops = element_ops(have.sets, want.sets) if raw and have is not None else None
        if ops and (sock := self._socket()) is not None:
            try:  # the kernel runs it inside send(): sub-millisecond, on the event loop
                sock.write(self.table, ops)
            except NetlinkError as e:
                raise NftError(f"failed to program nft table {self.table}: {e}", str(e)) from e
            self.netlink_writes += 1
        elif not change.empty:
            await self.nft.run(["-f", "-"], change.script, what="program", table=self.table)
        self._held = Held.of(want, have)
        self._chains = {**{n: c for n, c in self._chains.items() if n in want.keep},
                        **want.chains}  # fmt: skip
        self._idle = dict.fromkeys(reversed(want.keep))  # the oldest first
        live = set(want.chains) | set(want.keep)
        self._known = {k: v for k, v in self._known.items() if k[0] in live}
        self.last = change
        return change

    async def remove(self) -> bool:
        """Delete the table (and nothing else). False when it was not there."""
        async with self._lock:
            self._held = None
            self._known.clear()
            self._chains, self._idle = {}, {}
            if not await self.nft.exists(self.table):
                return False
            await self.nft.run(["delete", "table", "inet", self.table], what="remove",
                               table=self.table)  # fmt: skip
            return True

    def _socket(self) -> ElementSocket | None:
        if self._sock is None:
            try:
                self._sock = ElementSocket(self.nft.netns)
                weakref.finalize(self, self._sock.close)  # closed with the table
            except NetlinkError as e:
                log.warning("policy table: writing elements with nft (%s)", e)
                self._netlink = False
        return self._sock

    async def counters(self) -> list[RuleCounter]:
        """Per-rule counters, summed per label over every chain; empty without the table."""
        listing = await self.nft.list_table(self.table)
        return counters(listing) if listing is not None else []
