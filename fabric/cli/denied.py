"""``fabricctl policy denied``: the denied connections the nodes logged (fabric.policy.denied).

Each fabricd publishes its newest denials under ``denied/<node>`` (under its lease); this
reads them, or with ``--follow`` watches them and prints each new denial once. Heavy
modules are imported inside the command so ``fabricctl --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import click

from fabric.cli.common import RESOURCE, Command, Services, emit, output_option, run
from fabric.cli.output import Format, structured

if TYPE_CHECKING:
    from fabric.policy.denied import Denial
    from ipam.store import KV


def _parse(kv: KV) -> tuple[dict[str, Any], list[Denial]]:
    from fabric.policy.denied import parse

    try:
        doc = json.loads(kv.value)
    except ValueError:
        return {}, []
    return (doc, parse(doc)) if isinstance(doc, dict) else ({}, [])


def denied_table(denials: Iterable[Denial]) -> str:
    from fabric.cli.output import table

    rows = [[time.strftime("%H:%M:%S", time.localtime(d.time)), d.node, d.line()]
            for d in denials]  # fmt: skip
    return table(["TIME", "NODE", "DENIED"], rows) if rows else "No denied connections logged."


def _summary(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"node": d.get("node"), "logged": d.get("total", 0), "lost": d.get("lost", 0),
             "updated": d.get("updated")} for d in docs]  # fmt: skip


@click.command("denied", cls=Command)
@click.option("--node", help="Only this node's denials (default: every node's).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new denials as they come.")
@output_option
@click.pass_context
def denied(ctx: click.Context, node: str | None, follow: bool, fmt: str) -> None:
    """New connections NetworkPolicy denied, as the nodes logged them: `SRC -> DST PORT/PROTO
    denied at ingress|egress of NS/POD: selected by [POLICIES], no rule allows it`. Each node
    logs a rate-limited sample (policy.deniedLogRate per pod, policy.deniedLogCap per node)
    and publishes its newest 100; counts of every drop are the metric
    fabric_policy_packets_total."""
    from fabric.policy.denied import PREFIX, key

    ctx.meta[RESOURCE] = f"denied connections of node {node}" if node else "denied connections"
    prefix = key(node) if node else PREFIX

    async def read(s: Services) -> tuple[list[dict[str, Any]], list[Denial], int]:
        kvs, rev = await s.store.list(prefix)
        docs, out = [], []
        for kv in kvs:
            if node is not None and kv.key != prefix:
                continue
            doc, ds = _parse(kv)
            docs.append(doc)
            out += ds
        out.sort(key=lambda d: (d.time, d.node, d.seq))
        return docs, out, rev

    if not follow:
        docs, ds, _ = run(ctx, read)
        data = {"nodes": _summary(docs), "denials": [d.to_json() for d in ds]}
        emit(data, fmt, lambda: denied_table(ds))
        return

    async def stream(s: Services) -> None:
        _docs, ds, rev = await read(s)
        last: dict[str, tuple[float, int]] = {}
        _print(ds, fmt, last, header=True)
        async for ev in s.store.watch(prefix, rev + 1):
            if node is not None and ev.kv.key != prefix:
                continue
            _print(_parse(ev.kv)[1], fmt, last, header=False)

    with contextlib.suppress(KeyboardInterrupt):
        run(ctx, stream)


def _print(ds: list[Denial], fmt: str, last: dict[str, tuple[float, int]], header: bool) -> None:
    """Each denial newer than the last printed of its node, once."""
    new = [d for d in ds if (d.time, d.seq) > last.get(d.node, (0.0, 0))]
    for d in new:
        last[d.node] = max(last.get(d.node, (0.0, 0)), (d.time, d.seq))
    f = Format(fmt)
    if f is Format.TABLE:
        if header and not new:
            click.echo("No denied connections logged yet; waiting.")
        for d in new:
            click.echo(f"{time.strftime('%H:%M:%S', time.localtime(d.time))}  {d.node}  "
                       f"{d.line()}")  # fmt: skip
    elif f is Format.JSON:
        for d in new:
            click.echo(json.dumps(d.to_json()), nl=True)
    else:
        for d in new:
            click.echo("---\n" + structured(d.to_json(), f))
