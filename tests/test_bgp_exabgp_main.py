"""bgp/exabgp_main.py: ExaBGP's entry point with free debug logging (the speaker tests run
the real ExaBGP through it)."""

from __future__ import annotations

import os
import subprocess
import sys

from bgp.speaker import EXABGP_SCRIPT

PROBE = """
import sys
sys.path.insert(0, {where!r})
import exabgp_main
from exabgp.logger import log
before = log.debug
changed = exabgp_main.quiet_debug({level!r})
print(changed, log.debug == before)
"""


def probe(level: str | None) -> str:
    code = PROBE.format(where=str(EXABGP_SCRIPT.parent), level=level)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_debug_calls_become_free_above_debug() -> None:
    assert probe("INFO") == "True False"
    assert probe(None) == "True False"  # ExaBGP's default level is INFO


def test_debug_level_keeps_exabgp_logging() -> None:
    assert probe("debug") == "False True"


def test_runs_exabgp() -> None:
    out = subprocess.run(
        [sys.executable, "-I", str(EXABGP_SCRIPT), "version"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("ExaBGP : 5.")


PATCHES = """
import sys
sys.path.insert(0, {where!r})
import exabgp_main
from exabgp.bgp.message.direction import Direction
from exabgp.bgp.message.update import Update
from exabgp.reactor.api.response import json as encoder
from exabgp.reactor.loop import Reactor
from exabgp.util import hexstring
body = bytes.fromhex("0000001540010100400206020100000000400304" + "0a000001" + "200a640001")
original = Update.unpack_message.__func__
print(exabgp_main.raw_updates({raw!r}), Update.unpack_message.__func__ is original)
if Update.unpack_message.__func__ is not original:
    got = Update.unpack_message(body, Direction.IN, None)
    print(len(got.nlris), len(got.attributes))
wait = Reactor._wait_for_io
print(exabgp_main.fast_hex(), encoder.hexstring(body) == hexstring(body))
print(exabgp_main.idle_reactor(), Reactor._wait_for_io is not wait)
"""


def patched(raw: str | None) -> list[str]:
    code = PATCHES.format(where=str(EXABGP_SCRIPT.parent), raw=raw)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return r.stdout.strip().splitlines() + r.stderr.strip().splitlines()[-1:]


def test_received_updates_are_passed_on_unparsed() -> None:
    """With $FABRIC_EXABGP_RAW_UPDATES=1 a received UPDATE becomes an empty Update (nothing
    per NLRI: fabricd decodes the bytes); the packet hex text is ExaBGP's own, made by
    bytes.hex; the reactor's poll is wrapped."""
    assert patched("1") == ["True False", "0 0", "True True", "True True"]


def test_received_updates_are_parsed_without_the_switch() -> None:
    assert patched(None) == ["False True", "True True", "True True"]
    assert patched("0") == ["False True", "True True", "True True"]


def test_an_orphan_exits_before_exabgp_starts() -> None:
    """Started for a supervisor that is gone (it died before setpriv set the death
    signal): exit 0 at once, without running ExaBGP; a live supervisor's child runs on."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process (until reused)
    env = {**os.environ, "FABRIC_SUPERVISOR_PID": str(gone.pid)}
    r = subprocess.run([sys.executable, "-I", str(EXABGP_SCRIPT), "version"],
                       capture_output=True, text=True, timeout=60, env=env, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout == ""
    env = {**os.environ, "FABRIC_SUPERVISOR_PID": str(os.getpid())}
    r = subprocess.run([sys.executable, "-I", str(EXABGP_SCRIPT), "version"],
                       capture_output=True, text=True, timeout=60, env=env, check=True)  # fmt: skip
    assert r.stdout.startswith("ExaBGP : 5.")
