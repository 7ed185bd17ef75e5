"""verdict() and trace(): what the compiled rules do to one probe ``src -> dst port/proto``.

verdict() evaluates a ``Compiled`` exactly as the dataplane reads it (fabric.policy.model):
the same rules, the same sets and their elements; it is not a second implementation of
NetworkPolicy semantics. It adds the three things the renderer adds outside the rules: a
pod reaching itself, the node reaching its own pods, and (not modelled: it is about
connections, not probes) replies of accepted connections.

A connection needs both verdicts: egress at the source (if the source is an endpoint of the
Compiled) and ingress at the destination. trace() compiles the inputs for every endpoint,
takes the verdict, and adds why each policy did or did not select the two endpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address

from fabric.policy import selectors
from fabric.policy.compiler import compile as compile_policies
from fabric.policy.model import (
    Compiled,
    Direction,
    DirectionRules,
    Endpoint,
    EndpointRules,
    IPAddress,
    Protocol,
    Rule,
    SetSpec,
)
from fabric.resources.policy_model import Namespace, NetworkPolicy

HOST = "host"  # as src: the node the destination pod runs on (kubelet probes)


class ProbeError(ValueError):
    """A probe that cannot be evaluated: unknown endpoint, no address of the family."""


@dataclass(frozen=True, slots=True)
class RuleCheck:
    rule: Rule
    peer_ok: bool
    port_ok: bool
    peer: str  # why the peer did or did not match
    port: str  # why the port did or did not match

    @property
    def matched(self) -> bool:
        return self.peer_ok and self.port_ok

    @property
    def label(self) -> str:
        return f"{self.rule.policy} {str(self.rule.direction).lower()}[{self.rule.index}]"


@dataclass(frozen=True, slots=True)
class DirectionVerdict:
    direction: Direction
    endpoint: str | None  # where it was evaluated; None: not an endpoint of the Compiled
    allowed: bool
    isolated: bool
    policies: tuple[str, ...]  # the selecting policies (isolated only)
    rule: Rule | None  # the first rule that allows it
    reason: str
    checks: tuple[RuleCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    src: str
    dst: str
    saddr: IPAddress | None  # None: the node itself
    daddr: IPAddress
    port: int
    protocol: Protocol
    allowed: bool
    egress: DirectionVerdict
    ingress: DirectionVerdict
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """Why one policy does or does not take part in one direction of a probe."""

    policy: str
    direction: Direction
    endpoint: str
    selected: bool
    why: str
    rules: tuple[RuleCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class Trace:
    verdict: Verdict
    policies: tuple[PolicyCheck, ...]


# sets and rules --------------------------------------------------------------------------------


def in_set(spec: SetSpec, addr: IPAddress) -> bool:
    if spec.kind in ("addr4", "addr6"):
        return addr in spec.elements
    if spec.kind in ("net4", "net6"):
        return any(addr.version == n.version and addr in n for n in spec.elements  # type: ignore[union-attr,operator]
                   )  # fmt: skip
    return False


def check_rule(rule: Rule, sets: Mapping[str, SetSpec], peer: IPAddress | None,
               daddr: IPAddress, protocol: Protocol, port: int) -> RuleCheck:  # fmt: skip
    """Does ``rule`` match a packet whose peer is ``peer`` (None: not an address any set
    can hold) to ``daddr`` ``port``/``protocol``? With the reasons, for people."""
    if rule.peer_sets is None:
        peer_ok, peer_why = True, "any peer"
    else:
        hits = [sets[n] for n in rule.peer_sets if peer is not None and in_set(sets[n], peer)]
        peer_ok = bool(hits)
        if hits:
            peer_why = f"{peer} is in {hits[0].origin}"
        else:
            origins = "; ".join(dict.fromkeys(sets[n].origin for n in rule.peer_sets))
            peer_why = f"{peer} is not in {origins or 'any peer set'}"
    want = f"{port}/{protocol}"
    if rule.ports is None:
        port_ok, port_why = True, "all ports"
    else:
        hit = next((m for m in rule.ports if m.matches(protocol, port)), None)
        named = next((sets[n] for n in rule.named_port_sets
                      if (daddr, protocol, port) in sets[n].elements), None)  # fmt: skip
        port_ok = hit is not None or named is not None
        listed = [_port_text(m.protocol, m.port, m.end_port) for m in rule.ports]
        listed += [sets[n].origin + f" (IPv{sets[n].kind[-1]})" for n in rule.named_port_sets]
        if named is not None:
            port_why = f"{want} on {daddr} is {named.origin}"
        elif hit is not None:
            port_why = f"{want} matches {_port_text(hit.protocol, hit.port, hit.end_port)}"
        else:
            port_why = f"{want} is not in [{', '.join(listed) or 'no port resolved'}]"
    return RuleCheck(rule, peer_ok, port_ok, peer_why, port_why)


def _port_text(protocol: Protocol, port: int | None, end: int | None) -> str:
    if port is None:
        return f"all/{protocol}"
    return f"{port}-{end}/{protocol}" if end is not None and end != port else f"{port}/{protocol}"


def _direction(er: EndpointRules | None, rules: DirectionRules | None, direction: Direction,
               sets: Mapping[str, SetSpec], peer: IPAddress | None, peer_name: str,
               daddr: IPAddress, protocol: Protocol, port: int) -> DirectionVerdict:  # fmt: skip
    if er is None:
        return DirectionVerdict(direction, None, True, False, (), None,
                                f"{peer_name if direction is Direction.INGRESS else 'source'} "
                                "is not a pod here: no policy applies")  # fmt: skip
    if rules is None:
        return DirectionVerdict(direction, er.key, True, False, (), None,
                                f"{er.key} is not isolated for {direction}: no policy with "
                                f"{direction} selects it")  # fmt: skip
    checks = tuple(check_rule(r, sets, peer, daddr, protocol, port) for r in rules.rules)
    first = next((c for c in checks if c.matched), None)
    pols = ", ".join(rules.policies)
    if first is not None:
        return DirectionVerdict(direction, er.key, True, True, rules.policies, first.rule,
                                f"allowed by {first.label} (selected by {pols})", checks)  # fmt: skip
    way = "from" if direction is Direction.INGRESS else "to"
    return DirectionVerdict(direction, er.key, False, True, rules.policies, None,
                            f"denied: selected by {pols}; no rule allows {port}/{protocol} "
                            f"{way} {peer_name}", checks)  # fmt: skip


# the probe ------------------------------------------------------------------------------------


def _resolve(
    compiled: Compiled, who: str | IPAddress
) -> tuple[EndpointRules | None, IPAddress | None]:
    if isinstance(who, str) and who != HOST:
        er = compiled.endpoints.get(who)
        if er is not None:
            return er, None
        try:
            who = ip_address(who)
        except ValueError:
            raise ProbeError(
                f"{who!r} is neither a known pod (NAMESPACE/NAME) nor an IP address"
            ) from None
    if isinstance(who, str):
        return None, None
    return next((er for er in compiled.endpoints.values() if who in er.ips), None), who


def _pick(er: EndpointRules | None, addr: IPAddress | None, version: int | None,
          who: str) -> IPAddress:  # fmt: skip
    if addr is not None:
        return addr
    assert er is not None
    for ip in er.ips:
        if version is None or ip.version == version:
            return ip
    raise ProbeError(f"{who} has no IPv{version} address" if version else f"{who} has no address")


def verdict(compiled: Compiled, src: str | IPAddress, dst: str | IPAddress, port: int,
            protocol: Protocol) -> Verdict:  # fmt: skip
    """The egress verdict at ``src`` and the ingress verdict at ``dst`` for a new connection
    ``src -> dst:port/protocol``. ``src``/``dst``: ``"ns/name"`` or an address; ``src`` may
    be ``HOST`` (the destination's own node). ProbeError when they cannot be resolved."""
    s_er, s_addr = _resolve(compiled, src)
    d_er, d_addr = _resolve(compiled, dst)
    if d_er is None and d_addr is None:
        raise ProbeError("the destination must be a pod or an address, not the host")
    version = (d_addr.version if d_addr is not None else s_addr.version if s_addr is not None
               else _common_version(s_er, d_er))  # fmt: skip
    daddr = _pick(d_er, d_addr, version, str(dst))
    saddr = None if src == HOST else _pick(s_er, s_addr, daddr.version, str(src))
    s_name, d_name = (s_er.key if s_er else str(src)), (d_er.key if d_er else str(daddr))
    if (s_er is not None and s_er is d_er) or (saddr is not None and d_er and saddr in d_er.ips):
        why = f"{d_name} reaching itself is always allowed"
        ok = DirectionVerdict(Direction.EGRESS, s_name, True, False, (), None, why)
        return Verdict(s_name, d_name, saddr, daddr, port, protocol, True, ok,
                       DirectionVerdict(Direction.INGRESS, d_name, True, False, (), None, why),
                       f"allowed: {why}")  # fmt: skip
    sets = compiled.sets
    if src == HOST:
        why = "traffic from the node to its own pods is always allowed"
        egress = DirectionVerdict(Direction.EGRESS, None, True, False, (), None, why)
        ingress = DirectionVerdict(Direction.INGRESS, d_name, True, False, (), None, why)
    else:
        egress = _direction(s_er, s_er.egress if s_er else None, Direction.EGRESS, sets, daddr,
                            d_name, daddr, protocol, port)  # fmt: skip
        ingress = _direction(d_er, d_er.ingress if d_er else None, Direction.INGRESS, sets,
                             saddr, s_name, daddr, protocol, port)  # fmt: skip
    allowed = egress.allowed and ingress.allowed
    if src == HOST:
        reason = f"allowed: {egress.reason}"
    elif allowed:
        reason = f"allowed: egress {_short(egress)}; ingress {_short(ingress)}"
    else:
        reason = "; ".join(f"{d.reason} ({d.direction.lower()} at {d.endpoint})"
                           for d in (egress, ingress) if not d.allowed)  # fmt: skip
    return Verdict(s_name, d_name, saddr, daddr, port, protocol, allowed, egress, ingress, reason)


def _short(d: DirectionVerdict) -> str:
    if d.rule is not None:
        return f"by {d.rule.policy} {str(d.direction).lower()}[{d.rule.index}]"
    return "not isolated" if d.endpoint else "not a pod"


def _common_version(a: EndpointRules | None, b: EndpointRules | None) -> int | None:
    va = {ip.version for ip in a.ips} if a else {4, 6}
    vb = {ip.version for ip in b.ips} if b else {4, 6}
    both = sorted(va & vb)
    if not both:
        raise ProbeError("source and destination have no address family in common")
    return both[0]


def trace(policies: Iterable[NetworkPolicy], namespaces: Iterable[Namespace],
          endpoints: Iterable[Endpoint], src: str | IPAddress, dst: str | IPAddress,
          port: int, protocol: Protocol) -> Trace:  # fmt: skip
    """verdict() on every endpoint's compiled rules, plus why each policy does or does not
    select the source (egress) and the destination (ingress)."""
    pols = sorted(policies, key=lambda p: p.key)
    eps = list(endpoints)
    probe = {_key_of(eps, src), _key_of(eps, dst)}  # only these two need rules
    compiled = compile_policies(pols, namespaces, eps, None, only=probe)
    v = verdict(compiled, src, dst, port, protocol)
    by_key = {e.key: e for e in eps}
    checks: list[PolicyCheck] = []
    for d, dv in ((Direction.EGRESS, v.egress), (Direction.INGRESS, v.ingress)):
        ep = by_key.get(dv.endpoint or "")
        if ep is None:
            continue
        for p in pols:
            checks.append(_policy_check(p, d, ep, dv))
    return Trace(v, tuple(checks))


def _key_of(eps: list[Endpoint], who: str | IPAddress) -> str:
    """The endpoint key ``who`` names (a key, or an address of an endpoint), else itself."""
    addr: IPAddress
    if isinstance(who, str):
        if "/" in who or who == HOST:
            return who
        try:
            addr = ip_address(who)
        except ValueError:
            return who
    else:
        addr = who
    return next((e.key for e in eps if addr in e.ips), str(addr))


def _policy_check(
    p: NetworkPolicy, d: Direction, ep: Endpoint, dv: DirectionVerdict
) -> PolicyCheck:
    if p.namespace != ep.namespace:
        return PolicyCheck(
            p.key, d, ep.key, False, f"in namespace {p.namespace}, not {ep.namespace}"
        )
    if not selectors.matches(p.pod_selector, ep.labels):
        labels = ",".join(f"{k}={v}" for k, v in sorted(ep.labels.items()))
        return PolicyCheck(p.key, d, ep.key, False,
                           f"podSelector {selectors.describe(p.pod_selector)} does not match "
                           f"{ep.key} {{{labels}}}")  # fmt: skip
    if d not in p.policy_types:
        types = ", ".join(p.policy_types)
        return PolicyCheck(p.key, d, ep.key, False, f"policyTypes [{types}] has no {d}")
    rules = tuple(c for c in dv.checks if c.rule.policy == p.key)
    if not rules:
        why = f"selects {ep.key} and has no {d.lower()} rules: allows nothing"
    elif any(c.matched for c in rules):
        why = f"selects {ep.key}; {next(c for c in rules if c.matched).label} allows it"
    else:
        why = f"selects {ep.key}; none of its {len(rules)} {d.lower()} rules allows it"
    return PolicyCheck(p.key, d, ep.key, True, why, rules)
