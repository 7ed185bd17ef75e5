"""fabric.dataplane.pods against the real kernel, in throwaway namespaces (tdp + 4 hex digits).

Each test gets a "node" namespace, where fabricd would run, and pods' namespaces. The
Dataplane under test is made with ``Dataplane(netns=<node>)``: its host ends and host
sysctls land in the node namespace while the test process stays where it is. The timing
test instead runs a default ``Dataplane()`` in a thread switched into the node namespace,
which is how fabricd runs in the lab.

The node has an uplink veth ``up0`` (10.79.255.1/24, fd79::ff:1/128) and a default route
through it: proxy ARP answers for 169.254.1.1 only when the node has a route to it through
another interface. Addresses: 10.79.0.0/16 and fd79::/64 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import time
from collections.abc import Coroutine, Iterator
from ipaddress import ip_interface
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fabric.dataplane.attachment import (
    HOST_MAC,
    Attached,
    Attachment,
    DataplaneError,
    InterfaceExists,
    InvalidAttachment,
    NetnsNotFound,
    host_ifname,
)
from fabric.dataplane.netlink import in_netns
from fabric.dataplane.netlink.links import IPInterface
from fabric.dataplane.netlink.sysctls import sysctl_path
from fabric.dataplane.pods import Dataplane
from lab import netns as labns

T = TypeVar("T")
V4 = ip_interface("10.79.0.5/32")
V6 = ip_interface("fd79::5/128")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sh(ns: str, *argv: str) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=False, capture_output=True, text=True
    )
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def ipj(ns: str, *argv: str) -> Any:
    return json.loads(subprocess.check_output(["ip", "-j", "-n", ns, *argv], text=True) or "[]")


def links(ns: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in ipj(ns, "link", "show")}


def sysctl(ns: str, key: str) -> str:
    return sh(ns, "sysctl", "-n", key).strip()


class Namespaces:
    """Namespaces made by one test, deleted at its end whatever happened."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self) -> str:
        name = f"tdp{secrets.token_hex(2)}"
        labns.add(name)
        self.names.append(name)
        return name

    def pod(self) -> str:
        """A pod namespace; its path (what CNI_NETNS holds)."""
        return f"/run/netns/{self.add()}"


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    made = Namespaces()
    try:
        yield made
    finally:
        for name in made.names:
            labns.delete(name)


@pytest.fixture
def node(spaces: Namespaces) -> str:
    name = spaces.add()
    labns.batch(name, [
        "link set lo up",
        "link add up0 type veth peer name up1",
        "link set up0 up",
        "link set up1 up",
        "addr add 10.79.255.1/24 dev up0",
        "addr add fd79::ff:1/128 dev up0 nodad",
        "route add default via 10.79.255.254 dev up0",
    ])  # fmt: skip
    return name


@pytest.fixture
def dp(node: str) -> Iterator[Dataplane]:
    plane = Dataplane(netns=node)
    try:
        yield plane
    finally:
        run(plane.close())


def fab_links(node: str) -> list[str]:
    return [name for name in links(node) if name.startswith("fab")]


# ---------------------------------------------------------------- pure


def test_host_ifname_is_fab_and_11_hex_of_sha1() -> None:
    digest = hashlib.sha1(b"abc123.eth0").hexdigest()
    assert host_ifname("abc123", "eth0") == "fab" + digest[:11]
    assert host_ifname("abc123", "eth0") != host_ifname("abc123", "eth1")


@pytest.mark.parametrize("ifname", ["", "a" * 16, ".", "..", "a/b", "a b", "a\tb", "a:b"])
def test_bad_ifnames_are_refused(ifname: str) -> None:
    with pytest.raises(InvalidAttachment) as e:
        Attachment("c", ifname, "/run/netns/x", (V4,))
    assert e.value.field == "ifname"


def test_attachment_validation() -> None:
    a = Attachment("c", "e" * 15, "/x", (ip_interface("10.79.0.5/24"), V6), 1280)
    assert a.ips == (V4, V6)  # forced to /32 and /128
    with pytest.raises(InvalidAttachment, match="mtu"):
        Attachment("c", "eth0", "/x", (V6,), 1279)  # IPv6 needs 1280
    with pytest.raises(InvalidAttachment, match="ips"):
        Attachment("c", "eth0", "/x", ())
    with pytest.raises(InvalidAttachment, match="ips"):
        Attachment("c", "eth0", "/x", (V4, V4))
    for key in ("kernel.hostname", "net", "net..x", "net/ipv4/../x", "net.ipv4. x"):
        with pytest.raises(InvalidAttachment, match="sysctls"):
            Attachment("c", "eth0", "/x", (V4,), sysctls={key: "1"})
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert sysctl_path("net/ipv4/conf/e.100/rp_filter") == "/proc/sys/net/ipv4/conf/e.100/rp_filter"


# ---------------------------------------------------------------- attach


def test_attach_v4(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    pod = Path(path).name
    a = Attachment("c-v4", "eth0", path, (V4,), 1400, {"net.ipv4.ip_unprivileged_port_start": "0"})
    got = run(dp.attach(a))
    host = host_ifname("c-v4", "eth0")
    assert got == Attached(host, HOST_MAC, "eth0", got.pod_mac, path, (V4,), got.pod_ifindex)
    eth0 = links(pod)["eth0"]
    assert (eth0["address"], eth0["ifindex"], eth0["mtu"]) == (got.pod_mac, got.pod_ifindex, 1400)
    assert "UP" in eth0["flags"]
    hl = links(node)[host]
    assert (hl["address"], hl["mtu"], "UP" in hl["flags"]) == (HOST_MAC, 1400, True)
    addrs = [(i["local"], i["prefixlen"]) for i in ipj(pod, "addr", "show", "eth0")[0]["addr_info"]]
    assert ("10.79.0.5", 32) in addrs
    routes = {(r["dst"], r.get("gateway"), r["dev"]) for r in ipj(pod, "-4", "route")}
    assert routes == {("169.254.1.1", None, "eth0"), ("default", "169.254.1.1", "eth0")}
    assert sysctl(pod, "net.ipv4.ip_unprivileged_port_start") == "0"
    for key, want in (("conf.{}.proxy_arp", "1"), ("neigh.{}.proxy_delay", "0")):
        assert sysctl(node, "net.ipv4." + key.format(host)) == want
    assert sysctl(node, f"net.ipv4.conf.{host}.forwarding") == "1"
    assert run(dp.check(a)) == []


def test_attach_v4_v6_and_pod_reaches_the_node(
    spaces: Namespaces, node: str, dp: Dataplane
) -> None:
    path = spaces.pod()
    pod = Path(path).name
    got = run(dp.attach(Attachment("c-46", "eth0", path, (V4, V6))))
    host = got.host_ifname
    routes6 = {(r["dst"], r.get("gateway")) for r in ipj(pod, "-6", "route") if "gateway" in r}
    assert routes6 == {("default", "fe80::ecee:eeff:feee:eeee")}
    host_addrs = [i["local"] for i in ipj(node, "addr", "show", host)[0]["addr_info"]]
    assert host_addrs == ["fe80::ecee:eeff:feee:eeee"]  # ours, no kernel-made second one
    for key in ("proxy_ndp", "forwarding"):
        assert sysctl(node, f"net.ipv6.conf.{host}.{key}") == "1"
    assert sysctl(node, f"net.ipv6.conf.{host}.accept_ra") == "0"
    # the host routes are the caller's (RouteTable); here by hand
    labns.batch(node, [f"route add 10.79.0.5/32 dev {host}", f"route add fd79::5/128 dev {host}"])
    sh(pod, "ping", "-c1", "-W2", "10.79.255.1")
    sh(pod, "ping", "-6", "-c1", "-W2", "fd79::ff:1")
    sh(node, "ping", "-c1", "-W2", "10.79.0.5")


def test_check_reports_what_is_missing(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    pod = Path(path).name
    a = Attachment("c-chk", "eth0", path, (V4, V6), sysctls={"net.ipv4.ip_forward": "1"})
    run(dp.attach(a))
    assert run(dp.check(a)) == []
    # (deleting the only IPv4 address would take the IPv4 routes with it)
    labns.batch(pod, ["addr del fd79::5/128 dev eth0", "route del default via 169.254.1.1"])
    sh(pod, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    problems = run(dp.check(a))
    assert len(problems) == 3, problems
    assert "fd79::5/128" in problems[0] and "0.0.0.0/0" in problems[1]
    assert "ip_forward" in problems[2]
    run(dp.detach("c-chk", "eth0", path))
    assert run(dp.check(a)) == [f"host end {host_ifname('c-chk', 'eth0')} is missing",
                                f"eth0 is missing in {path}"]  # fmt: skip


# ---------------------------------------------------------------- detach


def test_detach_is_idempotent(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    run(dp.attach(Attachment("c-del", "eth0", path, (V4,))))
    assert run(dp.detach("c-del", "eth0", path)) is True
    assert fab_links(node) == [] and "eth0" not in links(Path(path).name)
    assert run(dp.detach("c-del", "eth0", path)) is False
    assert run(dp.detach("c-del", "eth0", None)) is False
    assert run(dp.detach("never-seen", "eth0", path)) is False
    assert run(dp.detach("c-del", "eth0", "/run/netns/tdp-no-such")) is False
    run(dp.attach(Attachment("c-gone", "eth0", path, (V4,))))
    labns.delete(Path(path).name)  # the runtime deleted the netns first: the veth goes with it
    deadline = time.monotonic() + 5  # the kernel destroys a netns in the background
    while fab_links(node) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run(dp.detach("c-gone", "eth0", path)) is False
    assert fab_links(node) == []
    with pytest.raises(InvalidAttachment):
        run(dp.detach("c", "x" * 16, path))


def test_detach_removes_a_pod_veth_whose_host_end_is_unknown(
    spaces: Namespaces, dp: Dataplane
) -> None:
    path = spaces.pod()
    labns.batch(Path(path).name, ["link add eth0 type veth peer name other"])
    assert run(dp.detach("c-orphan", "eth0", path)) is True
    assert set(links(Path(path).name)) == {"lo"}


# ---------------------------------------------------------------- failures leave nothing


def test_existing_ifname_is_refused_and_nothing_is_left(
    spaces: Namespaces, node: str, dp: Dataplane
) -> None:
    path = spaces.pod()
    pod = Path(path).name
    labns.batch(pod, ["link add eth0 type veth peer name peer0"])
    with pytest.raises(InterfaceExists):
        run(dp.attach(Attachment("c-exists", "eth0", path, (V4,))))
    assert fab_links(node) == []
    assert set(links(pod)) == {"lo", "eth0", "peer0"}


def test_failed_sysctl_rolls_back(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    a = Attachment("c-sys", "eth0", path, (V4, V6), sysctls={"net.ipv4.no_such_sysctl": "1"})
    with pytest.raises(DataplaneError, match="no_such_sysctl") as e:
        run(dp.attach(a))
    assert e.value.errno == 2
    assert fab_links(node) == []
    assert set(links(Path(path).name)) == {"lo"}


def test_netns_that_is_missing_or_not_a_netns(tmp_path: Path, node: str, dp: Dataplane) -> None:
    (plain := tmp_path / "netns").write_text("")
    for path in (str(plain), str(tmp_path / "missing"), "/proc/self/ns/uts", str(tmp_path)):
        with pytest.raises(NetnsNotFound):
            run(dp.attach(Attachment("c-nons", "eth0", path, (V4,))))
        with pytest.raises(NetnsNotFound):
            run(dp.check(Attachment("c-nons", "eth0", path, (V4,))))
        assert run(dp.detach("c-nons", "eth0", path)) is False
    with pytest.raises(InvalidAttachment, match="host's own"):
        run(dp.attach(Attachment("c-host", "eth0", f"/run/netns/{node}", (V4,))))
    assert fab_links(node) == []


def test_stale_host_end_is_replaced(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    first, second = spaces.pod(), spaces.pod()
    run(dp.attach(Attachment("c-again", "eth0", first, (V4,))))
    got = run(dp.attach(Attachment("c-again", "eth0", second, (V4,))))  # DEL never came
    assert fab_links(node) == [got.host_ifname]
    assert "eth0" not in links(Path(first).name)
    assert "eth0" in links(Path(second).name)


def test_concurrent_attaches(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    paths = [spaces.pod() for _ in range(8)]

    async def both() -> list[Attached]:
        return await asyncio.gather(*(
            dp.attach(Attachment(f"c{i}", "eth0", p, (ip_interface(f"10.79.1.{i + 1}/32"),)))
            for i, p in enumerate(paths)
        ))  # fmt: skip

    got = run(both())
    assert sorted(fab_links(node)) == sorted(a.host_ifname for a in got)


# ---------------------------------------------------------------- many pods in a row


@pytest.mark.slow
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v4v6"])
def test_many_attach_then_detach(spaces: Namespaces, node: str, v6: bool) -> None:
    """FABRIC_DP_N (200) fresh pod namespaces attached and detached one after another by one
    Dataplane in a thread inside the node namespace (as fabricd runs): every one works and
    no host end is left. The times are printed (-s) for a look; speed is the cni
    benchmark's business (lab/bench/cni.py), never a test's.
    """
    n = int(os.environ.get("FABRIC_DP_N", "200"))
    taken = set(labns.listed())
    names = [x for x in dict.fromkeys(f"tdp{secrets.token_hex(2)}" for _ in range(4 * n))
             if x not in taken][:n]  # fmt: skip
    spaces.names += names
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {x}\n" for x in names),
                   text=True, check=True)  # fmt: skip

    def ips(i: int) -> tuple[IPInterface, ...]:
        v4 = ip_interface(f"10.79.{2 + i // 250}.{1 + i % 250}/32")
        return (v4, ip_interface(f"fd79::1:{i:x}/128")) if v6 else (v4,)

    async def measure() -> tuple[list[float], list[float]]:
        plane, add, delete = Dataplane(), [], []
        for i, name in enumerate(names):
            t = time.perf_counter()
            await plane.attach(Attachment(f"t{i}", "eth0", f"/run/netns/{name}", ips(i)))
            add.append(time.perf_counter() - t)
        for i, name in enumerate(names):
            t = time.perf_counter()
            assert await plane.detach(f"t{i}", "eth0", f"/run/netns/{name}")
            delete.append(time.perf_counter() - t)
        await plane.close()
        return add, delete

    add, delete = in_netns(node, lambda: run(measure()))
    for what, xs in (("attach", add), ("detach", delete)):
        ms = sorted(x * 1000 for x in xs)
        print(f"\n{what} {'v4+v6' if v6 else 'v4'} n={len(ms)} ms: min {ms[0]:.2f} "
              f"median {statistics.median(ms):.2f} p90 {ms[int(len(ms) * 0.9)]:.2f} "
              f"max {ms[-1]:.2f}")  # fmt: skip
    assert len(add) == len(delete) == n
    assert fab_links(node) == []


# ---------------------------------------------------------------- create, then configure


def test_create_then_configure_is_attach(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    veth = run(dp.create("c-split", "eth0", path, 1500, frozenset({4})))
    host = host_ifname("c-split", "eth0")
    assert fab_links(node) == [host] and "UP" in links(Path(path).name)["eth0"]["flags"]
    a = Attachment("c-split", "eth0", path, (V4,))
    got = run(dp.configure(veth, a))
    assert (got.host_ifname, got.pod_ifindex, veth.sock) == (host, veth.pod_index, None)
    assert run(dp.check(a)) == []
    with pytest.raises(DataplaneError):  # closed: configured once
        run(dp.configure(veth, a))
    assert run(dp.detach("c-split", "eth0", path)) is True


def test_discard_of_a_created_pair_leaves_nothing(
    spaces: Namespaces, node: str, dp: Dataplane
) -> None:
    path = spaces.pod()
    veth = run(dp.create("c-gone", "eth0", path, 1500, frozenset({4, 6})))
    run(dp.discard(veth))
    assert fab_links(node) == [] and set(links(Path(path).name)) == {"lo"}
    run(dp.discard(veth))  # idempotent
    again = run(dp.create("c-gone", "eth0", path, 1500, frozenset({4})))  # the claim is free
    run(dp.discard(again))
    assert fab_links(node) == []


def test_failed_configure_removes_the_pair(spaces: Namespaces, node: str, dp: Dataplane) -> None:
    path = spaces.pod()
    veth = run(dp.create("c-bad", "eth0", path, 1500, frozenset({4})))
    bad = Attachment("c-bad", "eth0", path, (V4,), sysctls={"net.ipv4.no_such_sysctl": "1"})
    with pytest.raises(DataplaneError, match="no_such_sysctl"):
        run(dp.configure(veth, bad))
    assert fab_links(node) == [] and set(links(Path(path).name)) == {"lo"}
    veth = run(dp.create("c-bad", "eth0", path, 1500, frozenset({4})))
    with pytest.raises(InvalidAttachment):  # not what the pair was made for
        run(dp.configure(veth, Attachment("c-bad", "eth0", path, (V4,), mtu=1400)))
    assert fab_links(node) == []


def test_configure_with_other_versions_than_created(
    spaces: Namespaces, node: str, dp: Dataplane
) -> None:
    """IPAM gave IPv4 and IPv6 where IPv4 was expected: a pair made for both replaces it."""
    path = spaces.pod()
    veth = run(dp.create("c-fam", "eth0", path, 1500, frozenset({4})))
    a = Attachment("c-fam", "eth0", path, (V4, V6))
    run(dp.configure(veth, a))
    assert run(dp.check(a)) == [] and fab_links(node) == [host_ifname("c-fam", "eth0")]
    assert run(dp.detach("c-fam", "eth0", path)) is True
