"""The CNI verbs in fabricd against a real etcd, with a stand-in dataplane and route table:
results, idempotency, rollback of every step, GC, STATUS, recovery after a crash."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cni.errors import CNIError, Code
from cni.install import PENDING_DIR
from cni.spec import parse_request
from fabric.dataplane import attachment as att
from fabric.dataplane.netlink import IPNetwork, KernelRoute
from fabric.dataplane.route_table import FlushResult
from fabric.workloads.deps import Deps
from fabric.workloads.pending import PendingDir
from fabric.workloads.pod_ipam import PodIPAM
from fabric.workloads.server import answer
from fabric.workloads.state import Phase, Record, StateDir
from fabric.workloads.verbs import Workloads
from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.pool import Pool
from ipam.request import AssignRequest
from ipam.resources import Node
from ipam.store import Store

pytestmark = pytest.mark.etcd
NETNS = "/proc/self/ns/net"  # a real network namespace; the fake dataplane never enters it
NODE = "n1"


@dataclass
class FakeDataplane:
    """create (while IPAM runs) + configure, like the real one; ``attached`` by host name."""

    attached: dict[str, att.Attachment] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)  # pairs made, not configured yet
    fail_create: BaseException | None = None
    fail_attach: BaseException | None = None  # configure fails (after removing the pair)
    problems: list[str] = field(default_factory=list)
    attach_delay: float = 0.0
    calls: list[str] = field(default_factory=list)

    async def create(self, container_id: str, ifname: str, netns: str, mtu: int,
                     fams: frozenset[int]) -> att.Veth:  # fmt: skip
        self.calls.append("create")
        if self.fail_create is not None:
            raise self.fail_create
        host = att.host_ifname(container_id, ifname)
        self.created.add(host)
        return att.Veth(container_id, ifname, netns, mtu, fams, host, "0a:00:00:00:00:01", 1, 2,
                       -1, None)  # fmt: skip

    async def configure(self, veth: att.Veth, a: att.Attachment) -> att.Attached:
        self.calls.append("configure")
        await asyncio.sleep(self.attach_delay)
        self.created.discard(veth.host_ifname)
        if self.fail_attach is not None:
            raise self.fail_attach
        self.attached[veth.host_ifname] = a
        return veth.attached(a)

    async def discard(self, veth: att.Veth) -> None:
        self.calls.append("discard")
        self.created.discard(veth.host_ifname)
        self.attached.pop(veth.host_ifname, None)

    async def detach(self, container_id: str, ifname: str, netns: str | None) -> bool:
        self.calls.append("detach")
        host = att.host_ifname(container_id, ifname)
        self.created.discard(host)
        return self.attached.pop(host, None) is not None

    async def check(self, a: att.Attachment) -> list[str]:
        return list(self.problems)

    async def close(self) -> None:
        pass


@dataclass
class FakeRoutes:
    desired: dict[IPNetwork, KernelRoute] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)  # devices the "kernel" refuses
    pending: set[IPNetwork] = field(default_factory=set)

    def set(self, dst: IPNetwork, route: KernelRoute | None) -> None:
        self.pending.add(dst)
        if route is None:
            self.desired.pop(dst, None)
        else:
            self.desired[dst] = route

    async def flush(self) -> FlushResult:
        failed = {d: "no device" for d in self.pending if (r := self.desired.get(d)) is not None
                  and r.dev in self.refuse}  # fmt: skip
        self.pending = set(failed)
        return FlushResult(failed=failed)

    def installed(self) -> dict[IPNetwork, KernelRoute]:
        return {d: r for d, r in self.desired.items() if d not in self.pending}


@dataclass
class Env:
    w: Workloads
    dp: FakeDataplane
    routes: FakeRoutes
    alloc: Allocator
    state: Path
    ok: list[bool]

    async def call(self, verb: str, cid: str = "c1", ifname: str = "eth0", version: str = "1.0.0",
                   plugin: str = "fabric", args: str = "", **conf: Any) -> tuple[int, Any]:  # fmt: skip
        env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
               "CNI_NETNS": NETNS, "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod-" + cid
                           + ";K8S_POD_INFRA_CONTAINER_ID=" + cid + args,
               "FABRIC_CNI_PLUGIN": plugin}  # fmt: skip
        env.update(conf.pop("env", {}))
        doc = {"cniVersion": version, "name": "net", "type": "fabric", **conf}
        code, out = await answer(self.w, lambda *_: None, env, json.dumps(doc).encode(), 0)
        return code, json.loads(out) if out else None

    async def held(self, handle: str) -> list[str]:
        return [str(a.ip) for a in await self.alloc.ips_by_handle(handle)]


@pytest.fixture
def make(etcd_endpoints: list[str], prefix: str, tmp_path: Path) -> Callable[..., Any]:
    """``async with make() as e``: a Workloads on node n1 with pool 10.99.0.0/24."""
    import contextlib

    @contextlib.asynccontextmanager
    async def ctx(endpoints: list[str] | None = None, setup: bool = True,
                  policy: Any = None, pending: bool = False) -> AsyncIterator[Env]:  # fmt: skip
        async with Store(endpoints or etcd_endpoints, prefix, deadline=1.0) as store:
            alloc = Allocator(store)
            if endpoints is None and setup:
                await alloc.resources.create_pool(
                    Pool.from_spec("pods", {"cidr": "10.99.0.0/24", "blockSize": 28}))  # fmt: skip
                await alloc.resources.put_node(Node(NODE))
            fdp, routes, ok = FakeDataplane(), FakeRoutes(), [True]

            async def datastore_ok() -> bool:
                return ok[0]

            deps = Deps(NODE, PodIPAM(alloc, BatchingAllocator(alloc), NODE), fdp,
                        routes, StateDir(tmp_path / "state"), datastore_ok, policy=policy,
                        pending=PendingDir(tmp_path / "state") if pending else None)  # fmt: skip
            w = Workloads(deps)
            await w.recover()
            yield Env(w, fdp, routes, alloc, tmp_path / "state", ok)

    return ctx


def state_files(e: Env) -> list[str]:
    return sorted(p.name for p in e.state.iterdir()) if e.state.exists() else []


def test_add_check_del_del(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            code, res = await e.call("ADD", version="0.4.0")
            assert code == 0, res
            ip = res["ips"][0]
            assert ip["version"] == "4" and ip["gateway"] == "169.254.1.1" and ip["interface"] == 1
            assert ipaddress.ip_interface(ip["address"]) in ipaddress.ip_network("10.99.0.0/24")
            assert res["interfaces"][1] == {"name": "eth0", "mac": "0a:00:00:00:00:01",
                                            "sandbox": NETNS}  # fmt: skip
            assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
            addr = ip["address"].split("/")[0]
            assert await e.held("net.c1.eth0") == [addr]
            route = e.routes.desired[ipaddress.ip_network(f"{addr}/32")]
            assert route.dev == res["interfaces"][0]["name"] and e.w.owns(route.dst)
            assert route.dst in e.w.routed  # what the agent's kernel_changes checks against
            assert state_files(e) == ["net.c1.eth0.json"]
            rec = json.loads((e.state / "net.c1.eth0.json").read_text())
            assert (rec["phase"], rec["pod"], rec["namespace"]) == ("ready", "pod-c1", "ns")
            blk = (await e.alloc.blocks.list_blocks())[0]
            attrs = next(a.secondary for _, b in blk.values() for _, a in b.allocated())
            assert attrs == {"node": NODE, "network": "net", "containerID": "c1", "ifname": "eth0",
                             "pod": "pod-c1", "namespace": "ns", "infraContainerID": "c1"}  # fmt: skip

            assert await e.call("CHECK", version="0.4.0", prevResult=res) == (0, None)
            for _ in range(2):
                assert await e.call("DEL", version="0.4.0", prevResult=res) == (0, None)
                assert await e.held("net.c1.eth0") == []
                assert e.routes.desired == {} and e.dp.attached == {} and state_files(e) == []
                assert not e.w.owns(route.dst) and route.dst not in e.w.routed

    asyncio.run(go())


def test_second_add_same_attachment_same_address(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            _, first = await e.call("ADD")
            _, again = await e.call("ADD")
            assert again == first and e.dp.calls == ["create", "configure"]
            e.dp.problems = ["pod interface eth0 is missing"]  # broken: rebuilt, same address
            _, rebuilt = await e.call("ADD")
            assert rebuilt["ips"] == first["ips"]
            assert e.dp.calls == ["create", "configure", "detach", "create", "configure"]
            assert len(await e.held("net.c1.eth0")) == 1

    asyncio.run(go())


def test_requested_ip_and_taken_ip(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            code, res = await e.call("ADD", args=";IP=10.99.0.77")
            assert code == 0 and res["ips"][0]["address"] == "10.99.0.77/32"
            code, err = await e.call("ADD", cid="c2", args=";IP=10.99.0.77")
            assert code == 1 and err["code"] == Code.ADDRESS_TAKEN
            assert await e.held("net.c2.eth0") == [] and state_files(e) == ["net.c1.eth0.json"]
            code, err = await e.call("ADD", cid="c3", args=";IP=10.1.1.1")
            assert code == 1 and err["code"] == Code.INVALID_CONFIG

    asyncio.run(go())


@dataclass
class RecordingGate:
    """A policy gate that records what it is asked (the real one: tests/test_nft_agent.py)."""

    admitted: list[tuple[str, str, list[str]]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    async def admit(self, rec: Record, cni_labels: str) -> None:
        self.admitted.append((rec.handle, rec.host_ifname, [str(i.ip) for i in rec.ips]))
        await asyncio.sleep(0.05)  # a batch in flight while the veth is configured
        self.done.append(rec.handle)

    def release(self, handle: str) -> None:
        self.released.append(handle)


def test_policy_endpoint_is_admitted_with_the_address_and_released_on_failure(make: Any) -> None:
    """The gate is asked as soon as the address is known (host interface by name, as nft
    matches it); a configure failure waits for the admit to end, then releases it."""

    async def go() -> None:
        gate = RecordingGate()
        async with make(policy=gate) as e:
            code, res = await e.call("ADD")
            assert code == 0, res
            assert gate.admitted == [("net.c1.eth0", att.host_ifname("c1", "eth0"),
                                      [res["ips"][0]["address"].split("/")[0]])]  # fmt: skip
            assert gate.done == ["net.c1.eth0"] and gate.released == []
            e.dp.fail_attach = OSError(5, "configure failed")
            code, err = await e.call("ADD", cid="c2")
            assert code == 1 and "configure failed" in err["msg"], err
            assert gate.done[-1] == "net.c2.eth0" and set(gate.released) == {"net.c2.eth0"}
            assert await e.held("net.c2.eth0") == []

    asyncio.run(go())


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (att.InterfaceExists("eth0 exists"), Code.INTERFACE_EXISTS),
        (att.NetnsNotFound("gone"), Code.UNKNOWN_CONTAINER),
        (att.DataplaneError("EPERM"), Code.DATAPLANE_FAILURE),
        (RuntimeError("bug"), Code.INTERNAL),
    ],
)
def test_attach_failure_rolls_back(make: Any, failure: BaseException, code: int) -> None:
    async def go() -> None:
        async with make() as e:
            e.dp.fail_attach = failure
            got, err = await e.call("ADD")
            assert got == 1 and err["code"] == code
            assert await e.held("net.c1.eth0") == [] and state_files(e) == []
            assert e.routes.desired == {} and e.w.records == {}
            assert e.dp.calls == ["create", "configure", "discard"]  # by host name only
            assert e.dp.created == set() and e.dp.attached == {}

    asyncio.run(go())


def test_create_failure_releases_what_ipam_gave(make: Any) -> None:
    """The veth half fails while the IPAM half succeeds: the address goes back, and a failed
    create (e.g. the pod's eth0 is someone else's) is never detached."""

    async def go() -> None:
        async with make() as e:
            e.dp.fail_create = att.InterfaceExists("eth0 exists")
            got, err = await e.call("ADD")
            assert got == 1 and err["code"] == Code.INTERFACE_EXISTS
            assert await e.held("net.c1.eth0") == [] and state_files(e) == []
            assert e.dp.calls == ["create"] and e.w.records == {}

    asyncio.run(go())


def test_ipam_failure_discards_the_veth_made_meanwhile(make: Any) -> None:
    """The IPAM half fails (pool exhausted) while the veth half succeeded: the pair goes."""

    async def go() -> None:
        async with make() as e:
            code, err = await e.call("ADD", ipam={"type": "fabric-ipam", "pools": ["nope"]})
            assert code == 1 and err["code"] == Code.INVALID_CONFIG
            assert e.dp.calls == ["create", "discard"] and e.dp.created == set()
            assert e.dp.attached == {} and state_files(e) == [] and e.w.records == {}
            assert await e.held("net.c1.eth0") == []

    asyncio.run(go())


def test_route_failure_rolls_back(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            e.routes.refuse.add(att.host_ifname("c1", "eth0"))
            code, err = await e.call("ADD")
            assert code == 1 and err["code"] == Code.HOST_ROUTE_FAILURE
            assert e.dp.attached == {} and e.dp.calls == ["create", "configure", "discard"]
            assert await e.held("net.c1.eth0") == [] and state_files(e) == []
            assert e.routes.desired == {}

    asyncio.run(go())


def test_cancelled_add_rolls_back(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            e.dp.attach_delay = 1.0  # the kernel work runs on: rollback waits for it, undoes it
            task = asyncio.create_task(e.call("ADD"))
            await asyncio.sleep(0.3)
            assert state_files(e) == ["net.c1.eth0.json"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await e.held("net.c1.eth0") == [] and state_files(e) == []
            assert e.dp.attached == {} and e.dp.calls == ["create", "configure", "discard"]

    asyncio.run(go())


def test_del_of_the_unknown_and_with_empty_netns(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            assert await e.call("DEL", cid="never") == (0, None)
            await e.call("ADD")
            assert await e.call("DEL", env={"CNI_NETNS": ""}) == (0, None)
            assert e.dp.attached == {} and await e.held("net.c1.eth0") == []

    asyncio.run(go())


def test_check_mismatches(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            _, res = await e.call("ADD")
            assert (await e.call("CHECK", cid="other", prevResult=res))[1]["code"] == 3
            wrong = {**res, "ips": [{**res["ips"][0], "address": "10.99.0.250/32"}]}
            assert (await e.call("CHECK", prevResult=wrong))[1]["code"] == Code.CHECK_FAILED
            assert (await e.call("CHECK"))[1]["code"] == Code.INVALID_CONFIG  # no prevResult
            e.dp.problems = ["address 10.99.0.1/32 missing on eth0"]
            _, err = await e.call("CHECK", prevResult=res)
            assert err["code"] == Code.CHECK_FAILED and "missing on eth0" in err["msg"]
            e.dp.problems = []
            await e.alloc.release_handle("net.c1.eth0")  # behind fabricd's back
            assert (await e.call("CHECK", prevResult=res))[1]["code"] == Code.IPAM_MISMATCH

    asyncio.run(go())


def test_gc_releases_what_is_not_valid(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            for cid in ("keep", "drop"):
                assert (await e.call("ADD", cid=cid))[0] == 0
            # a leak fabricd has no record of: an allocation for this network on this node
            await e.alloc.auto_assign(AssignRequest("net.leak.eth0", NODE, attrs={
                "network": "net", "containerID": "leak", "ifname": "eth0"}))  # fmt: skip
            # another network's allocation is not this GC's business
            await e.alloc.auto_assign(AssignRequest("other.x.eth0", NODE, attrs={
                "network": "other", "containerID": "x", "ifname": "eth0"}))  # fmt: skip
            code, err = await e.call("GC", version="1.1.0")  # no list: refused, nothing freed
            assert code == 1 and err["code"] == Code.INVALID_CONFIG
            valid = [{"containerID": "keep", "ifname": "eth0"}]
            code, _ = await e.call("GC", version="1.1.0", **{"cni.dev/valid-attachments": valid})
            assert code == 0
            assert await e.held("net.keep.eth0") != []
            assert await e.held("net.drop.eth0") == [] and await e.held("net.leak.eth0") == []
            assert await e.held("other.x.eth0") != []
            assert state_files(e) == ["net.keep.eth0.json"]
            assert list(e.dp.attached) == [att.host_ifname("keep", "eth0")]

    asyncio.run(go())


def test_status(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            assert await e.call("STATUS", version="1.1.0") == (0, None)
            pools = {"type": "fabric-ipam", "pools": ["nope"]}
            _code, err = await e.call("STATUS", version="1.1.0", ipam=pools)
            assert err["code"] == Code.NOT_AVAILABLE and "nope" in err["msg"]
            await e.alloc.resources.set_pool_disabled("pods", True)
            assert (await e.call("STATUS", version="1.1.0"))[1]["code"] == Code.NOT_AVAILABLE
            e.ok[0] = False
            _, err = await e.call("STATUS", version="1.1.0")
            assert err["code"] == Code.NOT_AVAILABLE and "etcd" in err["msg"]

    asyncio.run(go())


def test_etcd_down_is_try_again_later(make: Any) -> None:
    async def go() -> None:
        async with make(["127.0.0.1:9"]) as e:
            for verb in ("ADD", "DEL"):
                code, err = await e.call(verb)
                assert code == 1 and err["code"] == Code.TRY_AGAIN_LATER, err
            assert state_files(e) == ["net.c1.eth0.json"]  # DEL kept it: the retry finishes

    asyncio.run(go())


def test_del_while_etcd_is_down_is_recorded_and_finished_exactly(make: Any) -> None:
    """A DEL that reaches fabricd while etcd does not answer tears the dataplane down,
    records itself in pending-del/ (as the plugin does without fabricd) and answers success;
    an ADD of the same attachment answers 11 meanwhile; once etcd answers (here: fabricd
    restarted), the address is free, the recorded DEL finished, and the ADD works again."""

    async def go() -> None:
        async with make(pending=True) as e:
            code, res = await e.call("ADD")
            assert code == 0, res
            ip = res["ips"][0]["address"].split("/")[0]
            assert (await e.call("ADD", cid="c2"))[0] == 0
        async with make(["127.0.0.1:9"], setup=False, pending=True) as down:
            assert down.dp.calls == []
            code, out = await down.call("DEL")
            assert (code, out) == (0, None)
            assert down.dp.calls == ["detach"]  # the veth went at once
            kept = down.w.records["net.c1.eth0"]  # the record names the allocation for later
            assert ipaddress.ip_network(f"{ip}/32") not in down.w.routes()  # host route gone
            assert kept.phase is Phase.DELETING and [str(i.ip) for i in kept.ips] == [ip]
            assert kept.seqs
            recorded = sorted((down.state / PENDING_DIR).glob("*.del"))
            assert len(recorded) == 1 and recorded[0].stat().st_mode & 0o777 == 0o600
            assert (down.state / PENDING_DIR).stat().st_mode & 0o777 == 0o700
            code, err = await down.call("ADD")  # the same attachment: its DEL first
            assert code == 1 and err["code"] == Code.TRY_AGAIN_LATER, err
            down.ok[0] = False  # the agent's probe knows etcd is down: no store deadline
            started = time.monotonic()
            assert await down.call("DEL", cid="c2") == (0, None)
            assert time.monotonic() - started < 0.5
            assert len(list((down.state / PENDING_DIR).glob("*.del"))) == 2
        async with make(setup=False, pending=True) as up:  # etcd back, fabricd restarted
            # the start finishes the record left `deleting` (its handle), then the sweep
            assert await up.held("net.c1.eth0") == [] and await up.held("net.c2.eth0") == []
            assert await up.w.pending.finish() == 0
            assert list((up.state / PENDING_DIR).glob("*.del")) == []
            assert state_files(up) == [PENDING_DIR]
            code, res = await up.call("ADD")
            assert code == 0, res

    asyncio.run(go())


def test_del_while_etcd_is_down_without_a_pending_dir_is_try_again_later(make: Any) -> None:
    async def go() -> None:
        async with make(["127.0.0.1:9"]) as e:
            code, err = await e.call("DEL")
            assert code == 1 and err["code"] == Code.TRY_AGAIN_LATER, err

    asyncio.run(go())


def test_recover_finishes_interrupted_work(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            _, res = await e.call("ADD", cid="ready")
            got = await e.alloc.auto_assign(AssignRequest("net.half.eth0", NODE))
            half = Record("net.half.eth0", "net", "half", "eth0", NETNS,
                          att.host_ifname("half", "eth0"), Phase.ADDING,
                          (ipaddress.ip_interface(got[0].host_prefix),))  # fmt: skip
            e.w.d.state.save(half)
        async with make(setup=False) as e2:  # a restarted fabricd
            assert set(e2.w.records) == {"net.ready.eth0"}
            assert await e2.held("net.half.eth0") == []
            ready_ip = res["ips"][0]["address"].split("/")[0]
            assert list(e2.w.routes()) == [ipaddress.ip_network(f"{ready_ip}/32")]
            assert e2.dp.calls == ["detach"]
            assert await e2.call("DEL", cid="ready") == (0, None)

    asyncio.run(go())


def test_ipam_plugin(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            ipam = {"type": "fabric-ipam", "pools": ["pods"]}
            code, res = await e.call("ADD", plugin="fabric-ipam", type="ptp", ipam=ipam)
            assert code == 0 and "interfaces" not in res and e.dp.calls == []
            assert res["ips"][0]["address"].endswith("/32") and "gateway" not in res["ips"][0]
            assert state_files(e) == []
            code, again = await e.call("ADD", plugin="fabric-ipam", type="ptp", ipam=ipam)
            assert again == res
            assert await e.call("CHECK", plugin="fabric-ipam", ipam=ipam, prevResult=res) == (
                0,
                None,
            )
            assert await e.call("DEL", plugin="fabric-ipam", ipam=ipam) == (0, None)
            assert await e.held("net.c1.eth0") == []
            ptp = {**ipam, "addressPrefix": "pool", "gateway": "10.99.0.254",
                   "routes": [{"dst": "0.0.0.0/0"}]}  # fmt: skip
            code, res = await e.call("ADD", cid="c2", plugin="fabric-ipam", type="ptp", ipam=ptp)
            assert (
                res["ips"][0]["address"].endswith("/24")
                and res["ips"][0]["gateway"] == "10.99.0.254"
            )
            assert res["routes"] == [{"dst": "0.0.0.0/0"}]
            code, err = await e.call("ADD", cid="c3", plugin="fabric-ipam",
                                     ipam={"type": "fabric-ipam", "pools": ["missing"]})  # fmt: skip
            assert err["code"] == Code.INVALID_CONFIG and "missing" in err["msg"]

    asyncio.run(go())


def test_concurrent_adds_get_distinct_addresses(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            results = await asyncio.gather(*(e.call("ADD", cid=f"c{i}") for i in range(12)))
            ips = [r["ips"][0]["address"] for code, r in results if code == 0]
            assert len(ips) == 12 and len(set(ips)) == 12
            assert e.w.d.ipam.batch.batches > 0

    asyncio.run(go())


def test_parse_request_is_what_answer_uses(make: Any) -> None:
    """``answer`` validates with ``cni.spec.parse_request``: what parse_request makes of a
    request is what the verb gets (no ipam section: every pool of the node), and what it
    refuses, answer refuses with the same code and message, without running the verb."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": NETNS,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}  # fmt: skip
    good = b'{"cniVersion":"1.0.0","name":"net","type":"fabric"}'
    bad = b'{"cniVersion":"1.0.0","name":"net","type":"fabric","mtu":20}'
    assert parse_request(env, good).conf.ipam.pools == ()
    with pytest.raises(CNIError) as refused:
        parse_request(env, bad)

    async def go() -> None:
        async with make() as e:
            code, out = await answer(e.w, lambda *_: None, env, good, 0)
            assert code == 0, out
            got = ipaddress.ip_interface(json.loads(out)["ips"][0]["address"])
            assert got.ip in ipaddress.ip_network("10.99.0.0/24")  # the node's pool
            code, out = await answer(e.w, lambda *_: None, {**env, "CNI_CONTAINERID": "d"}, bad, 0)
            err = json.loads(out)
            assert code == 1
            assert (err["code"], err["msg"]) == (refused.value.code, refused.value.msg)
            assert e.dp.calls == ["create", "configure"], "the refused request reached a verb"

    asyncio.run(go())


def test_dual_stack_result(make: Any) -> None:
    async def go() -> None:
        async with make() as e:
            await e.alloc.resources.create_pool(
                Pool.from_spec("pods6", {"cidr": "fd00:99::/64", "blockSize": 122}))  # fmt: skip
            code, res = await e.call("ADD", version="1.1.0", ipam={
                "type": "fabric-ipam", "assignIPv6": True})  # fmt: skip
            assert code == 0, res
            v4, v6 = res["ips"]
            assert v4["address"].endswith("/32") and v6["address"].endswith("/128")
            gw6 = str(att.HOST_LL.ip)
            assert v6["gateway"] == gw6 and "version" not in v6
            assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                                     {"dst": "::/0", "gw": gw6}]  # fmt: skip
            assert res["interfaces"][1]["mtu"] == 1500  # 1.1.0
            assert len(e.routes.desired) == 2
            code, res = await e.call("ADD", cid="only6", ipam={"type": "fabric-ipam",
                                                               "pools": ["fd00:99::/64"]})  # fmt: skip
            assert [ip["address"].split("/")[1] for ip in res["ips"]] == ["128"]

    asyncio.run(go())
