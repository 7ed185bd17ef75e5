"""``fabricctl apply|get|delete`` of YAML resources, and ``fabricctl node list|delete``.

The codecs (fabric.resources.documents, which load the etcd and BGP models) are imported
where a command runs, so each command's --help stays fast.
"""

from __future__ import annotations

import click

from fabric.cli.common import (
    RESOURCE,
    Command,
    LazyGroup,
    Services,
    emit_resources,
    output_option,
    progress,
    read_input,
    run,
)


@click.command("apply", cls=Command)
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
    from fabric.resources import documents as ry

    docs = ry.parse_documents(read_input(path, "resources"), "stdin" if path == "-" else path)
    for d in docs:
        ry.check(d)

    async def apply_all(s: Services) -> None:
        for d in docs:
            ctx.meta[RESOURCE] = d.resource
            click.echo(f"{d.resource} {await ry.apply(s.res, d)}")

    run(ctx, apply_all)


@click.command("get", cls=Command)
@click.argument("kind")
@click.argument("name", required=False)
@output_option
@click.pass_context
def get_cmd(ctx: click.Context, kind: str, name: str | None, fmt: str) -> None:
    """Show resources of KIND, or the one NAME.

    KIND: ippool, ipreservation, ipamconfig, node, bgppeer, bgpconfiguration.

    `get KIND -o yaml` prints documents that `apply -f` accepts.
    """
    from fabric.resources import documents as ry

    k = ry.kind_of(kind)
    ctx.meta[RESOURCE] = f"{k} {name}" if name else k
    docs = run(ctx, lambda s: ry.get(s.res, k, name))
    emit_resources(k, docs, fmt, single=name is not None or k in ry.SINGLETONS)


@click.command("delete", cls=Command)
@click.argument("kind")
@click.argument("name")
@click.pass_context
def delete_cmd(ctx: click.Context, kind: str, name: str) -> None:
    """Delete resource NAME of KIND (an IPPool in use is refused: see `pool delete --force`)."""
    from fabric.resources import documents as ry

    k = ry.kind_of(kind)
    ctx.meta[RESOURCE] = f"{k} {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, k, name, progress)))


@click.group(
    cls=LazyGroup,
    lazy={
        "show": (
            "fabric.cli.bgp:node_show",
            "Show node NAME: addresses, AS, labels, route reflector cluster, BGP status summary.",
        ),
        "label": (
            "fabric.cli.bgp:node_label",
            "Set (KEY=VALUE) or remove (KEY-) labels of node NAME, as `kubectl label`.",
        ),
    },
)
def node() -> None:
    """Nodes known to the fabric."""


@node.command("list")
@output_option
@click.pass_context
def node_list(ctx: click.Context, fmt: str) -> None:
    """List nodes."""
    from fabric.resources import documents as ry

    docs = run(ctx, lambda s: ry.get(s.res, ry.NODE, None))
    emit_resources(ry.NODE, docs, fmt, single=False)


@node.command("delete")
@click.argument("name")
@click.pass_context
def node_delete(ctx: click.Context, name: str) -> None:
    """Delete node NAME after releasing its addresses and blocks (and its BGP status)."""
    from fabric.resources import documents as ry

    ctx.meta[RESOURCE] = f"Node {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, ry.NODE, name, progress)))
