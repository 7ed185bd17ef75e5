"""fabric.agent.config: the agent's config file. Every error names the field and its line."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from fabric.agent import config
from fabric.agent.config import AgentConfig, ConfigError, parse_config
from fabric.agent.config_values import RequiredPeers

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = """\
nodeName: node-1
addresses:
  ipv4: 10.255.16.2/30
etcd:
  endpoints: [http://127.0.0.1:2379]
"""


def parse(text: str) -> AgentConfig:
    return parse_config(textwrap.dedent(text), "test.yaml")


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for f in files.values():
        f.write_text("-----BEGIN NOTHING-----\n")
    return files


def test_full_config_parses(tls_files: dict[str, Path]) -> None:
    cfg = parse(f"""\
        nodeName: rack1-node-3.example
        addresses: {{ipv4: 10.255.16.2/30, ipv6: "fd00::2/64"}}
        interfaces: [10.255.17.2/30, "fd00:1::2/64"]
        asNumber: 65001
        labels: {{rack: r1, topology.kubernetes.io/zone: z-1}}
        routeReflectorClusterID: 244.0.0.1
        etcd:
          endpoints: ["https://10.0.0.1:2379", "https://[fd00::1]:2379/"]
          prefix: /fabric/test
          caFile: {tls_files["ca"]}
          certFile: {tls_files["cert"]}
          keyFile: {tls_files["key"]}
          timeout: 2.5
        health: {{listen: "0.0.0.0:9100", allowNonLoopback: true}}
        routes: {{protocol: 250, protocolName: fab, table: 100, resyncInterval: 30}}
        bgp:
          requiredPeers: [10.255.16.1, "fd00::1"]
          exabgp: [/opt/exabgp/bin/exabgp, --debug, --debug]
          gracefulRestartTime: 300
        cni: {{socket: /run/x/cni.sock, stateDir: /var/lib/x}}
        runDir: /run/x
        log: {{level: debug, format: json}}
        resyncInterval: 120
        leaseTTL: 15
        watchdog: false
        """)
    assert cfg.node_name == "rack1-node-3.example"
    assert cfg.addresses.ipv4 == ipaddress.IPv4Interface("10.255.16.2/30")
    assert cfg.addresses.ipv6 == ipaddress.IPv6Interface("fd00::2/64")
    assert cfg.interfaces[1] == ipaddress.IPv6Interface("fd00:1::2/64")
    assert cfg.as_number == 65001
    assert cfg.labels == {"rack": "r1", "topology.kubernetes.io/zone": "z-1"}
    assert cfg.route_reflector_cluster_id == "244.0.0.1"
    assert cfg.etcd.endpoints == ("https://10.0.0.1:2379", "https://[fd00::1]:2379")
    assert cfg.etcd.use_tls
    assert (cfg.etcd.ca_file, cfg.etcd.key_file) == (tls_files["ca"], tls_files["key"])
    assert cfg.etcd.timeout == 2.5
    assert cfg.health.listen == "0.0.0.0:9100"
    assert (cfg.routes.protocol, cfg.routes.protocol_name, cfg.routes.table) == (250, "fab", 100)
    assert cfg.routes.resync_interval == 30.0
    assert cfg.bgp.required_peers == (
        ipaddress.ip_address("10.255.16.1"),
        ipaddress.ip_address("fd00::1"),
    )
    assert cfg.bgp.exabgp == ("/opt/exabgp/bin/exabgp", "--debug", "--debug")
    assert cfg.bgp.graceful_restart_time == 300
    assert cfg.cni.socket == Path("/run/x/cni.sock")
    assert cfg.run_dir == Path("/run/x")
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")
    assert (cfg.resync_interval, cfg.lease_ttl, cfg.watchdog) == (120.0, 15, False)


def test_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.addresses.ipv6 is None and cfg.interfaces == ()
    assert cfg.as_number is None and cfg.labels == {} and cfg.route_reflector_cluster_id is None
    assert cfg.etcd.prefix == "/fabric/v1" and cfg.etcd.timeout == 5.0
    assert cfg.etcd.ca_file is None and not cfg.etcd.use_tls
    assert cfg.health.listen == "127.0.0.1:9099" and not cfg.health.allow_non_loopback
    assert (cfg.routes.protocol, cfg.routes.protocol_name, cfg.routes.table) == (201, "fabric", 254)
    assert cfg.bgp.required_peers is RequiredPeers.AUTO
    assert cfg.bgp.exabgp is None and cfg.bgp.graceful_restart_time == 120
    assert cfg.cni.socket == Path("/run/fabric/cni.sock")
    assert cfg.cni.state_dir == Path("/var/lib/fabric") and cfg.run_dir == Path("/run/fabric")
    assert (cfg.log.level, cfg.log.format) == ("info", "text")
    assert (cfg.resync_interval, cfg.lease_ttl, cfg.watchdog) == (60.0, 30, True)


def test_example_config_parses_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fabric.agent.config.socket.gethostname", lambda: "Node-1")
    example = parse_config(config.example_config(), "example")
    minimal = parse(MINIMAL)
    assert example == minimal
    assert example.node_name == "node-1"  # the host name, lower-cased


def test_example_config_shows_every_key() -> None:
    text = config.example_config()
    for key in config.KEYS:
        assert f"{key.path.rpartition('.')[2]}:" in text, key.path


def test_null_takes_the_default() -> None:
    cfg = parse(MINIMAL + "asNumber:\nwatchdog: ~\nlog:\n")
    assert cfg.as_number is None and cfg.watchdog is True and cfg.log.level == "info"


def test_node_name_from_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace("nodeName: node-1\n", "")
    monkeypatch.setattr("fabric.agent.config.socket.gethostname", lambda: "Worker-7")
    assert parse(text).node_name == "worker-7"
    monkeypatch.setattr("fabric.agent.config.socket.gethostname", lambda: "bad_host")
    e = error(text)
    assert (e.field, e.line) == ("nodeName", 1)
    assert "set nodeName" in str(e)


REQUIRED = {
    "nodeName": "nodeName: n\n",
    "addresses": "addresses: {ipv4: 10.255.16.2/30}\n",
    "etcd": "etcd: {endpoints: ['http://127.0.0.1:2379']}\n",
}
# Each case: the YAML, then the field and line the error must name, and part of the problem.
BAD = [
    ("nodeName: Node_1\n", "nodeName", 1, "DNS-1123"),
    ("nodeName: 5\n", "nodeName", 1, "must be a string"),
    ("addresses:\n  ipv4: 10.255.16.2\n", "addresses.ipv4", 2, "prefix length"),
    ("addresses:\n  ipv4: fd00::2/64\n", "addresses.ipv4", 2, "IPv4"),
    ("addresses:\n  ipv4: 10.255.16.0/30\n", "addresses.ipv4", 2, "network address"),
    ("addresses:\n  ipv4: 127.0.0.2/8\n", "addresses.ipv4", 2, "loopback"),
    ("addresses:\n  ipv6: 10.0.0.1/24\n", "addresses.ipv6", 2, "IPv6"),
    ("addresses: {}\n", "addresses", 1, "needs ipv4, ipv6 or both"),
    ("addresses: [10.0.0.1/24]\n", "addresses", 1, "must be a mapping"),
    ("interfaces:\n  - 10.0.1.2/24\n  - nonsense\n", "interfaces[1]", 3, "prefix length"),
    ("interfaces: 10.0.1.2/24\n", "interfaces", 1, "must be a list"),
    ("asNumber: 0\n", "asNumber", 1, "out of range"),
    ("asNumber: '65001'\n", "asNumber", 1, "must be an integer"),
    ("asNumber: true\n", "asNumber", 1, "must be an integer"),
    ("labels:\n  rack: r1\n  floor: 3\n", "labels.floor", 3, "string"),
    ("labels: [rack]\n", "labels", 1, "mapping"),
    ("routeReflectorClusterID: fd00::1\n", "routeReflectorClusterID", 1, "IPv4"),
    ("etcd:\n  endpoints: []\n", "etcd.endpoints", 2, "must not be empty"),
    ("etcd:\n  endpoints:\n    - http://a:1\n    - 10.0.0.1:2379\n", "etcd.endpoints[1]", 4,
     "http(s)://host:port"),
    ("etcd:\n  endpoints: [ftp://a:1]\n", "etcd.endpoints[0]", 2, "etcd endpoint"),
    ("etcd:\n  endpoints: [http://a]\n", "etcd.endpoints[0]", 2, "etcd endpoint"),
    ("etcd:\n  endpoints: ['http://a:99999']\n", "etcd.endpoints[0]", 2, "etcd endpoint"),
    ("etcd:\n  endpoints: [http://a:1, https://b:1]\n", "etcd.endpoints", 2, "mixes"),
    ("etcd:\n  endpoints: [http://a:1]\n  prefix: fabric\n", "etcd.prefix", 3, "key prefix"),
    ("etcd:\n  endpoints: [http://a:1]\n  timeout: 0\n", "etcd.timeout", 3, "out of range"),
    ("etcd:\n  endpoints: [http://a:1]\n  timeout: soon\n", "etcd.timeout", 3, "a number"),
    ("health:\n  listen: 0.0.0.0:9099\n", "health.listen", 2, "not a loopback"),
    ("health:\n  listen: 9099\n", "health.listen", 2, "must be IP:port"),
    ("health:\n  listen: myhost:9099\n", "health.listen", 2, "IP:port"),
    ("health:\n  allowNonLoopback: 'yes'\n", "health.allowNonLoopback", 2, "one of"),
    ("routes:\n  protocol: 3\n", "routes.protocol", 2, "taken"),
    ("routes:\n  protocol: 12\n", "routes.protocol", 2, "bird"),
    ("routes:\n  protocol: 186\n", "routes.protocol", 2, "FRR"),
    ("routes:\n  protocol: 256\n", "routes.protocol", 2, "out of range"),
    ("routes:\n  protocolName: 'my proto'\n", "routes.protocolName", 2, "not a name"),
    ("routes:\n  table: 255\n", "routes.table", 2, "taken"),
    ("bgp:\n  requiredPeers: some\n", "bgp.requiredPeers", 2, "auto, none"),
    ("bgp:\n  requiredPeers: []\n", "bgp.requiredPeers", 2, "non-empty list"),
    ("bgp:\n  requiredPeers:\n    - 10.0.0.1\n    - peer2\n", "bgp.requiredPeers[1]", 4, "IP"),
    ("bgp:\n  exabgp: /usr/bin/exabgp\n", "bgp.exabgp", 2, "must be a list"),
    ("bgp:\n  gracefulRestartTime: 5000\n", "bgp.gracefulRestartTime", 2, "out of range"),
    ("cni:\n  socket: run/cni.sock\n", "cni.socket", 2, "absolute path"),
    ("log:\n  level: verbose\n", "log.level", 2, "debug, info, warning, error"),
    ("log:\n  format: xml\n", "log.format", 2, "text, json"),
    ("leaseTTL: 2\n", "leaseTTL", 1, "out of range"),
    ("leaseTTL: 2.5\n", "leaseTTL", 1, "integer"),
    ("resyncInterval: -1\n", "resyncInterval", 1, "out of range"),
    ("watchdog: 1\n", "watchdog", 1, "one of"),
]  # fmt: skip


@pytest.mark.parametrize(("yaml_text", "field", "line", "problem"), BAD)
def test_error_names_field_and_line(yaml_text: str, field: str, line: int, problem: str) -> None:
    # The bad part comes first, so its lines are the file's; what is required follows.
    text = yaml_text
    for section, body in REQUIRED.items():
        if not yaml_text.startswith(section):
            text += body
    e = error(text)
    assert (e.field, e.line) == (field, line), str(e)
    assert problem in e.problem
    assert str(e) == f"test.yaml:{line}: field {field}: {e.problem}"


def test_unknown_keys_are_refused_with_a_suggestion() -> None:
    e = error(MINIMAL + "resyncIntervall: 30\n")
    assert (e.field, e.line) == ("resyncIntervall", 6)
    assert "unknown key (did you mean 'resyncInterval'?)" in e.problem
    e = error(MINIMAL.replace("  endpoints", "  cafile: /x\n  endpoints"))
    assert (e.field, e.line) == ("etcd.cafile", 5)
    assert "did you mean 'caFile'" in e.problem
    e = error(MINIMAL + "frobnicate: 1\n")
    assert e.problem == "unknown key"


def test_missing_required_points_at_the_section() -> None:
    e = error("nodeName: n\naddresses: {ipv4: 10.0.0.2/24}\netcd:\n  prefix: /x\n")
    assert (e.field, e.line, e.problem) == ("etcd.endpoints", 3, "is required")
    e = error("nodeName: n\naddresses: {ipv4: 10.0.0.2/24}\n")
    assert (e.field, e.line) == ("etcd.endpoints", 1)
    e = error("nodeName: n\netcd: {endpoints: [http://a:1]}\n")
    assert (e.field, e.line) == ("addresses", 1)


def test_tls_files(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    base = MINIMAL.replace("http://", "https://")
    missing = tmp_path / "gone.pem"
    e = error(base + f"  caFile: {missing}\n")
    assert (e.field, e.line) == ("etcd.caFile", 6)
    assert f"cannot read {missing}" in e.problem
    e = error(base + f"  certFile: {tls_files['cert']}\n")
    assert (e.field, e.problem) == ("etcd.certFile", "needs keyFile too")
    e = error(base + f"  keyFile: {tls_files['key']}\n")
    assert (e.field, e.problem) == ("etcd.keyFile", "needs certFile too")
    e = error(MINIMAL + f"  caFile: {tls_files['ca']}\n")
    assert (e.field, e.problem) == ("etcd.caFile", "TLS files need https:// endpoints")
    e = error(base + "  caFile: ca.pem\n")
    assert "absolute path" in e.problem
    assert parse(base + f"  caFile: {tls_files['ca']}\n").etcd.ca_file == tls_files["ca"]


def test_health_listen_forms() -> None:
    for listen in ("127.0.0.1:9099", "[::1]:9099", "localhost:0", "127.0.0.5:1"):
        assert parse(MINIMAL + f"health: {{listen: '{listen}'}}\n").health.listen == listen
    allowed = MINIMAL + "health: {listen: '[::]:9099', allowNonLoopback: true}\n"
    assert parse(allowed).health.listen == "[::]:9099"


def test_yaml_syntax_and_shape_errors() -> None:
    e = error(MINIMAL + "labels: {rack: r1\n")
    assert e.field == "" and e.line == 7 and "not valid YAML" in e.problem
    e = error("- a\n- b\n")
    assert "must be a mapping" in e.problem and e.line == 1
    e = error(MINIMAL + "nodeName: other\n")
    assert (e.field, e.line) == ("nodeName", 6)
    assert "duplicate key (first on line 1)" in e.problem
    e = error("---\na: 1\n---\nb: 2\n")
    assert "not valid YAML" in e.problem
    e = error(MINIMAL + "1: x\n")
    assert "is not a string" in e.problem
    e = error(MINIMAL + "asNumber: !!python/object/apply:os.system [echo]\n")
    assert (e.field, e.line) == ("asNumber", 6) and "unsupported YAML tag" in e.problem
    e = error(MINIMAL + "asNumber: !!python/name:os.system x\n")
    assert "not valid YAML" in e.problem


def test_empty_file_names_what_is_required() -> None:
    e = error("")
    assert (e.field, e.line) == ("etcd.endpoints", 1)


def test_load_config_and_check_config_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "fabricd.yaml"
    good.write_text(MINIMAL)
    assert config.load_config(good) == parse(MINIMAL)
    assert config.check_config_main(good) == 0
    assert capsys.readouterr().out == f"ok: {good}\n"

    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL + "  timeout: -1\n")
    assert config.check_config_main(str(bad)) == 1
    err = capsys.readouterr().err
    assert err == f"error: {bad}:6: field etcd.timeout: -1 is out of range 0.1..300\n"

    with pytest.raises(ConfigError) as info:
        config.load_config(tmp_path / "missing.yaml")
    assert info.value.line == 0
    assert str(info.value).endswith(
        "missing.yaml: failed to read config: No such file or directory"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load_config(binary)


def test_docs_show_the_example_config() -> None:
    page = (ROOT / "docs" / "design" / "agent.md").read_text()
    assert config.example_config() in page, "docs/design/agent.md: paste example_config() again"
