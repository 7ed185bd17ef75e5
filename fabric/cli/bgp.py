"""fabricctl's BGP commands: peers, the cluster BGP configuration, session status and
installed routes (from the status documents each fabricd publishes), node show and label.

Options that set a resource field are validated by the bgp model; its errors are re-raised
naming the option (``--hold-time``) instead of the field (``holdTime``).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import click

from bgp.config import BGPConfig, Peer
from bgp.errors import ValidationError
from bgp.model import DEFAULT_HOLD_TIME, DEFAULT_RESTART_TIME
from fabric.cli.common import (
    RESOURCE,
    Command,
    Group,
    Services,
    emit,
    emit_resources,
    output_option,
    run,
)
from fabric.cli.common import progress as note
from fabric.cli.output import boxed, properties, table
from fabric.cli.status_text import render_routes, render_status, since, summary
from fabric.errors import CLIError
from fabric.resources import bgp as rb
from fabric.resources import documents as ry
from fabric.resources.bgp_store import BGPStore, Status
from ipam.errors import NotFoundError
from ipam.resources import Node

_PEER_OPTIONS = {
    "peerIP": "--peer-ip", "asNumber": "--as-number", "node": "--node",
    "nodeSelector": "--node-selector", "peerSelector": "--peer-selector",
    "localASNumber": "--local-as-number", "passwordFile": "--password-file",
    "holdTime": "--hold-time", "keepaliveTime": "--keepalive-time",
    "maxRestartTime": "--max-restart-time", "maxPrefixes": "--max-prefixes",
    "required": "--required", "numAllowedLocalASNumbers": "--num-allowed-local-as",
    "passwordCredential": "--password-credential", "ttlSecurity": "--ttl-security",
    "sourceAddress": "--source-address",
}  # fmt: skip
_CONFIG_OPTIONS = {
    "asNumber": "--as-number", "nodeToNodeMeshEnabled": "--node-to-node-mesh",
    "listenPort": "--listen-port", "prefixAdvertisements": "--advertise",
    "communities": "--community", "serviceClusterIPs": "--service-cluster-ip",
    "serviceExternalIPs": "--service-external-ip", "importCIDRs": "--import-cidr",
    "importDefaultRoute": "--import-default-route", "nodeMeshHoldTime": "--mesh-hold-time",
    "nodeMeshMaxRestartTime": "--mesh-max-restart-time",
}  # fmt: skip
_CLEARABLE = {"advertise": "prefixAdvertisements", "community": "communities",
              "service-cluster-ip": "serviceClusterIPs",
              "service-external-ip": "serviceExternalIPs", "import-cidr": "importCIDRs"}  # fmt: skip


def _bgp(s: Services) -> BGPStore:
    return BGPStore(s.store)


def _num(v: str | None) -> int | str | None:
    """An integer option as the model wants it; anything else is left for it to refuse."""
    return int(v) if v is not None and re.fullmatch(r"-?\d+", v.strip()) else v


def _option_error(e: ValidationError, options: Mapping[str, str]) -> ValidationError:
    """The same error, naming the command-line option that set the field."""
    top = re.split(r"[.\[]", e.field.removeprefix("spec."), maxsplit=1)[0]
    return ValidationError(options.get(top, e.field), e.problem, e.resource)


# peer ----------------------------------------------------------------------------------------


@click.group(cls=Group)
def peer() -> None:
    """BGP peers: routers and route reflectors the nodes peer with (Calico's BGPPeer)."""


@peer.command("add")
@click.argument("name")
@click.option(
    "--peer-ip", metavar="IP[:PORT]", help="The peer's address ([IPv6]:PORT with a port)."
)
@click.option("--as-number", metavar="N", help="The peer's AS number (required with --peer-ip).")
@click.option("--node", help="Only this node peers with it.")
@click.option("--node-selector", metavar="SEL", help="Only nodes matching SEL peer with it.")
@click.option("--peer-selector", metavar="SEL",
              help="Instead of --peer-ip: peer with every node matching SEL (route reflectors).")  # fmt: skip
@click.option(
    "--local-as-number", metavar="N", help="AS number of this side (default: the node's)."
)
@click.option("--password-file", metavar="PATH",
              help="Absolute path, on every node, of a file holding the TCP MD5 key.")  # fmt: skip
@click.option("--password-credential", metavar="NAME",
              help="Instead of --password-file: the systemd credential NAME holds the key "
              "(LoadCredential=NAME:PATH in fabricd's unit).")  # fmt: skip
@click.option("--ttl-security", metavar="HOPS",
              help="GTSM: the peer is at most HOPS away; send TTL 255, accept >= 256-HOPS.")  # fmt: skip
@click.option("--source-address", metavar="MODE",
              help="UseNodeIP (the node's address) or None (the kernel picks); default: the "
              "interface facing the peer, else the node's address.")  # fmt: skip
@click.option(
    "--hold-time", metavar="S", help=f"Hold time: seconds or 1m30s (default {DEFAULT_HOLD_TIME})."
)
@click.option("--keepalive-time", metavar="S", help="Keepalive interval (default: hold time / 3).")
@click.option("--max-restart-time", metavar="S",
              help=f"Graceful-restart time announced (default {DEFAULT_RESTART_TIME}).")  # fmt: skip
@click.option("--max-prefixes", metavar="N", help="Close the session above N received prefixes.")
@click.option("--num-allowed-local-as", metavar="N",
              help="Accept routes holding the local AS up to N times (one AS per rack).")  # fmt: skip
@click.option("--required/--not-required", default=None,
              help="Whether the session counts for readiness (default: yes for --peer-ip and "
              "--peer-selector peers).")  # fmt: skip
@click.pass_context
def peer_add(ctx: click.Context, /, name: str, **opts: Any) -> None:
    """Create BGP peer NAME (refused if one with that name exists).

    Without --node or --node-selector every node peers with it (a global peer).
    """
    ctx.meta[RESOURCE] = f"BGPPeer {name}"
    spec = {field: opts[option[2:].replace("-", "_")] for field, option in _PEER_OPTIONS.items()}
    for f in (
        "asNumber",
        "localASNumber",
        "maxPrefixes",
        "numAllowedLocalASNumbers",
        "ttlSecurity",
    ):
        spec[f] = _num(spec[f])
    try:
        new = rb.peer_from_spec(name, {k: v for k, v in spec.items() if v is not None})
    except ValidationError as e:
        raise _option_error(e, _PEER_OPTIONS) from e
    run(ctx, lambda s: _bgp(s).put_peer(new, create_only=True))
    click.echo(f"BGPPeer {name} created")


@peer.command("list")
@output_option
@click.pass_context
def peer_list(ctx: click.Context, fmt: str) -> None:
    """List BGP peers."""
    docs = run(ctx, lambda s: ry.get(s.res, ry.BGPPEER, None))
    emit_resources(ry.BGPPEER, docs, fmt, single=False)


@peer.command("show")
@click.argument("name")
@output_option
@click.pass_context
def peer_show(ctx: click.Context, name: str, fmt: str) -> None:
    """Show BGP peer NAME and its sessions on the nodes that report them."""
    ctx.meta[RESOURCE] = f"BGPPeer {name}"

    async def fetch(s: Services) -> tuple[Peer, list[Status]]:
        return await _bgp(s).get_peer(name), await _bgp(s).list_status()

    p, statuses = run(ctx, fetch)
    sessions = [{"node": d.get("node"), **x} for d in statuses for x in d.get("sessions") or ()
                if p.peer_ip is not None and x.get("peerIP") == str(p.peer_ip)]  # fmt: skip
    data = {**ry.peer_resource(p), "status": {"sessions": sessions}}
    s = data["spec"]

    def render() -> str:
        scope = (f"node {p.node}" if p.node else f"nodes matching {p.node_selector}"
                 if p.node_selector else "every node (global)")  # fmt: skip
        head = properties([
            ("Name", p.name), ("Peer IP", s.get("peerIP")), ("AS number", p.as_number),
            ("Peer selector", p.peer_selector), ("Peers with it", scope),
            ("Local AS number", p.local_as_number or "the node's"),
            ("Password", f"file {p.password_file}" if p.password_file else
             f"systemd credential {p.password_credential}" if p.password_credential else None),
            ("TTL security", f"{p.ttl_security} hop(s)" if p.ttl_security else "off"),
            ("Source address", p.source_address or "facing interface, else node address"),
            ("Hold time", rb.seconds(p.hold_time) or f"{DEFAULT_HOLD_TIME}s (default)"),
            ("Keepalive time", rb.seconds(p.keepalive_time) or "hold time / 3"),
            ("Max restart time", rb.seconds(p.max_restart_time) or f"{DEFAULT_RESTART_TIME}s (default)"),
            ("Max prefixes", p.max_prefixes or "no limit"),
            ("Allowed local AS", p.num_allowed_local_as),
            ("Required", "default" if p.required is None else p.required)])  # fmt: skip
        if not sessions:
            return head
        now = time.time()
        rows = [[x["node"], x.get("type"), x.get("state"), since(x.get("since"), now),
                 x.get("info")] for x in sessions]  # fmt: skip
        return head + "\n\n" + table(["NODE", "PEER TYPE", "STATE", "SINCE", "INFO"], rows)

    emit(data, fmt, render)


@peer.command("delete")
@click.argument("name")
@click.pass_context
def peer_delete(ctx: click.Context, name: str) -> None:
    """Delete BGP peer NAME (every node closes its session with it)."""
    ctx.meta[RESOURCE] = f"BGPPeer {name}"
    run(ctx, lambda s: _bgp(s).delete_peer(name))
    click.echo(f"BGPPeer {name} deleted")


# bgp config ----------------------------------------------------------------------------------


@click.group(cls=Group)
def bgp() -> None:
    """BGP: the cluster configuration and the nodes' session status."""


@bgp.group("config")
def bgp_config() -> None:
    """The cluster-wide BGP configuration (Calico's BGPConfiguration default)."""


def _show_config(cfg: BGPConfig, fmt: str) -> None:
    def cidrs(nets: Iterable[object]) -> str:
        return ", ".join(str(n) for n in nets)

    def render() -> str:
        advs = [f"{a.cidr}" + (f" ({','.join(a.communities)})" if a.communities else "")
                for a in cfg.prefix_advertisements]  # fmt: skip
        rows: list[list[object]] = [
            ["AS number", cfg.as_number], ["Node-to-node mesh", cfg.node_to_node_mesh],
            ["Listen port", cfg.listen_port], ["Mesh hold time", rb.seconds(cfg.mesh_hold_time)],
            ["Mesh max restart time", rb.seconds(cfg.mesh_max_restart_time)],
            ["Mesh password file", cfg.mesh_password_file],
            ["Communities", ", ".join(f"{c.name}={c.value}" for c in cfg.communities)],
            ["Prefix advertisements", ", ".join(advs)],
            ["Service cluster IPs", cidrs(cfg.service_cluster_ips)],
            ["Service external IPs", cidrs(cfg.service_external_ips)],
            ["Import CIDRs", cidrs(cfg.import_cidrs)],
            ["Import default route", cfg.import_default_route]]  # fmt: skip
        return boxed(["PROPERTY", "VALUE"], rows)

    emit(rb.config_spec(cfg), fmt, render)


@bgp_config.command("show")
@output_option
@click.pass_context
def config_show(ctx: click.Context, fmt: str) -> None:
    """Show the BGP configuration (defaults when none was set)."""
    _, cfg = run(ctx, lambda s: _bgp(s).get_config())
    _show_config(cfg, fmt)


def _pair(text: str, option: str, form: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CLIError(f"{text!r} is not {form}", "BGPConfiguration default", option)
    return key, value


@bgp_config.command("set")
@click.option("--as-number", metavar="N", help="The cluster's AS number (default 64512).")
@click.option("--node-to-node-mesh/--no-node-to-node-mesh", "mesh", default=None,
              help="Full iBGP mesh between the nodes (disable when using route reflectors).")  # fmt: skip
@click.option("--listen-port", metavar="P", help="TCP port the speakers listen on (default 179).")
@click.option("--advertise", multiple=True, metavar="CIDR[=COMM,...]",
              help="Prefix to announce, with communities (names or aa:nn); repeatable; replaces "
              "the list.")  # fmt: skip
@click.option("--community", multiple=True, metavar="NAME=VALUE",
              help="Named community (aa:nn or aa:nn:mm); repeatable; replaces the list.")  # fmt: skip
@click.option("--service-cluster-ip", multiple=True, metavar="CIDR",
              help="Service cluster IP range to announce; repeatable; replaces the list.")  # fmt: skip
@click.option("--service-external-ip", multiple=True, metavar="CIDR",
              help="Service external IP range to announce; repeatable; replaces the list.")  # fmt: skip
@click.option("--import-cidr", multiple=True, metavar="CIDR",
              help="Prefix accepted from peers besides the pools; repeatable; replaces the list.")  # fmt: skip
@click.option("--import-default-route/--no-import-default-route", default=None,
              help="Accept a default route from peers.")  # fmt: skip
@click.option(
    "--mesh-hold-time", metavar="S", help="Hold time of mesh sessions (seconds or 1m30s)."
)
@click.option(
    "--mesh-max-restart-time", metavar="S", help="Graceful-restart time of mesh sessions."
)
@click.option("--clear", multiple=True, type=click.Choice(list(_CLEARABLE)),
              help="Empty this list (applied before the options that set lists).")  # fmt: skip
@output_option
@click.pass_context
def config_set(ctx: click.Context, /, fmt: str, **opts: Any) -> None:
    """Change the settings given (compare-and-swap: concurrent changes are not lost)."""
    ctx.meta[RESOURCE] = "BGPConfiguration default"
    if not any(v not in (None, ()) for v in opts.values()):
        raise click.UsageError("give at least one setting to change (see --help)")
    lists: dict[str, list[Any]] = {_CLEARABLE[c]: [] for c in opts["clear"]}
    if opts["advertise"]:
        pairs = [a.partition("=") for a in opts["advertise"]]
        lists["prefixAdvertisements"] = [{"cidr": c, "communities": [x for x in cs.split(",") if x]}
                                         for c, _, cs in pairs]  # fmt: skip
    if opts["community"]:
        lists["communities"] = [
            dict(zip(("name", "value"), _pair(c, "--community", "NAME=VALUE"), strict=True))
            for c in opts["community"]]  # fmt: skip
    for opt, field in (("service_cluster_ip", "serviceClusterIPs"),
                       ("service_external_ip", "serviceExternalIPs")):  # fmt: skip
        if opts[opt]:
            lists[field] = [{"cidr": c} for c in opts[opt]]
    if opts["import_cidr"]:
        lists["importCIDRs"] = list(opts["import_cidr"])
    scalars = {"asNumber": _num(opts["as_number"]), "nodeToNodeMeshEnabled": opts["mesh"],
               "listenPort": _num(opts["listen_port"]),
               "importDefaultRoute": opts["import_default_route"],
               "nodeMeshHoldTime": opts["mesh_hold_time"],
               "nodeMeshMaxRestartTime": opts["mesh_max_restart_time"]}  # fmt: skip

    def change(cfg: BGPConfig) -> BGPConfig:
        d = {**rb.config_spec(cfg), **lists, **{k: v for k, v in scalars.items() if v is not None}}
        try:
            return rb.config_from_spec(rb.BGP_CONFIG_NAME, d)
        except ValidationError as e:
            raise _option_error(e, _CONFIG_OPTIONS) from e

    _show_config(run(ctx, lambda s: _bgp(s).update_config(change)), fmt)


async def _statuses(s: Services, node: str | None) -> tuple[dict[str, Status], list[str], set[str]]:
    """Status documents by node, the nodes to show, and which of them exist."""
    bs = _bgp(s)
    if node is not None:
        doc = await bs.get_status(node)
        known = {node} if await s.res.get_node(node) is not None else set()
        return ({node: doc} if doc else {}), [node], known
    docs = {str(d["node"]): d for d in await bs.list_status()}
    nodes = {n.name for n in await s.res.list_nodes()}
    return docs, sorted(nodes | set(docs)), nodes


@bgp.command("status")
@click.option("--node", help="Only this node (default: every node).")
@output_option
@click.pass_context
def bgp_status(ctx: click.Context, node: str | None, fmt: str) -> None:
    """BGP sessions of each node, as its fabricd last published them.

    Columns as `calicoctl node status`: PEER ADDRESS, PEER TYPE, STATE (up, connected,
    down, idle), SINCE (local time, or date when older than a day), INFO. `-o json|yaml`
    prints the status documents themselves.
    """
    docs, names, known = run(ctx, lambda s: _statuses(s, node))
    now = time.time()
    emit([docs[n] for n in names if n in docs], fmt, lambda: "\n\n".join(
        render_status(n, docs.get(n), n in known, now) for n in names) or "No nodes found.")  # fmt: skip


@click.command("routes", cls=Command)
@click.option("--node", help="Only this node (default: every node).")
@output_option
@click.pass_context
def routes(ctx: click.Context, node: str | None, fmt: str) -> None:
    """Kernel routes fabricd installed on each node, as it last published them."""
    docs, names, known = run(ctx, lambda s: _statuses(s, node))
    data = [{"node": n, **(docs[n].get("routes") or {})} for n in names if n in docs]
    emit(data, fmt, lambda: "\n\n".join(
        render_routes(n, docs.get(n), n in known) for n in names) or "No nodes found.")  # fmt: skip


# node show / label ---------------------------------------------------------------------------


@click.command("show", cls=Command)
@click.argument("name")
@output_option
@click.pass_context
def node_show(ctx: click.Context, name: str, fmt: str) -> None:
    """Show node NAME: addresses, AS, labels, route reflector cluster, BGP status summary."""
    ctx.meta[RESOURCE] = f"Node {name}"

    async def fetch(s: Services) -> tuple[Node, BGPConfig, Status | None]:
        n = await s.res.get_node(name)
        if n is None:
            raise NotFoundError(f"Node {name} not found")
        _, cfg = await _bgp(s).get_config()
        return n, cfg, await _bgp(s).get_status(name)

    n, cfg, st = run(ctx, fetch)

    def render() -> str:
        asn = n.as_number if n.as_number is not None else f"{cfg.as_number} (cluster default)"
        items: list[tuple[str, object]] = [
            ("Name", n.name), ("Addresses", ", ".join(n.addresses)), ("AS number", asn),
            ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))),
            ("Route reflector cluster ID", n.route_reflector_cluster_id)]  # fmt: skip
        if st is None or "error" in st:
            items.append(("fabricd", st["error"] if st else "no status published (not running)"))
        else:
            items += summary(st, time.time())
        return properties(items)

    emit({**ry.node_resource(n), "status": st}, fmt, render)


@click.command("label", cls=Command)
@click.argument("name")
@click.argument("labels", nargs=-1, required=True, metavar="KEY=VALUE... KEY-...")
@click.option("--overwrite", is_flag=True, help="Allow changing an existing label's value.")
@click.pass_context
def node_label(ctx: click.Context, name: str, labels: tuple[str, ...], overwrite: bool) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of node NAME, as `kubectl label`.

    Peer selectors (--node-selector, --peer-selector) match these labels. The node is
    updated by compare-and-swap, so a concurrent change is not lost.
    """
    res = f"Node {name}"
    ctx.meta[RESOURCE] = res
    sets, removes = ry.parse_labels(res, labels)
    missing: list[str] = []

    def change(n: Node) -> Node:
        new = dict(n.labels)
        for k, v in sets.items():
            if not overwrite and new.get(k, v) != v:
                raise CLIError(f"already has a value ({new[k]}), and --overwrite is false",
                               res, f"metadata.labels.{k}")  # fmt: skip
            new[k] = v
        missing[:] = sorted(k for k in removes if new.pop(k, None) is None)
        return dataclasses.replace(n, labels=new)

    old, new = run(ctx, lambda s: _bgp(s).update_node(name, change))
    for k in missing:
        note(f"{res}: label {k!r} not found")
    click.echo(f"{res} labeled" if new != old else f"{res} not labeled (no change)")
