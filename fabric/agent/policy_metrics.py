"""``fabric_policy_packets_total`` from the nftables policy table's per-rule counters.

The counters are B1's (``PolicyTable.counters()``, one per rule label, summed over the
chains holding it); this maps them onto the metric's labels. Read at scrape time
(``HealthServer(before_metrics=...)``), so an unscraped fabricd never lists its table for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabric.agent.metrics import PolicyKey
from fabric.dataplane.policy_table import RuleCounter

DEFAULT_DENY = "default-deny"  # the label of an endpoint chain's last rule (policy_table)


def policy_samples(counters: Iterable[RuleCounter]) -> dict[PolicyKey, int]:
    """The packets each policy's rules accepted, per (namespace, policy, direction,
    "allow"), and the default-deny drops per direction (namespace and policy empty: an
    endpoint chain is shared by every endpoint with the same rule list, so a drop is no
    one policy's). Conntrack-invalid and unknown-interface drops are not policy verdicts."""
    out: dict[PolicyKey, int] = {}
    for c in counters:
        if c.policy is not None and c.direction is not None:
            ns, _, name = c.policy.partition("/")
            key = (ns, name, str(c.direction).lower(), "allow")
        elif c.label.startswith(DEFAULT_DENY):
            key = ("", "", c.label[len(DEFAULT_DENY) :].strip(), "deny")
        else:
            continue
        out[key] = out.get(key, 0) + c.packets
    return out
