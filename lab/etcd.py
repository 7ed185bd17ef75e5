"""Real etcd servers for tests, benchmarks and the lab (Debian's ``etcd-server``).

Every member listens on loopback (or inside a lab namespace, through ``netns``) with both
client and peer URLs given explicitly, so nothing binds etcd's default ports. Data lives on
tmpfs (``/dev/shm``) unless told otherwise: it makes fsync nearly free, which is what tests
want. Every process is stopped by its PID; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lab.tls import PKI

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
TMPFS = Path("/dev/shm")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    netns: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    tls: PKI | None = None  # clients need https and a certificate (--client-cert-auth)

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def _etcdctl_tls(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        return ["--cacert", str(t.ca), "--cert", str(t.client_cert), "--key", str(t.client_key)]

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, initial_cluster: str, token: str, state: str = "new") -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            ETCD_BIN,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", state,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.tls is not None:
            cmd += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                    "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]  # fmt: skip
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 1.0) -> dict[str, object] | None:
        """The member's maintenance status (leader, member id), or None when it does not answer."""
        if self.netns:
            return self._netns_status(timeout)
        req = urllib.request.Request(
            self.client_url + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._context()) as r:
                return dict(json.loads(r.read()))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def _netns_status(self, timeout: float) -> dict[str, object] | None:
        """``status()`` of a member inside a namespace, through etcdctl (same shape)."""
        cmd = ["ip", "netns", "exec", self.netns or "", "etcdctl", "--endpoints", self.client_url,
               *self._etcdctl_tls(), "--command-timeout", f"{timeout}s", "-w", "json",
               "endpoint", "status"]  # fmt: skip
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, timeout=timeout + 5,
                               env={**os.environ, "ETCDCTL_API": "3"})  # fmt: skip
            doc = json.loads(r.stdout) if r.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None
        if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict):
            return None
        st = doc[0].get("Status")
        return dict(st) if isinstance(st, dict) else None

    def healthy(self, timeout: float = 1.0) -> bool:
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, "etcdctl", "--endpoints", self.client_url,
                   *self._etcdctl_tls(), "--command-timeout", f"{timeout}s",
                   "endpoint", "health"]  # fmt: skip
            r = subprocess.run(
                cmd, check=False, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}
            )
            return r.returncode == 0
        req = urllib.request.Request(self.client_url + "/health")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._context()) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop this member by PID: ``sig`` first, SIGKILL if it does not exit in ``timeout``.

        A member whose peers are gone retries them for a while before it honours SIGTERM,
        hence the escalation.
        """
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class EtcdCluster:
    """One or more etcd members on loopback, started together, stopped by PID."""

    size: int = 1
    host: str = "127.0.0.1"
    base_dir: Path | None = None
    netns: str | None = None
    token: str = field(default_factory=lambda: f"fabric-{os.getpid()}-{time.monotonic_ns()}")
    members: list[EtcdMember] = field(default_factory=list)
    tls: PKI | None = None
    _own_dir: bool = False

    def __post_init__(self) -> None:
        if self.base_dir is None:
            root = TMPFS if TMPFS.is_dir() else None
            self.base_dir = Path(tempfile.mkdtemp(prefix="fabric-etcd-", dir=root))
            self._own_dir = True
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(
                EtcdMember(
                    name=name,
                    host=self.host,
                    client_port=free_port(self.host) if not self.netns else 2379 + 10 * i,
                    peer_port=free_port(self.host) if not self.netns else 2380 + 10 * i,
                    data_dir=self.base_dir / f"{name}.data",
                    log_path=self.base_dir / f"{name}.log",
                    netns=self.netns,
                    tls=self.tls,
                )
            )

    @property
    def endpoints(self) -> list[str]:
        """host:port of each member (``urls`` has the scheme, https with TLS)."""
        return [m.endpoint for m in self.members]

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            m.start(self.initial_cluster, self.token)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0, members: list[EtcdMember] | None = None) -> None:
        deadline = time.monotonic() + timeout
        todo = list(members if members is not None else self.members)
        while todo:
            todo = [m for m in todo if not m.healthy()]
            for m in todo:
                if not m.alive:
                    raise RuntimeError(f"etcd member {m.name} exited: {self.log_tail(m)}")
            if not todo:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {[m.name for m in todo]} not healthy in time")
            time.sleep(0.05)

    def restart(self, member: EtcdMember, timeout: float = 30.0) -> None:
        """Start a stopped member again on its own data dir."""
        member.start(self.initial_cluster, self.token, state="existing")
        self.wait_healthy(timeout, [member])

    def start_stopped(self, timeout: float = 30.0) -> list[EtcdMember]:
        """Start every member that is not running, together (a cluster that lost its quorum
        gets it back only when enough members run), on their own data dirs; wait until all
        are healthy. Returns the members started."""
        todo = [m for m in self.members if not m.alive]
        for m in todo:
            m.start(self.initial_cluster, self.token, state="existing")
        self.wait_healthy(timeout)
        return todo

    def leader(self) -> EtcdMember | None:
        """The running member the answering members name as leader (None during an election);
        members in a namespace are asked through etcdctl."""
        ids: dict[str, EtcdMember] = {}
        leaders: list[str] = []
        for m in self.members:
            st = m.status() if m.alive else None
            header = st.get("header") if st else None
            if st and isinstance(header, dict):
                ids[str(header.get("member_id"))] = m
                leaders.append(str(st.get("leader")))
        return next((ids[i] for i in leaders if i in ids), None)

    @staticmethod
    def log_tail(m: EtcdMember, n: int = 2000) -> str:
        try:
            return m.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
