"""``fabricctl label pod|namespace`` and ``fabricctl policy trace``.

Heavy modules (the etcd stack, the policy compiler) are imported inside the commands so
``fabricctl --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

import click

from fabric.cli.common import RESOURCE, Command, Group, Services, emit, output_option, run
from fabric.errors import CLIError

if TYPE_CHECKING:
    from fabric.policy.model import Endpoint, Protocol
    from fabric.policy.verdict import DirectionVerdict, RuleCheck, Trace

_LABEL_KINDS = {"pod": "Pod", "pods": "Pod", "po": "Pod",
                "namespace": "Namespace", "namespaces": "Namespace", "ns": "Namespace"}  # fmt: skip


# label ---------------------------------------------------------------------------------------


@click.command("label", cls=Command)
@click.argument("kind", metavar="pod|namespace")
@click.argument("target", metavar="NS/NAME|NAME")
@click.argument("labels", nargs=-1, required=True, metavar="KEY=VALUE|KEY-...")
@click.option("-n", "--namespace", help="The pod's namespace when TARGET is a plain NAME.")
@output_option
@click.pass_context
def label(ctx: click.Context, kind: str, target: str, labels: tuple[str, ...],
          namespace: str | None, fmt: str) -> None:  # fmt: skip
    """Set (KEY=VALUE) or remove (KEY-) labels of a pod (NS/NAME) or a namespace (NAME), as
    `kubectl label` does. A pod or namespace without an object yet (a pod attached by the
    CNI plugin) gets one holding just these labels. Policy selectors follow at once."""
    from fabric.resources import documents as ry
    from fabric.resources import policy_documents as pd
    from fabric.resources.policy_model import to_document
    from fabric.resources.policy_store import PolicyStore

    k = _LABEL_KINDS.get(kind.lower())
    if k is None:
        raise CLIError(f"{kind!r}: only pod and namespace labels are set here "
                       "(nodes: `fabricctl node label`)")  # fmt: skip
    name, ns = pd.split_name(k, target, namespace)
    resource = f"{k} {ns}/{name}" if ns else f"{k} {name}"
    ctx.meta[RESOURCE] = resource
    sets, removes = ry.parse_labels(resource, labels)
    new, old = run(ctx, lambda s: PolicyStore(s.store).label(k, name, ns, sets, removes))
    what = "unchanged" if new == old else "created" if old is None else "labeled"
    emit(to_document(new), fmt, lambda: f"{resource} {what}")


# policy trace --------------------------------------------------------------------------------


@click.group("policy", cls=Group)
def policy() -> None:
    """NetworkPolicy: what the compiled rules do to a connection, and what they denied."""


def _protocol(text: str) -> tuple[int, Protocol]:
    from fabric.policy.model import Protocol

    port_s, _, proto_s = text.partition("/")
    try:
        port = int(port_s)
        proto = Protocol((proto_s or "TCP").upper())
    except ValueError:
        raise CLIError(f"{text!r} must be PORT/PROTOCOL, like 80/TCP, 53/UDP or 80 (TCP)",
                       "policy trace", "PORT/PROTO") from None  # fmt: skip
    if not 1 <= port <= 65535:
        raise CLIError(f"{port} is not a port number (1-65535)", "policy trace", "PORT/PROTO")
    return port, proto


def _who(text: str, what: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    from fabric.policy.verdict import HOST

    if text == HOST and what == "SRC":
        return HOST
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    return text if "/" in text else f"default/{text}"


async def _inputs(s: Services) -> tuple[list[Any], list[Any], list[Endpoint]]:
    from fabric.policy.endpoints import allocations, build_endpoints
    from fabric.resources.policy_store import PolicyStore

    pols, nss, pods, _ = await PolicyStore(s.store).snapshot()
    blocks, _ = await s.alloc.blocks.list_blocks()
    eps = build_endpoints(allocations(b for _, b in blocks.values()), pods, None)
    return pols, nss, eps


@policy.command("trace")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.argument("port_proto", metavar="PORT/PROTO")
@output_option
@click.pass_context
def trace_cmd(ctx: click.Context, src: str, dst: str, port_proto: str, fmt: str) -> None:
    """Would a new connection SRC -> DST PORT/PROTO be allowed? SRC and DST are NS/POD (a
    plain NAME is in namespace default) or an IP address; SRC may be `host` (the
    destination's own node). Shows the egress verdict at SRC, the ingress verdict at DST,
    every policy considered and why it did or did not match, and every rule of the
    selecting ones. Computed from etcd with the compiler fabricd programs nft from."""
    from fabric.policy.verdict import ProbeError, trace

    port, proto = _protocol(port_proto)
    s_who, d_who = _who(src, "SRC"), _who(dst, "DST")
    ctx.meta[RESOURCE] = "policy trace"
    pols, nss, eps = run(ctx, _inputs)
    try:
        t = trace(pols, nss, eps, s_who, d_who, port, proto)
    except ProbeError as e:
        raise CLIError(str(e), "policy trace") from e
    emit(trace_json(t), fmt, lambda: trace_table(t))


def _rule_json(c: RuleCheck) -> dict[str, Any]:
    return {"rule": c.label, "matched": c.matched, "peer": c.peer, "port": c.port}


def _direction_json(d: DirectionVerdict) -> dict[str, Any]:
    return {"endpoint": d.endpoint, "allowed": d.allowed, "isolated": d.isolated,
            "policies": list(d.policies),
            "rule": f"{d.rule.policy} {d.direction.lower()}[{d.rule.index}]" if d.rule else None,
            "reason": d.reason}  # fmt: skip


def trace_json(t: Trace) -> dict[str, Any]:
    v = t.verdict
    return {
        "src": v.src, "dst": v.dst, "saddr": str(v.saddr) if v.saddr else None,
        "daddr": str(v.daddr), "port": v.port, "protocol": str(v.protocol),
        "allowed": v.allowed, "reason": v.reason,
        "egress": _direction_json(v.egress), "ingress": _direction_json(v.ingress),
        "policies": [{"policy": c.policy, "direction": str(c.direction), "endpoint": c.endpoint,
                      "selected": c.selected, "why": c.why,
                      "rules": [_rule_json(r) for r in c.rules]} for c in t.policies],
    }  # fmt: skip


def trace_table(t: Trace) -> str:
    from fabric.cli.output import properties, table

    v = t.verdict
    head = properties([
        ("Verdict", "allowed" if v.allowed else "denied"), ("Reason", v.reason),
        ("Source", f"{v.src} ({v.saddr})" if v.saddr else v.src),
        ("Destination", f"{v.dst} ({v.daddr}) {v.port}/{v.protocol}"),
        ("Egress", f"{v.egress.endpoint or '-'}: {v.egress.reason}"),
        ("Ingress", f"{v.ingress.endpoint or '-'}: {v.ingress.reason}")])  # fmt: skip
    if not t.policies:
        return head + "\n\nNo NetworkPolicy exists."
    pol_rows = [[str(c.direction), c.endpoint, c.policy, "yes" if c.selected else "no", c.why]
                for c in t.policies]  # fmt: skip
    out = head + "\n\n" + table(["DIRECTION", "ENDPOINT", "POLICY", "SELECTS", "WHY"], pol_rows)
    rules = [[r.label, "yes" if r.matched else "no", r.peer, r.port]
             for c in t.policies for r in c.rules]  # fmt: skip
    if rules:
        out += "\n\n" + table(["RULE", "MATCH", "PEER", "PORT"], rules)
    return out


# delete -f -------------------------------------------------------------------------------------


def delete_file(ctx: click.Context, path: str) -> None:
    """``delete -f FILE``: every resource the file names, in order; the missing ones are
    reported and make the exit code 1, the others are still deleted (as kubectl does)."""
    from fabric.cli.common import progress, read_input
    from fabric.resources import documents as ry
    from ipam.errors import NotFoundError

    docs = ry.parse_documents(read_input(path, "resources"), "stdin" if path == "-" else path)

    async def delete_all(s: Services) -> int:
        missing = 0
        for d in docs:
            ctx.meta[RESOURCE] = d.resource
            ns = getattr(d.obj, "namespace", None)
            try:
                click.echo(await ry.delete(s.maint, d.kind, d.name, progress, ns))
            except NotFoundError as e:
                click.echo(str(e), err=True)
                missing += 1
        return missing

    if run(ctx, delete_all):
        ctx.exit(1)


# policy denied (fabric/cli/denied.py) ----------------------------------------------------------

from fabric.cli.denied import denied as _denied  # noqa: E402

policy.add_command(_denied)
