"""fabricctl: pools, IPAM, BGP and YAML resources against the fabric's etcd.

Every command builds one Store for its run (short deadline, so an unreachable etcd is exit 2
within seconds), runs one coroutine with asyncio.run and closes the store. Errors become one
line on stderr and an exit code, both decided in fabric.errors.

This module is the root group and its global options only. Shared plumbing lives in
fabric.cli.common; pools in fabric.cli.pool; apply/get/delete and node list/delete in
fabric.cli.resources; ipam in fabric.cli.ipam; peers, bgp, routes and node show/label in
fabric.cli.bgp; cni, lab and install-unit in their own modules. They are imported only when
one of their commands runs (the table at the end).
"""

from __future__ import annotations

from pathlib import Path

import click

from fabric.cli.common import (
    DEFAULT_ENDPOINTS,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    LazyGroup,
    Settings,
)

# the group -----------------------------------------------------------------------------------


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
        from ipam.tls import TLSConfig

        tls = TLSConfig(etcd_cacert, etcd_cert, etcd_key)
    ctx.obj = Settings(endpoints, prefix, tls, timeout)


# The subcommands live in their own modules and are imported only when they run (or show
# their own --help): `fabricctl --help` loads click and this file, nothing of etcd or BGP.
# The short help beside each is what `fabricctl --help` lists; tests/test_cli.py checks that
# it matches the command's own.
main.lazy.update({
    "pool": ("fabric.cli.pool:pool", "IP pools: the ranges blocks are cut from."),
    "apply": ("fabric.cli.resources:apply_cmd", "Create or update resources from YAML."),
    "get": ("fabric.cli.resources:get_cmd", "Show resources of KIND, or the one NAME."),
    "delete": ("fabric.cli.resources:delete_cmd",
               "Delete resource NAME of KIND, or those of -f FILE (an IPPool in use is refused: see `pool delete --force`)."),
    "node": ("fabric.cli.resources:node", "Nodes known to the fabric."),
    "install-unit": ("fabric.cli.unit:install_unit",
                     "Write the systemd unit fabricd.service (then `systemctl daemon-reload` and `systemctl enable --now fabricd`)."),
    "ipam": ("fabric.cli.ipam:ipam",
             "IP address management: usage, integrity checks, release, garbage collection."),
    "peer": ("fabric.cli.bgp:peer",
             "BGP peers: routers and route reflectors the nodes peer with (Calico's BGPPeer)."),
    "bgp": ("fabric.cli.bgp:bgp", "BGP: the cluster configuration and the nodes' session status."),
    "routes": ("fabric.cli.bgp:routes",
               "Kernel routes fabricd installed on each node, as it last published them."),
    "cni": ("fabric.cli.cni:cni", "The CNI plugin: binaries and network configuration."),
    "lab": ("fabric.cli.lab:lab", "The network-namespace lab (development and demos)."),
    "label": ("fabric.cli.policy:label",
              "Set (KEY=VALUE) or remove (KEY-) labels of a pod (NS/NAME) or a namespace (NAME), as `kubectl label` does. A pod or namespace without an object yet (a pod attached by the CNI plugin) gets one holding just these labels. Policy selectors follow at once."),
    "policy": ("fabric.cli.policy:policy", "NetworkPolicy: what the compiled rules do to a connection, and what they denied."),
    "explain": ("fabric.cli.explain:explain",
                "Why can (or can't) SRC reach DST: each hop with its state and the evidence read."),
})  # fmt: skip
