"""Per-rule counters of the policy table (``table inet fabric_filter``), summed per rule
label: what ``fabric_policy_packets_total`` exports (fabric.agent.policy_metrics). Pure:
the caller lists the table (fabric.dataplane.policy_table.PolicyTable.counters)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fabric.dataplane.nft import Listing
from fabric.policy.model import Direction

_LABEL = re.compile(r"(?P<policy>\S+/\S+) (?P<direction>ingress|egress)\[(?P<index>\d+)\]")


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """Packets and bytes of the rules of one policy rule (``policy`` "ns/name", direction,
    index), summed over the chains holding it; policy None for the table's own rules
    (``label``: "default-deny ingress", "unknown pod interface egress", ...)."""

    label: str
    policy: str | None
    direction: Direction | None
    index: int | None
    packets: int
    bytes: int


def counters(listing: Listing) -> list[RuleCounter]:
    """Per-label counters of a listing. Pure."""
    sums: dict[str, tuple[int, int]] = {}
    for chain in listing.chains.values():
        for r in chain.rules:
            if r.id is None:
                continue
            p, b = sums.get(r.label, (0, 0))
            sums[r.label] = (p + r.packets, b + r.bytes)
    out = []
    for label, (p, b) in sorted(sums.items()):
        m = _LABEL.fullmatch(label)
        if m:
            direction = Direction.INGRESS if m["direction"] == "ingress" else Direction.EGRESS
            out.append(RuleCounter(label, m["policy"], direction, int(m["index"]), p, b))
        else:
            out.append(RuleCounter(label, None, None, None, p, b))
    return out
