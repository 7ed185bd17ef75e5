"""Where fabricd's start-up time goes: the end of each phase, from the process start.

Phases, in order (fabric.agent.daemon, then Agent.start): ``interpreter`` (Python up, the
daemon module running), ``snapshot`` (the policy snapshot restored or not), ``config``,
``imports`` (the agent's modules), ``kernel routes`` (adopted), ``etcd`` (registered, every
watched prefix listed), ``policy`` (the first table computed from etcd is in the kernel),
``bgp`` (ExaBGP started), ``ready``; ``policy failed`` instead of ``policy`` when that
batch failed. Logged with "fabricd ready" and exported as ``fabric_start_phase_seconds``.
"""

from __future__ import annotations

import time


class StartClock:
    def __init__(self, phases: dict[str, float] | None = None) -> None:
        """``phases``: phase -> CLOCK_MONOTONIC time it ended, ``process`` the start."""
        self.phases = dict(phases or {})
        self.phases.setdefault("process", time.monotonic())

    def mark(self, phase: str) -> None:
        self.phases[phase] = time.monotonic()

    def since_start(self) -> dict[str, float]:
        """Phase -> seconds from the process start to its end."""
        t0 = self.phases["process"]
        return {k: round(t - t0, 4) for k, t in self.phases.items() if k != "process"}

    def summary(self) -> str:
        """``interpreter 0.031 s, snapshot 0.080 s (+0.049), ...``: end and duration."""
        out, last = [], 0.0
        for k, t in sorted(self.since_start().items(), key=lambda kv: kv[1]):
            out.append(f"{k} {t:.3f} s (+{t - last:.3f})")
            last = t
        return ", ".join(out)
