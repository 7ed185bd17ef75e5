"""The denied-traffic log (fabric.dataplane.policy_log, fabric.dataplane.nflog,
fabric.agent.denied, fabric.policy.denied) and the per-policy counters, against the real
kernel in the namespaces of tests/test_nft_policy.py's ``lab`` fixture (pods a, b, c behind
a forwarding node that holds table inet fabric_filter).

The SYN floods are raw TCP SYNs with valid checksums from pod a to pod b (each a new
conntrack flow, distinct source ports), so they reach b's default deny as a scan would.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
import time
from ipaddress import IPv4Address

import pytest
from test_nft_policy import (  # type: ignore[import-not-found]
    A4,
    A6,
    B4,
    B6,
    Pods,
    compiled,
    connects,
    lab,
    listen,
    listing,
    nft,
)

from fabric.agent.denied import DeniedCollector
from fabric.agent.metrics import PolicyPackets
from fabric.agent.policy_metrics import listing_rows, policy_samples, text_rows
from fabric.dataplane.netlink import in_netns
from fabric.dataplane.nflog import LoggedPacket, NflogSocket, decode
from fabric.dataplane.nft import parse_listing
from fabric.dataplane.policy_log import DeniedLog
from fabric.dataplane.policy_table import PolicyTable, render
from fabric.policy.denied import Denial, document, parse
from fabric.policy.model import DirectionRules

__all__ = ["lab"]  # the fixture, imported
DENY = DirectionRules(("x/deny",), ())


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn(src: IPv4Address, dst: IPv4Address, sport: int, dport: int) -> bytes:
    """A TCP SYN header with a valid checksum (conntrack drops bad ones as invalid)."""
    head = struct.pack("!HHIIBBHHH", sport, dport, sport * 7919, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(head))
    return head[:16] + struct.pack("!H", _checksum(pseudo + head)) + head[18:]


def syn_flood(ns: str, src: IPv4Address, dst: IPv4Address, dport: int, n: int) -> float:
    """``n`` SYNs from distinct source ports; the seconds it took."""
    raw = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
    started = time.monotonic()
    with raw:
        for i in range(n):
            raw.sendto(syn(src, dst, 20000 + i % 40000, dport), (str(dst), 0))
    return time.monotonic() - started


def drain(sock: NflogSocket, settle: float = 0.5) -> list[LoggedPacket]:
    """Everything logged until nothing came for ``settle`` seconds."""
    out: list[LoggedPacket] = []
    quiet = time.monotonic() + settle
    while time.monotonic() < quiet:
        got = sock.read()
        if got:
            out += got
            quiet = time.monotonic() + settle
        time.sleep(0.02)
    return out


def deny_counter(ns: str, label: str) -> int:
    kernel = parse_listing(listing(ns))
    return sum(r.packets for c in kernel.chains.values() for r in c.rules if r.label == label)


def group() -> int:
    return 30000 + secrets.randbelow(30000)  # our own: other labs bind theirs elsewhere


@pytest.mark.root
def test_denied_probe_is_logged_named_and_counted(lab: Pods) -> None:
    """deny-all on b: a's connect to b:80 (v4 and v6) is logged once per new connection
    with b's veth as out interface; the collector names it as the compiled model does;
    the metric's deny count for x/deny is what nft counted; egress denials log iifname."""
    g = group()
    sock = NflogSocket(g, lab.node)
    ifa, ifb = lab.ifnames["a"], lab.ifnames["b"]
    table = PolicyTable(lab.nft)
    model = compiled(ifa, ifb, DENY)
    collector = DeniedCollector("n1", g, lambda: model,
                                lambda: {A4: "x/a", A6: "x/a", B4: "x/b", B6: "x/b"},
                                lambda k, b: None, netns=lab.node)  # fmt: skip
    try:
        asyncio.run(table.sync(render(model, log=DeniedLog(g))))
        assert not connects(lab.pods["a"], "10.79.0.11", 80, timeout=0.3)
        assert not connects(lab.pods["a"], "fd79::11", 81, timeout=0.3)
        got = drain(sock)
        assert {(p.src, p.dst, p.proto, p.dport) for p in got} == {(A4, B4, 6, 80), (A6, B6, 6, 81)}
        assert {p.prefix for p in got} == {"fabric-deny ingress"}
        assert len(got) == 2, "one log line per new connection (SYN retries are not new)"
        lines = [collector.add(p) for p in got]
        assert [d.line() for d in lines if d] == [
            "x/a -> x/b 80/TCP denied at ingress of x/b: selected by [deny], no rule allows it",
            "x/a -> x/b 81/TCP denied at ingress of x/b: selected by [deny], no rule allows it",
        ]
        counted = deny_counter(lab.node, "default-deny ingress")
        assert counted >= 2
        samples = policy_samples(listing_rows(parse_listing(listing(lab.node))), model)
        assert samples[("x", "deny", "ingress", "deny")] == counted
        text = nft(lab.node, "-t", "list", "table", "inet", "fabric_filter")
        rows = text_rows(text)  # the terse text fabricd reads: the JSON listing's counted rules
        assert rows and set(rows) <= set(listing_rows(parse_listing(listing(lab.node))))
        assert ("deny_in", "", 0) not in rows and any(
            c.startswith("default-deny") for _, c, _ in rows
        )
        assert policy_samples(text_rows(text), model) == samples
        metric = PolicyPackets()
        metric.set(samples)
        (fam,) = metric.collect()
        assert {s.name for s in fam.samples} == {"fabric_policy_packets_total"}
        # egress: a is isolated for egress with no rule; the log names a by its in interface
        out_model = compiled(ifa, ifb, None, DirectionRules(("x/quiet",), ()))
        asyncio.run(table.apply(render(out_model, log=DeniedLog(g))))
        assert not connects(lab.pods["a"], "10.79.0.11", 82, timeout=0.3)
        (p,) = drain(sock)
        assert p.prefix == "fabric-deny egress" and p.dport == 82
        collector.compiled = lambda: out_model
        d = collector.add(p)
        assert d is not None and d.line() == (
            "x/a -> x/b 82/TCP denied at egress of x/a: selected by [quiet], no rule allows it"
        )
    finally:
        sock.close()


@pytest.mark.root
@pytest.mark.parametrize("log", [DeniedLog(0, rate=5, burst=10, cap=50),
                                 DeniedLog(0, rate=10000, burst=10000, cap=20)],
                         ids=["per-endpoint", "node-cap"])  # fmt: skip
def test_scan_of_10000_syns_logs_a_bounded_sample(lab: Pods, log: DeniedLog) -> None:
    """10,000 denied SYNs to b: every one dropped and counted by nft, and the log holds at
    most burst + rate x elapsed lines (per endpoint), or cap + cap x elapsed (node-wide)."""
    g = group()
    log = DeniedLog(g, log.rate, log.burst, log.cap)
    sock = NflogSocket(g, lab.node)
    ifa, ifb = lab.ifnames["a"], lab.ifnames["b"]
    servers = [listen(lab.pods["b"], "10.79.0.11", 80)]  # would answer, if anything got through
    table = PolicyTable(lab.nft)
    want = render(compiled(ifa, ifb, DENY), log=log)
    try:
        asyncio.run(table.sync(want))
        before = deny_counter(lab.node, "default-deny ingress")
        started = time.monotonic()
        took = syn_flood(lab.pods["a"], A4, B4, 80, 10_000)
        lines = drain(sock)
        elapsed = time.monotonic() - started
        counted = deny_counter(lab.node, "default-deny ingress") - before
        assert counted == 10_000, "every SYN reached the default deny and was counted"
        rate, burst = min(log.rate, log.cap), min(log.burst, log.cap)
        bound = burst + rate * elapsed
        print(f"10,000 SYNs in {took:.2f} s: {len(lines)} log lines in {elapsed:.2f} s "
              f"(bound {bound:.0f}), {sock.lost} overruns")  # fmt: skip
        assert 1 <= len(lines) <= bound
        assert all(p.dst == B4 and p.dport == 80 for p in lines)
        # the kernel's rate state (an element per denied veth) is no drift for the resync
        assert parse_listing(listing(lab.node)).sets["deny_rl_in"].elements == {f'"{ifb}"'}
        assert asyncio.run(table.sync(want)).empty
    finally:
        sock.close()
        for s in servers:
            s.close()


@pytest.mark.root
def test_nflog_group_is_taken_once_per_namespace(lab: Pods) -> None:
    g = group()
    first = NflogSocket(g, lab.node)
    try:
        with pytest.raises(OSError, match=f"failed to bind nflog group {g}"):
            NflogSocket(g, lab.node)
    finally:
        first.close()


# ---------------------------------------------------------------------- pure


def test_decode_skips_what_is_not_a_packet() -> None:
    assert decode(b"") == []
    assert decode(b"\x10\x00\x00\x00\x02\x00\x00\x00" + b"\0" * 8) == []  # an NLMSG_ERROR


def test_document_round_trip_and_bound() -> None:
    ds = [Denial(i, 1000.0 + i, "n1", "ingress", "x/b", "x/a", "x/b", "10.0.0.1", "10.0.0.2",
                 "TCP", 81, ("x/deny-all",), "denied") for i in range(150)]  # fmt: skip
    doc = json.loads(json.dumps(document("n1", ds, lost=2, total=150)))
    back = parse(doc)
    assert len(back) == 100 and back[0].seq == 50 and back[-1] == ds[-1]
    assert doc["denials"][-1]["line"] == (
        "x/a -> x/b 81/TCP denied at ingress of x/b: selected by [deny-all], no rule allows it"
    )
    assert parse({"denials": [{"seq": "x"}]}) == []


# ---------------------------------------------------------------------- fabricctl, real etcd


def _denial(node: str, seq: int, port: int) -> Denial:
    return Denial(seq, 1_700_000_000.0 + seq, node, "ingress", "x/b", "x/a", "x/b", "10.0.0.1",
                  "10.0.0.2", "TCP", port, ("x/deny-all",), "denied")  # fmt: skip


def _put(endpoints: list[str], prefix: str, node: str, ds: list[Denial]) -> None:
    from fabric.policy.denied import key
    from ipam.store import Store

    async def go() -> None:
        store = Store(endpoints, prefix)
        try:
            await store.put(key(node), json.dumps(document(node, ds, 0, len(ds))).encode())
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.etcd
def test_fabricctl_policy_denied_reads_and_follows(etcd_endpoints: list[str], prefix: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from fabric.cli.main import main

    env = {"FABRIC_ETCD_ENDPOINTS": ",".join(etcd_endpoints), "FABRIC_PREFIX": prefix}
    runner = CliRunner()
    r = runner.invoke(main, ["policy", "denied"], env=env, catch_exceptions=False)
    assert r.exit_code == 0 and "No denied connections logged." in r.stdout
    _put(etcd_endpoints, prefix, "n1", [_denial("n1", 1, 81), _denial("n1", 2, 82)])
    _put(etcd_endpoints, prefix, "n2", [_denial("n2", 1, 83)])
    r = runner.invoke(main, ["policy", "denied"], env=env, catch_exceptions=False)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TIME", "NODE", "DENIED"] and len(lines) == 4
    assert " ".join(lines[1].split()[1:]) == (
        "n1 x/a -> x/b 81/TCP denied at ingress of x/b: selected by [deny-all], no rule allows it"
    )
    r = runner.invoke(main, ["policy", "denied", "--node", "n2", "-o", "json"], env=env,
                      catch_exceptions=False)  # fmt: skip
    doc = json.loads(r.stdout)
    assert [d["port"] for d in doc["denials"]] == [83] and doc["nodes"][0]["logged"] == 1
    r = runner.invoke(main, ["policy", "denied", "-o", "yaml"], env=env, catch_exceptions=False)
    assert "policies:\n    - x/deny-all" in r.stdout or "- x/deny-all" in r.stdout
    # --follow: what is there, then each new denial once
    fabricctl = Path(sys.executable).parent / "fabricctl"
    proc = subprocess.Popen([str(fabricctl), "policy", "denied", "--node", "n1", "--follow",
                             "-o", "json"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})  # fmt: skip
    try:
        assert proc.stdout is not None
        assert [json.loads(proc.stdout.readline())["port"] for _ in range(2)] == [81, 82]
        _put(etcd_endpoints, prefix, "n1", [_denial("n1", s, 80 + s) for s in (1, 2, 3)])
        assert json.loads(proc.stdout.readline())["port"] == 83
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_describe_names_what_the_model_says_now() -> None:
    """ICMP has no port: the selecting policies alone; a packet logged before a policy
    change that now allows it says so; an interface that is no endpoint any more too."""
    from fabric.policy.denied import describe
    from fabric.policy.model import Compiled, EndpointRules, PortMatch, Protocol, Rule
    from fabric.resources.policy_model import Direction

    names = {A4: "x/a", B4: "x/b"}
    deny = Compiled({"x/b": EndpointRules("x/b", "fabb", (B4,), DENY, None)}, {})
    kw = {"seq": 1, "time": 0.0, "node": "n1", "ingress": True, "saddr": A4, "daddr": B4}
    icmp = describe(deny, names, ifname="fabb", protocol="ICMP", port=None, **kw)  # type: ignore[arg-type]
    assert icmp.line() == (
        "x/a -> x/b ICMP denied at ingress of x/b: selected by [deny], no rule allows it"
    )
    allow = DirectionRules(("x/allow",), (
        Rule("x/allow", 0, Direction.INGRESS, None, (PortMatch(Protocol.TCP, 81),)),))  # fmt: skip
    now = Compiled({"x/b": EndpointRules("x/b", "fabb", (B4,), allow, None)}, {})
    d = describe(now, names, ifname="fabb", protocol="TCP", port=81, **kw)  # type: ignore[arg-type]
    assert d.policies == () and "(rules changed since)" in d.line()
    assert d.line().startswith("x/a -> x/b 81/TCP denied at ingress of x/b: now allowed")
    gone = describe(deny, names, ifname="fabzz", protocol="TCP", port=81, **kw)  # type: ignore[arg-type]
    assert gone.endpoint == "" and "an unknown interface" in gone.line()
    assert "fabzz is no endpoint" in gone.line()
