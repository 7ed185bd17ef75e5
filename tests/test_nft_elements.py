"""Set and map elements as raw nfnetlink batches (fabric.dataplane.netlink.nft_elements),
against the kernel in a scratch network namespace: what they write lists exactly as the same
elements written by ``nft -f``, deletes take them out, a refused batch applies nothing, and
the policy table writes its element-only changes this way (the rest with nft)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest
from scratch_netns import scratch_netns

from fabric.dataplane.netlink.core import NetlinkError
from fabric.dataplane.netlink.nft_elements import (
    ElementOp,
    ElementSocket,
    element_ops,
    encodable,
    encode_batch,
)
from fabric.dataplane.nft import Nft, NftError, SetDef, parse_listing
from fabric.dataplane.policy_table import PolicyTable, diff, held_from, render
from fabric.policy.model import Compiled, DirectionRules, EndpointRules, SetSpec

SHAPES = """
add set inet {t} s4 {{ type ipv4_addr; }}
add set inet {t} s6 {{ type ipv6_addr; }}
add set inet {t} pods {{ type ifname; }}
add set inet {t} hairpin {{ type ifname . ifname; }}
add set inet {t} ap4 {{ type ipv4_addr . inet_proto . inet_service; }}
add set inet {t} ap6 {{ type ipv6_addr . inet_proto . inet_service; }}
add chain inet {t} in_x
add map inet {t} to_pod {{ type ifname : verdict; }}
"""
ELEMENTS = {
    "s4": (("ipv4_addr",), ("10.0.0.1", "10.0.0.2", "255.255.255.255")),
    "s6": (("ipv6_addr",), ("fd00::1", "2001:db8::ff:1")),
    "pods": (("ifname",), ('"fab0123456789ab"', '"x"')),
    "hairpin": (("ifname", "ifname"), ('"fab1" . "fab1"', '"a" . "fab0123456789ab"')),
    "ap4": (("ipv4_addr", "inet_proto", "inet_service"),
            ("10.0.0.1 . tcp . 80", "10.0.0.2 . sctp . 65535", "10.0.0.3 . udp . 53")),
    "ap6": (("ipv6_addr", "inet_proto", "inet_service"), ("fd00::1 . udp . 5353",)),
    "to_pod": (("ifname",), ('"fab1" : jump in_x', '"fab2" : accept', '"fab3" : continue',
                            '"fab4" : drop', '"fab5" : goto in_x', '"fab6" : return')),
}  # fmt: skip


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("tne") as name:
        yield name


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, text=True,
                          capture_output=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def table_text(ns: str, table: str) -> str:
    return nft(ns, "list", "table", "inet", table).replace(f"table inet {table} ", "table X ")


def test_encoding_is_nfts() -> None:
    """The bytes of ``nft --debug=mnl add element inet t s4 { 10.0.0.1 }`` (nft 1.0.6),
    without the set id attribute nft adds for sets it creates in the same batch."""
    data = encode_batch("t", [ElementOp(True, "s4", ("ipv4_addr",), ("10.0.0.1",))], 7)
    begin, msg, end = data[:20], data[20:-20], data[-20:]
    assert begin == bytes.fromhex("14000000100001000700000000000000" + "0000000a")
    assert end == bytes.fromhex("14000000110001000900000000000000" + "0000000a")
    assert msg[4:8] == bytes.fromhex("0c0a0504")  # NFT_MSG_NEWSETELEM; request, ack, create
    assert msg[16:] == bytes.fromhex(
        "01000000" "0600010074000000" "0700020073340000"  # inet; table "t", set "s4"
        "14000380" "10000180" "0c000180" "080001000a000001"  # elements > elem > key > value
    )  # fmt: skip
    assert encodable(("ifname", "ifname"), (), None) and encodable(("ifname",), (), "verdict")
    assert not encodable(("ipv4_addr",), ("interval",), None)
    assert not encodable(("ipv4_addr",), (), "ipv4_addr")
    assert not encodable(("mark",), (), None)
    for bad, types in (("10.0.0", ("ipv4_addr",)), ("fab1", ("ifname",)),
                       ('"fab0123456789abc"', ("ifname",)), ("1.2.3.4 . tcp", ELEMENTS["ap4"][0]),
                       ("1.2.3.4 . tcp . 70000", ELEMENTS["ap4"][0])):  # fmt: skip
        with pytest.raises(ValueError):
            encode_batch("t", [ElementOp(True, "s", types, (bad,))], 1)
    with pytest.raises(ValueError, match="verdict"):
        encode_batch("t", [ElementOp(True, "m", ("ifname",), ('"a" : jump',), True)], 1)


@pytest.mark.root
def test_elements_list_as_nfts_deletes_and_refusals(ns: str) -> None:
    nft(ns, "-f", "-", stdin="add table inet raw\nadd table inet ref\n"
        + SHAPES.format(t="raw") + SHAPES.format(t="ref"))  # fmt: skip
    sock = ElementSocket(ns)
    try:
        ops = [ElementOp(True, n, t, e, n == "to_pod") for n, (t, e) in ELEMENTS.items()]
        assert sock.write("raw", ops) > 0
        nft(ns, "-f", "-", stdin="".join(f"add element inet ref {n} {{ {', '.join(e)} }}\n"
                                         for n, (_, e) in ELEMENTS.items()))  # fmt: skip
        assert table_text(ns, "raw") == table_text(ns, "ref")
        listed = parse_listing(json.loads(nft(ns, "-j", "list", "table", "inet",
                                                            "raw")))  # fmt: skip
        assert {n: s.elements for n, s in listed.sets.items()} == \
            {n: frozenset(e) for n, (_, e) in ELEMENTS.items()}  # fmt: skip
        # deletes (a map element by its key and verdict), then one batch that is refused
        # at its second message: the first one's element is not there either
        sock.write("raw", [ElementOp(False, "s4", ("ipv4_addr",), ("10.0.0.1",)),
                           ElementOp(False, "to_pod", ("ifname",), ('"fab1" : jump in_x',),
                                     True)])  # fmt: skip
        nft(
            ns, 'delete element inet ref s4 { 10.0.0.1 }; delete element inet ref to_pod { "fab1" }'
        )
        assert table_text(ns, "raw") == table_text(ns, "ref")
        before = table_text(ns, "raw")
        for bad in (ElementOp(True, "nosuch", ("ipv4_addr",), ("10.0.0.1",)),
                    ElementOp(True, "to_pod", ("ifname",), ('"fab9" : jump nochain',), True),
                    ElementOp(False, "s6", ("ipv6_addr",), ("fd00::99",))):  # fmt: skip
            with pytest.raises(NetlinkError, match=bad.name) as e:
                sock.write("raw", [ElementOp(True, "s4", ("ipv4_addr",), ("10.0.0.9",)), bad])
            assert e.value.errno
            assert table_text(ns, "raw") == before
        with pytest.raises(NetlinkError, match="No such file"):
            sock.write("nosuchtable", [ElementOp(True, "s4", ("ipv4_addr",), ("10.0.0.9",))])
        # many elements: several messages per set, one transaction
        many = tuple(f"10.1.{i // 256}.{i % 256}" for i in range(1500))
        sock.write("raw", [ElementOp(True, "s4", ("ipv4_addr",), many)])
        assert (
            len(
                parse_listing(json.loads(nft(ns, "-j", "list", "set", "inet", "raw", "s4")))
                .sets["s4"]
                .elements
            )
            == 1502
        )
    finally:
        sock.close()


def test_element_ops_only_for_element_changes_it_can_encode() -> None:
    a = SetDef("s4", ("ipv4_addr",), elements=frozenset({"10.0.0.1"}))
    b = SetDef("s4", ("ipv4_addr",), elements=frozenset({"10.0.0.2", "10.0.0.3"}))
    m1 = SetDef("to_pod", ("ifname",), map_to="verdict", elements=frozenset({'"f" : accept'}))
    m2 = SetDef("to_pod", ("ifname",), map_to="verdict", elements=frozenset({'"f" : jump c'}))
    ops = element_ops({"to_pod": m1, "s4": a}, {"to_pod": m2, "s4": b})
    assert ops == [ElementOp(False, "s4", ("ipv4_addr",), ("10.0.0.1",)),
                   ElementOp(True, "s4", ("ipv4_addr",), ("10.0.0.2", "10.0.0.3")),
                   ElementOp(False, "to_pod", ("ifname",), ('"f" : accept',), True),
                   ElementOp(True, "to_pod", ("ifname",), ('"f" : jump c',), True)]  # fmt: skip
    n1 = SetDef("n4", ("ipv4_addr",), ("interval",), elements=frozenset({"10.0.0.0/8"}))
    n2 = SetDef("n4", ("ipv4_addr",), ("interval",), elements=frozenset({"10.0.0.0/9"}))
    assert element_ops({"n4": n1}, {"n4": n2}) is None  # interval: nft's job
    assert element_ops({"n4": n1, "s4": a}, {"n4": n1, "s4": a}) == []


@pytest.mark.root
def test_policy_table_writes_pod_changes_as_netlink_batches(ns: str) -> None:
    """A pod ADD, a label change and a DEL through ``PolicyTable(netlink=True)`` leave the
    kernel's table exactly as the nft-written one (``netlink=False``) in the same netns;
    only the element-only changes go by netlink, a new chain by nft."""
    deny = DirectionRules(("x/deny",), ())
    sets = {"sel-a4": SetSpec("sel-a4", "addr4", frozenset({IPv4Address("10.80.0.1")})),
            "sel-a6": SetSpec("sel-a6", "addr6", frozenset({IPv6Address("fd80::1")}))}  # fmt: skip

    def model(pods: dict[str, tuple[str, ...]], extra: tuple[str, ...] = ()) -> Compiled:
        eps = {f"x/{p}": EndpointRules(f"x/{p}", f"fab0{p}", (), deny if p != "o" else None,
                                       deny if p == "e" else None)
               for p in pods}  # fmt: skip
        s4 = frozenset({IPv4Address("10.80.0.1"), *map(IPv4Address, extra)})
        return Compiled(eps, {**sets, "sel-a4": SetSpec("sel-a4", "addr4", s4)})

    steps = [
        model({"a": ()}),
        model({"a": (), "b": ()}),  # 1: ADD: elements only
        model({"a": (), "b": ()}, ("10.80.0.7",)),  # 2: label change: one set element
        model({"a": (), "b": (), "e": ()}),  # 3: ADD with a new (egress) chain: nft
        model({"a": (), "e": ()}),  # 4: DEL: elements
        model({"a": (), "o": ()}),  # 5: DEL of the last "e" and ADD: out_ stays, idle
        model({"a": (), "o": (), "e": ()}),  # 6: ADD like "e" again: elements only
    ]

    async def go() -> None:
        nl = Nft(ns, backend="exec")
        raw = PolicyTable(nl, "fraw", netlink=True)
        ref = PolicyTable(nl, "fref", netlink=False)
        for i, c in enumerate(steps):
            want = render(c)
            (await raw.sync(want)) if i == 0 else (await raw.apply(want))
            (await ref.sync(want)) if i == 0 else (await ref.apply(want))
            assert table_text(ns, "fraw") == table_text(ns, "fref"), f"step {i}"
        assert raw.netlink_writes == 5 and ref.netlink_writes == 0  # all but step 3
        assert ref.last.chains_written == 0 and ref.last.elements_only  # 6: the idle chain
        # a resync keeps the idle chain (what was last written, and the kernel holds it)
        assert (await raw.sync(render(steps[-2]))).empty is False  # "e" goes: elements
        assert (await raw.sync(render(steps[-2]))).empty
        assert any(n.startswith("out_") for n in parse_listing(json.loads(
            nft(ns, "-j", "list", "table", "inet", "fraw"))).chains)  # fmt: skip
        # a refused element batch fails the call as nft's would, and the next call resyncs
        nft(ns, "delete", "table", "inet", "fraw")  # behind its back
        with pytest.raises(NftError, match="failed to program nft table fraw"):
            await raw.apply(render(model({"a": (), "o": (), "b": ()})))
        assert not raw.programmed
        want = render(model({"a": (), "o": (), "b": ()}))
        await raw.apply(want)  # the table rebuilt (no idle chain: the kernel lost it)
        kernel = parse_listing(json.loads(nft(ns, "-j", "list", "table", "inet", "fraw")))
        assert diff(held_from(kernel, {}), want, "fraw").empty

    asyncio.run(go())


@pytest.mark.root
def test_idle_chains_keep_their_sets_up_to_the_bound(ns: str) -> None:
    """An idle chain keeps the sets it names when the model no longer has them (as they
    were last written); beyond IDLE_CHAINS idle chains, the least recently used go."""
    from fabric.dataplane import policy_table
    from fabric.policy.model import Direction, PortMatch, Protocol, Rule

    peers = SetSpec("sel-p4", "addr4", frozenset({IPv4Address("10.81.0.1")}))

    def with_rule(port: int) -> DirectionRules:
        return DirectionRules((f"x/p{port}",), (
            Rule(f"x/p{port}", 0, Direction.INGRESS, ("sel-p4",),
                 (PortMatch(Protocol.TCP, port),)),))  # fmt: skip

    def model(ports: list[int], sets: bool = True) -> Compiled:
        eps = {f"x/{p}": EndpointRules(f"x/{p}", f"fab{p}", (), with_rule(p), None)
               for p in ports}  # fmt: skip
        return Compiled(eps, {"sel-p4": peers} if sets else {})

    def chains() -> set[str]:
        got = parse_listing(json.loads(nft(ns, "-j", "list", "table", "inet", "fidle")))
        return {n for n in got.chains if n.startswith("in_")}

    async def go() -> None:
        table = PolicyTable(Nft(ns, backend="exec"), "fidle", netlink=True)
        await table.sync(render(model([80, 81])))
        await table.apply(render(model([80])))  # 81's chain idle, its set still wanted
        assert len(chains()) == 2
        await table.apply(render(model([], sets=False)))  # the set is kept for them
        assert len(chains()) == 2
        got = parse_listing(json.loads(nft(ns, "-j", "list", "table", "inet", "fidle")))
        assert got.sets["sel_p4"].elements == {"10.81.0.1"}
        # a restarted fabricd (a new table object) adopts them as they are: nothing written
        again = PolicyTable(Nft(ns, backend="exec"), "fidle", netlink=True)
        assert (await again.sync(render(model([], sets=False)))).empty
        assert len(chains()) == 2
        policy_table.IDLE_CHAINS, bound = 3, policy_table.IDLE_CHAINS
        try:
            for p in range(90, 96):  # one pod after the other, each with its own chain
                await table.apply(render(model([p])))
            assert len(chains()) == 1 + 3
        finally:
            policy_table.IDLE_CHAINS = bound

    asyncio.run(go())
