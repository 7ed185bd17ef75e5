"""``fabricd``: the node agent's entry point.

``fabricd --config FILE`` runs the agent; ``fabricd --check-config FILE`` validates a config
file and exits (0 valid, 1 not, with the field and line). The first SIGTERM or SIGINT
stops the agent in order (kernel routes stay, see fabric.agent.agent); a second one exits at once.

The very first thing ``fabricd --config`` does, before the agent's modules are imported and
before etcd: if the kernel has no policy table, restore the snapshot of the last one written
(fabric.dataplane.policy_snapshot; docs/design/policy.md, "Snapshot"). This module imports
only the standard library at its top for that reason.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # start-up phases are logged from here (and the process start)

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402 (site imported it already)
from typing import TYPE_CHECKING, Any  # noqa: E402

from fabric.dataplane import policy_snapshot  # noqa: E402 (light standard library only)

if TYPE_CHECKING:
    from fabric.agent.config import AgentConfig

DEFAULT_CONFIG = "/etc/fabric/fabricd.yaml"
DEFAULT_STATE_DIR = "/var/lib/fabric"  # cni.stateDir's default (fabric.agent.config)
SWITCH_INTERVAL = 0.0005  # s; see main()


def process_started() -> float:
    """CLOCK_MONOTONIC time this process started (/proc/self/stat, 10 ms resolution), so
    the interpreter's own start counts in the start-up timings; ``STARTED`` if unreadable."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return STARTED
    return min(STARTED, time.monotonic() - age)


def config_arg(argv: list[str]) -> str:
    """The ``--config`` argument as argparse will read it (its default when absent)."""
    path = DEFAULT_CONFIG
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def early_settings(text: str) -> tuple[str, str | None]:
    """(cni.stateDir, nodeName or None) of a config file, read without a YAML parser (one
    costs ~20 ms to import) from block-style top-level keys; ValueError when the file
    uses anything else for them (the caller then parses it as YAML). A wrong answer can
    only make the snapshot not found or not match: nothing is restored then."""
    state_dir: str | None = None
    node: str | None = None
    section = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(":")
        if not sep:
            raise ValueError(f"not simple YAML: {raw!r}")
        value = value.strip()
        if value[:1] in ("'", '"') and len(value) >= 2 and value[-1] == value[0]:
            value = value[1:-1]
        elif value[:1] in ("{", "[", "&", "*", "|", ">", "!", "'", '"'):
            raise ValueError(f"not simple YAML: {raw!r}")
        if indent == 0:
            section = key
            if key == "nodeName":
                node = value or None
        elif section == "cni" and key == "stateDir":
            state_dir = value
    return state_dir or DEFAULT_STATE_DIR, node


def restore_policy_snapshot(config: Path) -> policy_snapshot.Restored:
    """Restore the policy table's snapshot when the kernel has none (never raises). Reads
    only ``nodeName`` and ``cni.stateDir`` of the config (defaults as fabric.agent.config);
    a config that does not parse restores nothing (load_config then reports it)."""
    try:
        text = config.read_text()
        try:
            state_dir, node = early_settings(text)
        except ValueError:
            import yaml

            doc: Any = yaml.safe_load(text)
            state_dir = str((doc.get("cni") or {}).get("stateDir") or DEFAULT_STATE_DIR)
            node = doc.get("nodeName")
        if not node:
            import socket

            node = socket.gethostname().strip().lower()
    except Exception as e:  # the config's problems are load_config's to report
        return policy_snapshot.Restored(False, f"config not read for the snapshot: {e}")
    path = policy_snapshot.path_in(state_dir)
    return policy_snapshot.restore(path, policy_snapshot.TABLE, str(node))


async def _main(cfg: AgentConfig, phases: dict[str, float]) -> int:
    import asyncio
    import logging
    import signal

    from fabric.agent.agent import Agent  # imported late: --check-config stays fast

    phases["imports"] = time.monotonic()
    agent = Agent(cfg, phases)
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
    args_list = sys.argv[1:] if argv is None else argv
    phases = {"process": process_started(), "interpreter": STARTED}
    if "--check-config" not in args_list and not {"-h", "--help"} & set(args_list):
        restored = restore_policy_snapshot(Path(config_arg(args_list)))  # first, see above
    else:
        restored = policy_snapshot.Restored(False, "not starting")
    phases["snapshot"] = time.monotonic()
    import argparse
    import asyncio
    import logging

    from bgp.errors import BGPError
    from fabric.agent.config import ConfigError, check_config_main, load_config
    from fabric.agent.logs import setup_logging
    from ipam.errors import IPAMError

    ap = argparse.ArgumentParser(prog="fabricd", description="fabric node agent")
    ap.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    ap.add_argument("--check-config", metavar="FILE", help="validate FILE and exit")
    args = ap.parse_args(args_list)
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
    phases["config"] = time.monotonic()
    flog = logging.getLogger("fabricd")
    if restored.applied:
        flog.warning("policy table was absent: restored the snapshot written %.0f s ago (%d "
                     "bytes, %.3f s); the first compile from etcd repairs what changed since",
                     time.time() - restored.written, restored.size, restored.seconds)  # fmt: skip
    elif restored.warn:
        flog.warning("policy snapshot not restored: %s", restored.reason)
    else:
        flog.info("policy snapshot not restored: %s", restored.reason)
    # The route writer thread spends most of its time in netlink syscalls (GIL released)
    # and needs the GIL back briefly after each: with the default 5 ms switch interval it
    # waited up to 5 ms per syscall while the loop digested a burst of updates.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        return asyncio.run(_main(cfg, phases))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, IPAMError, BGPError, OSError) as e:
        # Start-up failures (etcd unreachable, ExaBGP not starting) and a background task
        # that died: one line, non-zero, and systemd restarts us.
        logging.getLogger("fabricd").error("fabricd exits: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
