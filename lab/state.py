"""The lab directory and its write-ahead state file.

Every lab owns one directory, ``$FABRIC_LAB_RUN/<name>/`` (default ``/run/fabric-lab`` when
``/run`` is a tmpfs, else ``/dev/shm/fabric-lab``: on a tmpfs a reboot clears it together
with the namespaces, and the lab's etcd, whose data lives there, does not wait on a disk for
every commit). ``state.json`` in it records
each namespace *before* it is created and each process right after it is spawned, so
``down`` can undo a run that was SIGKILLed at any point. The file is replaced atomically
(write to a temporary file, then rename), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUN_ROOT_ENV = "FABRIC_LAB_RUN"
DEFAULT_RUN_ROOT = Path("/run/fabric-lab")
FALLBACK_RUN_ROOT = Path("/dev/shm/fabric-lab")  # machines whose /run is on disk
_MEMORY_FS = {"tmpfs", "ramfs"}
STATE_FILE = "state.json"
_SAVING = threading.Lock()  # threads of one process (pods added at once) save in turn
_LAB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


def run_root() -> Path:
    if env := os.environ.get(RUN_ROOT_ENV):
        return Path(env)
    if fs_type(DEFAULT_RUN_ROOT) in _MEMORY_FS or not FALLBACK_RUN_ROOT.parent.is_dir():
        return DEFAULT_RUN_ROOT
    return FALLBACK_RUN_ROOT


def fs_type(path: Path, mounts: str = "/proc/self/mounts") -> str:
    """The type of the filesystem ``path`` is (or would be) on: the longest mount point
    that is a prefix of it; "" when unknown."""
    best, kind = -1, ""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return ""
    target = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def check_name(name: str) -> str:
    """Validate a lab name (it becomes a directory name). Returns it unchanged."""
    if not _LAB_NAME.match(name):
        raise ValueError(f"invalid lab name {name!r}: use letters, digits, '-', '_', '.'")
    return name


@dataclass(slots=True)
class ProcRecord:
    """A process the lab started; ``starttime`` (clock ticks since boot) guards PID reuse."""

    pid: int
    starttime: int
    argv: list[str]
    node: str
    what: str
    netns: str


@dataclass(slots=True)
class LabState:
    name: str
    prefix: str
    dir: Path
    phase: str = "creating"
    namespaces: list[str] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    def save(self) -> None:
        with _SAVING:
            data = asdict(self)
            data["dir"] = str(self.dir)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            with tmp.open("w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)

    def add_namespace(self, ns: str) -> None:
        """Record ``ns`` before it exists (write-ahead)."""
        if ns not in self.namespaces:
            self.namespaces.append(ns)
            self.save()

    def add_proc(self, rec: ProcRecord) -> None:
        self.procs.append(rec)
        self.save()

    @classmethod
    def load(cls, lab_dir: Path) -> LabState:
        """Read a lab's state; raises FileNotFoundError when the lab does not exist."""
        data = json.loads((lab_dir / STATE_FILE).read_text())
        return cls(
            name=data["name"],
            prefix=data["prefix"],
            dir=lab_dir,
            phase=data.get("phase", "creating"),
            namespaces=list(data.get("namespaces", [])),
            procs=[ProcRecord(**p) for p in data.get("procs", [])],
            info=dict(data.get("info", {})),
        )


def lab_dir(name: str) -> Path:
    return run_root() / check_name(name)


def list_labs() -> list[str]:
    """Names of every lab with a directory under the run root (up, half up or broken)."""
    root = run_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _LAB_NAME.match(p.name))
