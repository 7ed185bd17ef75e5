"""bgp.speaker against a real ExaBGP and real BIRD routers, in network namespaces.

Topology (every address lives inside namespaces this module creates and deletes):

    tspXXXX (node: ExaBGP, AS 64512)  v1 10.77.1.2/24 fd77:1::2  <->  r1: BIRD AS 65001, 10.77.1.1
                                      v2 10.77.2.2/24             <->  r2: BIRD AS 65002, 10.77.2.1

The Speaker runs in the test process; ExaBGP runs in the node namespace through
``ip netns exec`` (which execs, so the Speaker's pid is ExaBGP's own).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bgp.model import (
    Advert,
    EndOfRib,
    Event,
    PeerState,
    PeerType,
    PeerUpdate,
    Session,
    SessionState,
    SpeakerRestarted,
)
from bgp.speaker import Speaker

ip = ipaddress.ip_address
net = ipaddress.ip_network
NODE_AS = 64512
RID = ipaddress.IPv4Address("10.77.1.2")
ROUTER_ROUTES = ["10.88.1.0/24", "10.88.2.0/24"]

BIRD_CONF = """
log "{dir}/bird.log" all;
router id {rid};
protocol device {{ scan time 10; }}
protocol static s4 {{ ipv4; {statics} }}
protocol bgp n1 {{
  local {rid} as {asn};
  neighbor {node} as {node_as};
  hold time 9; keepalive time 3;
  graceful restart on;
  connect delay time 1; connect retry time 1; error wait time 1, 3;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
  ipv6 {{ import all; export none; }};
}}
include "{dir}/extra.conf";
"""


# ---------------------------------------------------------------------------- topology


def sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Router:
    ns: str
    addr: str
    asn: int
    sock: Path
    proc: subprocess.Popen[bytes] | None = None

    def birdc(self, *cmd: str) -> str:
        return sh("birdc", "-s", str(self.sock), *cmd, check=False)

    def routes(self) -> set[str]:
        """Prefixes BIRD learned from the node."""
        out = self.birdc("show", "route", "protocol", "n1")
        return set(re.findall(r"^([0-9a-f:.]+/\d+)\s", out, re.M))

    def protocol(self) -> str:
        return self.birdc("show", "protocols", "all", "n1")

    def established_since(self) -> str:
        m = re.search(r"^n1\s+BGP\s+\S+\s+up\s+(\S+)\s+Established", self.protocol(), re.M)
        return m.group(1) if m else ""


@dataclass
class Topo:
    node: str
    dir: Path
    r1: Router
    r2: Router
    namespaces: list[str] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)

    def session(self, r: Router, **kw: object) -> Session:
        local = r.addr.rsplit(".", 1)[0] + ".2"
        args: dict[str, object] = {
            "name": f"Node_{r.addr.replace('.', '_')}",
            "kind": PeerType.NODE,
            "peer_ip": ip(r.addr),
            "peer_as": r.asn,
            "local_as": NODE_AS,
            "local_address": ip(local),
            "router_id": RID,
            "hold_time": 9,
        }
        args.update(kw)
        return Session(**args)  # type: ignore[arg-type]

    def exabgp_argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.node, sys.executable, "-m", "exabgp"]


def _start_bird(t: Topo, r: Router, statics: list[str]) -> None:
    d = t.dir / r.ns
    d.mkdir()
    conf = d / "bird.conf"
    (d / "extra.conf").write_text("")
    conf.write_text(
        BIRD_CONF.format(
            dir=d,
            rid=r.addr,
            asn=r.asn,
            node=r.addr.rsplit(".", 1)[0] + ".2",
            node_as=NODE_AS,
            statics=" ".join(f"route {p} blackhole;" for p in statics),
        )
    )
    r.proc = subprocess.Popen(
        ["ip", "netns", "exec", r.ns, "/usr/sbin/bird", "-f", "-c", str(conf), "-s", str(r.sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not r.sock.exists():
        assert time.monotonic() < deadline, "BIRD did not start"
        time.sleep(0.05)


@pytest.fixture
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    names = [f"tsp{secrets.token_hex(2)}" for _ in range(3)]
    d = Path(tmp_path_factory.mktemp("tsp"))
    t = Topo(
        names[0],
        d,
        Router(names[1], "10.77.1.1", 65001, d / "r1.ctl"),
        Router(names[2], "10.77.2.1", 65002, d / "r2.ctl"),
    )
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            t.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i, r in enumerate((t.r1, t.r2), start=1):
            # both ends are created inside their namespaces: nothing touches the root one
            sh("ip", "link", "add", "name", f"v{i}", "netns", t.node, "type", "veth",
               "peer", "name", "e0", "netns", r.ns)  # fmt: skip
            for ns, dev, addr6 in ((t.node, f"v{i}", f"fd77:{i}::2"), (r.ns, "e0", f"fd77:{i}::1")):
                a4 = f"10.77.{i}.{2 if ns == t.node else 1}/24"
                sh("ip", "-n", ns, "addr", "add", a4, "dev", dev)
                sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
                sh("ip", "-n", ns, "link", "set", dev, "up")
        _start_bird(t, t.r1, ROUTER_ROUTES)
        _start_bird(t, t.r2, [])
        yield t
    finally:
        for r in (t.r1, t.r2):
            if r.proc is not None:
                r.proc.kill()
                r.proc.wait()
        for pid in t.extra_pids:
            _kill(pid)
        for ns in t.namespaces:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                _kill(int(pid))  # anything left in our own namespace is ours
            sh("ip", "netns", "del", ns, check=False)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------- helpers


async def until(cond: Callable[[], object], within: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what or cond}")
        await asyncio.sleep(0.05)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    def learned(self) -> set[str]:
        """Prefixes the node holds from its peers, replaying announce/withdraw/restart."""
        rib: set[str] = set()
        for ev in self.events:
            if isinstance(ev, PeerUpdate):
                rib |= {str(a.prefix) for a in ev.announced}
                rib -= {str(p) for p in ev.withdrawn}
            elif isinstance(ev, SpeakerRestarted) or (
                isinstance(ev, PeerState) and ev.state is SessionState.DOWN
            ):
                rib.clear()
        return rib


def established(sp: Speaker, peer: str) -> bool:
    st = sp.sessions_status().get(ip(peer))
    return st is not None and st.state is SessionState.ESTABLISHED


def speaker(t: Topo, rec: Recorder) -> Speaker:
    sp = Speaker(t.dir / "node", rec, exabgp_argv=t.exabgp_argv())
    return sp


ADVERTS = [
    Advert(net("10.99.1.0/26")),
    Advert(net("10.99.2.0/26"), None, ("65000:7",)),
    Advert(net("fd99:1::/64"), ip("fd77:1::2")),
]


# ---------------------------------------------------------------------------- root tests


@pytest.mark.root
def test_announce_receive_withdraw(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        topo.extra_pids.append(0)
        await sp.start([topo.session(topo.r1)], RID)
        assert sp.pid is not None
        topo.extra_pids[-1] = sp.pid
        cmdline = _read(f"/proc/{sp.pid}/cmdline").split(b"\0")
        assert b"exabgp" in cmdline and b"ip" not in cmdline[:1]  # ip netns exec execs
        try:
            sp.set_announcements(ADVERTS)
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            want = {str(a.prefix) for a in ADVERTS}
            await until(lambda: topo.r1.routes() >= want, what="routes at BIRD")
            assert sp.announced() == set(ADVERTS)
            detail = topo.r1.birdc("show", "route", "10.99.2.0/26", "all")
            assert "(65000,7)" in detail
            assert "fd77:1::2" in topo.r1.birdc("show", "route", "fd99:1::/64", "all")
            # BIRD's routes arrive as events, then its End-of-RIB
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="PeerUpdates")
            await until(
                lambda: EndOfRib(ip(topo.r1.addr), "ipv4 unicast") in rec.events, what="EOR"
            )
            # and our End-of-RIB reached BIRD: it is not waiting for us any more
            await until(lambda: "graceful restart active" not in topo.r1.protocol())
            sp.set_announcements(ADVERTS[1:])
            await until(lambda: "10.99.1.0/26" not in topo.r1.routes(), what="withdraw")
            assert await sp.wait_idle(5)
            assert sp.announced() == set(ADVERTS[1:])
            assert topo.r1.routes() == {str(a.prefix) for a in ADVERTS[1:]}
            assert await sp.ping()
            status = sp.sessions_status()[ip(topo.r1.addr)]
            assert status.info == "Established" and status.since <= time.time()
            assert sp.errors == 0 and sp.decode_errors == 0
        finally:
            await sp.stop()
        assert sp.pid is None

    asyncio.run(run())


@pytest.mark.root
def test_sigkill_restart_is_hitless(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        await sp.start([topo.session(topo.r1)], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            sp.set_announcements(ADVERTS)
            want = {str(a.prefix) for a in ADVERTS}
            await until(lambda: topo.r1.routes() >= want, what="routes at BIRD")
            await until(lambda: "graceful restart active" not in topo.r1.protocol())
            old = sp.pid
            assert old is not None
            t_kill = time.monotonic()
            os.kill(old, signal.SIGKILL)
            await until(lambda: sp.restarts == 1, what="restart noticed")
            assert SpeakerRestarted(1) in rec.events
            # BIRD keeps our routes (stale) all along, then gets them again and the EOR
            gaps = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                gaps += not topo.r1.routes() >= want
                protocol = topo.r1.protocol()
                if established(sp, topo.r1.addr) and "graceful restart active" not in protocol:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"no hitless recovery:\n{protocol}")
            assert gaps == 0
            print(f"\nSIGKILL to End-of-RIB at BIRD: {time.monotonic() - t_kill:.2f} s")
            assert sp.pid not in (None, old)
            topo.extra_pids.append(sp.pid or 0)
            assert topo.r1.routes() == want
            assert await sp.wait_idle(5) and sp.announced() == set(ADVERTS)
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="routes relearned")
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
def test_reconfigure_keeps_unchanged_session(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            sp.set_announcements(ADVERTS[:2])
            want = {str(a.prefix) for a in ADVERTS[:2]}
            await until(lambda: topo.r1.routes() >= want, what="routes at r1")
            since = topo.r1.established_since()
            status = sp.sessions_status()[s1.peer_ip]
            # a new neighbor: ExaBGP gives it an empty RIB; the speaker fills it when it is up
            assert await sp.reconfigure([s1, s2])
            await until(lambda: topo.r2.routes() >= want, what="routes at r2")
            await until(lambda: "graceful restart active" not in topo.r2.protocol())
            assert topo.r1.established_since() == since
            assert sp.sessions_status()[s1.peer_ip] == status
            # routes changed later reach both
            sp.set_announcements(ADVERTS[1:2])
            await until(lambda: topo.r2.routes() == {"10.99.2.0/26"}, what="withdraw at r2")
            await until(lambda: topo.r1.routes() == {"10.99.2.0/26"}, what="withdraw at r1")
            # changing r2's session (hold time) re-establishes it, r1 stays
            assert await sp.reconfigure([s1, topo.session(topo.r2, hold_time=6)])
            await until(lambda: _hold(topo.r2) == "6", what="new hold time")
            await until(lambda: topo.r2.routes() == {"10.99.2.0/26"}, what="routes at r2 again")
            # removing r2 closes only that session
            assert await sp.reconfigure([s1])
            await until(lambda: topo.r2.established_since() == "", what="r2 down")
            assert topo.r1.established_since() == since
            assert set(sp.sessions_status()) == {s1.peer_ip}
            assert sp.errors == 0
        finally:
            await sp.stop()

    asyncio.run(run())


def _hold(r: Router) -> str:
    m = re.search(r"Hold timer:\s+\S+/(\d+)", r.protocol())
    return m.group(1) if m else ""


@pytest.mark.root
def test_ping_follows_sigstop_and_relay_respawn(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        await sp.start([topo.session(topo.r1)], RID)
        pid = sp.pid
        assert pid is not None
        topo.extra_pids.append(pid)
        try:
            sp.set_announcements(ADVERTS[:1])
            await until(lambda: topo.r1.routes() == {"10.99.1.0/26"}, what="route at r1")
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="routes from r1")
            assert await sp.ping()
            os.kill(pid, signal.SIGSTOP)
            try:
                t = time.monotonic()
                assert not await sp.ping(0.5)
                assert time.monotonic() - t < 1.0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await sp.ping(2.0)
            # the relay dies: ExaBGP respawns it, the speaker resynchronises and asks the
            # peer to resend its routes (a new relay gets no replay)
            relay = int(_read(f"/proc/{pid}/task/{pid}/children").split()[0])
            n_events = len(rec.events)
            os.kill(relay, signal.SIGKILL)
            await until(
                lambda: any(isinstance(e, PeerUpdate) for e in rec.events[n_events:]),
                what="routes resent after route-refresh",
            )
            assert await sp.ping()
            assert sp.pid == pid and sp.restarts == 0
            assert established(sp, topo.r1.addr)
            assert topo.r1.routes() == {"10.99.1.0/26"}
            sp.set_announcements(ADVERTS[:2])
            await until(lambda: len(topo.r1.routes()) == 2, what="announce after respawn")
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
def test_withdraw_all_and_stop(topo: Topo) -> None:
    async def run() -> None:
        sp = speaker(topo, Recorder())
        await sp.start([topo.session(topo.r1)], RID)
        topo.extra_pids.append(sp.pid or 0)
        sp.set_announcements(ADVERTS)
        await until(lambda: len(topo.r1.routes()) == 3, what="routes at r1")
        await sp.withdraw_all_and_stop()
        assert topo.r1.routes() == set()
        assert sp.pid is None

    asyncio.run(run())


@pytest.mark.root
def test_exabgp_dies_with_its_parent(topo: Topo) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the process that runs the Speaker, ExaBGP follows."""
    script = f"""
import asyncio, ipaddress, sys
from pathlib import Path
from bgp.speaker import Speaker
async def main():
    sp = Speaker(Path({str(topo.dir / "child")!r}), lambda e: None, {topo.exabgp_argv()!r})
    await sp.start([], ipaddress.IPv4Address("10.77.1.2"))
    print(sp.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        topo.extra_pids.append(pid)
        assert Path(f"/proc/{pid}").exists()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and b"Z" not in _state(pid):
            assert time.monotonic() < deadline, "ExaBGP outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1][:3]
    except OSError:
        return b"Z"


@pytest.mark.root
def test_passive_and_md5_sessions(topo: Topo) -> None:
    """On the wire: ExaBGP listens for r1 (passive), and signs r2's session (TCP MD5; the
    renderer passes the key base64-encoded, so any byte is fine)."""
    key = "s3cr3t key;#{} with spaces"
    conf = topo.dir / topo.r2.ns / "bird.conf"
    text = conf.read_text().replace("  hold time 9;", f'  password "{key}";\n  hold time 9;')
    conf.write_text(text)
    assert "Reconfigur" in topo.r2.birdc("configure")
    pw = topo.dir / "r2.key"
    pw.write_text(key + "\n")
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        s1 = topo.session(topo.r1, passive=True)
        s2 = topo.session(topo.r2, password_file=str(pw))
        await sp.start([s1, s2], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            assert key not in (topo.dir / "node" / "exabgp.conf").read_text()
            await until(lambda: established(sp, topo.r1.addr), what="passive session up")
            await until(lambda: established(sp, topo.r2.addr), what="md5 session up")
            out = sh("ip", "netns", "exec", topo.node, "ss", "-tn", "state", "established")
            assert f"{s1.local_address}:179" in out  # r1 connected to us
            sp.set_announcements(ADVERTS[:1])
            await until(lambda: topo.r2.routes() == {"10.99.1.0/26"}, what="route over md5")
            # key rotation: same plan, new file content; reconfigure must pick it up
            conf.write_text(text.replace(key, "rotated"))
            assert "Reconfigur" in topo.r2.birdc("configure")
            await until(lambda: not established(sp, topo.r2.addr), what="old key refused")
            await asyncio.sleep(2)
            assert not established(sp, topo.r2.addr)
            pw.write_text("rotated\n")
            assert await sp.reconfigure([s1, s2])
            await until(lambda: established(sp, topo.r2.addr), what="session with the new key")
            await until(lambda: topo.r2.routes() == {"10.99.1.0/26"}, what="route, new key")
        finally:
            await sp.stop()
        assert key not in (topo.dir / "node" / "exabgp.log").read_text()

    asyncio.run(run())


# ---------------------------------------------------------------------------- throughput


def _count(r: Router) -> int:
    m = re.search(r"(\d+) of \d+ routes", r.birdc("show", "route", "protocol", "n1", "count"))
    return int(m.group(1)) if m else 0


def _prefixes(n: int, base: str = "10.100.0.0") -> list[ipaddress.IPv4Network]:
    start = int(ipaddress.IPv4Address(base))
    return [ipaddress.IPv4Network((start + i, 32)) for i in range(n)]


@pytest.mark.root
@pytest.mark.slow
def test_throughput(topo: Topo) -> None:
    """Receive: BIRD sends 100k routes, the node must keep up with ExaBGP (~20k/s).
    Announce: 10k prefixes in 100-prefix lines with 4 outstanding (~3k/s on 5.0.15)."""
    n_recv, n_send = 100_000, 10_000
    rec = Recorder()
    got = [0]

    def count(ev: Event) -> None:
        if isinstance(ev, PeerUpdate):
            got[0] += len(ev.announced)

    def on_event(ev: Event) -> None:
        rec(ev)
        count(ev)

    d = topo.dir / topo.r2.ns
    statics = "\n".join(f"  route {p} blackhole;" for p in _prefixes(n_recv, "10.96.0.0"))
    (d / "extra.conf").write_text(f"protocol static bulk {{\n  disabled;\n  ipv4;\n{statics}\n}}\n")
    assert "Reconfigur" in topo.r2.birdc("configure")

    async def run() -> None:
        sp = Speaker(topo.dir / "node", on_event, exabgp_argv=topo.exabgp_argv())
        await sp.start([topo.session(topo.r2)], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            await until(lambda: established(sp, topo.r2.addr), what="session up")
            t0 = time.monotonic()
            topo.r2.birdc("enable", "bulk")
            await until(lambda: got[0] >= n_recv, within=120, what="100k received")
            recv = time.monotonic() - t0
            adverts = [Advert(p) for p in _prefixes(n_send)]
            t0 = time.monotonic()
            sp.set_announcements(adverts)
            assert await sp.wait_idle(120)
            acked = time.monotonic() - t0
            assert sp.announced() == set(adverts)
            await until(lambda: _count(topo.r2) == n_send, within=60, what="10k at BIRD")
            at_bird = time.monotonic() - t0
            t0 = time.monotonic()
            sp.set_announcements(())
            assert await sp.wait_idle(120)
            withdrawn = time.monotonic() - t0
            await until(lambda: _count(topo.r2) == 0, within=60, what="10k withdrawn")
            print(
                f"\nreceive {n_recv} prefixes: {recv:.2f} s ({n_recv / recv:.0f}/s); "
                f"announce {n_send}: acked {acked:.2f} s, at BIRD {at_bird:.2f} s "
                f"({n_send / at_bird:.0f}/s); withdraw {n_send}: acked {withdrawn:.2f} s; "
                f"commands {sp.commands_sent}, errors {sp.errors}"
            )
            assert sp.errors == 0 and sp.relay_drops == 0
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
@pytest.mark.slow
def test_reconfigure_during_bulk_announce(topo: Topo) -> None:
    """ExaBGP 5.0.15 skips a reload while routes wait to go out; the speaker notices
    (generation check) and retries, and the new neighbor still gets every route."""
    rec = Recorder()
    n = 5_000

    async def run() -> None:
        sp = Speaker(topo.dir / "node", rec, exabgp_argv=topo.exabgp_argv())
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            adverts = [Advert(p) for p in _prefixes(n)]
            sp.set_announcements(adverts)
            await until(lambda: _count(topo.r1) > 200, what="burst under way")
            assert await sp.reconfigure([s1, s2], timeout=60)
            await until(lambda: _count(topo.r2) == n, within=60, what="all routes at r2")
            await until(lambda: _count(topo.r1) == n, within=60, what="all routes at r1")
            await until(lambda: "graceful restart active" not in topo.r2.protocol())
            assert sp.announced() == set(adverts) and sp.errors == 0
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
@pytest.mark.slow
def test_reload_skipped_while_a_peer_is_down_is_retried(topo: Topo) -> None:
    """ExaBGP 5.0.15 skips a reload while a neighbor that is down (connect retries back off
    up to 60 s) still holds routes we sent after its last attempt. The speaker checks each
    reload and retries; announcements keep flowing meanwhile."""
    rec = Recorder()
    topo.r2.birdc("disable", "n1")

    async def run() -> None:
        sp = Speaker(topo.dir / "node", rec, exabgp_argv=topo.exabgp_argv())
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1, s2], RID)
        topo.extra_pids.append(sp.pid or 0)
        try:
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            await asyncio.sleep(3)  # let ExaBGP's connect backoff towards r2 grow
            sp.set_announcements(ADVERTS[:1])
            assert await sp.wait_idle(10)
            s3 = topo.session(topo.r2, peer_ip=ip("10.77.2.9"), name="Node_10_77_2_9")
            t0 = time.monotonic()
            task = asyncio.create_task(sp.reconfigure([s1, s2, s3], timeout=90))
            await asyncio.sleep(0.5)
            sp.set_announcements(ADVERTS[:2])
            await until(lambda: sp.announced() == set(ADVERTS[:2]), what="routes while waiting")
            await until(lambda: len(topo.r1.routes()) == 2, what="routes at r1")
            assert await task
            print(f"\nreload took {time.monotonic() - t0:.1f} s, {sp._reload_tries} tries")
            assert set(sp.sessions_status()) == {s1.peer_ip, s2.peer_ip, s3.peer_ip}
        finally:
            await sp.stop()

    asyncio.run(run())
