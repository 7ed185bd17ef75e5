"""Hand-written strict top-of-rack configurations for the two-rack lab (not the lab's
generated ones), and the helpers of tests/lab/test_strict_tor.py.

tor1 (FRR, AS 65001, rack 1: node1, node2): dynamic neighbors only (`bgp listen range`, the
ToR never initiates), one peer group with a password and `ttl-security hops 1`, graceful
restart, a prefix-list admitting pod-pool prefixes /26-/32 only, `maximum-prefix`.

tor2 (BIRD, AS 65002, rack 2: node3, node4): one protocol per host with its own password,
`ttl security on`, graceful restart, an import filter (pool prefixes /26-/32 only) and an
import limit; node3's protocol traces states, routes, events and packets, so the order of
UPDATEs and End-of-RIB after each restart can be read from bird.log.

Addresses are the lab plan's (lab/plan.py): every host on a /30 to its ToR.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.runner import Lab

POOL = "10.244.0.0/16"
KEYS = {"rack1": "r1-peer-group-key", "node3": "node3 key;#{}", "node4": "node4-key"}

TOR2_BIRD = """\
log "{dir}/bird.log" all;
router id 10.255.255.3;
protocol device {{ scan time 10; }}
protocol direct {{ ipv4; interface "-eth0", "*"; }}
protocol kernel kern4 {{
  ipv4 {{ import none; export where source = RTS_BGP; }};
  merge paths on;
  learn off;
}}

# from hosts: pod-pool prefixes /26 to /32, nothing else
filter from_hosts {{
  if net ~ [ {pool}{{26,32}} ] then accept;
  reject;
}}
filter to_hosts {{
  if source = RTS_BGP then accept;
  reject;
}}
filter to_spine {{
  if source = RTS_BGP then accept;
  if source = RTS_DEVICE && net ~ [ 10.255.16.0/20+ ] then accept;
  reject;
}}

template bgp host {{
  local as 65002;
  hold time 9;
  keepalive time 3;
  connect delay time 1;
  connect retry time 2;
  error wait time 1, 5;
  graceful restart on;   # helper: a restarting host's routes stay until its End-of-RIB
  ttl security on;       # GTSM: hosts are directly connected, TTL 255 only
  ipv4 {{ import filter from_hosts; import limit 64 action restart; export filter to_hosts; }};
}}

protocol bgp node3 from host {{
  local 10.255.16.17 as 65002;
  neighbor 10.255.16.18 as 65102;
  password "{node3}";
  debug {{ states, routes, events, packets }};
}}

protocol bgp node4 from host {{
  local 10.255.16.21 as 65002;
  neighbor 10.255.16.22 as 65102;
  password "{node4}";
  debug {{ states, events }};
}}

protocol bgp spine {{
  local 10.255.16.5 as 65002;
  neighbor 10.255.16.6 as 65000;
  hold time 9;
  keepalive time 3;
  connect retry time 2;
  error wait time 1, 5;
  graceful restart on;
  ipv4 {{ import all; export filter to_spine; }};
}}
"""

TOR1_BGPD = """\
hostname tor1
log file {dir}/bgpd.log informational
!
ip prefix-list PODS seq 10 permit {pool} ge 26 le 32
ip prefix-list LAB seq 10 permit 10.255.16.0/20 le 32
!
route-map HOSTS-IN permit 10
 match ip address prefix-list PODS
exit
route-map CONNECTED permit 10
 match ip address prefix-list LAB
exit
route-map ALL permit 10
exit
!
router bgp 65001
 bgp router-id 10.255.255.2
 no bgp ebgp-requires-policy
 bgp log-neighbor-changes
 bgp graceful-restart
 bgp bestpath as-path multipath-relax
 neighbor 10.255.16.2 remote-as 65000
 neighbor 10.255.16.2 timers 3 9
 neighbor 10.255.16.2 timers connect 2
 neighbor HOSTS peer-group
 neighbor HOSTS remote-as 65101
 neighbor HOSTS password {rack1}
 neighbor HOSTS ttl-security hops 1
 neighbor HOSTS timers 3 9
 neighbor HOSTS advertisement-interval 0
 bgp listen range 10.255.16.8/30 peer-group HOSTS
 bgp listen range 10.255.16.12/30 peer-group HOSTS
 !
 address-family ipv4 unicast
  redistribute connected route-map CONNECTED
  neighbor 10.255.16.2 activate
  neighbor 10.255.16.2 route-map ALL in
  neighbor 10.255.16.2 route-map ALL out
  neighbor HOSTS activate
  neighbor HOSTS route-map HOSTS-IN in
  neighbor HOSTS route-map ALL out
  neighbor HOSTS maximum-prefix 64
  maximum-paths 64
 exit-address-family
exit
"""


def peer(name: str, node: str, tor_ip: str, asn: int, **extra: Any) -> dict[str, Any]:
    spec = {"node": node, "peerIP": tor_ip, "asNumber": asn, "holdTime": 9, "keepaliveTime": 3,
            "numAllowedLocalASNumbers": 1, "ttlSecurity": 1, **extra}  # fmt: skip
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip


def resources(keys: Path) -> list[dict[str, Any]]:
    """Mesh off, one pool, a strict BGPPeer per host: GTSM on all; node1/node2 with the
    rack's peer-group key from a file; node3's key from a systemd credential and its
    session sourced from the node IP; node4's key from a file, source left to the kernel."""
    return [
        {"apiVersion": "fabric/v1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False, "asNumber": 64512}},
        {"apiVersion": "fabric/v1", "kind": "IPPool", "metadata": {"name": "pods"},
         "spec": {"cidr": POOL, "blockSize": 26, "natOutgoing": False}},
        peer("node1-tor1", "node1", "10.255.16.9", 65001, password={"file": str(keys / "rack1")}),
        peer("node2-tor1", "node2", "10.255.16.13", 65001, password={"file": str(keys / "rack1")}),
        peer("node3-tor2", "node3", "10.255.16.17", 65002, password={"credential": "node3-tor2"},
             sourceAddress="UseNodeIP"),
        peer("node4-tor2", "node4", "10.255.16.21", 65002, password={"file": str(keys / "node4")},
             sourceAddress="None"),
    ]  # fmt: skip


def apply(lab: Lab, docs: list[dict[str, Any]], path: Path) -> None:
    path.write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    r = lab.fabricctl(["apply", "-f", str(path)])
    assert r.returncode == 0, r.stderr


def session(doc: dict[str, Any], peer_ip: str) -> dict[str, Any]:
    return next(s for s in doc["sessions"] if s["peerIP"] == peer_ip)


def birdc(lab: Lab, router: str, *cmd: str) -> str:
    sock = lab._node_dir(router) / "bird.ctl"
    r = subprocess.run(["birdc", "-s", str(sock), *cmd], capture_output=True, text=True,
                       timeout=10, check=False)  # fmt: skip
    return r.stdout


def vtysh(lab: Lab, router: str, cmd: str) -> str:
    d = lab._node_dir(router)
    r = subprocess.run(["vtysh", "--vty_socket", str(d), "-c", cmd], capture_output=True,
                       text=True, timeout=10, check=False)  # fmt: skip
    return r.stdout


def bird_established(lab: Lab, proto: str) -> bool:
    out = birdc(lab, "tor2", "show", "protocols", proto)
    return bool(re.search(rf"^{proto}\s+BGP\s+\S+\s+up\s+\S+\s+Established", out, re.M))


def frr_established(lab: Lab) -> set[str]:
    try:
        data = json.loads(vtysh(lab, "tor1", "show bgp summary json") or "{}")
    except ValueError:
        return set()
    peers = data.get("ipv4Unicast", {}).get("peers", {})
    return {a for a, p in peers.items() if p.get("state") == "Established"}


def bird_log(lab: Lab) -> str:
    return (lab._node_dir("tor2") / "bird.log").read_text(errors="replace")


def restart_rounds(text: str, block: str) -> list[dict[str, Any]]:
    """For node3 in BIRD's trace: each graceful-restart cycle (from "Neighbor graceful
    restart detected" to "... done"): whether the block was imported before the first
    End-of-RIB of the cycle, and whether it was ever removed."""
    rounds: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in text.splitlines():
        if "node3" not in line:
            continue
        if "Neighbor graceful restart detected" in line:
            cur = {"block_before_eor": False, "eor": False, "removed": False, "lines": []}
            rounds.append(cur)
            continue
        if cur is None:
            continue
        cur["lines"].append(line)
        if block in line and "node3.ipv4 > removed" in line:
            cur["removed"] = True
        # "node3.ipv4 > added|updated|ignored <block>": the block arrived in an UPDATE
        # ("ignored": identical to the stale copy BIRD kept, which it refreshes)
        if block in line and "node3.ipv4 > " in line and not cur["eor"]:
            cur["block_before_eor"] = True
        if "Got END-OF-RIB" in line:
            cur["eor"] = True
        if "Neighbor graceful restart done" in line:
            cur = None
    return rounds


def wait_gr_done(lab: Lab, before: int, within: float = 60.0) -> None:
    """Until BIRD logged one more 'graceful restart done' for node3 than ``before``; on a
    timeout the error carries the tails of BIRD's node3 trace and of node3's fabricd log."""
    try:
        lab.wait_for(lambda: gr_done(bird_log(lab)) > before, within, what="node3 GR done")
    except TimeoutError as e:
        trace = [ln for ln in bird_log(lab).splitlines() if "node3" in ln and "KEEPALIVE" not in ln]
        fabricd = (lab._node_dir("node3") / "fabricd.out").read_text(errors="replace")
        raise AssertionError(
            f"{e}\n--- tor2 node3 trace\n"
            + "\n".join(trace[-40:])
            + "\n--- node3 fabricd\n"
            + fabricd[-3000:]
        ) from e


def gr_done(text: str) -> int:
    return sum(1 for ln in text.splitlines() if "node3" in ln and "graceful restart done" in ln)


def ping_summary(out: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
    assert m, out[-500:]
    return int(m.group(1)), int(m.group(2))


def now() -> float:
    return time.monotonic()
