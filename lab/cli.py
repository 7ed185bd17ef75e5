"""The lab command line: ``python -m lab up|down|status|exec|export|clean|graph|fabricd|pod``.

Exit codes: 0 success, 1 a lab error (message on stderr), 2 usage error (click).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from lab import clab
from lab.cli_common import OUTPUT, emit, pick, progress
from lab.cli_fabric import fabric_up, fabricd, pod
from lab.runner import Lab, teardown
from lab.state import LabState, lab_dir, list_labs
from lab.topology import TopologyError, load
from lab.view import LabError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build fabric lab topologies (containerlab files) from network namespaces."""


@main.command()
@click.argument("topology")
@click.option("--name", "-n", help="Lab name (default: the topology's name).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for daemons.")
@click.option("--fabric", is_flag=True,
              help="Also configure the datastore, start fabricd on every host, wait until all "
              "are ready, and install the CNI plugin (then: `python -m lab pod add`).")  # fmt: skip
@click.option("--tls", is_flag=True,
              help="etcd requires TLS and client certificates (a CA and certificates are made "
              "in the lab directory; fabricd and `lab`'s fabricctl use them).")  # fmt: skip
def up(topology: str, name: str | None, timeout: float, fabric: bool, tls: bool) -> None:
    """Bring TOPOLOGY up (a file, or a bundled name: mesh3, two-rack, rr, dual-homed)."""
    try:
        lab = Lab(topology, name=name, progress=progress, tls=tls)
        lab.up(timeout=timeout)
    except (LabError, TopologyError, TimeoutError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    if fabric:
        try:
            fabric_up(lab, timeout)
        except (LabError, TimeoutError, OSError) as e:
            raise click.ClickException(
                f"{e} (the lab stays up: `python -m lab down {lab.name}`)"
            ) from e
    _show(lab, "table")


@main.command()
@click.argument("name", required=False)
def down(name: str | None) -> None:
    """Tear lab NAME down (idempotent; works after a crashed `up`)."""
    if not name:
        labs = list_labs()
        if not labs:
            click.echo("no lab is up")
            return
        name = pick(None)
    try:
        gone = teardown(lab_dir(name))
    except (LabError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"lab {name} is down" if gone else f"lab {name} was not up")


def _show(lab: Lab, output: str) -> None:
    rows = [["NODE", "ROLE", "AS", "NETNS", "ADDRESSES", "PROCESSES"]]
    data = lab.status()
    for r in data:
        procs = ", ".join(f"{k}:{'up' if v else 'DEAD'}" for k, v in r["processes"].items())
        ns = r["netns"] if r["netns_exists"] else f"{r['netns']} (missing)"
        addrs = " ".join(f"{k}={v}" for k, v in r["addresses"].items())
        rows.append([r["node"], r["role"], str(r["asn"] or "-"), ns, addrs or "-", procs or "-"])
    emit(
        {"name": lab.name, "phase": lab.state.phase, "etcd": lab.etcd_endpoints, "nodes": data},
        output,
        rows,
    )


@main.command()
@click.argument("name", required=False)
@click.option("--output", "-o", type=OUTPUT, default="table", show_default=True)
def status(name: str | None, output: str) -> None:
    """Show each node of lab NAME: role, addresses, processes alive. No NAME and several
    labs: list the labs."""
    labs = list_labs()
    if name is None and not labs and output == "table":
        click.echo("no lab is up")
        return
    if name is None and len(labs) != 1:
        rows = [["LAB", "PHASE", "NAMESPACES", "PROCESSES"]]
        data = []
        for n in labs:
            try:
                st = LabState.load(lab_dir(n))
            except (FileNotFoundError, ValueError):
                continue
            data.append(
                {
                    "name": n,
                    "phase": st.phase,
                    "namespaces": len(st.namespaces),
                    "processes": len(st.procs),
                }
            )
            rows.append([n, st.phase, str(len(st.namespaces)), str(len(st.procs))])
        emit(data, output, rows)
        return
    try:
        _show(Lab.attach(pick(name)), output)
    except LabError as e:
        raise click.ClickException(str(e)) from e


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", "-n", help="Lab name (default: the only lab that is up).")
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str | None, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside NODE's namespace: `python -m lab exec node1 -- ip route`."""
    try:
        ns = Lab.attach(pick(name)).netns(node)
    except LabError as e:
        raise click.ClickException(str(e)) from e
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])


@main.command()
@click.argument("topology")
@click.option(
    "--out",
    "-d",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("lab/out"),
    show_default=True,
    help="Output directory.",
)
def export(topology: str, out: Path) -> None:
    """Write TOPOLOGY's configs and a containerlab file deployable on a Docker host."""
    try:
        path = clab.export(load(topology), out / load(topology).name)
    except (TopologyError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"containerlab deploy -t {path}")


@main.command()
def clean() -> None:
    """Tear down every lab (what `make clean-lab` runs)."""
    failed = []
    for name in list_labs():
        try:
            teardown(lab_dir(name))
            click.echo(f"lab {name} is down")
        except (LabError, OSError) as e:
            failed.append(f"{name}: {e}")
    if failed:
        raise click.ClickException("; ".join(failed))


@main.command()
@click.option("--name", "-n", help="The lab (default: the only one up).")
@click.option(
    "--out",
    "-d",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("lab/out"),
    show_default=True,
    help="Output directory.",
)
def graph(name: str | None, out: Path) -> None:
    """Draw a running lab: wires, BGP sessions coloured by state, each host's blocks
    (DOT, SVG and PNG under --out)."""
    from lab import graph as drawing

    try:
        lab = Lab.attach(pick(name))
        for p in drawing.write(lab, out):
            click.echo(str(p))
    except (LabError, OSError, subprocess.SubprocessError) as e:
        raise click.ClickException(f"failed to draw the lab: {e}") from e


main.add_command(fabricd)
main.add_command(pod)
