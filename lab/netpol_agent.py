"""A pod's server and prober for the NetworkPolicy tests, run inside the pod's namespace.

Standalone (standard library only, started as ``python3 -I -S netpol_agent.py``) so it
costs one interpreter per pod and nothing of the lab or the fabric is imported in a pod.

Serves, on every address of the pod (one dual-stack socket each), TCP and UDP on each
``--ports`` port, and SCTP too when ``--sctp`` is given (the caller checks the kernel has
it): TCP and SCTP accept and close, UDP echoes every datagram back. It then prints one
JSON line ``{"ready": true, "serving": [...]}`` and reads commands, one JSON line each,
from stdin:

    {"probe": [[id, ip, port, "TCP"|"UDP"|"SCTP"], ...], "timeout": 1.0}

All probes of a command run at once (non-blocking sockets, one ``selectors`` loop): a TCP
or SCTP probe succeeds when the handshake completes, a UDP probe when the echo comes back,
each within ``timeout`` seconds. The answer is one JSON line
``{"results": {id: [ok, reason]}}`` with reason ``ok``, ``timeout``, ``refused`` or an
errno name.

    {"watch": [ip, port], "want": true, "interval": 0.002, "timeout": 10}

(the benchmark's flip detector) answers ``{"watching": true}`` at once, then starts a TCP
connection attempt every ``interval`` seconds (each given 0.3 s, many in flight) until one
completes, and answers ``{"t": <time.monotonic() of the completion>, "attempts": n}``
(``t`` null after ``timeout`` s). With ``"want": false`` it probes one attempt at a time and
answers when one fails (a reset, not a timing). CLOCK_MONOTONIC is the same in every
network namespace, so ``t`` compares with the caller's clock. End of stdin stops the agent.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import threading
import time
from typing import Any

IPPROTO_SCTP = 132
UDP_PAYLOAD = b"netpol-probe"


def _listener(kind: int, proto: int, port: int) -> socket.socket:
    """A dual-stack socket bound to ``port`` (IPv4-only when the pod has no IPv6)."""
    try:
        s = socket.socket(socket.AF_INET6, kind, proto)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple[Any, ...] = ("::", port)
    except OSError:
        s = socket.socket(socket.AF_INET, kind, proto)
        addr = ("0.0.0.0", port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    if kind == socket.SOCK_STREAM:
        s.listen(4096)  # the connection-rate loop outruns a starved agent: keep its SYNs
    s.setblocking(False)
    return s


def serve(ports: list[int], sctp: bool) -> list[str]:
    """Start the servers on a daemon thread; the list of what is served."""
    sel = selectors.DefaultSelector()
    serving = []
    for port in ports:
        kinds = [("TCP", socket.SOCK_STREAM, 0), ("UDP", socket.SOCK_DGRAM, 0)]
        if sctp:
            kinds.append(("SCTP", socket.SOCK_STREAM, IPPROTO_SCTP))
        for name, kind, proto in kinds:
            sel.register(_listener(kind, proto, port), selectors.EVENT_READ, name)
            serving.append(f"{port}/{name}")

    def loop() -> None:
        while True:
            for key, _ in sel.select():
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    if key.data == "UDP":
                        data, peer = s.recvfrom(2048)
                        s.sendto(data, peer)
                    else:
                        while True:  # drain the accept queue
                            conn, _ = s.accept()
                            conn.close()
                except OSError:  # BlockingIOError: drained
                    continue

    threading.Thread(target=loop, daemon=True).start()
    return serving


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def probe(targets: list[list[Any]], timeout: float) -> dict[str, list[Any]]:
    """Run every probe at once; {id: [ok, reason]}."""
    sel = selectors.DefaultSelector()
    results: dict[str, list[Any]] = {}
    for target, ip, port, proto in targets:
        pid = str(target)
        kind, num = {"TCP": (socket.SOCK_STREAM, 0), "UDP": (socket.SOCK_DGRAM, 0),
                     "SCTP": (socket.SOCK_STREAM, IPPROTO_SCTP)}[proto]  # fmt: skip
        try:
            s = socket.socket(_family(ip), kind, num)
        except OSError as e:
            results[pid] = [False, errno.errorcode.get(e.errno or 0, str(e))]
            continue
        s.setblocking(False)
        rc = s.connect_ex((ip, int(port)))
        if proto == "UDP":
            if rc == 0:
                try:
                    s.send(UDP_PAYLOAD)
                except OSError as e:
                    results[pid] = [False, errno.errorcode.get(e.errno or 0, str(e))]
                    s.close()
                    continue
            sel.register(s, selectors.EVENT_READ, (pid, proto))
        elif rc in (0, errno.EINPROGRESS):
            sel.register(s, selectors.EVENT_WRITE, (pid, proto))
        else:
            results[pid] = [False, errno.errorcode.get(rc, str(rc))]
            s.close()
    deadline = time.monotonic() + timeout
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            pid, proto = key.data
            if proto == "UDP":
                try:
                    ok = conn.recv(2048) == UDP_PAYLOAD
                    results[pid] = [ok, "ok" if ok else "garbled"]
                except OSError as e:
                    name = "refused" if e.errno == errno.ECONNREFUSED else None
                    results[pid] = [False, name or errno.errorcode.get(e.errno or 0, str(e))]
            else:
                err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    results[pid] = [True, "ok"]
                else:
                    name = "refused" if err == errno.ECONNREFUSED else None
                    results[pid] = [False, name or errno.errorcode.get(err, str(err))]
            sel.unregister(conn)
            conn.close()
    for key in list(sel.get_map().values()):
        results[key.data[0]] = [False, "timeout"]
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return results


def _attempt(ip: str, port: int) -> socket.socket:
    s = socket.socket(_family(ip), socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((ip, port))
    return s


def watch(ip: str, port: int, want: bool, interval: float, timeout: float) -> dict[str, Any]:
    """See the module docstring: the time the first connection completes (``want``) or
    the first attempt fails (not ``want``)."""
    end = time.monotonic() + timeout
    attempts = 0
    if not want:
        while time.monotonic() < end:
            attempts += 1
            ok = probe([["w", ip, port, "TCP"]], 0.3)["w"][0]
            if not ok:
                return {"t": time.monotonic(), "attempts": attempts}
            time.sleep(interval)
        return {"t": None, "attempts": attempts}
    sel = selectors.DefaultSelector()
    started: dict[int, float] = {}
    next_at = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now > end:
                return {"t": None, "attempts": attempts}
            if now >= next_at:
                s = _attempt(ip, port)
                sel.register(s, selectors.EVENT_WRITE)
                started[s.fileno()] = now
                attempts += 1
                next_at = now + interval
            for key, _ in sel.select(max(0.0, next_at - time.monotonic())):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return {"t": time.monotonic(), "attempts": attempts}
                sel.unregister(conn)
                started.pop(conn.fileno(), None)
                conn.close()
            for key in list(sel.get_map().values()):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                if time.monotonic() - started.get(conn.fileno(), 0.0) > 0.3:
                    sel.unregister(conn)
                    started.pop(conn.fileno(), None)
                    conn.close()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ports", default="80,81")
    p.add_argument("--sctp", action="store_true")
    args = p.parse_args()
    serving = serve([int(x) for x in args.ports.split(",") if x], args.sctp)
    print(json.dumps({"ready": True, "serving": serving}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if "watch" in cmd:
            ip, port = cmd["watch"]
            print(json.dumps({"watching": True}), flush=True)
            got = watch(str(ip), int(port), bool(cmd.get("want", True)),
                        float(cmd.get("interval", 0.002)), float(cmd.get("timeout", 10.0)))  # fmt: skip
            print(json.dumps(got), flush=True)
            continue
        out = probe(cmd.get("probe", []), float(cmd.get("timeout", 1.0)))
        print(json.dumps({"results": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
