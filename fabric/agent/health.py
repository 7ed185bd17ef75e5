"""The health and metrics server: ``GET /livez``, ``/readyz`` and ``/metrics`` over HTTP/1.1.

A deliberately tiny server on ``asyncio.start_server``: one request per connection
(``Connection: close``), no framework. ``HEAD`` is answered like ``GET`` without a body
(HTTP requires both); any other method on a known path is 405, an unknown path 404.

Probes: ``/livez`` and ``/readyz`` run their check, bounded by ``check_timeout`` (a check
that hangs fails with "timed out", one that raises fails with its error). 200 with body
``ok``, or 503 with ``failed: <detail>``; ``?verbose`` answers the detail as JSON
``{"ok": bool, "detail": {...}}`` with the same status.

``/metrics`` first awaits ``before_metrics`` when given (fabricd reads the nftables policy
counters then; bounded by ``check_timeout``, a failure is logged and the scrape answered).

Diagnostics: ``/route?dst=IP`` answers, as JSON, the kernel's route to IP on this node (the
matching FIB entry, through pyroute2) with fabricd's node name and route protocol, for
``fabricctl explain --live``; 400 when ``dst`` is missing or not an address. It is served
only when the agent gives a lookup function, on the same (loopback by default) listener.

Robustness: a client has ``read_timeout`` seconds to send its request head, which may not
exceed ``MAX_HEAD`` bytes (431 beyond), a malformed one gets 400, and at most
``MAX_CONNECTIONS`` are served at once (others are closed at once), so a slow or hostile
client can neither stall nor kill the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("fabric.agent.health")

CHECK_TIMEOUT = 2.0  # kubelet's default probe timeout is 1 s; ours must answer well within 10
READ_TIMEOUT = 5.0
MAX_HEAD = 8192  # request line plus headers, as many servers' default limit
MAX_HEADERS = 64
MAX_CONNECTIONS = 64  # probes and scrapes are few; more means someone misbehaves
PATHS = ("/livez", "/readyz", "/metrics", "/route")
_METHODS = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class Check:
    """A probe's outcome; ``detail`` says per component what was seen (shown by ?verbose)."""

    ok: bool
    detail: Mapping[str, str] = field(default_factory=dict)


CheckFn = Callable[[], Awaitable[Check]]
LookupFn = Callable[[str], Awaitable[Mapping[str, Any]]]


def split_listen(listen: str) -> tuple[str, int]:
    """``IP:port``, ``[IPv6]:port`` or ``localhost:port`` as (host, port); ValueError else."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", listen)
    if not m or int(m.group(2) or m.group(4)) > 65535:
        raise ValueError(f"{listen!r} is not IP:port, [IPv6]:port or localhost:port")
    host = m.group(1) or m.group(3)
    if host != "localhost":
        ipaddress.ip_address(host)  # ValueError for a name: the listen address is an IP
    return host, int(m.group(2) or m.group(4))


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class _Reject(Exception):
    """Answer ``status`` and close (a malformed, oversized or too slow request)."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class HealthServer:
    """Serves the probes and the metrics of ``registry`` on ``listen`` (see split_listen)."""

    def __init__(
        self,
        listen: str,
        live: CheckFn,
        ready: CheckFn,
        registry: CollectorRegistry,
        *,
        check_timeout: float = CHECK_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        route_lookup: LookupFn | None = None,
        before_metrics: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.host, self._port = split_listen(listen)
        self.checks = {"/livez": live, "/readyz": ready}
        self.registry = registry
        self.check_timeout = check_timeout
        self.read_timeout = read_timeout
        self.route_lookup = route_lookup
        self.before_metrics = before_metrics
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when listening on port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the health server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=MAX_HEAD, reuse_address=True
        )
        log.info("health server on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and end the connections in progress. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._conns) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._conns.add(task)
        try:
            await self._exchange(reader, writer)
        except (ConnectionError, TimeoutError) as e:
            log.debug("health client went away: %s", e)
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target = "GET", ""
        try:
            async with asyncio.timeout(self.read_timeout):
                method, target = await _read_head(reader)
            status, ctype, body = await self._route(method, target)
        except _Reject as e:
            status, ctype, body = e.status, "text/plain; charset=utf-8", e.status.phrase + "\n"
        except TimeoutError:
            status, ctype, body = HTTPStatus.REQUEST_TIMEOUT, "text/plain", "request timeout\n"
        except EOFError:
            return  # the client closed before sending a request
        except Exception:  # a bug, or a collector that failed: answer, keep serving
            log.exception("health server: failed to answer %s %s", method, target)
            status, ctype, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", "error\n"
        data = body.encode() if isinstance(body, str) else body
        extra = "Allow: GET, HEAD\r\n" if status == HTTPStatus.METHOD_NOT_ALLOWED else ""
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n{extra}"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else data))
        async with asyncio.timeout(self.read_timeout):
            await writer.drain()

    async def _route(self, method: str, target: str) -> tuple[HTTPStatus, str, str | bytes]:
        url = urlsplit(target)
        if url.path not in PATHS or (url.path == "/route" and self.route_lookup is None):
            return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", "not found\n"
        if method not in _METHODS:
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "use GET\n"
        if url.path == "/metrics":
            await self._refresh()
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if url.path == "/route":
            return await self._lookup(url.query)
        check = await self.run_check(self.checks[url.path])
        status = HTTPStatus.OK if check.ok else HTTPStatus.SERVICE_UNAVAILABLE
        verbose = parse_qs(url.query, keep_blank_values=True).get("verbose")
        if verbose is not None and verbose[-1].lower() not in ("0", "false", "no"):
            doc = {"ok": check.ok, "detail": dict(check.detail)}
            return status, "application/json", json.dumps(doc, sort_keys=True) + "\n"
        if check.ok:
            return status, "text/plain; charset=utf-8", "ok\n"
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(check.detail.items()))
        return status, "text/plain; charset=utf-8", f"failed: {reasons}\n"

    async def _refresh(self) -> None:
        """Metrics read at scrape time (nft counters): bounded, and never a failed scrape."""
        if self.before_metrics is None:
            return
        try:
            async with asyncio.timeout(self.check_timeout):
                await self.before_metrics()
        except Exception as e:  # the other metrics are still worth answering
            log.warning("failed to refresh metrics before a scrape: %s: %s", type(e).__name__, e)

    async def _lookup(self, query: str) -> tuple[HTTPStatus, str, str]:
        assert self.route_lookup is not None
        dst = parse_qs(query).get("dst")
        if not dst:
            return HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", "dst=IP is required\n"
        try:
            async with asyncio.timeout(self.check_timeout):
                doc = await self.route_lookup(dst[-1])
        except ValueError as e:
            return HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", f"dst: {e}\n"
        except TimeoutError:
            return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", "timed out\n"
        return HTTPStatus.OK, "application/json", json.dumps(doc, sort_keys=True) + "\n"

    async def run_check(self, fn: CheckFn) -> Check:
        """``fn()`` bounded by check_timeout; a timeout or an exception is a failed Check."""
        try:
            async with asyncio.timeout(self.check_timeout):
                result = await fn()
        except TimeoutError:
            return Check(False, {"error": "timed out"})
        except Exception as e:
            log.warning("health check failed: %s: %s", type(e).__name__, e)
            return Check(False, {"error": f"{type(e).__name__}: {e}"})
        return result


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and target of one request; headers are read and dropped."""
    try:
        line = await reader.readline()
    except ValueError:  # longer than the stream's limit (MAX_HEAD)
        raise _Reject(HTTPStatus.REQUEST_URI_TOO_LONG) from None
    if not line:
        raise EOFError
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not re.fullmatch(r"HTTP/1\.[01]", parts[2]) or not parts[0].isalpha():
        raise _Reject(HTTPStatus.BAD_REQUEST)
    size, count = len(line), 0
    while True:
        try:
            header = await reader.readline()
        except ValueError:
            raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        size, count = size + len(header), count + 1
        if size > MAX_HEAD or count > MAX_HEADERS:
            raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if header in (b"\r\n", b"\n"):
            return parts[0], parts[1]
        if not header.endswith(b"\n") or b":" not in header:
            raise _Reject(HTTPStatus.BAD_REQUEST)  # cut short, or not a header
