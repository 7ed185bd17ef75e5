"""fabricd's config file, ``/etc/fabric/fabricd.yaml``: schema, validation, defaults.

One table, ``KEYS``, drives parsing, defaults and ``example_config()`` (the reference in
docs/design/agent.md, kept in step by a test). Every error is a ``ConfigError`` naming the dotted
field and its line from the YAML node marks (a missing key: its section's line, or line 1).
Unknown keys are refused, with a "did you mean": a typo must never silently fall back to a
default. A key set to ``null`` (or left empty) takes its default.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bgp.model import IPAddress, IPInterface
from fabric.agent import config_values as cv
from fabric.agent.health import is_loopback, split_listen

# Route protocol numbers the kernel reserves or other routing daemons use. fabricd owns every
# route carrying its number (adopts, replaces and deletes them): taking BIRD's, FRR's or
# keepalived's number would make it delete their routes.
# fmt: off
TAKEN_PROTOCOLS: Mapping[int, str] = {
    **dict.fromkeys(range(5), "reserved by the kernel"), 8: "gated", 9: "ra", 10: "mrt",
    11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp", 17: "mrouted",
    18: "keepalived", 42: "babel", 99: "openr", **dict.fromkeys(range(186, 199), "FRR"),
}
# fmt: on


class ConfigError(Exception):
    """A bad config file: ``field`` (dotted path; "" for a syntax error), ``problem`` and
    ``line`` (1-based; 0 when none applies, e.g. the file cannot be read)."""

    def __init__(self, field: str, problem: str, line: int, source: str = "<config>") -> None:
        self.field, self.problem, self.line, self.source = field, problem, line, source
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: field {field}: {problem}" if field else f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Addresses:
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    endpoints: tuple[str, ...]  # "http(s)://host:port", all with the same scheme
    prefix: str
    ca_file: Path | None
    cert_file: Path | None  # cert_file and key_file are both set or both None
    key_file: Path | None
    timeout: float

    @property
    def use_tls(self) -> bool:
        """True for https:// endpoints (TLS files are refused with http:// ones)."""
        return self.endpoints[0].startswith("https://")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    listen: str  # "IP:port", "[IPv6]:port" or "localhost:port" (fabric.agent.health.split_listen)
    allow_non_loopback: bool


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    protocol: int
    protocol_name: str
    table: int
    resync_interval: float


@dataclass(frozen=True, slots=True)
class BGPSettings:
    required_peers: cv.RequiredPeers | tuple[IPAddress, ...]
    exabgp: tuple[str, ...] | None  # None: fabricd finds ExaBGP itself
    graceful_restart_time: int


@dataclass(frozen=True, slots=True)
class CNIConfig:
    socket: Path
    state_dir: Path
    announce_wait: float = 2.0  # s an ADD of a borrowed address waits for its announcement
    announce_settle: float = 0.2  # s more, once ExaBGP has it, for the fabric to carry it


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    cut_established: bool  # a flow the new rules deny stops at the update (default: kept)
    resync_interval: float  # seconds between full checks of table inet fabric_filter
    denied_log_group: int = 4242  # nflog group of the denied-traffic log; -1: no log
    denied_log_rate: int = 5  # logged denials per second per endpoint (burst: twice that)
    denied_log_cap: int = 50  # logged denials per second per direction on the node


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str  # debug | info | warning | error
    format: str  # text | json


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node_name: str
    addresses: Addresses  # at least one of ipv4 / ipv6
    interfaces: tuple[IPInterface, ...]
    as_number: int | None  # None: the cluster's AS number
    labels: Mapping[str, str]
    route_reflector_cluster_id: str | None  # normalized dotted IPv4 (a str, as in bgp/ipam)
    etcd: EtcdConfig
    health: HealthConfig
    routes: RoutesConfig
    bgp: BGPSettings
    cni: CNIConfig
    policy: PolicyConfig
    run_dir: Path
    log: LogConfig
    resync_interval: float
    lease_ttl: int
    watchdog: bool


@dataclass(frozen=True, slots=True)
class Key:
    """``default``: the YAML value used when the key is absent (None: unset); ``example``:
    shown set if required or set_example, else commented out; ``shown``: the default's text."""

    path: str
    parse: cv.Parse
    default: Any
    doc: str
    example: Any = None
    required: bool = False
    set_example: bool = False
    shown: str = ""


# fmt: off
KEYS: tuple[Key, ...] = (
    Key("nodeName", cv.dns1123, None, "This node's name, a DNS-1123 name.", "node-1",
        shown="the host name, lower-cased"),
    Key("addresses.ipv4", cv.interface(4), None, "IPv4 address/prefix length of the node; one "
        "of ipv4 and ipv6 is required.", "10.255.16.2/30", set_example=True),
    Key("addresses.ipv6", cv.interface(6), None, "IPv6 address/prefix length.", "fd00::2/64"),
    Key("interfaces", cv.list_of(cv.interface(None)), [], "More address/prefix lengths of a multi-"
        "homed node; BGP picks its local address per peer.", ["10.255.17.2/30"]),
    Key("asNumber", cv.number(1, 2**32 - 1, True), None, "AS number.", 64512, shown="the cluster's"),
    Key("labels", cv.labels, {}, "Labels (name: string) for selectors.", {"rack": "r1"}),
    Key("routeReflectorClusterID", lambda v: str(cv.address(v, 4)), None, "Route reflector "
        "cluster ID (dotted IPv4): makes the node a reflector.", "244.0.0.1"),
    Key("etcd.endpoints", cv.list_of(cv.endpoint, allow_empty=False), None, "http(s)://host:port, "
        "all with the same scheme.", ["http://127.0.0.1:2379"], required=True),
    Key("etcd.prefix", cv.regex(re.compile(r"(/[^/\s]+)+"), "a key prefix like /fabric/v1"),
        "/fabric/v1", "Key prefix of the fabric's data."),
    Key("etcd.caFile", cv.path(readable=True), None, "CA bundle (https endpoints).",
        "/etc/fabric/etcd-ca.pem", shown="the system's CAs"),
    Key("etcd.certFile", cv.path(readable=True), None, "Client certificate (with keyFile).",
        "/etc/fabric/etcd-client.pem"),
    Key("etcd.keyFile", cv.path(readable=True), None, "Client key (with certFile).",
        "/etc/fabric/etcd-client-key.pem"),
    Key("etcd.timeout", cv.number(0.1, 300), 5.0, "Seconds to keep trying etcd per request."),
    Key("health.listen", cv.listen, "127.0.0.1:9099", "Health/metrics server: IP:port, "
        "[IPv6]:port or localhost:port."),
    Key("health.allowNonLoopback", cv.choice(False, True), False, "Allow a non-loopback listen."),
    Key("routes.protocol", cv.number(1, 255, True, TAKEN_PROTOCOLS), 201, "Route protocol "
        "number of fabricd's routes (not 0-4 nor another daemon's)."),
    Key("routes.protocolName", cv.regex(re.compile(r"[A-Za-z][-\w]{0,30}"), "a name"), "fabric",
        "Its name in /etc/iproute2/rt_protos.d/ (ip route shows it)."),
    Key("routes.table", cv.number(1, 2**32 - 1, True, {255: "local"}), 254, "Routing table."),
    Key("routes.resyncInterval", cv.number(1, 86400), 60, "Seconds between full checks of the "
        "kernel's routes."),
    Key("bgp.requiredPeers", cv.required_peers, "auto", "Peers /readyz needs Established: auto "
        "(one ToR or route-reflector peer, if any), none, or a list of peer IPs."),
    Key("bgp.exabgp", cv.list_of(cv.text, allow_empty=False), None, "ExaBGP command (argv list, "
        "'server <conf>' is appended).", ["/usr/local/bin/exabgp"], shown="python -m exabgp"),
    Key("bgp.gracefulRestartTime", cv.number(1, 4095, True), 120, "Seconds of graceful restart "
        "announced to peers."),
    Key("cni.socket", cv.path(), "/run/fabric/cni.sock", "Socket the CNI plugin uses."),
    Key("cni.stateDir", cv.path(), "/var/lib/fabric", "Directory for CNI state."),
    Key("cni.announceWait", cv.number(0, 30), 2.0, "Seconds at most an ADD of an address "
        "outside this node's blocks (borrowed) waits for its /32 to be announced; 0: no wait."),
    Key("cni.announceSettle", cv.number(0, 5), 0.2, "Seconds such an ADD waits on, once ExaBGP "
        "has sent the /32, for it to cross the fabric (every router on the way; FRR holds a "
        "received route up to 50 ms before it passes it on); 0: answer at once."),
    Key("policy.cutEstablished", cv.choice(False, True), False, "NetworkPolicy: true stops "
        "established connections the new rules deny, at the update (every packet of a flow "
        "is checked); false keeps them until they end, as Calico and kube-router do."),
    Key("policy.resyncInterval", cv.number(1, 86400), 60, "Seconds between full checks of the "
        "nftables table inet fabric_filter (drift is repaired)."),
    Key("policy.deniedLogGroup", cv.number(-1, 65535, True), 4242, "nflog group of the "
        "denied-traffic log (fabricctl policy denied); -1 turns the log off."),
    Key("policy.deniedLogRate", cv.number(1, 10000, True), 5, "Denied new connections logged "
        "per second per pod and direction (burst twice that)."),
    Key("policy.deniedLogCap", cv.number(1, 100000, True), 50, "Denied new connections logged "
        "per second per direction on the node, all pods together."),
    Key("runDir", cv.path(), "/run/fabric", "Runtime directory (ExaBGP config and pipes)."),
    Key("log.level", cv.choice("debug", "info", "warning", "error"), "info", "debug, info, "
        "warning or error."),
    Key("log.format", cv.choice("text", "json"), "text", "text, or json (an object a line)."),
    Key("resyncInterval", cv.number(1, 86400), 60, "Seconds between full resyncs of every event "
        "source (etcd lists behind the watches)."),
    Key("leaseTTL", cv.number(5, 3600, True), 30, "Seconds of the node registration lease."),
    Key("watchdog", cv.choice(True, False), True, "Ping systemd's watchdog (if WatchdogSec)."),
)
_SECTIONS = {
    "addresses": Addresses, "etcd": EtcdConfig, "health": HealthConfig, "routes": RoutesConfig,
    "bgp": BGPSettings, "cni": CNIConfig, "policy": PolicyConfig, "log": LogConfig,
}
# fmt: on
# The keys each mapping may hold ("" is the top level); other mappings (labels) are free.
_CHILDREN = {"": {k.path.split(".")[0] for k in KEYS}} | {
    s: {k.path[len(s) + 1 :] for k in KEYS if k.path.startswith(s + ".")} for s in _SECTIONS
}


class _Doc:
    """The YAML as {dotted path: value}, checked against KEYS, and each path's line."""

    def __init__(self, text: str, source: str) -> None:
        self.source, self.values, self.lines = source, dict[str, Any](), dict[str, int]()
        loader = yaml.SafeLoader(text)
        try:
            if (node := loader.get_single_node()) is not None:
                self._walk(loader, node, "")
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 0
            raise ConfigError("", f"not valid YAML: {e.problem or e.context}", line, source) from e
        except yaml.YAMLError as e:
            raise ConfigError("", f"not valid YAML: {e}", 0, source) from e
        finally:
            loader.dispose()

    def _walk(self, loader: yaml.SafeLoader, node: yaml.Node, path: str) -> Any:
        known = _CHILDREN.get(path)
        if known is not None and not isinstance(node, yaml.MappingNode):
            if node.tag == "tag:yaml.org,2002:null":
                return None  # an empty section: its defaults
            raise self.error(path, "must be a mapping of keys", node)
        if isinstance(node, yaml.CollectionNode) and not node.tag.endswith((":seq", ":map")):
            raise self.error(path, f"unsupported YAML tag {node.tag}", node)
        if isinstance(node, yaml.SequenceNode):
            return [self._walk(loader, x, f"{path}[{i}]") for i, x in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            self.lines[path] = node.start_mark.line + 1
            return loader.construct_object(node, deep=True)
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise self.error(sub, f"key {key!r} is not a string", knode)
            if known is not None and key not in known:
                raise self.error(sub, f"unknown key{_did_you_mean(key, known)}", knode)
            if key in out:
                raise self.error(sub, f"duplicate key (first on line {self.lines[sub]})", knode)
            self.lines[sub] = knode.start_mark.line + 1
            out[key] = self.values[sub] = self._walk(loader, vnode, sub)
        return out

    def error(self, path: str, problem: str, node: yaml.Node | None = None) -> ConfigError:
        """An error at ``node``, else at ``path`` or the nearest enclosing key present."""
        line, p = (node.start_mark.line + 1 if node else 0), path
        while not line and p:
            line = self.lines.get(p, 0)
            p = re.sub(r"(\[\d+\]|\.[^.\[]*|^[^.\[]*)$", "", p)
        return ConfigError(path, problem, line or 1, self.source)


def _did_you_mean(key: str, known: set[str]) -> str:
    folded = {k.lower(): k for k in known}
    close = folded.get(key.lower()) or next(iter(difflib.get_close_matches(key, known, 1)), "")
    return f" (did you mean {close!r}?)" if close else ""


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    """Validate ``text`` and return the config; ConfigError names the field and its line."""
    doc = _Doc(text, source)
    v: dict[str, Any] = {}
    for key in KEYS:
        if (raw := doc.values.get(key.path)) is None and key.required:
            raise doc.error(key.path, "is required")
        raw = key.default if raw is None else raw
        try:
            v[key.path] = None if raw is None else key.parse(raw)
        except cv.BadValue as e:
            raise doc.error(key.path + "".join(e.args[1:]), e.args[0]) from None
    if v["addresses.ipv4"] is None and v["addresses.ipv6"] is None:
        raise doc.error("addresses", "needs ipv4, ipv6 or both (address/prefix length)")
    _check_etcd(doc, v)
    host, _ = split_listen(v["health.listen"])
    if not v["health.allowNonLoopback"] and not is_loopback(host):
        raise doc.error("health.listen", f"{host} is not a loopback address "
                        "(set health.allowNonLoopback: true to expose it)")  # fmt: skip
    if v["nodeName"] is None:
        try:
            v["nodeName"] = cv.dns1123(socket.gethostname().strip().lower())
        except cv.BadValue as e:
            raise doc.error("nodeName", f"the host name {e.args[0]}: set nodeName") from None
    sections = {
        name: cls(**{_snake(p.split(".")[1]): x for p, x in v.items() if p.startswith(name + ".")})
        for name, cls in _SECTIONS.items()
    }
    return AgentConfig(**{_snake(p): x for p, x in v.items() if "." not in p}, **sections)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _check_etcd(doc: _Doc, v: dict[str, Any]) -> None:
    cert, key = v["etcd.certFile"], v["etcd.keyFile"]
    if (cert is None) != (key is None):
        raise doc.error(*(("etcd.certFile", "needs keyFile too") if cert else
                          ("etcd.keyFile", "needs certFile too")))  # fmt: skip
    schemes = {e.split(":", 1)[0] for e in v["etcd.endpoints"]}
    if len(schemes) > 1:
        raise doc.error("etcd.endpoints", "mixes http:// and https:// endpoints")
    tls = next((f"etcd.{f}" for f in ("caFile", "certFile") if v[f"etcd.{f}"]), None)
    if tls and schemes == {"http"}:
        raise doc.error(tls, "TLS files need https:// endpoints")


def load_config(path: Path) -> AgentConfig:
    """Read and validate the config file; one that cannot be read is a ConfigError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise ConfigError("", f"failed to read config: {why}", 0, str(path)) from e
    return parse_config(text, str(path))


def check_config_main(path: Path | str) -> int:
    """``fabricd --check-config FILE``: print ``ok: FILE`` (0), or the error to stderr (1)."""
    try:
        load_config(Path(path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


def _yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=999).removesuffix("\n...\n").strip()


def example_config() -> str:
    """Every key with its meaning, for docs and as a starting point: required keys set to an
    example, keys with a default set to it, the others commented out. Parses to the defaults."""
    out, section = ["# fabricd configuration (/etc/fabric/fabricd.yaml)."], None
    for key in KEYS:
        name, _, sub = key.path.rpartition(".")
        if not name or name != section:
            out += ["", f"{name}:"] if name else [""]
        indent, section = "  " * bool(name), name
        shown = key.required or key.set_example or key.default is not None
        note = "Required." if key.required else "" if shown else f"Default: {key.shown or 'none'}."
        out += textwrap.wrap(f"{key.doc} {note}", 98 - len(indent), initial_indent=f"{indent}# ",
                             subsequent_indent=f"{indent}# ")  # fmt: skip
        value = key.default if key.default is not None and not key.required else key.example
        out.append(f"{indent}{'' if shown else '# '}{sub}: {_yaml(value)}")
    return "\n".join(out) + "\n"
