"""bgp.render: ExaBGP configuration text (pure), checked by the real ``exabgp validate``."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from bgp.errors import ConfigRenderError
from bgp.model import PeerType, Session
from bgp.render import exabgp_env, read_password, render_config

EXABGP = Path(sys.executable).with_name("exabgp")
RELAY = [sys.executable, "-IS", str(Path(__file__).parents[1] / "bgp" / "relay.py")]
RID = ipaddress.IPv4Address("10.77.0.2")


def session(peer: str, local: str, **kw: object) -> Session:
    args: dict[str, object] = {
        "name": f"Mesh_{peer.replace('.', '_').replace(':', '_')}",
        "kind": PeerType.MESH,
        "peer_ip": ipaddress.ip_address(peer),
        "peer_as": 64512,
        "local_as": 64512,
        "local_address": ipaddress.ip_address(local),
        "router_id": RID,
    }
    args.update(kw)
    return Session(**args)  # type: ignore[arg-type]


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    return subprocess.run(
        [str(EXABGP), "validate", "-n", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mesh_session_text() -> None:
    text = render_config([session("10.77.0.1", "10.77.0.2", hold_time=9)], RELAY, RID)
    assert f"run {' '.join(RELAY)};" in text
    assert "neighbor 10.77.0.1 {" in text
    for needle in (
        "router-id 10.77.0.2;",
        "local-address 10.77.0.2;",
        "local-as 64512;",
        "peer-as 64512;",
        "hold-time 9;",
        "manual-eor true;",
        "adj-rib-in false;",
        "graceful-restart 120;",
        "route-refresh;",
        "ipv4 unicast;",
        "ipv6 unicast;",
        "processes [ fabric ];",
        "neighbor-changes;",
        'description "Mesh_10_77_0_1 gen 0";',
    ):
        assert needle in text, needle
    assert "passive" not in text and "connect" not in text and "md5" not in text
    assert text == render_config([session("10.77.0.1", "10.77.0.2", hold_time=9)], RELAY, RID)


def test_passive_port_and_families() -> None:
    text = render_config(
        [
            session("10.77.0.1", "10.77.0.2", passive=True, peer_port=1790),
            session("10.77.1.1", "10.77.1.2", peer_port=1179, families=("ipv4 unicast",)),
        ],
        RELAY,
        RID,
        generation=4,
    )
    first, second = text.split("neighbor 10.77.1.1")
    assert "passive true;" in first and "listen 1790;" in first and "connect" not in first
    assert "connect 1179;" in second and "passive" not in second
    assert "ipv6 unicast" not in second and "gen 4" in second


def test_md5_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b'se"cr\\et;{x}\n')
    text = render_config([session("10.77.0.1", "10.77.0.2", password_file=str(pw))], RELAY, RID)
    key = base64.b64encode(b'se"cr\\et;{x}').decode()
    assert f"md5-password {key};" in text and "md5-base64 true;" in text
    assert "secr" not in text
    assert read_password(str(pw)) == b'se"cr\\et;{x}'


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"x" * 81, "81 bytes"), (b"\n", "empty"), (None, "No such file")],
)
def test_bad_password_file(tmp_path: Path, content: bytes | None, problem: str) -> None:
    pw = tmp_path / "pw"
    if content is not None:
        pw.write_bytes(content)
    with pytest.raises(ConfigRenderError) as e:
        render_config([session("10.77.0.1", "10.77.0.2", password_file=str(pw))], RELAY, RID)
    assert str(pw) in str(e.value) and problem in str(e.value)
    if content and content.strip():
        assert content.decode() not in str(e.value)


def test_refused_plans() -> None:
    with pytest.raises(ConfigRenderError, match="twice"):
        render_config(
            [session("10.77.0.1", "10.77.0.2"), session("10.77.0.1", "10.77.0.3")], RELAY, RID
        )
    with pytest.raises(ConfigRenderError, match="IP versions"):
        render_config([session("fd77::1", "10.77.0.2")], RELAY, RID)
    with pytest.raises(ConfigRenderError, match="family"):
        render_config([session("10.77.0.1", "10.77.0.2", families=("ipv4 flow",))], RELAY, RID)
    with pytest.raises(ConfigRenderError, match="absolute"):
        render_config([], ["python3", "relay.py"], RID)
    with pytest.raises(ConfigRenderError, match="syntax"):
        render_config([], ["/usr/bin/python3", 'a"b'], RID)


def test_env() -> None:
    env = exabgp_env("/var/log/x.log")
    assert env["exabgp.daemon.user"] == "root"
    assert env["exabgp.daemon.drop"] == "false"
    assert env["exabgp.api.cli"] == "false"
    assert env["exabgp.log.processes"] == "false"
    assert env["exabgp.log.statistics"] == "false"  # a log line per keepalive otherwise
    assert env["exabgp.log.destination"] == "/var/log/x.log"
    assert env["exabgp.api.ack"] == "true" and env["exabgp.api.respawn"] == "true"
    assert env["exabgp.daemon.pid"] == ""


# ---------------------------------------------------------------------------- exabgp validate


def test_validate_finds_errors(tmp_path: Path) -> None:
    """The check below would be worthless if validate accepted anything."""
    text = render_config([session("10.77.0.1", "10.77.0.2")], RELAY, RID)
    r = validate(tmp_path, text.replace("hold-time 90;", "hold-time x;"))
    assert r.returncode != 0


@pytest.mark.parametrize(
    "sessions",
    [
        pytest.param([], id="no-session"),
        pytest.param(
            [session(f"10.77.0.{i}", "10.77.0.100", hold_time=9) for i in range(1, 4)], id="mesh"
        ),
        pytest.param(
            [session("10.77.0.1", "10.77.0.2", passive=True, peer_port=1790)], id="passive"
        ),
        pytest.param([session("10.77.0.1", "10.77.0.2", peer_port=1179)], id="connect-port"),
        pytest.param(
            [
                session(
                    "fd77::1",
                    "fd77::2",
                    kind=PeerType.GLOBAL,
                    name="Global fd77::1",
                    peer_as=65000,
                    families=("ipv6 unicast",),
                )
            ],
            id="ipv6",
        ),
        pytest.param("md5", id="md5"),
        pytest.param(
            [session("10.77.0.1", "10.77.0.2", ttl_security=2, source_auto=True)],
            id="gtsm-auto-source",
        ),
        pytest.param(
            [session("10.77.0.1", "10.77.0.2", ttl_security=1, passive=True)],
            id="gtsm-passive",
        ),
    ],
)
def test_exabgp_validate_accepts(tmp_path: Path, sessions: list[Session] | str) -> None:
    if sessions == "md5":
        pw = tmp_path / "pw"
        pw.write_bytes(b'a "quoted" \\ key;#{}' + b"k" * 59 + b"\n")  # 80 bytes
        sessions = [session("10.77.0.1", "10.77.0.2", password_file=str(pw))]
    assert isinstance(sessions, list)
    r = validate(tmp_path, render_config(sessions, RELAY, RID, generation=7))
    assert r.returncode == 0, r.stdout + r.stderr
    for s in sessions:
        assert f"neighbor  {s.peer_ip}" in r.stdout + r.stderr


def test_gtsm_and_source_address_rendering() -> None:
    text = render_config([session("10.77.0.1", "10.77.0.2", ttl_security=1)], RELAY, RID)
    assert "outgoing-ttl 255;" in text and "incoming-ttl 255;" in text
    assert "local-address 10.77.0.2;" in text
    text = render_config(
        [session("10.77.0.1", "10.77.0.2", ttl_security=3, source_auto=True)], RELAY, RID
    )
    assert "incoming-ttl 253;" in text and "local-address auto;" in text
    plain = render_config([session("10.77.0.1", "10.77.0.2")], RELAY, RID)
    assert "ttl" not in plain
    # a listening neighbor needs its address: sourceAddress None does not apply
    text = render_config(
        [session("10.77.0.1", "10.77.0.2", source_auto=True, passive=True)], RELAY, RID
    )
    assert "local-address 10.77.0.2;" in text


def test_password_from_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tor-key").write_bytes(b"s3cret\n")
    s = session("10.77.0.1", "10.77.0.2", password_credential="tor-key")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigRenderError, match=r"credential tor-key: \$CREDENTIALS_DIRECTORY"):
        render_config([s], RELAY, RID)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    text = render_config([s], RELAY, RID)
    assert f"md5-password {base64.b64encode(b's3cret').decode()};" in text
    (tmp_path / "tor-key").write_bytes(b"")
    with pytest.raises(ConfigRenderError) as e:
        render_config([s], RELAY, RID)
    assert str(tmp_path / "tor-key") in str(e.value) and "empty" in str(e.value)
