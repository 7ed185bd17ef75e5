"""fabricctl: pools, IPAM, BGP and YAML resources against the fabric's etcd.

Every command builds one Store for its run (short deadline, so an unreachable etcd is exit 2
within seconds), runs one coroutine with asyncio.run and closes the store. Errors become one
line on stderr and an exit code, both decided in fabric.errors. Shared plumbing lives in
fabric.cli.common; the ipam group in fabric.cli.ipam; peers, bgp, routes and node show/label
in fabric.cli.bgp.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import click

from fabric import unit as systemd_unit
from fabric.cli.bgp import bgp, node_label, node_show, peer, routes
from fabric.cli.cni import cni
from fabric.cli.common import (
    DEFAULT_ENDPOINTS,
    DEFAULT_TIMEOUT,
    RESOURCE,
    Group,
    Services,
    Settings,
    emit,
    emit_resources,
    output_option,
    progress,
    read_input,
    run,
    usage_json,
)
from fabric.cli.explain import explain
from fabric.cli.ipam import ipam
from fabric.cli.lab import lab
from fabric.cli.output import (
    percent,
    properties,
    table,
)
from fabric.errors import CLIError
from fabric.resources import documents as ry
from ipam.gc import PoolUsage
from ipam.pool import Pool
from ipam.store import DEFAULT_PREFIX, TLSConfig

# the group -----------------------------------------------------------------------------------


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--etcd-endpoints",
    envvar="FABRIC_ETCD_ENDPOINTS",
    default=DEFAULT_ENDPOINTS,
    show_default=True,
    help="etcd endpoints, comma separated (env FABRIC_ETCD_ENDPOINTS).",
)
@click.option(
    "--etcd-cacert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate for etcd TLS.",
)
@click.option(
    "--etcd-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Client certificate for etcd TLS.",
)
@click.option(
    "--etcd-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Client key for etcd TLS.",
)
@click.option(
    "--prefix",
    envvar="FABRIC_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Key prefix of the fabric's data in etcd (env FABRIC_PREFIX).",
)
@click.option(
    "--timeout",
    envvar="FABRIC_TIMEOUT",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to keep trying etcd before giving up (exit 2).",
)
@click.pass_context
def main(ctx: click.Context, etcd_endpoints: str, etcd_cacert: Path | None,
         etcd_cert: Path | None, etcd_key: Path | None, prefix: str, timeout: float) -> None:  # fmt: skip
    """Manage the fabric's IP pools, IPAM data, BGP peers and configuration in etcd.

    Exit codes: 0 ok, 1 user error, 2 etcd unreachable, 3 `ipam check` found problems,
    4 `explain` found the path blocked.
    """
    endpoints = tuple(e.strip() for e in etcd_endpoints.split(",") if e.strip())
    if not endpoints:
        raise click.BadParameter("at least one endpoint is required", param_hint="--etcd-endpoints")
    tls = None
    if etcd_cacert or etcd_cert or etcd_key or any(e.startswith("https://") for e in endpoints):
        tls = TLSConfig(etcd_cacert, etcd_cert, etcd_key)
    ctx.obj = Settings(endpoints, prefix, tls, timeout)


# pool ----------------------------------------------------------------------------------------


@main.group()
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
    new = Pool.from_spec(name, spec)
    run(ctx, lambda s: s.res.create_pool(new))
    click.echo(f"IPPool {name} created ({new.cidr}, /{new.block_size} blocks)")


@pool.command("list")
@output_option
@click.pass_context
def pool_list(ctx: click.Context, fmt: str) -> None:
    """List IP pools."""
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


# resources -----------------------------------------------------------------------------------


@main.command("apply")
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    metavar="FILE",
    help='YAML file with one or more resources ("-" for stdin).',
)
@click.pass_context
def apply_cmd(ctx: click.Context, path: str) -> None:
    """Create or update resources from YAML.

    Kinds: IPPool, IPReservation, IPAMConfig, Node, BGPPeer, BGPConfiguration.
    """
    docs = ry.parse_documents(read_input(path, "resources"), "stdin" if path == "-" else path)
    for d in docs:
        ry.check(d)

    async def apply_all(s: Services) -> None:
        for d in docs:
            ctx.meta[RESOURCE] = d.resource
            click.echo(f"{d.resource} {await ry.apply(s.res, d)}")

    run(ctx, apply_all)


@main.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@output_option
@click.pass_context
def get_cmd(ctx: click.Context, kind: str, name: str | None, fmt: str) -> None:
    """Show resources of KIND, or the one NAME.

    KIND: ippool, ipreservation, ipamconfig, node, bgppeer, bgpconfiguration.

    `get KIND -o yaml` prints documents that `apply -f` accepts.
    """
    k = ry.kind_of(kind)
    ctx.meta[RESOURCE] = f"{k} {name}" if name else k
    docs = run(ctx, lambda s: ry.get(s.res, k, name))
    emit_resources(k, docs, fmt, single=name is not None or k in ry.SINGLETONS)


@main.command("delete")
@click.argument("kind")
@click.argument("name")
@click.pass_context
def delete_cmd(ctx: click.Context, kind: str, name: str) -> None:
    """Delete resource NAME of KIND (an IPPool in use is refused: see `pool delete --force`)."""
    k = ry.kind_of(kind)
    ctx.meta[RESOURCE] = f"{k} {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, k, name, progress)))


# node ----------------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """Nodes known to the fabric."""


@node.command("list")
@output_option
@click.pass_context
def node_list(ctx: click.Context, fmt: str) -> None:
    """List nodes."""
    docs = run(ctx, lambda s: ry.get(s.res, ry.NODE, None))
    emit_resources(ry.NODE, docs, fmt, single=False)


@node.command("delete")
@click.argument("name")
@click.pass_context
def node_delete(ctx: click.Context, name: str) -> None:
    """Delete node NAME after releasing its addresses and blocks (and its BGP status)."""
    ctx.meta[RESOURCE] = f"Node {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, ry.NODE, name, progress)))


node.add_command(node_show)
node.add_command(node_label)


# install-unit --------------------------------------------------------------------------------


@main.command("install-unit")
@click.option("--dest", default="/etc/systemd/system", show_default=True, metavar="DIR",
              help=f'Directory to write {systemd_unit.UNIT_NAME} into ("-": print the unit).')  # fmt: skip
@click.option("--config", "config_path", default=systemd_unit.DEFAULT_CONFIG, show_default=True,
              help="fabricd's configuration file, as the unit passes it.")  # fmt: skip
@click.option("--fabricd", "fabricd_path", metavar="PATH",
              help="The fabricd executable (default: the one beside fabricctl).")  # fmt: skip
def install_unit(dest: str, config_path: str, fabricd_path: str | None) -> None:
    """Write the systemd unit fabricd.service (then `systemctl daemon-reload` and
    `systemctl enable --now fabricd`)."""
    beside = Path(sys.executable).parent / "fabricd"
    exe = fabricd_path or (str(beside) if beside.exists() else shutil.which("fabricd"))
    if not exe:
        raise CLIError(
            "fabricd not found: pass its absolute path", systemd_unit.UNIT_NAME, "--fabricd"
        )
    for option, paths in (("--config", (config_path, systemd_unit.DEFAULT_FABRICD)),
                          ("--fabricd", (systemd_unit.DEFAULT_CONFIG, exe))):  # fmt: skip
        try:
            systemd_unit.unit_text(*paths)
        except ValueError as e:
            raise CLIError(str(e), systemd_unit.UNIT_NAME, option) from e
    if dest == "-":
        click.echo(systemd_unit.unit_text(config_path, exe), nl=False)
        return
    try:
        path = systemd_unit.install_unit(Path(dest), config_path, exe)
    except OSError as e:
        raise CLIError(
            f"cannot write the unit: {e.strerror}", str(Path(dest) / systemd_unit.UNIT_NAME)
        ) from e
    click.echo(f"Wrote {path}; run: systemctl daemon-reload && systemctl enable --now fabricd")


main.add_command(ipam)
main.add_command(peer)
main.add_command(bgp)
main.add_command(routes)
main.add_command(cni)
main.add_command(lab)
main.add_command(explain)
