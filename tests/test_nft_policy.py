"""The policy table (fabric.dataplane.policy_table) and the nft door (fabric.dataplane.nft)
against the real kernel, in a network namespace the test creates:

    pod a  fab0a<hex> 10.79.0.10/24 fd79::10/64 --.
    pod b  fab0b<hex> 10.79.0.11/32 fd79::11/128  +-- node (forwarding; fabric_filter here)
    pod c  fab0c<hex> (a fabric veth with no map entry yet: "unknown")

Each pod is its own namespace with a veth to the node namespace; the node routes each
pod's /32 (/128) to its veth, the pods route everything via the node, as fabricd wires them.
Traffic is TCP connects between pods and from the node itself (a kubelet probe).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from fabric.dataplane.netlink import in_netns
from fabric.dataplane.nft import Nft, NftError, RuleDef, Transaction, parse_listing
from fabric.dataplane.policy_table import (
    BASE,
    FROM_POD,
    PODS,
    TO_POD,
    Desired,
    PolicyTable,
    counters,
    diff,
    held_from,
    render,
)
from fabric.policy.model import (
    Compiled,
    Direction,
    DirectionRules,
    EndpointRules,
    PortMatch,
    Protocol,
    Rule,
    SetSpec,
)
from lab import netns as labns

A4, B4 = IPv4Address("10.79.0.10"), IPv4Address("10.79.0.11")
A6, B6 = IPv6Address("fd79::10"), IPv6Address("fd79::11")
PEERS4 = SetSpec("sel-a4", "addr4", frozenset({A4}))  # compiler names hold '-'
PEERS6 = SetSpec("sel_a6", "addr6", frozenset({A6}))
NETS = SetSpec(
    "blk_4", "net4", frozenset({ip_network("10.79.0.0/29"), ip_network("10.79.0.11/32")})
)
NAMED = SetSpec("np_http_tcp4", "addrport4", frozenset({(B4, Protocol.TCP, 8080)}))
ALL_SETS = {s.name: s for s in (PEERS4, PEERS6, NETS, NAMED)}


def ingress(*rules: Rule) -> DirectionRules:
    return DirectionRules(tuple(sorted({r.policy for r in rules})) or ("x/deny",), rules)


def rule(index: int, peers: tuple[str, ...] | None, ports: tuple[PortMatch, ...] | None,
         policy: str = "x/allow", direction: Direction = Direction.INGRESS) -> Rule:  # fmt: skip
    return Rule(policy, index, direction, peers, ports)


def compiled(ifa: str, ifb: str, b_in: DirectionRules | None = None,
             a_out: DirectionRules | None = None, sets: dict[str, SetSpec] | None = None,
             ) -> Compiled:  # fmt: skip
    return Compiled(
        {
            "x/a": EndpointRules("x/a", ifa, (A4, A6), None, a_out),
            "x/b": EndpointRules("x/b", ifb, (B4, B6), b_in, None),
        },
        ALL_SETS if sets is None else sets,
    )


# ---------------------------------------------------------------------- pure


def test_render_dispatch_chains_and_ports() -> None:
    b_in = ingress(
        rule(
            0,
            ("sel-a4", "sel_a6"),
            (
                PortMatch(Protocol.TCP, 80),
                PortMatch(Protocol.TCP, 81),
                PortMatch(Protocol.TCP, 85, 90),
                PortMatch(Protocol.UDP),
            ),
        )
    )
    d = render(compiled("fab0a", "fab0b", b_in))
    to_pod = d.sets[TO_POD].elements
    (jump,) = [e for e in to_pod if e.startswith('"fab0b"')]
    chain = d.chains[jump.split()[-1]]
    assert '"fab0a" : accept' in to_pod
    assert d.sets[FROM_POD].elements == {'"fab0a" : continue', '"fab0b" : continue'}
    assert d.sets[PODS].elements == {'"fab0a"', '"fab0b"'}
    texts = [r.text for r in chain.rules]
    # adjacent ports merge into one range; peer sets of each family x protocols
    assert texts == [
        "ct state invalid counter drop",
        "ip saddr @sel_a4 meta l4proto tcp th dport 80-81, 85-90 counter accept".replace(
            "80-81, 85-90", "{ 80-81, 85-90 }"),
        "ip saddr @sel_a4 meta l4proto udp counter accept",
        "ip6 saddr @sel_a6 meta l4proto tcp th dport { 80-81, 85-90 } counter accept",
        "ip6 saddr @sel_a6 meta l4proto udp counter accept",
        "counter goto deny_in",
    ]  # fmt: skip
    assert chain.rules[1].comment.startswith("x/allow ingress[0] #")
    # the same rules on another endpoint share the chain: a pod ADD adds elements only
    two = Compiled({**compiled("fab0a", "fab0b", b_in).endpoints,
                    "x/c": EndpointRules("x/c", "fab0c", (), b_in, None)}, ALL_SETS)  # fmt: skip
    assert render(two).chains.keys() == d.chains.keys()
    change = diff(held_of(d), render(two))
    assert change.chains_written == 0 and change.elements_added == 4  # pods, hairpin, 2 maps


def held_of(d: Desired):  # type: ignore[no-untyped-def]
    from fabric.dataplane.policy_table import Held

    return Held.of(d)


def test_render_egress_named_ports_and_refusals() -> None:
    a_out = DirectionRules(("x/out",), (
        Rule("x/out", 0, Direction.EGRESS, None, (), ("np_http_tcp4",)),
        Rule("x/out", 1, Direction.EGRESS, ("blk_4",), None),
        Rule("x/out", 2, Direction.EGRESS, None, ()),  # matches nothing: skipped
    ))  # fmt: skip
    d = render(compiled("fab0a", "fab0b", None, a_out))
    (jump,) = [e for e in d.sets[FROM_POD].elements if e.startswith('"fab0a"')]
    texts = [r.text for r in d.chains[jump.split()[-1]].rules]
    assert texts[1:] == [
        "ip daddr . meta l4proto . th dport @np_http_tcp4 counter return",
        "ip daddr @blk_4 counter return",
        "counter goto deny_out",
    ]
    assert d.sets["blk_4"].elements == {"10.79.0.0/29", "10.79.0.11"}
    assert d.sets["np_http_tcp4"].elements == {"10.79.0.11 . tcp . 8080"}
    bad = Rule("x/out", 0, Direction.EGRESS, ("missing",), None)
    with pytest.raises(ValueError, match="missing"):
        render(compiled("fab0a", "fab0b", None, DirectionRules(("x/out",), (bad,))))
    with pytest.raises(ValueError, match="collides"):
        render(compiled("fab0a", "fab0b", sets={"pods": SetSpec("pods", "addr4", frozenset())}))
    with pytest.raises(ValueError, match="nft string"):
        render(compiled('fab"0a', "fab0b"))
    with pytest.raises(ValueError):
        Transaction("bad name; flush ruleset")


# ---------------------------------------------------------------------- the kernel


class Pods:
    def __init__(
        self, node: str, pods: dict[str, str], ifnames: dict[str, str], backend: str
    ) -> None:
        self.node, self.pods, self.ifnames = node, pods, ifnames
        self.nft = Nft(node, backend=backend)
        assert self.nft.backend == backend


BACKENDS = ["exec", "lib"]  # fabric.dataplane.nft: the nft program, libnftables in process


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest) -> Iterator[Pods]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    tag = secrets.token_hex(2)
    node = f"tnp{tag}n"
    pods = {p: f"tnp{tag}{p}" for p in "abc"}
    ifnames = {p: f"fab0{p}{tag}" for p in "abc"}
    addrs = {"a": ("10.79.0.10", "fd79::10"), "b": ("10.79.0.11", "fd79::11"),
             "c": ("10.79.0.12", "fd79::12")}  # fmt: skip
    try:
        for ns in (node, *pods.values()):
            labns.add(ns)
            labns.batch(ns, ["link set lo up"])
        labns.sysctls(node, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        for p, ns in pods.items():
            v4, v6 = addrs[p]
            host = ifnames[p]
            labns.batch(node, [labns.veth_command(node, host, ns, "eth0"), f"link set {host} up",
                               f"route add {v4}/32 dev {host}",
                               f"route add {v6}/128 dev {host}"])  # fmt: skip
            labns.sysctls(node, {f"net.ipv4.conf.{host}.proxy_arp": "1",
                                 f"net.ipv6.conf.{host}.proxy_ndp": "1"})  # fmt: skip
            labns.batch(ns, ["link set eth0 up", f"addr add {v4}/32 dev eth0",
                             f"addr add {v6}/128 dev eth0 nodad",
                             "route add 169.254.1.1 dev eth0", "route add default via 169.254.1.1",
                             "route add fe80::1 dev eth0"])  # fmt: skip
        labns.batch(node, ["addr add 169.254.1.1/32 dev lo"])
        for p, ns in pods.items():  # pods reach each other through the node's gateway
            labns.batch(node, [f"addr add fe80::1/64 dev {ifnames[p]} nodad"])
            labns.batch(ns, ["route add default via fe80::1 dev eth0"])
        pods_lab = Pods(node, pods, ifnames, request.param)
        try:
            yield pods_lab
        finally:
            pods_lab.nft.close()
    finally:
        for ns in (*pods.values(), node):
            labns.delete(ns)


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, text=True,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def listing(ns: str) -> dict[str, object]:
    return json.loads(nft(ns, "-j", "list", "table", "inet", "fabric_filter"))  # type: ignore[no-any-return]


def connects(ns: str, dst: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect from ``ns`` (a pod, or the node) to ``dst``: True when it answered
    (accepted or refused: both mean the packet got through), False on a timeout."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = in_netns(ns, lambda: socket.socket(family, socket.SOCK_STREAM))
    with s:
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            return True
        except ConnectionRefusedError:
            return True
        except (TimeoutError, OSError):
            return False


def listen(ns: str, addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = in_netns(ns, lambda: socket.socket(family, socket.SOCK_STREAM))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


@pytest.mark.root
def test_enforcement_probes_and_fail_closed(lab: Pods) -> None:
    """deny-all on b: a cannot reach b (v4, v6), the node can (a probe), b's replies to
    its own connections come back; an allow rule opens exactly its port; a fabric veth
    without a map entry passes nothing."""
    ifa, ifb = lab.ifnames["a"], lab.ifnames["b"]
    a, b, c = (lab.pods[p] for p in "abc")
    servers = [listen(b, addr, port) for addr in ("10.79.0.11", "fd79::11") for port in (80, 81)]
    servers += [listen(a, addr, 80) for addr in ("10.79.0.10", "fd79::10")]
    table = PolicyTable(lab.nft)

    async def go() -> None:
        deny = DirectionRules(("x/deny",), ())
        open_ = Compiled({
            "x/a": EndpointRules("x/a", ifa, (A4, A6), None, None),
            "x/b": EndpointRules("x/b", ifb, (B4, B6), None, None)}, ALL_SETS)  # fmt: skip
        await table.sync(render(open_))
        assert connects(a, "10.79.0.11", 80) and connects(a, "fd79::11", 80)
        assert not connects(c, "10.79.0.11", 80), "an unknown fabric veth passed traffic"
        assert not connects(a, "10.79.0.12", 80), "traffic reached an unknown fabric veth"
        await table.apply(render(compiled(ifa, ifb, deny)))
        for dst in ("10.79.0.11", "fd79::11"):
            assert not connects(a, dst, 80)
            assert connects(lab.node, dst, 80), "the node's probe must pass a deny-all"
        assert connects(b, "10.79.0.10", 80) and connects(b, "fd79::10", 80)  # replies
        allow = ingress(rule(0, ("sel-a4", "sel_a6"), (PortMatch(Protocol.TCP, 81),)))
        await table.apply(render(compiled(ifa, ifb, allow)))
        for dst in ("10.79.0.11", "fd79::11"):
            assert connects(a, dst, 81) and not connects(a, dst, 80)
        got = {c.label: c.packets for c in await table.counters()}
        assert got["x/allow ingress[0]"] >= 2 and got["default-deny ingress"] >= 2
        (ours,) = [c for c in await table.counters() if c.policy == "x/allow"]
        assert (ours.direction, ours.index) == (Direction.INGRESS, 0)

    try:
        asyncio.run(go())
    finally:
        for s in servers:
            s.close()


@pytest.mark.root
def test_readback_incremental_and_atomic(lab: Pods) -> None:
    ifa, ifb = lab.ifnames["a"], lab.ifnames["b"]
    table = PolicyTable(lab.nft)
    allow = ingress(rule(0, ("sel-a4",), (PortMatch(Protocol.TCP, 80),)))

    async def go() -> None:
        first = await table.sync(render(compiled(ifa, ifb, allow)))
        assert first.full
        want = render(compiled(ifa, ifb, allow))
        kernel = parse_listing(listing(lab.node))
        assert {n: s.elements for n, s in kernel.sets.items()} == \
            {n: s.elements for n, s in want.sets.items()}  # fmt: skip
        assert diff(held_from(kernel, {}), want).empty
        # a label change moves a pod into a selector: one element, nothing else
        more = SetSpec("sel-a4", "addr4", frozenset({A4, IPv4Address("10.79.0.12")}))
        change = await table.apply(
            render(compiled(ifa, ifb, allow, sets={**ALL_SETS, "sel-a4": more}))
        )
        assert change.script == "add element inet fabric_filter sel_a4 { 10.79.0.12 }\n"
        # a refused transaction applies nothing: the table is as before
        before = nft(lab.node, "-s", "list", "table", "inet", "fabric_filter")
        bad = Transaction("fabric_filter")
        bad.add_elements("sel_a4", ["10.79.0.99"])
        bad.add_rules(BASE, [RuleDef("jump no_such_chain")])
        with pytest.raises(NftError, match="failed to apply nft table fabric_filter") as e:
            await lab.nft.apply(bad)
        assert e.value.stderr
        assert nft(lab.node, "-s", "list", "table", "inet", "fabric_filter") == before
        # an ADD of a pod with deny-all ingress: map and set elements, one shared chain
        c = replace(compiled(ifa, ifb, allow, sets={**ALL_SETS, "sel-a4": more}))
        c = Compiled({**c.endpoints, "x/c": EndpointRules("x/c", lab.ifnames["c"], (),
                      DirectionRules(("x/deny",), ()), None)}, c.sets)  # fmt: skip
        change = await table.apply(render(c))
        assert change.chains_written == 1 and change.elements_added == 4
        assert len(change.script.splitlines()) == 7, change.script  # chain, 2 rules, 4 elements

    asyncio.run(go())


@pytest.mark.root
def test_resync_repairs_only_drift_and_leaves_other_tables(lab: Pods) -> None:
    ifa, ifb = lab.ifnames["a"], lab.ifnames["b"]
    others = """
table ip someone_nat {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 8080 counter dnat to 10.79.0.11:80
    }
}
table inet kube_proxy_like {
    set s {
        type ipv4_addr
        elements = { 1.2.3.4 }
    }
    chain filter_fwd {
        type filter hook forward priority -10; policy accept;
        ip daddr @s counter drop
    }
}
"""
    nft(lab.node, "-f", "-", stdin=others)
    theirs = nft(lab.node, "-s", "list", "ruleset")
    allow = ingress(rule(0, ("sel-a4",), (PortMatch(Protocol.TCP, 80),)))
    want = render(compiled(ifa, ifb, allow))
    table = PolicyTable(lab.nft)

    async def go() -> None:
        await table.sync(want)
        assert (await table.sync(want)).empty  # nothing drifted: nothing written
        (chain,) = [n for n in want.chains if n.startswith("in_")]
        nft(lab.node, "-f", "-", stdin=(
            "delete element inet fabric_filter sel_a4 { 10.79.0.10 }\n"
            f"add rule inet fabric_filter {chain} tcp dport 22 accept\n"
            "add element inet fabric_filter blk_4 { 10.79.1.0/24 }\n"
            "add chain inet fabric_filter intruder\n"))  # fmt: skip
        change = await table.sync(want)
        lines = change.script.splitlines()
        assert not change.full and lines == [
            "delete element inet fabric_filter blk_4 { 10.79.1.0/24 }",
            "add element inet fabric_filter sel_a4 { 10.79.0.10 }",
            f"flush chain inet fabric_filter {chain}",
            *[f"add rule inet fabric_filter {chain} {r.render()}" for r in want.chains[chain].rules],
            "flush chain inet fabric_filter intruder",
            "delete chain inet fabric_filter intruder",
        ]  # fmt: skip
        assert diff(held_from(parse_listing(listing(lab.node)), {}), want).empty
        # a rule edited in place (same comment, other statements) is caught too
        handle = next(r.handle for r in parse_listing(listing(lab.node)).chains[chain].rules
                      if r.label == "x/allow ingress[0]")  # fmt: skip
        comment = next(r.comment for r in parse_listing(listing(lab.node)).chains[chain].rules
                       if r.label == "x/allow ingress[0]")  # fmt: skip
        nft(lab.node, "replace", "rule", "inet", "fabric_filter", chain, "handle", str(handle),
            "tcp", "dport", "1-65535", "accept", "comment", f'"{comment}"')  # fmt: skip
        change = await table.sync(want)
        assert change.chains_written == 1 and change.elements_added == 0
        # the table deleted behind our back: the next apply fails, the one after rebuilds
        nft(lab.node, "delete", "table", "inet", "fabric_filter")
        with pytest.raises(NftError):
            await table.apply(render(compiled(ifa, ifb, None)))
        assert not table.programmed
        assert (await table.apply(render(compiled(ifa, ifb, None)))).full
        assert await table.remove() and not await table.remove()

    asyncio.run(go())
    assert nft(lab.node, "-s", "list", "ruleset") == theirs


def test_counters_parse_labels() -> None:
    doc = {"nftables": [
        {"table": {"family": "inet", "name": "fabric_filter"}},
        {"chain": {"family": "inet", "table": "fabric_filter", "name": "in_1"}},
        {"chain": {"family": "inet", "table": "fabric_filter", "name": "in_2"}},
        *[{"rule": {"chain": ch, "handle": i, "comment": f"{label} #{'a' * 12}",
                    "expr": [{"counter": {"packets": p, "bytes": p * 100}}, {"accept": None}]}}
          for i, (ch, label, p) in enumerate([
              ("in_1", "y/web ingress[2]", 3), ("in_2", "y/web ingress[2]", 4),
              ("in_2", "default-deny ingress", 5)])],
    ]}  # fmt: skip
    got = {c.label: c for c in counters(parse_listing(doc))}
    web = got["y/web ingress[2]"]
    assert (web.policy, web.direction, web.index, web.packets, web.bytes) == \
        ("y/web", Direction.INGRESS, 2, 7, 700)  # fmt: skip
    assert got["default-deny ingress"].policy is None
    assert ip_address("10.79.0.10") == A4


def test_render_aliases_dispatch_every_attachment_of_a_pod() -> None:
    deny = DirectionRules(("x/deny",), ())
    d = render(compiled("fab0a", "fab0b", deny), aliases={"x/b": ["fab1b"]})
    (chain,) = {e.split()[-1] for e in d.sets[TO_POD].elements if "jump" in e}
    assert {'"fab0b" : jump ' + chain, '"fab1b" : jump ' + chain} <= d.sets[TO_POD].elements
    assert '"fab1b"' in d.sets[PODS].elements
