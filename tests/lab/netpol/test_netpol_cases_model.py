"""The conformance cases against the compiler, without a lab: every step of every case is
compiled (fabric.policy.compiler) for the nine pods of the model, and verdict() of every
cell of every check must equal the case's expected matrix.

Two things are checked at once: that our encoding of the upstream expectations (extended to
all nine pods) is what the semantics give, and that the compiler agrees with it. The lab
suite (test_netpol_conformance.py) then checks the kernel does what both say.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from netpol_cases import CASES, Case

from fabric.policy.compiler import compile as compile_policies
from fabric.policy.model import Endpoint
from fabric.policy.verdict import verdict
from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod, Protocol
from lab import netpol

HOSTS = ("node1", "node2", "node3", "node4")


class Model:
    """The nine pods with made-up addresses, their objects, and the policies applied."""

    def __init__(self, sctp: bool = True) -> None:
        self.place = netpol.placement(HOSTS)
        protocols = ("TCP", "UDP", "SCTP") if sctp else ("TCP", "UDP")
        self.pods: dict[str, Pod] = {}
        for n, key in enumerate(self.place):
            ns, name = key.split("/")
            pod = decode(netpol.pod_doc(ns, name, protocols=protocols))
            assert isinstance(pod, Pod)
            self.pods[key] = pod
            del n
        self.namespaces: dict[str, Namespace] = {}
        for ns in netpol.NAMESPACES:
            obj = decode(netpol.namespace_doc(ns))
            assert isinstance(obj, Namespace)
            self.namespaces[ns] = obj
        self.policies: dict[str, NetworkPolicy] = {}
        self.ips = {
            key: (ipaddress.IPv4Address(f"10.244.{i}.{i + 10}"),
                  ipaddress.IPv6Address(f"fd00:244::{i}:{i + 10}"))
            for i, key in enumerate(self.place, start=1)
        }  # fmt: skip

    def values(self) -> dict[str, str]:
        out = {}
        for key, (v4, v6) in self.ips.items():
            for fam, ip in ((4, v4), (6, v6)):
                out[f"ip{fam}:{key}"] = str(ip)
                out[f"host{fam}:{key}"] = f"{ip}/{ip.max_prefixlen}"
                out[f"wide{fam}:{key}"] = str(ipaddress.ip_network(f"{ip}/4", strict=False))
        return out

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(p.namespace, p.name, self.ips[k], dict(p.labels), p.ports, self.place[k])
                for k, p in self.pods.items()]  # fmt: skip

    def relabel(self, kind: str, target: str, changes: dict[str, str | None]) -> None:
        if kind == "pod":
            pod = self.pods[target]
            labels = _changed(pod.labels, changes)
            self.pods[target] = Pod(pod.namespace, pod.name, labels, pod.ports)
        else:
            ns = self.namespaces[target]
            self.namespaces[target] = Namespace(ns.name, _changed(ns.labels, changes))


def _changed(labels: Any, changes: dict[str, str | None]) -> dict[str, str]:
    out = dict(labels)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.origin}:{c.name}")
def test_case_expectations_match_the_compiler(case: Case) -> None:
    m = Model()
    values = m.values()
    for n, step in enumerate(case.steps, start=1):
        for doc in step.apply:
            p = decode(netpol.substitute(doc, values))
            assert isinstance(p, NetworkPolicy)
            m.policies[p.key] = p
        for doc in step.delete:
            m.policies.pop(f"{doc['metadata']['namespace']}/{doc['metadata']['name']}")
        for kind, target, changes in step.label:
            m.relabel(kind, target, changes)
        compiled = compile_policies(m.policies.values(), m.namespaces.values(), m.endpoints(),
                                    None)  # fmt: skip
        for chk in step.checks:
            expect = netpol.Reachability(tuple(m.pods))
            for src, dst, ok in chk.expect:
                expect.expect(src, dst, ok)
            wrong = []
            for (a, b), want in expect.cells.items():
                if a == b:
                    continue
                dst = m.ips[b][0 if chk.family == 4 else 1]
                src = m.ips[a][0 if chk.family == 4 else 1]
                v = verdict(compiled, src, dst, chk.port, Protocol(chk.protocol))
                if v.allowed != want:
                    wrong.append(f"{a} -> {b}: expected {want}, compiler {v.reason}")
            where = f"step {n} {chk.protocol}/{chk.port} IPv{chk.family}"
            assert not wrong, where + "\n" + "\n".join(wrong)
