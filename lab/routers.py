"""FRR and BIRD routers of a lab: their command lines, readiness and BGP session states.

FRR runs as its ``frr`` user (it refuses ``-u root``), so each FRR node directory is owned
by ``frr``. Every path (pid files, zserv socket, vty sockets, logs) is inside the node's
own directory; TCP vty ports are disabled (``-P 0``), so nothing binds outside the lab.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

FRR_DIR = Path("/usr/lib/frr")
BIRD = shutil.which("bird") or "/usr/sbin/bird"
BIRDC = shutil.which("birdc") or "/usr/sbin/birdc"
VTYSH = shutil.which("vtysh") or "/usr/bin/vtysh"


def prepare_frr_dir(node_dir: Path) -> None:
    """Hand ``node_dir`` to the frr user so the daemons can write pid files and logs."""
    ent = pwd.getpwnam("frr")
    os.chown(node_dir, ent.pw_uid, ent.pw_gid)
    for p in node_dir.iterdir():
        os.chown(p, ent.pw_uid, ent.pw_gid)


def frr_commands(node_dir: Path) -> list[tuple[str, list[str]]]:
    """(daemon, argv) for zebra and bgpd, in start order."""
    common = ["-z", str(node_dir / "zserv.api"), "--vty_socket", str(node_dir), "-P", "0"]
    return [
        (
            "zebra",
            [
                str(FRR_DIR / "zebra"),
                "-f",
                str(node_dir / "zebra.conf"),
                "-i",
                str(node_dir / "zebra.pid"),
                *common,
                "-s",
                "90000000",
            ],
        ),
        (
            "bgpd",
            [
                str(FRR_DIR / "bgpd"),
                "-f",
                str(node_dir / "bgpd.conf"),
                "-i",
                str(node_dir / "bgpd.pid"),
                *common,
            ],
        ),
    ]


def bird_command(node_dir: Path) -> list[str]:
    return [
        BIRD,
        "-f",
        "-c",
        str(node_dir / "bird.conf"),
        "-s",
        str(node_dir / "bird.ctl"),
        "-P",
        str(node_dir / "bird.pid"),
    ]


def vtysh(node_dir: Path, command: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VTYSH, "--vty_socket", str(node_dir), "-c", command],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def birdc(node_dir: Path, command: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIRDC, "-s", str(node_dir / "bird.ctl"), *command.split()],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ready(role: str, node_dir: Path) -> bool:
    """True when the router answers on its control socket."""
    try:
        if role == "frr":
            r = vtysh(node_dir, "show bgp summary json", timeout=3)
            return r.returncode == 0 and r.stdout.strip().startswith("{")
        return birdc(node_dir, "show status", timeout=3).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def frr_sessions(node_dir: Path) -> dict[str, str]:
    """BGP session state by peer address, from ``show bgp summary json``."""
    r = vtysh(node_dir, "show bgp summary json")
    if r.returncode != 0:
        return {}
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return {}
    peers = data.get("ipv4Unicast", {}).get("peers", {})
    return {addr: str(p.get("state", "?")) for addr, p in peers.items()}


def bird_sessions(node_dir: Path) -> dict[str, str]:
    """BGP session state by protocol name, from ``show protocols`` (Established, Active...)."""
    r = birdc(node_dir, "show protocols")
    out: dict[str, str] = {}
    if r.returncode != 0:
        return out
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[1] == "BGP":
            # name proto table state since [info]; info is the BGP state when up or trying
            out[cols[0]] = cols[5] if len(cols) > 5 else cols[3]
    return out
