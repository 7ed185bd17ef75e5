"""Export a topology for a real containerlab deployment on a Docker host.

``export(topo, out)`` writes each node's rendered configs under ``out/<node>/`` and a
``<name>.clab.yml`` that binds them into the containers and adds the lab's addresses
and routes as ``exec`` commands, so the same plan runs under containerlab. Untested
here (no container engine on the lab machine); see docs/lab.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lab import render
from lab.plan import Plan, build
from lab.topology import Role, Topology

FRR_DAEMONS = 'zebra=yes\nbgpd=yes\nvtysh_enable=yes\nzebra_options="-A 127.0.0.1"\n'


def _exec(plan: Plan, name: str) -> list[str]:
    node = plan.nodes[name]
    cmds = [f"ip addr add {a} dev {i}" for i, a in node.ifaces.items() if a is not None]
    if node.loopback is not None:
        cmds.append(f"ip addr add {node.loopback}/32 dev lo")
    if node.default_via:
        hops = " ".join(f"nexthop via {g}" for g in node.default_via)
        cmds.append(f"ip route replace default {hops}")
    if node.role.is_router or node.role == Role.NODE:
        cmds.append("sysctl -w net.ipv4.ip_forward=1")
    return cmds


def export(topo: Topology, out: Path) -> Path:
    """Write configs and a deployable containerlab file into ``out``; returns the file."""
    plan = build(topo)
    doc: dict[str, Any] = copy.deepcopy(dict(topo.raw))
    nodes = doc["topology"]["nodes"]
    for name, node in plan.nodes.items():
        d = (out / name).resolve()
        d.mkdir(parents=True, exist_ok=True)
        spec = nodes[name] if nodes[name] is not None else {}
        nodes[name] = spec
        binds = list(spec.get("binds", []))
        if node.role == Role.FRR:
            log = Path("/var/log/frr")
            (d / "frr.conf").write_text(render.frr_bgpd(node, topo.mgmt_subnet, log))
            (d / "daemons").write_text(FRR_DAEMONS)
            binds += [f"{d}/frr.conf:/etc/frr/frr.conf", f"{d}/daemons:/etc/frr/daemons"]
        elif node.role == Role.BIRD:
            (d / "bird.conf").write_text(render.bird(node, topo.mgmt_subnet, Path("/var/log")))
            binds.append(f"{d}/bird.conf:/etc/bird/bird.conf")
        elif node.role == Role.NODE:
            (d / "fabricd.yaml").write_text(render.fabricd_yaml(node, plan))
            binds.append(f"{d}/fabricd.yaml:/etc/fabric/fabricd.yaml")
        if node.mgmt is not None:
            spec["mgmt-ipv4"] = str(node.mgmt.ip)
        if binds:
            spec["binds"] = binds
        cmds = _exec(plan, name)
        if cmds:
            spec["exec"] = [*spec.get("exec", []), *cmds]
    path = out / f"{topo.name}.clab.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
