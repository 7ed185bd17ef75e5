"""``fabricctl install-unit``: write fabricd's systemd unit (fabric.unit)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from fabric import unit as systemd_unit
from fabric.cli.common import Command
from fabric.errors import CLIError


@click.command("install-unit", cls=Command)
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
