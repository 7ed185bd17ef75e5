"""CNI results: one model (spec 1.1.0's), rendered in and parsed from each supported version.

Differences between the versions this module handles:

- 0.3.0, 0.3.1, 0.4.0: ``ips[].version`` ("4" or "6") is required;
- 1.0.0: ``ips[].version`` is gone;
- 1.1.0: interfaces may carry ``mtu``, ``socketPath``, ``pciID``; routes ``mtu``, ``advmss``,
  ``priority``, ``table``, ``scope``. Older versions never see these keys.

``ips[].interface`` is an index into ``interfaces`` in every version.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any

from cni.errors import CNIError, Code

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network

V1_1 = (1, 1, 0)
V1_0 = (1, 0, 0)


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path; "" for a host interface
    mtu: int = 0  # 1.1.0
    socket_path: str = ""  # 1.1.0
    pci_id: str = ""  # 1.1.0


@dataclass(frozen=True, slots=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    mtu: int = 0  # 1.1.0 from here on
    advmss: int = 0
    priority: int = 0
    table: int = 0
    scope: int = 0


@dataclass(frozen=True, slots=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.nameservers or self.domain or self.search or self.options)


@dataclass(frozen=True, slots=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = field(default_factory=DNS)


# ------------------------------------------------------------------ rendering


def _interface(i: Interface, v: tuple[int, ...]) -> dict[str, Any]:
    d: dict[str, Any] = {"name": i.name}
    if i.mac:
        d["mac"] = i.mac
    if i.sandbox:
        d["sandbox"] = i.sandbox
    if v >= V1_1:
        if i.mtu:
            d["mtu"] = i.mtu
        if i.socket_path:
            d["socketPath"] = i.socket_path
        if i.pci_id:
            d["pciID"] = i.pci_id
    return d


def _ip(c: IPConfig, v: tuple[int, ...]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if v < V1_0:
        d["version"] = str(c.address.version)
    d["address"] = str(c.address)
    if c.gateway is not None:
        d["gateway"] = str(c.gateway)
    if c.interface is not None:
        d["interface"] = c.interface
    return d


def _route(r: Route, v: tuple[int, ...]) -> dict[str, Any]:
    d: dict[str, Any] = {"dst": str(r.dst)}
    if r.gw is not None:
        d["gw"] = str(r.gw)
    if v >= V1_1:
        for key in ("mtu", "advmss", "priority", "table", "scope"):
            if getattr(r, key):
                d[key] = getattr(r, key)
    return d


def dns_json(dns: DNS) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if dns.nameservers:
        d["nameservers"] = list(dns.nameservers)
    if dns.domain:
        d["domain"] = dns.domain
    if dns.search:
        d["search"] = list(dns.search)
    if dns.options:
        d["options"] = list(dns.options)
    return d


def render(result: Result, version: str) -> dict[str, Any]:
    """``result`` as the JSON document of spec ``version`` (one of the supported ones)."""
    v = version_tuple(version)
    doc: dict[str, Any] = {"cniVersion": version}
    if result.interfaces:
        doc["interfaces"] = [_interface(i, v) for i in result.interfaces]
    doc["ips"] = [_ip(c, v) for c in result.ips]
    if result.routes:
        doc["routes"] = [_route(r, v) for r in result.routes]
    doc["dns"] = dns_json(result.dns)
    return doc


# ------------------------------------------------------------------ parsing (prevResult)


def _bad(where: str, problem: str) -> CNIError:
    return CNIError(Code.INVALID_CONFIG, f"invalid prevResult: {where}: {problem}")


def _str(d: Mapping[str, Any], key: str, where: str, required: bool = False) -> str:
    v = d.get(key)
    if v is None:
        if required:
            raise _bad(f"{where}.{key}", "missing")
        return ""
    if not isinstance(v, str):
        raise _bad(f"{where}.{key}", f"must be a string, not {type(v).__name__}")
    return v


def _int(d: Mapping[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{where}.{key}", f"must be an integer, not {type(v).__name__}")
    return v


def _strs(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad(f"{where}.{key}", "must be a list of strings")
    return tuple(v)


def _list(d: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise _bad(key, "must be a list of objects")
    return v


def _addr(text: str, where: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _bad(where, f"{text!r} is not an IP address") from None


def parse_dns(d: Any, where: str = "dns") -> DNS:
    if d is None:
        return DNS()
    if not isinstance(d, dict):
        raise _bad(where, "must be an object")
    return DNS(
        nameservers=_strs(d, "nameservers", where),
        domain=_str(d, "domain", where),
        search=_strs(d, "search", where),
        options=_strs(d, "options", where),
    )


def parse_route(d: Mapping[str, Any], where: str) -> Route:
    dst = _str(d, "dst", where, required=True)
    try:
        net = ipaddress.ip_network(dst, strict=False)
    except ValueError:
        raise _bad(f"{where}.dst", f"{dst!r} is not a CIDR") from None
    gw_text = _str(d, "gw", where)
    gw = _addr(gw_text, f"{where}.gw") if gw_text else None
    extra = {k: _int(d, k, where) for k in ("mtu", "advmss", "priority", "table", "scope")}
    return Route(dst=net, gw=gw, **extra)


def parse(doc: Any, version: str) -> Result:
    """A result document of spec ``version`` (a prevResult) as a Result.

    Raises CNIError(INVALID_CONFIG) naming the part that is wrong. Unknown keys are ignored
    (results pass through chained plugins that may add their own).
    """
    if not isinstance(doc, dict):
        raise _bad("prevResult", "must be an object")
    old = version_tuple(version) < V1_0
    interfaces = []
    for n, i in enumerate(_list(doc, "interfaces")):
        w = f"interfaces[{n}]"
        interfaces.append(
            Interface(
                name=_str(i, "name", w, required=True),
                mac=_str(i, "mac", w),
                sandbox=_str(i, "sandbox", w),
                mtu=_int(i, "mtu", w),
                socket_path=_str(i, "socketPath", w),
                pci_id=_str(i, "pciID", w),
            )
        )
    ips = []
    for n, c in enumerate(_list(doc, "ips")):
        w = f"ips[{n}]"
        text = _str(c, "address", w, required=True)
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            raise _bad(f"{w}.address", f"{text!r} is not an address/prefix") from None
        if old and _str(c, "version", w) not in ("", str(address.version)):
            raise _bad(f"{w}.version", f"does not match {text}")
        gw_text = _str(c, "gateway", w)
        iface = c.get("interface")
        if iface is not None and (isinstance(iface, bool) or not isinstance(iface, int)):
            raise _bad(f"{w}.interface", "must be an integer")
        if iface is not None and not 0 <= iface < len(interfaces):
            raise _bad(f"{w}.interface", f"index {iface} is not in interfaces")
        ips.append(IPConfig(address, _addr(gw_text, f"{w}.gateway") if gw_text else None, iface))
    routes = [parse_route(r, f"routes[{n}]") for n, r in enumerate(_list(doc, "routes"))]
    return Result(tuple(interfaces), tuple(ips), tuple(routes), parse_dns(doc.get("dns")))
