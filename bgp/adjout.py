"""What ExaBGP's neighbor RIBs hold, and the commands that bring them to the desired set.
Pure: no I/O, no asyncio; ``bgp.speaker`` drives it.

Invariants:
- ``sent`` is what every ExaBGP neighbor RIB holds once the commands sent so far are
  processed, except for neighbors in ``fresh`` (added or changed by a reconfigure: their
  RIB may be empty). ``acked`` is the part ExaBGP acknowledged with ``done``.
- A command is recorded in ``sent`` when it is handed out (``on_sent``), and reverted if
  ExaBGP answers ``error`` (``settle``): its RIBs did not change.
- The global diff goes first; a fresh neighbor whose session comes up gets all of ``sent``
  scoped to it (``neighbor <ip> announce ...``); End-of-RIB for a session follows once
  neither the global diff nor its catch-up has anything left and every command before it
  is acknowledged (ExaBGP acks a route once it is in the neighbor RIBs, and sends a manual
  EOR only when nothing is pending there). EOR and route-refresh are ``exclusive``: their
  ack can come synchronously, so they are sent with nothing else outstanding.
- No End-of-RIB before the desired set is ``declared`` (``set_desired`` called once): a
  session may come up before the owner has said what to announce (fabricd starting:
  ExaBGP's "up" can arrive with the relay's first lines), and an EOR then would tell a
  graceful-restart helper to drop the routes it kept for us. Held EORs go out after the
  first ``set_desired`` and its commands.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from bgp import codec
from bgp.codec import GroupKey
from bgp.model import Advert, IPAddress, IPNetwork


@dataclass(slots=True, eq=False)
class Command:
    """One API command line and what to do with its ack."""

    text: str
    exclusive: bool = False  # its ack may be synchronous: send it alone
    adds: list[tuple[Advert, Advert | None]] = field(default_factory=list)  # (new, previous)
    dels: list[tuple[IPNetwork, Advert | None]] = field(default_factory=list)
    then: Callable[[bool], None] | None = None


def chunks(items: list[IPNetwork], n: int = codec.MAX_PER_LINE) -> Iterator[list[IPNetwork]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class AdjRibOut:
    def __init__(self) -> None:
        self.desired: dict[IPNetwork, Advert] = {}
        self.declared = False  # set_desired was called: EORs may go out
        self.has_neighbors = False
        self.reset()

    def reset(self) -> None:
        """A new ExaBGP holds nothing: everything desired is to be sent again."""
        self.sent: dict[IPNetwork, Advert] = {}
        self.acked: dict[IPNetwork, Advert] = {}
        self.suspect: set[IPNetwork] = set()  # may be held, to withdraw unless desired
        self.dirty = True
        self.plan: deque[Command] = deque()
        self.fresh: set[IPAddress] = set()
        self.catchup: dict[IPAddress, deque[tuple[GroupKey, list[IPNetwork]]]] = {}
        self.eor_due: dict[IPAddress, list[str]] = {}
        self.refresh_due: list[str] = []

    def resync(
        self, refresh: Iterable[str] = (), eors: Mapping[IPAddress, Iterable[str]] | None = None
    ) -> None:
        """What ExaBGP holds is unknown (commands or acks were lost): send every desired
        route again (ExaBGP drops exact duplicates), withdraw all else that was sent, queue
        the ``refresh`` commands (route-refresh requests) and End-of-RIB again for ``eors``
        (the established sessions: an EOR in flight may have been lost with the relay, and
        a helper would keep our routes stale until its restart timer)."""
        self.suspect |= set(self.sent)
        self.sent.clear()
        self.acked.clear()
        self.plan.clear()
        self.dirty = True
        self.refresh_due = list(refresh)
        for peer, fams in (eors or {}).items():
            self.eor_due[peer] = list(fams)

    def set_desired(self, desired: dict[IPNetwork, Advert]) -> None:
        self.desired = desired
        self.declared = True
        self.dirty = True

    def mark_fresh(self, peers: Iterable[IPAddress]) -> None:
        self.fresh |= set(peers)

    def keep_peers(self, peers: set[IPAddress]) -> None:
        """Forget per-peer work for peers that are no longer configured."""
        self.has_neighbors = bool(peers)
        self.fresh &= peers
        for gone in set(self.eor_due) - peers:
            del self.eor_due[gone]
        for gone in set(self.catchup) - peers:
            del self.catchup[gone]

    def session_up(self, peer: IPAddress, families: Iterable[str]) -> None:
        if peer in self.fresh:
            self.fresh.discard(peer)
            groups = codec.group_adverts(self.sent.values())
            self.catchup[peer] = deque(
                (key, chunk) for key, ps in groups.items() for chunk in chunks(ps)
            )
        self.eor_due[peer] = list(families)

    def session_down(self, peer: IPAddress) -> None:
        self.eor_due.pop(peer, None)

    def quiet(self) -> bool:
        """Nothing left to send (commands in flight aside; EORs held until the desired set
        is declared do not count)."""
        eors = self.eor_due and self.declared
        return not (self.dirty or self.plan or self.catchup or eors or self.refresh_due)

    # ------------------------------------------------------------------ commands

    def next_command(self, idle: bool) -> Command | None:
        """The next command; exclusive ones only when ``idle`` (nothing outstanding)."""
        if self.dirty:
            self._replan()
        if self.plan:
            return self.plan.popleft()
        for peer in list(self.catchup):
            queue = self.catchup[peer]
            while queue:
                cmd = self._catchup_command(peer, *queue.popleft())
                if cmd is not None:
                    return cmd
            del self.catchup[peer]
        if not idle:
            return None
        for peer, fams in self.eor_due.items() if self.declared else ():
            if peer in self.catchup:
                continue
            fam = fams.pop(0)
            if not fams:
                del self.eor_due[peer]
            return Command(codec.eor_command(fam, peer), exclusive=True)
        if self.refresh_due:
            return Command(self.refresh_due.pop(0), exclusive=True)
        return None

    def _replan(self) -> None:
        """The diff of desired against sent, as queued commands (withdrawals first)."""
        self.dirty = False
        desired, sent = self.desired, self.sent
        gone = [p for p in sent if p not in desired]
        gone += [p for p in self.suspect if p not in desired and p not in sent]
        self.suspect.clear()
        plan: deque[Command] = deque()
        for version in (4, 6):  # one family per line: ExaBGP mishandles mixed withdrawals
            for chunk in chunks([p for p in gone if p.version == version]):
                dels: list[tuple[IPNetwork, Advert | None]] = [(p, None) for p in chunk]
                plan.append(Command(codec.withdraw_line(chunk), dels=dels))
        changed = (a for p, a in desired.items() if sent.get(p) != a)
        for (_, nh, comms), prefixes in codec.group_adverts(changed).items():
            for chunk in chunks(prefixes):
                adds: list[tuple[Advert, Advert | None]] = [(desired[p], None) for p in chunk]
                plan.append(Command(codec.announce_line(nh, comms, chunk), adds=adds))
        self.plan = plan
        if not self.has_neighbors:  # nothing to send to: every (absent) RIB is in sync
            while self.plan:
                cmd = self.plan.popleft()
                self.on_sent(cmd)
                self.settle(cmd, True)

    def _catchup_command(
        self, peer: IPAddress, key: GroupKey, chunk: list[IPNetwork]
    ) -> Command | None:
        _, nh, comms = key
        live = []
        for p in chunk:
            a = self.sent.get(p)
            if a is not None and a.next_hop == nh and a.communities == comms:
                live.append(p)
        return Command(codec.announce_line(nh, comms, live, peer)) if live else None

    def on_sent(self, cmd: Command) -> None:
        """Record a global diff command as sent, keeping previous values for a revert."""
        for i, (p, _) in enumerate(cmd.dels):
            cmd.dels[i] = (p, self.sent.pop(p, None))
        for i, (a, _) in enumerate(cmd.adds):
            cmd.adds[i] = (a, self.sent.get(a.prefix))
            self.sent[a.prefix] = a

    def settle(self, cmd: Command, ok: bool) -> None:
        """Apply ExaBGP's ack. Refused: its RIBs did not change, so ``sent`` goes back;
        the routes are retried with the next ``set_desired`` (not at once: an advert
        ExaBGP refuses would be refused again)."""
        if ok:
            for p, _ in cmd.dels:
                self.acked.pop(p, None)
            for a, _ in cmd.adds:
                self.acked[a.prefix] = a
            return
        for p, prev in cmd.dels:
            if p not in self.sent and prev is not None:
                self.sent[p] = prev
        for a, prev in cmd.adds:
            if self.sent.get(a.prefix) is a:
                if prev is None:
                    del self.sent[a.prefix]
                else:
                    self.sent[a.prefix] = prev
