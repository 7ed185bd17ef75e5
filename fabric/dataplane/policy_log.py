"""The denied-traffic log of ``table inet fabric_filter``: the default-deny chains.

Every isolated endpoint chain ends in ``counter goto deny_in`` (or ``deny_out``): its counter
counts that chain's default-deny drops, and the table's two deny chains log a sample of the
new connections among them to nfnetlink_log group ``DeniedLog.group``, then drop:

    chain deny_in
        ct state new add @deny_rl_in { oifname timeout 60s limit rate R/second burst B packets }
            limit rate C/second burst C packets log prefix "fabric-deny ingress" group G
        drop
    chain deny_out   (the same on iifname, prefix "fabric-deny egress")

Bounded, never a flood under a scan: at most R per second (burst B) per endpoint (its host
veth; ``@deny_rl_*`` is a dynamic set the kernel fills, one element per veth that was
denied within 60 s) and at most C per second per direction for the whole node, whatever
the number of endpoints or sources. The log rule has no verdict: every denied packet is
dropped by the next rule, logged or not. The endpoint is the packet's interface (the log
message carries it), so endpoint chains stay shared between endpoints with the same rules.

``group None`` renders the deny chains without the log rule (the drops are still counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fabric.dataplane.nft import ChainDef, RuleDef, SetDef, quote

DENY_IN, DENY_OUT = "deny_in", "deny_out"
RATE_IN, RATE_OUT = "deny_rl_in", "deny_rl_out"
OWN_NAMES = frozenset({DENY_IN, DENY_OUT, RATE_IN, RATE_OUT})
KERNEL_WRITTEN = frozenset({RATE_IN, RATE_OUT})  # sets whose elements only the kernel adds
PREFIX = "fabric-deny"  # log prefix: "fabric-deny ingress" / "fabric-deny egress"
RATE_TIMEOUT = 60  # s an endpoint's rate state lives after its first logged denial


@dataclass(frozen=True, slots=True)
class DeniedLog:
    """Where and how much to log: ``group`` (None: no log), per-endpoint ``rate`` and
    ``burst`` (packets), node-wide ``cap`` per direction (packets per second)."""

    group: int | None = 4242
    rate: int = 5
    burst: int = 10
    cap: int = 50


def deny_chain(ingress: bool) -> str:
    """The chain an isolated endpoint chain's last rule goes to."""
    return DENY_IN if ingress else DENY_OUT


def prefix(ingress: bool) -> str:
    return f"{PREFIX} {'ingress' if ingress else 'egress'}"


def sets() -> dict[str, SetDef]:
    """The per-endpoint rate state, one dynamic set per direction (elements the kernel's)."""
    return {n: SetDef(n, ("ifname",), ("timeout",)) for n in (RATE_IN, RATE_OUT)}


def chains(log: DeniedLog) -> dict[str, ChainDef]:
    out = {}
    for ingress in (True, False):
        direction = "ingress" if ingress else "egress"
        rules = []
        if log.group is not None:
            key = "oifname" if ingress else "iifname"
            rate = RATE_IN if ingress else RATE_OUT
            rules.append(RuleDef(
                f"ct state new add @{rate} {{ {key} timeout {RATE_TIMEOUT}s limit rate "
                f"{log.rate}/second burst {log.burst} packets }} limit rate {log.cap}/second "
                f"burst {log.cap} packets log prefix {quote(prefix(ingress))} group {log.group}",
                f"denied log {direction}"))  # fmt: skip
        rules.append(RuleDef("drop", f"default-deny drop {direction}"))
        out[deny_chain(ingress)] = ChainDef(deny_chain(ingress), tuple(rules))
    return out


def without_kernel_elements(held: Mapping[str, SetDef]) -> dict[str, SetDef]:
    """``held`` with the kernel-written sets' elements left out, so a diff never deletes
    them (they are rate state, not desired state)."""
    return {n: SetDef(s.name, s.type, s.flags, s.map_to) if n in KERNEL_WRITTEN else s
            for n, s in held.items()}  # fmt: skip
