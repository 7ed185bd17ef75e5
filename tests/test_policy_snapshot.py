"""The policy table's snapshot (fabric.dataplane.policy_snapshot, fabric.agent.snapshots):
the file format and its checks, and against real nftables in a scratch namespace: restored
when the table is absent, never over an existing table, a corrupt file ignored, a stale
snapshot repaired by the first compile (a policy deleted while fabricd was down stops
denying), readiness false until that compile."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from scratch_netns import scratch_netns
from test_nft_agent import DENY_DB, drop_table, pod, record, to_pod

from fabric.agent.daemon import early_settings
from fabric.agent.policy import Inputs, PolicyAgent
from fabric.agent.snapshots import SnapshotWriter
from fabric.dataplane import policy_snapshot as snap
from fabric.dataplane.nft import Nft
from fabric.dataplane.policy_table import TABLE, PolicyTable
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod

BODY = "add table inet fabric_filter\nadd chain inet fabric_filter c\n"


def test_the_table_name_is_the_policy_tables() -> None:
    assert snap.TABLE == TABLE


def test_encode_decode_and_what_is_refused() -> None:
    text = snap.encode(BODY, TABLE, "node1", written=1000.0)
    body, written = snap.decode(text, TABLE, "node1")
    assert body == "create table inet fabric_filter\nadd chain inet fabric_filter c\n"
    assert written == 1000.0
    bad = {
        "another node's": (text, "node2"),
        "truncated": (text[:-5], "node1"),
        "corrupt": (text.replace("add chain", "add chaim"), "node1"),
        "another version": (text.replace("# version: 1", "# version: 2"), "node1"),
        "foreign": ("flush ruleset\n", "node1"),
        "empty": ("", "node1"),
    }
    for why, (t, node) in bad.items():
        with pytest.raises(snap.SnapshotError):
            snap.decode(t, TABLE, node)
            pytest.fail(why)
    # a script that touches anything but our table is never encoded (nor decoded)
    for script in (BODY + "flush ruleset\n", BODY + "add chain inet other c\n",
                   "add table inet other\n"):  # fmt: skip
        with pytest.raises((ValueError, snap.SnapshotError)):
            snap.encode(script, TABLE, "node1")


def test_early_settings_read_without_yaml() -> None:
    cfg = 'nodeName: node-7  # here\ncni:\n  socket: /run/x.sock\n  stateDir: "/var/lib/x"\n'
    assert early_settings(cfg) == ("/var/lib/x", "node-7")
    assert early_settings("asNumber: 65001\n") == ("/var/lib/fabric", None)
    with pytest.raises(ValueError):
        early_settings("cni: {stateDir: /x}\n")


def test_a_missing_or_unreadable_snapshot_is_reported(tmp_path: Path) -> None:
    r = snap.restore(tmp_path / "none.nft", TABLE, "n1", nft="/bin/false")
    assert not r.applied and not r.warn and "no snapshot" in r.reason
    p = tmp_path / snap.FILENAME
    p.write_bytes(b"\xff\xfe garbage")
    r = snap.restore(p, TABLE, "n1", nft="/bin/false")
    assert not r.applied and r.warn


@pytest.fixture
def node() -> Iterator[str]:
    with scratch_netns("tps") as ns:
        yield ns


def nft(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def tables(ns: str) -> str:
    return nft(ns, "list", "tables")


@pytest.mark.root
def test_restore_when_absent_never_over_a_table_and_repair_by_the_first_compile(
    node: str, tmp_path: Path
) -> None:
    path = tmp_path / snap.FILENAME
    policies: list[NetworkPolicy] = [DENY_DB]  # type: ignore[list-item]
    pods: list[Pod] = [pod(1, "db")]

    def read() -> Inputs:
        return Inputs(tuple(policies), tuple[Namespace, ...](), tuple(pods), ())

    def agent(writer: SnapshotWriter | None = None) -> PolicyAgent:
        return PolicyAgent("me", PolicyTable(Nft(node, backend="exec")), read,
                           lambda: (record(1),),
                           written=writer.wrote if writer else None)  # fmt: skip

    async def go() -> None:
        writer = SnapshotWriter(path, TABLE, "me")
        first = agent(writer)
        await first.program()
        denied = f'"{record(1).host_ifname}" : jump in_'
        assert denied in to_pod(node)
        writer.flush()  # what a clean stop does
        assert path.exists()

        # absent: restored in one transaction, the deny in place before any compile
        drop_table(node)
        r = snap.restore(path, TABLE, "me", netns=node)
        assert r.applied, r.reason
        assert denied in to_pod(node)

        # present: never applied over it (our marker chain stays, nothing doubled)
        nft(node, "add", "chain", "inet", TABLE, "marker")
        r = snap.restore(path, TABLE, "me", netns=node)
        assert not r.applied and not r.warn and "is in the kernel" in r.reason, r.reason
        assert "chain marker" in nft(node, "list", "table", "inet", TABLE)

        # corrupt: ignored with a warning, nothing applied, no exception
        drop_table(node)
        good = path.read_text()
        path.write_text(good.replace("jump in_", "jump xx_", 1))
        r = snap.restore(path, TABLE, "me", netns=node)
        assert not r.applied and r.warn and "SHA-256" in r.reason, r.reason
        assert "fabric_filter" not in tables(node)

        # stale: the deny-db policy was deleted while fabricd was down; the snapshot
        # brings its deny back, and the first compile from the datastore removes it
        path.write_text(good)
        assert snap.restore(path, TABLE, "me", netns=node).applied
        policies.clear()
        second = agent()
        assert (await second.check())[0] is False  # not computed from the datastore yet
        await second.program()
        assert f'"{record(1).host_ifname}" : accept' in to_pod(node)
        assert "jump in_" not in to_pod(node)
        assert await second.check() == (True, "ok")

    asyncio.run(go())


@pytest.mark.root
def test_the_writer_writes_after_a_pause_and_never_an_older_table(
    node: str, tmp_path: Path
) -> None:
    path = tmp_path / "state" / snap.FILENAME
    writer = SnapshotWriter(path, TABLE, "me", quiet=0.05, max_delay=1.0)
    policies: list[NetworkPolicy] = [DENY_DB]  # type: ignore[list-item]
    pa = PolicyAgent("me", PolicyTable(Nft(node, backend="exec")),
                     lambda: Inputs(tuple(policies), (), (pod(1, "db"),), ()),
                     lambda: (record(1),), written=writer.wrote)  # fmt: skip

    async def go() -> None:
        task = asyncio.create_task(writer.run())
        await pa.program()
        for _ in range(100):
            if writer.saves:
                break
            await asyncio.sleep(0.02)
        assert writer.saves == 1
        assert "jump in_" in snap.decode(path.read_text(), TABLE, "me")[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        policies.clear()
        pa.resync()
        await pa.program()
        writer.flush()
        body = snap.decode(path.read_text(), TABLE, "me")[0]
        assert "jump in_" not in body and ": accept" in body
        assert not list(path.parent.glob(".*.tmp"))

    asyncio.run(go())


def test_config_arg_and_start_clock() -> None:
    from fabric.agent.daemon import DEFAULT_CONFIG, config_arg
    from fabric.agent.startup import StartClock

    assert config_arg([]) == DEFAULT_CONFIG
    assert config_arg(["--config", "/a.yaml"]) == "/a.yaml"
    assert config_arg(["--config=/b.yaml"]) == "/b.yaml"
    clock = StartClock({"process": 10.0, "interpreter": 10.04, "snapshot": 10.09})
    assert clock.since_start() == {"interpreter": 0.04, "snapshot": 0.09}
    assert clock.summary() == "interpreter 0.040 s (+0.040), snapshot 0.090 s (+0.050)"
