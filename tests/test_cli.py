"""fabricctl against a real etcd: the installed binary for the main flows, CliRunner where
many small invocations are checked. Addresses are allocated through the allocator directly,
on the same key prefix the CLI uses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from fabric.cli.common import LazyGroup
from fabric.cli.main import main
from ipam import keys
from ipam.allocator import Allocator
from ipam.commit import AssignedIP
from ipam.request import AssignRequest
from ipam.resources import Node, Resources
from ipam.store import Store

pytestmark = pytest.mark.etcd

FABRICCTL = str(Path(sys.executable).parent / "fabricctl")

Ctl = Callable[..., subprocess.CompletedProcess[str]]
Cli = Callable[..., Result]


def _fabricctl(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FABRICCTL, *args], env=env, input=input, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.fixture
def ctl(etcd_env: dict[str, str]) -> Ctl:
    """Run the installed fabricctl against this test's prefix."""

    def run(
        *args: str, input: str | None = None, code: int = 0
    ) -> subprocess.CompletedProcess[str]:
        p = _fabricctl(etcd_env, *args, input=input)
        assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
        return p

    return run


def _with_store(endpoints: list[str], prefix: str, fn: Callable[[Store], object]) -> object:
    async def go() -> object:
        store = Store(endpoints, prefix)
        try:
            return await fn(store)  # type: ignore[misc]
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture
def allocate(etcd_endpoints: list[str], prefix: str) -> Callable[..., list[AssignedIP]]:
    """allocate((node, handle), ...) -> the addresses, one IPv4 each, with pod attributes."""

    def run(*pairs: tuple[str, str]) -> list[AssignedIP]:
        async def go(store: Store) -> list[AssignedIP]:
            alloc = Allocator(store)
            out = []
            for node, handle in pairs:
                req = AssignRequest(handle=handle, node=node,
                                    attrs={"pod": f"pod-{handle}", "namespace": "ns1"})  # fmt: skip
                out += await alloc.auto_assign(req)
            return out

        return _with_store(etcd_endpoints, prefix, go)  # type: ignore[return-value]

    return run


@pytest.fixture
def add_nodes(etcd_endpoints: list[str], prefix: str) -> Callable[..., None]:
    def run(*names: str) -> None:
        async def go(store: Store) -> None:
            for n in names:
                await Resources(store).put_node(Node(n))

        _with_store(etcd_endpoints, prefix, go)

    return run


def one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


# help and usage ------------------------------------------------------------------------------


COMMANDS = [[], ["pool"], ["pool", "add"], ["pool", "list"], ["pool", "show"], ["pool", "enable"],
            ["pool", "disable"], ["pool", "delete"], ["ipam"], ["ipam", "show"], ["ipam", "check"],
            ["ipam", "release"], ["ipam", "gc"], ["ipam", "config"], ["apply"], ["get"],
            ["delete"], ["node"], ["node", "list"], ["node", "delete"]]  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "fabricctl")
def test_help_everywhere(args: list[str]) -> None:
    r = CliRunner().invoke(main, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


def test_bad_command_line_is_exit_1(cli: Cli) -> None:
    r = cli("pool", "add", "p1", code=1)  # --cidr missing
    assert "--cidr" in r.stderr
    cli("ipam", "release", code=1)  # neither --ip nor --from-report
    cli("no-such-command", code=1)


# pools ---------------------------------------------------------------------------------------


def test_pool_lifecycle(ctl: Ctl) -> None:
    out = ctl("pool", "add", "p1", "--cidr", "10.244.0.0/16", "--nat-outgoing").stdout
    assert "IPPool p1 created" in out
    ctl("pool", "add", "p6", "--cidr", "fd00:1::/48", "--block-size", "120",
        "--node-selector", "rack == 'r1'", "--disable-bgp-export", "--disabled")  # fmt: skip
    lines = ctl("pool", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "CIDR", "BLOCKSIZE", "NAT", "DISABLED",
                                "DISABLEBGPEXPORT", "SELECTOR"]  # fmt: skip
    assert lines[1].split() == ["p1", "10.244.0.0/16", "26", "true", "false", "false", "all()"]
    assert lines[2].split()[:6] == ["p6", "fd00:1::/48", "120", "false", "true", "true"]
    items = json.loads(ctl("pool", "list", "-o", "json").stdout)["items"]
    assert [i["spec"]["cidr"] for i in items] == ["10.244.0.0/16", "fd00:1::/48"]
    assert items[1]["spec"]["nodeSelector"] == "rack == 'r1'"

    show = ctl("pool", "show", "p1").stdout
    assert "IPs total:" in show and "65536" in show and "0 (0%)" in show
    shown = yaml.safe_load(ctl("pool", "show", "p1", "-o", "yaml").stdout)
    assert shown["spec"]["natOutgoing"] is True and shown["status"]["ipsInUse"] == 0

    ctl("pool", "disable", "p1")
    assert json.loads(ctl("get", "ippool", "p1", "-o", "json").stdout)["spec"]["disabled"]
    ctl("pool", "enable", "p1")
    assert not json.loads(ctl("get", "ippool", "p1", "-o", "json").stdout)["spec"]["disabled"]
    assert "IPPool p1 deleted" in ctl("pool", "delete", "p1").stdout
    r = ctl("pool", "show", "p1", code=1)
    one_line_error(r.stderr, "IPPool p1", "not found")


def test_pool_overlap_is_one_line_naming_the_field(ctl: Ctl) -> None:
    ctl("pool", "add", "p1", "--cidr", "10.244.0.0/16")
    r = ctl("pool", "add", "p2", "--cidr", "10.244.3.0/24", code=1)
    one_line_error(r.stderr, "IPPool p2", "spec.cidr", "overlaps pool p1")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--cidr", "10.1.0.0/33"], "spec.cidr"),
        (["--cidr", "not-a-cidr"], "spec.cidr"),
        (["--cidr", "10.1.0.1/16"], "spec.cidr"),  # host bits
        (["--cidr", "127.0.0.0/24"], "spec.cidr"),  # loopback
        (["--cidr", "10.1.0.0/16", "--block-size", "12"], "spec.blockSize"),
        (["--cidr", "10.1.0.0/24", "--block-size", "20"], "spec.blockSize"),  # larger than pool
        (["--cidr", "10.1.0.0/16", "--node-selector", "rack ==="], "spec.nodeSelector"),
    ],
)
def test_pool_add_validation(cli: Cli, args: list[str], field: str) -> None:
    r = cli("pool", "add", "bad", *args, code=1)
    one_line_error(r.stderr, "IPPool bad", field)
    assert r.stdout == ""


def test_pool_delete_refused_in_use_then_forced(ctl: Ctl, allocate: Callable[..., object]) -> None:
    ctl("pool", "add", "p1", "--cidr", "10.10.0.0/24")
    allocate(("n1", "h1"), ("n1", "h2"))
    r = ctl("pool", "delete", "p1", code=1)
    one_line_error(r.stderr, "IPPool p1", "2 addresses in use", "--force")
    r = ctl("delete", "ippool", "p1", code=1)
    one_line_error(r.stderr, "IPPool p1", "in use")
    r = ctl("pool", "delete", "p1", "--force")
    assert "released 2 addresses" in r.stdout
    assert "releasing" in r.stderr  # progress
    assert "NAME" in ctl("pool", "list").stdout and "p1" not in ctl("pool", "list").stdout
    assert "0 IPAM blocks" in ctl("ipam", "check").stdout


# ipam show -----------------------------------------------------------------------------------


def test_ipam_show_tables_and_formats(ctl: Ctl, allocate: Callable[..., object]) -> None:
    ctl("pool", "add", "p1", "--cidr", "10.20.0.0/24")
    allocate(*[("n1", f"h{i}") for i in range(5)])
    out = ctl("ipam", "show").stdout
    assert "| GROUPING |" in out and "IPS TOTAL" in out and "IPS IN USE" in out
    pool_row = next(line for line in out.splitlines() if "IP Pool" in line)
    assert [c.strip() for c in pool_row.strip("|").split("|")] == [
        "IP Pool", "10.20.0.0/24", "256", "5 (2%)", "251 (98%)"]  # fmt: skip
    assert "Block" not in out.replace("GROUPING", "")

    out = ctl("ipam", "show", "--show-blocks").stdout
    block_row = next(line for line in out.splitlines() if "| Block" in line)
    assert [c.strip() for c in block_row.strip("|").split("|")][2:] == ["64", "5 (8%)", "59 (92%)"]

    data = json.loads(ctl("ipam", "show", "--show-blocks", "-o", "json").stdout)
    (p,) = data["pools"]
    assert (p["name"], p["ipsTotal"], p["ipsInUse"], p["ipsFree"]) == ("p1", 256, 5, 251)
    assert p["blocks"][0]["node"] == "n1" and p["blocks"][0]["ipsInUse"] == 5
    data = yaml.safe_load(ctl("ipam", "show", "-o", "yaml").stdout)
    assert data["pools"][0]["ipsInUse"] == 5 and "blocks" not in data["pools"][0]


def test_ipam_show_ip(cli: Cli, allocate: Callable[..., list[AssignedIP]]) -> None:
    cli("pool", "add", "p1", "--cidr", "10.21.0.0/24")
    (a,) = allocate(("n1", "net.c1.eth0"))
    out = cli("ipam", "show", "--ip", str(a.ip)).stdout
    assert out.splitlines()[0] == f"IP {a.ip} is in use"
    assert "Handle: net.c1.eth0" in out
    assert "pod: pod-net.c1.eth0" in out and "namespace: ns1" in out and "node: n1" in out
    data = json.loads(cli("ipam", "show", "--ip", str(a.ip), "-o", "json").stdout)
    assert data["inUse"] and data["handle"] == "net.c1.eth0" and data["sequence"] == a.seq
    free = str(a.ip + 100)
    assert (
        cli("ipam", "show", "--ip", free).stdout.strip() == f"IP {free} is not currently assigned"
    )
    assert cli("ipam", "show", "--ip", "192.0.2.1").stdout.startswith("IP 192.0.2.1 is not")
    one_line_error(cli("ipam", "show", "--ip", "nope", code=1).stderr, "--ip")


def test_ipam_show_borrowed(ctl: Ctl, allocate: Callable[..., list[AssignedIP]]) -> None:
    # One /30 block: n1 claims it, n2 finds no free block and borrows from it.
    ctl("pool", "add", "tiny", "--cidr", "10.30.0.0/30", "--block-size", "30")
    _, borrowed = allocate(("n1", "h1"), ("n2", "h2"))
    assert borrowed.borrowed
    out = ctl("ipam", "show", "--show-borrowed").stdout
    header = next(line for line in out.splitlines() if "BORROWING-NODE" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"]  # fmt: skip
    row = next(line for line in out.splitlines() if str(borrowed.ip) in line)
    assert [c.strip() for c in row.strip("|").split("|")] == [
        str(borrowed.ip), "n2", "10.30.0.0/30", "n1", "pod", "ns1/pod-h2"]  # fmt: skip
    data = json.loads(ctl("ipam", "show", "--show-borrowed", "-o", "json").stdout)
    assert [b["handle"] for b in data["borrowed"]] == ["h2"] and "pools" not in data


# check, release, gc, config ------------------------------------------------------------------


def test_check_clean_then_seeded_problem_repaired_from_report(
    ctl: Ctl, allocate: Callable[..., list[AssignedIP]], add_nodes: Callable[..., None],
    etcd_endpoints: list[str], prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    ctl("pool", "add", "p1", "--cidr", "10.40.0.0/24")
    add_nodes("n1")
    _, lost = allocate(("n1", "h1"), ("n1", "h2"))
    out = ctl("ipam", "check").stdout
    assert "Loading all IPAM blocks...\nFound 1 IPAM blocks.\nFound 2 IPs in use." in out
    assert "No problems found." in out

    # A crash between writes leaves an allocation whose handle record is gone.
    _with_store(etcd_endpoints, prefix, lambda s: s.delete(keys.handle("h2")))
    report = tmp_path / "report.json"
    r = ctl("ipam", "check", "-o", str(report), code=3)
    assert f"IP {lost.ip} in block {lost.block}" in r.stdout and "Found 1 problems." in r.stdout
    rep = json.loads(report.read_text())
    assert rep["kind"] == "IPAMCheckReport" and rep["problems"] == 1
    assert rep["ipsWithoutHandle"][0]["ip"] == str(lost.ip)

    r = ctl("ipam", "release", "--from-report", str(report))
    assert "Released 1 IPs" in r.stdout and "Releasing from" in r.stderr
    assert "No problems found." in ctl("ipam", "check").stdout
    assert "not currently assigned" in ctl("ipam", "show", "--ip", str(lost.ip)).stdout
    # The same report again: every item is re-validated, nothing more is released.
    assert "Released 0 IPs" in ctl("ipam", "release", "--from-report", str(report)).stdout


def test_check_reports_missing_node_and_leaks(
    cli: Cli, allocate: Callable[..., list[AssignedIP]], add_nodes: Callable[..., None],
    tmp_path: Path,
) -> None:  # fmt: skip
    cli("pool", "add", "p1", "--cidr", "10.41.0.0/24")
    allocate(("n1", "h1"), ("n1", "h2"))
    r = cli("ipam", "check", code=3)
    assert "affine to node n1" in r.stdout and "does not exist" in r.stdout
    add_nodes("n1")
    live = tmp_path / "live.json"
    live.write_text(json.dumps({"n1": ["h1"]}))
    r = cli("ipam", "check", "--live-handles", str(live), code=3)
    assert "(handle h2) is not among the live handles of node n1" in r.stdout
    live.write_text("[1, 2]")
    one_line_error(cli("ipam", "check", "--live-handles", str(live), code=1).stderr, "live.json")


def test_bad_report_is_one_line(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for text in ["{", '{"kind": "Other"}', '{"kind": "IPAMCheckReport", "leaked": [{"ip": "x"}]}']:
        bad.write_text(text)
        r = cli("ipam", "release", "--from-report", str(bad), code=1)
        one_line_error(r.stderr, "bad.json")
    one_line_error(cli("ipam", "release", "--from-report", str(tmp_path / "none"), code=1).stderr,
                   "cannot read")  # fmt: skip


def test_release_ip_with_sequence(cli: Cli, allocate: Callable[..., list[AssignedIP]]) -> None:
    cli("pool", "add", "p1", "--cidr", "10.42.0.0/24")
    (a,) = allocate(("n1", "h1"))
    r = cli("ipam", "release", "--ip", str(a.ip), "--sequence", str(a.seq + 7), code=1)
    one_line_error(r.stderr, f"IP {a.ip}", "sequence")
    assert "is in use" in cli("ipam", "show", "--ip", str(a.ip)).stdout
    assert cli("ipam", "release", "--ip", str(a.ip), "--sequence", str(a.seq)).stdout.startswith(
        f"Released IP {a.ip}")  # fmt: skip
    assert "nothing to release" in cli("ipam", "release", "--ip", str(a.ip)).stdout


def test_gc_releases_dead_handles(
    ctl: Ctl, allocate: Callable[..., list[AssignedIP]], add_nodes: Callable[..., None],
    tmp_path: Path,
) -> None:  # fmt: skip
    ctl("pool", "add", "p1", "--cidr", "10.43.0.0/24")
    add_nodes("n1", "n2")
    got = allocate(("n1", "h1"), ("n1", "h2"), ("n1", "h3"), ("n2", "h4"))
    ip = {a.handle: str(a.ip) for a in got}
    live = tmp_path / "live.json"
    live.write_text(json.dumps(["h1"]))
    r = ctl("ipam", "gc", "--node", "n1", "--live-handles", str(live))
    assert f"Released h2: {ip['h2']}" in r.stdout and f"Released h3: {ip['h3']}" in r.stdout
    assert "Released 2 addresses of 2 handles" in r.stdout
    assert "Collecting garbage on node n1" in r.stderr
    for h, code_in_use in (("h1", True), ("h2", False), ("h3", False), ("h4", True)):
        out = ctl("ipam", "show", "--ip", ip[h]).stdout
        assert ("is in use" in out) is code_in_use, (h, out)
    # From stdin, JSON output; n2's handle is not live any more.
    r = ctl("ipam", "gc", "--node", "n2", "--live-handles", "-", "-o", "json", input="[]")
    assert json.loads(r.stdout)["released"] == {"h4": [ip["h4"]]}
    assert "No problems found." in ctl("ipam", "check").stdout


def test_ipam_config(cli: Cli) -> None:
    out = cli("ipam", "config").stdout
    assert "PROPERTY" in out and "StrictAffinity" in out and "false" in out
    cli("ipam", "config", "--strict-affinity", "--max-blocks-per-host", "4")
    data = json.loads(cli("ipam", "config", "-o", "json").stdout)
    assert data["strictAffinity"] is True and data["maxBlocksPerHost"] == 4
    cli("ipam", "config", "--no-strict-affinity")
    data = json.loads(cli("ipam", "show", "--show-configuration", "-o", "json").stdout)
    assert data["strictAffinity"] is False and data["maxBlocksPerHost"] == 4
    r = cli("ipam", "config", "--max-blocks-per-host", "-1", code=1)
    one_line_error(r.stderr, "IPAMConfig", "--max-blocks-per-host")


# apply / get / delete ------------------------------------------------------------------------

RESOURCES = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool-a}
spec: {cidr: 10.50.0.0/16, blockSize: 24, natOutgoing: true, nodeSelector: "rack == 'r1'"}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool-v6}
spec: {cidr: "fd00:50::/48"}
---
apiVersion: fabric/v1
kind: IPReservation
metadata: {name: gateways}
spec: {reservedCIDRs: [10.50.0.0/29, 10.50.1.1]}
---
apiVersion: projectcalico.org/v3
kind: IPAMConfiguration
metadata: {name: default}
spec: {strictAffinity: true, maxBlocksPerHost: 8}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-1, labels: {rack: r1}}
spec:
  addresses: [{address: 192.168.1.1}]
  bgp: {asNumber: 64513, routeReflectorClusterID: 1.0.0.1}
"""


def _get_all_yaml(run: Callable[..., object]) -> str:
    return "\n".join(
        run("get", kind, "-o", "yaml").stdout  # type: ignore[attr-defined]
        for kind in ("ippools", "ipreservations", "ipamconfig", "nodes")
    )


def test_apply_get_round_trip(ctl: Ctl, etcd_env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "resources.yaml"
    f.write_text(RESOURCES)
    out = ctl("apply", "-f", str(f)).stdout
    assert out.splitlines() == ["IPPool pool-a created", "IPPool pool-v6 created",
                                "IPReservation gateways created", "IPAMConfig default configured",
                                "Node node-1 created"]  # fmt: skip
    assert set(ctl("apply", "-f", str(f)).stdout.split()) >= {"unchanged"}
    assert "configured" not in ctl("apply", "-f", str(f)).stdout

    table_out = ctl("get", "pools").stdout.splitlines()
    assert table_out[1].split()[:4] == ["pool-a", "10.50.0.0/16", "24", "true"]
    assert ctl("get", "ipreservation").stdout.splitlines()[1].split() == [
        "gateways", "10.50.0.0/29,10.50.1.1/32"]  # fmt: skip
    assert ctl("get", "node", "node-1").stdout.splitlines()[1].split() == [
        "node-1", "192.168.1.1", "64513", "rack=r1"]  # fmt: skip

    # get -o yaml | apply -f - into an empty prefix reproduces everything.
    dumped = _get_all_yaml(ctl)
    other = {**etcd_env, "FABRIC_PREFIX": etcd_env["FABRIC_PREFIX"] + "-copy"}

    def ctl2(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        p = _fabricctl(other, *args, input=input)
        assert p.returncode == 0, p.stderr
        return p

    ctl2("apply", "-f", "-", input=dumped)
    assert _get_all_yaml(ctl2) == dumped
    # JSON output (a List) is valid input as well.
    listed = ctl("get", "pools", "-o", "json").stdout
    assert "unchanged" in ctl2("apply", "-f", "-", input=listed).stdout


def test_apply_update_rules(cli: Cli) -> None:
    cli("apply", "-f", "-", input=RESOURCES)
    pool = yaml.safe_load(cli("get", "ippool", "pool-a", "-o", "yaml").stdout)
    pool["spec"]["disabled"] = True
    del pool["spec"]["blockSize"]  # left out: the pool keeps its own
    assert cli("apply", "-f", "-", input=yaml.safe_dump(pool)).stdout.strip() == (
        "IPPool pool-a configured")  # fmt: skip
    got = json.loads(cli("get", "ippool", "pool-a", "-o", "json").stdout)
    assert got["spec"]["disabled"] is True and got["spec"]["blockSize"] == 24

    for field, value in (("cidr", "10.60.0.0/16"), ("blockSize", 26)):
        changed = {**pool, "spec": {**pool["spec"], field: value}}
        r = cli("apply", "-f", "-", input=yaml.safe_dump(changed), code=1)
        one_line_error(r.stderr, "IPPool pool-a", f"spec.{field}", "immutable")


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("apiVersion: v1\nkind: IPPool\nmetadata: {name: a}\nspec: {}\n", ["apiVersion"]),
        ("apiVersion: fabric/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {}\n", ["kind"]),
        ("apiVersion: fabric/v1\nkind: IPPool\nspec: {}\n", ["metadata.name"]),
        ("apiVersion: fabric/v1\nkind: IPPool\nmetadata: {name: a}\n", ["IPPool a", "spec"]),
        (
            "apiVersion: fabric/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.0.0.0/8, "
            "nodeSelector: 'x =='}\n",
            ["IPPool a", "spec.nodeSelector"],
        ),
        (
            "apiVersion: fabric/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.0.0.0/8, "
            "colour: red}\n",
            ["IPPool a", "spec.colour"],
        ),
        (
            "apiVersion: fabric/v1\nkind: IPAMConfig\nmetadata: {name: other}\nspec: {}\n",
            ["IPAMConfig other", "metadata.name"],
        ),
        (
            "apiVersion: fabric/v1\nkind: IPReservation\nmetadata: {name: r}\nspec: "
            "{reservedCIDRs: [nope]}\n",
            ["IPReservation r", "spec.reservedCIDRs[0]"],
        ),
        (
            "apiVersion: fabric/v1\nkind: Node\nmetadata: {name: n}\nspec: {bgp: {asNumber: -1}}\n",
            ["Node n", "spec.bgp.asNumber"],
        ),
        ("a: [\n", ["not valid YAML"]),
    ],
)
def test_apply_errors_are_one_line(cli: Cli, doc: str, words: list[str]) -> None:
    one_line_error(cli("apply", "-f", "-", input=doc, code=1).stderr, *words)


def test_get_and_delete_kinds(ctl: Ctl, allocate: Callable[..., object]) -> None:
    ctl("apply", "-f", "-", input=RESOURCES)
    one_line_error(ctl("get", "deployments", code=1).stderr, "unknown kind")
    one_line_error(ctl("get", "ippool", "nope", code=1).stderr, "IPPool nope", "not found")
    assert "gateways deleted" in ctl("delete", "ipreservations", "gateways").stdout
    assert ctl("get", "ipreservations").stdout.strip() == "NAME   CIDRS"
    ctl("delete", "ipamconfig", "default")
    assert json.loads(ctl("get", "ipamconfig", "-o", "json").stdout)["spec"] == {
        "strictAffinity": False, "maxBlocksPerHost": 0}  # fmt: skip
    assert "IPPool pool-v6 deleted" in ctl("delete", "pool", "pool-v6").stdout

    # node list / delete: releases the node's addresses and blocks.
    allocate(("node-1", "h1"), ("node-1", "h2"))
    assert ctl("node", "list").stdout.splitlines()[1].split()[0] == "node-1"
    r = ctl("node", "delete", "node-1")
    assert "Node node-1 deleted (released 2 addresses, 1 blocks)" in r.stdout
    assert "Releasing addresses and blocks of node node-1" in r.stderr
    assert ctl("node", "list").stdout.strip() == "NAME   ADDRESSES   ASN   LABELS"
    assert "No problems found." in ctl("ipam", "check").stdout
    one_line_error(ctl("delete", "node", "node-1", code=1).stderr, "Node node-1", "not found")


# datastore down ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["pool", "list"], ["ipam", "show"], ["get", "nodes"]])
def test_etcd_unreachable_is_exit_2(etcd_env: dict[str, str], args: list[str]) -> None:
    env = {**etcd_env, "FABRIC_ETCD_ENDPOINTS": "127.0.0.1:1"}
    t0 = time.monotonic()
    p = _fabricctl(env, "--timeout", "1", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert time.monotonic() - t0 < 10
    one_line_error(p.stderr, "no etcd endpoint answered", "127.0.0.1:1")


def test_etcd_unreachable_default_deadline(etcd_env: dict[str, str]) -> None:
    p = _fabricctl(etcd_env, "--etcd-endpoints", "127.0.0.1:1", "pool", "list")
    assert p.returncode == 2
    one_line_error(p.stderr, "127.0.0.1:1")


def _lazy_groups() -> list[tuple[str, LazyGroup]]:
    from fabric.cli.resources import node

    return [("fabricctl", main), ("fabricctl node", node)]  # type: ignore[list-item]


def test_lazy_help_texts_match_their_commands() -> None:
    """What `--help` lists for a command not yet imported is the first paragraph of that
    command's own help (a command whose docstring changes must change the table too)."""
    from importlib import import_module

    for where, group in _lazy_groups():
        for name, (ref, text) in group.lazy.items():
            module, _, attr = ref.partition(":")
            cmd = getattr(import_module(module), attr)
            first = " ".join((cmd.help or "").split("\n\n")[0].split())
            assert text == first, f"{where} {name}: lazy help {text!r} != {first!r}"


@pytest.mark.parametrize("args", [["--help"], ["pool", "list", "--help"], ["node", "--help"]])
def test_help_imports_no_etcd_or_bgp(args: list[str]) -> None:
    """`fabricctl --help` and a command's --help load neither the etcd client nor the BGP
    model: that is what keeps them fast (docs/bench.md, "fabricctl start")."""
    code = (
        "import sys\n"
        "from fabric.cli.main import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('aetcd', 'grpc', 'bgp.model', 'ipam.store', 'yaml',"
        " 'asyncio', 'fabric.resources.documents') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in r.stdout, r.stdout
