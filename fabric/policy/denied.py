"""Denied connections as people read them: ``Denial``, its line, and where nodes publish them.

fabricd turns each packet its policy table logged at a default deny (see
fabric.dataplane.policy_log) into a ``Denial`` with ``describe()``, from the same compiled
model the table was rendered from: the endpoint where it was denied (by its host veth), the
policies selecting it in that direction, and the verdict() of the probe, so the reason is
the one ``fabricctl policy trace`` gives. Each node publishes its last ``KEEP`` denials
under ``denied/<node>`` (``document``); ``fabricctl policy denied`` reads them (``parse``).

Pure: imports fabric.policy only; the CLI imports it as well as the agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fabric.policy.endpoints import allocations, endpoint_key
from fabric.policy.model import Compiled, IPAddress, Protocol
from fabric.policy.verdict import ProbeError, verdict
from ipam.block import Block

PREFIX = "denied/"  # etcd: denied/<node>, under the node's lease
KEEP = 100  # denials a node publishes (the newest): about 25 kB of JSON


def key(node: str) -> str:
    return f"{PREFIX}{node}"


def endpoint_names(blocks: Iterable[Block]) -> dict[IPAddress, str]:
    """Every pod address in ``blocks`` -> its endpoint ("ns/pod"), as policy names it."""
    return {a.ip: "/".join(endpoint_key(a.attrs)) for a in allocations(blocks)
            if a.attrs.get("containerID")}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Denial:
    """One denied new connection, as logged on ``node`` at ``time`` (Unix seconds)."""

    seq: int  # per node and fabricd run, increasing: ``--follow`` prints each once
    time: float
    node: str
    direction: str  # "ingress" | "egress"
    endpoint: str  # ns/pod where it was denied ("" if the interface is no endpoint now)
    src: str  # ns/pod, or the address when it is no pod
    dst: str
    saddr: str
    daddr: str
    protocol: str  # TCP, UDP, SCTP, ICMP, ICMPv6 or a number
    port: int | None
    policies: tuple[str, ...]  # the policies selecting ``endpoint`` in ``direction``
    reason: str  # verdict()'s reason for this direction, or why there is none

    def line(self) -> str:
        what = f"{self.port}/{self.protocol}" if self.port is not None else self.protocol
        names = ", ".join(p.partition("/")[2] or p for p in self.policies)
        at = f"{self.direction} of {self.endpoint or 'an unknown interface'}"
        why = f"selected by [{names}], no rule allows it" if self.policies else self.reason
        return f"{self.src} -> {self.dst} {what} denied at {at}: {why}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["policies"] = list(self.policies)
        out["line"] = self.line()
        return out


def describe(
    compiled: Compiled | None,
    names: Mapping[IPAddress, str],
    *,
    seq: int,
    time: float,
    node: str,
    ingress: bool,
    ifname: str | None,
    saddr: IPAddress,
    daddr: IPAddress,
    protocol: str,
    port: int | None,
) -> Denial:
    """The denial of a packet logged at the default deny of ``ifname`` (the packet's out
    interface for ingress, in interface for egress). ``names``: every endpoint's addresses
    (address -> "ns/pod"), for the peer's name."""
    direction = "ingress" if ingress else "egress"
    src, dst = names.get(saddr, str(saddr)), names.get(daddr, str(daddr))
    er = None
    if compiled is not None and ifname:
        er = next((e for e in compiled.endpoints.values() if e.ifname == ifname), None)
    if er is None:
        return Denial(seq, time, node, direction, "", src, dst, str(saddr), str(daddr),
                      protocol, port, (), f"{ifname or 'the interface'} is no endpoint of "
                      "this node's rules now")  # fmt: skip
    rules = er.ingress if ingress else er.egress
    policies = rules.policies if rules is not None else ()
    reason = (f"denied: selected by {', '.join(policies)}" if policies
              else f"{er.key} is not isolated for {direction} now (rules changed since)")  # fmt: skip
    if compiled is not None and port is not None and protocol in Protocol.__members__:
        try:
            v = verdict(compiled, saddr if ingress else er.key, er.key if ingress else daddr,
                        port, Protocol(protocol))  # fmt: skip
            d = v.ingress if ingress else v.egress
            reason = d.reason if not d.allowed else f"now {d.reason} (rules changed since)"
            policies = d.policies if not d.allowed else ()
        except ProbeError as e:
            reason = str(e)
    return Denial(seq, time, node, direction, er.key, src, dst, str(saddr), str(daddr),
                  protocol, port, tuple(policies), reason)  # fmt: skip


def document(node: str, denials: Iterable[Denial], lost: int, total: int) -> dict[str, Any]:
    """What a node publishes: its newest ``KEEP`` denials, oldest first; ``total`` logged
    since start, ``lost`` the kernel could not deliver (the reader fell behind)."""
    items = list(denials)[-KEEP:]
    return {"node": node, "total": total, "lost": lost, "denials": [d.to_json() for d in items]}


def parse(doc: Mapping[str, Any]) -> list[Denial]:
    """The denials of a published document; malformed entries are skipped."""
    out = []
    for d in doc.get("denials") or ():
        try:
            out.append(Denial(
                int(d["seq"]), float(d["time"]), str(d["node"]), str(d["direction"]),
                str(d["endpoint"]), str(d["src"]), str(d["dst"]), str(d["saddr"]),
                str(d["daddr"]), str(d["protocol"]),
                int(d["port"]) if d.get("port") is not None else None,
                tuple(str(p) for p in d.get("policies") or ()), str(d["reason"])))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue
    return out
