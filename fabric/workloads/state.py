"""The state dir: one small JSON file per pod attachment, how fabricd knows its local pods.

A record is written *before* the first side effect of an ADD (phase ``adding``), rewritten
when the attachment is complete (``ready``) and before a DEL starts (``deleting``), and
removed when a DEL or a rollback has undone everything. So after a crash or restart:

- ``ready`` records give the pods' host routes (``<pod>/32 dev <veth>``), which the agent
  desires from its first full resync on, so a resync never removes them;
- ``adding`` and ``deleting`` records name exactly what may be half done: the agent finishes
  them (release the handle, remove the interfaces) before it serves requests again.

Each file is replaced atomically (temporary file, rename) so a reader never sees half of
one. No fsync: the records must survive a fabricd restart, which the page cache does; after a
reboot the pods' namespaces are gone too and the runtime deletes them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cni.result import IPInterface

SUFFIX = ".json"
MAX_NAME = 200  # file names stay well under NAME_MAX (255)


class Phase(StrEnum):
    ADDING = "adding"
    READY = "ready"
    DELETING = "deleting"


@dataclass(frozen=True, slots=True)
class Record:
    """One attachment: (network, container, ifname), identified by its IPAM ``handle``."""

    handle: str
    network: str
    container_id: str
    ifname: str
    netns: str
    host_ifname: str
    phase: Phase
    ips: tuple[IPInterface, ...] = ()
    mtu: int = 1500
    host_mac: str = ""
    pod_mac: str = ""
    pod: str = ""
    namespace: str = ""
    sysctls: Mapping[str, str] = field(default_factory=dict)
    # IPAM's sequence number of each address in ``ips`` (same order; empty in records older
    # than it): a recorded DEL frees exactly these allocations, never a later one
    seqs: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "network": self.network,
            "containerID": self.container_id,
            "ifname": self.ifname,
            "netns": self.netns,
            "hostIfname": self.host_ifname,
            "phase": str(self.phase),
            "ips": [str(i) for i in self.ips],
            "mtu": self.mtu,
            "hostMAC": self.host_mac,
            "podMAC": self.pod_mac,
            "pod": self.pod,
            "namespace": self.namespace,
            "sysctls": dict(self.sysctls),
            "seqs": list(self.seqs),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Record:
        """Raises KeyError, TypeError or ValueError for a document that is not a record."""
        return cls(
            handle=str(d["handle"]),
            network=str(d["network"]),
            container_id=str(d["containerID"]),
            ifname=str(d["ifname"]),
            netns=str(d.get("netns") or ""),
            host_ifname=str(d["hostIfname"]),
            phase=Phase(d["phase"]),
            ips=tuple(ipaddress.ip_interface(i) for i in d.get("ips") or ()),
            mtu=int(d.get("mtu") or 1500),
            host_mac=str(d.get("hostMAC") or ""),
            pod_mac=str(d.get("podMAC") or ""),
            pod=str(d.get("pod") or ""),
            namespace=str(d.get("namespace") or ""),
            sysctls={str(k): str(v) for k, v in (d.get("sysctls") or {}).items()},
            seqs=tuple(int(q) for q in d.get("seqs") or ()),
        )


def file_name(handle: str) -> str:
    """The record's file name: the handle itself when short enough, else its hash.

    A handle never contains '/' and never starts with '.' (network names and container IDs
    start alphanumeric), so it is a safe file name.
    """
    if len(handle.encode()) + len(SUFFIX) <= MAX_NAME:
        return handle + SUFFIX
    return "h-" + hashlib.sha256(handle.encode()).hexdigest() + SUFFIX


class StateDir:
    """The records in one directory (created 0700 if missing)."""

    def __init__(self, path: Path, log: logging.Logger | None = None) -> None:
        self.path = path
        self.log = log or logging.getLogger(__name__)

    def load(self) -> dict[str, Record]:
        """Every readable record by handle. An unreadable file is renamed ``*.bad`` (kept
        for a person to look at) and skipped; leftover temporary files are removed."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        out: dict[str, Record] = {}
        for p in sorted(self.path.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                rec = Record.from_json(json.loads(p.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self.log.error("unreadable CNI state file %s (%s): renamed to .bad", p, e)
                p.rename(p.with_name(p.name + ".bad"))
                continue
            out[rec.handle] = rec
        return out

    def save(self, rec: Record) -> None:
        name = file_name(rec.handle)
        data = json.dumps(rec.to_json()).encode()
        try:
            self._replace(name, data)
        except FileNotFoundError:  # the directory was removed under us: recreate it once
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._replace(name, data)

    def _replace(self, name: str, data: bytes) -> None:
        """Write ``data`` to a temporary file and rename it to ``name``. Plain os calls: an
        ADD saves twice on its critical path, and pathlib's write_bytes (an io stack per
        call) cost twice as much."""
        d = os.fspath(self.path)
        tmp = f"{d}/.{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, f"{d}/{name}")

    def remove(self, handle: str) -> None:
        """Idempotent."""
        (self.path / file_name(handle)).unlink(missing_ok=True)
