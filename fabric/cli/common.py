"""Shared plumbing of fabricctl's commands: settings, error mapping, running, output.

Every command builds one Store for its run (short deadline, so an unreachable etcd is exit 2
within seconds), runs one coroutine with asyncio.run and closes the store. Errors become one
line on stderr and an exit code, both decided in fabric.errors.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fabric import errors
from fabric.cli.output import (
    FORMATS,
    Format,
    structured,
    table,
    to_yaml_documents,
)
from fabric.errors import CLIError

if TYPE_CHECKING:  # the etcd stack is imported where a command runs (see run())
    from ipam.allocator import Allocator
    from ipam.gc import Maintenance, PoolUsage
    from ipam.resources import Resources
    from ipam.store import Store
    from ipam.tls import TLSConfig

T = TypeVar("T")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_PREFIX = "/fabric/v1"  # ipam.store.DEFAULT_PREFIX, without importing the etcd client
# A CLI user waits for an answer: 5 s rides out an etcd leader election, and is short
# enough that "etcd is down" is reported (exit 2) quickly.
DEFAULT_TIMEOUT = 5.0
RESOURCE = "fabric.resource"  # ctx.meta key: what the command works on, for messages


@dataclass(frozen=True, slots=True)
class Settings:
    endpoints: tuple[str, ...]
    prefix: str
    tls: TLSConfig | None
    timeout: float


@dataclass(frozen=True, slots=True)
class Services:
    store: Store
    alloc: Allocator
    maint: Maintenance

    @property
    def res(self) -> Resources:
        return self.alloc.resources


# error handling ------------------------------------------------------------------------------


def _fail(ctx: click.Context, exc: Exception) -> None:
    if os.environ.get("FABRIC_DEBUG") and not errors.is_known(exc):
        raise exc
    click.echo(errors.message(exc, str(ctx.meta.get(RESOURCE, ""))), err=True)
    ctx.exit(errors.exit_code(exc))


class Command(click.Command):
    """Turns every error a command raises into one line and the exit code from fabric.errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # mapped (and re-raised for bugs under FABRIC_DEBUG)
            _fail(ctx, e)


class Group(click.Group):
    command_class = Command
    group_class = type  # subgroups are Group too

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:  # fmt: skip
        with _usage_exit():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_exit():
            return super().invoke(ctx)


class LazyGroup(Group):
    """A group whose subcommands named in ``lazy`` (name -> ("module:attribute", the first
    paragraph of the command's help)) are imported only when one of them runs or shows its
    own help. The group's own ``--help`` lists them from the text given here, shortened as
    click shortens a command's help, so it imports none of them."""

    def __init__(self, *args: Any, lazy: Mapping[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, tuple[str, str]] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attr = self.lazy[cmd_name][0].partition(":")
            cmd = getattr(import_module(module), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{module}:{attr} is not a click command")
            self.add_command(cmd, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                limit = formatter.width - 6 - len(name)
                # shortened exactly as click shortens a loaded command's help
                short = click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)
                rows.append((name, short))
            elif (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@contextmanager
def _usage_exit() -> Iterator[None]:
    """A bad command line is a user error: exit 1 (click's 2 means "etcd down" here)."""
    try:
        yield
    except click.UsageError as e:
        raise _UsageExit(e) from e


class _UsageExit(click.ClickException):
    """Shows the usage error exactly as click would, with exit code 1."""

    exit_code = errors.EXIT_USER

    def __init__(self, inner: click.UsageError) -> None:
        super().__init__(inner.message)
        self.inner = inner

    def show(self, file: Any = None) -> None:
        self.inner.show(file)


def run(ctx: click.Context, fn: Callable[[Services], Awaitable[T]]) -> T:
    """Run ``fn`` against a fresh store that is closed afterwards."""
    s = ctx.find_object(Settings)
    assert s is not None

    import asyncio

    from ipam.allocator import Allocator
    from ipam.gc import Maintenance
    from ipam.store import Store

    async def go() -> T:
        store = Store(list(s.endpoints), s.prefix, s.tls, deadline=s.timeout)
        try:
            alloc = Allocator(store)
            return await fn(Services(store, alloc, Maintenance(alloc)))
        finally:
            await store.close()

    return asyncio.run(go())


def progress(msg: str) -> None:
    click.echo(msg, err=True)


def read_input(path: str, what: str) -> str:
    """The text of ``path`` ("-" is stdin); a missing file is a one-line error."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise CLIError(f"cannot read {what}: {e.strerror}", path) from e


def read_json(path: str, what: str) -> Any:
    text = read_input(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{what} is not valid JSON: {e}", path) from e


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-o", "--output", "fmt", type=click.Choice(FORMATS), default="table",
                        show_default=True, help="Output format.")(f)  # fmt: skip


def emit(data: Any, fmt: str, render_table: Callable[[], str]) -> None:
    f = Format(fmt)
    click.echo(render_table() if f is Format.TABLE else structured(data, f))


def emit_resources(kind: str, docs: Sequence[Mapping[str, Any]], fmt: str, single: bool) -> None:
    """Resources as a table, JSON (one object, or a List) or YAML documents (apply input)."""
    from fabric.resources import documents as ry

    f = Format(fmt)
    if f is Format.YAML:
        click.echo(to_yaml_documents(docs))
    elif f is Format.JSON:
        data = docs[0] if single else {"apiVersion": ry.OUTPUT_API_VERSION, "kind": "List",
                                       "items": list(docs)}  # fmt: skip
        click.echo(structured(data, f))
    else:
        click.echo(table(*ry.table_rows(kind, docs)))


def usage_json(u: PoolUsage) -> dict[str, Any]:
    return {
        "name": u.pool.name, "cidr": str(u.pool.cidr), "ipsTotal": u.total,
        "ipsInUse": u.in_use, "ipsFree": u.total - u.in_use,
        "blocks": [{"cidr": str(b.cidr), "node": b.node, "state": b.state, "ipsTotal": b.total,
                    "ipsInUse": b.in_use, "ipsFree": b.total - b.in_use} for b in u.blocks],
    }  # fmt: skip
