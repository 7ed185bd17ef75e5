"""Text renderings of the status documents each fabricd publishes (``fabricctl bgp status``,
``routes``, ``node show``, ``peer show``): ``calicoctl node status``-style tables and, for
sessions that are not up, their current run of connection attempts. Pure text, no I/O.
"""

from __future__ import annotations

import time
from typing import Any

from fabric.cli.output import boxed, properties, table
from fabric.resources.bgp_store import Status

STATUS_HEADERS = ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]
_DAY = 86400.0


def since(ts: object, now: float) -> str:
    """HH:MM:SS local time, or the date when more than a day ago (as calicoctl/BIRD)."""
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "" if ts is None else str(ts)
    fmt = "%Y-%m-%d" if now - ts > _DAY else "%H:%M:%S"
    return time.strftime(fmt, time.localtime(ts))


def ago(ts: object, now: float) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "at an unknown time"
    age = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age // size}{unit} ago"
    return f"{age}s ago"


def plural(count: object, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def summary(doc: Status, now: float) -> list[tuple[str, object]]:
    """What a node's status document says, in a few lines (``node show``, ``bgp status``)."""
    sp = doc.get("speaker") or {}
    speaker = (f"running (pid {sp.get('pid')}, {sp.get('restarts', 0)} restarts)"
               if sp.get("running") else f"NOT running ({sp.get('restarts', 0)} restarts)")  # fmt: skip
    sessions = doc.get("sessions") or []
    up = sum(1 for x in sessions if x.get("state") == "up")
    required = [x for x in sessions if x.get("required")]
    req_up = sum(1 for x in required if x.get("state") == "up")
    rt = doc.get("routes") or {}
    return [("fabricd", f"running, status updated {ago(doc.get('updated'), now)}"),
            ("BGP speaker", speaker),
            ("BGP sessions", f"{len(sessions)}, {up} up; {req_up} of {len(required)} required up"),
            ("Routes installed", f"{rt.get('installed', 0)} ({plural(rt.get('blackholes', 0), 'blackhole')})")]  # fmt: skip


def absent(name: str, known: bool) -> str:
    why = "fabricd is not running" if known else "unknown node, or fabricd is not running there"
    return f"Node {name}: no status published ({why})."


def render_status(name: str, doc: Status | None, known: bool, now: float) -> str:
    """``calicoctl node status`` for one node: IPv4 and IPv6 session tables."""
    if doc is None:
        return absent(name, known)
    if "error" in doc:
        return f"Node {name}: {doc['error']}"
    lines = [f"Node {name}:", properties((f"  {k}", v) for k, v in summary(doc, now))]
    sessions = doc.get("sessions") or []
    for family, label in ((4, "IPv4"), (6, "IPv6")):
        rows = [[x.get("peerIP"), x.get("type"), x.get("state"), since(x.get("since"), now),
                 x.get("info")] for x in sessions
                if (6 if ":" in str(x.get("peerIP")) else 4) == family]  # fmt: skip
        lines += ["", f"{label} BGP status",
                  boxed(STATUS_HEADERS, rows) if rows else f"No {label} peers found."]  # fmt: skip
    lines += _attempts(sessions, now)
    return "\n".join(lines)


def _attempts(sessions: list[dict[str, Any]], now: float) -> list[str]:
    """Why each session that is not up is not: its current run of connection attempts."""
    out = []
    for x in sessions:
        if x.get("state") == "up" or x.get("connectingSince") is None:
            continue
        n = int(x.get("attempts") or 0)
        out.append(f"  {x.get('peerIP')}: connecting since {since(x['connectingSince'], now)}, "
                   f"{plural(n, 'attempt')}; failed attempts since start: "
                   f"{x.get('failedAttempts', 0)}")  # fmt: skip
        if x.get("lastFailure"):
            out.append(f"    last failure: {x['lastFailure']}")
        if x.get("hint"):
            out.append(f"    hint: {x['hint']}")
    return ["", "Sessions not established:", *out] if out else []


def render_routes(name: str, doc: Status | None, known: bool) -> str:
    if doc is None:
        return absent(name, known)
    if "error" in doc:
        return f"Node {name}: {doc['error']}"
    rt = doc.get("routes") or {}
    items = rt.get("items") or []
    lines = [f"Node {name}: {plural(rt.get('installed', len(items)), 'route')} installed "
             f"({plural(rt.get('blackholes', 0), 'blackhole')})"]  # fmt: skip
    rows = [[r.get("dst"), r.get("type"), ",".join(str(v) for v in r.get("via") or ()),
             r.get("dev")] for r in items]  # fmt: skip
    lines.append(table(["DESTINATION", "TYPE", "VIA", "DEV"], rows))
    if rt.get("truncated"):
        lines.append(f"(list truncated by fabricd: {len(items)} of {rt.get('installed', '?')} "
                     "routes shown)")  # fmt: skip
    return "\n".join(lines)
