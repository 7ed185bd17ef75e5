"""The conformance cases as data: every ``It`` of Kubernetes' test/e2e/network/netpol/
network_policy.go (read at 008b3652; 48 cases), then cases of our own (endPort, IPv6,
several policies at once, label changes, policyTypes defaulting).

Upstream runs each case on a subset of the nine pods; here every case runs on all nine
(the older upstream model), so where a subset left a pod out, the expectation below says
what the semantics give for it (e.g. z/a in "Multiple PodSelectors and NamespaceSelectors").

A case is a list of steps; a step applies/deletes policies, changes labels, then checks
one or more matrices. Expectations start from "everything allowed" and are overridden in
order: ``deny(src, dst)`` / ``allow(src, dst)`` with patterns ``x/a``, ``x/*``, ``*/a``,
``*``; ``deny_in(p)`` is upstream's ExpectAllIngress(p, false), ``deny_out(p)`` its
ExpectAllEgress(p, false). Addresses in ipBlocks are templates filled at run time:
``{host4:y/b}`` (the pod's /32), ``{wide4:x/b}`` (the /4 around it, upstream's
makeLargeCIDRForIP), and the same with 6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NS_NAME = "kubernetes.io/metadata.name"
Expect = tuple[str, str, bool]
_UNSET: Any = object()


def deny(src: str, dst: str) -> Expect:
    return (src, dst, False)


def allow(src: str, dst: str) -> Expect:
    return (src, dst, True)


def deny_in(pod: str) -> Expect:
    return ("*", pod, False)


def deny_out(pod: str) -> Expect:
    return (pod, "*", False)


@dataclass(frozen=True)
class Check:
    port: int
    protocol: str
    expect: tuple[Expect, ...]
    family: int = 4


def check(port: int, protocol: str, *expect: Expect, family: int = 4) -> Check:
    return Check(port, protocol, expect, family)


@dataclass(frozen=True)
class Step:
    apply: tuple[dict[str, Any], ...] = ()
    delete: tuple[dict[str, Any], ...] = ()
    label: tuple[tuple[str, str, dict[str, str | None]], ...] = ()  # (kind, target, changes)
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    origin: str  # "upstream" or "own"
    steps: tuple[Step, ...]
    needs: frozenset[str] = field(default_factory=frozenset)  # "sctp"


# ---------------------------------------------------------------------- policy builders


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": dict(labels)}


def labels(mapping: dict[str, str]) -> dict[str, Any]:
    """A matchLabels selector whose keys are not Python names (kubernetes.io/...)."""
    return {"matchLabels": dict(mapping)}


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    req: dict[str, Any] = {"key": key, "operator": op}
    if values:
        req["values"] = list(values)
    return {"matchExpressions": [req]}


def ns_is(name: str) -> dict[str, Any]:
    return labels({NS_NAME: name})


def peer(pods: dict[str, Any] | None = None, nss: dict[str, Any] | None = None,
         cidr: str | None = None, except_: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    if pods is not None:
        out["podSelector"] = pods
    if nss is not None:
        out["namespaceSelector"] = nss
    if cidr is not None:
        out["ipBlock"] = {"cidr": cidr, **({"except": list(except_)} if except_ else {})}
    return out


def port(number: int | str | None = None, protocol: str | None = None,
         end: int | None = None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    if protocol is not None:
        out["protocol"] = protocol
    if number is not None:
        out["port"] = number
    if end is not None:
        out["endPort"] = end
    return out


def ingress(*peers: dict[str, Any], ports: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peers:
        out["from"] = list(peers)
    if ports:
        out["ports"] = list(ports)
    return out


def egress(*peers: dict[str, Any], ports: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peers:
        out["to"] = list(peers)
    if ports:
        out["ports"] = list(ports)
    return out


def policy(ns: str, name: str, target: dict[str, Any] | None = None,
           ing: list[dict[str, Any]] | None = None, eg: list[dict[str, Any]] | None = None,
           types: list[str] | None = _UNSET) -> dict[str, Any]:  # fmt: skip
    """A NetworkPolicy. ``target`` None selects every pod of ``ns``. ``types`` defaults to
    the directions given (as upstream's SetSpecIngressRules/SetSpecEgressRules append);
    ``types=None`` leaves policyTypes out (the API server's defaulting applies)."""
    spec: dict[str, Any] = {"podSelector": target if target is not None else {}}
    if ing is not None:
        spec["ingress"] = ing
    if eg is not None:
        spec["egress"] = eg
    if types is _UNSET:
        types = [t for t, r in (("Ingress", ing), ("Egress", eg)) if r is not None]
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}  # fmt: skip


def pod_a() -> dict[str, Any]:
    return sel(pod="a")


def one(*checks: Check, apply: tuple[dict[str, Any], ...] = ()) -> tuple[Step, ...]:
    return (Step(apply=apply, checks=checks),)


# ---------------------------------------------------------------------- upstream cases

_ALLOW81_FROM_Y = policy("x", "allow-client-a-via-ns-selector", pod_a(),
                         [ingress(peer(nss=ns_is("y")), ports=(port(81, "TCP"),))])  # fmt: skip
_PORT81_Y = (deny("x/*", "x/a"), deny("z/*", "x/a"))
_CIDR_EXCEPT = policy("x", "allow-client-a-via-cidr-egress-rule", pod_a(),
                      eg=[egress(peer(cidr="{wide4:x/b}", except_=("{host4:x/b}",)))])  # fmt: skip

UPSTREAM: list[Case] = [
    Case("should support a 'default-deny-ingress' policy", "upstream", one(
        check(80, "TCP", deny("*", "x/*")),
        apply=(policy("x", "deny-ingress", ing=[]),))),
    Case("should support a 'default-deny-all' policy", "upstream", one(
        check(80, "TCP", deny("*", "x/*"), deny("x/*", "*")),
        apply=(policy("x", "deny-all", ing=[], eg=[]),))),
    Case("should enforce policy to allow traffic from pods within server namespace based on "
         "PodSelector", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("x/b", "x/a")),
        apply=(policy("x", "x-a-allows-x-b", pod_a(), [ingress(peer(pods=sel(pod="b")))]),))),
    Case("should enforce policy to allow ingress traffic for a target", "upstream", one(
        check(80, "TCP", deny("*", "x/*"), allow("*", "x/a")),
        apply=(policy("x", "deny-all", ing=[]),
               policy("x", "allow-all-to-a", pod_a(), [ingress(peer(pods={}, nss={}))])))),
    Case("should enforce policy to allow ingress traffic from pods in all namespaces",
         "upstream", one(
        check(80, "TCP"),
        apply=(policy("x", "allow-from-another-ns", pod_a(),
                      [ingress(peer(nss=sel()))]),))),
    Case("should enforce policy to allow traffic only from a different namespace, based on "
         "NamespaceSelector", "upstream", one(
        check(80, "TCP", deny("x/*", "x/a"), deny("z/*", "x/a")),
        apply=(policy("x", "allow-client-a-via-ns-selector", pod_a(),
                      [ingress(peer(nss=ns_is("y")))]),))),
    Case("should enforce policy based on PodSelector with MatchExpressions", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("x/b", "x/a")),
        apply=(policy("x", "x-a-allows-x-b", pod_a(),
                      [ingress(peer(pods=expr("pod", "In", "b")))]),))),
    Case("should enforce policy based on NamespaceSelector with MatchExpressions", "upstream",
         one(check(80, "TCP", deny("x/*", "x/a"), deny("z/*", "x/a")),
             apply=(policy("x", "allow-ns-y-match-selector", pod_a(),
                           [ingress(peer(nss=expr(NS_NAME, "In", "y")))]),))),
    Case("should enforce policy based on PodSelector or NamespaceSelector", "upstream", one(
        check(80, "TCP", deny("x/a", "x/a"), deny("x/c", "x/a")),
        apply=(policy("x", "allow-ns-y-match-selector", pod_a(),
                      [ingress(peer(nss=expr(NS_NAME, "NotIn", "x")),
                               peer(pods=sel(pod="b")))]),))),
    Case("should enforce policy based on PodSelector and NamespaceSelector", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("y/b", "x/a"), allow("z/b", "x/a")),
        apply=(policy("x", "allow-ns-y-podselector-and-nsselector", pod_a(),
                      [ingress(peer(pods=sel(pod="b"),
                                    nss=expr(NS_NAME, "NotIn", "x")))]),))),
    Case("should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
         "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("y/b", "x/a"), allow("y/c", "x/a"),
              allow("z/b", "x/a"), allow("z/c", "x/a")),
        apply=(policy("x", "allow-ns-y-z-pod-b-c", pod_a(),
                      [ingress(peer(pods=expr("pod", "In", "b", "c"),
                                    nss=expr(NS_NAME, "NotIn", "x")))]),))),
    Case("should enforce policy based on any PodSelectors", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("x/b", "x/a"), allow("x/c", "x/a")),
        apply=(policy("x", "allow-ns-x-pod-b-c", pod_a(),
                      [ingress(peer(pods=sel(pod="b")), peer(pods=sel(pod="c")))]),))),
    Case("should enforce policy to allow traffic only from a pod in a different namespace "
         "based on PodSelector and NamespaceSelector", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("y/a", "x/a")),
        apply=(policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", pod_a(),
                      [ingress(peer(pods=sel(pod="a"), nss=ns_is("y")))]),))),
    Case("should enforce policy based on Ports", "upstream", one(
        check(81, "TCP", *_PORT81_Y), apply=(_ALLOW81_FROM_Y,))),
    Case("should enforce multiple, stacked policies with overlapping podSelectors", "upstream", (
        Step(apply=(_ALLOW81_FROM_Y,),
             checks=(check(81, "TCP", *_PORT81_Y), check(80, "TCP", deny_in("x/a")))),
        Step(apply=(policy("x", "allow-client-a-via-ns-selector-80", pod_a(),
                           [ingress(peer(nss=ns_is("y")), ports=(port(80, "TCP"),))]),),
             checks=(check(80, "TCP", *_PORT81_Y),)))),
    Case("should support allow-all policy", "upstream", one(
        check(80, "TCP"), check(81, "TCP"),
        apply=(policy("x", "allow-all", sel(), [ingress()]),))),
    Case("should allow ingress access on one named port", "upstream", one(
        check(81, "TCP"), check(80, "TCP", deny("*", "x/*")),
        apply=(policy("x", "allow-all", sel(), [ingress(ports=(port("serve-81-tcp"),))]),))),
    Case("should allow ingress access from namespace on one named port", "upstream", one(
        check(80, "TCP", deny("x/*", "x/a"), deny("z/*", "x/a")),
        check(81, "TCP", deny_in("x/a")),
        apply=(policy("x", "allow-client-a-via-ns-selector-80", pod_a(),
                      [ingress(peer(nss=ns_is("y")),
                               ports=(port("serve-80-tcp", "TCP"),))]),))),
    Case("should allow egress access on one named port", "upstream", one(
        check(80, "TCP"), check(81, "TCP", deny("x/*", "*")),
        apply=(policy("x", "allow-egress", sel(), eg=[egress(ports=(port("serve-80-tcp"),))]),))),
    Case("should enforce updated policy", "upstream", (
        Step(apply=(policy("x", "allow-all-mutate-to-deny-all", sel(), [ingress()]),),
             checks=(check(81, "TCP"),)),
        Step(apply=(policy("x", "allow-all-mutate-to-deny-all", sel(), []),),
             checks=(check(81, "TCP", deny("*", "x/*")),)))),
    Case("should allow ingress access from updated namespace", "upstream", (
        Step(apply=(policy("x", "allow-client-a-via-ns-selector", pod_a(),
                           [ingress(peer(nss=sel(ns2="updated")))]),),
             checks=(check(80, "TCP", deny_in("x/a")),)),
        Step(label=(("namespace", "y", {"ns2": "updated"}),),
             checks=(check(80, "TCP", deny_in("x/a"), allow("y/*", "*")),)))),
    Case("should allow ingress access from updated pod", "upstream", (
        Step(apply=(policy("x", "allow-client-a-via-pod-selector", pod_a(),
                           [ingress(peer(pods=sel(pod="b", pod2="updated")))]),),
             checks=(check(80, "TCP", deny_in("x/a")),)),
        Step(label=(("pod", "x/b", {"pod": "b", "pod2": "updated"}),),
             checks=(check(80, "TCP", deny_in("x/a"), allow("x/b", "x/a")),)))),
    Case("should deny ingress from pods on other namespaces", "upstream", one(
        check(80, "TCP", deny("y/*", "x/*"), deny("z/*", "x/*")),
        apply=(policy("x", "deny-empty-policy", ing=[ingress(peer(pods=sel()))]),))),
    Case("should deny ingress access to updated pod", "upstream", (
        Step(apply=(policy("x", "deny-ingress-via-label-selector", sel(target="isolated"), []),),
             checks=(check(80, "TCP"),)),
        Step(label=(("pod", "x/a", {"target": "isolated"}),),
             checks=(check(80, "TCP", deny_in("x/a")),)))),
    Case("should deny egress from pods based on PodSelector", "upstream", one(
        check(80, "TCP", deny_out("x/a")),
        apply=(policy("x", "deny-egress-pod-a", pod_a(), eg=[]),))),
    Case("should deny egress from all pods in a namespace", "upstream", one(
        check(80, "TCP", deny("x/*", "*")), apply=(policy("x", "deny-egress-ns-x", eg=[]),))),
    Case("should work with Ingress, Egress specified together", "upstream", one(
        check(80, "TCP", deny_in("x/a"), allow("x/b", "x/a")),
        check(81, "TCP", deny_in("x/a"), deny_out("x/a"), allow("x/b", "x/a")),
        apply=(policy("x", "allow-client-a-via-pod-selector", pod_a(),
                      [ingress(peer(pods=sel(pod="b")))], [egress(ports=(port(80),))],
                      types=["Egress", "Ingress"]),))),
    Case("should support denying of egress traffic on the client side (even if the server "
         "explicitly allows this traffic)", "upstream", one(
        check(80, "TCP", deny("x/a", "*"), deny("*", "y/a"), allow("x/a", "y/a"),
              deny("*", "y/b")),
        apply=(policy("x", "allow-to-ns-y-pod-a", pod_a(),
                      eg=[egress(peer(pods=sel(pod="a"), nss=ns_is("y")))]),
               policy("y", "allow-from-xa-on-ya-match-selector", pod_a(),
                      [ingress(peer(pods=sel(pod="a"), nss=ns_is("x")))]),
               policy("y", "allow-from-xa-on-yb-match-selector", sel(pod="b"),
                      [ingress(peer(pods=sel(pod="a"), nss=ns_is("x")))])))),
    Case("should enforce egress policy allowing traffic to a server in a different namespace "
         "based on PodSelector and NamespaceSelector", "upstream", one(
        check(80, "TCP", deny_out("x/a"), allow("x/a", "y/a")),
        apply=(policy("x", "allow-to-ns-y-pod-a", pod_a(),
                      eg=[egress(peer(pods=sel(pod="a"), nss=ns_is("y")))]),))),
    Case("should enforce ingress policy allowing any port traffic to a server on a specific "
         "protocol", "upstream", one(
        check(80, "TCP"), check(80, "UDP", deny_in("x/a")),
        apply=(policy("x", "allow-ingress-by-proto", pod_a(),
                      [ingress(ports=(port(protocol="TCP"),))]),))),
    Case("should enforce multiple ingress policies with ingress allow-all policy taking "
         "precedence", "upstream", (
        Step(apply=(policy("x", "allow-ingress-port-80", sel(), [ingress(ports=(port(80),))]),),
             checks=(check(81, "TCP", deny("*", "x/*")),)),
        Step(apply=(policy("x", "allow-ingress", sel(), [ingress()]),),
             checks=(check(81, "TCP"),)))),
    Case("should enforce multiple egress policies with egress allow-all policy taking "
         "precedence", "upstream", (
        Step(apply=(policy("x", "allow-egress-port-80", sel(), eg=[egress(ports=(port(80),))]),),
             checks=(check(81, "TCP", deny("x/*", "*")),)),
        Step(apply=(policy("x", "allow-egress", sel(), eg=[egress()]),),
             checks=(check(81, "TCP"),)))),
    Case("should stop enforcing policies after they are deleted", "upstream", (
        Step(apply=(policy("x", "deny-all", ing=[], eg=[]),),
             checks=(check(80, "TCP", deny("x/*", "*"), deny("*", "x/*")),)),
        Step(delete=(policy("x", "deny-all", ing=[], eg=[]),), checks=(check(80, "TCP"),)))),
    Case("should allow egress access to server in CIDR block", "upstream", one(
        check(80, "TCP", deny_out("x/a"), allow("x/a", "y/b")),
        apply=(policy("x", "allow-client-a-via-cidr-egress-rule", pod_a(),
                      eg=[egress(peer(cidr="{host4:y/b}"))]),))),
    Case("should enforce except clause while egress access to server in CIDR block",
         "upstream", one(check(80, "TCP", deny("x/a", "x/b")), apply=(_CIDR_EXCEPT,))),
    Case("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
         "upstream", (
        Step(apply=(_CIDR_EXCEPT,), checks=(check(80, "TCP", deny("x/a", "x/b")),)),
        Step(apply=(policy("x", "allow-client-a-via-cidr-egress-rule", pod_a(),
                           eg=[egress(peer(cidr="{host4:x/b}"))]),),
             checks=(check(80, "TCP", deny_out("x/a"), allow("x/a", "x/b")),)))),
    Case("should enforce policies to check ingress and egress policies can be controlled "
         "independently based on PodSelector", "upstream", (
        Step(apply=(policy("x", "allow-egress-for-target", pod_a(), eg=[egress()]),),
             checks=(check(80, "TCP"),)),
        Step(apply=(policy("x", "deny-ingress-via-label-selector", pod_a(), []),),
             checks=(check(80, "TCP", deny_in("x/a")),)))),
    Case("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin "
         "doesn't support SCTP", "upstream", one(
        check(81, "TCP", deny("*", "x/*")),
        apply=(policy("x", "deny-ingress", ing=[]),
               policy("x", "allow-only-sctp-ingress-on-port-81", pod_a(),
                      [ingress(ports=(port(81, "SCTP"),))])))),
    Case("should properly isolate pods that are selected by a policy allowing SCTP, even if "
         "the plugin doesn't support SCTP", "upstream", one(
        check(81, "TCP", deny_in("x/a")),
        apply=(policy("x", "allow-only-sctp-ingress-on-port-80", pod_a(),
                      [ingress(ports=(port(80, "SCTP"),))]),))),
    Case("should not allow access by TCP when a policy specifies only UDP", "upstream", one(
        check(81, "TCP", deny_in("x/a")),
        apply=(policy("x", "allow-only-udp-ingress-on-port-81", pod_a(),
                      [ingress(ports=(port(81, "UDP"),))]),))),
    Case("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels "
         "using default ns label", "upstream", one(
        check(80, "TCP", deny("x/*", "x/a"), deny("z/*", "x/a")),
        apply=(policy("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", pod_a(),
                      [ingress(peer(nss=ns_is("y")))]),))),
    Case("should enforce policy based on NamespaceSelector with MatchExpressions using default "
         "ns label", "upstream", one(
        check(80, "TCP", deny("x/a", "y/*")),
        apply=(policy("x", "allow-ns-y-match-selector-for-immutable-ns-label", pod_a(),
                      eg=[egress(peer(nss=expr(NS_NAME, "NotIn", "y")))]),))),
    # "NetworkPolicy between server and client using UDP"
    Case("UDP: should support a 'default-deny-ingress' policy", "upstream", one(
        check(80, "UDP", deny("*", "x/*")), apply=(policy("x", "deny-all", ing=[]),))),
    Case("UDP: should enforce policy based on Ports", "upstream", one(
        check(81, "UDP", deny("x/*", "x/a"), deny("z/*", "x/a")),
        apply=(policy("x", "allow-ingress-on-port-81-ns-x", pod_a(),
                      [ingress(peer(nss=ns_is("y")), ports=(port(81, "UDP"),))]),))),
    Case("UDP: should enforce policy to allow traffic only from a pod in a different namespace "
         "based on PodSelector and NamespaceSelector", "upstream", one(
        check(80, "UDP", deny_in("x/a"), allow("y/a", "x/a")),
        apply=(policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", pod_a(),
                      [ingress(peer(pods=sel(pod="a"), nss=ns_is("y")))]),))),
    # "NetworkPolicy between server and client using SCTP" ([Feature:SCTPConnectivity])
    Case("SCTP: should support a 'default-deny-ingress' policy", "upstream", one(
        check(80, "SCTP", deny("*", "x/*")), apply=(policy("x", "deny-all", ing=[]),)),
        frozenset({"sctp"})),
    Case("SCTP: should enforce policy based on Ports", "upstream", one(
        check(81, "SCTP", deny("x/*", "x/a"), deny("z/*", "x/a")),
        apply=(policy("x", "allow-ingress-on-port-81-ns-x", pod_a(),
                      [ingress(peer(nss=ns_is("y")), ports=(port(81, "SCTP"),))]),)),
        frozenset({"sctp"})),
    Case("SCTP: should enforce policy to allow traffic only from a pod in a different namespace "
         "based on PodSelector and NamespaceSelector", "upstream", one(
        check(80, "SCTP", deny_in("x/a"), allow("y/a", "x/a")),
        apply=(policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", pod_a(),
                      [ingress(peer(pods=sel(pod="a"), nss=ns_is("y")))]),)),
        frozenset({"sctp"})),
]  # fmt: skip

# ---------------------------------------------------------------------- our own cases

_FROM_Y_80 = policy("x", "from-y-on-80", pod_a(),
                    [ingress(peer(nss=ns_is("y")), ports=(port(80, "TCP"),))])  # fmt: skip
_FROM_Z_81 = policy("x", "from-z-on-81", pod_a(),
                    [ingress(peer(nss=ns_is("z")), ports=(port(81, "TCP"),))])  # fmt: skip

OWN: list[Case] = [
    Case("endPort: an ingress range 80-81 opens both ports, TCP only", "own", one(
        check(80, "TCP", deny("*", "x/*"), allow("*", "x/a")),
        check(81, "TCP", deny("*", "x/*"), allow("*", "x/a")),
        check(80, "UDP", deny("*", "x/*")),
        apply=(policy("x", "deny-ingress", ing=[]),
               policy("x", "range-80-81", pod_a(),
                      [ingress(peer(nss={}), ports=(port(80, "TCP", end=81),))])))),
    Case("endPort: a range 81-82 leaves 80 closed", "own", one(
        check(80, "TCP", deny_in("x/a")), check(81, "TCP"),
        apply=(policy("x", "range-81-82", pod_a(), [ingress(ports=(port(81, "TCP", end=82),))]),))),
    Case("endPort: an egress UDP range 79-80 opens UDP 80 only", "own", one(
        check(80, "UDP"), check(81, "UDP", deny_out("x/a")), check(80, "TCP", deny_out("x/a")),
        apply=(policy("x", "egress-udp-79-80", pod_a(),
                      eg=[egress(ports=(port(79, "UDP", end=80),))]),))),
    Case("named port: serve-81-udp with protocol UDP opens UDP 81, not TCP 81 nor UDP 80", "own", one(
        check(81, "UDP"), check(81, "TCP", deny("*", "x/*")), check(80, "UDP", deny("*", "x/*")),
        apply=(policy("x", "named-udp", sel(),
                      [ingress(ports=(port("serve-81-udp", "UDP"),))]),))),
    Case("named port of the other protocol (serve-81-udp, protocol defaulting to TCP) opens "
         "nothing", "own", one(
        check(81, "UDP", deny("*", "x/*")), check(81, "TCP", deny("*", "x/*")),
        apply=(policy("x", "named-wrong-proto", sel(),
                      [ingress(ports=(port("serve-81-udp"),))]),))),
    Case("named port: egress to namespace z on serve-81-tcp", "own", one(
        check(81, "TCP", deny_out("x/a"), allow("x/a", "z/*")),
        check(80, "TCP", deny_out("x/a")),
        apply=(policy("x", "egress-z-named", pod_a(),
                      eg=[egress(peer(nss=ns_is("z")), ports=(port("serve-81-tcp"),))]),))),
    Case("ipBlock: ingress from a /4 except one pod's /32", "own", one(
        check(80, "TCP", deny("y/a", "x/a")),
        apply=(policy("x", "from-cidr-except", pod_a(),
                      [ingress(peer(cidr="{wide4:y/a}", except_=("{host4:y/a}",)))]),))),
    Case("multi-policy: two policies on x/a are a union (y on 80, z on 81)", "own", (
        Step(apply=(_FROM_Y_80, _FROM_Z_81),
             checks=(check(80, "TCP", deny_in("x/a"), allow("y/*", "x/a")),
                     check(81, "TCP", deny_in("x/a"), allow("z/*", "x/a")))),
        Step(delete=(_FROM_Z_81,),
             checks=(check(81, "TCP", deny_in("x/a")),
                     check(80, "TCP", deny_in("x/a"), allow("y/*", "x/a")))))),
    Case("multi-policy: egress of the client and ingress of the server must both allow", "own",
         one(check(80, "TCP", deny("x/a", "*"), allow("x/a", "y/*"), deny("*", "y/b"),
                   allow("z/*", "y/b")),
             apply=(policy("x", "a-to-y", pod_a(), eg=[egress(peer(nss=ns_is("y")))]),
                    policy("y", "b-from-z", sel(pod="b"), [ingress(peer(nss=ns_is("z")))])))),
    Case("multi-policy: a policy in y changes nothing in x; ingress and egress policies in "
         "three namespaces at once", "own", one(
        check(80, "TCP", deny("*", "y/c"), allow("y/*", "y/c"), deny("z/b", "*"),
              allow("z/b", "x/*"), deny("*", "x/c"), allow("x/*", "x/c")),
        apply=(policy("y", "c-from-own-ns", sel(pod="c"), [ingress(peer(pods={}))]),
               policy("z", "b-to-x-only", sel(pod="b"), eg=[egress(peer(nss=ns_is("x")))]),
               policy("x", "c-from-x", sel(pod="c"), [ingress(peer(pods={}))])))),
    Case("label: a namespace label added then removed opens then closes", "own", (
        Step(apply=(policy("x", "from-blue", pod_a(), [ingress(peer(nss=sel(team="blue")))]),),
             checks=(check(80, "TCP", deny_in("x/a")),)),
        Step(label=(("namespace", "z", {"team": "blue"}),),
             checks=(check(80, "TCP", deny_in("x/a"), allow("z/*", "x/a")),)),
        Step(label=(("namespace", "z", {"team": None}),),
             checks=(check(80, "TCP", deny_in("x/a")),)))),
    Case("label: a pod leaving the target selector is no longer isolated", "own", (
        Step(apply=(policy("x", "isolate", sel(target="isolated"), []),),
             label=(("pod", "x/a", {"target": "isolated"}),),
             checks=(check(80, "TCP", deny_in("x/a")),)),
        Step(label=(("pod", "x/a", {"target": None}),), checks=(check(80, "TCP"),)))),
    Case("selectors: DoesNotExist and Exists; a pod gaining the label is cut off", "own", (
        Step(apply=(policy("x", "exists", pod_a(),
                           [ingress(peer(pods=expr("pod2", "DoesNotExist"),
                                         nss=expr("ns", "Exists")))]),),
             checks=(check(80, "TCP"),)),
        Step(label=(("pod", "x/b", {"pod2": "updated"}),),
             checks=(check(80, "TCP", deny("x/b", "x/a")),)))),
    Case("policyTypes omitted with egress rules: isolated both ways", "own", one(
        check(80, "TCP", deny_in("x/a"), deny_out("x/a"), allow("x/a", "y/*")),
        apply=(policy("x", "no-types", pod_a(), eg=[egress(peer(nss=ns_is("y")))],
                      types=None),))),
    Case("IPv6: deny ingress to x except from y, IPv4 and IPv6 alike", "own", one(
        check(80, "TCP", deny("*", "x/*"), allow("y/*", "x/*"), family=6),
        check(80, "TCP", deny("*", "x/*"), allow("y/*", "x/*")),
        apply=(policy("x", "from-y", ing=[ingress(peer(nss=ns_is("y")))]),))),
    Case("IPv6: egress to an IPv6 /128 ipBlock opens it and no IPv4", "own", one(
        check(80, "TCP", deny_out("x/a"), allow("x/a", "y/b"), family=6),
        check(80, "TCP", deny_out("x/a")),
        apply=(policy("x", "to-v6-host", pod_a(), eg=[egress(peer(cidr="{host6:y/b}"))]),))),
    Case("IPv6: ipBlock /4 except one pod's /128", "own", one(
        check(80, "TCP", deny("z/c", "x/a"), family=6), check(80, "TCP", deny_out("z/c")),
        apply=(policy("z", "v6-except", sel(pod="c"),
                      eg=[egress(peer(cidr="{wide6:x/a}", except_=("{host6:x/a}",)))]),))),
    Case("IPv6: UDP default deny ingress in y", "own", one(
        check(80, "UDP", deny("*", "y/*"), family=6), check(80, "UDP", deny("*", "y/*")),
        apply=(policy("y", "deny-ingress", ing=[]),))),
]  # fmt: skip

CASES: list[Case] = UPSTREAM + OWN
