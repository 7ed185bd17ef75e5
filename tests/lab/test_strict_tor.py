"""The fabric behind strict top-of-rack routers (hand-written configs, tests/lab/strict_tor.py):
MD5 from a file and from a systemd credential, GTSM against BIRD `ttl security on` and FRR
`ttl-security hops 1`, sourceAddress; End-of-RIB after the routes across restarts of
fabricd (SIGTERM, SIGKILL) and ExaBGP (SIGKILL), read from BIRD's trace, with a continuous
ping through the ToR and its kernel route watched; `bgp status` saying why a session is
down (wrong key, GTSM on one side only, a peer more hops away than ttlSecurity allows).

Restart rounds per kind: 3 here; FABRIC_RESTART_ROUNDS=20 (with -m slow) for the long run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import strict_tor as st
import yaml
from fabric_helpers import allocate, status

from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3", "node4")


@dataclass
class Strict:
    lab: Lab
    keys: Path
    block3: str
    ip3: str
    results: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def strict(make_lab: Callable[[str], Lab]) -> Iterator[Strict]:
    lab = make_lab("two-rack")
    keys = lab.dir / "keys"
    keys.mkdir(mode=0o700)
    for name in ("rack1", "node4"):
        (keys / name).write_text(st.KEYS[name] + "\n")
        os.chmod(keys / name, 0o600)
    creds = lab.dir / "credentials"  # what systemd's LoadCredential= would provide
    creds.mkdir(mode=0o700)
    (creds / "node3-tor2").write_text(st.KEYS["node3"] + "\n")
    old = os.environ.get("CREDENTIALS_DIRECTORY")
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)  # inherited by fabricd (ip netns exec)
    try:
        (lab._node_dir("tor2") / "bird.conf").write_text(
            st.TOR2_BIRD.format(dir=lab._node_dir("tor2"), pool=st.POOL, **st.KEYS)
        )
        (lab._node_dir("tor1") / "bgpd.conf").write_text(
            st.TOR1_BGPD.format(dir=lab._node_dir("tor1"), pool=st.POOL, **st.KEYS)
        )
        for router in ("tor2", "tor1"):
            lab.restart_router(router)  # tries again if it exits at once
        st.apply(lab, st.resources(keys), lab.dir / "strict.yaml")
        for h in HOSTS:
            lab.start_fabricd(h)
        for h in HOSTS:
            lab.wait_for(lambda h=h: lab.health(h, "/readyz")[0] == 200, 90, what=f"{h} ready")
        ((ip3, block3),) = allocate(lab, "node3", "strict.node3")
        # something answering in node3's block: the address on node3's loopback
        lab.exec("node3", ["ip", "addr", "add", f"{ip3}/32", "dev", "lo"], check=True)
        lab.wait_for(lambda: block3 in st.birdc(lab, "tor2", "show", "route"), 30,
                     what="node3's block at tor2")  # fmt: skip
        yield Strict(lab, keys, block3, ip3)
    finally:
        if old is None:
            os.environ.pop("CREDENTIALS_DIRECTORY", None)
        else:
            os.environ["CREDENTIALS_DIRECTORY"] = old


def run_dir(lab: Lab, node: str) -> Path:
    return Path(yaml.safe_load(lab.fabricd_config_path(node).read_text())["runDir"])


def test_sessions_up_with_md5_gtsm_and_source_address(strict: Strict) -> None:
    lab = strict.lab
    assert st.bird_established(lab, "node3") and st.bird_established(lab, "node4")
    assert st.frr_established(lab) >= {"10.255.16.10", "10.255.16.14"}
    # GTSM and MD5 as rendered for ExaBGP; the key itself is only there base64-encoded
    conf3 = (run_dir(lab, "node3") / "bgp" / "exabgp.conf").read_text()
    assert "outgoing-ttl 255;" in conf3 and "incoming-ttl 255;" in conf3
    assert "local-address 10.255.16.18;" in conf3 and st.KEYS["node3"] not in conf3
    conf4 = (run_dir(lab, "node4") / "bgp" / "exabgp.conf").read_text()
    assert "local-address auto;" in conf4
    # sourceAddress None: the kernel picked the address BIRD expects
    ss = lab.exec("node4", ["ss", "-tnH", "state", "established", "dport", "= :179"]).stdout
    assert "10.255.16.22:" in ss and "10.255.16.21:179" in ss
    # the strict import filter at work: node3's block is there, as a /26 from the pool
    assert strict.block3 in st.birdc(lab, "tor2", "show", "route", "protocol", "node3")
    # the ToRs see the sessions Established; fabricd's status document says so once
    # ExaBGP has reported the session up and the next status publish has run
    for h in HOSTS:
        lab.wait_for(lambda h=h: all(x["state"] == "up" for x in status(lab, h)["sessions"]),
                     30, what=f"{h}'s sessions up in its status")  # fmt: skip
        s = status(lab, h)
        for x in s["sessions"]:
            assert x["attempts"] == 0 and x["lastFailure"] == "" and x["connectingSince"] is None


def _exabgp_pid(lab: Lab) -> int:
    """node3's ExaBGP, from its status document once that names a live ExaBGP."""
    found: list[int] = []

    def live() -> bool:
        pid = status(lab, "node3")["speaker"]["pid"]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, TypeError):
            return False
        found[:] = [pid]
        return b"exabgp" in cmd and b"server" in cmd

    lab.wait_for(live, 30, what="node3's ExaBGP pid")
    return found[0]


def _restart(lab: Lab, kind: str) -> None:
    if kind == "exabgp-kill":
        os.kill(_exabgp_pid(lab), signal.SIGKILL)
        return
    lab.stop_fabricd("node3", signal.SIGTERM if kind == "fabricd-term" else signal.SIGKILL)
    lab.start_fabricd("node3")


def restart_run(strict: Strict, kind: str, rounds: int) -> dict[str, Any]:
    """``rounds`` restarts of ``kind`` on node3 with a 100/s ping from tor2 to an address
    in node3's block and tor2's route table watched; BIRD's trace read for the order."""
    lab = strict.lab
    ns = lab.netns("tor2")
    mark = len(st.bird_log(lab))
    mon = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    ping = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-q", "-n", "-i", "0.01", strict.ip3],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    t0 = time.monotonic()
    try:
        time.sleep(1.0)
        for _ in range(rounds):
            before = st.gr_done(st.bird_log(lab))
            _restart(lab, kind)
            st.wait_gr_done(lab, before)
            lab.wait_for(lambda: lab.health("node3", "/readyz")[0] == 200, 60, what="ready")
        time.sleep(1.0)
    finally:
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=10)
        mon.terminate()
        routes, _ = mon.communicate(timeout=10)
    sent, received = st.ping_summary(out)
    cycles = st.restart_rounds(st.bird_log(lab)[mark:], strict.block3)
    deleted = [ln for ln in routes.splitlines() if ln.startswith("Deleted") and strict.block3 in ln]
    return {
        "kind": kind, "rounds": rounds, "gr_cycles": len(cycles),
        "eor_before_block": sum(1 for c in cycles if not c["block_before_eor"]),
        "block_removed": sum(1 for c in cycles if c["removed"]),
        "kernel_route_deleted": len(deleted), "pings_sent": sent, "pings_lost": sent - received,
        "seconds": round(time.monotonic() - t0, 1),
        # the trace of a cycle that went wrong, for the failure message
        "sample": next(("\n".join(c["lines"][:40]) for c in cycles
                        if c["removed"] or not c["block_before_eor"]), ""),
    }  # fmt: skip


def check_run(r: dict[str, Any]) -> None:
    print(f"\nrestart run: { {k: v for k, v in r.items() if k != 'sample'} }")
    if r.get("sample"):
        print(r["sample"])
    assert r["gr_cycles"] >= r["rounds"], r
    assert r["eor_before_block"] == 0, r  # every End-of-RIB came after the block
    assert r["block_removed"] == 0 and r["kernel_route_deleted"] == 0, r
    # 100/s for the whole run (ping -q: a full stdout pipe would have stalled it)
    assert r["pings_lost"] == 0 and r["pings_sent"] > 50 * r["seconds"], r


ROUNDS = int(os.environ.get("FABRIC_RESTART_ROUNDS", "3"))
KINDS = ["fabricd-term", "fabricd-kill", "exabgp-kill"]


@pytest.mark.parametrize("kind", KINDS)
def test_end_of_rib_after_the_routes_across_restarts(strict: Strict, kind: str) -> None:
    check_run(restart_run(strict, kind, 3))


@pytest.mark.slow
@pytest.mark.skipif(ROUNDS <= 3, reason="set FABRIC_RESTART_ROUNDS=20 for the long run")
@pytest.mark.parametrize("kind", KINDS)
def test_end_of_rib_after_the_routes_many_restarts(strict: Strict, kind: str) -> None:
    check_run(restart_run(strict, kind, ROUNDS))


def _wait_why(lab: Lab, node: str, peer: str, words: str, within: float = 40.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def check() -> bool:
        x = st.session(status(lab, node), peer)
        found.update(x)
        return words in f"{x['lastFailure']} | {x['hint']}"

    try:
        lab.wait_for(check, within, what=f"{node} status saying {words!r}")
    except TimeoutError as e:
        raise AssertionError(f"{e}; last seen: {found}") from e
    return found


def test_wrong_key_and_one_sided_gtsm_are_explained(strict: Strict) -> None:
    lab, keys = strict.lab, strict.keys
    docs = st.resources(keys)
    try:
        # node4: a key tor2 does not have. BIRD's kernel drops our SYNs; ExaBGP says nothing
        (keys / "node4").write_text("not-the-key\n")
        docs[5]["spec"]["maxRestartTime"] = 119  # a change, so fabricd reconfigures
        st.apply(lab, docs, lab.dir / "strict.yaml")
        x = _wait_why(lab, "node4", "10.255.16.21", "no answer to our TCP SYN")
        assert "check the password and TTL security on the peer" in x["hint"]
        assert x["attempts"] >= 1 and x["connectingSince"] is not None
        assert x["info"] == "Connect: no answer"
        text = lab.fabricctl(["bgp", "status", "--node", "node4"]).stdout
        assert "Sessions not established:" in text and "no answer to our TCP SYN" in text
        assert "not-the-key" not in text and st.KEYS["node4"] not in text
        assert lab.health("node4", "/readyz")[0] == 503
        # node4, right key, GTSM off on our side only. When we connect, BIRD (ttl security
        # on) takes the connection and closes it before any OPEN, attempt after attempt;
        # when BIRD's own connection (TTL 255) reaches us first, its OPEN arrives but ours
        # (TTL 64) is dropped by its kernel, and our hold timer ends the session. Both say
        # GTSM, each in its own words.
        (keys / "node4").write_text(st.KEYS["node4"] + "\n")
        docs[5]["spec"]["ttlSecurity"] = 0
        st.apply(lab, docs, lab.dir / "strict.yaml")
        x = _wait_why(lab, "node4", "10.255.16.21", "TTL security (GTSM)")
        assert x["state"] != "up", x
        assert "before the peer's OPEN" in x["lastFailure"] or (
            x["lastFailure"] == "hold timer expired (NOTIFICATION 4/0 sent)"
            and "the peer's OPEN arrived but it never answered ours" in x["hint"]
        ), x
        assert x["failedAttempts"] >= 1
        get = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9099/metrics').read().decode())"
        metrics = lab.exec("node4", ["/usr/bin/python3", "-IS", "-c", get]).stdout
        line = next(
            ln
            for ln in metrics.splitlines()
            if ln.startswith('fabric_bgp_session_failed_attempts_total{peer="10.255.16.21"}')
        )
        assert float(line.split()[-1]) >= 1
    finally:
        (keys / "node4").write_text(st.KEYS["node4"] + "\n")
        st.apply(lab, st.resources(keys), lab.dir / "strict.yaml")
    lab.wait_for(lambda: lab.health("node4", "/readyz")[0] == 200, 240, what="node4 back")
    for log in ("fabricd.out",):
        for h in HOSTS:
            text = (lab._node_dir(h) / log).read_text(errors="replace")
            assert all(k not in text for k in st.KEYS.values())


def test_peer_more_hops_away_is_refused_by_gtsm(strict: Strict) -> None:
    """The spine is two hops from node3. It runs GTSM for 2 hops (sends TTL 255, which
    arrives with 254): with ttlSecurity 1 node3's kernel drops its answers (the status
    says so, from this host's TCPMinTTLDrop); with ttlSecurity 2 the session comes up."""
    lab = strict.lab
    cmds = ["conf t", "router bgp 65000", "neighbor 10.255.16.18 remote-as 65102",
            "neighbor 10.255.16.18 ttl-security hops 2", "neighbor 10.255.16.18 timers 3 9",
            "neighbor 10.255.16.18 timers connect 2", "neighbor 10.255.16.18 passive"]  # fmt: skip
    r = subprocess.run(["vtysh", "--vty_socket", str(lab._node_dir("spine")),
                        *[a for c in cmds for a in ("-c", c)]], capture_output=True, text=True,
                       timeout=20, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    far = st.peer("node3-spine", "node3", "10.255.16.6", 65000, required=False)
    docs = [*st.resources(strict.keys), far]
    try:
        st.apply(lab, docs, lab.dir / "strict.yaml")
        x = _wait_why(lab, "node3", "10.255.16.6", "below the minimum TTL")
        assert "no answer to our TCP SYN" in x["lastFailure"]
        far["spec"]["ttlSecurity"] = 2
        st.apply(lab, docs, lab.dir / "strict.yaml")
        lab.wait_for(
            lambda: st.session(status(lab, "node3"), "10.255.16.6")["state"] == "up",
            180,
            what="node3-spine up with ttlSecurity 2",
        )
    finally:
        lab.fabricctl(["delete", "bgppeer", "node3-spine"])
