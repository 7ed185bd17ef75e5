"""fabricctl explain: why can (or can't) SRC reach DST, hop by hop, layer by layer.

The command reads etcd and the status documents of the two nodes involved (two round
trips), and with ``--live`` asks the local fabricd for the kernel's own route lookups; the
walk itself is :mod:`fabric.explain.walk`. Exit codes: 0 reachable, 4 blocked, 1 user
error, 2 etcd unreachable.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click

from fabric import errors
from fabric.cli.common import Command, Services, emit, output_option, run
from fabric.errors import CLIError

if TYPE_CHECKING:
    from fabric.explain.evidence import Endpoint, Snapshot
    from fabric.explain.walk import Report

PROTOCOLS = ("TCP", "UDP", "SCTP")


def parse_port(text: str | None) -> tuple[int | None, str | None]:
    """``80/TCP``, ``53/udp`` or ``80`` (TCP) as (port, protocol); None for no text."""
    if text is None:
        return None, None
    m = re.fullmatch(r"(\d{1,5})(?:/([A-Za-z]+))?", text.strip())
    proto = (m.group(2) or "TCP").upper() if m else ""
    if m is None or not 0 < int(m.group(1)) < 65536 or proto not in PROTOCOLS:
        raise CLIError(f"{text!r} is not PORT/PROTO (a port 1-65535 and one of "
                       f"{', '.join(PROTOCOLS)}, e.g. 80/TCP)", "PORT/PROTO")  # fmt: skip
    return int(m.group(1)), proto


def _end(e: Endpoint) -> str:
    where = ", ".join(str(x) for x in (e.ip, e.node) if x is not None)
    return f"{e.label} ({where})" if where and e.label != str(e.ip) else (where or e.label)


def render(r: Report) -> str:
    from fabric.cli.output import table

    head = f"{_end(r.src)} -> {_end(r.dst)}"
    if r.port is not None:
        head += f", {r.port}/{r.protocol}"
    if r.live_node:
        head += f" (live on {r.live_node})"
    rows = [[str(h.layer), h.name, str(h.state), h.detail] for h in r.hops]
    lines = [head, "", table(["LAYER", "HOP", "STATE", "DETAIL"], rows), "", r.summary]
    b = r.blocked
    if b is not None and b.fix:
        lines.append(f"what to do: {b.fix}")
    unknown = [h for h in r.hops if str(h.state) == "unknown"]
    if b is None and unknown:
        lines.append(f"({len(unknown)} hop(s) could not be checked: see above)")
    return "\n".join(lines)


@click.command("explain", cls=Command)
@click.argument("src")
@click.argument("dst")
@click.argument("port_proto", required=False, metavar="[PORT/PROTO]")
@click.option("--live", is_flag=True,
              help="Also ask this node's kernel (through the local fabricd) for its routes: "
              "run it on SRC's or DST's node.")  # fmt: skip
@click.option("--health-listen", envvar="FABRIC_HEALTH_LISTEN", default="127.0.0.1:9099",
              show_default=True, metavar="HOST:PORT",
              help="The local fabricd's health listener, for --live (env FABRIC_HEALTH_LISTEN).")  # fmt: skip
@output_option
@click.pass_context
def explain(ctx: click.Context, src: str, dst: str, port_proto: str | None, live: bool,
            health_listen: str, fmt: str) -> None:  # fmt: skip
    """Why can (or can't) SRC reach DST: each hop with its state and the evidence read.

    SRC and DST: NAMESPACE/POD, an IP address, or a node name. Layers, in path order:
    ipam (each end's allocation and its block's affinity), node (registered, fabricd and
    its BGP speaker running), announcement (the block announced, sessions established,
    learned by the other node, both ways), forwarding (the routes each node installed;
    with --live, the kernel's own lookup on this node), policy (the egress verdict on the
    source's node and the ingress verdict on the destination's node for PORT/PROTO, from
    the compiler that programs nftables). The walk stops at the first broken hop and says
    what to do.

    Exit codes: 0 reachable, 4 blocked, 1 user error, 2 etcd unreachable.
    """
    import asyncio

    from fabric.explain import evidence
    from fabric.explain.policy import Checker, Inputs
    from fabric.explain.walk import walk
    from fabric.resources.policy_store import PolicyStore

    port, proto = parse_port(port_proto)

    async def gather(s: Services) -> tuple[Snapshot, Inputs, Endpoint, Endpoint]:
        snap, (pols, nss, pods, _) = await asyncio.gather(
            evidence.read(s.store), PolicyStore(s.store).snapshot()
        )
        a, b = evidence.resolve(snap, src, "SRC"), evidence.resolve(snap, dst, "DST")
        a, b = evidence.same_family(a, b, snap)
        await evidence.read_statuses(s.store, snap, {n for n in (a.node, b.node) if n})
        return snap, Inputs(pols, nss, pods), a, b

    snap, inputs, a, b = run(ctx, gather)
    answers = None
    if live:
        from fabric.explain.live import lookup

        answers = lookup(health_listen, [str(ip) for ip in (b.ip, a.ip) if ip is not None])
        if answers.node not in (a.node, b.node):
            raise CLIError(f"this is node {answers.node}: run --live on {a.node or b.node} "
                           "(the source's or the destination's node)", "--live")  # fmt: skip
    report = walk(snap, a, b, port, proto, answers, Checker(snap, inputs, port, proto))
    emit(report.to_json(), fmt, lambda: render(report))
    ctx.exit(errors.EXIT_BLOCKED if report.blocked is not None else errors.EXIT_OK)
