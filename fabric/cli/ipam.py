"""fabricctl ipam: usage, integrity checks, release, garbage collection, configuration."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from fabric import errors
from fabric.cli.common import (
    RESOURCE,
    Group,
    Services,
    emit,
    output_option,
    progress,
    read_json,
    run,
    usage_json,
)
from fabric.cli.output import (
    boxed,
    percent,
)
from fabric.errors import CLIError
from ipam.errors import StaleError, ValidationError
from ipam.gc import CheckReport, PoolUsage
from ipam.pool import IPAMConfig, parse_ip

# ipam ----------------------------------------------------------------------------------------


@click.group(cls=Group)
def ipam() -> None:
    """IP address management: usage, integrity checks, release, garbage collection."""


@ipam.command("show")
@click.option("--show-blocks", is_flag=True, help="Also show every block of each pool.")
@click.option(
    "--show-borrowed", is_flag=True, help="Show addresses borrowed from other nodes' blocks."
)
@click.option("--ip", "ip_text", metavar="IP", help="Show who holds this address.")
@click.option("--show-configuration", is_flag=True, help="Show the IPAM configuration.")
@output_option
@click.pass_context
def ipam_show(ctx: click.Context, show_blocks: bool, show_borrowed: bool, ip_text: str | None,
              show_configuration: bool, fmt: str) -> None:  # fmt: skip
    """Show IP usage per pool (and block), borrowed addresses, one address, or the config."""
    if ip_text is not None:
        _show_ip(ctx, ip_text, fmt)
    elif show_configuration:
        _show_config(run(ctx, lambda s: s.res.get_config()), fmt)
    else:
        _show_usage(ctx, show_blocks, show_borrowed, fmt)


def _show_usage(ctx: click.Context, show_blocks: bool, show_borrowed: bool, fmt: str) -> None:
    async def fetch(s: Services) -> tuple[list[PoolUsage], list[dict[str, str]]]:
        usage, borrowed = await s.maint.usage()
        rows = []
        for b in borrowed if show_borrowed else ():
            found = await s.maint.lookup(ipaddress.ip_address(b.ip))
            owner = found[1].owner(found[2]) if found else None
            attrs = dict(owner.secondary) if owner else {}
            pod = attrs.get("pod")
            rows.append({"ip": b.ip, "borrowingNode": b.borrowing_node, "block": b.block,
                         "blockOwner": b.block_owner, "type": attrs.get("type", "pod" if pod else ""),
                         "allocatedTo": f"{attrs.get('namespace', '')}/{pod}" if pod else b.handle,
                         "handle": b.handle})  # fmt: skip
        return usage, rows

    usage, borrowed = run(ctx, fetch)
    data: dict[str, Any] = {}
    if show_blocks or not show_borrowed:
        data["pools"] = [usage_json(u) for u in usage]
        if not show_blocks:
            for p in data["pools"]:
                del p["blocks"]
    if show_borrowed:
        data["borrowed"] = borrowed

    def render() -> str:
        parts = []
        if "pools" in data:
            rows: list[list[object]] = []
            for u in usage:
                rows.append(["IP Pool", u.pool.cidr, u.total, percent(u.in_use, u.total),
                             percent(u.total - u.in_use, u.total)])  # fmt: skip
                for b in u.blocks if show_blocks else ():
                    rows.append(["Block", b.cidr, b.total, percent(b.in_use, b.total),
                                 percent(b.total - b.in_use, b.total)])  # fmt: skip
            parts.append(boxed(["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
                               rows, right=(2,)))  # fmt: skip
        if show_borrowed:
            parts.append(boxed(
                ["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"],
                [[b["ip"], b["borrowingNode"], b["block"], b["blockOwner"], b["type"],
                  b["allocatedTo"]] for b in borrowed]))  # fmt: skip
        return "\n".join(parts)

    emit(data, fmt, render)


def _show_ip(ctx: click.Context, ip_text: str, fmt: str) -> None:
    ip = parse_ip(ip_text, "--ip")
    found = run(ctx, lambda s: s.maint.lookup(ip))
    owner = found[1].owner(found[2]) if found else None
    data: dict[str, Any] = {"ip": str(ip), "inUse": owner is not None}
    if found and owner:
        cidr, blk, o = found
        data.update(handle=owner.handle, attributes=dict(owner.secondary), block=str(cidr),
                    blockAffinity=blk.affinity, sequence=blk.seq_for.get(o))  # fmt: skip

    def render() -> str:
        if owner is None:
            return f"IP {ip} is not currently assigned"
        lines = [f"IP {ip} is in use", f"Handle: {data['handle']}", "Attributes:"]
        lines += [f"  {k}: {v}" for k, v in sorted(data["attributes"].items())]
        lines += [f"Block: {data['block']} (affinity {data['blockAffinity'] or 'none'})",
                  f"Sequence: {data['sequence']}"]  # fmt: skip
        return "\n".join(lines)

    emit(data, fmt, render)


def _show_config(cfg: IPAMConfig, fmt: str) -> None:
    data = {**cfg.to_json(), "autoAllocateBlocks": True}

    def render() -> str:
        rows: list[list[object]] = [["StrictAffinity", cfg.strict_affinity],
                ["MaxBlocksPerHost", cfg.max_blocks_per_host or "0 (no limit)"],
                ["AutoAllocateBlocks", True]]  # fmt: skip
        return boxed(["PROPERTY", "VALUE"], rows)

    emit(data, fmt, render)


_PROBLEM_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "ips_without_handle": lambda e: (
        f"IP {e.get('ip')} in block {e.get('block')} (handle "
        f"{e.get('handle')}, node {e.get('node')}) has no matching handle record"
    ),
    "handles_without_ips": lambda e: (
        f"Handle {e.get('handle')} records {e.get('expected')} IPs "
        f"in block {e.get('block')}, the block holds {e.get('found')}"
    ),
    "affinities_of_missing_nodes": lambda e: (
        f"Block {e.get('cidr')} is affine to node "
        f"{e.get('node')} ({e.get('state')}), which does not exist"
    ),
    "blocks_outside_pools": lambda e: (
        f"Block {e.get('cidr')} ({e.get('inUse')} IPs in use) is outside every IP pool"
    ),
    "stuck_affinities": lambda e: (
        f"Affinity of node {e.get('node')} for block {e.get('cidr')} "
        f"is stuck in state {e.get('state')}"
    ),
    "leaked": lambda e: (
        f"IP {e.get('ip')} (handle {e.get('handle')}) is not among the live "
        f"handles of node {e.get('node')}"
    ),
}


@ipam.command("check")
@click.option(
    "-o",
    "--output",
    "report_path",
    metavar="FILE",
    help="Write the machine-readable report (for `ipam release --from-report`).",
)
@click.option("--live-handles", "live_path", metavar="FILE",
              help='JSON {"node": ["handle", ...]}: also report allocations of those nodes '
              "whose handle is not live.")  # fmt: skip
@click.pass_context
def ipam_check(ctx: click.Context, report_path: str | None, live_path: str | None) -> None:
    """Check IPAM integrity. Exit 0 when clean, 3 when problems were found."""
    live = None
    if live_path is not None:
        live = read_json(live_path, "live handles")
        if not isinstance(live, dict) or not all(
            isinstance(v, list) and all(isinstance(h, str) for h in v) for v in live.values()
        ):
            raise CLIError('must be a JSON object {"node": ["handle", ...]}', live_path)
    click.echo("Loading all IPAM blocks...")
    rep = run(ctx, lambda s: s.maint.check(live))
    click.echo(f"Found {rep.blocks} IPAM blocks.")
    click.echo(f"Found {rep.ips_in_use} IPs in use.")
    for f in CheckReport.PROBLEM_FIELDS:
        for e in getattr(rep, f):
            click.echo(f"  {_PROBLEM_LINES[f](e)}")
    click.echo(f"Found {rep.problems} problems." if rep.problems else "No problems found.")
    if report_path is not None:
        try:
            Path(report_path).write_text(json.dumps(rep.to_json(), indent=2) + "\n")
        except OSError as e:
            raise CLIError(f"cannot write the report: {e.strerror}", report_path) from e
        click.echo(f"Report written to {report_path}.")
    if rep.problems:
        ctx.exit(errors.EXIT_PROBLEMS)


@ipam.command("release")
@click.option("--ip", "ip_text", metavar="IP", help="Release this address.")
@click.option("--sequence", type=int, help="Only if its allocation still has this sequence number.")
@click.option(
    "--from-report",
    "report_path",
    metavar="FILE",
    help="Repair everything an `ipam check -o FILE` report found.",
)
@click.pass_context
def ipam_release(ctx: click.Context, ip_text: str | None, sequence: int | None,
                 report_path: str | None) -> None:  # fmt: skip
    """Release one address (--ip) or repair what a check report found (--from-report)."""
    if (ip_text is None) == (report_path is None):
        raise click.UsageError("give exactly one of --ip or --from-report")
    if report_path is not None:
        _release_report(ctx, report_path)
        return
    assert ip_text is not None
    ip = parse_ip(ip_text, "--ip")
    released, stale = run(ctx, lambda s: s.alloc.release_ips({ip: sequence}))
    if stale:
        raise StaleError(f"IP {ip} not released: sequence number {sequence} no longer matches "
                         "(the address was reassigned since)")  # fmt: skip
    click.echo(f"Released IP {ip}" if released else f"IP {ip} is not assigned; nothing to release")


def _load_report(path: str) -> CheckReport:
    raw = read_json(path, "check report")
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        rep = CheckReport.from_json(raw)
        for e in rep.ips_without_handle + rep.leaked:
            ipaddress.ip_address(e["ip"])
            if e.get("sequence") is not None and not isinstance(e["sequence"], int):
                raise TypeError(f"sequence {e['sequence']!r} is not an integer")
        for e in rep.handles_without_ips:
            str(e["handle"])
        for e in rep.affinities_of_missing_nodes + rep.stuck_affinities:
            str(e["node"])
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(f"not a valid IPAM check report: {e}", path) from e
    return rep


def _release_report(ctx: click.Context, path: str) -> None:
    rep = _load_report(path)
    progress(f"Releasing from {path}: {len(rep.ips_without_handle) + len(rep.leaked)} IPs, "
             f"{len(rep.handles_without_ips)} handles, {len(rep.affinities_of_missing_nodes)} "
             f"affinities of missing nodes, {len(rep.stuck_affinities)} stuck affinities...")  # fmt: skip
    counts = run(ctx, lambda s: s.maint.release_from_report(rep))
    click.echo(f"Released {counts['ips']} IPs, repaired {counts['handles']} handles, "
               f"released {counts['nodes']} missing nodes, finished {counts['blocks']} blocks.")  # fmt: skip


@ipam.command("gc")
@click.option("--node", required=True, help="The node whose allocations are collected.")
@click.option(
    "--live-handles",
    "live_path",
    required=True,
    metavar="FILE",
    help='JSON list of the live handle ids on the node ("-" for stdin).',
)
@output_option
@click.pass_context
def ipam_gc(ctx: click.Context, node: str, live_path: str, fmt: str) -> None:
    """Release every allocation of NODE whose handle is not live, then its empty blocks."""
    live = read_json(live_path, "live handles")
    if not isinstance(live, list) or not all(isinstance(h, str) for h in live):
        raise CLIError("must be a JSON list of handle ids", live_path)
    progress(f"Collecting garbage on node {node} ({len(live)} live handles)...")
    result = run(ctx, lambda s: s.maint.gc_node(node, live))
    n_ips = sum(len(v) for v in result.released.values())

    def render() -> str:
        lines = [f"Released {h}: {', '.join(ips) or '(no addresses)'}"
                 for h, ips in sorted(result.released.items())]  # fmt: skip
        lines += [f"Released block {b}" for b in result.released_blocks]
        lines += [f"Finished deleting block {b}" for b in result.finished_deletions]
        lines.append(f"Released {n_ips} addresses of {len(result.released)} handles, "
                     f"{len(result.released_blocks)} blocks.")  # fmt: skip
        return "\n".join(lines)

    emit(result.to_json(), fmt, render)


@ipam.command("config")
@click.option(
    "--strict-affinity/--no-strict-affinity",
    default=None,
    help="Never borrow addresses from other nodes' blocks.",
)
@click.option("--max-blocks-per-host", type=int, help="Blocks one node may claim (0: no limit).")
@output_option
@click.pass_context
def ipam_config(ctx: click.Context, strict_affinity: bool | None,
                max_blocks_per_host: int | None, fmt: str) -> None:  # fmt: skip
    """Show the IPAM configuration, or change the settings given."""
    ctx.meta[RESOURCE] = "IPAMConfig default"

    def change(cfg: IPAMConfig) -> IPAMConfig:
        d = cfg.to_json()
        if strict_affinity is not None:
            d["strictAffinity"] = strict_affinity
        if max_blocks_per_host is not None:
            d["maxBlocksPerHost"] = max_blocks_per_host
        try:
            return IPAMConfig.from_json(d)
        except ValidationError as e:
            raise ValidationError(f"--{_dashed(e.field)}", e.problem, e.resource) from e

    async def update(s: Services) -> IPAMConfig:
        if strict_affinity is None and max_blocks_per_host is None:
            return await s.res.get_config()
        return await s.res.update_config(change)  # compare-and-swap: no lost concurrent change

    _show_config(run(ctx, update), fmt)


def _dashed(camel: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in camel)
