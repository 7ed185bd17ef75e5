"""fabric.agent.health and fabric.agent.metrics: a real server on 127.0.0.1, port 0, spoken to over TCP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from fabric.agent.health import Check, HealthServer, is_loopback, split_listen
from fabric.agent.metrics import Metrics, SessionSample

ROOT = Path(__file__).resolve().parent.parent
CheckFn = Callable[[], Awaitable[Check]]


def fixed(ok: bool, **detail: str) -> CheckFn:
    async def check() -> Check:
        return Check(ok, detail)

    return check


async def hangs() -> Check:
    await asyncio.sleep(60)
    return Check(True)


async def raises() -> Check:
    raise RuntimeError("speaker gone")


@asynccontextmanager
async def serving(
    live: CheckFn | None = None,
    ready: CheckFn | None = None,
    metrics: Metrics | None = None,
    **kwargs: float,
) -> AsyncIterator[HealthServer]:
    metrics = metrics or Metrics()
    server = HealthServer(
        "127.0.0.1:0",
        live or fixed(True, exabgp="ok"),
        ready or fixed(False, etcd="unreachable", peers="0/1 required peers established"),
        metrics.registry,
        **kwargs,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw(port: int, data: bytes, close_write: bool = False) -> bytes:
    """Send ``data`` and read the whole answer (the server closes after one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if close_write:
            writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def get(port: int, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    answer = await raw(port, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
    assert status_line.startswith("HTTP/1.1 ")
    if method != "HEAD":  # HEAD: the length GET's body would have, and no body
        assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


def test_probes_answer_200_and_503() -> None:
    async def main() -> None:
        async with serving() as s:
            status, headers, body = await get(s.port, "/livez")
            assert (status, body) == (200, b"ok\n")
            assert headers["connection"] == "close"
            status, _, body = await get(s.port, "/readyz")
            assert status == 503
            assert body == b"failed: etcd: unreachable; peers: 0/1 required peers established\n"

    asyncio.run(main())


def test_verbose_returns_the_detail_as_json() -> None:
    async def main() -> None:
        async with serving() as s:
            status, headers, body = await get(s.port, "/livez?verbose")
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(body) == {"ok": True, "detail": {"exabgp": "ok"}}
            status, _, body = await get(s.port, "/readyz?verbose=1")
            assert status == 503
            assert json.loads(body)["detail"]["etcd"] == "unreachable"
            _, _, body = await get(s.port, "/livez?verbose=false")
            assert body == b"ok\n"

    asyncio.run(main())


def test_unknown_path_404_other_methods_405_head_allowed() -> None:
    async def main() -> None:
        async with serving() as s:
            assert (await get(s.port, "/healthz"))[0] == 404
            assert (await get(s.port, "/"))[0] == 404
            status, headers, _ = await get(s.port, "/livez", "POST")
            assert status == 405 and headers["allow"] == "GET, HEAD"
            assert (await get(s.port, "/metrics", "DELETE"))[0] == 405
            status, headers, body = await get(s.port, "/livez", "HEAD")
            assert (status, body, headers["content-length"]) == (200, b"", "3")

    asyncio.run(main())


def test_a_hanging_check_times_out_and_a_raising_one_fails() -> None:
    async def main() -> None:
        async with serving(live=hangs, ready=raises, check_timeout=0.2) as s:
            started = time.monotonic()
            status, _, body = await get(s.port, "/livez?verbose")
            assert time.monotonic() - started < 2
            assert status == 503
            assert json.loads(body) == {"ok": False, "detail": {"error": "timed out"}}
            status, _, body = await get(s.port, "/readyz")
            assert (status, body) == (503, b"failed: error: RuntimeError: speaker gone\n")

    asyncio.run(main())


def test_default_check_timeout_is_two_seconds() -> None:
    async def main() -> None:
        async with serving(live=hangs) as s:
            started = time.monotonic()
            status, _, _ = await get(s.port, "/livez")
            assert status == 503
            assert 1.9 < time.monotonic() - started < 4

    asyncio.run(main())


def test_metrics_are_prometheus_text_with_fabric_names() -> None:
    async def main() -> None:
        metrics = Metrics()
        metrics.set_sessions([SessionSample("10.0.0.1", "global", "up", 5, 4, 1)])
        metrics.etcd_error("watch")
        metrics.observe_reconcile("routes", 0.003)
        async with serving(metrics=metrics) as s:
            status, headers, body = await get(s.port, "/metrics")
        assert status == 200 and headers["content-type"] == CONTENT_TYPE_LATEST
        text = body.decode()
        assert 'fabric_bgp_session_state{peer="10.0.0.1",state="up",type="global"} 1.0' in text
        assert 'fabric_etcd_errors_total{op="watch"} 1.0' in text
        assert 'fabric_reconcile_duration_seconds_count{reconciler="routes"} 1.0' in text
        assert "fabric_process_resident_memory_bytes" in text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert names >= {"fabric_bgp_sessions", "fabric_routes_installed", "fabric_cni_requests"}
        assert all(n.startswith("fabric_") for n in names)

    asyncio.run(main())


def test_malformed_requests_get_4xx_and_the_server_keeps_serving() -> None:
    async def main() -> None:
        async with serving(read_timeout=0.3) as s:
            assert (await raw(s.port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            assert (await raw(s.port, b"GET /livez HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await raw(s.port, b"GET /livez HTTP/1.1\r\nno colon\r\n\r\n"))[9:12] == b"400"
            cut = await raw(s.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n", close_write=True)
            assert cut.startswith(b"HTTP/1.1 400")
            huge = b"GET /livez HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
            assert (await raw(s.port, huge)).startswith(b"HTTP/1.1 431 ")
            many = b"GET /livez HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n"
            assert (await raw(s.port, many)).startswith(b"HTTP/1.1 431 ")
            long_line = b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"
            assert (await raw(s.port, long_line)).startswith(b"HTTP/1.1 414 ")
            assert await raw(s.port, b"", close_write=True) == b""  # closed at once: nothing
            assert (await raw(s.port, b"\xff\xfe\x00\x01\r\n\r\n")).startswith(b"HTTP/1.1 400")
            # A client that sends half a request and stalls gets 408 after read_timeout.
            started = time.monotonic()
            assert (await raw(s.port, b"GET /livez HT")).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 3
            assert (await get(s.port, "/livez"))[0] == 200

    asyncio.run(main())


def test_slow_clients_do_not_block_others_and_stop_ends_them() -> None:
    async def main() -> None:
        async with serving() as s:  # read timeout 5 s: these stay connected throughout
            stalled = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(5)]
            for _, w in stalled:
                w.write(b"GET /livez HTTP/1.1\r\n")
            started = time.monotonic()
            assert (await get(s.port, "/livez"))[0] == 200
            assert time.monotonic() - started < 1
            await s.stop()  # returns with the stalled connections still open
            assert time.monotonic() - started < 2
            for r, w in stalled:
                assert await asyncio.wait_for(r.read(), 2) == b""
                w.close()
                await w.wait_closed()

    asyncio.run(main())


def test_port_before_start_and_double_stop() -> None:
    async def main() -> None:
        server = HealthServer("127.0.0.1:0", fixed(True), fixed(True), Metrics().registry)
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.stop()
        await server.start()
        assert server.port > 0
        await server.stop()
        await server.stop()

    asyncio.run(main())


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:9099") == ("127.0.0.1", 9099)
    assert split_listen("[::1]:0") == ("::1", 0)
    assert split_listen("localhost:80") == ("localhost", 80)
    for bad in ("9099", "host:80", "::1:80", "127.0.0.1:99999", "127.0.0.1:", "[::1]"):
        with pytest.raises(ValueError):
            split_listen(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


# metrics -----------------------------------------------------------------------------


def sample_value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_sessions_replace_the_previous_picture() -> None:
    m = Metrics()
    m.set_sessions([
        SessionSample("10.0.0.1", "global", "up", received=3, accepted=3),
        SessionSample("10.0.0.2", "node-to-node mesh", "connected", received=1, rejected=1),
    ])  # fmt: skip
    assert sample_value(m, "fabric_bgp_session_state", peer="10.0.0.1", type="global",
                        state="up") == 1  # fmt: skip
    assert sample_value(m, "fabric_bgp_session_state", peer="10.0.0.1", type="global",
                        state="idle") == 0  # fmt: skip
    assert sample_value(m, "fabric_bgp_sessions", state="up") == 1
    assert sample_value(m, "fabric_bgp_sessions", state="connected") == 1
    assert sample_value(m, "fabric_bgp_rejected_prefixes", peer="10.0.0.2") == 1
    m.set_sessions([SessionSample("10.0.0.1", "global", "down")])
    assert sample_value(m, "fabric_bgp_session_state", peer="10.0.0.2",
                        type="node-to-node mesh", state="connected") is None  # fmt: skip
    assert sample_value(m, "fabric_bgp_received_prefixes", peer="10.0.0.2") is None
    assert sample_value(m, "fabric_bgp_received_prefixes", peer="10.0.0.1") == 0
    assert sample_value(m, "fabric_bgp_sessions", state="up") == 0
    assert sample_value(m, "fabric_bgp_sessions", state="down") == 1
    m.set_sessions([SessionSample("10.0.0.1", "route reflector", "up")])  # its type changed
    assert sample_value(m, "fabric_bgp_session_state", peer="10.0.0.1", type="global",
                        state="down") is None  # fmt: skip


def test_helpers() -> None:
    m = Metrics()
    m.set_routes(unicast=7, blackhole=2, local=30)
    m.set_announcements(3)
    m.set_ipam(blocks=2)
    m.set_ipam(blocks=2, ips=31)
    m.prefixes_rejected("10.0.0.9", 4)
    m.exabgp_restart()
    m.route_programming_failed()
    m.cni_request("ADD", "ok", 0.04)
    with pytest.raises(ValueError), m.time_reconcile("full_resync"):
        raise ValueError("reconcile failed")
    assert sample_value(m, "fabric_routes_installed", type="local") == 30
    assert sample_value(m, "fabric_bgp_announcements") == 3
    assert sample_value(m, "fabric_ipam_allocated_ips") == 31
    assert sample_value(m, "fabric_bgp_prefix_rejections_total", peer="10.0.0.9") == 4
    assert sample_value(m, "fabric_exabgp_restarts_total") == 1
    assert sample_value(m, "fabric_route_programming_failures_total") == 1
    assert sample_value(m, "fabric_cni_requests_total", verb="ADD", result="ok") == 1
    assert sample_value(m, "fabric_cni_request_duration_seconds_count", verb="ADD") == 1
    assert sample_value(m, "fabric_reconcile_duration_seconds_count",
                        reconciler="full_resync") == 1  # fmt: skip
    assert sample_value(m, "fabric_reconcile_duration_seconds_count", reconciler="nat") == 0


def test_each_agent_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.exabgp_restart()
    assert b.registry.get_sample_value("fabric_exabgp_restarts_total") == 0


def test_docs_list_every_metric() -> None:
    page = (ROOT / "docs" / "design" / "agent.md").read_text()
    documented = {n.removesuffix("_total") for n in re.findall(r"`(fabric_[a-z_]+)`", page)}
    names = {n for n in Metrics().names() if not n.startswith("fabric_process_")}
    assert names <= documented, f"docs/design/agent.md misses {sorted(names - documented)}"
