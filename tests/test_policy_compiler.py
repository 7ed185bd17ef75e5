"""The compiler and verdict() against a small reference evaluator written here, straight from
the networking.k8s.io/v1 API documentation, over the raw policy documents (hypothesis
generates namespaces, pods, policies and probes); plus targeted cases of each rule of the
semantics and of the compiled model's shape (set naming, locality)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.policy.compiler import compile as compile_policies
from fabric.policy.model import Endpoint, NamedPort, Protocol
from fabric.policy.verdict import HOST, trace, verdict
from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import Namespace, NetworkPolicy

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
KEYS = ("pod", "app", "tier")
VALUES = ("a", "b", "c")
PROTOS = ("TCP", "UDP", "SCTP")
PORT_NAMES = ("serve-80-tcp", "serve-81-udp", "web")


# the reference -------------------------------------------------------------------------------


@dataclass
class RefPod:
    ns: str
    name: str
    labels: dict[str, str]
    ports: list[tuple[str, int, str]]  # (name, number, protocol)
    ips: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]


def ref_selector(sel: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    sel = sel or {}
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        op, k, vals = e["operator"], e["key"], e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def ref_types(spec: Mapping[str, Any]) -> list[str]:
    if spec.get("policyTypes") is not None:
        return list(spec["policyTypes"])
    return ["Ingress"] + (["Egress"] if spec.get("egress") else [])


def ref_peer(pol_ns: str, peer: Mapping[str, Any], other: RefPod | None, addr: Any,
             ns_labels: Mapping[str, Mapping[str, str]]) -> bool:  # fmt: skip
    if "ipBlock" in peer:
        b = peer["ipBlock"]
        net = ipaddress.ip_network(b["cidr"], strict=False)
        if addr.version != net.version or addr not in net:
            return False
        return not any(addr in ipaddress.ip_network(e, strict=False) for e in b.get("except", []))
    if other is None:
        return False
    if "namespaceSelector" in peer:
        if not ref_selector(peer["namespaceSelector"], ns_labels[other.ns]):
            return False
    elif other.ns != pol_ns:
        return False
    return "podSelector" not in peer or ref_selector(peer["podSelector"], other.labels)


def ref_port(pp: Mapping[str, Any], dst: RefPod | None, port: int, proto: str) -> bool:
    if pp.get("protocol", "TCP") != proto:
        return False
    p = pp.get("port")
    if p is None:
        return True
    if isinstance(p, int):
        return p <= port <= pp.get("endPort", p)
    return dst is not None and any(n == p and num == port and pr == proto
                                   for n, num, pr in dst.ports)  # fmt: skip


def ref_direction(policies: list[dict[str, Any]], target: RefPod, direction: str,
                  other: RefPod | None, other_addr: Any, port: int, proto: str,
                  ns_labels: Mapping[str, Mapping[str, str]]) -> bool:  # fmt: skip
    selecting = [p for p in policies if p["metadata"]["namespace"] == target.ns
                 and ref_selector(p["spec"].get("podSelector"), target.labels)
                 and direction in ref_types(p["spec"])]  # fmt: skip
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    dst = target if direction == "Ingress" else other
    for p in selecting:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key) or []
            ports = rule.get("ports") or []
            peer_ok = not peers or any(
                ref_peer(p["metadata"]["namespace"], pe, other, other_addr, ns_labels)
                for pe in peers
            )
            if peer_ok and (not ports or any(ref_port(pp, dst, port, proto) for pp in ports)):
                return True
    return False


def ref_allowed(policies: list[dict[str, Any]], src: RefPod, dst: RefPod | None, daddr: Any,
                port: int, proto: str, ns_labels: Mapping[str, Mapping[str, str]]) -> bool:  # fmt: skip
    if dst is src:
        return True
    saddr = src.ips[daddr.version]
    out = ref_direction(policies, src, "Egress", dst, daddr, port, proto, ns_labels)
    if dst is not None:
        out = out and ref_direction(policies, dst, "Ingress", src, saddr, port, proto, ns_labels)
    return out


# generators ----------------------------------------------------------------------------------

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@st.composite
def selector_st(draw: st.DrawFn) -> dict[str, Any]:
    sel: dict[str, Any] = {}
    ml = draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1))
    if ml:
        sel["matchLabels"] = ml
    exprs = []
    for _ in range(draw(st.integers(0, 1))):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        e: dict[str, Any] = {"key": draw(st.sampled_from(KEYS)), "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=2))
        exprs.append(e)
    if exprs:
        sel["matchExpressions"] = exprs
    return sel


@st.composite
def ns_selector_st(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"matchLabels": {"kubernetes.io/metadata.name": draw(st.sampled_from(NAMESPACES))}}
    return draw(selector_st())


@st.composite
def peer_st(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
    if kind == "ip":
        v6 = draw(st.booleans())
        if v6:
            cidr, excepts = "fd00::/64", ["fd00::10/124", "fd00::20/126"]
        else:
            cidr, excepts = "10.0.0.0/24", ["10.0.0.16/28", "10.0.0.32/30"]
        block: dict[str, Any] = {"cidr": draw(st.sampled_from([cidr, cidr.replace("/24", "/27")
                                                               .replace("/64", "/123")]))}  # fmt: skip
        ex = [
            e
            for e in draw(st.lists(st.sampled_from(excepts), max_size=2, unique=True))
            if ipaddress.ip_network(e).subnet_of(ipaddress.ip_network(block["cidr"]))
        ]  # type: ignore[arg-type]
        if ex:
            block["except"] = ex
        return {"ipBlock": block}
    peer: dict[str, Any] = {}
    if kind in ("pod", "both"):
        peer["podSelector"] = draw(selector_st())
    if kind in ("ns", "both"):
        peer["namespaceSelector"] = draw(ns_selector_st())
    return peer


@st.composite
def port_st(draw: st.DrawFn) -> dict[str, Any]:
    pp: dict[str, Any] = {}
    if draw(st.booleans()):
        pp["protocol"] = draw(st.sampled_from(PROTOS))
    kind = draw(st.sampled_from(["none", "num", "range", "name"]))
    if kind == "num":
        pp["port"] = draw(st.sampled_from([80, 81, 82]))
    elif kind == "range":
        pp["port"] = draw(st.sampled_from([79, 80, 81]))
        pp["endPort"] = pp["port"] + draw(st.integers(0, 2))
    elif kind == "name":
        pp["port"] = draw(st.sampled_from(PORT_NAMES))
    return pp


@st.composite
def rule_st(draw: st.DrawFn, peers_key: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule[peers_key] = draw(st.lists(peer_st(), max_size=2))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(port_st(), max_size=2))
    return rule


@st.composite
def policy_st(draw: st.DrawFn, i: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": draw(selector_st())}
    if draw(st.booleans()):
        spec["ingress"] = draw(st.lists(rule_st("from"), max_size=2))
    if draw(st.booleans()):
        spec["egress"] = draw(st.lists(rule_st("to"), max_size=2))
    if draw(st.booleans()):
        spec["policyTypes"] = draw(st.lists(st.sampled_from(["Ingress", "Egress"]), min_size=1,
                                            max_size=2, unique=True))  # fmt: skip
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"p{i}", "namespace": draw(st.sampled_from(NAMESPACES))},
            "spec": spec}  # fmt: skip


@st.composite
def world_st(
    draw: st.DrawFn,
) -> tuple[list[RefPod], dict[str, dict[str, str]], list[dict[str, Any]]]:
    ns_labels = {ns: {"kubernetes.io/metadata.name": ns, **draw(labels_st)} for ns in NAMESPACES}
    pods = []
    n = 0
    for ns in NAMESPACES:
        for name in PODS[: draw(st.integers(1, 3))]:
            n += 1
            ports = []
            for pname in draw(st.lists(st.sampled_from(PORT_NAMES), max_size=2, unique=True)):
                ports.append(
                    (pname, draw(st.sampled_from([80, 81])), draw(st.sampled_from(PROTOS)))
                )
            ips: dict[int, Any] = {4: ipaddress.ip_address(f"10.0.0.{n * 4}")}
            ips[6] = ipaddress.ip_address(f"fd00::{n * 4:x}")
            pods.append(RefPod(ns, name, {"pod": name, **draw(labels_st)}, ports, ips))
    policies = [draw(policy_st(i)) for i in range(draw(st.integers(0, 4)))]
    return pods, ns_labels, policies


def endpoint(p: RefPod, node: str = "n1") -> Endpoint:
    return Endpoint(p.ns, p.name, (p.ips[4], p.ips[6]), dict(p.labels),
                    tuple(NamedPort(n, num, Protocol(pr)) for n, num, pr in p.ports), node)  # fmt: skip


def objects(ns_labels: Mapping[str, Mapping[str, str]], policies: list[dict[str, Any]],
            ) -> tuple[list[NetworkPolicy], list[Namespace]]:  # fmt: skip
    pols = [decode(d) for d in policies]
    nss = [decode({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": n, "labels": dict(lbl)}})
           for n, lbl in ns_labels.items()]  # fmt: skip
    assert all(isinstance(p, NetworkPolicy) for p in pols)
    assert all(isinstance(n, Namespace) for n in nss)
    return pols, nss  # type: ignore[return-value]


# the property --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_st(), st.data())
def test_compiled_verdict_equals_reference(world: Any, data: st.DataObject) -> None:
    pods, ns_labels, policies = world
    pols, nss = objects(ns_labels, policies)
    compiled = compile_policies(pols, nss, [endpoint(p) for p in pods], None)
    for _ in range(12):
        src = data.draw(st.sampled_from(pods))
        fam = data.draw(st.sampled_from([4, 6]))
        external = data.draw(st.booleans()) and data.draw(st.booleans())
        dst = None if external else data.draw(st.sampled_from(pods))
        daddr = (dst.ips[fam] if dst is not None
                 else ipaddress.ip_address("10.0.0.250" if fam == 4 else "fd00::fa"))  # fmt: skip
        port = data.draw(st.sampled_from([79, 80, 81, 82]))
        proto = data.draw(st.sampled_from(PROTOS))
        want = ref_allowed(policies, src, dst, daddr, port, proto, ns_labels)
        got = verdict(compiled, f"{src.ns}/{src.name}", daddr, port, Protocol(proto))
        assert got.allowed == want, (policies, src, dst, daddr, port, proto, got)
        if data.draw(st.booleans()):  # trace compiles only the probe's two endpoints
            traced = trace(pols, nss, [endpoint(p) for p in pods], src.ips[fam], daddr, port,
                           Protocol(proto)).verdict  # fmt: skip
            assert traced.allowed == want and traced.reason == got.reason


@settings(max_examples=100, deadline=None)
@given(world_st())
def test_local_compile_is_the_global_compile_restricted(world: Any) -> None:
    """Compiling for one node gives exactly that node's endpoints, with the same rules and
    the same set definitions as compiling for every node (remote pods feed the sets)."""
    pods, ns_labels, policies = world
    pols, nss = objects(ns_labels, policies)
    eps = [endpoint(p, node=f"n{i % 2}") for i, p in enumerate(pods)]
    every = compile_policies(pols, nss, eps, None)
    local = compile_policies(pols, nss, eps, "n0")
    assert set(local.endpoints) == {e.key for e in eps if e.node == "n0"}
    for k, er in local.endpoints.items():
        assert er == every.endpoints[k]
    for name, spec in local.sets.items():
        assert every.sets[name] == spec


# targeted cases ------------------------------------------------------------------------------


def _pol(ns: str, name: str, spec: dict[str, Any]) -> NetworkPolicy:
    p = decode({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": ns}, "spec": spec})  # fmt: skip
    assert isinstance(p, NetworkPolicy)
    return p


A = Endpoint("x", "a", (ipaddress.ip_address("10.0.0.1"),), {"pod": "a"},
             (NamedPort("serve-80-tcp", 80),), "n1", "fab1")  # fmt: skip
B = Endpoint("y", "b", (ipaddress.ip_address("10.0.0.2"),), {"pod": "b"},
             (NamedPort("serve-80-tcp", 8080),), "n2")  # fmt: skip


def test_set_names_follow_definitions_not_elements() -> None:
    pol = _pol("x", "p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {
        "matchLabels": {"pod": "b"}}, "namespaceSelector": {}}]}]})  # fmt: skip
    before = compile_policies([pol], [], [A, B], "n1")
    relabelled = Endpoint("y", "b", B.ips, {"pod": "c"}, B.ports, "n2")
    after = compile_policies([pol], [], [A, relabelled], "n1")
    assert before.endpoints == after.endpoints  # rules name the same sets
    assert set(before.sets) == set(after.sets)
    changed = [n for n in before.sets if before.sets[n].elements != after.sets[n].elements]
    assert len(changed) == 1 and before.sets[changed[0]].elements == frozenset(B.ips)


def test_egress_named_port_resolves_on_each_destination() -> None:
    pol = _pol("x", "p", {"podSelector": {}, "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})
    c = compile_policies([pol], [], [A, B], None)
    assert verdict(c, "x/a", "y/b", 8080, Protocol.TCP).allowed
    assert not verdict(c, "x/a", "y/b", 80, Protocol.TCP).allowed
    assert not verdict(c, "x/a", "y/b", 8080, Protocol.UDP).allowed
    assert not verdict(c, "x/a", ipaddress.ip_address("192.0.2.1"), 8080, Protocol.TCP).allowed


def test_sctp_rule_never_opens_tcp_and_deny_all_names_policies() -> None:
    pol = _pol("y", "sctp", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP",
                                                                         "port": 80}]}]})  # fmt: skip
    deny = _pol("y", "deny", {"podSelector": {}})
    c = compile_policies([pol, deny], [], [A, B], None)
    assert verdict(c, "x/a", "y/b", 80, Protocol.SCTP).allowed
    v = verdict(c, "x/a", "y/b", 80, Protocol.TCP)
    assert not v.allowed
    assert v.reason == ("denied: selected by y/deny, y/sctp; no rule allows 80/TCP from x/a "
                        "(ingress at y/b)")  # fmt: skip


def test_host_and_self_always_allowed_under_deny_all() -> None:
    deny = _pol("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    c = compile_policies([deny], [], [A, B], None)
    assert c.endpoints["x/a"].ingress is not None and c.endpoints["x/a"].ingress.rules == ()
    assert verdict(c, HOST, "x/a", 80, Protocol.TCP).allowed
    assert verdict(c, "x/a", "x/a", 80, Protocol.TCP).allowed
    assert not verdict(c, "y/b", "x/a", 80, Protocol.TCP).allowed
    assert not verdict(c, "x/a", "y/b", 80, Protocol.TCP).allowed


def test_ingress_named_port_missing_on_target_allows_nothing() -> None:
    pol = _pol("y", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}]})
    c = compile_policies([pol], [], [A, B], None)
    rule = c.endpoints["y/b"].ingress.rules[0]  # type: ignore[union-attr]
    assert rule.ports == () and rule.named_port_sets == ()
    assert not verdict(c, "x/a", "y/b", 8080, Protocol.TCP).allowed


def test_trace_explains_each_policy() -> None:
    other_ns = _pol("z", "p1", {"podSelector": {}})
    no_match = _pol("y", "p2", {"podSelector": {"matchLabels": {"pod": "zzz"}}})
    egress_only = _pol("y", "p3", {"podSelector": {}, "policyTypes": ["Egress"]})
    allow = _pol("y", "p4", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "x"}}}], "ports": [{"port": 8080}]}]})  # fmt: skip
    t = trace([other_ns, no_match, egress_only, allow], [], [A, B], "x/a", "y/b", 8080,
              Protocol.TCP)  # fmt: skip
    assert t.verdict.allowed
    ingress = {c.policy: c for c in t.policies if c.direction == "Ingress"}
    assert ingress["z/p1"].why == "in namespace z, not y"
    assert ingress["y/p2"].why == "podSelector {pod=zzz} does not match y/b {pod=b}"
    assert ingress["y/p3"].why == "policyTypes [Egress] has no Ingress"
    assert ingress["y/p4"].selected and ingress["y/p4"].rules[0].matched
    assert "10.0.0.1 is in pods {} in namespaces {kubernetes.io/metadata.name=x}" in (
        ingress["y/p4"].rules[0].peer
    )


def test_named_port_of_the_wrong_protocol_allows_nothing() -> None:
    """cyclonus' pathological case: the rule names serve-80-tcp with protocol UDP."""
    ingress = _pol("x", "i", {"podSelector": {}, "ingress": [{"ports": [
        {"port": "serve-80-tcp", "protocol": "UDP"}]}]})  # fmt: skip
    egress = _pol("x", "e", {"podSelector": {}, "egress": [{"ports": [
        {"port": "serve-80-tcp", "protocol": "UDP"}]}]})  # fmt: skip
    c = compile_policies([ingress, egress], [], [A, B], None)
    for proto in (Protocol.TCP, Protocol.UDP):
        assert not verdict(c, "y/b", "x/a", 80, proto).allowed
        assert not verdict(c, "x/a", "y/b", 8080, proto).allowed
