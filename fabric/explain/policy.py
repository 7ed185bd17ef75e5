"""The policy layer of ``explain``: the egress verdict on the source node and the ingress
verdict on the destination node, from the very compiler and verdict that program nftables
(:func:`fabric.policy.compiler.compile`, :func:`fabric.policy.verdict.verdict`): each node's
rules are compiled as that node compiles them (``local_node``), from the same inputs it
reads (the blocks' allocations, Pod and Namespace objects, NetworkPolicies). No second
copy of the semantics lives here: only the mapping of a verdict onto hops.

Without PORT/PROTO only isolation can be said: an end selected by a policy is "unknown"
(give a port for the verdict), an end no policy selects is open.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.explain.evidence import Endpoint, Kind, Snapshot
from fabric.explain.walk import Hop, Layer, State
from fabric.policy.compiler import compile as compile_policies
from fabric.policy.endpoints import allocations, build_endpoints
from fabric.policy.model import Compiled, Direction, DirectionRules, EndpointRules, Protocol
from fabric.policy.verdict import HOST, DirectionVerdict, ProbeError, verdict
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the nodes compile from (read with the rest of the snapshot)."""

    policies: Sequence[NetworkPolicy]
    namespaces: Sequence[Namespace]
    pods: Sequence[Pod]


class Checker:
    """``PolicyCheck`` for :func:`fabric.explain.walk.walk`."""

    def __init__(self, snap: Snapshot, inputs: Inputs, port: int | None,
                 protocol: str | None) -> None:  # fmt: skip
        self.inputs = inputs
        self.port = port
        self.protocol = Protocol(protocol) if protocol else None
        self.endpoints = build_endpoints(allocations(snap.blocks.values()), inputs.pods, None)
        self._compiled: dict[str | None, Compiled] = {}

    def compiled(self, node: str | None) -> Compiled:
        """The rules ``node`` programs (compiled once per node)."""
        got = self._compiled.get(node)
        if got is None:
            i = self.inputs
            got = compile_policies(i.policies, i.namespaces, self.endpoints, node)
            self._compiled[node] = got
        return got

    def __call__(self, src: Endpoint, dst: Endpoint) -> list[Hop]:
        if dst.ip is None or dst.kind is Kind.NODE:
            return [Hop(Layer.POLICY, f"ingress at {dst.label}", State.SKIPPED,
                        "the destination is a node: NetworkPolicy applies to pods only")]  # fmt: skip
        if self.port is None or self.protocol is None:
            return self._isolation(src, dst)
        s: str = (HOST if src.kind is Kind.NODE and src.node == dst.node
                  else str(src.ip) if src.ip is not None else HOST)  # fmt: skip
        hops: list[Hop] = []
        for direction, node, ep in ((Direction.EGRESS, src.node, src),
                                    (Direction.INGRESS, dst.node, dst)):  # fmt: skip
            name = f"{str(direction).lower()} at {ep.label}"
            if ep.kind is Kind.NODE:
                hops.append(Hop(Layer.POLICY, name, State.SKIPPED,
                                f"{ep.label} is a node, not a pod: no policy applies"))  # fmt: skip
                continue
            try:
                v = verdict(self.compiled(node), s, str(dst.ip), self.port, self.protocol)
            except ProbeError as e:
                hops.append(Hop(Layer.POLICY, name, State.UNKNOWN, str(e)))
                continue
            dv = v.egress if direction is Direction.EGRESS else v.ingress
            hops.append(self._hop(name, node, dv, src, dst))
            if not dv.allowed:
                break
        return hops

    def _hop(self, name: str, node: str | None, dv: DirectionVerdict, src: Endpoint,
             dst: Endpoint) -> Hop:  # fmt: skip
        ev: dict[str, Any] = {
            "node": node, "endpoint": dv.endpoint, "isolated": dv.isolated,
            "policies": list(dv.policies),
            "rule": ({"policy": dv.rule.policy, "index": dv.rule.index} if dv.rule else None),
            "rules": [{"rule": c.label, "peer": c.peer, "peerMatches": c.peer_ok,
                       "port": c.port, "portMatches": c.port_ok} for c in dv.checks],
        }  # fmt: skip
        on = f" (on {node})" if node else ""
        # the verdict names a peer that is not local to that node by its address
        reason = dv.reason
        for e in (src, dst):
            if e.ip is not None and e.label != str(e.ip):
                ip = re.escape(str(e.ip))
                reason = re.sub(rf"\b(from|to) {ip}(?![0-9a-f.:])", rf"\1 {e.label}", reason)
        if dv.allowed:
            return Hop(Layer.POLICY, name, State.OK, reason + on, ev)
        which = ", ".join(dv.policies)
        peer = src.label if dv.direction is Direction.INGRESS else dst.label
        way = "from" if dv.direction is Direction.INGRESS else "to"
        return Hop(Layer.POLICY, name, State.BLOCKED, reason + on, ev,
                   f"add an {str(dv.direction).lower()} rule allowing {self.port}/{self.protocol} "
                   f"{way} {peer} to one of the selecting policies ({which}), or a new policy "
                   f"selecting {dv.endpoint}; `fabricctl policy trace {src.given} {dst.given} "
                   f"{self.port}/{self.protocol}` shows every policy and rule considered")  # fmt: skip

    def _isolation(self, src: Endpoint, dst: Endpoint) -> list[Hop]:
        hops: list[Hop] = []
        for direction, ep in ((Direction.EGRESS, src), (Direction.INGRESS, dst)):
            name = f"{str(direction).lower()} at {ep.label}"
            er = self._rules_of(ep)
            rules: DirectionRules | None = None
            if er is not None:
                rules = er.egress if direction is Direction.EGRESS else er.ingress
            if rules is None:
                hops.append(Hop(Layer.POLICY, name, State.OK,
                                f"no policy with {direction} selects {ep.label}: open"))  # fmt: skip
            else:
                hops.append(Hop(Layer.POLICY, name, State.UNKNOWN,
                                f"selected by {', '.join(rules.policies)}: give PORT/PROTO for "
                                "the verdict", {"policies": list(rules.policies)}))  # fmt: skip
        return hops

    def _rules_of(self, ep: Endpoint) -> EndpointRules | None:
        if ep.kind is not Kind.POD or ep.ip is None:
            return None
        compiled = self.compiled(ep.node)
        return next((er for er in compiled.endpoints.values() if ep.ip in er.ips), None)
