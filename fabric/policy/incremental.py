"""compile() with memory, for fabricd's batches: when endpoints or policies changed since the
last call (the same namespace labels), only what the changes touch is recomputed; anything
else is a full compile (fabric.policy.compiler, the one definition of the semantics).

The delta path, for changed endpoints C (added, removed, or different in any field):
- each set held: the elements C's old versions contributed are taken out and those of their
  new versions put in, by the set's own contribution function from the compiler (so the
  membership test is the compiler's); an element another, unchanged endpoint still
  contributes (two endpoints sharing an address) stays;
- the local endpoints in C get their rules compiled (a set none held before is built over
  every endpoint, as compile() does); other local endpoints keep theirs (their rules depend
  only on the policies and the endpoint itself);
- a policy added, removed or changed (P): a policy selects pods of its own namespace only,
  so the local endpoints of P's namespaces get their rules compiled again, and no held set
  changes (a set's elements depend on endpoints and namespace labels, never on the policy
  naming it); a set P names that none held is built over every endpoint through an index
  by namespace and label kept across calls (``EndpointIndex``), not rebuilt per call;
- the sets are those the local endpoints' rules name, as in compile().

The result equals compile() of the same inputs (tests/test_policy_incremental.py checks it
over random sequences of changes). A delta over more than ``MAX_DELTA`` + 1/8 of the
endpoints, or any failure, falls back to the full compile.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from fabric.policy.compiler import (
    Contribution,
    EndpointIndex,
    _Builder,
    compile_with,
    endpoint_rules,
    policies_by_namespace,
)
from fabric.policy.model import Compiled, Endpoint, EndpointRules, IPAddress, SetElement, SetSpec
from fabric.resources.policy_model import Namespace, NetworkPolicy

MAX_DELTA = 64  # changed endpoints handled incrementally (plus 1/8 of all endpoints)


@dataclass(slots=True)
class _State:
    policies: tuple[NetworkPolicy, ...]
    by_key: dict[str, NetworkPolicy]
    ns_labels: dict[str, Mapping[str, str]]
    endpoints: dict[str, Endpoint]
    ids: dict[int, Endpoint]  # the last call's endpoint objects (held: their ids stay theirs)
    contributions: dict[str, Contribution]
    by_ip: dict[IPAddress, set[str]]  # address -> keys of the endpoints holding it
    compiled: Compiled
    index: EndpointIndex | None  # every endpoint by namespace and label (built on first use)
    listed: list[Endpoint]  # the last call's endpoints as given (unchanged: the same objects)
    pols_by_ns: dict[str, list[NetworkPolicy]]
    names: dict[str, frozenset[str]]  # local endpoint key -> the sets its rules name
    refs: dict[str, int]  # set name -> how many of ``names`` hold it


def _address(x: SetElement) -> IPAddress | None:
    """The endpoint address behind a set element (None for a network: ipBlock sets)."""
    if isinstance(x, tuple):
        return x[0]
    return x if isinstance(x, IPv4Address | IPv6Address) else None


class IncrementalCompiler:
    """``compile(policies, namespaces, endpoints)`` for ``local_node``, equal to
    fabric.policy.compiler.compile; ``full`` / ``deltas`` / ``fallbacks`` count how each call
    was done."""

    def __init__(self, local_node: str | None) -> None:
        self.local_node = local_node
        self.full = 0
        self.deltas = 0
        self.fallbacks = 0  # deltas that raised (a bug): redone in full
        self._state: _State | None = None
        self._sorted: tuple[tuple[NetworkPolicy, ...], tuple[NetworkPolicy, ...]] | None = None

    def compile(
        self,
        policies: Iterable[NetworkPolicy],
        namespaces: Iterable[Namespace],
        endpoints: Iterable[Endpoint],
    ) -> Compiled:
        if isinstance(policies, tuple) and self._sorted and self._sorted[0] is policies:
            pols = self._sorted[1]  # the same (immutable) input as last time: sorted already
        else:
            pols = tuple(sorted(policies, key=lambda p: p.key))
            if isinstance(policies, tuple):
                self._sorted = (policies, pols)
        ns_labels = {n.name: n.labels for n in namespaces}
        listed = list(endpoints)
        st = self._state
        if st is None or st.ns_labels != ns_labels:
            return self._full(pols, namespaces, listed, ns_labels)
        touched = _touched_namespaces(st, pols)
        if touched is None:  # duplicate policy keys: only compile() defines that
            return self._full(pols, namespaces, listed, ns_labels)
        # what changed, found by object identity (EndpointCache returns unchanged endpoints
        # as the same objects): only new objects' keys are looked at
        if len(listed) == len(st.listed) and all(map(operator.is_, listed, st.listed)):
            ids, added, removed = st.ids, [], []  # the same objects in the same order
        else:  # set algebra on ids (C loops), objects looked up for the few that differ
            ids = dict(zip(map(id, listed), listed, strict=True))
            if len(ids) != len(listed):
                return self._full(pols, namespaces, listed, ns_labels)
            added = [ids[i] for i in ids.keys() - st.ids.keys()]
            removed = [st.ids[i] for i in st.ids.keys() - ids.keys()]
        eps = dict(st.endpoints)
        for e in removed:
            if eps.get(k := e.key) is e:
                del eps[k]
        for e in added:
            if (k := e.key) in eps:  # not one endpoint per key: only compile() defines that
                return self._full(pols, namespaces, listed, ns_labels)
            eps[k] = e
        old = st.endpoints
        changed = [k for k in {e.key for e in (*added, *removed)}
                   if not ((a := old.get(k)) is (b := eps.get(k)) or a == b)]  # fmt: skip
        if not changed and not touched:
            st.endpoints, st.ids, st.listed = eps, ids, listed
            if st.policies != pols:  # equal, other objects: keep the new ones
                st.policies, st.by_key = pols, {p.key: p for p in pols}
            return st.compiled
        if len(changed) > MAX_DELTA + len(eps) // 8:
            return self._full(pols, namespaces, listed, ns_labels)
        try:
            return self._delta(st, pols, ns_labels, eps, ids, listed, sorted(changed), touched)
        except Exception:
            self.fallbacks += 1
            self._state = None  # half-updated indexes: the next call compiles in full
            return self._full(pols, namespaces, listed, ns_labels)

    def _full(self, pols: tuple[NetworkPolicy, ...], namespaces: Iterable[Namespace],
              eps: list[Endpoint], ns_labels: dict[str, Mapping[str, str]]) -> Compiled:  # fmt: skip
        self.full += 1
        self._state = None
        compiled, b = compile_with(pols, namespaces, eps, self.local_node)
        by_key = {e.key: e for e in eps}
        if len(by_key) == len(eps):
            by_ip: dict[IPAddress, set[str]] = {}
            for e in eps:
                for ip in e.ips:
                    by_ip.setdefault(ip, set()).add(e.key)
            self._state = _State(pols, {p.key: p for p in pols}, ns_labels, by_key,
                                 {id(e): e for e in eps}, b.contributions, by_ip, compiled,
                                 b.index, eps, policies_by_namespace(pols),
                                 *_refs({k: _names(er) for k, er in compiled.endpoints.items()}))  # fmt: skip
        return compiled

    def _delta(self, st: _State, pols: tuple[NetworkPolicy, ...],
               ns_labels: dict[str, Mapping[str, str]], eps: dict[str, Endpoint],
               ids: dict[int, Endpoint], listed: list[Endpoint], changed: list[str],
               touched: set[str]) -> Compiled:  # fmt: skip
        old = st.endpoints
        for k in changed:  # the address and label indexes follow the endpoints
            if (o := old.get(k)) is not None:
                for ip in o.ips:
                    st.by_ip.get(ip, set()).discard(k)
                if st.index is not None:
                    st.index.remove(o)
            if (n := eps.get(k)) is not None:
                for ip in n.ips:
                    st.by_ip.setdefault(ip, set()).add(k)
                if st.index is not None:
                    st.index.add(n)
        moved = set(changed)
        sets = dict(st.compiled.sets)
        for name, spec in st.compiled.sets.items():
            contribution = st.contributions.get(name)
            if contribution is None:  # ipBlock: no endpoint changes it
                continue
            gone: set[SetElement] = set()
            added: set[SetElement] = set()
            for k in changed:
                if (o := old.get(k)) is not None:
                    gone.update(contribution(o))
                if (n := eps.get(k)) is not None:
                    added.update(contribution(n))
            gone -= added
            gone = {x for x in gone if not any(
                x in contribution(eps[k]) for k in st.by_ip.get(_address(x), ())  # type: ignore[arg-type]
                if k not in moved)}  # fmt: skip
            if gone or not added <= spec.elements:
                sets[name] = SetSpec(name, spec.kind, (spec.elements - gone) | added, spec.origin)
        b = _Builder(list(eps.values()), ns_labels, sets, {}, index=st.index)
        pols_by_ns = st.pols_by_ns
        if touched:  # the other namespaces' lists stay as they are
            pols_by_ns = {ns: ps for ns, ps in pols_by_ns.items() if ns not in touched}
            pols_by_ns.update(policies_by_namespace(p for p in pols if p.namespace in touched))
        rules: dict[str, EndpointRules] = dict(st.compiled.endpoints)
        again = set(changed)  # local endpoints whose rules are compiled again
        if touched:
            again.update(
                k for k in rules if (e := eps.get(k)) is not None and e.namespace in touched
            )
        names, refs = dict(st.names), dict(st.refs)
        for k in sorted(again):
            rules.pop(k, None)
            for name in names.pop(k, ()):
                refs[name] -= 1
                if not refs[name]:
                    del refs[name]
            n = eps.get(k)
            if n is not None and (self.local_node is None or n.node == self.local_node):
                rules[k] = endpoint_rules(b, pols_by_ns, n)
                names[k] = _names(rules[k])
                for name in names[k]:
                    refs[name] = refs.get(name, 0) + 1
        named = refs.keys()
        compiled = Compiled(dict(sorted(rules.items())),
                            {name: b.sets[name] for name in sorted(named)})  # fmt: skip
        contributions = {**st.contributions, **b.contributions}
        by_key = {p.key: p for p in pols} if touched else st.by_key
        self._state = _State(pols, by_key, ns_labels, eps, ids,
                             {n: contributions[n] for n in named if n in contributions},
                             st.by_ip, compiled, b.index, listed, pols_by_ns, names, refs)  # fmt: skip
        self.deltas += 1
        return compiled


def _names(er: EndpointRules) -> frozenset[str]:
    """The sets ``er``'s rules name."""
    return frozenset(name for d in (er.ingress, er.egress) if d is not None for r in d.rules
                     for name in (*(r.peer_sets or ()), *r.named_port_sets))  # fmt: skip


def _refs(names: dict[str, frozenset[str]]) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    refs: dict[str, int] = {}
    for ns in names.values():
        for name in ns:
            refs[name] = refs.get(name, 0) + 1
    return names, refs


def _touched_namespaces(st: _State, pols: tuple[NetworkPolicy, ...]) -> set[str] | None:
    """The namespaces of the policies added, removed or changed since ``st`` (None when two
    policies share a key)."""
    if st.policies == pols:  # the same objects mostly: compared by identity first
        return set()
    by_key = {p.key: p for p in pols}
    if len(by_key) != len(pols):
        return None
    old = st.by_key
    return {(a or b).namespace for k in old.keys() | by_key.keys()  # type: ignore[union-attr]
            if not ((a := old.get(k)) is (b := by_key.get(k)) or a == b)}  # fmt: skip
