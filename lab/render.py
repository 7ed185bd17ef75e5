"""Config files rendered from a plan: FRR (zebra, bgpd), BIRD, and each host's fabricd.yaml.

Pure text generation. Routers announce their connected lab subnets (never the management
one) and every BGP route they learn; they accept from hosts only prefixes inside the
router's ``fabric.accept`` list. Timers are short (keepalive 3 s, hold 9 s, connect retry
2 s) so a lab converges in seconds.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml

from lab.plan import NodePlan, Plan
from lab.tls import PKI
from lab.topology import Role

LAB_NET = ipaddress.IPv4Network("10.255.0.0/16")
ETCD_PREFIX = "/fabric/v1"


def frr_zebra(node: NodePlan, log_dir: Path) -> str:
    return f"hostname {node.name}\nlog file {log_dir / 'zebra.log'} informational\n"


def _groups(node: NodePlan) -> dict[tuple[int, bool], str]:
    keys = sorted({(r.asn, r.rr_client) for r in node.ranges})
    return {k: f"HOSTS{i}" for i, k in enumerate(keys)}


def frr_bgpd(node: NodePlan, mgmt: ipaddress.IPv4Network, log_dir: Path) -> str:
    """bgpd.conf: static router neighbors, one peer group per (host AS, rr-client) range."""
    lines = [
        f"hostname {node.name}",
        f"log file {log_dir / 'bgpd.log'} informational",
        "!",
        f"ip prefix-list LAB-CONNECTED seq 5 deny {mgmt} le 32",
        f"ip prefix-list LAB-CONNECTED seq 10 permit {LAB_NET} le 32",
    ]
    lines += [
        f"ip prefix-list HOSTS-IN seq {10 * (i + 1)} permit {net} le 32"
        for i, net in enumerate(node.accept)
    ]
    lines += [
        "!",
        "route-map CONNECTED permit 10",
        " match ip address prefix-list LAB-CONNECTED",
        "exit",
        "route-map HOSTS-IN permit 10",
        " match ip address prefix-list HOSTS-IN",
        "exit",
        "route-map ALL permit 10",
        "exit",
        "!",
        f"router bgp {node.asn}",
        f" bgp router-id {node.router_id}",
        " no bgp ebgp-requires-policy",
        " bgp log-neighbor-changes",
        " bgp bestpath as-path multipath-relax",
        " bgp listen limit 1000",
    ]
    for nb in node.neighbors:
        lines += [
            f" neighbor {nb.address} remote-as {nb.asn}",
            f" neighbor {nb.address} description {nb.name}",
            f" neighbor {nb.address} timers 3 9",
            f" neighbor {nb.address} timers connect 2",
            f" neighbor {nb.address} advertisement-interval 0",
        ]
    groups = _groups(node)
    for (asn, _rr), group in groups.items():
        lines += [
            f" neighbor {group} peer-group",
            f" neighbor {group} remote-as {asn}",
            f" neighbor {group} timers 3 9",
            f" neighbor {group} advertisement-interval 0",
        ]
    lines += [
        f" bgp listen range {r.subnet} peer-group {groups[(r.asn, r.rr_client)]}"
        for r in node.ranges
    ]
    lines += [" !", " address-family ipv4 unicast", "  redistribute connected route-map CONNECTED"]
    for nb in node.neighbors:
        lines += [
            f"  neighbor {nb.address} activate",
            f"  neighbor {nb.address} route-map ALL in",
            f"  neighbor {nb.address} route-map ALL out",
        ]
    for (_asn, rr), group in groups.items():
        lines += [
            f"  neighbor {group} activate",
            f"  neighbor {group} route-map HOSTS-IN in",
            f"  neighbor {group} route-map ALL out",
        ]
        if rr:
            lines.append(f"  neighbor {group} route-reflector-client")
    lines += ["  maximum-paths 64", "  maximum-paths ibgp 64", " exit-address-family", "exit", ""]
    return "\n".join(lines)


def _bird_id(name: str) -> str:
    return "r_" + name.replace("-", "_")


def _prefix_set(nets: tuple[ipaddress.IPv4Network, ...] | list[ipaddress.IPv4Network]) -> str:
    return "[ " + ", ".join(f"{n}+" for n in nets) + " ]"


def _local_on(node: NodePlan, peer: ipaddress.IPv4Address | ipaddress.IPv4Network) -> str:
    for addr in node.ifaces.values():
        if addr is not None and (
            peer in addr.network
            if isinstance(peer, ipaddress.IPv4Address)
            else peer.subnet_of(addr.network)
        ):
            return str(addr.ip)
    raise AssertionError(f"{node.name}: no interface toward {peer}")


def bird(node: NodePlan, mgmt: ipaddress.IPv4Network, log_dir: Path) -> str:
    """bird.conf: device/direct/kernel protocols and one BGP protocol per neighbor or range."""
    out = [
        f'log "{log_dir / "bird.log"}" all;',
        f"router id {node.router_id};",
        "",
        "protocol device { scan time 10; }",
        'protocol direct { ipv4; interface "-eth0", "*"; }',
        "protocol kernel kern4 {",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "  merge paths on;",
        "  learn off;",
        "}",
        "",
        "filter to_peers {",
        "  if source = RTS_BGP then accept;",
        f"  if source = RTS_DEVICE && net ~ [ {mgmt}+ ] then reject;",
        f"  if source = RTS_DEVICE && net ~ [ {LAB_NET}+ ] then accept;",
        "  reject;",
        "}",
        "filter hosts_in {",
        f"  if net ~ {_prefix_set(node.accept)} then accept;" if node.accept else "",
        "  reject;",
        "}",
        "",
        "template bgp lab_peer {",
        f"  local as {node.asn};",
        "  hold time 9;",
        "  keepalive time 3;",
        "  connect delay time 1;",
        "  connect retry time 2;",
        "  error wait time 1, 10;",
        "  graceful restart on;",
        "  debug { states, events };",
        "}",
        "",
    ]
    for nb in node.neighbors:
        out += [
            f"protocol bgp {_bird_id(nb.name)} from lab_peer {{",
            f"  local {_local_on(node, nb.address)} as {node.asn};",
            f"  neighbor {nb.address} as {nb.asn};",
            "  ipv4 { import all; export filter to_peers; };",
            "}",
        ]
    for i, r in enumerate(node.ranges):
        rr = f"  rr client;\n  rr cluster id {node.router_id};" if r.rr_client else ""
        out += [
            f"protocol bgp hosts{i} from lab_peer {{",
            f"  local {_local_on(node, r.subnet)} as {node.asn};",
            f"  neighbor range {r.subnet} as {r.asn};",
            f'  dynamic name "h{i}_";',
            *([rr] if rr else []),
            "  ipv4 { import filter hosts_in; export filter to_peers; };",
            "}",
        ]
    return "\n".join(out) + "\n"


POD_POOL = "10.244.0.0/16"
ROUTE_PROTOCOL = 201


def fabricd_config(node: NodePlan, plan: Plan, run_dir: Path | None = None,
                   tls: PKI | None = None) -> dict[str, Any]:  # fmt: skip
    """The agent's config for a host: who it is, where etcd is (https and the client's
    certificate files with ``tls``), where it keeps its state.

    Whom it peers with is not here: that is datastore state (``fabric_resources``).
    """
    addr = node.address
    ifaces = [str(v) for k, v in sorted(node.ifaces.items()) if v is not None]
    main = next((str(v) for v in node.ifaces.values() if v is not None and v.ip == addr), None)
    run = run_dir or Path("/run/fabric")
    cfg: dict[str, Any] = {
        "nodeName": node.name,
        "addresses": {"ipv4": main or (f"{addr}/32" if addr else None)},
        "interfaces": [i for i in ifaces if i != main],
        "labels": dict(node.labels),
        "etcd": {
            "endpoints": [f"{'https' if tls else 'http'}://{e}" for e in plan.etcd_endpoints],
            "prefix": ETCD_PREFIX,
        },
        "health": {"listen": "127.0.0.1:9099"},
        "routes": {"protocol": ROUTE_PROTOCOL},
        "bgp": {"gracefulRestartTime": 120},
        "cni": {"socket": str(run / "cni.sock"), "stateDir": str(run / "state")},
        "runDir": str(run),
        "leaseTTL": 15,
        "log": {"level": "info"},
    }
    if tls is not None:
        cfg["etcd"].update(caFile=str(tls.ca), certFile=str(tls.client_cert),
                           keyFile=str(tls.client_key))  # fmt: skip
    if node.asn is not None:
        cfg["asNumber"] = node.asn
    return cfg


def fabricd_yaml(node: NodePlan, plan: Plan, run_dir: Path | None = None,
                 tls: PKI | None = None) -> str:  # fmt: skip
    return yaml.safe_dump(fabricd_config(node, plan, run_dir, tls), sort_keys=False)


def fabric_resources(plan: Plan, pool: str = POD_POOL) -> list[dict[str, Any]]:
    """Datastore resources that make the lab a fabric: the BGP configuration (full mesh
    only when no host has a router to peer with), one node-scoped BGPPeer per host-router
    adjacency (the router's address on the link, its AS) and one IP pool."""
    hosts = [n for n in plan.nodes.values() if n.role == Role.NODE]
    routed = any(n.neighbors and plan.nodes[n.neighbors[0].name].role.is_router for n in hosts)
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "fabric/v1",
            "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"nodeToNodeMeshEnabled": not routed, "asNumber": 64512},
        },
        {
            "apiVersion": "fabric/v1",
            "kind": "IPPool",
            "metadata": {"name": "pods"},
            "spec": {"cidr": pool, "blockSize": 26, "natOutgoing": False},
        },
    ]
    for n in hosts:
        for nb in n.neighbors:
            if not plan.nodes[nb.name].role.is_router:
                continue
            docs.append(
                {
                    "apiVersion": "fabric/v1",
                    "kind": "BGPPeer",
                    "metadata": {"name": f"{n.name}-{nb.name}"},
                    "spec": {
                        "node": n.name,
                        "peerIP": str(nb.address),
                        "asNumber": nb.asn,
                        "holdTime": 9,
                        "keepaliveTime": 3,
                        # hosts of one rack share an AS: their routes to each other come
                        # back through the ToR with that AS in the path
                        "numAllowedLocalASNumbers": 1,
                    },
                }
            )
    return docs
