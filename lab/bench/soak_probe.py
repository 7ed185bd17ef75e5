"""The soak benchmark's instruments: a new pod's first pings (``FirstPing``), what a node had
at the moment one of them went unanswered (``capture``), and what is left of deleted pods
on a host at the end (``leftovers``)."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lab import pods
from lab.pods import Pod
from lab.runner import Lab

COUNT = 20  # first pings per new pod
INTERVAL = 0.05  # s between them (50 ms)
_SEQ = re.compile(r"icmp_seq=(\d+)")


class FirstPing:
    """``COUNT`` pings from ``pod`` to ``dst`` every 50 ms, started the moment it is made. The
    first "no answer yet" (``ping -O``: a reply later than the next send) calls ``on_late``
    once, so the node can be captured while it happens."""

    def __init__(self, lab: Lab, pod: Pod, dst: str, on_late: Callable[[], None]) -> None:
        self.pod, self.dst = pod, dst
        self.started = time.time()  # epoch, as ping -D and the faults' times
        argv = ["ip", "netns", "exec", lab.netns(pod.node), "ip", "netns", "exec",
                pod.netns_name, "ping", "-n", "-O", "-c", str(COUNT), "-i", str(INTERVAL),
                "-W", "1", dst]  # fmt: skip
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)  # fmt: skip
        self._on_late = on_late
        self.replies: set[int] = set()
        self.late = False
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            m = _SEQ.search(line)
            if m is None:
                continue
            if "bytes from" in line:
                self.replies.add(int(m.group(1)))
            elif "no answer yet" in line and not self.late:
                self.late = True
                self._on_late()

    def wait(self, timeout: float = 30.0) -> tuple[int, float]:
        """(pings lost, worst gap in ms: the longest run of unanswered pings x 50 ms)."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._t.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        lost = [s for s in range(1, COUNT + 1) if s not in self.replies]
        best = run = 0
        for s in range(1, COUNT + 1):
            run = run + 1 if s in lost else 0
            best = max(best, run)
        return len(lost), best * INTERVAL * 1000


def capture(lab: Lab, pod: Pod, dst: str, out: Path) -> Path:
    """What ``pod``'s node and the pod had right now: routes, neighbours (with states),
    the pod's routes and neighbours, the host's nstat counters; written to ``out``."""
    ns = pod.netns_name
    script = "; ".join([
        "echo '# date'; date +%s.%N",
        f"echo '# host: ip route get {dst}'; ip route get {dst}",
        f"echo '# host: ip route show {pod.ip}'; ip route show {pod.ip}",
        "echo '# host: ip route show proto fabric'; ip route show proto fabric",
        "echo '# host: ip -s neigh'; ip -s neigh",
        f"echo '# host: ip -d link of the veth'; ip -d link show {pod.result['interfaces'][0]['name']}",
        f"echo '# pod: ip route'; ip netns exec {ns} ip route",
        f"echo '# pod: ip -s neigh'; ip netns exec {ns} ip -s neigh",
        f"echo '# pod: ip -d link'; ip netns exec {ns} ip -d link",
        "echo '# host: nstat -az'; nstat -az",
    ])  # fmt: skip
    r = lab.exec(pod.node, script, timeout=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(r.stdout + r.stderr)
    return out


def leftovers(lab: Lab, host: str, gone: set[str]) -> list[str]:
    """What is left on ``host`` of pods that were deleted (container IDs ``gone``), and of
    anything half done: a veth, a host route, a state record or a recorded DEL, a netns."""
    out: list[str] = []
    from fabric.dataplane.attachment import host_ifname

    links = lab.exec(host, ["ip", "-o", "link", "show"], check=True).stdout
    routes = lab.exec(host, ["ip", "route", "show", "proto", "fabric"], check=True).stdout
    d = pods.state_dir(lab, host)
    for cid in sorted(gone):
        veth = host_ifname(cid, "eth0")
        if f" {veth}@" in links or f" {veth}:" in links:
            out.append(f"{host}: link {veth} of {cid}")
        if f"dev {veth} " in routes + " ":
            out.append(f"{host}: host route via {veth} of {cid}")
        if list(d.glob(f"*.{cid}.eth0.json")):
            out.append(f"{host}: state record of {cid}")
        if (Path("/run/netns") / f"{lab.plan.prefix}p{cid[:40]}").exists():
            out.append(f"{host}: netns of {cid}")
    out += [
        f"{host}: recorded DEL {p.name} not finished" for p in (d / "pending-del").glob("*.del")
    ]
    return out


def rss_fds(pid: int) -> tuple[float, int]:
    """(resident MB, open file descriptors) of process ``pid``."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))
