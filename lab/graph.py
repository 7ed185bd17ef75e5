"""A picture of a running lab from live data: every node, every wire, every BGP session
coloured by its state, and each host's blocks. Written as Graphviz DOT and rendered to
SVG and PNG with ``dot`` (Debian's graphviz).

Sources: the lab plan (nodes, wires, addresses), the routers' own session tables (FRR
``show bgp summary``, BIRD ``show protocols``) for router-router sessions, and the status
document each fabricd publishes (``fabricctl bgp status -o json``) for host sessions and
blocks. ``collect`` gathers, ``render_dot`` is pure, ``write`` runs ``dot``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.runner import Lab
from lab.topology import Role

COLOURS = {"up": "#2e9d44", "connected": "#e08a00", "idle": "#9a9a9a", "down": "#d43a2f"}
SHAPES = {Role.NODE: "box", Role.FRR: "ellipse", Role.BIRD: "ellipse", Role.ETCD: "cylinder",
          Role.BRIDGE: "point"}  # fmt: skip


@dataclass(slots=True)
class Picture:
    lab: str
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> role, asn, blocks
    wires: list[tuple[str, str]] = field(default_factory=list)
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)  # sorted pair -> state


def _state(text: str) -> str:
    t = text.lower()
    if t in ("up", "established"):
        return "up"
    if t in ("connected", "opensent", "openconfirm", "connect"):
        return "connected"
    if t in ("idle", "start", "passive"):
        return "idle"
    return "down"


def _worse(a: str | None, b: str) -> str:
    order = ["up", "connected", "idle", "down"]
    return b if a is None else max(a, b, key=order.index)


def collect(lab: Lab) -> Picture:
    """Everything the picture shows, read from the running lab."""
    pic = Picture(lab.name)
    owner: dict[str, str] = {}
    for n in lab.plan.nodes.values():
        pic.nodes[n.name] = {"role": n.role, "asn": n.asn, "blocks": []}
        for addr in n.ifaces.values():
            if addr is not None:
                owner[str(addr.ip)] = n.name
    for w in lab.plan.wires:
        a = w.a_ns.removeprefix(lab.plan.prefix)
        b = w.b_ns.removeprefix(lab.plan.prefix)
        if lab.plan.mgmt_ns in (w.a_ns, w.b_ns):
            continue
        pic.wires.append((a, b))

    def add(x: str, y: str, state: str) -> None:
        key = (min(x, y), max(x, y))
        pic.sessions[key] = _worse(pic.sessions.get(key), state)

    for r in lab.nodes(Role.FRR) + lab.nodes(Role.BIRD):
        for peer, state in lab.bgp_sessions(r).items():
            if peer in pic.nodes and pic.nodes[peer]["role"] != Role.NODE:
                add(r, peer, _state(state))
    hosts = lab.nodes(Role.NODE)
    docs: list[dict[str, Any]] = []
    res = lab.fabricctl(["bgp", "status", "-o", "json"])
    if res.returncode == 0:
        try:
            docs = list(json.loads(res.stdout))
        except ValueError:
            docs = []
    seen = set()
    for doc in docs:
        name = doc.get("node", "")
        if name not in pic.nodes:
            continue
        seen.add(name)
        routes = doc.get("routes", {}).get("items", [])
        pic.nodes[name]["blocks"] = [r["dst"] for r in routes if r.get("type") == "blackhole"]
        for s in doc.get("sessions", []):
            far = owner.get(s.get("peerIP", ""))
            if far is not None:
                add(name, far, _state(str(s.get("state", "down"))))
    for h in hosts:
        if h not in seen:  # no fabricd status: its sessions are down as far as we know
            pic.nodes[h]["down"] = True
            for nb in lab.node(h).neighbors:
                add(h, nb.name, "down")
    return pic


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(pic: Picture) -> str:
    """The picture as Graphviz DOT (pure)."""
    out = [
        f"graph {_q(pic.lab)} {{",
        '  graph [rankdir=TB, fontname="Helvetica", labelloc=t, '
        f"label={_q(f'lab {pic.lab}: BGP sessions and blocks')}];",
        '  node [fontname="Helvetica", fontsize=10, style=filled, fillcolor="#f4f6f8"];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for name, n in pic.nodes.items():
        role = n["role"]
        if role == Role.ETCD:
            continue
        lines = [name]
        if n.get("asn"):
            lines.append(f"AS {n['asn']}")
        lines += list(n.get("blocks", []))
        if n.get("down"):
            lines.append("fabricd not running")
        label = "\\n".join(lines)
        shape = SHAPES.get(role, "box")
        colour = "#fde2e0" if n.get("down") else "#e6f0fb" if role == Role.NODE else "#f4f6f8"
        out.append(f'  {_q(name)} [shape={shape}, label="{label}", fillcolor="{colour}"];')
    for a, b in pic.wires:
        if "etcd" in (a, b):
            continue
        out.append(f'  {_q(a)} -- {_q(b)} [color="#c0c4c8", penwidth=4];')
    for (a, b), state in sorted(pic.sessions.items()):
        colour = COLOURS.get(state, COLOURS["down"])
        out.append(
            f'  {_q(a)} -- {_q(b)} [color="{colour}", style=dashed, penwidth=2, '
            f'label="BGP {state}", fontcolor="{colour}", constraint=false];'
        )
    hosts = [n for n, d in pic.nodes.items() if d["role"] == Role.NODE]
    near = {b if a in hosts else a for a, b in pic.wires if (a in hosts) != (b in hosts)}
    routers = [n for n, d in pic.nodes.items() if d["role"] in (Role.FRR, Role.BIRD)]
    for rank, members in (("min", [r for r in routers if r not in near]),
                          ("same", [r for r in routers if r in near]), ("max", hosts)):  # fmt: skip
        if members:
            out.append(f"  {{rank={rank}; {' '.join(_q(m) for m in members)}}}")
    out.append('  legend [shape=plaintext, fillcolor=white, label="wire: grey   BGP: green up, '
               'orange connecting, grey idle, red down"];')  # fmt: skip
    out.append("}")
    return "\n".join(out) + "\n"


def write(lab: Lab, out_dir: Path) -> list[Path]:
    """Collect, render and write ``<lab>.dot``, ``.svg`` and ``.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dot_text = render_dot(collect(lab))
    base = out_dir / f"topology-{lab.name}"
    paths = [base.with_suffix(".dot")]
    paths[0].write_text(dot_text)
    dot = shutil.which("dot")
    if dot is None:
        return paths
    for fmt in ("svg", "png"):
        p = base.with_suffix(f".{fmt}")
        subprocess.run([dot, f"-T{fmt}", "-o", str(p), str(paths[0])], check=True, timeout=60)
        paths.append(p)
    return paths
