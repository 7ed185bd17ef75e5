"""What fabricd answers for diagnostics on its health listener: the kernel's route to an
address (``GET /route``, for ``fabricctl explain --live``) and the policy counters read at
scrape time (``fabric_policy_packets_total``). Kept out of agent.py: the agent only wires
these to the health server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fabric.agent.metrics import Metrics
from fabric.agent.policy_metrics import policy_samples, text_rows
from fabric.dataplane.netlink.lookup import route_get
from fabric.dataplane.policy_table import PolicyTable
from fabric.policy.model import Compiled


async def route_lookup(node: str, protocol: int, address: str) -> dict[str, Any]:
    """The kernel's route to ``address`` on this node, with the node's name and fabricd's
    route protocol; ValueError for a bad address. pyroute2 blocks: it runs in a thread."""
    found = await asyncio.to_thread(route_get, address)
    return {"node": node, "protocol": protocol, "route": found.to_json()}


async def refresh_policy_counters(
    table: PolicyTable, metrics: Metrics, compiled: Callable[[], Compiled | None]
) -> None:
    """fabric_policy_packets_total from the policy table's counters (at scrape time): one
    ``nft -t list table``; ``compiled`` (the model the table was rendered from) says which
    policies select each endpoint chain."""
    if table.programmed:
        text = await table.nft.run(["-t", "list", "table", "inet", table.table])
        metrics.policy_packets.set(policy_samples(text_rows(text), compiled()))
