"""compile(policies, namespaces, endpoints, local_node) -> Compiled: networking.k8s.io/v1
NetworkPolicy semantics turned into per-endpoint rules over named sets (fabric.policy.model
says how a Compiled is read).

Semantics, as the API defines them:
- a policy selects the pods of its own namespace that its podSelector matches; a pod is
  isolated in a direction iff some policy whose ``policyTypes`` has that direction selects it
  (policyTypes were defaulted by the codec: Ingress, plus Egress when egress rules exist);
- an isolated pod accepts what ANY rule of ANY selecting policy allows (the union);
- within a rule: peers are OR-ed, ports are OR-ed, peer AND port; absent/empty ``from``/``to``
  = every peer, absent/empty ``ports`` = every port and protocol;
- a selector peer: ``namespaceSelector`` AND ``podSelector`` in one peer; a missing
  namespaceSelector means the policy's own namespace, a missing podSelector every pod of the
  selected namespaces; an empty selector selects all;
- ``ipBlock``: cidr minus excepts, matched against addresses (pods included);
- a named port resolves on the destination pod, with the rule's protocol: for ingress on the
  local endpoint now (a name it lacks allows nothing), for egress per destination pod through
  an ``addr . proto . port`` set of every endpoint declaring that name;
- namespaces without an object still carry ``kubernetes.io/metadata.name``.

Set names are a hash of the set's definition (selector text and namespace scope, ipBlock,
port name and protocol) and family, so they survive element changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, collapse_addresses

from fabric.policy import selectors
from fabric.policy.model import (
    Compiled,
    Direction,
    DirectionRules,
    Endpoint,
    EndpointRules,
    IPNetwork,
    PortMatch,
    Protocol,
    Rule,
    SetElement,
    SetKind,
    SetSpec,
)
from fabric.resources.policy_model import (
    NAMESPACE_NAME_LABEL,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Peer,
    PolicyPort,
    PolicyRule,
)

NAME_HASH_LEN = 16  # hex digits of sha256 in a set name: 64 bits, names stay short for nft


def set_name(prefix: str, definition: str) -> str:
    digest = hashlib.sha256(definition.encode()).hexdigest()[:NAME_HASH_LEN]
    return f"{prefix}-{digest}"


def block_networks(block: IPBlock) -> list[IPNetwork]:
    """The ipBlock's cidr minus its excepts, as non-overlapping networks."""
    nets: list[IPNetwork] = [block.cidr]
    for ex in block.except_:
        nxt: list[IPNetwork] = []
        for n in nets:
            if n.overlaps(ex):
                if ex.subnet_of(n):  # type: ignore[arg-type]
                    nxt.extend(n.address_exclude(ex))  # type: ignore[arg-type]
                # else n lies inside ex: removed whole
            else:
                nxt.append(n)
        nets = nxt
    v4 = [n for n in nets if isinstance(n, IPv4Network)]
    v6 = [n for n in nets if isinstance(n, IPv6Network)]
    return [*collapse_addresses(v4), *collapse_addresses(v6)]


Contribution = Callable[[Endpoint], list[SetElement]]  # one endpoint's elements of a set


def _addrs(e: Endpoint, fam: int) -> list[SetElement]:
    return [ip for ip in e.ips if ip.version == fam]


def _pod_matches(sel: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    return sel is None or sel.empty or selectors.matches(sel, labels)


def _member_addrs(member: Callable[[Endpoint], bool], fam: int) -> Contribution:
    return lambda e: _addrs(e, fam) if member(e) else []


@dataclass(slots=True)
class EndpointIndex:
    """Endpoints by namespace and by label (key, value), each keyed by the object's id (so
    one endpoint object goes in and out in O(1); equal endpoints stay distinct, as in a
    list). The incremental compiler keeps one across batches and moves changed endpoints."""

    by_namespace: dict[str, dict[int, Endpoint]] = field(default_factory=dict)
    by_label: dict[tuple[str, str], dict[int, Endpoint]] = field(default_factory=dict)

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint]) -> EndpointIndex:
        out = cls()
        for e in endpoints:
            out.add(e)
        return out

    def add(self, e: Endpoint) -> None:
        self.by_namespace.setdefault(e.namespace, {})[id(e)] = e
        for kv in e.labels.items():
            self.by_label.setdefault(kv, {})[id(e)] = e

    def remove(self, e: Endpoint) -> None:
        self.by_namespace.get(e.namespace, {}).pop(id(e), None)
        for kv in e.labels.items():
            posting = self.by_label.get(kv)
            if posting is not None:
                posting.pop(id(e), None)
                if not posting:
                    del self.by_label[kv]


@dataclass(slots=True)
class _Builder:
    """One compile: the inputs indexed, and the sets named so far. ``contributions`` says,
    for each set whose elements come from endpoints, what one endpoint puts in it: the
    definition the incremental path (fabric.policy.incremental) re-evaluates per endpoint."""

    endpoints: list[Endpoint]
    ns_labels: Mapping[str, Mapping[str, str]]
    sets: dict[str, SetSpec]
    rules: dict[tuple[str, int, Direction], Rule]  # rules that do not depend on the target
    contributions: dict[str, Contribution] = field(default_factory=dict)
    index: EndpointIndex | None = None  # built on first use (or handed in: incremental)

    @property
    def by_namespace(self) -> dict[str, dict[int, Endpoint]]:
        if self.index is None:
            self.index = EndpointIndex.of(self.endpoints)
        return self.index.by_namespace

    @property
    def label_index(self) -> dict[tuple[str, str], dict[int, Endpoint]]:
        if self.index is None:
            self.index = EndpointIndex.of(self.endpoints)
        return self.index.by_label

    def namespace_labels(self, ns: str) -> Mapping[str, str]:
        return self.ns_labels.get(ns) or {NAMESPACE_NAME_LABEL: ns}

    # sets ------------------------------------------------------------------------------

    def _add(self, name: str, kind: SetKind, elements: Iterable[SetElement], origin: str,
             contribution: Contribution | None = None) -> str:  # fmt: skip
        if name not in self.sets:
            self.sets[name] = SetSpec(name, kind, frozenset(elements), origin)
            if contribution is not None:
                self.contributions[name] = contribution
        return name

    def peer_sets(self, policy: NetworkPolicy, peer: Peer) -> list[str]:
        if peer.ip_block is not None:
            b = peer.ip_block
            definition = f"ipblock {b.cidr} except {','.join(sorted(map(str, b.except_)))}"
            fam = b.cidr.version
            name = set_name(f"n{fam}", definition)
            if name not in self.sets:
                origin = f"ipBlock {b.cidr}" + (
                    f" except {', '.join(map(str, b.except_))}" if b.except_ else ""
                )
                kind: SetKind = "net4" if fam == 4 else "net6"
                self._add(name, kind, block_networks(b), origin)
            return [name]
        nsel, psel = peer.namespace_selector, peer.pod_selector
        scope = (f"namespace {policy.namespace}" if nsel is None
                 else f"namespaces {selectors.describe(nsel)}")  # fmt: skip
        definition = "pods " + (selectors.describe(psel) if psel is not None else "{}")
        definition += f" in {scope}"
        names = [set_name("s4", definition), set_name("s6", definition)]
        if names[0] in self.sets:
            return names
        if nsel is None:
            in_scope = {policy.namespace}
        else:
            in_scope = {ns for ns in self.by_namespace
                        if selectors.matches(nsel, self.namespace_labels(ns))}  # fmt: skip
        members = self.members(in_scope, psel)
        member = self.peer_member(policy.namespace, nsel, psel)
        for name, fam, kind in ((names[0], 4, "addr4"), (names[1], 6, "addr6")):
            ips = [ip for e in members for ip in _addrs(e, fam)]
            self._add(name, kind, ips, definition, _member_addrs(member, fam))
        return names

    def peer_member(self, policy_ns: str, nsel: LabelSelector | None,
                    psel: LabelSelector | None) -> Callable[[Endpoint], bool]:  # fmt: skip
        """Whether one endpoint is a member of the selector peer (what ``members`` finds)."""

        ns_labels = self.ns_labels  # not self: a held set must not keep the builder alive

        def member(e: Endpoint) -> bool:
            labels = ns_labels.get(e.namespace) or {NAMESPACE_NAME_LABEL: e.namespace}
            in_scope = e.namespace == policy_ns if nsel is None else selectors.matches(nsel, labels)
            return in_scope and _pod_matches(psel, e.labels)

        return member

    def members(self, namespaces: set[str], sel: LabelSelector | None) -> list[Endpoint]:
        """Endpoints of ``namespaces`` matched by ``sel`` (None/empty: all of them). With
        matchLabels, only the shortest posting list of the label index is scanned."""
        by_ns = self.by_namespace
        if sel is None or sel.empty:
            return [e for ns in sorted(namespaces) for e in by_ns.get(ns, {}).values()]
        if sel.match_labels:
            index = self.label_index
            candidates = min((index.get(kv, {}) for kv in sel.match_labels), key=len)
            return [e for e in candidates.values()
                    if e.namespace in namespaces and _pod_matches(sel, e.labels)]  # fmt: skip
        return [e for ns in sorted(namespaces) for e in by_ns.get(ns, {}).values()
                if _pod_matches(sel, e.labels)]  # fmt: skip

    def named_port_sets(self, name: str, protocol: Protocol) -> list[str]:
        definition = f"named port {name}/{protocol}"
        out = [set_name("p4", definition), set_name("p6", definition)]
        if out[0] in self.sets:
            return out
        for fam, kind in ((4, "addrport4"), (6, "addrport6")):

            def contribution(e: Endpoint, fam: int = fam) -> list[SetElement]:
                return [(ip, protocol, p.port) for p in e.ports
                        if p.name == name and p.protocol == protocol
                        for ip in e.ips if ip.version == fam]  # fmt: skip

            elems = [x for e in self.endpoints for x in contribution(e)]
            self._add(set_name(f"p{fam}", definition), kind, elems, definition, contribution)  # type: ignore[arg-type]
        return out

    # rules -----------------------------------------------------------------------------

    def rule(self, policy: NetworkPolicy, index: int, direction: Direction, r: PolicyRule,
             target: Endpoint) -> Rule:  # fmt: skip
        """The compiled rule; cached unless an ingress named port makes it per target."""
        key = (policy.key, index, direction)
        cached = self.rules.get(key)
        if cached is not None:
            return cached
        out = self._rule(policy, index, direction, r, target)
        if direction is Direction.EGRESS or all(not isinstance(p.port, str) for p in r.ports or ()):
            self.rules[key] = out
        return out

    def _rule(self, policy: NetworkPolicy, index: int, direction: Direction, r: PolicyRule,
              target: Endpoint) -> Rule:  # fmt: skip
        peer_sets = None
        if r.peers is not None:
            peer_sets = tuple(dict.fromkeys(n for p in r.peers for n in self.peer_sets(policy, p)))
        if r.ports is None:
            return Rule(policy.key, index, direction, peer_sets, None)
        matches: list[PortMatch] = []
        named: list[str] = []
        for pp in r.ports:
            matches += self.port_matches(pp, direction, target, named)
        return Rule(policy.key, index, direction, peer_sets, tuple(dict.fromkeys(matches)),
                    tuple(dict.fromkeys(named)))  # fmt: skip

    def port_matches(self, pp: PolicyPort, direction: Direction, target: Endpoint,
                     named: list[str]) -> list[PortMatch]:  # fmt: skip
        if pp.port is None:
            return [PortMatch(pp.protocol)]
        if isinstance(pp.port, int):
            return [PortMatch(pp.protocol, pp.port, pp.end_port)]
        if direction is Direction.INGRESS:  # resolved on the destination: the target itself
            return [PortMatch(pp.protocol, p.port) for p in target.ports
                    if p.name == pp.port and p.protocol == pp.protocol]  # fmt: skip
        named += self.named_port_sets(pp.port, pp.protocol)
        return []


def selects(policy: NetworkPolicy, endpoint: Endpoint) -> bool:
    return endpoint.namespace == policy.namespace and selectors.matches(
        policy.pod_selector, endpoint.labels
    )


def endpoint_rules(b: _Builder, pols_by_ns: Mapping[str, list[NetworkPolicy]],
                   e: Endpoint) -> EndpointRules:  # fmt: skip
    """The rules of one endpoint (its sets named into ``b``)."""
    dirs: dict[Direction, DirectionRules | None] = {}
    for d in (Direction.INGRESS, Direction.EGRESS):
        selecting = [p for p in pols_by_ns.get(e.namespace, ())
                     if d in p.policy_types and selects(p, e)]  # fmt: skip
        if not selecting:
            dirs[d] = None
            continue
        rules = tuple(b.rule(p, i, d, r, e) for p in selecting
                      for i, r in enumerate(p.ingress if d is Direction.INGRESS else p.egress))  # fmt: skip
        dirs[d] = DirectionRules(tuple(p.key for p in selecting), rules)
    return EndpointRules(e.key, e.ifname, e.ips, dirs[Direction.INGRESS], dirs[Direction.EGRESS])


def policies_by_namespace(policies: Iterable[NetworkPolicy]) -> dict[str, list[NetworkPolicy]]:
    out: dict[str, list[NetworkPolicy]] = {}
    for p in sorted(policies, key=lambda p: p.key):
        out.setdefault(p.namespace, []).append(p)
    return out


def compile(
    policies: Iterable[NetworkPolicy],
    namespaces: Iterable[Namespace],
    endpoints: Iterable[Endpoint],
    local_node: str | None,
    only: Collection[str] | None = None,
) -> Compiled:
    """Rules for every endpoint on ``local_node`` (every endpoint when None; of those, only
    the keys in ``only`` when given, as trace() does); every endpoint, local or remote,
    feeds the selector and named-port sets."""
    return compile_with(policies, namespaces, endpoints, local_node, only)[0]


def compile_with(
    policies: Iterable[NetworkPolicy],
    namespaces: Iterable[Namespace],
    endpoints: Iterable[Endpoint],
    local_node: str | None,
    only: Collection[str] | None = None,
) -> tuple[Compiled, _Builder]:
    """compile(), and the builder it used (its sets' contributions, for the incremental path)."""
    eps = sorted(endpoints, key=lambda e: e.key)
    pols_by_ns = policies_by_namespace(policies)
    b = _Builder(eps, {n.name: n.labels for n in namespaces}, {}, {})
    out: dict[str, EndpointRules] = {}
    for e in eps:
        if (local_node is not None and e.node != local_node) or (
            only is not None and e.key not in only
        ):
            continue
        out[e.key] = endpoint_rules(b, pols_by_ns, e)
    return Compiled(out, dict(sorted(b.sets.items()))), b
