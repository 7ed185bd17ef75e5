"""NatTable against real nftables: a pod namespace behind a router (node) namespace.

    pod  p0 10.78.1.10/24  fd78::1:10/112      (natOutgoing pool 10.78.1.0/24, fd78::1:0/112)
         |
    node n0 10.78.1.1/24   fd78::1:1/112       forwarding on; fabric_nat lives here
         n1 10.78.100.1/24 fd78::100:1/112
         |
    out  o0 10.78.100.2/24 fd78::100:2/112     an address outside every pool
            10.78.2.5/32   fd78::2:5/128       an address in another pool (10.78.2.0/24)

UDP datagrams are sent from a socket in the pod namespace and received by sockets in the out
namespace; what the receiver sees as the source tells whether the node masqueraded.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network

import pytest

from fabric.dataplane.nat import NatTable, render
from fabric.dataplane.netlink import in_netns
from lab import netns as labns

N = ip_network
NAT_POOLS = [N("10.78.1.0/24"), N("fd78::1:0/112")]
ALL_POOLS = [N("10.78.1.0/24"), N("10.78.2.0/24"), N("fd78::1:0/112"), N("fd78::2:0/112")]


def test_render_is_one_transaction_with_sets_per_family() -> None:
    script = render(NAT_POOLS, [N("10.78.2.0/25"), N("10.78.2.128/25")])
    lines = script.splitlines()
    assert lines[:3] == [
        "add table inet fabric_nat",
        "delete table inet fabric_nat",
        "table inet fabric_nat {",
    ]
    # overlapping and adjacent pools collapse (nft refuses overlapping intervals); the
    # natOutgoing pools count as pools even when the caller forgot them
    assert "elements = { 10.78.1.0/24, 10.78.2.0/24 }" in script
    assert "elements = { fd78::1:0/112 }" in script
    assert "ip saddr @nat_v4 ip daddr != @pools_v4 counter masquerade" in script
    assert "ip6 saddr @nat_v6 ip6 daddr != @pools_v6 counter masquerade" in script
    empty = render([], [])
    assert "elements" not in empty and empty.count("set ") == 4
    with pytest.raises(ValueError):
        NatTable(table="bad name; flush ruleset")


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    names = {role: f"trt{secrets.token_hex(2)}" for role in ("pod", "node", "out")}
    pod, node, out = names["pod"], names["node"], names["out"]
    try:
        for ns in names.values():
            labns.add(ns)
            labns.batch(ns, ["link set lo up"])
        labns.batch(pod, [
            labns.veth_command(pod, "p0", node, "n0"),
            labns.veth_command(node, "n1", out, "o0"),
            "link set p0 up",
            "addr add 10.78.1.10/24 dev p0",
            "addr add fd78::1:10/112 dev p0 nodad",
            "route add default via 10.78.1.1",
            "route add default via fd78::1:1",
        ])  # fmt: skip
        labns.batch(node, [
            "link set n0 up",
            "link set n1 up",
            "addr add 10.78.1.1/24 dev n0",
            "addr add fd78::1:1/112 dev n0 nodad",
            "addr add 10.78.100.1/24 dev n1",
            "addr add fd78::100:1/112 dev n1 nodad",
            "route add 10.78.2.0/24 via 10.78.100.2",
            "route add fd78::2:0/112 via fd78::100:2",
        ])  # fmt: skip
        labns.batch(out, [
            "link set o0 up",
            "addr add 10.78.100.2/24 dev o0",
            "addr add fd78::100:2/112 dev o0 nodad",
            "addr add 10.78.2.5/32 dev o0",
            "addr add fd78::2:5/128 dev o0 nodad",
            "route add 10.78.1.0/24 via 10.78.100.1",
            "route add fd78::1:0/112 via fd78::100:1",
        ])  # fmt: skip
        labns.sysctls(node, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        yield names
    finally:
        for ns in names.values():
            labns.delete(ns)


def source_seen(pod: str, out: str, dst: str) -> str:
    """Send one datagram from the pod to ``dst``; the source address the receiver saw."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    rx = in_netns(out, lambda: socket.socket(family, socket.SOCK_DGRAM))
    tx = in_netns(pod, lambda: socket.socket(family, socket.SOCK_DGRAM))
    with rx, tx:
        rx.bind((dst, 0))
        rx.settimeout(5)
        port = rx.getsockname()[1]
        for _ in range(3):  # the first datagram may wait on neighbour discovery
            tx.sendto(b"hello", (dst, port))
            try:
                _, peer = rx.recvfrom(64)
                return str(peer[0])
            except TimeoutError:
                continue
    raise AssertionError(f"nothing from {pod} reached {dst}")


def nft(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.root
@pytest.mark.parametrize("backend", ["exec", "lib"])
def test_masquerade_outside_pools_only(lab: dict[str, str], backend: str) -> None:
    pod, node, out = lab["pod"], lab["node"], lab["out"]
    # without the table, the pod's address goes out as it is
    assert source_seen(pod, out, "10.78.100.2") == "10.78.1.10"
    nft(node, "add", "table", "inet", "someone_else")  # not ours: must survive everything

    nat = NatTable(netns=node, backend=backend)

    async def go() -> None:
        assert await nat.apply(NAT_POOLS, ALL_POOLS)
        assert source_seen(pod, out, "10.78.100.2") == "10.78.100.1"  # masqueraded
        assert source_seen(pod, out, "fd78::100:2") == "fd78::100:1"
        assert source_seen(pod, out, "10.78.2.5") == "10.78.1.10"  # pool to pool: kept
        assert source_seen(pod, out, "fd78::2:5") == "fd78::1:10"
        assert await nat.counters() == {"ip": 1, "ip6": 1}
        # unchanged: no write; counters survive (a rewrite would reset them)
        assert not await nat.apply(list(reversed(NAT_POOLS)), ALL_POOLS)
        assert await nat.counters() == {"ip": 1, "ip6": 1}
        # the pool stops being natOutgoing: rewritten, traffic keeps its source
        assert await nat.apply([N("fd78::1:0/112")], ALL_POOLS)
        assert source_seen(pod, out, "10.78.100.2") == "10.78.1.10"
        assert source_seen(pod, out, "fd78::100:2") == "fd78::100:1"
        # repaired when someone deletes or edits the table behind our back
        nft(node, "delete", "table", "inet", "fabric_nat")
        assert await nat.apply([N("fd78::1:0/112")], ALL_POOLS)
        nft(node, "flush", "chain", "inet", "fabric_nat", "postrouting")
        assert await nat.apply([N("fd78::1:0/112")], ALL_POOLS)
        assert source_seen(pod, out, "fd78::100:2") == "fd78::100:1"
        assert await nat.remove()
        assert not await nat.remove()
        assert source_seen(pod, out, "fd78::100:2") == "fd78::1:10"

    try:
        asyncio.run(go())
    finally:
        nat.close()
    tables = nft(node, "list", "tables").split()
    assert "someone_else" in tables and "fabric_nat" not in tables


@pytest.mark.root
@pytest.mark.parametrize("backend", ["exec", "lib"])
def test_nft_errors_are_reported(lab: dict[str, str], backend: str) -> None:
    from fabric.dataplane.nat import NatError

    nat = NatTable(netns=lab["node"] + "-missing", backend=backend)

    async def go() -> None:
        with pytest.raises(NatError, match=r"failed to apply nft table fabric_nat: .*netns"):
            await nat.apply(NAT_POOLS, ALL_POOLS)

    try:
        asyncio.run(go())
    finally:
        nat.close()
