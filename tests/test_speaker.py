"""bgp.speaker against a real ExaBGP and real BIRD routers, in network namespaces (the
topology is in speaker_lab.py). The Speaker runs in the test process; ExaBGP runs in the
node namespace through ``ip netns exec`` (which execs, so the Speaker's pid is ExaBGP's).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from speaker_lab import (
    ADVERTS,
    RID,
    ROUTER_ROUTES,
    Recorder,
    Topo,
    build_topo,
    established,
    hold_time,
    ip,
    net,
    prefixes,
    proc_state,
    read_bytes,
    route_count,
    sh,
    speaker,
    until,
)

from bgp.model import Advert, EndOfRib, Event, PeerUpdate, SpeakerRestarted
from bgp.speaker import Speaker


@pytest.fixture
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topo]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with build_topo(Path(tmp_path_factory.mktemp("tsp"))) as t:
        yield t


# ---------------------------------------------------------------------------- root tests


@pytest.mark.root
def test_announce_receive_withdraw(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        await sp.start([topo.session(topo.r1)], RID)
        assert sp.pid is not None
        cmdline = read_bytes(f"/proc/{sp.pid}/cmdline").split(b"\0")
        assert b"exabgp" in cmdline and b"ip" not in cmdline[:1]  # ip netns exec execs
        try:
            sp.set_announcements(ADVERTS)
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            want = {str(a.prefix) for a in ADVERTS}
            await until(lambda: topo.r1.routes() >= want, what="routes at BIRD")
            assert sp.announced() == set(ADVERTS)
            detail = topo.r1.birdc("show", "route", "10.99.2.0/26", "all")
            assert "(65000,7)" in detail
            assert "fd77:1::2" in topo.r1.birdc("show", "route", "fd99:1::/64", "all")
            # BIRD's routes arrive as events, then its End-of-RIB
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="PeerUpdates")
            await until(
                lambda: EndOfRib(ip(topo.r1.addr), "ipv4 unicast") in rec.events, what="EOR"
            )
            # and our End-of-RIB reached BIRD: it is not waiting for us any more
            await until(lambda: "graceful restart active" not in topo.r1.protocol())
            # a borrowed address: covered once its /32 is acknowledged (at once when a
            # covering block is), never while nothing covers it
            assert await sp.wait_covered(ip("10.99.2.5"), 0.01)
            assert not await sp.wait_covered(ip("10.99.3.7"), 0.05)
            waiting = asyncio.ensure_future(sp.wait_covered(ip("10.99.3.7"), 5))
            sp.set_announcements([*ADVERTS, Advert(net("10.99.3.7/32"))])
            assert await waiting
            await until(lambda: "10.99.3.7/32" in topo.r1.routes(), what="the /32 at BIRD")
            sp.set_announcements(ADVERTS[1:])
            await until(lambda: "10.99.1.0/26" not in topo.r1.routes(), what="withdraw")
            assert await sp.wait_idle(5)
            assert sp.announced() == set(ADVERTS[1:])
            assert topo.r1.routes() == {str(a.prefix) for a in ADVERTS[1:]}
            assert await sp.ping()
            status = sp.sessions_status()[ip(topo.r1.addr)]
            assert status.info == "Established" and status.since <= time.time()
            assert sp.errors == 0 and sp.decode_errors == 0
            # every session up: the kernel probe's timer is not re-armed (no idle wake-up)
            await until(lambda: sp._probe_timer is None, within=3, what="probe timer dropped")
        finally:
            await sp.stop()
        assert sp.pid is None

    asyncio.run(run())


@pytest.mark.root
def test_sigkill_restart_is_hitless(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        await sp.start([topo.session(topo.r1)], RID)
        try:
            sp.set_announcements(ADVERTS)
            want = {str(a.prefix) for a in ADVERTS}
            await until(lambda: topo.r1.routes() >= want, what="routes at BIRD")
            await until(lambda: "graceful restart active" not in topo.r1.protocol())
            old = sp.pid
            assert old is not None
            t_kill = time.monotonic()
            os.kill(old, signal.SIGKILL)
            await until(lambda: sp.restarts == 1, what="restart noticed")
            assert SpeakerRestarted(1) in rec.events
            # BIRD keeps our routes (stale) all along, then gets them again and the EOR
            gaps = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                gaps += not topo.r1.routes() >= want
                protocol = topo.r1.protocol()
                if established(sp, topo.r1.addr) and "graceful restart active" not in protocol:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"no hitless recovery:\n{protocol}")
            assert gaps == 0
            print(f"\nSIGKILL to End-of-RIB at BIRD: {time.monotonic() - t_kill:.2f} s")
            assert sp.pid not in (None, old)
            assert topo.r1.routes() == want
            assert await sp.wait_idle(5) and sp.announced() == set(ADVERTS)
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="routes relearned")
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
def test_reconfigure_keeps_unchanged_session(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1], RID)
        try:
            sp.set_announcements(ADVERTS[:2])
            want = {str(a.prefix) for a in ADVERTS[:2]}
            await until(lambda: topo.r1.routes() >= want, what="routes at r1")
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            since = topo.r1.established_since()
            status = sp.sessions_status()[s1.peer_ip]
            assert since, topo.r1.protocol()
            # a new neighbor: ExaBGP gives it an empty RIB; the speaker fills it when it is up
            assert await sp.reconfigure([s1, s2])
            await until(lambda: topo.r2.routes() >= want, what="routes at r2")
            await until(lambda: "graceful restart active" not in topo.r2.protocol())
            assert topo.r1.established_since() == since
            assert sp.sessions_status()[s1.peer_ip] == status
            # routes changed later reach both
            sp.set_announcements(ADVERTS[1:2])
            await until(lambda: topo.r2.routes() == {"10.99.2.0/26"}, what="withdraw at r2")
            await until(lambda: topo.r1.routes() == {"10.99.2.0/26"}, what="withdraw at r1")
            # changing r2's session (hold time) re-establishes it, r1 stays
            assert await sp.reconfigure([s1, topo.session(topo.r2, hold_time=6)])
            await until(lambda: hold_time(topo.r2) == "6", what="new hold time")
            await until(lambda: topo.r2.routes() == {"10.99.2.0/26"}, what="routes at r2 again")
            # removing r2 closes only that session
            assert await sp.reconfigure([s1])
            await until(lambda: topo.r2.established_since() == "", what="r2 down")
            assert topo.r1.established_since() == since
            assert set(sp.sessions_status()) == {s1.peer_ip}
            assert sp.errors == 0
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
def test_ping_follows_sigstop_and_relay_respawn(topo: Topo) -> None:
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        await sp.start([topo.session(topo.r1)], RID)
        pid = sp.pid
        assert pid is not None
        try:
            sp.set_announcements(ADVERTS[:1])
            await until(lambda: topo.r1.routes() == {"10.99.1.0/26"}, what="route at r1")
            await until(lambda: rec.learned() >= set(ROUTER_ROUTES), what="routes from r1")
            assert await sp.ping()
            os.kill(pid, signal.SIGSTOP)
            try:
                t = time.monotonic()
                assert not await sp.ping(0.5)
                assert time.monotonic() - t < 1.0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await sp.ping(2.0)
            # the relay dies: ExaBGP respawns it, the speaker resynchronises and asks the
            # peer to resend its routes (a new relay gets no replay)
            relay = int(read_bytes(f"/proc/{pid}/task/{pid}/children").split()[0])
            n_events = len(rec.events)
            os.kill(relay, signal.SIGKILL)
            await until(
                lambda: any(isinstance(e, PeerUpdate) for e in rec.events[n_events:]),
                what="routes resent after route-refresh",
            )
            assert await sp.ping()
            assert sp.pid == pid and sp.restarts == 0
            assert established(sp, topo.r1.addr)
            assert topo.r1.routes() == {"10.99.1.0/26"}
            sp.set_announcements(ADVERTS[:2])
            await until(lambda: len(topo.r1.routes()) == 2, what="announce after respawn")
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
def test_withdraw_all_and_stop(topo: Topo) -> None:
    async def run() -> None:
        sp = speaker(topo, Recorder())
        await sp.start([topo.session(topo.r1)], RID)
        sp.set_announcements(ADVERTS)
        await until(lambda: len(topo.r1.routes()) == 3, what="routes at r1")
        await sp.withdraw_all_and_stop()
        assert topo.r1.routes() == set()
        assert sp.pid is None

    asyncio.run(run())


@pytest.mark.root
def test_exabgp_dies_with_its_parent(topo: Topo) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the process that runs the Speaker, ExaBGP follows."""
    script = f"""
import asyncio, ipaddress, sys
from pathlib import Path
from bgp.speaker import Speaker
async def main():
    sp = Speaker(Path({str(topo.dir / "child")!r}), lambda e: None, {topo.exabgp_argv()!r})
    await sp.start([], ipaddress.IPv4Address("10.77.1.2"))
    print(sp.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert Path(f"/proc/{pid}").exists()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and b"Z" not in proc_state(pid):
            assert time.monotonic() < deadline, "ExaBGP outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.root
def test_relay_of_a_killed_speakers_exabgp_is_refused(topo: Topo) -> None:
    """fabricd SIGKILLed: its ExaBGP gets SIGTERM but takes a while to stop (seconds under
    load; here it is stopped outright), and its relay reconnects to relay.sock, by then the
    next speaker's. That speaker must go on talking to its own ExaBGP only."""
    script = f"""
import asyncio, pickle, sys
from pathlib import Path
from bgp.speaker import Speaker
sys.path.insert(0, {str(Path(__file__).parent)!r})
from speaker_lab import ADVERTS, RID
async def main():
    sp = Speaker(Path({str(topo.dir / "node")!r}), lambda e: None, {topo.exabgp_argv()!r})
    session = pickle.loads(bytes.fromhex({pickle.dumps(topo.session(topo.r1)).hex()!r}))
    await sp.start([session], RID, adverts=ADVERTS[:1])
    print(sp.pid, flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[1])  # fmt: skip
    rec = Recorder()
    old = 0
    try:
        assert parent.stdout is not None
        old = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while topo.r1.routes() != {"10.99.1.0/26"}:
            assert time.monotonic() < deadline, "the first speaker's route never reached r1"
            time.sleep(0.1)
        os.kill(old, signal.SIGSTOP)  # its SIGTERM (parent death) stays pending
        parent.kill()
        parent.wait()

        async def run() -> None:
            sp = speaker(topo, rec)
            await sp.start([topo.session(topo.r1)], RID, adverts=ADVERTS[:1])
            try:
                failed = 0
                for _ in range(30):  # 3 s: the old relay retries within 1 s
                    failed += not await sp.ping(1.0)
                    await asyncio.sleep(0.1)
                assert failed == 0, f"{failed} of 30 pings failed: a stale relay was served"
                assert sp.stale_relays > 0, "the old relay never came (nothing was tested)"
                os.kill(old, signal.SIGCONT)  # it stops now, its relay gets EOF and exits
                await until(lambda: b"Z" in proc_state(old), 20, "the old ExaBGP gone")
                await until(lambda: established(sp, topo.r1.addr), 30, "session up")
                await asyncio.sleep(1.0)
                assert established(sp, topo.r1.addr), sp.sessions_status()
                assert await sp.ping(2.0)
                assert await sp.wait_idle(10) and sp.announced() == set(ADVERTS[:1])
                await until(lambda: topo.r1.routes() == {"10.99.1.0/26"}, 20, "route at r1")
            finally:
                await sp.stop()

        asyncio.run(run())
    finally:
        if old and Path(f"/proc/{old}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(old, signal.SIGCONT)
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


@pytest.mark.root
def test_passive_and_md5_sessions(topo: Topo) -> None:
    """On the wire: ExaBGP listens for r1 (passive), and signs r2's session (TCP MD5; the
    renderer passes the key base64-encoded, so any byte is fine)."""
    key = "s3cr3t key;#{} with spaces"
    conf = topo.dir / topo.r2.ns / "bird.conf"
    text = conf.read_text().replace("  hold time 9;", f'  password "{key}";\n  hold time 9;')
    conf.write_text(text)
    assert "Reconfigur" in topo.r2.birdc("configure")
    pw = topo.dir / "r2.key"
    pw.write_text(key + "\n")
    rec = Recorder()

    async def run() -> None:
        sp = speaker(topo, rec)
        s1 = topo.session(topo.r1, passive=True)
        s2 = topo.session(topo.r2, password_file=str(pw))
        await sp.start([s1, s2], RID)
        try:
            assert key not in (topo.dir / "node" / "exabgp.conf").read_text()
            await until(lambda: established(sp, topo.r1.addr), what="passive session up")
            await until(lambda: established(sp, topo.r2.addr), what="md5 session up")
            out = sh("ip", "netns", "exec", topo.node, "ss", "-tn", "state", "established")
            assert f"{s1.local_address}:179" in out  # r1 connected to us
            sp.set_announcements(ADVERTS[:1])
            await until(lambda: topo.r2.routes() == {"10.99.1.0/26"}, what="route over md5")
            # key rotation: same plan, new file content; reconfigure must pick it up
            conf.write_text(text.replace(key, "rotated"))
            assert "Reconfigur" in topo.r2.birdc("configure")
            await until(lambda: not established(sp, topo.r2.addr), what="old key refused")
            await asyncio.sleep(2)
            assert not established(sp, topo.r2.addr)
            pw.write_text("rotated\n")
            assert await sp.reconfigure([s1, s2])
            await until(lambda: established(sp, topo.r2.addr), what="session with the new key")
            await until(lambda: topo.r2.routes() == {"10.99.1.0/26"}, what="route, new key")
        finally:
            await sp.stop()
        assert key not in (topo.dir / "node" / "exabgp.log").read_text()

    asyncio.run(run())


@pytest.mark.root
def test_status_says_why_a_session_is_down(topo: Topo) -> None:
    """A key BIRD does not have: its kernel drops our SYNs and ExaBGP says nothing; the
    status says "no answer to our TCP SYN" with the password/TTL hint. A closed port: refused.
    The key never appears in a status, a log or ExaBGP's output."""
    key = "k3y-not-at-bird"
    pw = topo.dir / "wrong.key"
    pw.write_text(key + "\n")

    async def run() -> None:
        sp = speaker(topo, Recorder())
        md5 = topo.session(topo.r1, password_file=str(pw))
        closed = topo.session(topo.r2, peer_port=1179)
        await sp.start([md5, closed], RID, adverts=ADVERTS)
        try:

            def why(peer: str) -> str:
                st = sp.sessions_status()[ip(peer)]
                return f"{st.last_failure} | {st.hint}"

            await until(lambda: "no answer to our TCP SYN" in why(topo.r1.addr), within=15)
            st = sp.sessions_status()[ip(topo.r1.addr)]
            assert st.attempts >= 1 and st.connecting_since is not None
            assert "check the password and TTL security on the peer" in st.hint
            assert st.info == "Connect: no answer"
            await until(lambda: sp.sessions_status()[ip(topo.r2.addr)].failures >= 2, within=15)
            st2 = sp.sessions_status()[ip(topo.r2.addr)]
            assert st2.last_failure.startswith("connection refused"), st2
            assert st2.attempts >= 2 and st2.connecting_since is not None
            assert key not in repr(sp.sessions_status())
        finally:
            await sp.stop()
        for f in ("exabgp.log", "exabgp.out"):
            assert key not in (topo.dir / "node" / f).read_text()

    asyncio.run(run())


# ---------------------------------------------------------------------------- throughput


@pytest.mark.root
@pytest.mark.slow
def test_throughput(topo: Topo) -> None:
    """Receive: BIRD sends 100k routes, the node must keep up with ExaBGP (~20k/s).
    Announce: 10k prefixes in 100-prefix lines with 4 outstanding (~3k/s on 5.0.15)."""
    n_recv, n_send = 100_000, 10_000
    rec = Recorder()
    got = [0]

    def count(ev: Event) -> None:
        if isinstance(ev, PeerUpdate):
            got[0] += len(ev.announced)

    def on_event(ev: Event) -> None:
        rec(ev)
        count(ev)

    d = topo.dir / topo.r2.ns
    statics = "\n".join(f"  route {p} blackhole;" for p in prefixes(n_recv, "10.96.0.0"))
    (d / "extra.conf").write_text(f"protocol static bulk {{\n  disabled;\n  ipv4;\n{statics}\n}}\n")
    assert "Reconfigur" in topo.r2.birdc("configure")

    async def run() -> None:
        sp = Speaker(topo.dir / "node", on_event, exabgp_argv=topo.exabgp_argv())
        await sp.start([topo.session(topo.r2)], RID)
        try:
            await until(lambda: established(sp, topo.r2.addr), what="session up")
            t0 = time.monotonic()
            topo.r2.birdc("enable", "bulk")
            await until(lambda: got[0] >= n_recv, within=120, what="100k received")
            recv = time.monotonic() - t0
            adverts = [Advert(p) for p in prefixes(n_send)]
            t0 = time.monotonic()
            sp.set_announcements(adverts)
            assert await sp.wait_idle(120)
            acked = time.monotonic() - t0
            assert sp.announced() == set(adverts)
            await until(lambda: route_count(topo.r2) == n_send, within=60, what="10k at BIRD")
            at_bird = time.monotonic() - t0
            t0 = time.monotonic()
            sp.set_announcements(())
            assert await sp.wait_idle(120)
            withdrawn = time.monotonic() - t0
            await until(lambda: route_count(topo.r2) == 0, within=60, what="10k withdrawn")
            print(
                f"\nreceive {n_recv} prefixes: {recv:.2f} s ({n_recv / recv:.0f}/s); "
                f"announce {n_send}: acked {acked:.2f} s, at BIRD {at_bird:.2f} s "
                f"({n_send / at_bird:.0f}/s); withdraw {n_send}: acked {withdrawn:.2f} s; "
                f"commands {sp.commands_sent}, errors {sp.errors}"
            )
            assert sp.errors == 0 and sp.relay_drops == 0
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
@pytest.mark.slow
def test_reconfigure_during_bulk_announce(topo: Topo) -> None:
    """ExaBGP 5.0.15 skips a reload while routes wait to go out; the speaker notices
    (generation check) and retries, and the new neighbor still gets every route."""
    rec = Recorder()
    n = 5_000

    async def run() -> None:
        sp = Speaker(topo.dir / "node", rec, exabgp_argv=topo.exabgp_argv())
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1], RID)
        try:
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            adverts = [Advert(p) for p in prefixes(n)]
            sp.set_announcements(adverts)
            await until(lambda: route_count(topo.r1) > 200, what="burst under way")
            assert await sp.reconfigure([s1, s2], timeout=60)
            await until(lambda: route_count(topo.r2) == n, within=60, what="all routes at r2")
            await until(lambda: route_count(topo.r1) == n, within=60, what="all routes at r1")
            await until(lambda: "graceful restart active" not in topo.r2.protocol())
            assert sp.announced() == set(adverts) and sp.errors == 0
        finally:
            await sp.stop()

    asyncio.run(run())


@pytest.mark.root
@pytest.mark.slow
def test_reload_skipped_while_a_peer_is_down_is_retried(topo: Topo) -> None:
    """ExaBGP 5.0.15 skips a reload while a neighbor that is down (connect retries back off
    up to 60 s) still holds routes we sent after its last attempt. The speaker checks each
    reload and retries; announcements keep flowing meanwhile."""
    rec = Recorder()
    topo.r2.birdc("disable", "n1")

    async def run() -> None:
        sp = Speaker(topo.dir / "node", rec, exabgp_argv=topo.exabgp_argv())
        s1, s2 = topo.session(topo.r1), topo.session(topo.r2)
        await sp.start([s1, s2], RID)
        try:
            await until(lambda: established(sp, topo.r1.addr), what="session up")
            await asyncio.sleep(3)  # let ExaBGP's connect backoff towards r2 grow
            sp.set_announcements(ADVERTS[:1])
            assert await sp.wait_idle(10)
            s3 = topo.session(topo.r2, peer_ip=ip("10.77.2.9"), name="Node_10_77_2_9")
            t0 = time.monotonic()
            task = asyncio.create_task(sp.reconfigure([s1, s2, s3], timeout=90))
            await asyncio.sleep(0.5)
            sp.set_announcements(ADVERTS[:2])
            await until(lambda: sp.announced() == set(ADVERTS[:2]), what="routes while waiting")
            await until(lambda: len(topo.r1.routes()) == 2, what="routes at r1")
            assert await task
            print(f"\nreload took {time.monotonic() - t0:.1f} s, {sp._reload.tries} tries")
            assert set(sp.sessions_status()) == {s1.peer_ip, s2.peer_ip, s3.peer_ip}
        finally:
            await sp.stop()

    asyncio.run(run())
