"""fabricctl: pools, IPAM and YAML resources against the fabric's etcd.

Every command builds one Store for its run (short deadline, so an unreachable etcd is exit 2
within seconds), runs one coroutine with asyncio.run and closes the store. Errors become one
line on stderr and an exit code, both decided in fabric.errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from fabric import errors
from fabric import resources_yaml as ry
from fabric.errors import CLIError
from fabric.output import (
    FORMATS,
    Format,
    boxed,
    percent,
    properties,
    structured,
    table,
    to_yaml_documents,
)
from ipam.allocator import Allocator
from ipam.errors import StaleError, ValidationError
from ipam.gc import CheckReport, Maintenance, PoolUsage
from ipam.pool import IPAMConfig, Pool, parse_ip
from ipam.resources import Resources
from ipam.store import DEFAULT_PREFIX, Store, TLSConfig

T = TypeVar("T")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
# A CLI user waits for an answer: 5 s rides out an etcd leader election, and is short
# enough that "etcd is down" is reported (exit 2) quickly.
DEFAULT_TIMEOUT = 5.0
_RESOURCE = "fabric.resource"  # ctx.meta key: what the command works on, for messages


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
    click.echo(errors.message(exc, str(ctx.meta.get(_RESOURCE, ""))), err=True)
    ctx.exit(errors.exit_code(exc))


class _Command(click.Command):
    """Turns every error a command raises into one line and the exit code from fabric.errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # mapped (and re-raised for bugs under FABRIC_DEBUG)
            _fail(ctx, e)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:  # fmt: skip
        with _usage_exit():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_exit():
            return super().invoke(ctx)


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
    f = Format(fmt)
    if f is Format.YAML:
        click.echo(to_yaml_documents(docs))
    elif f is Format.JSON:
        data = docs[0] if single else {"apiVersion": ry.OUTPUT_API_VERSION, "kind": "List",
                                       "items": list(docs)}  # fmt: skip
        click.echo(structured(data, f))
    else:
        click.echo(table(*ry.table_rows(kind, docs)))


# the group -----------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    """Manage the fabric's IP pools, IPAM data and resources in etcd.

    Exit codes: 0 ok, 1 user error, 2 etcd unreachable, 3 `ipam check` found problems.
    """
    endpoints = tuple(e.strip() for e in etcd_endpoints.split(",") if e.strip())
    if not endpoints:
        raise click.BadParameter("at least one endpoint is required", param_hint="--etcd-endpoints")
    tls = None
    if etcd_cacert or etcd_cert or etcd_key or any(e.startswith("https://") for e in endpoints):
        tls = TLSConfig(etcd_cacert, etcd_cert, etcd_key)
    ctx.obj = Settings(endpoints, prefix, tls, timeout)


# pool ----------------------------------------------------------------------------------------


@main.group()
def pool() -> None:
    """IP pools: the ranges blocks are cut from."""


@pool.command("add")
@click.argument("name")
@click.option("--cidr", required=True, help="The pool's range, e.g. 10.244.0.0/16.")
@click.option("--block-size", type=int, help="Prefix length of its blocks (default 26 / 122).")
@click.option("--nat-outgoing", is_flag=True, help="Masquerade traffic leaving the pools.")
@click.option(
    "--node-selector",
    default="all()",
    show_default=True,
    help="Label selector of the nodes that may use the pool.",
)
@click.option("--disabled", is_flag=True, help="Create it disabled (no new allocations).")
@click.option("--disable-bgp-export", is_flag=True, help="Do not announce its blocks over BGP.")
@click.pass_context
def pool_add(ctx: click.Context, name: str, cidr: str, block_size: int | None,
             nat_outgoing: bool, node_selector: str, disabled: bool,
             disable_bgp_export: bool) -> None:  # fmt: skip
    """Create IP pool NAME (refused if it overlaps another pool)."""
    ctx.meta[_RESOURCE] = f"IPPool {name}"
    spec: dict[str, Any] = {"cidr": cidr, "natOutgoing": nat_outgoing, "disabled": disabled,
                            "nodeSelector": node_selector, "disableBGPExport": disable_bgp_export}  # fmt: skip
    if block_size is not None:
        spec["blockSize"] = block_size
    new = Pool.from_spec(name, spec)
    run(ctx, lambda s: s.res.create_pool(new))
    click.echo(f"IPPool {name} created ({new.cidr}, /{new.block_size} blocks)")


@pool.command("list")
@output_option
@click.pass_context
def pool_list(ctx: click.Context, fmt: str) -> None:
    """List IP pools."""
    docs = run(ctx, lambda s: ry.get(s.res, ry.IPPOOL, None))
    emit_resources(ry.IPPOOL, docs, fmt, single=False)


def _usage_json(u: PoolUsage) -> dict[str, Any]:
    return {
        "name": u.pool.name, "cidr": str(u.pool.cidr), "ipsTotal": u.total,
        "ipsInUse": u.in_use, "ipsFree": u.total - u.in_use,
        "blocks": [{"cidr": str(b.cidr), "node": b.node, "state": b.state, "ipsTotal": b.total,
                    "ipsInUse": b.in_use, "ipsFree": b.total - b.in_use} for b in u.blocks],
    }  # fmt: skip


@pool.command("show")
@click.argument("name")
@output_option
@click.pass_context
def pool_show(ctx: click.Context, name: str, fmt: str) -> None:
    """Show IP pool NAME and how much of it is in use."""
    ctx.meta[_RESOURCE] = f"IPPool {name}"

    async def fetch(s: Services) -> tuple[Pool, PoolUsage | None]:
        _, p = await s.res.get_pool(name)
        usage, _ = await s.maint.usage()
        return p, next((u for u in usage if u.pool.name == name), None)

    p, u = run(ctx, fetch)
    usage: dict[str, Any] = _usage_json(u) if u else {"ipsTotal": p.cidr.num_addresses, "ipsInUse": 0,
                                       "ipsFree": p.cidr.num_addresses, "blocks": []}  # fmt: skip
    data = {**ry.pool_resource(p), "status": {k: v for k, v in usage.items()
                                              if k not in ("name", "cidr")}}  # fmt: skip

    def render() -> str:
        total, used = usage["ipsTotal"], usage["ipsInUse"]
        head = properties([
            ("Name", p.name), ("CIDR", p.cidr), ("Block size", p.block_size),
            ("NAT outgoing", p.nat_outgoing), ("Disabled", p.disabled),
            ("Disable BGP export", p.disable_bgp_export), ("Node selector", p.node_selector),
            ("IPs total", total), ("IPs in use", percent(used, total)),
            ("IPs free", percent(total - used, total)), ("Blocks", len(usage["blocks"]))])  # fmt: skip
        if not usage["blocks"]:
            return head
        rows = [[b["cidr"], b["node"] or "", b["state"], b["ipsTotal"],
                 percent(b["ipsInUse"], b["ipsTotal"]), percent(b["ipsFree"], b["ipsTotal"])]
                for b in usage["blocks"]]  # fmt: skip
        return (
            head
            + "\n\n"
            + table(["BLOCK", "NODE", "STATE", "IPS TOTAL", "IPS IN USE", "IPS FREE"], rows)
        )

    emit(data, fmt, render)


def _set_disabled(ctx: click.Context, name: str, disabled: bool) -> None:
    ctx.meta[_RESOURCE] = f"IPPool {name}"
    run(ctx, lambda s: s.res.set_pool_disabled(name, disabled))
    click.echo(f"IPPool {name} {'disabled' if disabled else 'enabled'}")


@pool.command("enable")
@click.argument("name")
@click.pass_context
def pool_enable(ctx: click.Context, name: str) -> None:
    """Allow new allocations from IP pool NAME."""
    _set_disabled(ctx, name, False)


@pool.command("disable")
@click.argument("name")
@click.pass_context
def pool_disable(ctx: click.Context, name: str) -> None:
    """Stop new allocations from IP pool NAME (addresses in use are kept)."""
    _set_disabled(ctx, name, True)


@pool.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Release the pool's addresses in use first.")
@click.pass_context
def pool_delete(ctx: click.Context, name: str, force: bool) -> None:
    """Delete IP pool NAME; refused while addresses are in use unless --force."""
    ctx.meta[_RESOURCE] = f"IPPool {name}"
    if force:
        progress(f"Deleting IPPool {name}: releasing its addresses and blocks...")
    released = run(ctx, lambda s: s.maint.delete_pool(name, force))
    click.echo(f"IPPool {name} deleted" + (f" (released {released} addresses)" if force else ""))


# ipam ----------------------------------------------------------------------------------------


@main.group()
def ipam() -> None:
    """IP address management: usage, integrity checks, release, garbage collection."""


@ipam.command("show")
@click.option("--show-blocks", is_flag=True, help="Also show every block of each pool.")
@click.option(
    "--show-borrowed", is_flag=True, help="Show addresses borrowed from other nodes' blocks."
)
@click.option("--ip", "ip_text", metavar="IP", help="Show who holds this address.")
@click.option("--show-configuration", is_flag=True, help="Show the IPAM configuration.")
@output_option
@click.pass_context
def ipam_show(ctx: click.Context, show_blocks: bool, show_borrowed: bool, ip_text: str | None,
              show_configuration: bool, fmt: str) -> None:  # fmt: skip
    """Show IP usage per pool (and block), borrowed addresses, one address, or the config."""
    if ip_text is not None:
        _show_ip(ctx, ip_text, fmt)
    elif show_configuration:
        _show_config(run(ctx, lambda s: s.res.get_config()), fmt)
    else:
        _show_usage(ctx, show_blocks, show_borrowed, fmt)


def _show_usage(ctx: click.Context, show_blocks: bool, show_borrowed: bool, fmt: str) -> None:
    async def fetch(s: Services) -> tuple[list[PoolUsage], list[dict[str, str]]]:
        usage, borrowed = await s.maint.usage()
        rows = []
        for b in borrowed if show_borrowed else ():
            found = await s.maint.lookup(ipaddress.ip_address(b.ip))
            owner = found[1].owner(found[2]) if found else None
            attrs = dict(owner.secondary) if owner else {}
            pod = attrs.get("pod")
            rows.append({"ip": b.ip, "borrowingNode": b.borrowing_node, "block": b.block,
                         "blockOwner": b.block_owner, "type": attrs.get("type", "pod" if pod else ""),
                         "allocatedTo": f"{attrs.get('namespace', '')}/{pod}" if pod else b.handle,
                         "handle": b.handle})  # fmt: skip
        return usage, rows

    usage, borrowed = run(ctx, fetch)
    data: dict[str, Any] = {}
    if show_blocks or not show_borrowed:
        data["pools"] = [_usage_json(u) for u in usage]
        if not show_blocks:
            for p in data["pools"]:
                del p["blocks"]
    if show_borrowed:
        data["borrowed"] = borrowed

    def render() -> str:
        parts = []
        if "pools" in data:
            rows: list[list[object]] = []
            for u in usage:
                rows.append(["IP Pool", u.pool.cidr, u.total, percent(u.in_use, u.total),
                             percent(u.total - u.in_use, u.total)])  # fmt: skip
                for b in u.blocks if show_blocks else ():
                    rows.append(["Block", b.cidr, b.total, percent(b.in_use, b.total),
                                 percent(b.total - b.in_use, b.total)])  # fmt: skip
            parts.append(boxed(["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
                               rows, right=(2,)))  # fmt: skip
        if show_borrowed:
            parts.append(boxed(
                ["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"],
                [[b["ip"], b["borrowingNode"], b["block"], b["blockOwner"], b["type"],
                  b["allocatedTo"]] for b in borrowed]))  # fmt: skip
        return "\n".join(parts)

    emit(data, fmt, render)


def _show_ip(ctx: click.Context, ip_text: str, fmt: str) -> None:
    ip = parse_ip(ip_text, "--ip")
    found = run(ctx, lambda s: s.maint.lookup(ip))
    owner = found[1].owner(found[2]) if found else None
    data: dict[str, Any] = {"ip": str(ip), "inUse": owner is not None}
    if found and owner:
        cidr, blk, o = found
        data.update(handle=owner.handle, attributes=dict(owner.secondary), block=str(cidr),
                    blockAffinity=blk.affinity, sequence=blk.seq_for.get(o))  # fmt: skip

    def render() -> str:
        if owner is None:
            return f"IP {ip} is not currently assigned"
        lines = [f"IP {ip} is in use", f"Handle: {data['handle']}", "Attributes:"]
        lines += [f"  {k}: {v}" for k, v in sorted(data["attributes"].items())]
        lines += [f"Block: {data['block']} (affinity {data['blockAffinity'] or 'none'})",
                  f"Sequence: {data['sequence']}"]  # fmt: skip
        return "\n".join(lines)

    emit(data, fmt, render)


def _show_config(cfg: IPAMConfig, fmt: str) -> None:
    data = {**cfg.to_json(), "autoAllocateBlocks": True}

    def render() -> str:
        rows: list[list[object]] = [["StrictAffinity", cfg.strict_affinity],
                ["MaxBlocksPerHost", cfg.max_blocks_per_host or "0 (no limit)"],
                ["AutoAllocateBlocks", True]]  # fmt: skip
        return boxed(["PROPERTY", "VALUE"], rows)

    emit(data, fmt, render)


_PROBLEM_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "ips_without_handle": lambda e: (
        f"IP {e.get('ip')} in block {e.get('block')} (handle "
        f"{e.get('handle')}, node {e.get('node')}) has no matching handle record"
    ),
    "handles_without_ips": lambda e: (
        f"Handle {e.get('handle')} records {e.get('expected')} IPs "
        f"in block {e.get('block')}, the block holds {e.get('found')}"
    ),
    "affinities_of_missing_nodes": lambda e: (
        f"Block {e.get('cidr')} is affine to node "
        f"{e.get('node')} ({e.get('state')}), which does not exist"
    ),
    "blocks_outside_pools": lambda e: (
        f"Block {e.get('cidr')} ({e.get('inUse')} IPs in use) is outside every IP pool"
    ),
    "stuck_affinities": lambda e: (
        f"Affinity of node {e.get('node')} for block {e.get('cidr')} "
        f"is stuck in state {e.get('state')}"
    ),
    "leaked": lambda e: (
        f"IP {e.get('ip')} (handle {e.get('handle')}) is not among the live "
        f"handles of node {e.get('node')}"
    ),
}


@ipam.command("check")
@click.option(
    "-o",
    "--output",
    "report_path",
    metavar="FILE",
    help="Write the machine-readable report (for `ipam release --from-report`).",
)
@click.option("--live-handles", "live_path", metavar="FILE",
              help='JSON {"node": ["handle", ...]}: also report allocations of those nodes '
              "whose handle is not live.")  # fmt: skip
@click.pass_context
def ipam_check(ctx: click.Context, report_path: str | None, live_path: str | None) -> None:
    """Check IPAM integrity. Exit 0 when clean, 3 when problems were found."""
    live = None
    if live_path is not None:
        live = read_json(live_path, "live handles")
        if not isinstance(live, dict) or not all(
            isinstance(v, list) and all(isinstance(h, str) for h in v) for v in live.values()
        ):
            raise CLIError('must be a JSON object {"node": ["handle", ...]}', live_path)
    click.echo("Loading all IPAM blocks...")
    rep = run(ctx, lambda s: s.maint.check(live))
    click.echo(f"Found {rep.blocks} IPAM blocks.")
    click.echo(f"Found {rep.ips_in_use} IPs in use.")
    for f in CheckReport.PROBLEM_FIELDS:
        for e in getattr(rep, f):
            click.echo(f"  {_PROBLEM_LINES[f](e)}")
    click.echo(f"Found {rep.problems} problems." if rep.problems else "No problems found.")
    if report_path is not None:
        try:
            Path(report_path).write_text(json.dumps(rep.to_json(), indent=2) + "\n")
        except OSError as e:
            raise CLIError(f"cannot write the report: {e.strerror}", report_path) from e
        click.echo(f"Report written to {report_path}.")
    if rep.problems:
        ctx.exit(errors.EXIT_PROBLEMS)


@ipam.command("release")
@click.option("--ip", "ip_text", metavar="IP", help="Release this address.")
@click.option("--sequence", type=int, help="Only if its allocation still has this sequence number.")
@click.option(
    "--from-report",
    "report_path",
    metavar="FILE",
    help="Repair everything an `ipam check -o FILE` report found.",
)
@click.pass_context
def ipam_release(ctx: click.Context, ip_text: str | None, sequence: int | None,
                 report_path: str | None) -> None:  # fmt: skip
    """Release one address (--ip) or repair what a check report found (--from-report)."""
    if (ip_text is None) == (report_path is None):
        raise click.UsageError("give exactly one of --ip or --from-report")
    if report_path is not None:
        _release_report(ctx, report_path)
        return
    assert ip_text is not None
    ip = parse_ip(ip_text, "--ip")
    released, stale = run(ctx, lambda s: s.alloc.release_ips({ip: sequence}))
    if stale:
        raise StaleError(f"IP {ip} not released: sequence number {sequence} no longer matches "
                         "(the address was reassigned since)")  # fmt: skip
    click.echo(f"Released IP {ip}" if released else f"IP {ip} is not assigned; nothing to release")


def _load_report(path: str) -> CheckReport:
    raw = read_json(path, "check report")
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        rep = CheckReport.from_json(raw)
        for e in rep.ips_without_handle + rep.leaked:
            ipaddress.ip_address(e["ip"])
            if e.get("sequence") is not None and not isinstance(e["sequence"], int):
                raise TypeError(f"sequence {e['sequence']!r} is not an integer")
        for e in rep.handles_without_ips:
            str(e["handle"])
        for e in rep.affinities_of_missing_nodes + rep.stuck_affinities:
            str(e["node"])
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(f"not a valid IPAM check report: {e}", path) from e
    return rep


def _release_report(ctx: click.Context, path: str) -> None:
    rep = _load_report(path)
    progress(f"Releasing from {path}: {len(rep.ips_without_handle) + len(rep.leaked)} IPs, "
             f"{len(rep.handles_without_ips)} handles, {len(rep.affinities_of_missing_nodes)} "
             f"affinities of missing nodes, {len(rep.stuck_affinities)} stuck affinities...")  # fmt: skip
    counts = run(ctx, lambda s: s.maint.release_from_report(rep))
    click.echo(f"Released {counts['ips']} IPs, repaired {counts['handles']} handles, "
               f"released {counts['nodes']} missing nodes, finished {counts['blocks']} blocks.")  # fmt: skip


@ipam.command("gc")
@click.option("--node", required=True, help="The node whose allocations are collected.")
@click.option(
    "--live-handles",
    "live_path",
    required=True,
    metavar="FILE",
    help='JSON list of the live handle ids on the node ("-" for stdin).',
)
@output_option
@click.pass_context
def ipam_gc(ctx: click.Context, node: str, live_path: str, fmt: str) -> None:
    """Release every allocation of NODE whose handle is not live, then its empty blocks."""
    live = read_json(live_path, "live handles")
    if not isinstance(live, list) or not all(isinstance(h, str) for h in live):
        raise CLIError("must be a JSON list of handle ids", live_path)
    progress(f"Collecting garbage on node {node} ({len(live)} live handles)...")
    result = run(ctx, lambda s: s.maint.gc_node(node, live))
    n_ips = sum(len(v) for v in result.released.values())

    def render() -> str:
        lines = [f"Released {h}: {', '.join(ips) or '(no addresses)'}"
                 for h, ips in sorted(result.released.items())]  # fmt: skip
        lines += [f"Released block {b}" for b in result.released_blocks]
        lines += [f"Finished deleting block {b}" for b in result.finished_deletions]
        lines.append(f"Released {n_ips} addresses of {len(result.released)} handles, "
                     f"{len(result.released_blocks)} blocks.")  # fmt: skip
        return "\n".join(lines)

    emit(result.to_json(), fmt, render)


@ipam.command("config")
@click.option(
    "--strict-affinity/--no-strict-affinity",
    default=None,
    help="Never borrow addresses from other nodes' blocks.",
)
@click.option("--max-blocks-per-host", type=int, help="Blocks one node may claim (0: no limit).")
@output_option
@click.pass_context
def ipam_config(ctx: click.Context, strict_affinity: bool | None,
                max_blocks_per_host: int | None, fmt: str) -> None:  # fmt: skip
    """Show the IPAM configuration, or change the settings given."""
    ctx.meta[_RESOURCE] = "IPAMConfig default"

    def change(cfg: IPAMConfig) -> IPAMConfig:
        d = cfg.to_json()
        if strict_affinity is not None:
            d["strictAffinity"] = strict_affinity
        if max_blocks_per_host is not None:
            d["maxBlocksPerHost"] = max_blocks_per_host
        try:
            return IPAMConfig.from_json(d)
        except ValidationError as e:
            raise ValidationError(f"--{_dashed(e.field)}", e.problem, e.resource) from e

    async def update(s: Services) -> IPAMConfig:
        if strict_affinity is None and max_blocks_per_host is None:
            return await s.res.get_config()
        return await s.res.update_config(change)  # compare-and-swap: no lost concurrent change

    _show_config(run(ctx, update), fmt)


def _dashed(camel: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in camel)


# resources -----------------------------------------------------------------------------------


@main.command("apply")
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    metavar="FILE",
    help='YAML file with one or more resources ("-" for stdin).',
)
@click.pass_context
def apply_cmd(ctx: click.Context, path: str) -> None:
    """Create or update resources (IPPool, IPReservation, IPAMConfig, Node) from YAML."""
    docs = ry.parse_documents(read_input(path, "resources"), "stdin" if path == "-" else path)

    async def apply_all(s: Services) -> None:
        for d in docs:
            ctx.meta[_RESOURCE] = d.resource
            click.echo(f"{d.resource} {await ry.apply(s.res, d)}")

    run(ctx, apply_all)


@main.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@output_option
@click.pass_context
def get_cmd(ctx: click.Context, kind: str, name: str | None, fmt: str) -> None:
    """Show resources of KIND (ippool, ipreservation, ipamconfig, node), or the one NAME.

    `get KIND -o yaml` prints documents that `apply -f` accepts.
    """
    k = ry.kind_of(kind)
    ctx.meta[_RESOURCE] = f"{k} {name}" if name else k
    docs = run(ctx, lambda s: ry.get(s.res, k, name))
    emit_resources(k, docs, fmt, single=name is not None or k == ry.IPAMCONFIG)


@main.command("delete")
@click.argument("kind")
@click.argument("name")
@click.pass_context
def delete_cmd(ctx: click.Context, kind: str, name: str) -> None:
    """Delete resource NAME of KIND (an IPPool in use is refused: see `pool delete --force`)."""
    k = ry.kind_of(kind)
    ctx.meta[_RESOURCE] = f"{k} {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, k, name, progress)))


# node ----------------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """Nodes known to the fabric."""


@node.command("list")
@output_option
@click.pass_context
def node_list(ctx: click.Context, fmt: str) -> None:
    """List nodes."""
    docs = run(ctx, lambda s: ry.get(s.res, ry.NODE, None))
    emit_resources(ry.NODE, docs, fmt, single=False)


@node.command("delete")
@click.argument("name")
@click.pass_context
def node_delete(ctx: click.Context, name: str) -> None:
    """Delete node NAME after releasing its addresses and blocks."""
    ctx.meta[_RESOURCE] = f"Node {name}"
    click.echo(run(ctx, lambda s: ry.delete(s.maint, ry.NODE, name, progress)))
