"""natOutgoing: masquerade pod traffic that leaves the pools, in one nftables table of our own.

fabricd owns ``table inet fabric_nat`` and nothing else: every apply replaces that table in
one ``nft -f -`` transaction (add, delete, define: atomic, so there is never a moment without
the rules), and ``remove`` deletes only it. The rule is Calico's: source in a natOutgoing
pool and destination outside every pool (so pod-to-pod traffic, between any pools, keeps its
source address). Design and invariants: docs/design/routes.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, collapse_addresses

from fabric.dataplane.nft import NFT, Nft, NftError

IPNetwork = IPv4Network | IPv6Network

TABLE = "fabric_nat"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,30}")


NatError = NftError  # nft refused a command or could not be run; ``stderr`` has its words


def _elements(cidrs: Iterable[IPNetwork], version: int) -> str:
    # collapsed: nft refuses overlapping intervals in a set
    cidrs = list(cidrs)
    if version == 4:
        nets: list[IPNetwork] = [
            *collapse_addresses(c for c in cidrs if isinstance(c, IPv4Network))
        ]
    else:
        nets = [*collapse_addresses(c for c in cidrs if isinstance(c, IPv6Network))]
    return ", ".join(str(n) for n in nets)


def render(
    nat_cidrs: Sequence[IPNetwork], all_pool_cidrs: Sequence[IPNetwork], table: str = TABLE
) -> str:
    """The ``nft -f`` script that makes ``table`` exactly the natOutgoing rules. Pure.

    ``all_pool_cidrs`` should include the natOutgoing pools (they are added regardless: traffic
    between two natOutgoing pools is pod-to-pod too).
    """
    pools = [*all_pool_cidrs, *nat_cidrs]
    sets = []
    for name, cidrs, family in (
        ("nat_v4", nat_cidrs, 4),
        ("pools_v4", pools, 4),
        ("nat_v6", nat_cidrs, 6),
        ("pools_v6", pools, 6),
    ):
        elements = _elements(cidrs, family)
        body = f"type ipv{family}_addr; flags interval;"
        if elements:
            body += f" elements = {{ {elements} }};"
        sets.append(f"    set {name} {{ {body} }}")
    return "\n".join([
        f"add table inet {table}",
        f"delete table inet {table}",  # with the add above: a clean slate, in the same transaction
        f"table inet {table} {{",
        *sets,
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        "        ip saddr @nat_v4 ip daddr != @pools_v4 counter masquerade",
        "        ip6 saddr @nat_v6 ip6 daddr != @pools_v6 counter masquerade",
        "    }",
        "}",
        "",
    ])  # fmt: skip


class NatTable:
    """The natOutgoing table in ``netns`` (None: fabricd's own). Not safe for concurrent calls
    from several tasks; the agent calls it from its one reconciler.
    """

    def __init__(
        self, netns: str | None = None, table: str = TABLE, nft: str = NFT, backend: str = "auto"
    ) -> None:
        if not _NAME.fullmatch(table):
            raise ValueError(f"nft table name {table!r}: letters, digits and '_'")
        self.netns, self.table, self.nft = netns, table, nft
        self._runner = Nft(netns, nft, backend)  # fabric.dataplane.nft: lib or exec
        self._script: str | None = None  # what we applied last ...
        self._listing: str | None = None  # ... and how nft listed the table right after

    async def apply(
        self, nat_cidrs: Sequence[IPNetwork], all_pool_cidrs: Sequence[IPNetwork]
    ) -> bool:
        """Make the table match; True when it was written. A no-op when neither the pools nor
        the table in the kernel changed since the last apply (the table is listed to check).
        """
        script = render(nat_cidrs, all_pool_cidrs, self.table)
        if script == self._script and await self._list() == self._listing:
            return False
        await self._nft(["-f", "-"], script, "apply")
        self._script, self._listing = script, await self._list()
        return True

    def close(self) -> None:
        """End the libnftables worker an instance for another netns holds (fabric.dataplane.nft)."""
        self._runner.close()

    async def remove(self) -> bool:
        """Delete the table (and nothing else). Idempotent: False when it was not there."""
        self._script = self._listing = None
        if not await self._exists():
            return False
        await self._nft(["delete", "table", "inet", self.table], what="remove")
        return True

    async def counters(self) -> dict[str, int]:
        """Packets masqueraded so far by family (``ip``, ``ip6``); empty without the table."""
        if not await self._exists():
            return {}
        listing = json.loads(await self._nft(["-j", "list", "table", "inet", self.table]))
        out = {}
        for item in listing["nftables"]:
            exprs = item.get("rule", {}).get("expr", [])
            family = [e["match"]["left"]["payload"]["protocol"] for e in exprs if "match" in e]
            packets = [e["counter"]["packets"] for e in exprs if "counter" in e]
            if family and packets:
                out[family[0]] = int(packets[0])
        return out

    async def _exists(self) -> bool:
        listing = json.loads(await self._nft(["-j", "list", "tables", "inet"]))
        tables = (item["table"] for item in listing["nftables"] if "table" in item)
        return any(t["name"] == self.table for t in tables)

    async def _list(self) -> str | None:
        """How nft lists the table, without counters; None when it is absent."""
        if not await self._exists():
            return None
        return await self._nft(["-s", "list", "table", "inet", self.table])

    async def _nft(self, args: list[str], stdin: str | None = None, what: str = "list") -> str:
        return await self._runner.run(args, stdin, what=what, table=self.table)
