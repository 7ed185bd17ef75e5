"""End-to-end failure tests (issue 6), pods made through the installed CNI plugin, probes
pinging between them every 100 ms. Measured times are printed (``pytest -s``) and carried
in the assertion messages.

- two-rack: fabricd restarted (SIGTERM, SIGKILL) and ExaBGP killed lose no ping and keep the
  node's kernel routes; a node powered off (links down) or gone silent (uplink dropping
  everything, carrier up): both ToRs withdraw its blocks and the other nodes drop them
  within the hold time, the other pods keep talking, and it all comes back.
- dual-homed: every host peers with both ToRs and routes ECMP over them; a ToR powered off
  or its routing daemons stopped: traffic moves to the other ToR within the hold time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
from fabric_helpers import fabric_lab, status, watching

from lab import pods, procs, routers
from lab.pods import Flows, Pod
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]

HOLD = 9.0  # BGP hold time of every session in the lab (lab/render.py, fabric_resources)
MARGIN = 3.0
POOL = "10.244.0.0/16"
HOSTS = ("node1", "node2", "node3", "node4")
ACROSS = {"node1": "node3", "node2": "node4", "node3": "node1", "node4": "node2"}
TORS = ("tor1", "tor2")
# nftables table that makes a node's uplinks drop everything while the carrier stays up
SILENT = """table inet e2e_silent {{
  chain i {{ type filter hook input priority -300; policy accept; iifname {{ {ifs} }} drop; }}
  chain o {{ type filter hook output priority -300; policy accept; oifname {{ {ifs} }} drop; }}
}}
"""


def note(msg: str) -> str:
    print(f"\n[e2e] {msg}", flush=True)
    return msg


# ----------------------------------------------------------------------------- helpers


def tor_routes(lab: Lab, tor: str) -> dict[str, bool]:
    """Pool prefixes in a ToR's BGP table -> whether stale (FRR says; BIRD: False)."""
    d = lab.dir / tor
    if lab.node(tor).role == "frr":
        r = routers.vtysh(d, "show ip bgp json")
        table = json.loads(r.stdout)["routes"] if r.returncode == 0 else {}
        pool = ipaddress.ip_network(POOL)
        return {
            p: any(path.get("stale", False) for path in paths)
            for p, paths in table.items()
            if ipaddress.ip_network(p).subnet_of(pool)
        }
    r = routers.birdc(d, f"show route in {POOL}")
    return {ln.split()[0]: False for ln in r.stdout.splitlines() if ln[:1].isdigit()}


def hosts_up(lab: Lab, tor: str) -> bool:
    """Every host attached to ``tor`` has its session Established (seen from the ToR)."""
    want = sum(1 for h in lab.nodes("node") if any(nb.name == tor for nb in lab.node(h).neighbors))
    static = {nb.name for nb in lab.node(tor).neighbors}
    states = lab.bgp_sessions(tor)
    return sum(1 for k, v in states.items() if k not in static and v == "Established") == want


def tors_whole(lab: Lab, blocks: Iterable[str]) -> bool:
    """Every ToR has every host session up and every block in ``blocks`` (not stale)."""
    for tor in TORS:
        held = tor_routes(lab, tor)
        if not hosts_up(lab, tor) or any(held.get(b) is not False for b in blocks):
            return False
    return True


def gateways(lab: Lab, node: str, dst: str) -> set[str]:
    """Next hops of fabricd's kernel route to ``dst`` on ``node`` (ECMP: several)."""
    r = lab.exec(node, ["ip", "-4", "route", "show", dst, "proto", "201"], check=True)
    return set(re.findall(r"via (\S+)", r.stdout))


def block_of(lab: Lab, pod: Pod) -> str:
    ip = ipaddress.ip_address(pod.ip)
    for dst, how in lab.kernel_routes(pod.node).items():
        if how == "blackhole" and ip in ipaddress.ip_network(dst):
            return dst
    raise AssertionError(f"no block of {pod.ip} on {pod.node}")


def set_links(lab: Lab, node: str, state: str) -> None:
    """Every interface of ``node`` up or down (its default route back when up)."""
    lab.set_links(node, state)


def first_true(checks: dict[str, Callable[[], bool]], t0: float, timeout: float
               ) -> dict[str, float]:  # fmt: skip
    """Poll every check until each has been true once: name -> seconds since ``t0``."""
    seen: dict[str, float] = {}
    while len(seen) < len(checks) and time.monotonic() < t0 + timeout:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return seen


# ----------------------------------------------------------------------------- two-rack


@dataclass
class Rack:
    lab: Lab
    pods: dict[str, Pod]
    blocks: dict[str, str]

    def across(self, nodes: tuple[str, ...] = HOSTS) -> list[tuple[Pod, Pod]]:
        return [(self.pods[a], self.pods[ACROSS[a]]) for a in nodes]

    def whole(self) -> bool:
        """Every host session up, every ToR with every block (fresh), every host with every
        other host's block."""
        if not tors_whole(self.lab, self.blocks.values()):
            return False
        return all(
            all(self.blocks[o] in self.lab.kernel_routes(h) for o in HOSTS if o != h) for h in HOSTS
        )


@pytest.fixture(scope="module")
def rack(make_lab) -> Rack:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    pods.install(lab)
    made = {h: pods.add(lab, h) for h in HOSTS}
    rack = Rack(lab, made, {h: block_of(lab, p) for h, p in made.items()})
    lab.wait_for(rack.whole, 60, 0.3, "every block everywhere")
    for a, b in rack.across():
        lab.wait_for(lambda a=a, b=b: pods.ping(lab, a, b.ip), 30, what=f"{a.node} -> {b.node}")
    return rack


@pytest.fixture
def intact(rack: Rack) -> Iterator[Rack]:
    """Each test starts and must end with the fabric whole (the next one relies on it)."""
    rack.lab.wait_for(rack.whole, 60, 0.3, "the fabric whole before the test")
    yield rack
    rack.lab.wait_for(rack.whole, 60, 0.3, "the fabric whole after the test")


def _routes_stay(rack: Rack, node: str) -> Callable[[], bool]:
    before = rack.lab.kernel_routes(node)
    others = [h for h in HOSTS if h != node]
    assert rack.blocks[node] in before and all(rack.blocks[o] in before for o in others)

    def check() -> bool:
        if rack.lab.kernel_routes(node) != before:
            return False
        return all(rack.blocks[node] in rack.lab.kernel_routes(o) for o in others)

    return check


def _no_loss(rack: Rack, node: str, before: dict[str, str], flows: Flows, bad: list[float],
             what: str) -> None:  # fmt: skip
    msg = note(f"{what}: losses {flows.lossy() or 'none'}")
    assert not bad, f"{node}'s routes changed or its block left a node ({len(bad)} samples); {msg}"
    assert rack.lab.kernel_routes(node) == before, msg
    assert not flows.lossy(), msg


@pytest.mark.parametrize("node", ["node1", "node4"])  # behind FRR, behind BIRD
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_fabricd_restart_loses_no_ping(intact: Rack, sig: int, node: str) -> None:
    lab = intact.lab
    before = lab.kernel_routes(node)
    with Flows(lab, intact.across()) as flows, watching(_routes_stay(intact, node)) as bad:
        t0 = time.monotonic()
        lab.stop_fabricd(node, sig)
        time.sleep(1.0)
        lab.start_fabricd(node)
        lab.wait_for(lambda: lab.health(node)[0] == 200, 60, what=f"fabricd in {node} ready")
        ready = time.monotonic() - t0
        lab.wait_for(intact.whole, 30, 0.2, "sessions back and routes fresh")
        time.sleep(1.0)
    what = f"fabricd {signal.Signals(sig).name} on {node} (ready again after {ready:.1f} s)"
    _no_loss(intact, node, before, flows, bad, what)


@pytest.mark.parametrize("node", ["node2", "node3"])
def test_exabgp_killed_loses_no_ping(intact: Rack, node: str) -> None:
    lab = intact.lab
    before = lab.kernel_routes(node)
    speaker = status(lab, node)["speaker"]
    with Flows(lab, intact.across()) as flows, watching(_routes_stay(intact, node)) as bad:
        t0 = time.monotonic()
        os.kill(speaker["pid"], signal.SIGKILL)
        lab.wait_for(
            lambda: status(lab, node)["speaker"]["restarts"] > speaker["restarts"],
            30,
            what="ExaBGP restarted",
        )
        lab.wait_for(intact.whole, 30, 0.2, "sessions back and routes fresh")
        back = time.monotonic() - t0
        time.sleep(1.0)
    what = f"ExaBGP SIGKILL on {node} (sessions and routes fresh after {back:.1f} s)"
    _no_loss(intact, node, before, flows, bad, what)


def _cut_off(rack: Rack, off: tuple[str, ...], cut: Callable[[str], None],
             restore: Callable[[str], None], what: str) -> None:  # fmt: skip
    """Cut ``off`` nodes with ``cut``: measure until both ToRs and the other hosts lost their
    blocks, check the other pods keep talking, ``restore``, measure until all is back."""
    lab = rack.lab
    stay = tuple(h for h in HOSTS if h not in off)
    checks: dict[str, Callable[[], bool]] = {}
    for n in off:
        b = rack.blocks[n]
        for tor in TORS:
            checks[f"{n} block off {tor}"] = lambda t=tor, b=b: b not in tor_routes(lab, t)
        for h in stay:
            checks[f"{n} block off {h}"] = lambda h=h, b=b: b not in lab.kernel_routes(h)
    down: set[str] = set()
    try:
        with Flows(lab, rack.across(stay)) as flows:
            t0 = time.monotonic()
            for n in off:
                down.add(n)
                cut(n)
            gone = first_true(checks, t0, HOLD + MARGIN + 5)
            time.sleep(1.0)  # and nothing comes back while they are away
            again = [k for k, c in checks.items() if not c()]
            alive = {n: lab.fabricd_running(n) for n in off}
        t1 = time.monotonic()
        for n in off:
            down.discard(n)
            restore(n)
        lab.wait_for(rack.whole, 60, 0.2, f"{off} back")
        back = time.monotonic() - t1
    finally:
        for n in down:
            restore(n)
    worst = max(gone.values(), default=float("nan"))
    msg = note(f"{what} {off}: withdrawn after {gone} (worst {worst:.2f} s, hold {HOLD:.0f} s); "
               f"all back {back:.1f} s after restoring; other pods' losses "
               f"{flows.lossy() or 'none'}")  # fmt: skip
    assert set(gone) == set(checks), f"never withdrawn: {sorted(set(checks) - set(gone))}; {msg}"
    assert worst <= HOLD + MARGIN, msg
    assert not again, f"came back while cut off: {again}; {msg}"
    assert not flows.lossy(), f"pods elsewhere lost pings: {msg}"
    assert all(alive.values()), (
        f"fabricd exited on a node cut off from etcd and its peers: {alive}; it must keep "
        f"running (kernel routes, BGP) and reconnect; {msg}"
    )
    for n in off:
        assert pods.ping(lab, rack.pods[n], rack.pods[ACROSS[n]].ip), f"{n}'s pod after return"


def test_node_powered_off_is_withdrawn_and_returns(intact: Rack) -> None:
    """All links of node2 (behind FRR) and node4 (behind BIRD) down; fabricd keeps running.
    The ToRs see the carrier go and close the sessions at once; the hold time is the bound."""
    lab = intact.lab

    def restore(n: str) -> None:
        set_links(lab, n, "up")
        if not lab.fabricd_running(n):  # see the assertion on ``alive``
            lab.start_fabricd(n)

    _cut_off(intact, ("node2", "node4"), lambda n: set_links(lab, n, "down"), restore,
             "powered off")  # fmt: skip


def test_node_gone_silent_is_withdrawn_within_hold_time(intact: Rack) -> None:
    """The uplinks of node2 and node4 drop everything, carrier up (a hung node, a broken
    path): only the ToRs' hold timers notice. Neither FRR nor BIRD may keep the blocks as
    graceful-restart stale routes after a hold-timer expiry."""
    lab = intact.lab

    def cut(n: str) -> None:
        ifs = ", ".join(f'"{i}"' for i in sorted(lab.node(n).ifaces))
        lab.exec(n, ["nft", "-f", "-"], input=SILENT.format(ifs=ifs), check=True)

    def restore(n: str) -> None:
        lab.exec(n, "nft delete table inet e2e_silent", check=True)

    _cut_off(intact, ("node2", "node4"), cut, restore, "gone silent")


# ----------------------------------------------------------------------------- dual-homed


@dataclass
class Dual:
    lab: Lab
    pairs: list[tuple[Pod, Pod]]  # node1 pod -> node2 pod and back: several ECMP flows
    blocks: dict[str, str]

    def tor_gw(self, host: str, tor: str) -> str:
        return next(str(nb.address) for nb in self.lab.node(host).neighbors if nb.name == tor)

    def paths(self, host: str) -> set[str]:
        other = self.blocks["node2" if host == "node1" else "node1"]
        return gateways(self.lab, host, other)

    def whole(self) -> bool:
        """Both sessions of both hosts up, both ToRs with both blocks, ECMP via both."""
        if not tors_whole(self.lab, self.blocks.values()):
            return False
        return all(self.paths(h) == {self.tor_gw(h, t) for t in TORS} for h in self.blocks)


@pytest.fixture(scope="module")
def dual(make_lab) -> Dual:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "dual-homed")
    pods.install(lab)
    ones = [pods.add(lab, "node1") for _ in range(4)]
    twos = [pods.add(lab, "node2") for _ in range(4)]
    pairs = [*zip(ones, twos, strict=True), *zip(twos, ones, strict=True)]
    d = Dual(lab, pairs, {"node1": block_of(lab, ones[0]), "node2": block_of(lab, twos[0])})
    lab.wait_for(d.whole, 60, 0.3, "both hosts ECMP via both ToRs")
    for a, b in pairs:
        lab.wait_for(lambda a=a, b=b: pods.ping(lab, a, b.ip), 30, what=f"{a.name} -> {b.name}")
    return d


def test_dual_homed_hosts_peer_with_both_tors_and_route_ecmp(dual: Dual) -> None:
    lab = dual.lab

    def peers(host: str) -> dict[str, str]:
        return {s["peerIP"]: s["state"] for s in status(lab, host)["sessions"]}

    for host in dual.blocks:
        want = {dual.tor_gw(host, t): "up" for t in TORS}
        lab.wait_for(lambda h=host, w=want: peers(h) == w, 10, 0.5, f"{host}: {want} in status")
        assert dual.paths(host) == set(want)
    # FRR names dynamic neighbours by address: each host peers from the address on that link
    frr = set(lab.bgp_sessions("tor1"))
    assert {str(lab.node(h).ifaces["eth1"].ip) for h in dual.blocks} <= frr, frr


def _tor_down(dual: Dual, tor: str, stop: Callable[[], None], restore: Callable[[], None],
              what: str) -> None:  # fmt: skip
    """Stop ``tor`` with probes on every pod pair: the hosts must drop its paths and the
    flows hashed onto it must recover within the hold time."""
    lab = dual.lab
    live = next(t for t in TORS if t != tor)
    checks = {
        f"{h} via {live} only": (lambda h=h: dual.paths(h) == {dual.tor_gw(h, live)})
        for h in dual.blocks
    }
    try:
        with Flows(lab, dual.pairs) as flows:
            t0 = time.monotonic()
            stop()
            moved = first_true(checks, t0, HOLD + MARGIN)
            time.sleep(1.0)
        result = flows.stop()
    finally:  # even when the test fails: the next one needs both ToRs
        restore()
        lab.wait_for(dual.whole, 60, 0.3, f"{tor} back, ECMP via both ToRs")
    window = max(v.window for v in result.values())
    msg = note(f"{tor} {what}: hosts on {live} only after {moved} (s; waited up to "
               f"{HOLD + MARGIN:.0f} s); longest loss window {window:.1f} s; losses "
               f"{flows.lossy() or 'none'}")  # fmt: skip
    assert window <= HOLD + MARGIN, msg
    assert set(moved) == set(checks), msg


def test_tor_powered_off_traffic_moves_to_the_other(dual: Dual) -> None:
    """tor2 (BIRD) loses power: frozen, all its links down at once as far as it can tell
    (no FIN, no NOTIFICATION, no last withdrawal on a link still up), then killed. The
    hosts notice at their hold timer."""
    lab, tor = dual.lab, "tor2"

    def stop() -> None:
        pids = [r.pid for r in lab.state.procs if r.node == tor and procs.matches(r)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        set_links(lab, tor, "down")
        for pid in pids:  # a FIN from a BIRD killed on a live link would mean "restarting"
            os.kill(pid, signal.SIGKILL)

    def restore() -> None:
        set_links(lab, tor, "up")
        lab.restart_router(tor)

    _tor_down(dual, tor, stop, restore, "powered off")


def test_tor_routing_stopped_traffic_moves_to_the_other(dual: Dual) -> None:
    """tor1's FRR stopped (SIGTERM to zebra and bgpd, links up): zebra removes its kernel
    routes, bgpd closes the sessions without a NOTIFICATION."""
    lab, tor = dual.lab, "tor1"

    def stop() -> None:
        procs.terminate([r.pid for r in lab.state.procs if r.node == tor and procs.matches(r)])

    _tor_down(dual, tor, stop, lambda: lab.restart_router(tor), "routing stopped (SIGTERM)")
