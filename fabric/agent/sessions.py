"""What the agent concludes from its BGP sessions, as pure logic: convergence after a start
(how long adopted kernel routes are kept) and whether the required peers are up (/readyz).

Nothing here does I/O or reads a clock: the agent passes the time, the planned sessions and
which of them are established, so every path has a unit test (tests/test_agent_unit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Iterable, Mapping

from bgp.model import IPAddress, IPNetwork
from fabric.agent.config_values import RequiredPeers
from fabric.dataplane.netlink import KernelRoute


class Convergence:
    """The RIB's convergence after fabricd (re)started, and the routes adopted until then.

    Invariants:
    - Adopted routes (learned routes found in the kernel at start) are kept until converged:
      a restart of fabricd never takes a still valid route away.
    - Converged: every planned session is established and has sent End-of-RIB since it last
      came up (a session that leaves Established, or an ExaBGP restart, voids its End-of-RIB),
      or the graceful-restart time since start has passed (a peer that stays down).
    - Converged is final; at that moment the adopted routes nobody announces are handed back
      once for removal and nothing is kept any more.
    """

    def __init__(self, adopted: Mapping[IPNetwork, KernelRoute], deadline: float) -> None:
        self.adopted = dict(adopted)
        self.deadline = deadline  # time.monotonic() after which nothing is waited for
        self.converged = False
        self._eor: set[IPAddress] = set()

    def end_of_rib(self, peer: IPAddress) -> None:
        self._eor.add(peer)

    def session_down(self, peer: IPAddress) -> None:
        """``peer`` left Established: its next End-of-RIB is needed again."""
        self._eor.discard(peer)

    def speaker_restarted(self) -> None:
        """ExaBGP restarted: every session starts over, so does every End-of-RIB."""
        self._eor.clear()

    def keeps(self, dst: IPNetwork) -> bool:
        """A withdrawal of ``dst`` must leave its adopted kernel route in place (for now)."""
        return not self.converged and dst in self.adopted

    def kept(self) -> Container[IPNetwork]:
        """The prefixes ``keeps`` answers True for, as a container (empty once converged)."""
        return () if self.converged else self.adopted

    def check(
        self,
        now: float,
        planned: Iterable[IPAddress],
        established: Container[IPAddress],
        announced: Callable[[], Container[IPNetwork]],
    ) -> list[IPNetwork] | None:
        """Converge if every planned peer is established with End-of-RIB, or at the deadline.
        The one call that converges returns the adopted prefixes ``announced()`` lacks (to
        remove); every other call returns None. ``announced`` is called only then (costly)."""
        if self.converged:
            return None
        complete = all(p in self._eor and p in established for p in planned)
        if not complete and now < self.deadline:
            return None
        self.converged = True
        best = announced()
        stale = [dst for dst in self.adopted if dst not in best]
        self.adopted = {}
        return stale


def required_peers_up(
    mode: RequiredPeers | tuple[IPAddress, ...],
    required: Collection[IPAddress],
    established: Container[IPAddress],
) -> tuple[bool, str]:
    """The /readyz peers check: ``mode`` is bgp.requiredPeers; ``required`` the planned
    sessions marked required (ToR, route reflector). Returns (ok, detail)."""
    if mode == RequiredPeers.NONE:
        return True, "not required"
    if isinstance(mode, RequiredPeers):  # "auto": at least one required session up
        if not required:
            return True, "no required peers configured"
        n = sum(1 for ip in required if ip in established)
        return n > 0, f"{n}/{len(required)} required peers established"
    missing = [str(ip) for ip in mode if ip not in established]
    return not missing, "missing: " + ", ".join(missing) if missing else "all established"
