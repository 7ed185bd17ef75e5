"""NetworkPolicy/Namespace/Pod documents: API-server validation (each error names its field),
defaulting, round trips through the stored document, and endpoints built from IPAM block
allocations + Pod objects + CNI labels (pure, no etcd)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_compiler import policy_st

from fabric.policy.endpoints import allocations, build_endpoints
from fabric.policy.model import NamedPort, Protocol
from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import (
    Direction,
    Namespace,
    NetworkPolicy,
    Pod,
    to_document,
)
from fabric.workloads.pod_ipam import Owner, cni_labels
from ipam.block import Attribute, Block
from ipam.errors import ValidationError


def _np(spec: Any, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x", **meta}, "spec": spec}  # fmt: skip


def _error(doc: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        decode(doc)
    return e.value


BAD_POLICIES = [
    ({"ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort",
     "may not be specified when `port` is not specified"),
    ({"ingress": [{"ports": [{"port": "web", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "may not be specified when `port` is non-numeric"),
    ({"egress": [{"ports": [{"port": 90, "endPort": 89}]}]}, "spec.egress[0].ports[0].endPort",
     "must be greater than or equal to `port`"),
    ({"egress": [{"ports": [{"port": 90, "endPort": 70000}]}]},
     "spec.egress[0].ports[0].endPort", "between 1 and 65535"),
    ({"egress": [{"ports": [{"port": 0}]}]}, "spec.egress[0].ports[0].port", "between 1 and 65535"),
    ({"egress": [{"ports": [{"port": "80"}]}]}, "spec.egress[0].ports[0].port", "port name"),
    ({"egress": [{"ports": [{"port": "a--b"}]}]}, "spec.egress[0].ports[0].port", "port name"),
    ({"egress": [{"ports": [{"port": "sixteen-chars-xx"}]}]}, "spec.egress[0].ports[0].port",
     "port name"),
    ({"ingress": [{"ports": [{"protocol": "tcp"}]}]}, "spec.ingress[0].ports[0].protocol",
     "unsupported value 'tcp'"),
    ({"ingress": [{"ports": [{"prot": "TCP"}]}]}, "spec.ingress[0].ports[0].prot", "unknown field"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "must be a CIDR"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
    ({"ingress": [{"from": [{"ipBlock": {}}]}]}, "spec.ingress[0].from[0].ipBlock.cidr",
     "is required"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]", "more than 1 peer"),
    ({"ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]", "must specify a peer"),
    ({"egress": [{"from": []}]}, "spec.egress[0].from", "unknown field"),
    ({"podSelector": {"matchExpressions": [{"key": "k", "operator": "in", "values": ["v"]}]}},
     "spec.podSelector.matchExpressions[0].operator", "not a valid selector operator"),
    ({"podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values", "must be specified"),
    ({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]}},
     "spec.podSelector.matchExpressions[0].values", "may not be specified"),
    ({"podSelector": {"matchExpressions": [{"key": "bad key", "operator": "Exists"}]}},
     "spec.podSelector.matchExpressions[0].key", "name part"),
    ({"podSelector": {"matchLabels": {"k": "bad value"}}}, "spec.podSelector.matchLabels.k",
     "label value"),
    ({"podSelector": {"matchLabels": {"k": 1}}}, "spec.podSelector.matchLabels.k", "string"),
    ({"podSelector": {"matchLabels": {"Bad.Prefix/k": "v"}}},
     "spec.podSelector.matchLabels.Bad.Prefix/k", "prefix"),
    ({"podSelector": {"matchLabel": {}}}, "spec.podSelector.matchLabel", "unknown field"),
    ({"policyTypes": ["Ingress", "Sideways"]}, "spec.policyTypes[1]", "unsupported value"),
    ({"policyTypes": ["Ingress", "Egress", "Ingress"]}, "spec.policyTypes", "more than two"),
    ({"podSelector": {}, "extra": 1}, "spec.extra", "unknown field"),
    ({"ingress": {"from": []}}, "spec.ingress", "must be a list"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "field", "words"), BAD_POLICIES)
def test_each_invalid_policy_names_its_field(spec: Any, field: str, words: str) -> None:
    e = _error(_np(spec))
    assert (e.field, e.resource) == (field, "NetworkPolicy x/p")
    assert words in e.problem


@pytest.mark.parametrize(("doc", "field"), [
    ({"apiVersion": "v1", "kind": "NetworkPolicy", "metadata": {"name": "p"}}, "apiVersion"),
    (_np({}, name="Upper"), "metadata.name"),
    ({**_np({}), "specs": {}}, "specs"),
    (_np({}, namespace="a_b"), "metadata.namespace"),
    (_np({}, labels={"app": "a b"}), "metadata.labels.app"),
    ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}}, "metadata.name"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
      "spec": {"containers": [{"ports": [{"containerPort": 0}]}]}},
     "spec.containers[0].ports[0].containerPort"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
      "spec": {"containers": [{"ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}},
     "spec.containers[0].ports[0].protocol"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
      "spec": {"containers": [{"ports": [{"containerPort": 80, "name": "web"}]},
                              {"ports": [{"containerPort": 81, "name": "web"}]}]}},
     "spec.containers[1].ports[0].name"),
])  # fmt: skip
def test_metadata_and_pod_errors_name_their_field(doc: dict[str, Any], field: str) -> None:
    assert _error(doc).field == field


def test_defaulting_and_ignored_fields() -> None:
    p = decode(_np({"podSelector": {}, "egress": [{}]}))
    assert isinstance(p, NetworkPolicy)
    assert p.policy_types == (Direction.INGRESS, Direction.EGRESS)
    assert p.egress[0].peers is None and p.egress[0].ports is None
    p = decode(_np({"podSelector": {}, "egress": []}))
    assert isinstance(p, NetworkPolicy) and p.policy_types == (Direction.INGRESS,)
    p = decode(_np({"ingress": [{"ports": [{"port": 80}], "from": []}]}))
    assert isinstance(p, NetworkPolicy) and p.ingress[0].peers is None
    assert p.ingress[0].ports is not None and p.ingress[0].ports[0].protocol is Protocol.TCP
    ns = decode({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "x", "uid": "u", "labels": {
                     "kubernetes.io/metadata.name": "other"}}, "status": {"phase": "Active"}})  # fmt: skip
    assert ns == Namespace("x", {"kubernetes.io/metadata.name": "x"})
    pod = decode({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
                  "spec": {"containers": [{"image": "i", "ports": [{"containerPort": 80}]}],
                           "nodeName": "n"}, "status": {"podIP": "10.0.0.1"}})  # fmt: skip
    assert pod == Pod("default", "a", {}, (NamedPort("", 80, Protocol.TCP),))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 9).flatmap(policy_st))
def test_policy_document_round_trip(doc: dict[str, Any]) -> None:
    """decode -> to_document -> JSON -> decode is the identity (what etcd stores reads back
    equal), and to_document is a fixed point."""
    obj = decode(doc)
    stored = json.loads(json.dumps(to_document(obj)))
    assert decode(stored) == obj
    assert to_document(decode(stored)) == stored


def test_endpoints_from_allocations_pods_and_cni_labels() -> None:
    blk = Block.new(ipaddress.ip_network("10.244.1.0/30"), "n1")
    six = Block.new(ipaddress.ip_network("fd00::/126"), "n1")
    k8s = Attribute("k8s.c1.eth0", {"node": "n1", "network": "k8s", "containerID": "c1",
                                    "ifname": "eth0", "pod": "a", "namespace": "x",
                                    "labels": json.dumps({"app": "cni", "tier": "t"})})  # fmt: skip
    bare = Attribute("k8s.c2.eth0", {"node": "n2", "network": "k8s", "containerID": "c2",
                                     "ifname": "eth0"})  # fmt: skip
    manual = Attribute("manual", {"node": "n1"})  # not a pod: ipam assign by hand
    blk, _ = blk.assign(1, k8s)
    blk, _ = blk.assign(1, bare)
    blk, _ = blk.assign(1, manual)
    six, _ = six.assign(1, k8s)
    pods = [Pod("x", "a", {"app": "obj"}, (NamedPort("web", 8080), NamedPort("", 9)))]
    eps = build_endpoints(allocations([blk, six]), pods, "n1", lambda c, i: f"veth-{c}-{i}")
    assert [e.key for e in eps] == ["default/c2", "x/a"]
    bare_ep, a = eps
    assert a.ips == (ipaddress.ip_address("10.244.1.0"), ipaddress.ip_address("fd00::"))
    assert a.labels == {"app": "obj", "tier": "t"}  # the Pod object wins over CNI labels
    assert a.ports == (NamedPort("web", 8080),)
    assert (a.node, a.ifname) == ("n1", "veth-c1-eth0")
    assert (bare_ep.node, bare_ep.ifname, bare_ep.labels) == ("n2", None, {})


def test_cni_args_labels_are_recorded_on_the_allocation() -> None:
    args = {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": "1"}]}}
    assert json.loads(cni_labels(args)) == {"app": "web", "tier": "1"}
    assert cni_labels({}) == "" and cni_labels({"cni": {}}) == ""
    with pytest.raises(ValidationError) as e:
        cni_labels({"cni": {"labels": [{"key": "app"}]}})
    assert e.value.field == "args.cni.labels[0]"
    owner = Owner("k8s", "c1", "eth0", labels=cni_labels(args))
    assert json.loads(owner.attrs()["labels"]) == {"app": "web", "tier": "1"}
