"""The lab by hand: ``python -m lab up TOPOLOGY --fabric``, ``python -m lab fabricd
start|stop|restart NODE``, ``python -m lab pod add|del|list``.

Pods are made as the demo makes them (lab/pods.py): a network namespace of the lab, then the
installed ``fabric`` plugin exec'd in the host's namespace with the CNI_* environment. The
pod list is what each host's fabricd records (its CNI state dir), so it is the truth of the
node, whoever made the pods.
"""

from __future__ import annotations

import functools
import json
import signal
from pathlib import Path
from typing import Any

import click

from lab import netns, pods
from lab.cli_common import OUTPUT, emit, pick, progress
from lab.runner import Lab
from lab.view import LabError

SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
NAME = click.option("--name", "-n", "lab_name", help="Lab name (default: the only lab up).")


def fabric_up(lab: Lab, timeout: float) -> None:
    """Routers' sessions Established, the datastore configured, fabricd on every host and
    ready, the CNI plugin installed on every host."""
    for r in (*lab.nodes("frr"), *lab.nodes("bird")):
        lab.progress(f"waiting for the BGP sessions of {r}")
        lab.wait_for(functools.partial(lab.established, r), timeout, what=f"BGP sessions of {r}")
    lab.start_fabric(timeout)
    lab.progress("installing the CNI plugin on every host")
    pods.install(lab)


def _attach(name: str | None) -> Lab:
    return Lab.attach(pick(name), progress=progress)


def _host(lab: Lab, node: str) -> str:
    if node not in lab.nodes("node"):
        raise LabError(f"{node!r} is not a host of lab {lab.name} ({', '.join(lab.nodes('node'))})")
    return node


def _start(lab: Lab, node: str, timeout: float) -> None:
    lab.configure_fabric()  # idempotent: a lab brought up without --fabric
    lab.start_fabricd(node)
    pods.install(lab, [node])
    lab.wait_for(lambda: lab.health(node)[0] == 200, timeout, what=f"fabricd in {node} ready")


@click.group()
def fabricd() -> None:
    """fabricd in a host of a running lab."""


@fabricd.command("start")
@click.argument("node")
@NAME
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for /readyz.")
def fabricd_start(node: str, lab_name: str | None, timeout: float) -> None:
    """Start fabricd in NODE (configures the datastore if needed, installs the CNI plugin)
    and wait until it is ready."""
    try:
        lab = _attach(lab_name)
        _start(lab, _host(lab, node), timeout)
    except (LabError, TimeoutError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"fabricd in {node} is ready (pid {lab.fabricd_pid(node)})")


@fabricd.command("stop")
@click.argument("node")
@NAME
@click.option("--signal", "sig", type=click.Choice(sorted(SIGNALS)), default="TERM",
              show_default=True, help="KILL: as a crash (nothing is cleaned up).")  # fmt: skip
def fabricd_stop(node: str, lab_name: str | None, sig: str) -> None:
    """Stop fabricd in NODE by its recorded PID and wait until it is gone. Pods keep their
    routes; the plugin answers ADD with 11 and records DELs until fabricd is back."""
    try:
        lab = _attach(lab_name)
        was = lab.fabricd_running(_host(lab, node))
        lab.stop_fabricd(node, SIGNALS[sig])
    except (LabError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"fabricd in {node} stopped (SIG{sig})" if was else f"fabricd in {node} was not running"
    )


@fabricd.command("restart")
@click.argument("node")
@NAME
@click.option("--signal", "sig", type=click.Choice(sorted(SIGNALS)), default="TERM",
              show_default=True, help="How to stop it first.")  # fmt: skip
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for /readyz.")
def fabricd_restart(node: str, lab_name: str | None, sig: str, timeout: float) -> None:
    """Stop fabricd in NODE (if running), start it again, wait until it is ready."""
    try:
        lab = _attach(lab_name)
        lab.stop_fabricd(_host(lab, node), SIGNALS[sig])
        _start(lab, node, timeout)
    except (LabError, TimeoutError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"fabricd in {node} is ready (pid {lab.fabricd_pid(node)})")


@click.group()
def pod() -> None:
    """Pods attached through the installed CNI plugin, as a container runtime does."""


def _records(lab: Lab, node: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for host in [node] if node else lab.nodes("node"):
        d = pods.state_dir(lab, host)
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                r = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            rows.append({"node": host, "namespace": r.get("namespace") or "",
                         "name": r.get("pod") or r["containerID"],
                         "containerID": r["containerID"], "ips": r.get("ips") or [],
                         "netns": r.get("netns") or "", "phase": r.get("phase"),
                         "hostIfname": r.get("hostIfname")})  # fmt: skip
    return rows


def _show(rows: list[dict[str, Any]], output: str) -> None:
    table = [["NODE", "NAMESPACE", "NAME", "IP", "INTERFACE", "PHASE"]]
    for r in rows:
        ips = ",".join(i.split("/")[0] for i in r["ips"]) or "-"
        table.append([r["node"], r["namespace"] or "-", r["name"], ips, r["hostIfname"],
                      r["phase"]])  # fmt: skip
    emit(rows, output, table)


@pod.command("add")
@click.option("--node", help="The host (default: the first).")
@click.option("--ns", "namespace", default="default", show_default=True,
              help="The pod's namespace (K8S_POD_NAMESPACE).")  # fmt: skip
@click.option("--name", "name", help="The pod's name and container ID (default: pod<n>-<node>).")
@click.option("--ip", help="Ask for this address (CNI_ARGS IP=).")
@click.option("--lab", "lab_name", help="Lab name (default: the only lab up).")
@click.option("--output", "-o", type=OUTPUT, default="table", show_default=True)
def pod_add(node: str | None, namespace: str, name: str | None, ip: str | None,
            lab_name: str | None, output: str) -> None:  # fmt: skip
    """Attach a new pod: a network namespace, then CNI ADD through the installed plugin."""
    try:
        lab = _attach(lab_name)
        host = _host(lab, node) if node else lab.nodes("node")[0]
        if not (pods.cni_dir(lab, host) / "bin" / "fabric").exists():
            raise LabError(f"no CNI plugin in {host}: run `python -m lab fabricd start {host}`")
        if name and any(r["containerID"] == name for r in _records(lab, host)):
            raise LabError(f"a pod named {name} is already attached in {host}")
        args = f";IP={ip}" if ip else ""
        try:
            made = pods.add(lab, host, name, args=args, namespace=namespace)
        except pods.PodError:
            if name:  # leave nothing behind, as a runtime does after a failed ADD
                cid_ns = f"{lab.plan.prefix}p{name[:40]}"
                pods.cni(lab, host, "DEL", name, str(netns.NETNS_DIR / cid_ns), namespace=namespace)
                netns.delete(cid_ns)
            raise
    except (LabError, OSError) as e:
        raise click.ClickException(str(e)) from e
    _show([r for r in _records(lab, host) if r["containerID"] == made.name], output)


@pod.command("del")
@click.argument("names", nargs=-1, required=True)
@click.option("--node", help="Only on this host.")
@click.option("--ns", "namespace", help="Only in this namespace.")
@click.option("--lab", "lab_name", help="Lab name (default: the only lab up).")
def pod_del(names: tuple[str, ...], node: str | None, namespace: str | None,
            lab_name: str | None) -> None:  # fmt: skip
    """Detach pods NAMES (CNI DEL through the installed plugin), then remove their network
    namespaces, as a runtime does. With fabricd down, the DEL is recorded and succeeds."""
    try:
        lab = _attach(lab_name)
        rows = _records(lab, _host(lab, node) if node else None)
        for name in names:
            hits = [r for r in rows if name in (r["name"], r["containerID"])
                    and (namespace is None or r["namespace"] == namespace)]  # fmt: skip
            if len(hits) != 1:
                what = "no pod" if not hits else f"{len(hits)} pods (give --node or --ns)"
                raise LabError(f"{what} named {name!r} in lab {lab.name}")
            r = hits[0]
            code, doc = pods.cni(lab, r["node"], "DEL", r["containerID"], r["netns"],
                                 namespace=r["namespace"] or "default")  # fmt: skip
            if code != 0:
                raise LabError(f"CNI DEL of {name} on {r['node']} failed: {pods.why(doc)}")
            if r["netns"].startswith(str(netns.NETNS_DIR) + "/" + lab.plan.prefix):
                netns.delete(Path(r["netns"]).name)
            click.echo(f"pod {name} on {r['node']} deleted")
    except (LabError, OSError) as e:
        raise click.ClickException(str(e)) from e


@pod.command("list")
@click.option("--node", help="Only this host.")
@click.option("--ns", "namespace", help="Only this namespace.")
@click.option("--name", "name", help="Only this pod.")
@click.option("--lab", "lab_name", help="Lab name (default: the only lab up).")
@click.option("--output", "-o", type=OUTPUT, default="table", show_default=True)
def pod_list(node: str | None, namespace: str | None, name: str | None, lab_name: str | None,
             output: str) -> None:  # fmt: skip
    """The pods each host's fabricd has attached (its CNI state dir)."""
    try:
        lab = _attach(lab_name)
        rows = _records(lab, _host(lab, node) if node else None)
    except (LabError, OSError) as e:
        raise click.ClickException(str(e)) from e
    rows = [r for r in rows if (namespace is None or r["namespace"] == namespace)
            and (name is None or name in (r["name"], r["containerID"]))]  # fmt: skip
    _show(rows, output)
