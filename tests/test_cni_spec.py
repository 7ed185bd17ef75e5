"""The CNI spec layer: environment, network config, results per version, error documents; and
a fuzz test of fabricd's answer to any stdin (always a spec document, never a traceback)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni.errors import LATEST, CNIError, Code
from cni.protocol import STDIN_TOO_LARGE
from cni.result import DNS, Interface, IPConfig, Result, Route, parse, render
from cni.spec import (
    SUPPORTED,
    Verb,
    error_version,
    parse_args,
    parse_env,
    parse_request,
    version_answer,
)
from fabric.workloads.server import answer

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/run/netns/p1",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}


def conf(**kw: Any) -> bytes:
    doc = {"cniVersion": "1.0.0", "name": "fabric", "type": "fabric", **kw}
    return json.dumps(doc).encode()


def code_of(fn: Any, *args: Any) -> int:
    with pytest.raises(CNIError) as e:
        fn(*args)
    return e.value.code


# ---------------------------------------------------------------- environment


def test_env_valid_add() -> None:
    env = parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;"
                     "K8S_POD_INFRA_CONTAINER_ID=abc;FOO=bar;IP=10.0.0.9,fd00::9"})  # fmt: skip
    assert env.command is Verb.ADD and env.ifname == "eth0"
    assert (env.args.pod_namespace, env.args.pod_name) == ("ns", "p")
    assert env.args.infra_container_id == "abc"
    assert env.args.ips == (ipaddress.ip_address("10.0.0.9"), ipaddress.ip_address("fd00::9"))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "ATTACH"}, "CNI_COMMAND"),
        ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "-abc"}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "a/b"}, "CNI_CONTAINERID"),
        ({"CNI_NETNS": ""}, "CNI_NETNS"),
        ({"CNI_NETNS": "relative/ns"}, "CNI_NETNS"),
        ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "a" * 16}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "."}, "CNI_IFNAME"),
        ({"CNI_IFNAME": ".."}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "et/h0"}, "CNI_IFNAME"),
        ({"CNI_IFNAME": "eth 0"}, "CNI_IFNAME"),
        ({"CNI_PATH": ""}, "CNI_PATH"),
        ({"CNI_ARGS": "FOO=bar"}, "CNI_ARGS"),
        ({"CNI_ARGS": "IgnoreUnknown=1;novalue"}, "CNI_ARGS"),
        ({"CNI_ARGS": "IP=10.0.0.300"}, "CNI_ARGS"),
        ({"CNI_ARGS": "IP=10.0.0.1,10.0.0.2"}, "CNI_ARGS"),
    ],
)
def test_env_invalid_is_code_4_naming_the_variable(change: dict[str, str], needle: str) -> None:
    with pytest.raises(CNIError) as e:
        parse_env({**ENV, **change})
    assert e.value.code == Code.INVALID_ENVIRONMENT
    assert needle in e.value.msg


def test_ifname_of_15_is_fine_and_del_needs_no_netns() -> None:
    assert parse_env({**ENV, "CNI_IFNAME": "a" * 15}).ifname == "a" * 15
    assert parse_env({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""


def test_version_gc_status_need_few_variables() -> None:
    assert parse_env({"CNI_COMMAND": "VERSION", "CNI_IFNAME": "dummy"}).command is Verb.VERSION
    assert parse_env({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}).command is Verb.GC
    assert parse_env({"CNI_COMMAND": "STATUS"}).command is Verb.STATUS


def test_cni_args_ignore_unknown_values() -> None:
    assert parse_args("IgnoreUnknown=true;X=1").ignore_unknown
    assert code_of(parse_args, "IgnoreUnknown=0;X=1") == Code.INVALID_ENVIRONMENT


# ---------------------------------------------------------------- network config


def test_config_parsed() -> None:
    req = parse_request(ENV, conf(
        mtu=1400, sysctls={"net.ipv4.conf.all.forwarding": "1"}, dns={"nameservers": ["1.1.1.1"]},
        ipam={"type": "fabric-ipam", "pools": ["pods", "fd00::/64"], "assignIPv6": "true"},
        runtimeConfig={"portMappings": []}, args={"cni": {}}))  # fmt: skip
    c = req.conf
    assert (c.name, c.type, c.mtu, c.cni_version) == ("fabric", "fabric", 1400, "1.0.0")
    assert c.ipam.pools == ("pods", "fd00::/64") and c.ipam.assign_ipv6 is True
    assert c.sysctls == {"net.ipv4.conf.all.forwarding": "1"}
    assert c.dns.nameservers == ("1.1.1.1",)
    assert c.runtime_config == {"portMappings": []}


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"", Code.DECODE_FAILURE),
        (b"{", Code.DECODE_FAILURE),
        (b"\xff\xfe", Code.DECODE_FAILURE),
        (b"[]", Code.DECODE_FAILURE),
        (b'{"cniVersion": NaN}', Code.DECODE_FAILURE),
        (b"[" * 100000, Code.DECODE_FAILURE),
        (b'{"cniVersion": 1}', Code.DECODE_FAILURE),
        (b'{"name": "n", "type": "fabric"}', Code.INCOMPATIBLE_VERSION),  # 0.1.0
        (conf(cniVersion="2.0.0"), Code.INCOMPATIBLE_VERSION),
        (conf(cniVersion="0.2.0"), Code.INCOMPATIBLE_VERSION),
        (conf(name=""), Code.INVALID_CONFIG),
        (conf(name="bad name"), Code.INVALID_CONFIG),
        (conf(name=7), Code.INVALID_CONFIG),
        (conf(type=None), Code.INVALID_CONFIG),
        (conf(mtu="1500"), Code.INVALID_CONFIG),
        (conf(mtu=True), Code.INVALID_CONFIG),
        (conf(mtu=10), Code.INVALID_CONFIG),
        (conf(ipam=[]), Code.INVALID_CONFIG),
        (conf(ipam={"type": "host-local"}), Code.UNSUPPORTED_FIELD),
        (conf(ipam={"type": "fabric-ipam", "pools": "pods"}), Code.INVALID_CONFIG),
        (conf(ipam={"type": "fabric-ipam", "pools": ["10.0.0.1/8"]}), Code.INVALID_CONFIG),
        (conf(ipam={"type": "fabric-ipam", "assignIPv4": 1}), Code.INVALID_CONFIG),
        (conf(sysctls={"kernel.panic": "1"}), Code.INVALID_CONFIG),
        (conf(sysctls={"net.ipv4.ip_forward": None}), Code.INVALID_CONFIG),
        (conf(prevResult={"ips": [{"address": "nope"}]}), Code.INVALID_CONFIG),
        (conf(dns={"nameservers": "1.1.1.1"}), Code.INVALID_CONFIG),
    ],
)
def test_bad_config_codes(stdin: bytes, code: int) -> None:
    assert code_of(parse_request, ENV, stdin) == code


@pytest.mark.parametrize(
    ("verb", "old"), [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "0.4.0")]
)
def test_verb_needs_its_version(verb: str, old: str) -> None:
    env = {**ENV, "CNI_COMMAND": verb}
    assert code_of(parse_request, env, conf(cniVersion=old)) == Code.INCOMPATIBLE_VERSION


def test_valid_attachments() -> None:
    att = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]
    doc = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": att})
    req = parse_request({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, doc)
    assert req.conf.valid_attachments == (("c1", "eth0"), ("c2", "net1"))
    bad = conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": 1}]})
    assert code_of(parse_request, {"CNI_COMMAND": "GC"}, bad) == Code.INVALID_CONFIG


def test_error_version_and_document() -> None:
    assert error_version(conf(cniVersion="0.3.1")) == "0.3.1"
    assert error_version(b"junk") == LATEST
    doc = json.loads(CNIError(7, "bad", "more").to_json("0.4.0"))
    assert doc == {"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "more"}
    assert "details" not in json.loads(CNIError(11, "later").to_json())


def test_version_answer() -> None:
    assert json.loads(version_answer()) == {"cniVersion": "1.1.0",
                                            "supportedVersions": list(SUPPORTED)}  # fmt: skip


# ---------------------------------------------------------------- results per version

RESULT = Result(
    interfaces=(Interface("fab0123456789a", "ee:ee:ee:ee:ee:ee"),
                Interface("eth0", "0a:58:0a:f4:00:05", "/run/netns/p1", mtu=1450)),
    ips=(IPConfig(ipaddress.ip_interface("10.244.0.5/32"), ipaddress.ip_address("169.254.1.1"), 1),
         IPConfig(ipaddress.ip_interface("fd00::5/128"), ipaddress.ip_address("fe80::1"), 1)),
    routes=(Route(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("169.254.1.1"), mtu=1400),),
    dns=DNS(nameservers=("10.96.0.10",)),
)  # fmt: skip


@pytest.mark.parametrize("version", SUPPORTED)
def test_result_per_version_round_trips(version: str) -> None:
    doc = render(RESULT, version)
    assert doc["cniVersion"] == version
    old = version < "1.0.0"
    assert all(("version" in ip) == old for ip in doc["ips"])
    if old:
        assert [ip["version"] for ip in doc["ips"]] == ["4", "6"]
    assert all(ip["interface"] == 1 for ip in doc["ips"])
    v11 = version == "1.1.0"
    assert ("mtu" in doc["interfaces"][1]) == v11
    assert ("mtu" in doc["routes"][0]) == v11
    back = parse(json.loads(json.dumps(doc)), version)
    assert back.ips == RESULT.ips and back.dns == RESULT.dns
    assert [i.name for i in back.interfaces] == ["fab0123456789a", "eth0"]


def test_prev_result_interface_index_checked() -> None:
    with pytest.raises(CNIError):
        parse({"ips": [{"address": "10.0.0.1/32", "interface": 3}]}, "1.0.0")
    with pytest.raises(CNIError):
        parse({"ips": [{"version": "6", "address": "10.0.0.1/32"}]}, "0.4.0")


# ---------------------------------------------------------------- fabricd's answer, fuzzed


class _FakeWorkloads:
    """Succeeds with a small result for ADD, nothing for the other verbs."""

    async def run(self, plugin: str, req: Any) -> bytes:
        if req.env.command is Verb.ADD:
            return json.dumps(render(RESULT, req.conf.cni_version)).encode()
        return b""


def _answer(env: dict[str, str], stdin: bytes, flags: int = 0) -> tuple[int, bytes]:
    seen: list[tuple[str, str]] = []
    code, out = asyncio.run(
        answer(_FakeWorkloads(), lambda v, r, s: seen.append((v, r)), env, stdin, flags)  # type: ignore[arg-type]
    )
    assert len(seen) == 1 or env.get("CNI_COMMAND") == "VERSION"
    return code, out


def _assert_spec_document(code: int, out: bytes) -> dict[str, Any]:
    doc = json.loads(out) if out else {}
    if code != 0:
        assert code == 1
        assert set(doc) <= {"cniVersion", "code", "msg", "details"}
        assert doc["cniVersion"] in SUPPORTED
        assert isinstance(doc["code"], int) and doc["code"] > 0
        assert isinstance(doc["msg"], str) and doc["msg"]
    return dict(doc)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
FIELDS = {
    "cniVersion": st.sampled_from([*SUPPORTED, "0.2.0", "9.9.9", ""]) | JSON,
    "name": st.sampled_from(["fabric", "bad name", ""]) | JSON,
    "type": st.just("fabric") | JSON,
    "mtu": st.integers(0, 70000) | JSON,
    "ipam": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["fabric-ipam", "host-local"]) | JSON,
        "pools": st.lists(st.sampled_from(["pods", "10.0.0.0/8", "10.0.0.1/8", ""])) | JSON,
        "assignIPv4": st.booleans() | JSON, "gateway": st.sampled_from(["169.254.1.1"]) | JSON,
        "routes": st.lists(st.fixed_dictionaries({"dst": st.sampled_from(["0.0.0.0/0", "x"])})),
    }) | JSON,
    "sysctls": st.dictionaries(st.sampled_from(["net.ipv4.ip_forward", "kernel.x"]), JSON),
    "prevResult": JSON,
    "dns": JSON,
    "cni.dev/valid-attachments": JSON,
}  # fmt: skip
DOCS = st.fixed_dictionaries({}, optional=FIELDS)
ENVS = st.fixed_dictionaries(
    {"CNI_COMMAND": st.sampled_from([v.value for v in Verb] + ["", "BOGUS"])},
    optional={
        "CNI_CONTAINERID": st.sampled_from(["abc", "-x", ""]) | st.text(max_size=8),
        "CNI_NETNS": st.sampled_from(["/run/netns/x", "rel", ""]),
        "CNI_IFNAME": st.sampled_from(["eth0", "a" * 16, "..", ""]) | st.text(max_size=17),
        "CNI_PATH": st.just("/opt/cni/bin"),
        "CNI_ARGS": st.sampled_from(["IgnoreUnknown=1;K8S_POD_NAME=p", "X=1", "IP=1.2.3.4", "=;"]),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=ENVS, doc=DOCS)
def test_fuzz_documents_always_get_a_spec_answer(env: dict[str, str], doc: dict[str, Any]) -> None:
    code, out = _answer(env, json.dumps(doc).encode())
    got = _assert_spec_document(code, out)
    if code == 0 and env["CNI_COMMAND"] == "ADD":
        assert got["cniVersion"] == doc["cniVersion"]


@settings(max_examples=200, deadline=None)
@given(env=ENVS, stdin=st.binary(max_size=256) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_raw_stdin_always_gets_a_spec_answer(env: dict[str, str], stdin: bytes) -> None:
    _assert_spec_document(*_answer(env, stdin))


def test_too_large_stdin_is_an_io_error() -> None:
    code, out = _answer(ENV, b"", STDIN_TOO_LARGE)
    assert code == 1 and json.loads(out)["code"] == Code.IO_FAILURE


def test_answer_success_and_version() -> None:
    code, out = _answer(ENV, conf(cniVersion="0.4.0"))
    assert code == 0 and json.loads(out)["ips"][0]["version"] == "4"
    code, out = _answer({"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy"}, b"{}")
    assert code == 0 and json.loads(out)["supportedVersions"] == list(SUPPORTED)
    code, out = _answer({**ENV, "CNI_COMMAND": "DEL"}, conf())
    assert (code, out) == (0, b"")
    big = b'{"cniVersion": "1.0.0", "n": ' + b"9" * 5000 + b"}"
    assert _assert_spec_document(*_answer(ENV, big))["code"] == Code.DECODE_FAILURE
