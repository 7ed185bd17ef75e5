"""Checks shared by the lab tests: lab names, and "nothing of the lab is left"."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lab import netns, procs
from lab.state import LabState


def lab_name(topology: str) -> str:
    return f"t{os.getpid()}-{topology}"


def root_links() -> set[str]:
    """Interface names in the machine's root namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def snapshot(lab_dir: Path) -> LabState:
    """The lab's recorded state, to check after ``down`` that it all went away."""
    return LabState.load(lab_dir)


def assert_gone(state: LabState, links_before: set[str]) -> None:
    """Nothing the lab recorded survives: no namespace, no process, no root link, no dir."""
    left_ns = [ns for ns in netns.listed() if ns.startswith(state.prefix)]
    assert left_ns == [], f"namespaces left: {left_ns}"
    left_procs = [r for r in state.procs if procs.matches(r)]
    assert left_procs == [], f"processes left: {left_procs}"
    assert root_links() - links_before == set()
    assert not state.dir.exists()
