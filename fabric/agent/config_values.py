"""Parsers of single values of fabricd's config file: each takes the YAML value and returns
the parsed one, or raises ``BadValue(problem, suffix)`` (the suffix narrows the field, as
``[2]`` or ``.key``). ``fabric.agent.config`` builds its ``KEYS`` table from them and turns a
``BadValue`` into a ``ConfigError`` naming the dotted field and its line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bgp.model import IPAddress, IPInterface
from fabric.agent.health import split_listen

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_DNS1123 = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./]{0,251}[A-Za-z0-9])?")


class RequiredPeers(StrEnum):
    AUTO = "auto"  # at least one ToR / route-reflector session up, when any is configured
    NONE = "none"


class BadValue(Exception):
    """A value is wrong: ``BadValue(problem, suffix="")``; the suffix narrows the field (``[2]``)."""


Parse = Callable[[Any], Any]


def text(v: Any, what: str = "a string") -> str:
    if isinstance(v, str) and v:
        return v
    raise BadValue("is empty" if isinstance(v, str) else f"must be {what}, not {v!r}")


def number(lo: float, hi: float, integer: bool = False, taken: Mapping[int, str] = {}) -> Parse:
    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int if integer else int | float):
            raise BadValue(f"must be {'an integer' if integer else 'a number'}, not {v!r}")
        if not lo <= v <= hi or v in taken:
            why = f"taken ({taken[v]})" if v in taken else f"out of range {lo:g}..{hi:g}"
            raise BadValue(f"{v} is {why}")
        return v if integer else float(v)

    return parse


def choice(*choices: Any) -> Parse:
    def parse(v: Any) -> Any:
        if v not in choices or isinstance(v, bool) != isinstance(choices[0], bool):
            raise BadValue(f"{v!r} is not one of: {', '.join(str(c).lower() for c in choices)}")
        return v

    return parse


def list_of(item: Parse, allow_empty: bool = True) -> Parse:
    def parse(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list) or not (v or allow_empty):
            raise BadValue("must not be empty" if v == [] else f"must be a list, not {v!r}")
        out: list[Any] = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except BadValue as e:
                raise BadValue(e.args[0], f"[{i}]{''.join(e.args[1:])}") from None
        return tuple(out)

    return parse


def regex(rx: re.Pattern[str], what: str) -> Parse:
    def parse(v: Any) -> str:
        if not rx.fullmatch(s := text(v)):
            raise BadValue(f"{s!r} is not {what}")
        return s

    return parse


dns1123 = regex(_DNS1123, "a DNS-1123 name (lower-case letters, digits, '-' and '.')")


def interface(version: int | None) -> Parse:
    def parse(v: Any) -> IPInterface:
        try:
            iface = ipaddress.ip_interface(s := text(v, "an address with prefix length"))
        except ValueError:
            raise BadValue(f"{s!r} is not an address with prefix length") from None
        ip, net = iface.ip, iface.network
        if "/" not in s or (version and iface.version != version):
            raise BadValue(f"{s!r} is not an IPv{version or ''} address with prefix length")
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            raise BadValue(f"{ip} cannot be a node address (loopback, link-local or multicast)")
        if net.prefixlen < net.max_prefixlen - 1 and ip == net.network_address:
            raise BadValue(f"{s} is its subnet's network address, not a host address")
        return iface

    return parse


def labels(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise BadValue(f"must be a mapping of label names to strings, not {v!r}")
    for k, val in v.items():  # what selectors can name: see ipam.selector
        if not _LABEL_KEY.fullmatch(k) or not isinstance(val, str) or len(val) > 63:
            raise BadValue("needs a label name and a string of up to 63 characters", f".{k}")
    return dict(v)


def address(v: Any, version: int | None = None) -> IPAddress:
    try:
        ip = ipaddress.ip_address(text(v, "an IP address"))
    except ValueError:
        ip = None
    if ip is None or (version and ip.version != version):
        raise BadValue(f"{v!r} is not an IPv{version or ''} address")
    return ip


def endpoint(v: Any) -> str:
    u = urlsplit(s := text(v, "an http(s)://host:port URL"))
    try:
        ok = u.scheme in ("http", "https") and bool(u.hostname) and u.port is not None
    except ValueError:  # a port out of range
        ok = False
    if not ok or u.path not in ("", "/") or u.query or u.fragment or u.username:
        raise BadValue(f"{s!r} is not an etcd endpoint (http(s)://host:port)")
    return f"{u.scheme}://{u.netloc}"


def path(readable: bool = False) -> Parse:
    def parse(v: Any) -> Path:
        if not (p := Path(text(v, "a path"))).is_absolute():
            raise BadValue(f"{v!r} is not an absolute path")
        try:
            if readable:
                p.open("rb").close()  # the real test: access() is wrong without DAC caps
        except OSError as e:
            raise BadValue(f"cannot read {p}: {e.strerror}") from None
        return p

    return parse


def listen(v: Any) -> str:
    try:
        split_listen(s := text(v, "IP:port"))
    except ValueError:
        raise BadValue(f"{s!r} is not IP:port, [IPv6]:port or localhost:port") from None
    return s


def required_peers(v: Any) -> RequiredPeers | tuple[IPAddress, ...]:
    if v in ("auto", "none"):
        return RequiredPeers(v)
    if not isinstance(v, list) or not v:
        raise BadValue(f"{v!r} is not auto, none or a non-empty list of peer IP addresses")
    peers: tuple[IPAddress, ...] = list_of(address)(v)
    return peers
