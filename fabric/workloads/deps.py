"""What the CNI verbs need from the rest of fabricd, as typed interfaces.

``Workloads`` is given its dependencies through ``Deps``. The dataplane, the route table and
the policy gate are ``Protocol``s: fabricd passes the real ``fabric.dataplane.pods.Dataplane``,
``fabric.dataplane.route_table.RouteTable`` and its policy programmer; the verb tests pass
stand-ins that satisfy the same protocols (checked by mypy, no ``type: ignore``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fabric.dataplane import attachment as dp
from fabric.dataplane.netlink import IPAddress, IPNetwork, KernelRoute
from fabric.dataplane.route_table import FlushResult
from fabric.workloads.pending import PendingDir
from fabric.workloads.pod_ipam import PodIPAM
from fabric.workloads.state import Record, StateDir


class PodDataplane(Protocol):
    """A pod's veth pair, addresses and routes (``fabric.dataplane.pods.Dataplane``)."""

    async def create(
        self, container_id: str, ifname: str, netns: str, mtu: int, fams: dp.Families
    ) -> dp.Veth: ...

    async def configure(self, veth: dp.Veth, a: dp.Attachment) -> dp.Attached: ...

    async def discard(self, veth: dp.Veth) -> None: ...

    async def detach(self, container_id: str, ifname: str, netns: str | None) -> bool: ...

    async def check(self, a: dp.Attachment) -> list[str]: ...


class HostRoutes(Protocol):
    """The host routes ``<pod>/32 dev <veth>`` (``fabric.dataplane.route_table.RouteTable``)."""

    def set(self, dst: IPNetwork, route: KernelRoute | None) -> None: ...

    async def flush(self) -> FlushResult: ...

    def installed(self) -> Mapping[IPNetwork, KernelRoute]: ...


class PolicyGate(Protocol):
    """The agent's NetworkPolicy programmer, as the verbs see it."""

    async def admit(self, rec: Record, cni_labels: str) -> None:
        """Return once the endpoint of ``rec`` is programmed; raise when it cannot be."""

    def release(self, handle: str) -> None:
        """Forget the attachment ``handle`` (its entries go with the next batch)."""


class Announcer(Protocol):
    """The agent's announcement gate (``fabric.agent.announce.AnnounceGate``)."""

    async def announced(self, ips: Sequence[IPAddress], handle: str) -> None:
        """Return once those of ``ips`` outside this node's blocks are announced, or after
        the configured bound; never raise."""


@dataclass(frozen=True, slots=True)
class Deps:
    node: str
    ipam: PodIPAM
    dataplane: PodDataplane
    routes: HostRoutes
    state: StateDir
    datastore_ok: Callable[[], Awaitable[bool]]  # etcd answers (cached by the agent)
    pending: PendingDir | None = None  # DELs recorded by the plugin while fabricd was down
    policy: PolicyGate | None = None  # None: no NetworkPolicy enforcement (tests)
    announce: Announcer | None = None  # None: ADD does not wait for BGP (tests)
