"""``fabricd``: the node agent's entry point.

``fabricd --config FILE`` runs the agent; ``fabricd --check-config FILE`` validates a config
file and exits (0 valid, 1 not, with the field and line). The first SIGTERM or SIGINT
stops the agent in order (kernel routes stay, see fabric.agent.agent); a second one exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from bgp.errors import BGPError
from fabric.agent.config import AgentConfig, ConfigError, check_config_main, load_config
from ipam.errors import IPAMError

DEFAULT_CONFIG = "/etc/fabric/fabricd.yaml"
SWITCH_INTERVAL = 0.0005  # s; see main()


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _main(cfg: AgentConfig) -> int:
    from fabric.agent.agent import Agent  # imported late: --check-config stays fast

    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logging.getLogger("fabricd").warning("second signal: exiting at once")
            os._exit(130)
        logging.getLogger("fabricd").info("signal %s: stopping", signal.Signals(signum).name)
        agent.stop()

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, on_signal, s)
    await agent.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fabricd", description="fabric node agent")
    ap.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    ap.add_argument("--check-config", metavar="FILE", help="validate FILE and exit")
    args = ap.parse_args(argv)
    if args.check_config:
        return check_config_main(Path(args.check_config))
    try:
        cfg = load_config(Path(args.config))
    except ConfigError as e:
        print(f"fabricd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fabricd: failed to read config {args.config}: {e.strerror}", file=sys.stderr)
        return 1
    setup_logging(cfg.log.level, cfg.log.format)
    # The route writer thread spends most of its time in netlink syscalls (GIL released)
    # and needs the GIL back briefly after each: with the default 5 ms switch interval it
    # waited up to 5 ms per syscall while the loop digested a burst of updates.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        return asyncio.run(_main(cfg))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, IPAMError, BGPError, OSError) as e:
        # Start-up failures (etcd unreachable, ExaBGP not starting) and a background task
        # that died: one line, non-zero, and systemd restarts us.
        logging.getLogger("fabricd").error("fabricd exits: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
