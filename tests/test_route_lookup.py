"""The kernel route lookup behind ``fabricctl explain --live``: fabric.dataplane.netlink.lookup
against a real network namespace, and fabricd's health server answering ``GET /route`` with
it; ``/metrics`` refreshing the policy counters first; the counters' mapping to samples."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial

import pytest
from scratch_netns import scratch_netns

from fabric.agent.health import Check, HealthServer
from fabric.agent.metrics import Metrics
from fabric.dataplane.netlink.lookup import route_get


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("trl", [
        "link set lo up",
        "link add v0 type veth peer name v1",
        "link set v0 up", "link set v1 up",
        "addr add 10.79.0.1/24 dev v0",
        "route add 10.244.3.0/26 proto 201 nexthop via 10.79.0.2 nexthop via 10.79.0.3",
        "route add blackhole 10.244.1.0/26 proto 201",
        "route add 10.244.1.5/32 dev v1 proto 201 scope link",
    ]) as name:  # fmt: skip
        yield name


def path(ns: str) -> str:
    return f"/run/netns/{ns}"


def test_lookup_answers_the_matching_fib_entry(ns: str) -> None:
    ecmp = route_get("10.244.3.5", path(ns))
    assert (ecmp.type, ecmp.prefix, ecmp.protocol) == ("unicast", "10.244.3.0/26", 201)
    assert ecmp.gateways == ("10.79.0.2", "10.79.0.3") and ecmp.devices == ("v0",)
    host = route_get("10.244.1.5", path(ns))
    assert (host.prefix, host.devices, host.gateways) == ("10.244.1.5/32", ("v1",), ())
    connected = route_get("10.79.0.9", path(ns))
    assert (connected.prefix, connected.protocol) == ("10.79.0.0/24", 2)  # kernel
    assert route_get("10.244.1.7", path(ns)).type == "blackhole"
    assert route_get("10.99.0.1", path(ns)).type == "unreachable"  # no default route
    assert route_get("fd00::1", path(ns)).type == "unreachable"
    with pytest.raises(ValueError):
        route_get("not-an-ip", path(ns))


def _get(port: int, target: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def ok() -> Check:
    return Check(True)


def test_health_server_route_endpoint(ns: str) -> None:
    async def lookup(address: str) -> dict[str, object]:
        found = await asyncio.to_thread(partial(route_get, address, path(ns)))
        return {"node": "n1", "protocol": 201, "route": found.to_json()}

    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)

    async def go() -> None:
        m = Metrics()
        server = HealthServer("127.0.0.1:0", ok, ok, m.registry, route_lookup=lookup,
                              before_metrics=refresh)  # fmt: skip
        plain = HealthServer("127.0.0.1:0", ok, ok, m.registry)
        await server.start()
        await plain.start()
        try:
            code, body = await asyncio.to_thread(_get, server.port, "/route?dst=10.244.3.9")
            assert code == 200
            doc = json.loads(body)
            assert doc["node"] == "n1" and doc["route"]["prefix"] == "10.244.3.0/26"
            assert doc["route"]["gateways"] == ["10.79.0.2", "10.79.0.3"]
            for target in ("/route", "/route?dst=nope"):
                assert (await asyncio.to_thread(_get, server.port, target))[0] == 400
            assert (await asyncio.to_thread(_get, plain.port, "/route?dst=10.0.0.1"))[0] == 404
            assert (await asyncio.to_thread(_get, server.port, "/metrics"))[0] == 200
            assert refreshed == [1]
        finally:
            await server.stop()
            await plain.stop()

    asyncio.run(go())


def test_policy_counters_become_samples() -> None:
    """allow: per policy and direction, its rules' counters summed over chains; deny: each
    endpoint chain's default-deny counter for every policy selecting its endpoints."""
    from ipaddress import IPv4Address

    from fabric.agent.policy_metrics import policy_samples
    from fabric.dataplane.policy_table import endpoint_chain
    from fabric.policy.model import Compiled, DirectionRules, EndpointRules

    a_in = DirectionRules(("x/a", "x/deny"), ())
    b_in = DirectionRules(("x/deny",), ())
    b_out = DirectionRules(("x/a",), ())
    compiled = Compiled({
        "x/p": EndpointRules("x/p", "fab1", (IPv4Address("10.0.0.1"),), a_in, None),
        "x/q": EndpointRules("x/q", "fab2", (IPv4Address("10.0.0.2"),), b_in, b_out)}, {})  # fmt: skip
    ca, cb = (endpoint_chain(r, True, {}).name for r in (a_in, b_in))
    co = endpoint_chain(b_out, False, {}).name
    rows = [
        (ca, "x/a ingress[0] #0123456789ab", 5), (cb, "x/a ingress[0] #0123456789ab", 2),
        (ca, "x/a egress[0] #0123456789ab", 1), (ca, "default-deny ingress #0123456789ab", 7),
        (cb, "default-deny ingress #0123456789ab", 3), (co, "default-deny egress #00000000000a", 4),
        (ca, "invalid ingress #0123456789ab", 9), ("forward", "unknown pod interface egress #0123456789ab", 4),
        ("gone", "default-deny ingress #0123456789ab", 8), ("deny_in", "denied log ingress #0123456789ab", 6),
    ]  # fmt: skip
    assert policy_samples(rows, compiled) == {
        ("x", "a", "ingress", "allow"): 7, ("x", "a", "egress", "allow"): 1,
        ("x", "a", "ingress", "deny"): 7, ("x", "deny", "ingress", "deny"): 10,
        ("x", "a", "egress", "deny"): 4}  # fmt: skip
    m = Metrics()
    m.policy_packets.set(policy_samples(rows, compiled))
    labels = {"namespace": "x", "policy": "deny", "direction": "ingress", "verdict": "deny"}
    assert m.registry.get_sample_value("fabric_policy_packets_total", labels) == 10
