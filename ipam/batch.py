"""Coalescing of assignments that arrive together on one node into one transaction.

A node starting many pods at once sends many CNI ADDs in parallel. Committed one by one they
would all pick the node's current block and lose compare-and-swaps against each other;
coalesced, they cost one block write for the whole group. Requests for a node queue up while
a commit is in flight; the next commit takes everything queued (up to MAX_BATCH, one request
per handle) and plans each request on the in-memory result of the previous ones: the batch's
own staged blocks, which the allocator reads before its cache and which no fresh read of etcd
replaces (a re-read of the node's blocks, or of every block to borrow, once the staged block
is full, used to put etcd's older copy back and hand the staged addresses out again). The
allocator's cache is written only after the commit succeeded.

Any failure of a combined commit (a lost compare, an exhausted pool for one of the requests)
falls back to committing the requests one by one through the allocator, so every request gets
exactly the answer it would have had alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ipam import keys
from ipam.allocator import Allocator, Staged
from ipam.blocks import Handle
from ipam.commit import AssignedIP, Choice, addresses, settings_compares
from ipam.errors import IPAMError
from ipam.request import AssignRequest, validate_request
from ipam.resources import Settings, dumps
from ipam.store import Cmp, Op

# Large enough to absorb a burst of pod starts, small enough to keep one transaction (and its
# block values) well under etcd's request size limit.
MAX_BATCH = 32

Item = tuple[AssignRequest, "asyncio.Future[list[AssignedIP]]"]


@dataclass
class _Staged:
    req: AssignRequest
    choices: list[Choice]
    seqs: list[int]


class BatchingAllocator:
    """``assign`` has the contract of ``Allocator.auto_assign``, coalescing per node."""

    def __init__(self, alloc: Allocator) -> None:
        self.alloc = alloc
        self._queues: dict[str, list[Item]] = {}
        self._drainers: dict[str, asyncio.Task[None]] = {}
        self.batches = 0  # combined commits that succeeded, for metrics

    async def assign(self, req: AssignRequest) -> list[AssignedIP]:
        validate_request(req)
        fut: asyncio.Future[list[AssignedIP]] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(req.node, []).append((req, fut))
        if req.node not in self._drainers:
            self._drainers[req.node] = asyncio.create_task(self._drain(req.node))
        return await fut

    async def _drain(self, node: str) -> None:
        queue = self._queues[node]
        try:
            while queue:
                batch: list[Item] = []
                rest: list[Item] = []
                seen: set[str] = set()
                for item in queue:
                    if len(batch) < MAX_BATCH and item[0].handle not in seen:
                        batch.append(item)
                        seen.add(item[0].handle)
                    else:
                        rest.append(item)
                queue[:] = rest
                try:
                    await self._run(batch)
                except BaseException as e:  # a bug, or cancellation: never leave a caller hanging
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    raise
        finally:
            del self._drainers[node]

    async def _run(self, batch: list[Item]) -> None:
        results = None
        if len(batch) > 1:
            try:
                results = await self._commit_together([req for req, _ in batch])
            except IPAMError:
                results = None
        if results is not None:
            self.batches += 1
            for (_, fut), res in zip(batch, results, strict=True):
                fut.set_result(res)
            return
        for req, fut in batch:  # one by one: each gets its own answer or error
            try:
                fut.set_result(await self.alloc.auto_assign(req))
            except IPAMError as e:
                fut.set_exception(e)

    async def _commit_together(self, reqs: list[AssignRequest]) -> list[list[AssignedIP]] | None:
        a = self.alloc
        s = await a.settings()
        blocks: Staged = {}  # cidr -> (revision read, block with the batch's assignments)
        staged: list[_Staged] = []
        for req in reqs:
            choices = await a.plan(s, req, blocks)
            for c in choices:
                cidr = c.block.cidr
                if cidr in blocks and blocks[cidr][0] != c.rev:
                    return None  # planned on another revision of a staged block: one by one
                blocks[cidr] = (c.rev, c.block)  # later requests plan on top of this one
            staged.append(_Staged(req, choices, [c.block.seq for c in choices]))
        r = await a.store.txn(*self._txn(s, staged, blocks))
        if not r.succeeded:
            a.conflicts += 1
            return None
        for cidr, (_, blk) in blocks.items():
            a._cache[cidr] = (r.revision, blk)
        return [
            [ip for c, seq in zip(st.choices, st.seqs, strict=True)
             for ip in addresses(c, seq, st.req.handle)]
            for st in staged
        ]  # fmt: skip

    def _txn(
        self, settings: Settings, staged: list[_Staged], blocks: Staged
    ) -> tuple[list[Cmp], list[Op]]:
        cmps: list[Cmp] = []
        ops = []
        pools = set()
        for cidr, (rev, blk) in blocks.items():
            cmps.append(Cmp.mod(keys.block(cidr), rev))
            ops.append(Op.put(keys.block(cidr), blk.dumps()))
        for st in staged:
            handle = Handle(st.req.handle)
            for c in st.choices:
                handle = handle.plus(c.block.cidr, len(c.ordinals))
                pools.add(c.pool.name)
            cmps.append(Cmp.absent(keys.handle(st.req.handle)))
            ops.append(Op.put(keys.handle(st.req.handle), dumps(handle.to_json())))
        cmps += settings_compares(settings, pools)
        return cmps, ops
