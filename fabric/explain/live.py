"""``--live``: the kernel's route lookups on this node, asked of the local fabricd.

fabricd answers ``GET /route?dst=IP`` on its health listener (loopback by default) with the
kernel's matching FIB entry, looked up through pyroute2 in the dataplane room; this client
is the standard library only, so neither fabricctl's start nor the layering pays for it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from urllib.parse import quote

from fabric.errors import CLIError
from fabric.explain.walk import Live

DEFAULT_HEALTH = "127.0.0.1:9099"


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise CLIError(f"{listen!r} is not HOST:PORT", "--health-listen")
    return host.strip("[]"), int(port)


def lookup(listen: str, addresses: Iterable[str], timeout: float = 3.0) -> Live:
    """The local fabricd's node, route protocol and kernel route for each address."""
    host, port = _split(listen)
    node, protocol, routes = "", 0, {}
    for addr in dict.fromkeys(addresses):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", f"/route?dst={quote(addr)}")
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
        except OSError as e:
            raise CLIError(f"fabricd does not answer on {listen} ({e}): --live runs on a node "
                           "whose fabricd is up", "--live") from e  # fmt: skip
        finally:
            conn.close()
        if resp.status != 200:
            raise CLIError(f"fabricd on {listen} answered {resp.status} for the route to {addr}: "
                           f"{body.strip()} (an older fabricd without /route?)", "--live")  # fmt: skip
        try:
            doc = json.loads(body)
            node, protocol = str(doc["node"]), int(doc["protocol"])
            routes[addr] = dict(doc["route"])
        except (ValueError, KeyError, TypeError) as e:
            raise CLIError(f"fabricd on {listen} answered what is not a route lookup: {e}",
                           "--live") from e  # fmt: skip
    return Live(node, protocol, routes)
