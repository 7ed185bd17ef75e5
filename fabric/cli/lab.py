"""``fabricctl lab graph``: draw a running lab (see lab/graph.py).

The fabric never imports the lab (a test harness); this command runs ``python -m lab graph``
with the same interpreter, so it works wherever the lab package is installed beside
fabricctl (a source checkout, the lab image) and says so plainly where it is not.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import click


@click.group("lab", context_settings={"help_option_names": ["-h", "--help"]})
def lab() -> None:
    """The network-namespace lab (development and demos)."""


@lab.command("graph")
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
    if importlib.util.find_spec("lab") is None:
        raise click.ClickException("the lab package is not installed with this fabricctl")
    argv = [sys.executable, "-m", "lab", "graph", "--out", str(out)]
    if name:
        argv += ["--name", name]
    rc = subprocess.run(argv, check=False).returncode
    if rc != 0:
        sys.exit(rc)
