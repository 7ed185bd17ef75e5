"""DEL never waits for fabricd (docs/design/cni.md, "DEL while fabricd is down"): the
installed plugin, exec'd as a runtime does (lab/pods.py), records a DEL it cannot deliver
and answers success; fabricd finishes every recorded DEL when it is back, before any ADD of
the same attachment, freeing exactly the allocations the attachment held."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fabric_helpers import fabric_lab

from cni.errors import Code
from cni.install import PENDING_DIR
from fabric.dataplane.attachment import host_ifname
from lab import pods, procs
from lab.pods import Pod
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOST, REMOTE = "node1", "node3"


@pytest.fixture(scope="module")
def lab(make_lab) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    pods.install(lab, [HOST, REMOTE])
    yield lab
    for m in lab.etcd.members if lab.etcd else ():  # reaped: one test starts them again
        m.stop(timeout=3)


def pending(lab: Lab, node: str = HOST) -> list[Path]:
    return sorted((pods.state_dir(lab, node) / PENDING_DIR).glob("*.del"))


def in_use(lab: Lab, ip: str) -> dict[str, object]:
    r = lab.fabricctl(["ipam", "show", "--ip", ip, "-o", "json"])
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def leftovers(lab: Lab, pod: Pod) -> list[str]:
    """What is left of a deleted pod on its node: address, veth, host route, record."""
    out = []
    if in_use(lab, pod.ip)["inUse"]:
        out.append(f"{pod.ip} in use")
    veth = host_ifname(pod.name, "eth0")
    if veth in lab.exec(pod.node, ["ip", "-o", "link", "show"], check=True).stdout:
        out.append(f"link {veth}")
    if "dev" in lab.exec(pod.node, ["ip", "route", "show", pod.ip], check=True).stdout:
        out.append(f"route {pod.ip}")
    if list(pods.state_dir(lab, pod.node).glob(f"*.{pod.name}.eth0.json")):
        out.append("state record")
    return out


def ipam_clean(lab: Lab) -> None:
    live = lab.dir / "live-handles.json"
    live.write_text(json.dumps(pods.live_handles(lab, [HOST, REMOTE])))
    r = lab.fabricctl(["ipam", "check", "--live-handles", str(live)])
    assert r.returncode == 0, r.stdout + r.stderr


def runtime_del(lab: Lab, pod: Pod) -> tuple[int, object, float]:
    """DEL as a runtime tearing a sandbox down: the plugin, then the netns goes."""
    started = time.monotonic()
    code, doc = pods.cni(lab, pod.node, "DEL", pod.name, pod.netns)
    took = time.monotonic() - started
    if code == 0:
        lab.exec(pod.node, ["ip", "netns", "del", pod.netns_name], check=True)
    return code, doc, took


def back(lab: Lab, node: str = HOST) -> None:
    lab.start_fabricd(node)
    lab.wait_for(lambda: lab.health(node)[0] == 200, 60, what=f"fabricd in {node} ready")


def test_del_while_fabricd_is_down_succeeds_and_is_finished_on_start(lab: Lab) -> None:
    made = [pods.add(lab, HOST) for _ in range(3)]
    keep = pods.add(lab, HOST)
    lab.stop_fabricd(HOST)
    try:
        for pod in made:
            code, doc, took = runtime_del(lab, pod)
            assert (code, doc) == (0, None) and took < 1.5, (code, doc, took)
        assert len(pending(lab)) == len(made)
        for verb in ("ADD", "CHECK"):  # these still wait for fabricd
            code, doc = pods.cni(lab, HOST, verb, keep.name, keep.netns,
                                 pods.netconf("1.1.0", prevResult=keep.result))  # fmt: skip
            assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER, doc
    finally:
        back(lab)
    assert pending(lab) == []
    for pod in made:
        assert leftovers(lab, pod) == [], pod
    assert in_use(lab, keep.ip)["inUse"]
    ipam_clean(lab)
    again = pods.add(lab, HOST)
    for pod in (keep, again):
        assert runtime_del(lab, pod)[0] == 0
    ipam_clean(lab)


def test_sigkill_while_dels_arrive_leaks_nothing(lab: Lab) -> None:
    made = [pods.add(lab, HOST) for _ in range(12)]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(runtime_del, lab, p) for p in made]
        lab.wait_for(lambda: sum(f.done() for f in futs) >= 2, 60, 0.01, "two DELs done")
        lab.stop_fabricd(HOST, signal.SIGKILL)
        results = [f.result() for f in futs]
    try:
        assert [r[0] for r in results] == [0] * len(made), results
        assert pending(lab), "no DEL was recorded: the kill came too late to test anything"
    finally:
        back(lab)
    assert pending(lab) == []
    for pod in made:
        assert leftovers(lab, pod) == [], pod
    ipam_clean(lab)


def test_a_recorded_del_never_frees_an_address_given_again(lab: Lab) -> None:
    """The attachment's address is freed (an operator's release) and given again to the same
    handle on another node while the recorded DEL waits: finishing it frees nothing."""
    old = pods.add(lab, HOST, name="reuse")
    lab.stop_fabricd(HOST)
    try:
        assert runtime_del(lab, old)[0] == 0
        r = lab.fabricctl(["ipam", "release", "--ip", old.ip])
        assert r.returncode == 0, r.stderr
        new = pods.add(lab, REMOTE, name="reuse", args=f";IP={old.ip}")
        assert new.ip == old.ip
    finally:
        back(lab)
    assert pending(lab) == []
    doc = in_use(lab, old.ip)
    assert doc["inUse"] and doc["handle"] == f"{pods.NETWORK}.reuse.eth0", doc
    assert doc["attributes"]["node"] == REMOTE, doc  # type: ignore[index]
    assert host_ifname("reuse", "eth0") not in lab.exec(HOST, ["ip", "-o", "link"]).stdout
    log = (lab.dir / HOST / "fabricd.out").read_text()
    assert "were given again since; left alone" in log
    assert runtime_del(lab, new)[0] == 0
    ipam_clean(lab)


def test_del_while_etcd_is_down_is_recorded_by_fabricd(lab: Lab) -> None:
    """fabricd runs, etcd does not answer: the runtime's DEL tears the pod down at once,
    fabricd records the release in pending-del/ and answers success; the address is freed
    once etcd is back (the 5 s sweep), nothing left behind."""
    pod = pods.add(lab, HOST, name="etcd-down")
    assert lab.etcd is not None
    for m in lab.etcd.members:
        m.stop(timeout=3)
    try:
        lab.wait_for(lambda: lab.health(HOST)[0] == 503, 15, 0.2, f"{HOST} sees etcd down")
        code, doc, took = runtime_del(lab, pod)
        assert code == 0, doc
        assert took < 3.0, f"the DEL took {took:.1f} s"
        assert len(pending(lab)) == 1
        veth = host_ifname(pod.name, "eth0")
        assert veth not in lab.exec(HOST, ["ip", "-o", "link", "show"], check=True).stdout
        assert "dev" not in lab.exec(HOST, ["ip", "route", "show", pod.ip], check=True).stdout
    finally:
        for m in lab.etcd.start_stopped(30):  # recorded with the lab, as up() does: torn down
            assert m.proc is not None
            argv = [str(a) for a in m.proc.args]  # type: ignore[union-attr]
            lab.state.add_proc(procs.record(m.proc.pid, argv[4:], m.netns or "",
                                            lab.nodes("etcd")[0], f"etcd-{m.name}"))  # fmt: skip
    lab.wait_for(lambda: not pending(lab), 30, 0.5, "the recorded DEL finished")
    assert leftovers(lab, pod) == []
    ipam_clean(lab)
