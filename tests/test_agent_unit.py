"""Pure unit tests of the agent's own logic (no etcd, no kernel, no ExaBGP): the tasks it
starts in the background, convergence after a start, the /readyz peers check, the kernel
routes it wants."""

from __future__ import annotations

import asyncio
import contextlib
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from fabric.agent.agent import Agent
from fabric.agent.config import parse_config
from fabric.agent.config_values import RequiredPeers
from fabric.agent.kernel_routes import Gateways, desired_routes, kernel_changes
from fabric.agent.sessions import Convergence, required_peers_up
from fabric.dataplane.netlink import KernelRoute
from ipam import keys


def config(tmp_path: Path) -> str:
    return (
        "nodeName: n1\naddresses: {ipv4: 10.80.0.2/24}\n"
        "etcd: {endpoints: ['http://127.0.0.1:1'], timeout: 1.0}\n"
        f"runDir: {tmp_path}/run\n"
        f"cni: {{socket: {tmp_path}/run/cni.sock, stateDir: {tmp_path}/state}}\n"
        "health: {listen: '127.0.0.1:0'}\n"
    )


def held_by(agent: Agent, task: asyncio.Task[Any]) -> bool:
    """The agent holds ``task`` strongly (the loop holds tasks only through a WeakSet)."""
    return any(
        v is task or (isinstance(v, set | list | tuple) and task in v) for v in vars(agent).values()
    )


def test_re_registration_task_is_held_until_it_ends(tmp_path: Path) -> None:
    """Issue 16: the re-registration started when this node's Node key vanished was a bare
    create_task, which asyncio may collect while it runs."""

    async def go() -> None:
        agent = Agent(parse_config(config(tmp_path)))
        try:
            before = asyncio.all_tasks()
            agent._changed(keys.NODES)  # the cache does not have this node: re-register
            (task,) = asyncio.all_tasks() - before
            assert held_by(agent, task), "a background task nobody holds"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)
            assert not held_by(agent, task), "a finished task is still held"
        finally:
            await agent.store.close()

    asyncio.run(go())


# ---------------------------------------------------------------- convergence after a start

A, B = ip_address("10.0.0.1"), ip_address("10.0.0.2")
KEPT, GONE = ip_network("10.1.0.0/26"), ip_network("10.1.0.64/26")
ADOPTED = {d: KernelRoute(dst=d, gateways=(A,)) for d in (KEPT, GONE)}
DEADLINE = 100.0


def announced() -> set[Any]:
    return {KEPT}


def test_converges_when_every_planned_peer_is_up_and_sent_end_of_rib() -> None:
    c = Convergence(ADOPTED, DEADLINE)
    assert c.keeps(GONE) and c.keeps(KEPT)
    assert GONE in c.kept() and KEPT in c.kept()  # kept(): keeps() as a container
    c.end_of_rib(A)
    assert c.check(1.0, [A, B], {A, B}, announced) is None, "B has not sent End-of-RIB"
    c.end_of_rib(B)
    assert c.check(1.0, [A, B], {A}, announced) is None, "B is not established"
    assert c.check(2.0, [A, B], {A, B}, announced) == [GONE]
    assert c.converged and not c.keeps(GONE) and not c.keeps(KEPT) and c.adopted == {}
    assert GONE not in c.kept() and KEPT not in c.kept()
    assert c.check(3.0, [A, B], {A, B}, announced) is None, "converging happens once"


def test_a_peer_that_stays_down_converges_at_the_deadline() -> None:
    c = Convergence(ADOPTED, DEADLINE)
    c.end_of_rib(A)
    assert c.check(DEADLINE - 0.1, [A, B], {A}, announced) is None
    assert c.keeps(GONE)
    assert c.check(DEADLINE, [A, B], {A}, announced) == [GONE]
    assert c.converged


def test_no_planned_session_converges_at_once() -> None:
    c = Convergence(ADOPTED, DEADLINE)
    assert c.check(0.0, [], set(), announced) == [GONE]


def test_an_exabgp_restart_in_the_middle_voids_every_end_of_rib() -> None:
    c = Convergence(ADOPTED, DEADLINE)
    c.end_of_rib(A)
    c.speaker_restarted()
    c.end_of_rib(B)
    assert c.check(1.0, [A, B], {A, B}, announced) is None, "A's End-of-RIB predates the restart"
    c.end_of_rib(A)
    assert c.check(1.0, [A, B], {A, B}, announced) == [GONE]


def test_a_session_that_flaps_in_the_middle_needs_its_end_of_rib_again() -> None:
    c = Convergence(ADOPTED, DEADLINE)
    c.end_of_rib(A)
    c.end_of_rib(B)
    c.session_down(B)
    assert c.check(1.0, [A, B], {A, B}, announced) is None
    assert c.keeps(GONE)
    c.end_of_rib(B)
    assert c.check(1.0, [A, B], {A, B}, announced) == [GONE]


def test_announced_is_read_only_when_converging() -> None:
    calls: list[int] = []

    def counted() -> set[Any]:
        calls.append(1)
        return {KEPT, GONE}

    c = Convergence(ADOPTED, DEADLINE)
    for _ in range(3):
        assert c.check(1.0, [A], set(), counted) is None
    assert calls == []
    assert c.check(DEADLINE, [A], set(), counted) == [] and calls == [1]


# ---------------------------------------------------------------- /readyz peers


def test_required_peers() -> None:
    assert required_peers_up(RequiredPeers.NONE, [A], set()) == (True, "not required")
    assert required_peers_up(RequiredPeers.AUTO, [], set()) == (
        True,
        "no required peers configured",
    )
    assert required_peers_up(RequiredPeers.AUTO, [A, B], {B}) == (
        True,
        "1/2 required peers established",
    )
    assert required_peers_up(RequiredPeers.AUTO, [A, B], set()) == (
        False,
        "0/2 required peers established",
    )
    assert required_peers_up((A, B), [], {A}) == (False, "missing: 10.0.0.2")
    assert required_peers_up((A,), [], {A}) == (True, "all established")


# ---------------------------------------------------------------- kernel routes wanted

OWN, POD = ip_network("10.2.0.0/26"), ip_network("10.2.0.5/32")
LEARNED = ip_network("10.3.0.0/26")


def test_desired_routes_precedence() -> None:
    gw = Gateways()
    pod = KernelRoute(dst=POD, dev="fab0")
    adopted = {KEPT: ADOPTED[KEPT], OWN: KernelRoute(dst=OWN, gateways=(B,))}
    best = {KEPT: frozenset({B}), LEARNED: frozenset({A, B}), GONE: None, POD: frozenset({A})}
    got = desired_routes(adopted, best, [OWN], {POD: pod}, gw)
    assert got == {
        KEPT: KernelRoute(dst=KEPT, gateways=(B,)),  # learned beats adopted
        LEARNED: KernelRoute(dst=LEARNED, gateways=(A, B)),  # ECMP, sorted
        OWN: KernelRoute(dst=OWN, blackhole=True),  # own block beats all learned
        POD: pod,  # a local pod beats everything
    }
    assert got[KEPT].gateways is gw(frozenset({B})), "next-hop tuples are shared"


def test_kernel_changes_skip_own_and_local_and_keep_adopted() -> None:
    changes = {OWN: frozenset({A}), POD: frozenset({A}), LEARNED: frozenset({A}), KEPT: None,
               GONE: None}  # fmt: skip
    want = {LEARNED: KernelRoute(dst=LEARNED, gateways=(A,)), GONE: None}
    assert kernel_changes(changes, {OWN}, {POD}, {KEPT}, Gateways()) == want
    # containers that are not sets (the adopted routes, a dict), or empty
    kept = {KEPT: ADOPTED[KEPT], LEARNED: ADOPTED[KEPT]}  # a learned route is not "kept"
    assert kernel_changes(changes, frozenset({OWN}), [POD], kept, Gateways()) == want
    everything = {**want, OWN: KernelRoute(dst=OWN, gateways=(A,)), KEPT: None}
    assert kernel_changes(changes, (), set(), (), Gateways()) == everything | {
        POD: KernelRoute(dst=POD, gateways=(A,))
    }


def test_announce_gate_waits_only_for_addresses_not_announced_yet() -> None:
    """ADD of a borrowed address (or the first of a new block) returns ``settle`` s after its
    covering advert was acknowledged (fabric/agent/announce.py); an address in a block
    acknowledged long ago, or in a pool that is not exported, never waits; an own block seen
    announced does not wait after an ExaBGP restart; a wait that times out is counted."""
    import logging
    import time

    from bgp.import_policy import ImportPolicy
    from bgp.model import PeerType, Session
    from fabric.agent.announce import AnnounceGate
    from fabric.agent.intent import Intent
    from fabric.agent.metrics import Metrics

    policy = ImportPolicy(allowed=(), own=frozenset(), allow_default=False, local_as=64512,
                          router_id=ip_address("10.0.0.1"), own_addresses=frozenset())  # fmt: skip
    own_block, new_block = ip_network("10.244.1.0/26"), ip_network("10.244.2.0/26")
    tor = Session("Node_10_0_0_254", PeerType.NODE, ip_address("10.0.0.254"), 65000, 64512,
                  ip_address("10.0.0.1"), ip_address("10.0.0.1"))  # fmt: skip
    intent = Intent(sessions=(tor,), adverts=frozenset(), policy=policy, nat_cidrs=(),
                    blackholes=frozenset({own_block, new_block}),
                    pool_cidrs=(ip_network("10.244.0.0/16"), ip_network("10.250.0.0/16")),
                    export_cidrs=(ip_network("10.244.0.0/16"),))  # fmt: skip
    asked: list[Any] = []
    now = time.monotonic()
    acked: dict[Any, float] = {own_block: now - 60}  # prefix -> when ExaBGP acked it
    later = {ip_network("10.244.7.9/32"), new_block}  # acked when waited for

    def since(ip: Any) -> float | None:
        return next((t for n, t in acked.items() if ip in n), None)

    async def wait(ip: Any, timeout: float) -> bool:  # noqa: ASYNC109 (Speaker.wait_covered)
        asked.append(ip)
        if since(ip) is not None:
            return True  # covered already: at once
        for n in later:
            if ip in n:
                acked[n] = time.monotonic()
                return True
        return False

    metrics = Metrics()
    gate = AnnounceGate(lambda: intent, since, wait, 2.0, 0.1, metrics,
                        logging.getLogger("test"))  # fmt: skip
    own, borrowed, late = (ip_address(a) for a in ("10.244.1.5", "10.244.7.9", "10.244.7.10"))
    first_of_new, unexported = ip_address("10.244.2.1"), ip_address("10.250.0.3")
    assert not gate.needs_wait(own) and not gate.needs_wait(unexported)
    assert gate.needs_wait(borrowed) and gate.needs_wait(first_of_new)
    acked.clear()  # an ExaBGP restart: nothing acknowledged yet, the own block seen before
    assert not gate.needs_wait(own)
    asyncio.run(gate.announced([own, unexported], "h0"))
    assert asked == []
    started = time.monotonic()
    asyncio.run(gate.announced([borrowed], "h1"))
    assert time.monotonic() - started >= 0.1  # the settle after the ack
    acked[ip_network("10.244.7.11/32")] = time.monotonic() - 0.05  # acked before ADD asks
    started = time.monotonic()
    asyncio.run(gate.announced([ip_address("10.244.7.11")], "h2"))
    assert 0.03 <= time.monotonic() - started < 0.1  # only the rest of the settle
    asyncio.run(gate.announced([late], "h3"))
    asyncio.run(gate.announced([first_of_new], "h4"))
    assert asked == [borrowed, ip_address("10.244.7.11"), late, first_of_new]
    sample = metrics.registry.get_sample_value
    assert sample("fabric_cni_announce_waits_total", {"result": "announced"}) == 3
    assert sample("fabric_cni_announce_waits_total", {"result": "timeout"}) == 1
    gate.timeout = 0  # cni.announceWait: 0 turns the wait off
    assert not gate.needs_wait(late)
