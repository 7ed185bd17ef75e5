"""bgp/exabgp_main.py: ExaBGP's entry point with free debug logging (the speaker tests run
the real ExaBGP through it)."""

from __future__ import annotations

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
