"""fabricd's policy programmer (fabric.agent.policy.PolicyAgent) against real nftables in a
network namespace the test creates, fed policy objects directly (no etcd): the ADD gate
returns only once the endpoint is in the kernel, bursts are coalesced into few nft runs, a
failure fails the gate and readiness with the reason, the resync repairs."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_interface, ip_network

import pytest
from scratch_netns import scratch_netns

from fabric.agent.policy import Inputs, PolicyAgent
from fabric.dataplane.attachment import host_ifname
from fabric.dataplane.nft import Nft
from fabric.dataplane.policy_table import Change, Desired, PolicyTable
from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod
from fabric.workloads.state import Phase, Record
from ipam.block import Attribute, Block

DENY_DB = decode({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"namespace": "default", "name": "deny-db"},
                  "spec": {"podSelector": {"matchLabels": {"role": "db"}}}})  # fmt: skip


def record(i: int) -> Record:
    return Record(handle=f"fabric.c{i}.eth0", network="fabric", container_id=f"c{i}",
                  ifname="eth0", netns="/x", host_ifname=f"fab{i:011x}", phase=Phase.READY,
                  ips=(ip_interface(f"10.81.0.{i + 1}/32"),), pod=f"p{i}",
                  namespace="default")  # fmt: skip


def pod(i: int, role: str) -> Pod:
    p = decode({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "default", "name": f"p{i}", "labels": {"role": role}}})  # fmt: skip
    assert isinstance(p, Pod)
    return p


@pytest.fixture
def node() -> Iterator[str]:
    with scratch_netns("tna") as ns:
        yield ns


def to_pod(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "map", "inet",
                           "fabric_filter", "to_pod"], capture_output=True, text=True,
                          check=False).stdout  # fmt: skip


def drop_table(ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet",
                    "fabric_filter"], check=True)  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("backend", ["exec", "lib"])
def test_admit_waits_for_the_kernel_and_bursts_coalesce(node: str, backend: str) -> None:
    policies: list[NetworkPolicy] = [DENY_DB]  # type: ignore[list-item]
    pods: list[Pod] = [pod(i, "db") for i in range(20)]
    nft = Nft(node, backend=backend)
    assert nft.backend == backend
    agent = PolicyAgent("me", PolicyTable(nft), lambda: Inputs(tuple(policies),
                        tuple[Namespace, ...](), tuple(pods), ()), lambda: ())  # fmt: skip

    async def go() -> None:
        await agent.program()  # start-up adoption: an empty table
        runner = asyncio.create_task(agent.run())
        before = nft.runs
        recs = [record(i) for i in range(20)]

        async def add(r: Record) -> None:
            await agent.admit(r, "")
            assert f'"{r.host_ifname}" : jump in_' in to_pod(node)  # in the kernel on return

        await asyncio.gather(*(add(r) for r in recs))
        print(f"{nft.runs - before} nft runs for 20 concurrent ADDs")
        assert nft.runs - before <= 6, f"{nft.runs - before} nft runs for 20 ADDs"
        # the deny-all selects them all: one shared chain
        assert len(set(re.findall(r"jump (in_\w+)", to_pod(node)))) == 1
        # the table deleted behind our back: readiness fails, the resync it asks rebuilds
        drop_table(node)
        assert (await agent.check())[0] is False
        agent.changed()
        for _ in range(100):
            if (await agent.check())[0]:
                break
            await asyncio.sleep(0.05)
        assert await agent.check() == (True, "ok")
        assert f'"{recs[0].host_ifname}" : jump in_' in to_pod(node)
        agent.release(recs[0].handle)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    try:
        asyncio.run(go())
    finally:
        nft.close()


@pytest.mark.root
def test_a_batch_nft_refuses_fails_the_gate_and_readiness(node: str) -> None:
    agent = PolicyAgent("me", PolicyTable(Nft(node, nft="/bin/false")),
                        lambda: Inputs((), (), (), ()), lambda: ())  # fmt: skip

    async def go() -> None:
        runner = asyncio.create_task(agent.run())
        with pytest.raises(RuntimeError, match="failed to list nft table fabric_filter"):
            await agent.admit(record(1), "")
        ok, why = await agent.check()
        assert not ok and why.startswith("failed to program table inet fabric_filter"), why
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    asyncio.run(go())


def test_endpoints_from_records_pending_and_aliases() -> None:
    """Local attachments etcd does not show yet become endpoints (labels from the CNI
    labels and the Pod object); a pod's second attachment is an alias of its endpoint."""
    second = Record(handle="fabric2.c1.net1", network="fabric2", container_id="c1",
                    ifname="net1", netns="/x", host_ifname="fab2nd", phase=Phase.READY,
                    ips=(ip_interface("10.81.1.1/32"),), pod="p1", namespace="default")  # fmt: skip
    adding = Record(handle="fabric.c9.eth0", network="fabric", container_id="c9",
                    ifname="eth0", netns="/x", host_ifname="fabadding", phase=Phase.ADDING,
                    ips=(ip_interface("10.81.0.99/32"),))  # fmt: skip
    agent = PolicyAgent("me", PolicyTable(Nft("unused")),
                        lambda: Inputs((), (), (pod(1, "db"),), ()),
                        lambda: (record(1), second, adding))  # fmt: skip
    agent._pending["fabric.c2.eth0"] = (record(2), '{"tier":"web"}')
    eps = {e.key: e for e in agent.endpoints(agent.read())}
    assert set(eps) == {"default/p1", "default/p2"}  # an ADDING record is not an endpoint
    assert (
        eps["default/p1"].labels == {"role": "db"}
        and eps["default/p1"].ifname == "fab" + f"{1:011x}"
    )
    assert eps["default/p2"].labels == {"tier": "web"}
    assert agent.aliases == {"default/p1": ["fab2nd"]}


def real(i: int) -> Record:
    """``record(i)`` with the host interface the dataplane names (as an endpoint of a block)."""
    r = record(i)
    return replace(r, host_ifname=host_ifname(r.container_id, r.ifname))


def block_with(*recs: Record) -> Block:
    """The IPAM block the ADDs of ``recs`` committed (what the watch event brings)."""
    b = Block.new(ip_network("10.81.0.0/24"), "me")
    for r in recs:
        attrs = {"containerID": r.container_id, "ifname": r.ifname, "node": "me",
                 "pod": r.pod or "", "namespace": r.namespace or ""}  # fmt: skip
        b = b.assign_specific(int(r.ips[0].ip) - int(b.cidr.network_address),
                              Attribute(r.handle, attrs))  # fmt: skip
    return b


class GatedTable(PolicyTable):
    """The real table, whose writes wait for ``gate`` (to hold a batch in flight)."""

    def __init__(self, nft: Nft) -> None:
        super().__init__(nft)
        self.gate, self.entered = asyncio.Event(), asyncio.Event()
        self.gate.set()

    async def apply(self, want: Desired) -> Change:
        self.entered.set()
        await self.gate.wait()
        return await super().apply(want)


@pytest.mark.root
def test_admit_of_an_endpoint_the_watch_already_brought_costs_no_batch(node: str) -> None:
    """The IPAM watch event's batch (the block with the new allocation) wrote the endpoint:
    the ADD's admit returns at once; one that comes while that batch is being written joins
    it; another address under the same interface, or an unknown pod, waits for a batch.
    A batch whose inputs did not change is skipped (no compile, no transaction)."""
    policies: tuple[NetworkPolicy, ...] = (DENY_DB,)  # type: ignore[assignment]
    pods = tuple(pod(i, "db") for i in range(4))
    blocks: list[Block] = [block_with(real(0))]
    nft = Nft(node, backend="lib")
    table = GatedTable(nft)
    agent = PolicyAgent("me", table, lambda: Inputs(policies, (), pods, tuple(blocks)),
                        lambda: ())  # fmt: skip

    async def go() -> None:
        await agent.program()
        runner = asyncio.create_task(agent.run())
        assert f'"{real(0).host_ifname}" : jump in_' in to_pod(node)
        batches, runs = agent.batches, nft.runs
        # the watch brought it: no batch, no nft run
        await asyncio.wait_for(agent.admit(real(0), ""), 1)
        assert (agent.batches, nft.runs) == (batches, runs)
        # nothing changed: the batch a watch event would trigger is skipped
        skipped = agent.skipped
        agent.changed()
        for _ in range(100):
            if agent.skipped > skipped:
                break
            await asyncio.sleep(0.01)
        assert agent.skipped == skipped + 1 and (agent.batches, nft.runs) == (batches, runs)
        # the same endpoints from a new block object (another allocation's event elsewhere)
        blocks[0] = block_with(real(0))
        agent.changed()
        for _ in range(100):
            if agent.skipped > skipped + 1:
                break
            await asyncio.sleep(0.01)
        assert agent.skipped == skipped + 2 and nft.runs == runs
        # a batch in flight that holds the endpoint: admit joins it, no batch of its own
        table.gate.clear()
        table.entered.clear()
        blocks[0] = block_with(real(0), real(1))
        agent.changed()
        await asyncio.wait_for(table.entered.wait(), 5)
        joined = asyncio.create_task(agent.admit(real(1), ""))
        await asyncio.sleep(0.05)
        assert not joined.done()  # not before the kernel holds it (fail closed)
        assert real(1).host_ifname not in to_pod(node)
        table.gate.set()
        await asyncio.wait_for(joined, 5)
        assert f'"{real(1).host_ifname}" : jump in_' in to_pod(node)
        await asyncio.sleep(0.05)
        assert agent.batches == batches + 1, "the admit's own batch ran"
        # another address under a known interface: not answered from the last batch
        moved = replace(real(1), ips=(ip_interface("10.81.0.77/32"),))
        done = agent.batches + agent.skipped
        await asyncio.wait_for(agent.admit(moved, ""), 5)
        assert agent.batches + agent.skipped == done + 1
        agent.release(moved.handle)
        # a pod nobody has seen: its own batch
        await asyncio.wait_for(agent.admit(real(3), ""), 5)
        assert agent.batches == batches + 2
        assert f'"{real(3).host_ifname}" : jump in_' in to_pod(node)
        # a DEL's batch taking it out is being written when the same pod is ADDed again:
        # the last written batch still holds it, but the admit waits for a batch after it
        table.gate.clear()
        table.entered.clear()
        agent.release(real(3).handle)
        await asyncio.wait_for(table.entered.wait(), 5)
        again = asyncio.create_task(agent.admit(real(3), ""))
        await asyncio.sleep(0.05)
        assert not again.done()
        table.gate.set()
        await asyncio.wait_for(again, 5)
        assert f'"{real(3).host_ifname}" : jump in_' in to_pod(node)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    try:
        asyncio.run(go())
    finally:
        nft.close()


def test_cache_reader_reads_again_only_what_changed() -> None:
    """fabricd's policy inputs: the same Inputs while nothing changed (the batch is skipped
    at once), the policy objects kept when only blocks changed, re-read when they changed."""
    from fabric.agent.intent import BlockIndex
    from fabric.agent.policy import CacheReader
    from fabric.resources.policy_store import NETWORKPOLICIES, PODS
    from ipam import keys
    from ipam.store import KV

    def kv(key: str, value: bytes, mod: int) -> KV:
        return KV(key, value, mod, mod, 1)

    pod_doc = (
        b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "default", "name": "p0"}}'
    )
    data: dict[str, dict[str, KV]] = {
        PODS: {PODS + "default/p0": kv(PODS + "default/p0", pod_doc, 1)},
        keys.BLOCKS: {"b": kv("b", block_with(real(0)).dumps(), 2)},
    }
    reader = CacheReader(lambda: data, BlockIndex().blocks)
    first = reader()
    assert [p.name for p in first.pods] == ["p0"] and len(first.blocks) == 1
    assert reader() is first  # nothing changed: the same object
    data[keys.BLOCKS]["b"] = kv("b", block_with(real(0), real(1)).dumps(), 3)
    reader.changed(keys.BLOCKS)
    second = reader()
    assert second is not first and second.pods is first.pods
    assert len(list(second.blocks[0].allocated())) == 2
    reader.changed(NETWORKPOLICIES)  # a policy change: the Pods are not collected again
    assert reader().pods is second.pods
    del data[PODS][PODS + "default/p0"]
    reader.changed(PODS)
    third = reader()
    assert third.pods == () and third.blocks is second.blocks


def test_denied_names_are_computed_again_only_when_the_blocks_change() -> None:
    """The denied log's address -> pod names: walked again after a block change, not after
    every batch (a policy change leaves the blocks as they are)."""
    from fabric.agent.config import PolicyConfig
    from fabric.agent.denied import DeniedTraffic
    from fabric.agent.policy import Inputs, PolicyAgent

    current = [Inputs((), (), (), (block_with(real(0)),))]
    agent = PolicyAgent("me", PolicyTable(), lambda: current[0], lambda: [])
    denied = DeniedTraffic("me", PolicyConfig(False, 60.0, -1), agent, lambda _k, _v: None)
    first = denied.names()
    assert list(first.values()) == [f"{real(0).namespace}/{real(0).pod}"]
    current[0] = Inputs((), (), (), current[0].blocks)  # a policy change: the same blocks
    assert denied.names() is first
    current[0] = Inputs((), (), (), (block_with(real(0), real(1)),))
    assert len(denied.names()) == 2
