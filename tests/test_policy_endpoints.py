"""Endpoints from what the CNI ADD really records: fabricd's CNI verbs against a real etcd
(the stand-in dataplane of test_cni_workloads), then build_endpoints over the blocks read
back, with a Pod object applied to the real store."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_cni_workloads import NETNS, NODE, Env, make  # noqa: F401  (the fixture)

from fabric.dataplane.pods import host_ifname
from fabric.policy.endpoints import allocations, build_endpoints
from fabric.policy.model import NamedPort
from fabric.resources.policy_model import Pod
from fabric.resources.policy_store import PolicyStore
from fabric.workloads.server import answer

pytestmark = pytest.mark.etcd

LABELS = {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": "1"}]}}


async def add(e: Env, conf_args: dict[str, Any]) -> tuple[int, Any]:
    """A CNI ADD of container c1 (pod ns/pod-c1) whose network config has ``args``."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": NETNS, "CNI_PATH": "/opt/cni/bin", "FABRIC_CNI_PLUGIN": "fabric",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod-c1"}  # fmt: skip
    doc = {"cniVersion": "1.0.0", "name": "net", "type": "fabric", "args": conf_args}
    code, out = await answer(e.w, lambda *_: None, env, json.dumps(doc).encode(), 0)
    return code, json.loads(out) if out else None


def test_add_records_cni_labels_and_the_pod_object_overlays_them(make: Any) -> None:  # noqa: F811
    async def go() -> None:
        async with make() as e:
            code, res = await add(e, LABELS)
            assert code == 0, res
            blocks, _ = await e.alloc.blocks.list_blocks()
            attrs = next(a.secondary for _, b in blocks.values() for _, a in b.allocated())
            assert json.loads(attrs["labels"]) == {"app": "web", "tier": "1"}

            store = PolicyStore(e.alloc.resources.store)
            await store.apply([Pod("ns", "pod-c1", {"tier": "2"}, (NamedPort("http", 80),))])
            pods = await store.list_objects("Pod")
            eps = build_endpoints(allocations(b for _, b in blocks.values()), pods,  # type: ignore[arg-type]
                                  NODE, host_ifname)  # fmt: skip
            assert len(eps) == 1
            ep = eps[0]
            assert ep.key == "ns/pod-c1" and ep.node == NODE
            assert ep.labels == {"app": "web", "tier": "2"}
            assert ep.ports == (NamedPort("http", 80),)
            assert ep.ifname == res["interfaces"][0]["name"] == host_ifname("c1", "eth0")
            assert [str(ip) for ip in ep.ips] == [res["ips"][0]["address"].split("/")[0]]

    asyncio.run(go())


def test_malformed_cni_labels_refuse_the_add_and_hold_nothing(make: Any) -> None:  # noqa: F811
    async def go() -> None:
        async with make() as e:
            code, res = await add(e, {"cni": {"labels": "app=web"}})
            assert code != 0 and res["code"] == 7 and "args.cni.labels" in res["msg"], res
            assert await e.held("net.c1.eth0") == []

    asyncio.run(go())
