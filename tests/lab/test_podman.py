"""A real container runtime on the fabric: Debian's podman 4.3 with its CNI backend runs a
busybox root filesystem (``podman run --rootfs``) in host node1 of the two-rack lab, on the
network ``fabricctl cni install`` wrote. The container gets its address from fabric (its IPAM
holds it for podman's container ID, node1 routes it to the container's veth) and pings a pod
on node3, in the other rack; removing the container releases the address.

What podman needs on this machine (docs/design/cni.md, "Chaining and runtimes"):
- it runs through ``nsenter --net`` into the node's namespace: ``ip netns exec`` remounts
  /sys and hides the cgroup mounts (crun/runc fail on '/sys/fs/cgroup');
- runc, not crun (crun 1.8 refuses the hybrid cgroup layout), cgroupfs (no systemd);
- default_ulimits within the hard limits here (no CAP_SYS_RESOURCE to raise them);
- nothing of the machine's podman state is used: containers.conf, storage.conf (vfs), root,
  runroot, tmp dir, file locks (not /dev/shm), XDG dirs and HOME all live in a temporary
  directory, and the containers' cgroups under a parent of this run, removed at the end.
  libcni's result cache (/var/lib/cni) and runc's state root (/run/runc) cannot be moved
  (``--runtime-flag root=`` is not passed on to conmon's cleanup, which then misses the
  container); both are emptied by podman and removed at the end if this test made them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric.dataplane.attachment import host_ifname
from lab import netns, render
from lab.pods import state_dir
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root, pytest.mark.slow]
NODE, REMOTE = "node1", "node3"
NETWORK = "fabric"
NAME = "fabric-podman-test"
BUSYBOX = Path("/bin/busybox")  # busybox-static: no libraries needed in the rootfs
APPLETS = ("sh", "ip", "ping", "sleep", "true", "cat")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# created by libcni (its result cache) and runc (its state root) whatever the config says
UNMOVABLE = (Path("/var/lib/cni/results"), Path("/var/lib/cni"), Path("/run/runc"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing() -> list[str]:
    out = [b for b in ("podman", "runc", "nsenter") if shutil.which(b) is None]
    if not BUSYBOX.is_file():
        out.append(f"{BUSYBOX} (busybox-static)")
    return out


class Podman:
    """podman in ``node``'s network namespace with every file of it under ``work``."""

    def __init__(self, lab: Lab, node: str, work: Path) -> None:
        self.lab, self.node, self.work = lab, node, work
        self.rootfs = work / "rootfs"
        self.cgroup_parent = f"/fabric-test-{os.getpid()}"
        cni = lab.dir / node / "cni"
        self.cni_bin, self.cni_conf = cni / "bin", cni / "net.d"
        self.env = {"PATH": PATH, "HOME": str(work / "home"), "TMPDIR": str(work / "tmp"),
                    "CONTAINERS_CONF": str(work / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
                    "XDG_RUNTIME_DIR": str(work / "xdg-run"),
                    "XDG_CONFIG_HOME": str(work / "xdg-config"),
                    "XDG_DATA_HOME": str(work / "xdg-data")}  # fmt: skip

    def prepare(self) -> None:
        w = self.work
        for d in ("home", "tmp", "xdg-run", "xdg-config", "xdg-data", "storage", "run"):
            (w / d).mkdir(parents=True, exist_ok=True)
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
            (self.rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, self.rootfs / "bin" / "busybox")
        for applet in APPLETS:
            (self.rootfs / "bin" / applet).symlink_to("busybox")
        (w / "containers.conf").write_text(f"""\
[containers]
netns = "private"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
pids_limit = 0

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{w}/events.log"
runtime = "runc"
tmp_dir = "{w}/tmp"
lock_type = "file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{self.cni_bin}", "/usr/lib/cni"]
network_config_dir = "{self.cni_conf}"
default_network = "{NETWORK}"
""")
        (w / "storage.conf").write_text(f"""\
[storage]
driver = "vfs"
graphroot = "{w}/storage"
runroot = "{w}/run"
""")

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net={netns.NETNS_DIR / self.lab.netns(self.node)}", "podman",
                "--root", str(self.work / "storage"), "--runroot", str(self.work / "run"),
                *args]  # fmt: skip
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.work)  # fmt: skip

    def run(self, *options: str, cmd: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        """``podman run`` of ``cmd`` in the busybox root filesystem, under this run's cgroup
        parent."""
        return self("run", "--cgroup-parent", self.cgroup_parent, *options,
                    "--rootfs", str(self.rootfs), *cmd)  # fmt: skip

    def cleanup(self) -> None:
        """Remove every container, then the cgroups under this run's parent (empty ones)."""
        self("rm", "--all", "--force", "--time", "0")
        for hierarchy in CGROUP_ROOT.iterdir():
            top = hierarchy / self.cgroup_parent.lstrip("/")
            if top.is_dir():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    if missing():
        pytest.skip(f"not installed: {', '.join(missing())} (scripts/install-deps.sh)")
    lab: Lab = make_lab("two-rack")
    for r in ("spine", "tor1", "tor2"):
        lab.wait_for(lambda r=r: lab.established(r), 30, what=f"BGP sessions of {r}")
    lab.start_fabric()
    for node in (NODE, REMOTE):
        d = lab.dir / node / "cni"
        sock = yaml.safe_load(lab.fabricd_config_path(node).read_text())["cni"]["socket"]
        r = lab.fabricctl(["cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir",
                           str(d / "net.d"), "--socket", sock, "--network-name", NETWORK,
                           "--state-dir", str(state_dir(lab, node))], node)  # fmt: skip
        assert r.returncode == 0, r.stderr
    return lab


@pytest.fixture(scope="module")
def podman(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    existed = {p: p.exists() for p in UNMOVABLE}
    pm = Podman(lab, NODE, tmp_path_factory.mktemp("podman"))
    pm.prepare()
    try:
        r = pm.run("--rm", "--network", "none", cmd=("/bin/true",))
        if r.returncode != 0:  # podman itself, before any network: this machine, not fabric
            why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            pytest.skip(f"podman cannot run a container on this machine: {why}")
        yield pm
    finally:
        pm.cleanup()
        for p in UNMOVABLE:  # in this order: results before its parent
            if not existed[p] and p.is_dir():
                with contextlib.suppress(OSError):
                    p.rmdir()


@pytest.fixture(scope="module")
def remote(lab: Lab) -> str:
    """A pod on node3 made by the installed plugin (as in test_cni); its address."""
    ns = lab.add_netns(f"{lab.plan.prefix}remote")
    bin_dir = lab.dir / REMOTE / "cni" / "bin"
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "remote", "CNI_NETNS": ns,
           "CNI_IFNAME": "eth0", "CNI_PATH": f"{bin_dir}:/usr/lib/cni"}  # fmt: skip
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "fabric",
            "ipam": {"type": "fabric-ipam"}}  # fmt: skip
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(bin_dir / "fabric")]
    r = lab.exec(REMOTE, argv, input=json.dumps(conf))
    assert r.returncode == 0, r.stdout
    return str(json.loads(r.stdout)["ips"][0]["address"].split("/")[0])


def ipam(lab: Lab, ip: str) -> dict[str, Any]:
    r = lab.fabricctl(["ipam", "show", "--ip", ip, "-o", "json"])
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_container_gets_a_fabric_address_and_pings_a_pod_on_another_node(
    lab: Lab, podman: Podman, remote: str
) -> None:
    r = podman.run("-d", "--name", NAME, "--network", NETWORK, cmd=("/bin/sleep", "600"))
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip().splitlines()[-1]
    fmt = f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}'
    r = podman("inspect", NAME, "--format", fmt)
    assert r.returncode == 0, r.stderr
    ip = r.stdout.strip()
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(render.POD_POOL)
    doc = ipam(lab, ip)
    assert doc["inUse"] and doc["handle"] == f"{NETWORK}.{cid}.eth0", doc
    assert doc["attributes"]["node"] == NODE and doc["attributes"]["pod"] == NAME, doc
    veth = host_ifname(cid, "eth0")
    assert f"{ip} dev {veth}" in lab.exec(NODE, ["ip", "route", "show", ip]).stdout
    inside = podman("exec", NAME, "ip", "-4", "addr", "show", "eth0")
    assert f"inet {ip}/32" in inside.stdout, inside.stdout + inside.stderr
    lab.wait_for(lambda: podman("exec", NAME, "ping", "-c1", "-W1", remote).returncode == 0,
                 30, 0.5, f"the container ({ip}, {NODE}) to ping pod {remote} on {REMOTE}")  # fmt: skip
    r = podman("rm", "--force", "--time", "0", NAME)
    assert r.returncode == 0, r.stderr
    assert not ipam(lab, ip)["inUse"]
    assert veth not in lab.exec(NODE, ["ip", "-o", "link", "show"]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_rm_while_fabricd_is_down_succeeds_and_leaks_nothing(
    lab: Lab, podman: Podman, sig: int
) -> None:
    """podman's teardown DEL while fabricd is stopped or was SIGKILLed: the container and
    its netns go at once; fabricd, back, frees the address, removes the veth, route, record."""
    name = f"fabric-outage-{int(sig)}"
    r = podman.run("-d", "--name", name, "--network", NETWORK, cmd=("/bin/sleep", "600"))
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip().splitlines()[-1]
    fmt = f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}'
    ip = podman("inspect", name, "--format", fmt).stdout.strip()
    sandbox = podman("inspect", name, "--format", "{{.NetworkSettings.SandboxKey}}").stdout.strip()
    assert ip and sandbox and os.path.exists(sandbox), (ip, sandbox)
    pending = state_dir(lab, NODE) / "pending-del"
    lab.stop_fabricd(NODE, sig)
    try:
        r = podman("rm", "--force", "--time", "0", name)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(sandbox)
        assert name not in podman("ps", "-a", "--format", "{{.Names}}").stdout
        assert len(list(pending.glob("*.del"))) == 1
        assert ipam(lab, ip)["inUse"]  # not yet: fabricd is down
    finally:
        lab.start_fabricd(NODE)
        lab.wait_for(lambda: lab.health(NODE)[0] == 200, 60, what="fabricd ready again")
    assert not list(pending.glob("*.del"))
    assert not ipam(lab, ip)["inUse"]
    assert host_ifname(cid, "eth0") not in lab.exec(NODE, ["ip", "-o", "link", "show"]).stdout
    assert "dev" not in lab.exec(NODE, ["ip", "route", "show", ip]).stdout
    assert not list(state_dir(lab, NODE).glob(f"*.{cid}.eth0.json"))
