"""The incremental compile (fabricd's batches) equals the full compile after every change of
endpoints (pods added, removed, relabelled, moved between nodes, given other named ports or
another pod's address) and of policies (added, removed, replaced: a delta too), alone or in
one batch; namespace label changes go through the full path."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policy_compiler import (
    NAMESPACES,
    PORT_NAMES,
    endpoint,
    labels_st,
    objects,
    policy_st,
    world_st,
)

from fabric.policy.compiler import compile as compile_policies
from fabric.policy.endpoints import EndpointCache, allocations, build_endpoints
from fabric.policy.incremental import IncrementalCompiler
from fabric.policy.model import Endpoint, NamedPort, Protocol
from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import NetworkPolicy, Pod
from ipam.block import Attribute, Block

LOCAL = "n0"


@st.composite
def change_st(draw: st.DrawFn, eps: dict[str, Endpoint], serial: int) -> dict[str, Endpoint]:
    """One batch's worth of endpoint changes (1-3 of them)."""
    out = dict(eps)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["add", "remove", "labels", "node", "ports", "steal"]))
        keys = sorted(out)
        if kind == "add" or not keys:
            ns = draw(st.sampled_from(NAMESPACES))
            n = 100 + serial * 10 + len(out)
            e = Endpoint(ns, f"new{n}", (ipaddress.ip_address(f"10.0.1.{n % 250}"),),
                         {"pod": "a", **draw(labels_st)}, (), draw(st.sampled_from(["n0", "n1"])),
                         f"fab{n}")  # fmt: skip
            out[e.key] = e
            continue
        k = draw(st.sampled_from(keys))
        e = out[k]
        if kind == "remove":
            del out[k]
        elif kind == "labels":
            out[k] = replace(e, labels=draw(labels_st))
        elif kind == "node":
            out[k] = replace(e, node="n1" if e.node == "n0" else "n0")
        elif kind == "ports":
            name = draw(st.sampled_from(PORT_NAMES))
            proto = draw(st.sampled_from(list(Protocol)))
            out[k] = replace(e, ports=(NamedPort(name, draw(st.sampled_from([80, 81])), proto),))
        else:  # another endpoint's address too (stale allocations): shared set elements
            other = out[draw(st.sampled_from(keys))]
            out[k] = replace(e, ips=tuple(dict.fromkeys((*e.ips, other.ips[0]))))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_st(), st.data())
def test_incremental_equals_full_compile_after_every_change(
    world: Any, data: st.DataObject
) -> None:
    pods, ns_labels, policies = world
    pols, nss = objects(ns_labels, policies)
    eps = {e.key: e for e in (endpoint(p, node=f"n{i % 2}") for i, p in enumerate(pods))}
    inc = IncrementalCompiler(LOCAL)
    assert inc.compile(pols, nss, eps.values()) == compile_policies(pols, nss, eps.values(), LOCAL)
    by_name = dict(zip((d["metadata"]["name"] for d in policies), pols, strict=True))
    for step in range(8):
        kind = data.draw(st.sampled_from(["endpoints", "policy", "both", "namespace"]))
        if kind in ("policy", "both"):  # unchanged policies stay the same objects
            what = data.draw(st.sampled_from(["add", "remove", "replace"]))
            doc = data.draw(policy_st(10 + step))
            if what != "add" and by_name:
                name = data.draw(st.sampled_from(sorted(by_name)))
                old = by_name.pop(name)
                doc["metadata"] = {"name": name, "namespace": old.namespace}
            if what != "remove":
                new = decode(doc)
                assert isinstance(new, NetworkPolicy)
                by_name[doc["metadata"]["name"]] = new
            pols = list(by_name.values())
        if kind in ("endpoints", "both"):
            eps = data.draw(change_st(eps, step))
        if kind == "namespace":  # a namespace's labels: the full path
            ns_labels = {**ns_labels, NAMESPACES[0]: {**ns_labels[NAMESPACES[0]],
                                                      **data.draw(labels_st)}}  # fmt: skip
            nss = objects(ns_labels, [])[1]
        got = inc.compile(pols, nss, eps.values())
        want = compile_policies(pols, nss, eps.values(), LOCAL)
        assert got.endpoints == want.endpoints
        assert got.sets == want.sets, set(got.sets) ^ set(want.sets)
    assert inc.fallbacks == 0


def test_a_policy_change_is_a_delta_touching_only_its_namespace() -> None:
    ns_labels = {n: {"kubernetes.io/metadata.name": n} for n in ("x", "y")}
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": "x", "name": "web"},
           "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {
               "matchLabels": {"app": "a"}}}]}]}}  # fmt: skip
    pols, nss = objects(ns_labels, [doc])
    a = Endpoint("x", "a", (ipaddress.ip_address("10.0.0.1"),), {"app": "a"}, (), LOCAL, "fa")
    b = Endpoint("y", "b", (ipaddress.ip_address("10.0.0.2"),), {"app": "b"}, (), LOCAL, "fb")
    c = Endpoint("y", "c", (ipaddress.ip_address("10.0.0.3"),), {"app": "b"}, (), "n1", None)
    inc = IncrementalCompiler(LOCAL)
    first = inc.compile(pols, nss, [a, b, c])
    # a policy in y: b's rules are compiled again, a's stay the same objects
    more, _ = objects(ns_labels, [{**doc, "metadata": {"namespace": "y", "name": "deny"},
                                   "spec": {"podSelector": {}}}])  # fmt: skip
    second = inc.compile([*pols, *more], nss, [a, b, c])
    assert (inc.full, inc.deltas) == (1, 1)
    assert second == compile_policies([*pols, *more], nss, [a, b, c], LOCAL)
    assert second.endpoints["x/a"] is first.endpoints["x/a"]
    assert second.endpoints["y/b"].ingress is not None
    assert second.sets == first.sets  # no set is rebuilt
    # and removed again: the same model as at first
    assert inc.compile(pols, nss, [a, b, c]) == first
    assert (inc.full, inc.deltas) == (1, 2)


def test_a_pod_add_is_a_delta_and_unchanged_inputs_return_the_same_model() -> None:
    pols, nss = objects({"x": {"kubernetes.io/metadata.name": "x"}}, [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"namespace": "x", "name": "web"},
         "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {
             "matchLabels": {"app": "a"}}}]}]}}])  # fmt: skip
    a = Endpoint("x", "a", (ipaddress.ip_address("10.0.0.1"),), {"app": "a"}, (), LOCAL, "fa")
    b = Endpoint("x", "b", (ipaddress.ip_address("10.0.0.2"),), {"app": "a"}, (), LOCAL, "fb")
    inc = IncrementalCompiler(LOCAL)
    first = inc.compile(pols, nss, [a])
    assert inc.compile(pols, nss, [a]) is first
    second = inc.compile(pols, nss, [a, b])
    assert (inc.full, inc.deltas) == (1, 1)
    assert second == compile_policies(pols, nss, [a, b], LOCAL)
    (peers,) = [s for s in second.sets.values() if s.kind == "addr4"]
    assert peers.elements == {a.ips[0], b.ips[0]}


# the endpoint cache ---------------------------------------------------------------------------


def _attr(k: int, ns: str, labels: str) -> Attribute:
    attrs = {"network": "fabric", "containerID": f"c{k}", "ifname": "eth0" if k % 5 else "net1",
             "pod": f"p{k % 9}", "namespace": ns, "labels": labels}  # fmt: skip
    return Attribute(f"fabric.c{k}.eth0", attrs)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_endpoint_cache_equals_build_endpoints_after_every_change(data: st.DataObject) -> None:
    """Blocks replaced (assign, release), added, dropped; Pods relabelled, added, dropped:
    the cache gives what build_endpoints gives from scratch, unchanged endpoints as the same
    objects."""
    nets = list(ipaddress.ip_network("10.9.0.0/24").subnets(new_prefix=28))
    blocks = [Block.new(nets[0], "n0"), Block.new(nets[1], "n1")]
    pods: dict[tuple[str, str], Pod] = {}
    cache = EndpointCache("n0", lambda c, i: f"fab{c}{i}"[:15])
    k = 0
    for _ in range(8):
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(blocks) - 1))
            kind = data.draw(st.sampled_from(["assign", "release", "new", "drop", "pod"]))
            if kind == "assign":
                k += 1
                ns = data.draw(st.sampled_from(NAMESPACES))
                labels = data.draw(st.sampled_from(['{"app": "a"}', '{"app": "b"}', ""]))
                blocks[i] = blocks[i].assign(1, _attr(k, ns, labels))[0]
            elif kind == "release" and any(True for _ in blocks[i].allocated()):
                _o, a = next(iter(blocks[i].allocated()))
                blocks[i] = blocks[i].release_handle(a.handle)[0]
            elif kind == "new" and len(blocks) < len(nets):
                blocks.append(
                    Block.new(nets[len(blocks)], data.draw(st.sampled_from(["n0", "n1"])))
                )
            elif kind == "drop" and len(blocks) > 1:
                blocks.pop(i)
            else:
                ns, name = (
                    data.draw(st.sampled_from(NAMESPACES)),
                    f"p{data.draw(st.integers(0, 8))}",
                )
                if data.draw(st.booleans()):
                    pods.pop((ns, name), None)
                else:
                    pod = decode(
                        {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "metadata": {
                                "namespace": ns,
                                "name": name,
                                "labels": data.draw(labels_st),
                            },
                        }
                    )
                    assert isinstance(pod, Pod)
                    pods[(ns, name)] = pod
        got = cache.build(blocks, pods.values())
        want = build_endpoints(
            allocations(blocks), pods.values(), "n0", lambda c, i: f"fab{c}{i}"[:15]
        )
        assert got == want
        again = cache.build(blocks, pods.values())
        assert all(a is b for a, b in zip(again, got, strict=True))
