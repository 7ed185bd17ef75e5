"""The CNI plugin in the two-rack lab, invoked exactly as a runtime invokes it: the installed
``fabric`` binary exec'd inside the host's namespace with the CNI_* environment and the
network config on stdin. Pods are namespaces of the lab (``<prefix>p<n>``), removed by
``lab.down()``."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fabric_helpers import fabric_lab

from cni.errors import Code
from cni.spec import SUPPORTED
from fabric.dataplane.attachment import host_ifname
from lab.pods import state_dir
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node3")  # one per rack
NETWORK = "fabric"
_pods = itertools.count()


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    for node in HOSTS:
        d = lab.dir / node / "cni"
        r = lab.fabricctl(["cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir",
                           str(d / "net.d"), "--socket", socket_of(lab, node),
                           "--state-dir", str(state_dir(lab, node)),
                           "--network-name", NETWORK], node)  # fmt: skip
        assert r.returncode == 0, r.stderr
    return lab


def socket_of(lab: Lab, node: str) -> str:
    return str(yaml.safe_load(lab.fabricd_config_path(node).read_text())["cni"]["socket"])


def new_pod(lab: Lab) -> str:
    return lab.add_netns(f"{lab.plan.prefix}p{next(_pods)}")


def netconf(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """The fabric entry of the installed conflist, as libcni hands it to the plugin."""
    return {"cniVersion": version, "name": NETWORK, "type": "fabric", "mtu": 1500,
            "ipam": {"type": "fabric-ipam"}, **extra}  # fmt: skip


def cni(lab: Lab, node: str, verb: str, cid: str, netns: str, conf: dict[str, Any] | None = None,
        ifname: str = "eth0", args: str = "", stdin: str | None = None,
        env: dict[str, str] | None = None) -> tuple[int, Any, float]:  # fmt: skip
    """Run the installed plugin like a runtime: (exit code, stdout JSON or None, seconds)."""
    bin_dir = lab.dir / node / "cni" / "bin"
    e = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
         "CNI_PATH": f"{bin_dir}:/usr/lib/cni",
         "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}{args}",
         **(env or {})}  # fmt: skip
    argv = ["env", "-i", *(f"{k}={v}" for k, v in e.items() if v is not None),
            str(bin_dir / "fabric")]  # fmt: skip
    text = stdin if stdin is not None else json.dumps(conf or netconf())
    started = time.monotonic()
    r = lab.exec(node, argv, timeout=90, input=text)
    took = time.monotonic() - started
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None, took


def ok(got: tuple[int, Any, float]) -> Any:
    code, doc, _ = got
    assert code == 0, doc
    return doc


def err_code(got: tuple[int, Any, float]) -> int:
    code, doc, _ = got
    assert code != 0 and doc is not None, doc
    assert set(doc) >= {"cniVersion", "code", "msg"}, doc
    return int(doc["code"])


def pod_ip(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"].split("/")[0])


def in_use(lab: Lab, ip: str) -> bool:
    r = lab.fabricctl(["ipam", "show", "--ip", ip, "-o", "json"])
    assert r.returncode == 0, r.stderr
    return bool(json.loads(r.stdout)["inUse"])


def ips_in_use(lab: Lab) -> int:
    r = lab.fabricctl(["ipam", "show", "-o", "json"])
    assert r.returncode == 0, r.stderr
    return sum(p["ipsInUse"] for p in json.loads(r.stdout)["pools"])


def fab_links(lab: Lab, node: str) -> set[str]:
    out = lab.exec(node, ["ip", "-o", "link", "show"], check=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith("fab")}


def ping(lab: Lab, pod_netns: str, ip: str) -> bool:
    name = Path(pod_netns).name
    r = lab.exec("node1", ["ip", "netns", "exec", name, "ping", "-c1", "-W1", ip])
    return r.returncode == 0


@pytest.fixture(scope="module")
def remote(lab: Lab) -> str:
    """A pod on node3 (the other rack); its address."""
    ns = new_pod(lab)
    return pod_ip(ok(cni(lab, "node3", "ADD", "remote", ns)))


@pytest.mark.parametrize("version", SUPPORTED)
def test_lifecycle_every_version(lab: Lab, remote: str, version: str) -> None:
    ns = new_pod(lab)
    cid = "life" + version.replace(".", "")
    conf = netconf(version)
    res = ok(cni(lab, "node1", "ADD", cid, ns, conf))
    assert res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == (version < "1.0.0")
    ip = pod_ip(res)
    host_if = host_ifname(cid, "eth0")
    assert res["interfaces"][0]["name"] == host_if and res["interfaces"][1]["sandbox"] == ns
    assert in_use(lab, ip)
    assert f"{ip} dev {host_if}" in lab.exec("node1", ["ip", "route", "show", ip]).stdout
    lab.wait_for(lambda: ping(lab, ns, remote), 30, what=f"{cid} -> pod {remote} on node3")
    assert ping(lab, ns, lab.address("node1"))
    conf["prevResult"] = res
    if version >= "0.4.0":
        assert ok(cni(lab, "node1", "CHECK", cid, ns, conf)) is None
    else:  # CHECK came with 0.4.0
        assert err_code(cni(lab, "node1", "CHECK", cid, ns, conf)) == Code.INCOMPATIBLE_VERSION
    for _ in range(2):
        assert ok(cni(lab, "node1", "DEL", cid, ns, conf)) is None
        assert not in_use(lab, ip)
        assert host_if not in fab_links(lab, "node1")
        assert ip not in lab.exec("node1", ["ip", "route", "show", ip]).stdout


def test_second_add_same_attachment_same_ip_and_ip_request(lab: Lab) -> None:
    ns = new_pod(lab)
    first = ok(cni(lab, "node1", "ADD", "twice", ns))
    again = ok(cni(lab, "node1", "ADD", "twice", ns))
    assert again["ips"] == first["ips"]
    ok(cni(lab, "node1", "DEL", "twice", ns))
    want = "10.244.250.7"
    ns2 = new_pod(lab)
    res = ok(cni(lab, "node1", "ADD", "sticky", ns2, args=f";IP={want}"))
    assert pod_ip(res) == want and in_use(lab, want)
    ns3 = new_pod(lab)
    assert err_code(cni(lab, "node1", "ADD", "thief", ns3, args=f";IP={want}")) == (
        Code.ADDRESS_TAKEN
    )
    ok(cni(lab, "node1", "DEL", "sticky", ns2))
    ok(cni(lab, "node1", "DEL", "thief", ns3))
    assert not in_use(lab, want)


def test_bad_input_matrix(lab: Lab, tmp_path: Path) -> None:
    ns = new_pod(lab)
    not_ns = lab.dir / "node1" / "not-a-netns"
    not_ns.write_text("")
    before, links = ips_in_use(lab), fab_links(lab, "node1")
    good = json.dumps(netconf())
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("malformed JSON", {"stdin": "{not json"}, Code.DECODE_FAILURE),
        ("not an object", {"stdin": "[1, 2]"}, Code.DECODE_FAILURE),
        ("10 MB stdin", {"stdin": "{" + " " * (10 << 20) + "}"}, Code.IO_FAILURE),
        ("unknown cniVersion", {"conf": netconf("7.0.0")}, Code.INCOMPATIBLE_VERSION),
        ("wrong type", {"conf": netconf(mtu="1500")}, Code.INVALID_CONFIG),
        ("no name", {"conf": {**netconf(), "name": ""}}, Code.INVALID_CONFIG),
        ("other ipam", {"conf": netconf(ipam={"type": "host-local"})}, Code.UNSUPPORTED_FIELD),
        ("16-char ifname", {"ifname": "a" * 16, "stdin": good}, Code.INVALID_ENVIRONMENT),
        ("no container id", {"env": {"CNI_CONTAINERID": ""}}, Code.INVALID_ENVIRONMENT),
        ("bad container id", {"env": {"CNI_CONTAINERID": "-x"}}, Code.INVALID_ENVIRONMENT),
        ("no netns", {"env": {"CNI_NETNS": ""}}, Code.INVALID_ENVIRONMENT),
        ("netns not a netns", {"env": {"CNI_NETNS": str(not_ns)}}, Code.INVALID_ENVIRONMENT),
        ("netns missing", {"env": {"CNI_NETNS": "/run/netns/nope"}}, Code.UNKNOWN_CONTAINER),
        ("bad CNI_ARGS", {"env": {"CNI_ARGS": "K8S_POD_NAME=x;FOO=1"}}, Code.INVALID_ENVIRONMENT),
        ("no command", {"env": {"CNI_COMMAND": ""}}, Code.INVALID_ENVIRONMENT),
        ("pool missing", {"conf": netconf(ipam={"type": "fabric-ipam", "pools": ["nope"]})},
         Code.INVALID_CONFIG),
    ]  # fmt: skip
    for what, kw, want in cases:
        got = cni(lab, "node1", "ADD", "bad", ns, **kw)
        assert err_code(got) == want, f"{what}: {got[1]}"
    assert ips_in_use(lab) == before
    assert fab_links(lab, "node1") == links
    assert not (
        Path(socket_of(lab, "node1")).parent / "state" / f"{NETWORK}.bad.eth0.json"
    ).exists()


def test_fabricd_stopped_then_back(lab: Lab) -> None:
    ns = new_pod(lab)
    res = ok(cni(lab, "node1", "ADD", "survivor", ns))
    ip = pod_ip(res)
    lab.stop_fabricd("node1")
    try:
        conf = netconf("1.1.0", prevResult=res)
        for verb in ("ADD", "CHECK"):
            got = cni(lab, "node1", verb, "survivor", ns, conf)
            assert err_code(got) == Code.TRY_AGAIN_LATER and got[2] < 1.5, got
        got = cni(lab, "node1", "STATUS", "", "", netconf("1.1.0"))
        assert err_code(got) == Code.NOT_AVAILABLE
        # the pod's host route stays while fabricd is down
        assert f"{ip} dev" in lab.exec("node1", ["ip", "route", "show", ip]).stdout
    finally:
        lab.start_fabricd("node1")
        lab.wait_for(lambda: lab.health("node1")[0] == 200, 60, what="fabricd ready again")
    assert f"{ip} dev" in lab.exec("node1", ["ip", "route", "show", ip]).stdout
    assert ok(cni(lab, "node1", "STATUS", "", "", netconf("1.1.0"))) is None
    assert ok(cni(lab, "node1", "CHECK", "survivor", ns, netconf("1.1.0", prevResult=res))) is None
    ns2 = new_pod(lab)
    ok(cni(lab, "node1", "ADD", "after", ns2))
    for cid, n in (("survivor", ns), ("after", ns2)):  # DEL after a restart
        ok(cni(lab, "node1", "DEL", cid, n))
    assert not in_use(lab, ip)


def test_del_with_vanished_or_empty_netns_and_never_seen(lab: Lab) -> None:
    ns = new_pod(lab)
    res = ok(cni(lab, "node1", "ADD", "vanish", ns))
    lab.exec("node1", ["ip", "netns", "del", Path(ns).name], check=True)
    assert ok(cni(lab, "node1", "DEL", "vanish", ns)) is None
    assert ok(cni(lab, "node1", "DEL", "vanish", "")) is None
    assert ok(cni(lab, "node1", "DEL", "neverseen", "")) is None
    assert not in_use(lab, pod_ip(res))
    assert host_ifname("vanish", "eth0") not in fab_links(lab, "node1")


def test_gc_releases_attachments_not_valid(lab: Lab) -> None:
    pods = {cid: new_pod(lab) for cid in ("gc-keep", "gc-drop")}
    ips = {cid: pod_ip(ok(cni(lab, "node1", "ADD", cid, ns))) for cid, ns in pods.items()}
    valid = [{"containerID": "gc-keep", "ifname": "eth0"}]
    conf = netconf("1.1.0", **{"cni.dev/valid-attachments": valid})
    assert ok(cni(lab, "node1", "GC", "", "", conf)) is None
    assert in_use(lab, ips["gc-keep"]) and not in_use(lab, ips["gc-drop"])
    assert host_ifname("gc-drop", "eth0") not in fab_links(lab, "node1")
    ok(cni(lab, "node1", "DEL", "gc-keep", pods["gc-keep"]))


def test_sigkill_during_adds_leaves_nothing_half_done(lab: Lab) -> None:
    """ADDs in flight when fabricd is SIGKILLed: after the restart every attachment is
    either complete (a ready record, its link, its address) or gone; DEL cleans up all."""
    import concurrent.futures
    import signal

    base_ips, base_links = ips_in_use(lab), fab_links(lab, "node1")
    state_dir = Path(socket_of(lab, "node1")).parent / "state"
    pods = {f"kill{i}": new_pod(lab) for i in range(16)}
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as ex:
        futs = [ex.submit(cni, lab, "node1", "ADD", cid, ns) for cid, ns in pods.items()]
        lab.wait_for(lambda: any('"adding"' in p.read_text() for p in state_dir.glob("*.json")),
                     10, 0.001, "an ADD in flight")  # fmt: skip
        lab.stop_fabricd("node1", signal.SIGKILL)
        results = [f.result() for f in futs]
    failed = [r for r in results if r[0] != 0]
    assert all(r[1]["code"] == Code.TRY_AGAIN_LATER for r in failed), failed
    lab.start_fabricd("node1")
    lab.wait_for(lambda: lab.health("node1")[0] == 200, 60, what="fabricd ready again")
    records = [json.loads(p.read_text()) for p in state_dir.glob(f"{NETWORK}.kill*.json")]
    assert {r["phase"] for r in records} <= {"ready"}
    ready = {r["containerID"] for r in records}
    assert fab_links(lab, "node1") - base_links == {host_ifname(c, "eth0") for c in ready}
    assert ips_in_use(lab) - base_ips == len(ready)
    for cid, ns in pods.items():  # what the runtime does after a failed ADD, and at the end
        ok(cni(lab, "node1", "DEL", cid, ns))
    assert ips_in_use(lab) == base_ips and fab_links(lab, "node1") == base_links
    assert not list(state_dir.glob(f"{NETWORK}.kill*"))
