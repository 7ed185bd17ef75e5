"""The CNI verbs, as fabricd runs them: one small function per verb, like the reference
plugins, on top of PodIPAM (addresses), the Dataplane (veth pair, addresses and routes in
the pod) and the agent's RouteTable (the host route ``<pod>/32 dev <veth>``, owned by
fabricd); the last two are protocols (``fabric.workloads.deps``).

Contracts (docs/design/cni.md has the whole story):

- ADD writes the state record (``adding``) before its first side effect and undoes every
  step it did, in reverse, when a later one fails or it is cancelled; the record goes only
  when everything was undone. A second ADD of the same attachment never takes a second
  address: a healthy attachment returns its result again, a broken one is rebuilt on the
  addresses it holds.
- DEL is idempotent: a handle that holds nothing, a missing interface, an empty or vanished
  CNI_NETNS are success; an unreachable etcd fails it here (dataplane already torn down,
  record kept ``deleting``), and server.py records it in pending-del/ and answers success.
- Requests for one attachment run one at a time, GC's teardown of it included (it takes
  the same per-attachment lock); GC leaves attachments in flight alone.
- A DEL the plugin recorded while fabricd was unreachable (pending.py) is finished at start
  before the socket opens, every 5 s after, and before any ADD of the same
  attachment (which answers 11 while it cannot be finished). It frees exactly the allocations
  the record names (IPAM sequence numbers), so an address given again later is never freed.
- Fail closed (NetworkPolicy): with a ``policy`` gate, ADD returns only after the gate says
  the pod's endpoint (its map entries, chains and set memberships) is in the kernel; until
  then the dataplane drops the traffic of its veth as an unknown pod interface. A gate that
  cannot program fails the ADD (11, try again later) and everything is undone.
- An address outside this node's blocks (borrowed) is announced before ADD returns: with an
  ``announce`` gate, ADD waits (bounded, never failing) until its /32 is out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import TypeVar

from cni.errors import CNIError, Code
from cni.result import IPAddress, IPInterface
from cni.spec import VALID_ATTACHMENTS, NetConf, Request, Verb
from fabric.dataplane import attachment as att
from fabric.dataplane.netlink import IPNetwork, KernelRoute
from fabric.workloads.checks import check_netns, check_result
from fabric.workloads.deps import Deps
from fabric.workloads.pending import PendingDel, Sweeper
from fabric.workloads.pod_ipam import Owner
from fabric.workloads.results import ipam_result, render_result, result_of
from fabric.workloads.state import Phase, Record
from fabric.workloads.tasks import KeyedLocks, finish, finish_all
from ipam.errors import DatastoreUnavailable

DEFAULT_MTU = 1500
Undo = Callable[[], Awaitable[object]]
T = TypeVar("T")


class Workloads:
    """The verbs of the main plugin (``fabric``) and the IPAM-only one (``fabric-ipam``)."""

    def __init__(self, deps: Deps, log: logging.Logger | None = None) -> None:
        self.d = deps
        self.log = log or logging.getLogger("fabric.workloads.verbs")
        self.records: dict[str, Record] = {}
        self._routed: set[IPNetwork] = set()  # destinations of the host routes we want
        self._locks = KeyedLocks()
        self.pending = Sweeper(self.d.pending, self._recorded_delete, self.log)

    # ------------------------------------------------------------------ start-up

    async def recover(self) -> None:
        """Load the state dir; finish what a crash left ``adding`` or ``deleting`` (release
        the handle, remove the interfaces). Runs before the first route resync and before
        any request is served."""
        self.records = self.d.state.load()
        for rec in list(self.records.values()):
            if rec.phase is Phase.READY:
                continue
            self.log.warning("finishing interrupted %s of %s", rec.phase, rec.handle)
            try:
                await self._teardown(rec, netns=rec.netns)
            except Exception as e:  # the runtime's DEL (or the next start) finishes it
                self.log.error("failed to clean up %s: %s", rec.handle, e)
        self._routed = set(self.routes())
        self.log.info("%d local pod attachments", len(self.records))

    # ------------------------------------------------------------------ recorded DELs

    async def _recorded_delete(self, p: PendingDel) -> None:
        req = p.request
        owner = Owner.of(req.conf.name, req.env)
        async with self._locks.hold(owner.handle):
            if p.plugin == "fabric-ipam":
                await self.d.ipam.release(owner.handle)
                return
            rec = self.records.get(owner.handle) or self._unknown(owner, req)
            await self._teardown(rec, req.env.netns or rec.netns, exact=True)

    def owns(self, dst: IPNetwork) -> bool:
        """``dst`` is a local pod's host route (no BGP-learned route may replace it)."""
        return dst in self._routed

    @property
    def routed(self) -> AbstractSet[IPNetwork]:
        """The local pods' host routes (``owns`` as a container: a burst of 100k learned
        or withdrawn routes checks each against it without a Python call)."""
        return self._routed

    def routes(self) -> dict[IPNetwork, KernelRoute]:
        """The host routes of every ready attachment (desired from the first resync on)."""
        out: dict[IPNetwork, KernelRoute] = {}
        for rec in self.records.values():
            if rec.phase is Phase.READY:
                for dst in _host_nets(rec.ips):
                    out[dst] = KernelRoute(dst=dst, dev=rec.host_ifname)
        return out

    # ------------------------------------------------------------------ dispatch

    async def run(self, plugin: str, req: Request) -> bytes:
        """Run one validated request; returns stdout. Raises CNIError or what a layer below
        raised (fabric.workloads.errors.cni_error maps it)."""
        ipam_only = plugin == "fabric-ipam"
        verb = req.env.command
        if verb is Verb.ADD:
            return await (self.ipam_add(req) if ipam_only else self.add(req))
        if verb is Verb.DEL:
            await (self.ipam_delete(req) if ipam_only else self.delete(req))
        elif verb is Verb.CHECK:
            await (self.ipam_check(req) if ipam_only else self.check(req))
        elif verb is Verb.GC:
            await self.gc(req.conf)
        elif verb is Verb.STATUS:
            await self.status(req.conf)
        return b""

    # ------------------------------------------------------------------ ADD

    async def add(self, req: Request) -> bytes:
        env, conf = req.env, req.conf
        owner = Owner.of(conf.name, env, conf.args)
        await self.pending.before_add(owner.handle)
        async with self._locks.hold(owner.handle):
            check_netns(env.netns)
            old = self.records.get(owner.handle)
            if (
                old is not None
                and old.phase is Phase.READY
                and old.netns == env.netns
                and not await self.d.dataplane.check(_attachment(old))
            ):  # a repeated ADD of a healthy attachment: the same answer
                return render_result(result_of(old, conf), conf)
            await self._need_datastore()
            if old is not None:  # broken or moved: rebuild on the addresses it holds
                await self._take_down(old, env.netns if old.netns == env.netns else old.netns)
            rec = await self._add(owner, conf, req, env.netns)
        return render_result(result_of(rec, conf), conf)

    async def _need_datastore(self) -> None:
        """Fail fast (11) when etcd is known to be down (the agent's cached probe, at most
        ~1 s): an ADD would otherwise wait out the store's deadline twice, assigning and then
        rolling back, and leave its record behind for DEL."""
        if not await self.d.datastore_ok():
            raise CNIError(Code.TRY_AGAIN_LATER, "the datastore (etcd) is not reachable")

    async def _add(self, owner: Owner, conf: NetConf, req: Request, netns: str) -> Record:
        rec = Record(
            handle=owner.handle,
            network=conf.name,
            container_id=owner.container_id,
            ifname=owner.ifname,
            netns=netns,
            host_ifname=att.host_ifname(owner.container_id, owner.ifname),
            phase=Phase.ADDING,
            mtu=conf.mtu or DEFAULT_MTU,
            pod=owner.pod,
            namespace=owner.namespace,
            sysctls=dict(conf.sysctls),
        )
        undo: list[Undo] = []
        try:
            self.d.state.save(rec)
            undo.append(lambda: self._forget(rec.handle))
            undo.append(lambda: self.d.ipam.release(rec.handle))  # also a half-done assign
            # the veth needs no address: it is made while etcd commits the assignment (first:
            # its worker thread starts while the loop sends the transaction)
            fams = await self.d.ipam.families(conf.ipam, req.env.args.ips)
            create = asyncio.ensure_future(
                self.d.dataplane.create(rec.container_id, rec.ifname, netns, rec.mtu, fams))  # fmt: skip
            assign = asyncio.ensure_future(self.d.ipam.assign(owner, conf.ipam, req.env.args.ips))
            try:
                await finish_all(assign, create)
            finally:  # a failed create removed what it made (and a pod interface of that
                if create.done() and not create.cancelled() and create.exception() is None:
                    veth = create.result()  # name may be someone else's): undo only a success
                    undo.append(lambda: self.d.dataplane.discard(veth))
            assigned = assign.result()  # IPAM's error first: pool exhausted, etcd down
            veth = create.result()
            rec = replace(rec, ips=tuple(ipaddress.ip_interface(a.host_prefix) for a in assigned),
                          seqs=tuple(a.seq for a in assigned))  # fmt: skip
            if self.d.policy is not None:
                undo.append(self._releaser(rec.handle))
            # the pod's policy endpoint needs only its addresses and its host interface's name
            # (nft matches names; the name is the veth's): programmed while the veth is
            # configured and the host route added; the ADD returns after all of them
            admit = asyncio.ensure_future(self._admit(rec, owner.labels))
            try:
                got = await finish(asyncio.ensure_future(
                    self.d.dataplane.configure(veth, _attachment(rec))))  # fmt: skip
            except BaseException:
                await finish_all(admit)  # ended before the undo releases its endpoint
                if not admit.cancelled():
                    admit.exception()  # configure's error is the ADD's
                raise
            rec = replace(rec, host_ifname=got.host_ifname, host_mac=got.host_mac,
                          pod_mac=got.pod_mac)  # fmt: skip
            undo.append(lambda: self._remove_routes(rec))
            routes = asyncio.ensure_future(self._add_routes(rec))
            await finish_all(routes, admit)
            routes.result()
            admit.result()
            if self.d.announce is not None:  # a borrowed address: its /32 is announced
                await self.d.announce.announced([i.ip for i in rec.ips], rec.handle)
            rec = replace(rec, phase=Phase.READY)
            self.d.state.save(rec)
        except BaseException:
            await self._undo(rec.handle, undo)  # under the lock: a retry waits for it
            raise
        self.records[rec.handle] = rec
        return rec

    async def _admit(self, rec: Record, labels: str) -> None:
        """Wait until the pod's policy endpoint is in the kernel (fail closed)."""
        if self.d.policy is None:
            return
        try:
            await self.d.policy.admit(rec, labels)
        except CNIError:
            raise
        except Exception as e:
            raise CNIError(Code.TRY_AGAIN_LATER,
                           f"failed to program NetworkPolicy for {rec.handle}: {e}") from e  # fmt: skip

    def _releaser(self, handle: str) -> Undo:
        async def release() -> None:
            if self.d.policy is not None:
                self.d.policy.release(handle)

        return release

    async def _undo(self, handle: str, undo: list[Undo]) -> None:
        """Undo in reverse; the record (first step) goes only if every other step worked."""
        failed = False
        for step in reversed(undo[1:]):
            try:
                await step()
            except Exception as e:
                failed = True
                self.log.error("rollback of %s: a step failed: %s", handle, e)
        if failed:
            self.log.error("rollback of %s incomplete: kept its record for DEL", handle)
        else:
            await undo[0]()

    async def _add_routes(self, rec: Record) -> None:
        nets = _host_nets(rec.ips)
        for dst in nets:
            self.d.routes.set(dst, KernelRoute(dst=dst, dev=rec.host_ifname))
            self._routed.add(dst)
        result = await self.d.routes.flush()
        bad = {dst: result.failed[dst] for dst in nets if dst in result.failed}
        if bad:
            dst, why = next(iter(bad.items()))
            raise CNIError(
                Code.HOST_ROUTE_FAILURE,
                f"failed to add host route {dst} dev {rec.host_ifname}: {why}",
            )

    async def _remove_routes(self, rec: Record) -> None:
        for dst in _host_nets(rec.ips):
            if self._routed_by_other(dst, rec.handle):
                continue  # its address went to another attachment (ipam gc): not ours to remove
            self.d.routes.set(dst, None)
            self._routed.discard(dst)
        await self.d.routes.flush()

    def _routed_by_other(self, dst: IPNetwork, handle: str) -> bool:
        return any(r.handle != handle and r.phase is Phase.READY and dst in _host_nets(r.ips)
                   for r in self.records.values())  # fmt: skip

    async def _forget(self, handle: str) -> None:
        self.records.pop(handle, None)
        self.d.state.remove(handle)
        if self.d.policy is not None:
            self.d.policy.release(handle)

    # ------------------------------------------------------------------ DEL

    async def delete(self, req: Request) -> None:
        owner = Owner.of(req.conf.name, req.env)
        async with self._locks.hold(owner.handle):
            rec = self.records.get(owner.handle) or self._unknown(owner, req)
            await self._teardown(rec, req.env.netns or rec.netns)

    @staticmethod
    def _unknown(owner: Owner, req: Request) -> Record:
        """The record of an attachment this node has none of (its DEL still cleans up)."""
        return Record(owner.handle, req.conf.name, owner.container_id, owner.ifname,
                      req.env.netns, att.host_ifname(owner.container_id, owner.ifname),
                      Phase.DELETING)  # fmt: skip

    async def _teardown(self, rec: Record, netns: str, exact: bool = False) -> None:
        """Everything of ``rec`` goes: record marked ``deleting`` first, then host routes,
        then interfaces and addresses together (the kernel's veth teardown takes ~20 ms; the
        host route is already gone, so an address reused meanwhile never reaches the old
        pod), then the record. Raises when etcd cannot release or the kernel refuses.
        ``exact`` (a recorded DEL): free only the allocations the record names, by their
        sequence numbers, when it names them; else everything the handle holds."""
        if rec.handle in self.records or rec.phase is not Phase.DELETING:
            rec = replace(rec, phase=Phase.DELETING)
            self.d.state.save(rec)
            self.records[rec.handle] = rec
        await self._unroute(rec)
        results = await asyncio.gather(
            self._release(rec, exact), self._detach(rec, netns), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await self._forget(rec.handle)

    async def _release(self, rec: Record, exact: bool) -> None:
        if not await self.d.datastore_ok():  # known down: fail now, not at the deadline
            raise DatastoreUnavailable(f"etcd is not reachable to release {rec.handle}")
        if not (exact and rec.seqs and len(rec.seqs) == len(rec.ips)):
            await self.d.ipam.release(rec.handle)
            return
        stale = await self.d.ipam.release_exact(
            {i.ip: q for i, q in zip(rec.ips, rec.seqs, strict=True)})  # fmt: skip
        if stale:
            self.log.warning("recorded DEL of %s: %s were given again since; left alone",
                             rec.handle, ", ".join(map(str, stale)))  # fmt: skip

    async def _take_down(self, rec: Record, netns: str) -> None:
        """Host routes and interfaces of ``rec`` (the addresses stay with the handle)."""
        await self._unroute(rec)
        await self._detach(rec, netns)

    async def _unroute(self, rec: Record) -> None:
        if rec.ips:
            try:
                await self._remove_routes(rec)
            except Exception as e:  # left pending in the route table, retried there
                self.log.warning("failed to remove host routes of %s now: %s", rec.handle, e)

    async def _detach(self, rec: Record, netns: str) -> None:
        try:
            await self.d.dataplane.detach(rec.container_id, rec.ifname, netns or None)
        except att.NetnsNotFound:  # the pod's namespace is gone: the host end may not be
            await self.d.dataplane.detach(rec.container_id, rec.ifname, None)

    # ------------------------------------------------------------------ CHECK

    async def check(self, req: Request) -> None:
        env, conf = req.env, req.conf
        owner = Owner.of(conf.name, env)
        async with self._locks.hold(owner.handle):
            rec = self.records.get(owner.handle)
            if rec is None or rec.phase is not Phase.READY:
                raise CNIError(Code.UNKNOWN_CONTAINER,
                               f"no attachment {owner.handle} on this node")  # fmt: skip
            check_netns(env.netns)
            check_result(conf.prev_result, env.ifname, env.netns, rec.ips)
            problems = list(await self.d.dataplane.check(_attachment(rec)))
            if rec.netns != env.netns:
                problems.append(f"the attachment is in {rec.netns}, not {env.netns}")
            installed = self.d.routes.installed()
            for dst in _host_nets(rec.ips):
                route = installed.get(dst)
                if route is None or route.dev != rec.host_ifname:
                    problems.append(f"host route {dst} dev {rec.host_ifname} is missing")
            if problems:
                raise CNIError(Code.CHECK_FAILED, f"{owner.handle}: " + "; ".join(problems))
            await self._check_ipam(owner.handle, [i.ip for i in rec.ips])

    async def _check_ipam(self, handle: str, want: list[IPAddress]) -> None:
        held = sorted((a.ip for a in await self.d.ipam.held(handle)), key=str)
        if held != sorted(want, key=str):
            raise CNIError(
                Code.IPAM_MISMATCH,
                f"IPAM handle {handle} holds {[str(i) for i in held]}, "
                f"prevResult has {[str(i) for i in want]}",
            )

    # ------------------------------------------------------------------ IPAM-only plugin

    async def ipam_add(self, req: Request) -> bytes:
        conf = req.conf
        owner = Owner.of(conf.name, req.env, conf.args)
        await self.pending.before_add(owner.handle)
        async with self._locks.hold(owner.handle):
            await self._need_datastore()
            try:
                assigned = await self.d.ipam.assign(owner, conf.ipam, req.env.args.ips)
                addresses = await self.d.ipam.prefix_lengths(assigned, conf.ipam.address_prefix)
            except BaseException:
                await self._release_quietly(owner.handle)
                raise
        return render_result(ipam_result(addresses, conf.ipam, conf), conf)

    async def _release_quietly(self, handle: str) -> None:
        try:
            await self.d.ipam.release(handle)
        except Exception as e:
            self.log.error("rollback of %s: failed to release its addresses: %s", handle, e)

    async def ipam_delete(self, req: Request) -> None:
        owner = Owner.of(req.conf.name, req.env)
        async with self._locks.hold(owner.handle):
            await self.d.ipam.release(owner.handle)

    async def ipam_check(self, req: Request) -> None:
        conf = req.conf
        owner = Owner.of(conf.name, req.env)
        if conf.prev_result is None:
            raise CNIError(Code.INVALID_CONFIG, "CHECK needs prevResult")
        async with self._locks.hold(owner.handle):
            await self._check_ipam(owner.handle, [c.address.ip for c in conf.prev_result.ips])

    # ------------------------------------------------------------------ GC and STATUS

    async def gc(self, conf: NetConf) -> None:
        """Release every allocation of this node in this network whose attachment is not
        valid, and take down its interfaces and routes if a record of it is here."""
        if conf.valid_attachments is None:  # never read a missing list as "none is valid"
            raise CNIError(Code.INVALID_CONFIG, f"GC needs {VALID_ATTACHMENTS} (a list)")
        valid = frozenset(conf.valid_attachments)
        busy = self._locks.busy()
        stale = [r for r in self.records.values() if r.network == conf.name
                 and (r.container_id, r.ifname) not in valid and r.handle not in busy]  # fmt: skip
        for rec in stale:
            async with self._locks.hold(rec.handle):  # a DEL or ADD arriving now waits
                if self.records.get(rec.handle) is not rec:
                    continue  # deleted or rebuilt meanwhile: no longer what GC judged
                self.log.info("GC: removing attachment %s", rec.handle)
                await self._teardown(rec, rec.netns)
        for handle in await self.d.ipam.leaked(conf.name, valid, self._locks.busy()):
            async with self._locks.hold(handle):
                if handle in self.records:
                    continue  # an ADD took the handle meanwhile: its addresses are in use
                self.log.info("GC: releasing addresses of %s", handle)
                await self.d.ipam.release(handle)

    async def status(self, conf: NetConf) -> None:
        if not await self.d.datastore_ok():
            raise CNIError(Code.NOT_AVAILABLE, "the datastore (etcd) is not reachable")
        try:
            usable = await self.d.ipam.usable_pools(conf.ipam.pools)
        except Exception as e:
            raise CNIError(Code.NOT_AVAILABLE, f"failed to read the IP pools: {e}") from e
        if not usable:
            want = ", ".join(conf.ipam.pools) or "with a nodeSelector matching this node"
            raise CNIError(Code.NOT_AVAILABLE,
                           f"no enabled IP pool ({want}) can serve node {self.d.node}")  # fmt: skip


# ---------------------------------------------------------------------- helpers


def _host_nets(ips: tuple[IPInterface, ...]) -> list[IPNetwork]:
    return [ipaddress.ip_network((i.ip, i.ip.max_prefixlen)) for i in ips]


def _attachment(rec: Record) -> att.Attachment:
    return att.Attachment(container_id=rec.container_id, ifname=rec.ifname, netns=rec.netns,
                         ips=rec.ips, mtu=rec.mtu, sysctls=dict(rec.sysctls))  # fmt: skip
