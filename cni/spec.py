"""The CNI specification as this plugin implements it: versions, verbs, the ``CNI_*``
environment and the network configuration on stdin. Standard library only.

Error classes, so a runtime (and a person) can tell what to fix:

- the environment (missing or invalid ``CNI_*``, ``CNI_ARGS``): 4, naming the variable;
- stdin that is not a UTF-8 JSON object (or a ``cniVersion`` that is not a string): 6;
- a ``cniVersion`` outside SUPPORTED, or a verb the config's version does not have (CHECK
  before 0.4.0, GC and STATUS before 1.1.0): 1;
- a field that is missing, of the wrong type or with a bad value: 7, naming the field;
- a field this plugin does not support (another IPAM type): 2, naming the field.

Parsing is pure: nothing here touches the kernel or fabricd.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cni.errors import LATEST, CNIError, Code
from cni.result import DNS, IPAddress, Result, Route, parse, parse_dns, parse_route, version_tuple

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
IPAM_TYPE = "fabric-ipam"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
MAX_IFNAME = 15  # IFNAMSIZ - 1
# The spec's rules for names (libcni's ValidateContainerID / ValidateNetworkName).
_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
# Pod sysctls stay inside the pod's network namespace: net.* only, no path tricks.
_SYSCTL = re.compile(r"^net(\.[A-Za-z0-9_\-]+)+$")
_TRUE = ("1", "true", "True", "TRUE")


class Verb(StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    GC = "GC"
    STATUS = "STATUS"
    VERSION = "VERSION"


# The first spec version that has each verb.
SINCE = {Verb.CHECK: "0.4.0", Verb.GC: "1.1.0", Verb.STATUS: "1.1.0"}
# Variables each verb needs (VERSION needs none: runtimes fill the others with dummies).
NEEDS = {
    Verb.ADD: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    Verb.CHECK: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    Verb.DEL: ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    Verb.GC: (),
    Verb.STATUS: (),
    Verb.VERSION: (),
}


def valid_name(name: str) -> bool:
    """A valid network name or container ID (the spec's rule)."""
    return bool(_ID.match(name))


def version_answer() -> bytes:
    """What VERSION prints."""
    return json.dumps({"cniVersion": LATEST, "supportedVersions": list(SUPPORTED)}).encode()


# ------------------------------------------------------------------ environment


@dataclass(frozen=True, slots=True)
class CNIArgs:
    """``CNI_ARGS``: ``K=V`` pairs separated by ``;``. Unknown keys are an error unless
    ``IgnoreUnknown`` is true (runtimes always set it)."""

    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    infra_container_id: str = ""
    ips: tuple[IPAddress, ...] = ()  # IP=10.0.0.5 (comma-separated for v4 and v6)
    ignore_unknown: bool = False


_ARG_FIELDS = {
    "K8S_POD_NAMESPACE": "pod_namespace",
    "K8S_POD_NAME": "pod_name",
    "K8S_POD_UID": "pod_uid",
    "K8S_POD_INFRA_CONTAINER_ID": "infra_container_id",
}


def parse_args(text: str) -> CNIArgs:
    """Parse ``CNI_ARGS``; CNIError(INVALID_ENVIRONMENT) names the bad pair."""
    values: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CNIError(Code.INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        values[key] = value
    ignore = values.pop("IgnoreUnknown", "") in _TRUE
    known: dict[str, Any] = {"ignore_unknown": ignore}
    for key, value in values.items():
        if key in _ARG_FIELDS:
            known[_ARG_FIELDS[key]] = value
        elif key == "IP":
            known["ips"] = _requested_ips(value)
        elif not ignore:
            raise CNIError(
                Code.INVALID_ENVIRONMENT,
                f"CNI_ARGS: unknown key {key!r} (set IgnoreUnknown=1 to ignore it)",
            )
    return CNIArgs(**known)


def _requested_ips(value: str) -> tuple[IPAddress, ...]:
    ips: list[IPAddress] = []
    for part in value.split(","):
        try:
            ip = ipaddress.ip_address(part.strip())
        except ValueError:
            raise CNIError(
                Code.INVALID_ENVIRONMENT, f"CNI_ARGS: IP={value!r}: {part!r} is not an address"
            ) from None
        if any(other.version == ip.version for other in ips):
            raise CNIError(
                Code.INVALID_ENVIRONMENT, f"CNI_ARGS: IP={value!r}: one address per family"
            )
        ips.append(ip)
    return tuple(ips)


@dataclass(frozen=True, slots=True)
class Env:
    command: Verb
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: str = ""
    args: CNIArgs = field(default_factory=CNIArgs)


def check_ifname(name: str) -> None:
    if not name or len(name) > MAX_IFNAME or name in (".", "..") or any(
        c in name for c in "/:" ) or any(c.isspace() for c in name):  # fmt: skip
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {name!r}: an interface name is 1-{MAX_IFNAME} characters without "
            "'/', ':' or whitespace, and not '.' or '..'",
        )


def parse_env(environ: Mapping[str, str]) -> Env:
    """The ``CNI_*`` variables of one invocation, validated for its verb."""
    raw = environ.get("CNI_COMMAND", "")
    if not raw:
        raise CNIError(Code.INVALID_ENVIRONMENT, "CNI_COMMAND is not set")
    try:
        verb = Verb(raw)
    except ValueError:
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_COMMAND {raw!r} is not one of {', '.join(v.value for v in Verb)}",
        ) from None
    if verb is Verb.VERSION:
        return Env(verb)
    missing = [k for k in NEEDS[verb] if not environ.get(k)]
    if missing:
        raise CNIError(Code.INVALID_ENVIRONMENT, f"{', '.join(missing)} not set for {verb}")
    cid = environ.get("CNI_CONTAINERID", "")
    if verb in (Verb.ADD, Verb.DEL, Verb.CHECK) and not _ID.match(cid):
        raise CNIError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {cid!r}: must start with a letter or digit, then letters, "
            "digits, '_', '.' or '-'",
        )
    ifname = environ.get("CNI_IFNAME", "")
    if verb in (Verb.ADD, Verb.DEL, Verb.CHECK):
        check_ifname(ifname)
    netns = environ.get("CNI_NETNS", "")
    if netns and verb in (Verb.ADD, Verb.CHECK, Verb.DEL) and not netns.startswith("/"):
        raise CNIError(Code.INVALID_ENVIRONMENT, f"CNI_NETNS {netns!r}: not an absolute path")
    args = parse_args(environ.get("CNI_ARGS", "")) if verb is not Verb.GC else CNIArgs()
    return Env(verb, cid, netns, ifname, environ.get("CNI_PATH", ""), args)


# ------------------------------------------------------------------ network configuration


@dataclass(frozen=True, slots=True)
class IPAMConf:
    """The ``ipam`` section (``type: fabric-ipam``; absent = defaults for the main plugin).

    ``pools``: names or CIDRs; when given, the families assigned are those of the pools.
    Otherwise ``assign_ipv4`` (default true) and ``assign_ipv6`` (default false) choose, from
    the pools whose nodeSelector matches the node. ``address_prefix``, ``gateway`` and
    ``routes`` shape what the IPAM-only plugin returns (see docs/design/cni.md: ptp and bridge).
    """

    type: str = ""
    pools: tuple[str, ...] = ()
    assign_ipv4: bool | None = None
    assign_ipv6: bool | None = None
    address_prefix: str = "host"  # host (/32, /128) | block | pool
    gateway: tuple[IPAddress, ...] = ()
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class NetConf:
    cni_version: str
    name: str
    type: str
    mtu: int | None = None
    ipam: IPAMConf = field(default_factory=IPAMConf)
    sysctls: Mapping[str, str] = field(default_factory=dict)
    dns: DNS = field(default_factory=DNS)
    args: Mapping[str, Any] = field(default_factory=dict)
    runtime_config: Mapping[str, Any] = field(default_factory=dict)
    prev_result: Result | None = None
    valid_attachments: tuple[tuple[str, str], ...] | None = None  # (containerID, ifname)


def _bad(where: str, problem: str, code: int = Code.INVALID_CONFIG) -> CNIError:
    return CNIError(code, f"invalid network config: field {where!r}: {problem}")


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)  # fmt: skip


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str = "") -> Any:
    v = d.get(key)
    if v is None:
        return None
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ is int)
    if not ok:
        want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise _bad(where + key, f"must be {_WANT.get(want, want)}, not {_type_name(v)}")
    return v


_WANT = {"str": "a string", "int": "an integer", "dict": "an object", "list": "an array",
         "bool": "a boolean"}  # fmt: skip


def decode(stdin: bytes) -> dict[str, Any]:
    """stdin as a JSON object; CNIError(DECODE_FAILURE) for anything else."""
    try:
        text = stdin.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CNIError(Code.DECODE_FAILURE, f"network config is not UTF-8: {e.reason}") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge ints, deep nesting
        problem = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise CNIError(Code.DECODE_FAILURE, f"network config is not JSON: {problem}") from None
    if not isinstance(doc, dict):
        raise CNIError(
            Code.DECODE_FAILURE, f"network config must be a JSON object, not {_type_name(doc)}"
        )
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def config_version(doc: Mapping[str, Any]) -> str:
    """The config's ``cniVersion`` if this plugin supports it; CNIError otherwise."""
    v = doc.get("cniVersion")
    if v is not None and not isinstance(v, str):
        raise CNIError(Code.DECODE_FAILURE, f"cniVersion must be a string, not {_type_name(v)}")
    v = v or "0.1.0"  # libcni's reading of a config without one
    if v not in SUPPORTED:
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"incompatible CNI version {v!r}: this plugin supports {', '.join(SUPPORTED)}",
        )
    return v


def parse_config(doc: Mapping[str, Any], version: str) -> NetConf:
    """The plugin's configuration (``doc`` from ``decode``, ``version`` from
    ``config_version``). Unknown keys are ignored, as every CNI plugin does."""
    name = _get(doc, "name", str)
    if not name:
        raise _bad("name", "missing")
    if not _ID.match(name):
        raise _bad("name", f"{name!r}: letters, digits, '_', '.' and '-', starting alphanumeric")
    typ = _get(doc, "type", str)
    if not typ:
        raise _bad("type", "missing")
    mtu = _get(doc, "mtu", int)
    if mtu is not None and not 68 <= mtu <= 65535:
        raise _bad("mtu", f"{mtu} is outside 68..65535")
    prev_raw = doc.get("prevResult")
    return NetConf(
        cni_version=version,
        name=name,
        type=typ,
        mtu=mtu,
        ipam=_ipam(_get(doc, "ipam", dict) or {}),
        sysctls=_sysctls(_get(doc, "sysctls", dict) or {}),
        dns=_dns(doc.get("dns")),
        args=_get(doc, "args", dict) or {},
        runtime_config=_get(doc, "runtimeConfig", dict) or {},
        prev_result=parse(prev_raw, version) if prev_raw is not None else None,
        valid_attachments=_attachments(doc.get(VALID_ATTACHMENTS)),
    )


def _dns(v: Any) -> DNS:
    try:
        return parse_dns(v)
    except CNIError as e:
        raise _bad("dns", e.msg.split(": ", 2)[-1]) from None


def _bool(d: Mapping[str, Any], key: str) -> bool | None:
    v = d.get(key)
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):  # Calico writes "true"
        return v.lower() == "true"
    raise _bad("ipam." + key, f"must be a boolean, not {_type_name(v)}")


def _ipam(d: Mapping[str, Any]) -> IPAMConf:
    typ = _get(d, "type", str, "ipam.") or ""
    if d and typ != IPAM_TYPE:
        raise _bad(
            "ipam.type",
            f"{typ!r} is not supported: fabric does its own IPAM ({IPAM_TYPE!r})",
            Code.UNSUPPORTED_FIELD,
        )
    pools = _get(d, "pools", list, "ipam.") or []
    for n, p in enumerate(pools):
        if not isinstance(p, str) or not p:
            raise _bad(f"ipam.pools[{n}]", "must be a pool name or CIDR")
        if "/" in p:
            try:
                ipaddress.ip_network(p)
            except ValueError:
                raise _bad(f"ipam.pools[{n}]", f"{p!r} is not a CIDR") from None
    prefix = _get(d, "addressPrefix", str, "ipam.") or "host"
    if prefix not in ("host", "block", "pool"):
        raise _bad("ipam.addressPrefix", f"{prefix!r}: use host, block or pool")
    gateways: list[IPAddress] = []
    gw = _get(d, "gateway", (str, list), "ipam.") or []
    for n, g in enumerate([gw] if isinstance(gw, str) else gw):
        try:
            gateways.append(ipaddress.ip_address(g))
        except (ValueError, TypeError):
            raise _bad(f"ipam.gateway[{n}]", f"{g!r} is not an IP address") from None
    routes = []
    for n, r in enumerate(_get(d, "routes", list, "ipam.") or []):
        if not isinstance(r, dict):
            raise _bad(f"ipam.routes[{n}]", "must be an object")
        try:
            routes.append(parse_route(r, f"ipam.routes[{n}]"))
        except CNIError as e:
            raise _bad(f"ipam.routes[{n}]", e.msg.split(": ", 2)[-1]) from None
    return IPAMConf(
        type=typ,
        pools=tuple(pools),
        assign_ipv4=_bool(d, "assignIPv4"),
        assign_ipv6=_bool(d, "assignIPv6"),
        address_prefix=prefix,
        gateway=tuple(gateways),
        routes=tuple(routes),
    )


def _sysctls(d: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if not _SYSCTL.match(k):
            raise _bad(f"sysctls.{k}", "only net.* sysctls of the pod's namespace are allowed")
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise _bad(f"sysctls.{k}", f"must be a string or integer, not {_type_name(v)}")
        out[k] = str(v)
    return out


def _attachments(v: Any) -> tuple[tuple[str, str], ...] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        raise _bad(VALID_ATTACHMENTS, f"must be an array, not {_type_name(v)}")
    out = []
    for n, a in enumerate(v):
        cid = a.get("containerID") if isinstance(a, dict) else None
        ifname = a.get("ifname") if isinstance(a, dict) else None
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise _bad(f"{VALID_ATTACHMENTS}[{n}]", "must be {containerID: str, ifname: str}")
        out.append((cid, ifname))
    return tuple(out)


# ------------------------------------------------------------------ one request


@dataclass(frozen=True, slots=True)
class Request:
    env: Env
    conf: NetConf


def parse_request(environ: Mapping[str, str], stdin: bytes) -> Request:
    """Validate one invocation (not VERSION: answer that with ``version_answer``).

    Raises CNIError; ``error_version`` says which cniVersion to write the error with.
    """
    env = parse_env(environ)
    doc = decode(stdin)
    version = config_version(doc)
    since = SINCE.get(env.command)
    if since is not None and version_tuple(version) < version_tuple(since):
        raise CNIError(
            Code.INCOMPATIBLE_VERSION,
            f"{env.command} needs cniVersion {since} or later; the config has {version}",
        )
    return Request(env, parse_config(doc, version))


def error_version(stdin: bytes) -> str:
    """The cniVersion to write an error in: the config's when readable and supported."""
    try:
        return config_version(decode(stdin))
    except CNIError:
        return LATEST
