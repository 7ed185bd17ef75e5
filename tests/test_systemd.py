"""fabric.agent.systemd: sd_notify against a real AF_UNIX datagram socket (no systemd needed)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric import unit as fabric_unit
from fabric.agent import systemd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_ready_stopping_watchdog_and_status(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert systemd.ready("3 sessions")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=3 sessions"
    assert systemd.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.status("waiting for etcd")
    assert notify_socket.recv(4096) == b"STATUS=waiting for etcd"
    assert systemd.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fabric-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not supported: ignored
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False  # logged, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for someone else
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_child_env_drops_systemd_variables() -> None:
    env = {"PATH": "/bin", "NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2"}
    assert systemd.child_env(env) == {"PATH": "/bin"}


def test_checked_in_unit_matches_unit_text() -> None:
    shipped = (ROOT / "fabric" / "fabricd.service").read_text()
    assert shipped == fabric_unit.unit_text(), "regenerate fabric/fabricd.service from unit_text()"


def test_unit_text() -> None:
    unit = fabric_unit.unit_text("/etc/x/fabricd.yaml", "/opt/fabric/bin/fabricd")
    lines = set(unit.splitlines())
    for want in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartSec=2",
        "KillMode=mixed",
        "TimeoutStopSec=20",
        "After=network-online.target",
        "Wants=network-online.target",
        "ExecStart=/opt/fabric/bin/fabricd --config /etc/x/fabricd.yaml",
        "LimitNOFILE=65536",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_NET_BIND_SERVICE",
        "WantedBy=multi-user.target",
    ):
        assert want in lines, want
    assert "ProtectKernelTunables=yes" not in unit  # fabricd writes sysctls (proxy_arp)
    for bad in ("relative/fabricd", "/path with space", "/a%i", "/x$y"):
        with pytest.raises(ValueError):
            fabric_unit.unit_text(fabricd_path=bad)


def test_install_unit(tmp_path: Path) -> None:
    path = fabric_unit.install_unit(tmp_path, "/etc/fabric/fabricd.yaml", "/usr/bin/fabricd")
    assert path == tmp_path / "fabricd.service"
    assert path.read_text() == fabric_unit.unit_text(fabricd_path="/usr/bin/fabricd")
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["fabricd.service"]
