"""Borrowing forced by the block limit in the soak: the global IPAMConfig
``maxBlocksPerHost`` is 1 (``strictAffinity`` stays false), and one host (``LIMITED``)
holds long-lived filler pods until its one block is full, so its later ordinary pods (no
``IP=``) can claim no second block and borrow an address from another host's block (their
/32 announced), as a Calico node at its limit does."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
from typing import Any

from lab import pods
from lab.pods import Pod
from lab.runner import Lab

LIMITED = "node4"  # the host whose block is filled
MAX_BLOCKS = 1  # the global maxBlocksPerHost of the run
BATCH = 4  # filler pods added at once
MAX_FILLERS = 300  # the block must be full long before this


class LimitError(RuntimeError):
    pass


def set_limit(lab: Lab) -> None:
    """Set the global ``maxBlocksPerHost`` to ``MAX_BLOCKS`` with borrowing allowed."""
    r = lab.fabricctl(["ipam", "config", "--max-blocks-per-host", str(MAX_BLOCKS),
                       "--no-strict-affinity", "-o", "json"])  # fmt: skip
    if r.returncode != 0:
        raise LimitError(f"ipam config --max-blocks-per-host: {r.stderr.strip()}")
    cfg = json.loads(r.stdout)
    if cfg.get("maxBlocksPerHost") != MAX_BLOCKS or cfg.get("strictAffinity"):
        raise LimitError(f"ipam config did not take: {cfg}")


def block_of(ip: str, prefix: int = 26) -> str:
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def fill(lab: Lab, host: str, own: str) -> list[Pod]:
    """Long-lived pods on ``host`` until one of them lands outside its block ``own`` (the
    block is full, the limit forbids a second one: that pod borrowed). Raises if the block
    never fills or ``host`` claimed another block instead of borrowing."""
    made: list[Pod] = []
    with concurrent.futures.ThreadPoolExecutor(BATCH) as ex:
        while len(made) < MAX_FILLERS:
            names = [f"fill{len(made) + k}-{host}" for k in range(BATCH)]
            made += ex.map(lambda n: pods.add(lab, host, n), names)
            outside = [p for p in made if block_of(p.ip) != own]
            if outside:
                mine = [b["borrowingNode"] for b in borrowed(lab) if b["ip"] == outside[0].ip]
                if mine != [host]:
                    raise LimitError(f"{outside[0].name} got {outside[0].ip} outside {own} "
                                     f"but IPAM does not show it borrowed by {host}: {mine}")  # fmt: skip
                return made
    raise LimitError(f"{host}'s block {own} still not full after {len(made)} pods")


def borrowed(lab: Lab) -> list[dict[str, Any]]:
    """IPAM's borrowed addresses (``fabricctl ipam show --show-borrowed``)."""
    r = lab.fabricctl(["ipam", "show", "--show-borrowed", "-o", "json"])
    if r.returncode != 0:
        raise LimitError(f"ipam show --show-borrowed: {r.stderr.strip()}")
    return list(json.loads(r.stdout)["borrowed"])
