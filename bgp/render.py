"""ExaBGP configuration and environment for a session plan. Pure apart from reading the
MD5 password files named by the sessions (at render time, so a rotated key is picked up by
the next reconfigure).

One API process (``fabric``: the relay, JSON encoder) and one ``neighbor`` block per
``Session``, with the settings the probe verified on ExaBGP 5.0.15: ``manual-eor`` (fabricd
sends End-of-RIB once its routes are in, which makes a restart hitless on GR helpers),
graceful restart and route refresh, neighbor changes, and received UPDATEs, OPENs and
NOTIFICATIONs to the API as their bytes (``packets``, decoded by ``bgp.wire``; with
``negotiated`` so each says whether AS numbers are 4 octets).

Fields of ``Session`` that ExaBGP cannot express are not rendered: ``keepalive_time``
(ExaBGP always uses hold/3), ``max_prefixes`` (enforced by the RIB, if at all),
``rr_client``/``cluster_id`` (ExaBGP does not reflect routes) and ``required``/``kind``/
``peer_node`` (fabricd's own bookkeeping).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from pathlib import Path

from bgp.codec import FAMILIES
from bgp.errors import ConfigRenderError
from bgp.exabgp_main import RAW_ENV
from bgp.model import BGP_PORT, MD5_MAX, IPAddress, Session

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # systemd: where LoadCredential= puts secrets
GTSM_TTL = 255  # RFC 5082: a GTSM speaker sends with the maximum TTL

PROCESS = "fabric"
# Characters ExaBGP's tokeniser passes through unquoted; anything else is double-quoted,
# and the characters it cannot carry even quoted are refused.
_PLAIN = re.compile(r"^[A-Za-z0-9_./:=+@%-]+$")
_UNQUOTABLE = re.compile(r"[\"'\\\n\r]")


def _word(arg: str) -> str:
    if _PLAIN.match(arg):
        return arg
    if _UNQUOTABLE.search(arg) or not arg:
        raise ConfigRenderError(
            f"failed to render the API process command line: argument {arg!r} cannot be "
            "written in ExaBGP's configuration syntax (quotes, backslash, newline, empty)"
        )
    return f'"{arg}"'


def read_password(path: str) -> bytes:
    """The key in ``path`` without its trailing newline. Never logged, never in errors.

    Raises ``ConfigRenderError`` naming the file when it cannot be read, is empty, or is
    longer than ``MD5_MAX`` bytes (RFC 2385 keys; ExaBGP and Linux refuse longer ones).
    """
    try:
        key = Path(path).read_bytes()
    except OSError as e:
        raise ConfigRenderError(
            f"failed to read MD5 password file {path}: {e.strerror or e}"
        ) from None
    key = key.rstrip(b"\r\n")
    if not key:
        raise ConfigRenderError(f"failed to use MD5 password file {path}: it is empty")
    if len(key) > MD5_MAX:
        raise ConfigRenderError(
            f"failed to use MD5 password file {path}: the key is {len(key)} bytes, "
            f"more than the {MD5_MAX} TCP MD5 allows"
        )
    return key


def credential_path(name: str) -> str:
    """The file of systemd credential ``name``: ``$CREDENTIALS_DIRECTORY/<name>`` (fabricd's
    unit loads it with ``LoadCredential=``). Raises ``ConfigRenderError`` when the variable
    is unset (fabricd not started by systemd with credentials)."""
    base = os.environ.get(CREDENTIALS_ENV)
    if not base:
        raise ConfigRenderError(
            f"failed to read MD5 password credential {name}: ${CREDENTIALS_ENV} is not set "
            "(give fabricd's unit LoadCredential=" + name + ":<file>)"
        )
    return os.path.join(base, name)


def session_password(s: Session) -> bytes | None:
    """The session's MD5 key (from its file or systemd credential), or None."""
    if s.password_credential is not None:
        return read_password(credential_path(s.password_credential))
    if s.password_file is not None:
        return read_password(s.password_file)
    return None


def _neighbor(s: Session, generation: int) -> list[str]:
    if s.local_address.version != s.peer_ip.version:
        raise ConfigRenderError(
            f"failed to render session {s.name}: local address {s.local_address} and peer "
            f"{s.peer_ip} are of different IP versions"
        )
    for fam in s.families:
        if fam not in FAMILIES:
            raise ConfigRenderError(
                f"failed to render session {s.name}: family {fam!r} is not one of "
                f"{', '.join(FAMILIES)}"
            )
    if not s.families:
        raise ConfigRenderError(f"failed to render session {s.name}: no address family")
    lines = [
        f"neighbor {s.peer_ip} {{",
        f"    description {_word(f'{s.name} gen {generation}')};",
        f"    router-id {s.router_id};",
        # sourceAddress None: ExaBGP lets the kernel choose (active sessions only: a
        # listening neighbor needs its address)
        f"    local-address {'auto' if s.source_auto and not s.passive else s.local_address};",
        f"    local-as {s.local_as};",
        f"    peer-as {s.peer_as};",
        f"    hold-time {s.hold_time};",
    ]
    if s.passive:
        # In a mesh every node listens on the cluster's listen port, which is also the
        # port its peers connect to: the planner puts it in peer_port.
        lines += ["    passive true;", f"    listen {s.peer_port};"]
    elif s.peer_port != BGP_PORT:
        lines.append(f"    connect {s.peer_port};")
    password = session_password(s)
    if password is not None:
        # base64 sidesteps ExaBGP's quoting, which cannot carry quotes or backslashes.
        key = base64.b64encode(password).decode()
        lines += [f"    md5-password {key};", "    md5-base64 true;"]
    if s.ttl_security:
        # GTSM (RFC 5082): send with TTL 255, have the kernel drop what arrives with a TTL
        # below 256 - hops (IP_MINTTL / IPV6_MINHOPCOUNT, on the listening socket too)
        lines += [f"    outgoing-ttl {GTSM_TTL};", f"    incoming-ttl {256 - s.ttl_security};"]
    lines += [
        "    manual-eor true;",
        # fabricd keeps the received routes (bgp/rib.py): an Adj-RIB-In in ExaBGP too would
        # cost a copy of every route and ~30% of its time per received prefix.
        "    adj-rib-in false;",
        "    family {",
        *(f"        {fam};" for fam in s.families),
        "    }",
        "    capability {",
        f"        graceful-restart {s.restart_time};",
        "        route-refresh;",
        "    }",
        "    api {",
        f"        processes [ {PROCESS} ];",
        "        neighbor-changes;",
        "        negotiated;",
        # The messages' bytes: ExaBGP's parse and JSON of each received NLRI was ~75% of
        # its CPU per learned route (bgp/wire.py decodes them; bgp/exabgp_main.py skips it)
        "        receive {",
        "            packets;",
        "            update;",
        "            notification;",
        "            open;",
        "        }",
        "    }",
        "}",
    ]
    return lines


def render_config(
    sessions: Sequence[Session],
    relay_argv: Sequence[str],
    router_id: IPAddress,
    generation: int = 0,
) -> str:
    """ExaBGP configuration text for ``sessions``; the API process runs ``relay_argv``.

    ``relay_argv[0]`` must be an absolute path (ExaBGP looks relative names up in
    /etc/exabgp and $PATH). Each neighbor uses its session's ``router_id``; ``router_id``
    is the node's, written in the header. ``generation`` ends each neighbor's description
    (``<name> gen <n>``): ExaBGP ignores descriptions when it compares neighbors on reload,
    and shows them in ``show neighbor configuration``, which is how the speaker checks
    that a reload took. Raises ``ConfigRenderError`` for a plan ExaBGP
    cannot express (two sessions to one peer, mixed IP versions, an unknown family, a bad
    password file). Deterministic: the same input gives the same text, so callers can
    compare renders to decide whether anything changed.
    """
    if not relay_argv or not relay_argv[0].startswith("/"):
        raise ConfigRenderError(
            f"failed to render the API process: {list(relay_argv)!r} does not start with an "
            "absolute path"
        )
    seen: set[IPAddress] = set()
    out = [
        f"# fabricd: ExaBGP configuration for router id {router_id}. Generated; do not edit.",
        "",
        f"process {PROCESS} {{",
        f"    run {' '.join(_word(a) for a in relay_argv)};",
        "    encoder json;",
        "}",
    ]
    for s in sessions:
        if s.peer_ip in seen:
            raise ConfigRenderError(f"failed to render session {s.name}: peer {s.peer_ip} twice")
        seen.add(s.peer_ip)
        out += ["", *_neighbor(s, generation)]
    return "\n".join(out) + "\n"


def exabgp_env(log_file: str | Path) -> dict[str, str]:
    """ExaBGP settings (to add to the child's environment) that the probe found necessary.

    Root without privilege drop (the API process and listening on :179 need it; a dropped
    ExaBGP could not exec the relay), no CLI pipes, no per-route process logging (it
    halved ingestion speed), log to ``log_file`` (ExaBGP rotates it: 1 MiB x 3), no PID
    file (a stale one makes ExaBGP exit silently), acks on, API process respawned, compact
    NLRI lists, no message statistics (ExaBGP logs its counters at INFO whenever they change:
    a line, a file write and a rotation check for every keepalive sent or received).
    """
    return {
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.api.cli": "false",
        "exabgp.api.ack": "true",
        "exabgp.api.respawn": "true",
        "exabgp.api.terminate": "false",
        "exabgp.api.encoder": "json",
        # NLRIs as plain JSON strings, not {"nlri": ...} objects: less for ExaBGP to format
        # and for fabricd to decode per received prefix (bgp/codec.py reads both forms)
        "exabgp.api.compact": "true",
        "exabgp.log.processes": "false",
        "exabgp.log.statistics": "false",
        "exabgp.log.level": "INFO",  # above DEBUG: bgp/exabgp_main.py makes debug calls free
        RAW_ENV: "1",  # bgp/exabgp_main.py: received UPDATEs are passed on, not parsed
        "exabgp.log.destination": str(log_file),
    }
