"""The lab command line: ``python -m lab up|down|status|exec|clean``.

Exit codes: 0 success, 1 a lab error (message on stderr), 2 usage error (click).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from lab import clab
from lab.runner import Lab, teardown
from lab.state import LabState, lab_dir, list_labs
from lab.topology import TopologyError, load
from lab.view import LabError

OUTPUT = click.Choice(["table", "json", "yaml"])


def _progress(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


def _pick(name: str | None) -> str:
    """The lab to act on: ``name``, or the only lab there is."""
    if name:
        return name
    labs = list_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise click.ClickException("no lab is up")
    raise click.ClickException(f"several labs are up ({', '.join(labs)}); give --name")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _emit(data: Any, output: str, rows: list[list[str]]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        click.echo(_table(rows))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build fabric lab topologies (containerlab files) from network namespaces."""


@main.command()
@click.argument("topology")
@click.option("--name", "-n", help="Lab name (default: the topology's name).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for daemons.")
def up(topology: str, name: str | None, timeout: float) -> None:
    """Bring TOPOLOGY up (a file, or a bundled name: mesh3, two-rack, rr, dual-homed)."""
    try:
        lab = Lab(topology, name=name, progress=_progress)
        lab.up(timeout=timeout)
    except (LabError, TopologyError, TimeoutError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
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
        name = _pick(None)
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
    _emit(
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
        _emit(data, output, rows)
        return
    try:
        _show(Lab.attach(_pick(name)), output)
    except LabError as e:
        raise click.ClickException(str(e)) from e


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", "-n", help="Lab name (default: the only lab that is up).")
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str | None, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside NODE's namespace: `python -m lab exec node1 -- ip route`."""
    try:
        ns = Lab.attach(_pick(name)).netns(node)
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
        lab = Lab.attach(_pick(name))
        for p in drawing.write(lab, out):
            click.echo(str(p))
    except (LabError, OSError, subprocess.SubprocessError) as e:
        raise click.ClickException(f"failed to draw the lab: {e}") from e
