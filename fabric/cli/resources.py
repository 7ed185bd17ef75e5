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

    Kinds: IPPool, IPReservation, IPAMConfig, Node, BGPPeer, BGPConfiguration, and
    NetworkPolicy, Namespace, Pod (Kubernetes documents; `kind: List` of them too, so
    `kubectl get namespaces,pods,networkpolicies -A -o yaml` applies as it is). Every
    document is validated before anything is written.
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
@click.option("-n", "--namespace", help="Namespace of networkpolicy/pod (default: default).")
@click.option("-A", "--all-namespaces", "all_ns", is_flag=True, help="Every namespace.")
@output_option
@click.pass_context
def get_cmd(ctx: click.Context, kind: str, name: str | None, namespace: str | None,
            all_ns: bool, fmt: str) -> None:  # fmt: skip
    """Show resources of KIND, or the one NAME.

    KIND: ippool, ipreservation, ipamconfig, node, bgppeer, bgpconfiguration,
    networkpolicy (netpol), namespace (ns), pod (po). NAME of a pod or policy may be NS/NAME.

    `get KIND -o yaml` prints documents that `apply -f` accepts.
    """
    from fabric.resources import documents as ry

    k = ry.kind_of(kind)
    ns = None if all_ns and name is None else namespace or "default"
    ctx.meta[RESOURCE] = f"{k} {name}" if name else k
    docs = run(ctx, lambda s: ry.get(s.res, k, name, ns))
    emit_resources(k, docs, fmt, single=name is not None or k in ry.SINGLETONS)


@click.command("delete", cls=Command)
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-f", "--filename", "path", metavar="FILE",
              help='Delete the resources named in this YAML file ("-" for stdin).')  # fmt: skip
@click.option("-n", "--namespace", help="Namespace of networkpolicy/pod (default: default).")
@click.pass_context
def delete_cmd(ctx: click.Context, kind: str | None, name: str | None, path: str | None,
               namespace: str | None) -> None:  # fmt: skip
    """Delete resource NAME of KIND, or those of -f FILE (an IPPool in use is refused: see
    `pool delete --force`)."""
    if path is not None:
        if kind or name:
            raise click.UsageError("give KIND NAME or -f FILE, not both")
        from fabric.cli.policy import delete_file

        delete_file(ctx, path)
        return
    if not kind or not name:
        raise click.UsageError("KIND and NAME are required (or -f FILE)")
    from fabric.resources import documents as ry

    k = ry.kind_of(kind)
    ctx.meta[RESOURCE] = f"{k} {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, k, name, progress, namespace)))


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
