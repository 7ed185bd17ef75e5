"""``fabricctl pool``: IP pools, the ranges blocks are cut from.

Loaded only when a pool command runs; the etcd stack is imported inside the commands, so
``fabricctl pool list --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from fabric.cli.common import (
    RESOURCE,
    Group,
    Services,
    emit,
    emit_resources,
    output_option,
    progress,
    run,
    usage_json,
)
from fabric.cli.output import percent, properties, table

if TYPE_CHECKING:
    from ipam.gc import PoolUsage
    from ipam.pool import Pool


@click.group(cls=Group)
def pool() -> None:
    """IP pools: the ranges blocks are cut from."""


@pool.command("add")
@click.argument("name")
@click.option("--cidr", required=True, help="The pool's range, e.g. 10.244.0.0/16.")
@click.option("--block-size", type=int, help="Prefix length of its blocks (default 26 / 122).")
@click.option("--nat-outgoing", is_flag=True, help="Masquerade traffic leaving the pools.")
@click.option(
    "--node-selector",
    default="all()",
    show_default=True,
    help="Label selector of the nodes that may use the pool.",
)
@click.option("--disabled", is_flag=True, help="Create it disabled (no new allocations).")
@click.option("--disable-bgp-export", is_flag=True, help="Do not announce its blocks over BGP.")
@click.pass_context
def pool_add(ctx: click.Context, name: str, cidr: str, block_size: int | None,
             nat_outgoing: bool, node_selector: str, disabled: bool,
             disable_bgp_export: bool) -> None:  # fmt: skip
    """Create IP pool NAME (refused if it overlaps another pool)."""
    ctx.meta[RESOURCE] = f"IPPool {name}"
    spec: dict[str, Any] = {"cidr": cidr, "natOutgoing": nat_outgoing, "disabled": disabled,
                            "nodeSelector": node_selector, "disableBGPExport": disable_bgp_export}  # fmt: skip
    if block_size is not None:
        spec["blockSize"] = block_size
    from ipam.pool import Pool

    new = Pool.from_spec(name, spec)
    run(ctx, lambda s: s.res.create_pool(new))
    click.echo(f"IPPool {name} created ({new.cidr}, /{new.block_size} blocks)")


@pool.command("list")
@output_option
@click.pass_context
def pool_list(ctx: click.Context, fmt: str) -> None:
    """List IP pools."""
    from fabric.resources import documents as ry

    docs = run(ctx, lambda s: ry.get(s.res, ry.IPPOOL, None))
    emit_resources(ry.IPPOOL, docs, fmt, single=False)


@pool.command("show")
@click.argument("name")
@output_option
@click.pass_context
def pool_show(ctx: click.Context, name: str, fmt: str) -> None:
    """Show IP pool NAME and how much of it is in use."""
    ctx.meta[RESOURCE] = f"IPPool {name}"

    async def fetch(s: Services) -> tuple[Pool, PoolUsage | None]:
        _, p = await s.res.get_pool(name)
        usage, _ = await s.maint.usage()
        return p, next((u for u in usage if u.pool.name == name), None)

    from fabric.resources import documents as ry

    p, u = run(ctx, fetch)
    usage: dict[str, Any] = usage_json(u) if u else {"ipsTotal": p.cidr.num_addresses, "ipsInUse": 0,
                                       "ipsFree": p.cidr.num_addresses, "blocks": []}  # fmt: skip
    data = {**ry.pool_resource(p), "status": {k: v for k, v in usage.items()
                                              if k not in ("name", "cidr")}}  # fmt: skip

    def render() -> str:
        total, used = usage["ipsTotal"], usage["ipsInUse"]
        head = properties([
            ("Name", p.name), ("CIDR", p.cidr), ("Block size", p.block_size),
            ("NAT outgoing", p.nat_outgoing), ("Disabled", p.disabled),
            ("Disable BGP export", p.disable_bgp_export), ("Node selector", p.node_selector),
            ("IPs total", total), ("IPs in use", percent(used, total)),
            ("IPs free", percent(total - used, total)), ("Blocks", len(usage["blocks"]))])  # fmt: skip
        if not usage["blocks"]:
            return head
        rows = [[b["cidr"], b["node"] or "", b["state"], b["ipsTotal"],
                 percent(b["ipsInUse"], b["ipsTotal"]), percent(b["ipsFree"], b["ipsTotal"])]
                for b in usage["blocks"]]  # fmt: skip
        return (
            head
            + "\n\n"
            + table(["BLOCK", "NODE", "STATE", "IPS TOTAL", "IPS IN USE", "IPS FREE"], rows)
        )

    emit(data, fmt, render)


def _set_disabled(ctx: click.Context, name: str, disabled: bool) -> None:
    ctx.meta[RESOURCE] = f"IPPool {name}"
    run(ctx, lambda s: s.res.set_pool_disabled(name, disabled))
    click.echo(f"IPPool {name} {'disabled' if disabled else 'enabled'}")


@pool.command("enable")
@click.argument("name")
@click.pass_context
def pool_enable(ctx: click.Context, name: str) -> None:
    """Allow new allocations from IP pool NAME."""
    _set_disabled(ctx, name, False)


@pool.command("disable")
@click.argument("name")
@click.pass_context
def pool_disable(ctx: click.Context, name: str) -> None:
    """Stop new allocations from IP pool NAME (addresses in use are kept)."""
    _set_disabled(ctx, name, True)


@pool.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Release the pool's addresses in use first.")
@click.pass_context
def pool_delete(ctx: click.Context, name: str, force: bool) -> None:
    """Delete IP pool NAME; refused while addresses are in use unless --force."""
    ctx.meta[RESOURCE] = f"IPPool {name}"
    if force:
        progress(f"Deleting IPPool {name}: releasing its addresses and blocks...")
    released = run(ctx, lambda s: s.maint.delete_pool(name, force))
    click.echo(f"IPPool {name} deleted" + (f" (released {released} addresses)" if force else ""))
