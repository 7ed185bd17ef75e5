"""Helpers for tests/test_speaker.py: a node namespace and two BIRD routers.

    tspXXXX (node: ExaBGP, AS 64512)  v1 10.77.1.2/24 fd77:1::2  <->  r1: BIRD AS 65001, 10.77.1.1
                                      v2 10.77.2.2/24 fd77:2::2  <->  r2: BIRD AS 65002, 10.77.2.1

Every address lives inside namespaces created here; both ends of each veth pair are created
directly in their namespaces, so nothing touches the root namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from bgp.model import (
    Advert,
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


def start_bird(t: Topo, r: Router, statics: list[str]) -> None:
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


@contextlib.contextmanager
def build_topo(d: Path) -> Iterator[Topo]:
    """Three namespaces (``tsp`` + 4 random hex digits each), two BIRDs; everything is
    killed by PID and deleted on exit, pass or fail."""
    names = [f"tsp{secrets.token_hex(2)}" for _ in range(3)]
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
        start_bird(t, t.r1, ROUTER_ROUTES)
        start_bird(t, t.r2, [])
        yield t
    finally:
        for r in (t.r1, t.r2):
            if r.proc is not None:
                r.proc.kill()
                r.proc.wait()
        for ns in t.namespaces:
            for left in sh("ip", "netns", "pids", ns, check=False).split():
                kill_pid(int(left))  # anything left in our own namespace is ours
            sh("ip", "netns", "del", ns, check=False)


def kill_pid(pid: int) -> None:
    """SIGKILL one process we started (SIGCONT first, in case a test stopped it)."""
    if pid <= 0:  # never a process group
        return
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


def hold_time(r: Router) -> str:
    m = re.search(r"Hold timer:\s+\S+/(\d+)", r.protocol())
    return m.group(1) if m else ""


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1][:3]
    except OSError:
        return b"Z"


def route_count(r: Router) -> int:
    m = re.search(r"(\d+) of \d+ routes", r.birdc("show", "route", "protocol", "n1", "count"))
    return int(m.group(1)) if m else 0


def prefixes(n: int, base: str = "10.100.0.0") -> list[ipaddress.IPv4Network]:
    start = int(ipaddress.IPv4Address(base))
    return [ipaddress.IPv4Network((start + i, 32)) for i in range(n)]
