"""Runs ExaBGP (``python exabgp_main.py server <conf>``, as ``python -m exabgp`` would),
with its debug logging made free while the log level is above DEBUG.

ExaBGP logs every received NLRI at debug level: ``log.debug(lazyformat(...))`` runs its
logger's checks (~1 us) for each prefix even when debug is off, about 10% of ExaBGP's CPU
when 100,000 routes arrive or go. With ``exabgp.log.level`` above DEBUG (fabricd's default,
``bgp.render.exabgp_env``) those calls could never print anything, so they are replaced by
a no-op. At DEBUG nothing is changed. Run by path, so it needs nothing but ExaBGP importable.
"""

from __future__ import annotations

import os
import sys


def quiet_debug(level: str | None) -> bool:
    """Make ExaBGP's ``log.debug`` a no-op unless ``level`` is DEBUG; whether it did."""
    if (level or "INFO").strip().upper() == "DEBUG":
        return False
    from exabgp.logger import log

    def debug(cls: type, message: object, source: str = "", level: str = "DEBUG") -> None:
        return None

    log.debug = classmethod(debug)
    return True


def main() -> int:
    env = os.environ  # ExaBGP reads both spellings
    quiet_debug(env.get("exabgp.log.level") or env.get("exabgp_log_level"))
    from exabgp.application.main import main as exabgp_main

    sys.argv[0] = "exabgp"
    try:
        return int(exabgp_main() or 0)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
