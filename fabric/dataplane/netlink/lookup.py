"""The kernel's own answer to "where does a packet to this address go?" (``ip route get``),
through pyroute2: a diagnostic, never on a hot path (``fabricctl explain --live`` asks
fabricd, which calls :func:`route_get` in a worker thread).

The lookup asks for the *matching FIB entry* (``RTM_F_FIB_MATCH``, ``ip route get fibmatch``),
so the answer names the prefix, its route protocol and every ECMP next hop, not only the
one path the kernel would pick for this flow. A blackhole or prohibit route makes the kernel
refuse the lookup (EINVAL), no route at all answers ENETUNREACH: both are answers, not errors.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from fabric.dataplane.netlink.core import NetlinkError, iproute

RTM_F_FIB_MATCH = 0x2000  # linux/rtnetlink.h: return the matching FIB entry
_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable",
          8: "prohibit"}  # fmt: skip
_REFUSED = {
    errno.EINVAL: "blackhole",  # blackhole (and prohibit) routes refuse `route get`
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
    errno.EACCES: "prohibit",
}


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the kernel answered for ``address``: ``type`` "unicast" (with ``prefix``,
    ``protocol``, ``gateways`` and/or ``devices``), "local", "blackhole", "unreachable"..."""

    address: str
    type: str
    prefix: str | None = None
    protocol: int | None = None
    table: int | None = None
    gateways: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"address": self.address, "type": self.type, "prefix": self.prefix,
                             "protocol": self.protocol, "table": self.table,
                             "gateways": list(self.gateways), "devices": list(self.devices)}  # fmt: skip
        if self.detail:
            d["detail"] = self.detail
        return d


def route_get(address: str, netns: str | None = None) -> Lookup:
    """The kernel's FIB entry for ``address`` in ``netns`` (blocking: run it in a thread).

    ValueError when ``address`` is not an IP address; NetlinkError for a failure that is
    not an answer about the route (no netlink socket, an unexpected errno).
    """
    ip = ipaddress.ip_address(address)
    from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with iproute(netns) as ipr:
        try:
            msgs = ipr.route("get", dst=str(ip), family=family, flags=RTM_F_FIB_MATCH)
        except PyrouteError as e:
            kind = _REFUSED.get(e.code)
            if kind is None:
                raise NetlinkError(f"failed to look up the route to {ip}: {e}", e.code) from e
            return Lookup(str(ip), kind, detail=f"the kernel refused the lookup: {e}")
        if not msgs:
            return Lookup(str(ip), "unreachable", detail="the kernel answered nothing")
        names = {i: n for n, i in _links(ipr).items()}
        return _decode(str(ip), msgs[0], names)


def _links(ipr: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name is not None:
            out[str(name)] = int(link["index"])
    return out


def _decode(address: str, msg: Any, names: dict[int, str]) -> Lookup:
    dst = msg.get_attr("RTA_DST")
    plen = int(msg["dst_len"])
    default = "0.0.0.0" if ":" not in address else "::"
    prefix = f"{dst if dst is not None else default}/{plen}"
    gateways: list[str] = []
    devices: list[str] = []

    def add(gw: Any, oif: Any) -> None:
        if gw is not None:
            gateways.append(str(gw))
        if oif is not None:
            name = names.get(int(oif), f"if{oif}")
            if name not in devices:
                devices.append(name)

    add(msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_OIF"))
    for hop in msg.get_attr("RTA_MULTIPATH") or ():
        attrs = dict(hop.get("attrs") or ())
        add(attrs.get("RTA_GATEWAY"), hop.get("oif"))
    table = msg.get_attr("RTA_TABLE")
    return Lookup(
        address,
        _TYPES.get(int(msg["type"]), str(msg["type"])),
        prefix=str(ipaddress.ip_network(prefix, strict=False)),
        protocol=int(msg["proto"]),
        table=int(table) if table is not None else int(msg["table"]),
        gateways=tuple(gateways),
        devices=tuple(devices),
    )


__all__ = ["RTM_F_FIB_MATCH", "Lookup", "NetlinkError", "route_get"]
