"""The demo's NetworkPolicy step: a deny-all in one namespace, then an allow rule opening
one port, with a probe before and after each (PASS/FAIL lines like the other steps).

Two pods through the installed CNI plugin with Kubernetes arguments: ``front/client`` on
the first host (rack 1) and ``shop/web`` on the last (rack 2), both running
lab/netpol_agent.py (TCP servers on 80 and 81, a prober). The Namespace and Pod objects
and the policies go in with ``fabricctl apply -f -``, as ``kubectl get -o yaml`` output
would.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import yaml

from lab import netpol
from lab.runner import Lab


class Demo(Protocol):
    """What this step uses of the demo (lab.demo.Demo), so neither imports the other's
    class: the demo calls the step, the step prints through the demo."""

    lab: Lab
    ctl: list[str]

    def heading(self, text: str) -> None: ...

    def run(self, node: str, argv: list[str], show: bool = True,
            stdin: str | None = None) -> tuple[int, str]: ...  # fmt: skip

    def check(self, what: str, ok: bool) -> bool: ...


OBJECTS: list[dict[str, Any]] = [
    netpol.namespace_doc("front", {"team": "front"}),
    netpol.namespace_doc("shop", {"team": "shop"}),
    netpol.pod_doc("front", "client", {"app": "client"}, protocols=("TCP",)),
    netpol.pod_doc("shop", "web", {"app": "web"}, protocols=("TCP",)),
]
DENY_ALL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "deny-all"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}  # fmt: skip
ALLOW_80 = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "shop", "name": "web-from-front-on-80"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "front"}}}],
                                  "ports": [{"protocol": "TCP", "port": 80}]}]}}  # fmt: skip
NODE_PROBE = (
    "import socket,sys\n"
    "try:\n socket.create_connection((sys.argv[1], 80), timeout=1).close(); print('ok')\n"
    "except OSError as e:\n print(e)\n"
)


def _wait(
    client: netpol.PolicyPod, ip: str, want: dict[int, bool], timeout: float = 15
) -> dict[int, bool]:
    """Probe until the ports answer as ``want`` or ``timeout`` s pass; the last answer."""
    end = time.monotonic() + timeout
    while True:
        got = netpol.reach(client, ip, sorted(want))
        if got == want or time.monotonic() > end:
            return got
        time.sleep(0.2)


def _show(got: dict[int, bool]) -> str:
    return ", ".join(f"TCP {p}: {'connects' if ok else 'blocked'}" for p, ok in sorted(got.items()))


def policy_step(demo: Demo, near: str, far: str) -> None:
    lab = demo.lab
    demo.heading("11. NetworkPolicy: a deny-all in namespace shop, then one port opened")
    apply = [*demo.ctl, "apply", "-f", "-"]
    demo.run(near, apply, stdin=netpol.as_list(OBJECTS))
    client = netpol.attach(lab, near, "front/client", conf=None)
    web = netpol.attach(lab, far, "shop/web", conf=None)
    try:
        client.ready()
        web.ready()
        ip = web.ips[4]
        print(f"  front/client on {near} ({client.ips[4]}), shop/web on {far} ({ip})")
        got = _wait(client, ip, {80: True, 81: True})
        print(f"  before any policy: {_show(got)}")
        demo.check("front/client reaches shop/web on TCP 80 and 81 (no policy)",
                   got == {80: True, 81: True})  # fmt: skip

        print(yaml.safe_dump(DENY_ALL, sort_keys=False).rstrip())
        demo.run(near, apply, stdin=yaml.safe_dump(DENY_ALL))
        got = _wait(client, ip, {80: False, 81: False})
        print(f"  after deny-all: {_show(got)}")
        demo.check("deny-all in shop blocks front/client -> shop/web on 80 and 81",
                   got == {80: False, 81: False})  # fmt: skip
        r = lab.exec(far, [netpol.AGENT_PYTHON, "-I", "-S", "-c", NODE_PROBE, ip])
        demo.check(f"{far} itself still reaches shop/web:80 (probes from the node pass)",
                   r.stdout.strip() == "ok")  # fmt: skip

        print(yaml.safe_dump(ALLOW_80, sort_keys=False).rstrip())
        demo.run(near, apply, stdin=yaml.safe_dump(ALLOW_80))
        got = _wait(client, ip, {80: True, 81: False})
        print(f"  after the allow rule: {_show(got)}")
        demo.check("the allow rule opens TCP 80 from namespace front, 81 stays blocked",
                   got == {80: True, 81: False})  # fmt: skip
        demo.run(near, [*demo.ctl, "get", "networkpolicy", "-n", "shop"])
        demo.run(near, [*demo.ctl, "policy", "trace", "front/client", "shop/web", "81/TCP"])
        demo.run(far, ["nft", "list", "map", "inet", "fabric_filter", "to_pod"])
    finally:
        client.stop()
        web.stop()
