"""fabricctl cni: install the CNI plugin (the ``fabric`` and ``fabric-ipam`` binaries and the
network config list). Needs no etcd: what it writes only points at fabricd's socket."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click

from cni import install as inst
from cni.spec import SUPPORTED, valid_name
from fabric.cli.common import Group, emit, output_option
from fabric.errors import CLIError

_NAME = "CNI network"


@click.group(cls=Group)
def cni() -> None:
    """The CNI plugin: binaries and network configuration."""


@cni.command("install")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the runtime looks for plugins (its CNI_PATH).")  # fmt: skip
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help=f"Where the runtime reads network configs ({inst.CONFLIST} goes there).")  # fmt: skip
@click.option("--socket", "socket_path", default="/run/fabric/cni.sock", show_default=True,
              metavar="PATH", help="fabricd's CNI socket (cni.socket in fabricd.yaml).")  # fmt: skip
@click.option("--state-dir", default=str(inst.DEFAULT_STATE_DIR), show_default=True,
              metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="fabricd's cni.stateDir: a DEL while fabricd is down is recorded in its "
              f"{inst.PENDING_DIR}/ and answered with success.")  # fmt: skip
@click.option("--network-name", default="fabric", show_default=True,
              help="The network's name (part of every IPAM handle).")  # fmt: skip
@click.option("--mtu", type=click.IntRange(68, 65535), default=1500, show_default=True,
              help="MTU of the pods' interfaces.")  # fmt: skip
@click.option("--pool", "pools", multiple=True, metavar="NAME_OR_CIDR",
              help="IP pool to assign from (repeat; default: the node's pools).")  # fmt: skip
@click.option("--cni-version", type=click.Choice(SUPPORTED), default=inst.DEFAULT_CNI_VERSION,
              show_default=True, help="cniVersion of the network config list.")  # fmt: skip
@click.option("--python", default=inst.DEFAULT_PYTHON, show_default=True, metavar="PATH",
              help="Interpreter of the plugin scripts (not a pyenv shim: start-up matters).")  # fmt: skip
@click.option("--link-reference", is_flag=True,
              help=f"Symlink {', '.join(inst.REFERENCE_PLUGINS)} from {inst.REFERENCE_DIR} "
              "into --bin-dir.")  # fmt: skip
@click.option("--build", "build", type=click.Choice(["auto", "compiled", "python"]),
              default="auto", show_default=True,
              help="compiled: build the plugins' fast front with the C compiler (cc); python: "
              "the Python plugin only (every exec starts an interpreter, ~7-9 ms); auto: "
              "compiled when a compiler exists.")  # fmt: skip
@output_option
def install(bin_dir: Path, conf_dir: Path, socket_path: str, state_dir: Path,
            network_name: str, mtu: int,
            pools: tuple[str, ...], cni_version: str, python: str, link_reference: bool,
            build: str, fmt: str) -> None:  # fmt: skip
    """Write the plugins `fabric` and `fabric-ipam` (0755) into --bin-dir and
    10-fabric.conflist (fabric, then portmap and bandwidth) into --conf-dir.

    The reference plugins portmap and bandwidth are Debian's (containernetworking-plugins,
    in /usr/lib/cni): the runtime's CNI_PATH must include /usr/lib/cni, or use
    --link-reference. Files are replaced atomically; running it again is harmless.
    """
    _check(network_name, pools, socket_path, python)
    try:
        compiled = {"auto": None, "compiled": True, "python": False}[build]
        done = inst.install(bin_dir, conf_dir, socket_path, network_name, mtu, pools, python,
                            link_reference, cni_version, state_dir, compiled)  # fmt: skip
    except OSError as e:
        where = e.filename or str(bin_dir)
        raise CLIError(f"cannot write the plugin: {e.strerror}", str(where)) from e
    except RuntimeError as e:
        raise CLIError(str(e), field="--build") from e
    data: dict[str, Any] = {
        "plugins": [str(p) for p in done.plugins],
        "build": done.build,
        "conflist": str(done.conflist),
        "links": [str(p) for p in done.links],
        "socket": socket_path,
        "pendingDir": str(state_dir.absolute() / inst.PENDING_DIR),
        "network": done.network,
    }

    def render() -> str:
        lines = [f"Wrote {p}" for p in (*done.plugins, done.conflist)]
        lines += [f"Linked {p} -> {p.resolve()}" for p in done.links]
        if not link_reference and not (bin_dir / "portmap").exists():
            lines.append(f"Note: the runtime's CNI_PATH must include {inst.REFERENCE_DIR} "
                         "(portmap, bandwidth), or run again with --link-reference")  # fmt: skip
        return "\n".join(lines)

    emit(data, fmt, render)


def _check(name: str, pools: tuple[str, ...], socket_path: str, python: str) -> None:
    if not valid_name(name):
        raise CLIError("letters, digits, '_', '.' and '-', starting alphanumeric", _NAME,
                       "--network-name")  # fmt: skip
    for p in pools:
        if "/" in p:
            try:
                ipaddress.ip_network(p)
            except ValueError as e:
                raise CLIError(f"{p!r} is not a CIDR: {e}", _NAME, "--pool") from e
    try:
        inst.check_socket_path(socket_path)
    except ValueError as e:
        raise CLIError(str(e), _NAME, "--socket") from e
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise CLIError(f"{python!r}: an absolute path without spaces", _NAME, "--python")
