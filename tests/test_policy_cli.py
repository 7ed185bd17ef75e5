"""fabricctl apply/get/delete/label of NetworkPolicy, Namespace and Pod, and policy trace,
against a real etcd (CliRunner in-process, one installed-binary run for stdin)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import Result

from ipam.allocator import Allocator
from ipam.pool import Pool
from ipam.request import AssignRequest
from ipam.resources import Resources
from ipam.store import Store

pytestmark = pytest.mark.etcd

FABRICCTL = str(Path(sys.executable).parent / "fabricctl")
Cli = Callable[..., Result]

# What `kubectl get namespaces,pods,networkpolicies -A -o yaml` prints (trimmed to 2 pods),
# with the server-side fields fabricctl must ignore for Pods and Namespaces.
KUBECTL_LIST = """\
apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    creationTimestamp: "2026-12-01T10:00:00Z"
    labels:
      kubernetes.io/metadata.name: x
      team: blue
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1: {f:metadata: {f:labels: {.: {}, f:kubernetes.io/metadata.name: {}}}}
      manager: kubectl-create
      operation: Update
      time: "2026-12-01T10:00:00Z"
    name: x
    resourceVersion: "401"
    uid: 5b1c9f5e-1111-4c1e-9a55-0b2d3c4e5f60
  spec:
    finalizers:
    - kubernetes
  status:
    phase: Active
- apiVersion: v1
  kind: Namespace
  metadata:
    labels:
      kubernetes.io/metadata.name: y
    name: y
    uid: 6b1c9f5e-2222-4c1e-9a55-0b2d3c4e5f60
  spec:
    finalizers: [kubernetes]
  status: {phase: Active}
- apiVersion: v1
  kind: Pod
  metadata:
    annotations:
      kubectl.kubernetes.io/restartedAt: "2026-12-01T10:01:00Z"
    creationTimestamp: "2026-12-01T10:01:00Z"
    generateName: a-7c9d8f-
    labels:
      pod: a
      pod-template-hash: 7c9d8f
    name: a
    namespace: x
    ownerReferences:
    - apiVersion: apps/v1
      blockOwnerDeletion: true
      controller: true
      kind: ReplicaSet
      name: a-7c9d8f
      uid: 7b1c9f5e-3333-4c1e-9a55-0b2d3c4e5f60
    resourceVersion: "512"
    uid: 8b1c9f5e-4444-4c1e-9a55-0b2d3c4e5f60
  spec:
    containers:
    - command: [/agnhost, serve-hostname, --tcp, --http=false, --port, "80"]
      image: registry.k8s.io/e2e-test-images/agnhost:2.53
      imagePullPolicy: IfNotPresent
      name: cont-80-tcp
      ports:
      - containerPort: 80
        name: serve-80-tcp
        protocol: TCP
      resources: {}
      securityContext: {}
      terminationMessagePath: /dev/termination-log
    - image: registry.k8s.io/e2e-test-images/agnhost:2.53
      name: cont-81-udp
      ports:
      - containerPort: 81
        name: serve-81-udp
        protocol: UDP
    dnsPolicy: ClusterFirst
    nodeName: node1
    restartPolicy: Always
    tolerations:
    - effect: NoExecute
      key: node.kubernetes.io/not-ready
      operator: Exists
      tolerationSeconds: 300
  status:
    phase: Running
    podIP: 10.244.1.5
    podIPs:
    - ip: 10.244.1.5
    conditions:
    - type: Ready
      status: "True"
- apiVersion: v1
  kind: Pod
  metadata:
    labels:
      pod: b
    name: b
    namespace: y
  spec:
    containers:
    - image: registry.k8s.io/e2e-test-images/agnhost:2.53
      name: c
  status: {phase: Pending}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy"}
    creationTimestamp: "2026-12-01T10:02:00Z"
    generation: 1
    name: allow-y
    namespace: x
    resourceVersion: "600"
    uid: 9b1c9f5e-5555-4c1e-9a55-0b2d3c4e5f60
  spec:
    ingress:
    - from:
      - namespaceSelector:
          matchLabels:
            kubernetes.io/metadata.name: y
      ports:
      - port: serve-80-tcp
        protocol: TCP
      - endPort: 90
        port: 85
        protocol: TCP
    podSelector:
      matchLabels:
        pod: a
    policyTypes:
    - Ingress
kind: List
metadata:
  resourceVersion: ""
"""


def _keys(endpoints: list[str], prefix: str) -> dict[str, bytes]:
    async def go() -> dict[str, bytes]:
        store = Store(endpoints, prefix)
        try:
            kvs, _ = await store.list("")
            return {kv.key: kv.value for kv in kvs}
        finally:
            await store.close()

    return asyncio.run(go())


def test_kubectl_list_applies_as_is_and_round_trips(cli: Cli, etcd_endpoints: list[str],
                                                    prefix: str) -> None:  # fmt: skip
    out = cli("apply", "-f", "-", input=KUBECTL_LIST).stdout.splitlines()
    assert out == ["Namespace x created", "Namespace y created", "Pod x/a created",
                   "Pod y/b created", "NetworkPolicy x/allow-y created"]  # fmt: skip
    keys = set(_keys(etcd_endpoints, prefix))
    assert keys == {"policy/namespaces/x", "policy/namespaces/y", "policy/pods/x/a",
                    "policy/pods/y/b", "policy/networkpolicies/x/allow-y"}  # fmt: skip
    again = cli("apply", "-f", "-", input=KUBECTL_LIST).stdout.splitlines()
    assert all(line.endswith(" unchanged") for line in again)
    pod = yaml.safe_load(cli("get", "pod", "x/a", "-o", "yaml").stdout)
    assert pod["metadata"] == {"name": "a", "namespace": "x",
                               "labels": {"pod": "a", "pod-template-hash": "7c9d8f"}}  # fmt: skip
    ports = pod["spec"]["containers"][0]["ports"]
    assert ports == [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
                     {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]  # fmt: skip
    ns = json.loads(cli("get", "ns", "x", "-o", "json").stdout)
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "x", "team": "blue"}
    # get -o yaml of everything is apply input again, unchanged
    dumped = "\n".join(cli("get", kind, "-A", "-o", "yaml").stdout
                       for kind in ("namespaces", "pods", "netpol"))  # fmt: skip
    assert all(line.endswith(" unchanged")
               for line in cli("apply", "-f", "-", input=dumped).stdout.splitlines())  # fmt: skip
    table = cli("get", "netpol", "-n", "x").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES", "INGRESS",
                                "EGRESS"]  # fmt: skip
    assert table[1].split() == ["x", "allow-y", "pod=a", "Ingress", "1", "0"]
    assert cli("get", "pods").stdout.splitlines()[1:] == []  # namespace default is empty
    assert len(cli("get", "po", "-A").stdout.splitlines()) == 3


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "not specified"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "non-numeric"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.egress[0].ports[0].endPort", "greater than or equal"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                            "except": ["11.0.0.0/16"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     "spec.ingress[0].ports[0].protocol", "unsupported value"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is", "values": ["b"]}]}},
     "spec.podSelector.matchExpressions[0].operator", "not a valid selector operator"),
    ({"podSelector": {}, "ingres": []}, "spec.ingres", "unknown field"),
    ({"podSelector": {"matchLabels": {"-bad": "x"}}}, "spec.podSelector.matchLabels.-bad",
     "name part"),
])  # fmt: skip
def test_rejected_policy_in_a_list_changes_nothing(cli: Cli, etcd_endpoints: list[str],
                                                    prefix: str, spec: dict[str, object],
                                                    field: str, words: str) -> None:  # fmt: skip
    doc = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ok"}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "bad", "namespace": "ok"}, "spec": spec}]}  # fmt: skip
    r = cli("apply", "-f", "-", input=yaml.safe_dump(doc), code=1)
    assert "NetworkPolicy ok/bad" in r.stderr and repr(field) in r.stderr and words in r.stderr
    assert "Traceback" not in r.stderr
    assert _keys(etcd_endpoints, prefix) == {}


def test_label_delete_and_trace(cli: Cli, etcd_endpoints: list[str], prefix: str) -> None:
    cli("apply", "-f", "-", input=KUBECTL_LIST)
    assert cli("label", "pod", "x/a", "tier=web", "pod-template-hash-").stdout.strip() == (
        "Pod x/a labeled"
    )
    pod = json.loads(cli("get", "pod", "a", "-n", "x", "-o", "json").stdout)
    assert pod["metadata"]["labels"] == {"pod": "a", "tier": "web"}
    assert "created" in cli("label", "pod", "z/cni-only", "app=x").stdout
    cli("label", "ns", "y", "team=red")
    r = cli("label", "ns", "y", "kubernetes.io/metadata.name=z", code=1)
    assert "set by the system" in r.stderr
    cli("label", "pod", "x/a", "bad key=1", code=1)

    # two pods with addresses recorded as the CNI ADD records them
    async def seed(store: Store) -> None:
        res = Resources(store)
        await res.create_pool(Pool.from_spec("p", {"cidr": "10.244.0.0/16"}))
        alloc = Allocator(store)
        for ns, pod, cid in (("x", "a", "c1"), ("y", "b", "c2")):
            attrs = {"network": "k8s", "containerID": cid, "ifname": "eth0", "pod": pod,
                     "namespace": ns}  # fmt: skip
            await alloc.auto_assign(AssignRequest(handle=f"k8s.{cid}.eth0", node="node1", num_v4=1,
                                             attrs=attrs))  # fmt: skip

    async def go() -> None:
        store = Store(etcd_endpoints, prefix)
        try:
            await seed(store)
        finally:
            await store.close()

    asyncio.run(go())
    t = json.loads(cli("policy", "trace", "y/b", "x/a", "80/TCP", "-o", "json").stdout)
    assert t["allowed"] and t["ingress"]["rule"] == "x/allow-y ingress[0]"
    t = json.loads(cli("policy", "trace", "y/b", "x/a", "81/udp", "-o", "json").stdout)
    assert not t["allowed"]
    assert t["reason"] == ("denied: selected by x/allow-y; no rule allows 81/UDP from y/b "
                           "(ingress at x/a)")  # fmt: skip
    assert cli("policy", "trace", "y/b", "x/a", "87").stdout.startswith("Verdict:")
    assert "always allowed" in cli("policy", "trace", "host", "x/a", "81/UDP").stdout
    r = cli("policy", "trace", "y/b", "x/nope", "80/TCP", code=1)
    assert "x/nope" in r.stderr
    cli("policy", "trace", "y/b", "x/a", "80/ICMP", code=1)

    cli("delete", "netpol", "allow-y", "-n", "x")
    assert "allowed" in cli("policy", "trace", "y/b", "x/a", "81/UDP").stdout
    r = cli("delete", "-f", "-", input=KUBECTL_LIST, code=1)  # the policy is gone already
    assert "Pod x/a deleted" in r.stdout and "not found" in r.stderr
    assert not any(k.startswith("policy/") and "cni-only" not in k
                   for k in _keys(etcd_endpoints, prefix))  # fmt: skip


def test_installed_fabricctl_reads_stdin(etcd_env: dict[str, str]) -> None:
    p = subprocess.run([FABRICCTL, "apply", "-f", "-"], env=etcd_env, input=KUBECTL_LIST,
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = subprocess.run([FABRICCTL, "get", "ns"], env=etcd_env, capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0 and "team=blue" in p.stdout
