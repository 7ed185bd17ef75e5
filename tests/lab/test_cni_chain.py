"""The installed config list (fabric, then the reference portmap and bandwidth) run as a
runtime runs it, with libcni's semantics: every plugin in order, each given the previous
one's result as ``prevResult`` and, for each capability it declares, the runtime's value as
``runtimeConfig``; CHECK in order and DEL in reverse order, each with the cached ADD result.
A port mapping is reached from another host of the lab through the node's address and host
port; DEL removes portmap's rules and the port no longer answers. Everything runs inside the
lab's namespaces (``two-rack``: the client is a host of the other rack).

The hosts need a default route: the pod's gateway 169.254.1.1 is answered by proxy ARP,
which the kernel does only for an address it has a route to (in ``mesh3`` the hosts have
none, and a pod there reaches nothing)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fabric_helpers import fabric_lab

from lab.pods import state_dir
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
NODE, CLIENT = "node1", "node3"
NETWORK = "fabric"
CONTAINER_PORT, HOST_PORT = 8080, 18080
REFERENCE_DIR = "/usr/lib/cni"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("pod saw " + peer[0] + "\\n").encode())
    c.close()
"""
CLIENT_CODE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        print(c.makefile().readline().strip())
except OSError as e:
    print(type(e).__name__)
"""


class Runtime:
    """libcni's AddNetworkList / CheckNetworkList / DelNetworkList over a config list,
    exec'ing each plugin inside ``node``'s namespace (env + stdin, as libcni's RawExec)."""

    def __init__(self, lab: Lab, node: str, conflist: dict[str, Any], path: list[str]) -> None:
        self.lab, self.node, self.conflist, self.path = lab, node, conflist, path
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}  # libcni's result cache

    def find(self, plugin: str) -> str:
        for d in self.path:
            if Path(d, plugin).exists():
                return str(Path(d, plugin))
        raise AssertionError(f"plugin {plugin} not in {self.path}")

    def run(self, plugin: str, env: dict[str, str], conf: dict[str, Any]) -> tuple[int, Any]:
        """(exit code, stdout JSON or None) of one plugin exec."""
        e = {"PATH": PATH, "CNI_PATH": ":".join(self.path), **env}
        argv = ["env", "-i", *(f"{k}={v}" for k, v in e.items()), self.find(plugin)]
        r = self.lab.exec(self.node, argv, timeout=60, input=json.dumps(conf))
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None

    def exec(self, plugin: str, env: dict[str, str], conf: dict[str, Any]) -> Any:
        code, out = self.run(plugin, env, conf)
        assert code == 0, f"{plugin} {env['CNI_COMMAND']}: {out}"
        return out

    def validate(self) -> None:
        """What libcni's ValidateNetworkList does: every plugin answers VERSION (with dummy
        values in the other variables) and supports the list's cniVersion."""
        dummy = {"CNI_COMMAND": "VERSION", "CNI_CONTAINERID": "dummy", "CNI_NETNS": "dummy",
                 "CNI_IFNAME": "dummy"}  # fmt: skip
        for p in self.conflist["plugins"]:
            got = self.exec(p["type"], dummy, {"cniVersion": self.conflist["cniVersion"]})
            assert self.conflist["cniVersion"] in got["supportedVersions"], (p["type"], got)

    def _conf(self, plugin: dict[str, Any], prev: Any, caps: dict[str, Any]) -> dict[str, Any]:
        """libcni's buildOneConfig: name, cniVersion, prevResult and runtimeConfig injected."""
        conf = {**plugin, "name": self.conflist["name"], "cniVersion": self.conflist["cniVersion"]}
        if prev is not None:
            conf["prevResult"] = prev
        rc = {k: caps[k] for k, on in plugin.get("capabilities", {}).items() if on and k in caps}
        if rc:
            conf["runtimeConfig"] = rc
        return conf

    def _env(self, verb: str, cid: str, netns: str) -> dict[str, str]:
        return {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
                "CNI_IFNAME": "eth0", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={cid}"}  # fmt: skip

    def add(self, cid: str, netns: str, caps: dict[str, Any]) -> Any:
        result = None
        for p in self.conflist["plugins"]:
            result = self.exec(p["type"], self._env("ADD", cid, netns), self._conf(p, result, caps))
        self.cache[(cid, "eth0")] = result
        return result

    def check(self, cid: str, netns: str, caps: dict[str, Any]) -> dict[str, Any]:
        """Each plugin's CHECK answer (None: success). libcni stops at the first error;
        every plugin is asked here, to tell whose check failed."""
        cached = self.cache[(cid, "eth0")]
        return {p["type"]: self.run(p["type"], self._env("CHECK", cid, netns),
                                    self._conf(p, cached, caps))[1]
                for p in self.conflist["plugins"]}  # fmt: skip

    def delete(self, cid: str, netns: str, caps: dict[str, Any]) -> None:
        cached = self.cache.pop((cid, "eth0"), None)
        for p in reversed(self.conflist["plugins"]):
            self.exec(p["type"], self._env("DEL", cid, netns), self._conf(p, cached, caps))


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    return lab


@pytest.fixture(scope="module")
def runtime(lab: Lab) -> Runtime:
    d = lab.dir / NODE / "cni"
    sock = yaml.safe_load(lab.fabricd_config_path(NODE).read_text())["cni"]["socket"]
    r = lab.fabricctl(["cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir",
                       str(d / "net.d"), "--socket", sock, "--network-name", NETWORK,
                       "--state-dir", str(state_dir(lab, NODE))], NODE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    conflist = json.loads((d / "net.d" / "10-fabric.conflist").read_text())
    return Runtime(lab, NODE, conflist, [str(d / "bin"), REFERENCE_DIR])


def nat_rules(lab: Lab, node: str) -> str:
    return lab.exec(node, ["iptables-save", "-t", "nat"], check=True).stdout


def connect(lab: Lab) -> str:
    """From CLIENT to NODE's address and HOST_PORT: the pod's line or the error's name."""
    argv = ["/usr/bin/python3", "-IS", "-c", CLIENT_CODE, lab.address(NODE), str(HOST_PORT)]
    return lab.exec(CLIENT, argv, timeout=15).stdout.strip()


def answered(lab: Lab) -> str | None:
    got = connect(lab)
    return got if got.startswith("pod saw") else None


def test_installed_list_chains_portmap_with_port_mappings(runtime: Runtime) -> None:
    types = [p["type"] for p in runtime.conflist["plugins"]]
    assert types == ["fabric", "portmap", "bandwidth"]
    portmap = runtime.conflist["plugins"][1]
    assert portmap["capabilities"] == {"portMappings": True}
    runtime.validate()


def test_port_mapping_through_the_chain_and_del_removes_it(lab: Lab, runtime: Runtime) -> None:
    cid = "chain0"
    netns = lab.add_netns(f"{lab.plan.prefix}chain0")
    caps = {"portMappings": [{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT,
                              "protocol": "tcp"}]}  # fmt: skip
    server = subprocess.Popen(["ip", "netns", "exec", Path(netns).name, "/usr/bin/python3",
                               "-IS", "-c", SERVER, str(CONTAINER_PORT)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    with server:  # closes its pipe and reaps it
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            assert "CNI-DN" not in nat_rules(lab, NODE)
            result = runtime.add(cid, netns, caps)
            # the result went through portmap and bandwidth unchanged: fabric's pod address
            pod = result["ips"][0]["address"].split("/")[0]
            assert result["interfaces"][1]["sandbox"] == netns
            rules = nat_rules(lab, NODE)
            assert f'id: \\"{cid}\\"' in rules and f"--dport {HOST_PORT}" in rules, rules
            assert f"--to-destination {pod}:{CONTAINER_PORT}" in rules, rules
            checked = runtime.check(cid, netns, caps)
            assert checked["fabric"] is None and checked["bandwidth"] is None, checked
            # Debian's portmap 1.1.1 fails CHECK of an IPv4-only mapping looking for its IPv6
            # chain (containernetworking/plugins#819, fixed upstream in 1.2.0)
            assert checked["portmap"] is None or "ipv6 dnat" in checked["portmap"]["msg"], checked
            got = lab.wait_for(lambda: answered(lab), 20,
                               what=f"{lab.address(NODE)}:{HOST_PORT} to answer from the pod")  # fmt: skip
            assert got == f"pod saw {lab.address(CLIENT)}"  # DNAT, no SNAT from another host
            runtime.delete(cid, netns, caps)
            rules = nat_rules(lab, NODE)
            assert cid not in rules and f"--dport {HOST_PORT}" not in rules, rules
            assert "CNI-DN" not in rules, rules
            assert connect(lab) == "ConnectionRefusedError"
            runtime.delete(cid, netns, caps)  # a repeated DEL of the whole list succeeds
        finally:
            server.kill()  # by its Popen: the listener this test started
