"""Processes of a lab: spawned inside a namespace, stopped by recorded PID only.

A PID is signalled only while it still is the process we started: its start time
(``/proc/PID/stat`` field 22) and its command line must match the record. Nothing is
ever killed by name. ``ip netns exec`` execs its command, so the PID we get is the
daemon's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from lab.state import ProcRecord


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after ')' are fixed.
    return raw[raw.rindex(")") + 2 :].split()


def starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def matches(rec: ProcRecord, tries: int = 5) -> bool:
    """True while ``rec.pid`` is still the process the lab started (and not a zombie).

    While the process is inside ``execve`` (``ip netns exec`` becoming the daemon) the
    kernel shows an empty command line for a moment (the new memory map has no argument
    area yet), so a command line that matches neither form is read again a few times
    (10 ms apart) before the process counts as someone else: reading it once made a
    freshly started fabricd look dead ("exited" with an empty log)."""
    wrapped = ["ip", "netns", "exec", rec.netns, *rec.argv]
    for attempt in range(tries):
        if starttime(rec.pid) != rec.starttime or not alive(rec.pid):
            return False
        if cmdline(rec.pid) in (rec.argv, wrapped):
            return True
        if attempt + 1 < tries:
            time.sleep(0.01)
    return False


def spawn(
    argv: list[str], netns: str, log: Path, node: str, what: str
) -> tuple[subprocess.Popen[bytes], ProcRecord]:
    """Start ``argv`` inside ``netns`` in its own session, output appended to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return proc, record(proc.pid, argv, netns, node, what)


def record(pid: int, argv: list[str], netns: str, node: str, what: str) -> ProcRecord:
    return ProcRecord(
        pid=pid, starttime=starttime(pid) or 0, argv=argv, node=node, what=what, netns=netns
    )


def netns_pids(netns: str) -> list[int]:
    """PIDs of every process inside the lab namespace ``netns`` (empty if it is gone)."""
    r = subprocess.run(["ip", "netns", "pids", netns], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return []
    return [int(x) for x in r.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def reap(pid: int) -> None:
    """Reap ``pid`` when it is our own child (a Lab object in this process started it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those still alive after ``timeout``; returns the killed ones.

    The caller has already checked each PID belongs to the lab.
    """
    todo = [p for p in pids if alive(p)]
    for p in todo:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        for p in todo:
            reap(p)
        todo = [p for p in todo if alive(p)]
        if todo:
            time.sleep(0.05)
    for p in todo:
        _signal(p, signal.SIGKILL)
    for p in todo:
        for _ in range(100):
            reap(p)
            if not alive(p):
                break
            time.sleep(0.02)
    return todo
