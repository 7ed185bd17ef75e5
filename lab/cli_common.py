"""What the lab's commands share: the lab to act on, progress lines, table/json/yaml output."""

from __future__ import annotations

import json
from typing import Any

import click
import yaml

from lab.state import list_labs

OUTPUT = click.Choice(["table", "json", "yaml"])


def progress(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


def pick(name: str | None) -> str:
    """The lab to act on: ``name``, or the only lab there is."""
    if name:
        return name
    labs = list_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise click.ClickException("no lab is up")
    raise click.ClickException(f"several labs are up ({', '.join(labs)}); give --name")


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def emit(data: Any, output: str, rows: list[list[str]]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        click.echo(table(rows))
