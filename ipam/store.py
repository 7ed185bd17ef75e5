"""The etcd v3 datastore: the only module that talks to etcd.

Built on aetcd's generated gRPC stubs (see docs/adr/0001-etcd-client.md) with what no Python
client does by itself:

- a list of endpoints: on an unavailable endpoint the store rotates to the next one and
  retries the same request until ``deadline`` runs out, then raises DatastoreUnavailable;
- full transaction responses (the txn revision is the new mod revision of every key it wrote,
  which the allocator caches to make the common allocation one round trip);
- watches that survive an etcd restart or failover: re-created from the last seen
  revision + 1 on any stream error (see ``watch``);
- one long-lived lease keepalive stream per lease.

Retrying a compare-and-swap transaction after an ambiguous failure is safe: if the first
attempt was applied, the compare fails on the retry and the caller re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# gRPC's C core writes its own lines to stderr for each failed handshake (one line per
# retry): the store reports failures itself, in one line (ipam/tls.py). GRPC_VERBOSITY set by
# the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# gRPC's fork support (on by default in grpcio builds) runs handlers around every fork() and
# restarts its event-engine threads in the child, where they were seen to crash (segfaults of
# "event_engine" threads in forked children). Nothing here forks and keeps running Python
# gRPC; the user's setting wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
from aetcd import rpc

from ipam.errors import DatastoreUnavailable, IPAMError
from ipam.tls import TLSConfig, diagnose

log = logging.getLogger("ipam.store")

DEFAULT_PREFIX = "/fabric/v1"
# One RPC may take this long before the endpoint is considered unavailable: an etcd leader
# election takes about 1-2 s here, so 3 s lets a request ride one out on the same member.
RPC_TIMEOUT = 3.0
# How long one store call keeps trying across endpoints before it gives up.
DEFAULT_DEADLINE = 20.0

_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
# etcd's words for a request a leader change cut short, sent as UNKNOWN (seen while the
# leader of a 3-member cluster was killed: "context deadline exceeded"): its outcome is as
# unknown as after DEADLINE_EXCEEDED, and the same retry on the next endpoint applies
_TRANSIENT_UNKNOWN = ("context deadline exceeded", "request timed out", "leader changed",
                      "no leader")  # fmt: skip


def transient(e: grpc.aio.AioRpcError) -> bool:
    """True for an RPC failure worth retrying on the next endpoint."""
    if e.code() in _UNAVAILABLE:
        return True
    details = e.details() or ""
    return e.code() == grpc.StatusCode.UNKNOWN and any(w in details for w in _TRANSIENT_UNKNOWN)


def _cancelling() -> bool:
    """True when the running task itself is being cancelled. grpc.aio raises CancelledError
    in every call on a channel that is closed (another call rotated endpoints): that one is
    an unavailable endpoint to retry, not a cancellation to obey."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


@dataclass(frozen=True, slots=True)
class KV:
    key: str  # relative to the store prefix
    value: bytes
    mod: int
    create: int
    version: int
    lease: int = 0


class Target(StrEnum):
    MOD = "mod"
    VERSION = "version"
    CREATE = "create"
    VALUE = "value"


@dataclass(frozen=True, slots=True)
class Cmp:
    """One transaction comparison: ``target(key) op value`` (over a prefix when ``prefix``)."""

    key: str
    target: Target
    op: str
    value: int | bytes
    prefix: bool = False

    @classmethod
    def mod(cls, key: str, rev: int) -> Cmp:
        """Unchanged since it was read at ``rev`` (0 = absent)."""
        if rev == 0:
            return cls(key, Target.VERSION, "==", 0)
        return cls(key, Target.MOD, "==", rev)

    @classmethod
    def absent(cls, key: str) -> Cmp:
        return cls(key, Target.VERSION, "==", 0)

    @classmethod
    def prefix_unchanged_since(cls, prefix: str, rev: int) -> Cmp:
        """No key under ``prefix`` was created or modified after revision ``rev``."""
        return cls(prefix, Target.MOD, "<", rev + 1, prefix=True)


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # put | delete | get
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @classmethod
    def put(cls, key: str, value: bytes, lease: int = 0) -> Op:
        return cls("put", key, value, lease)

    @classmethod
    def delete(cls, key: str) -> Op:
        return cls("delete", key)

    @classmethod
    def get(cls, key: str, prefix: bool = False) -> Op:
        return cls("get", key, prefix=prefix)


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # For each "get" op of the branch that ran, the key-values it returned.
    gets: tuple[tuple[KV, ...], ...] = ()


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    kv: KV


_OPS = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS,
        ">": rpc.Compare.GREATER}  # fmt: skip


def _range_end(key: bytes) -> bytes:
    """The end of the range of every key starting with ``key``."""
    b = bytearray(key)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


class Store:
    """An etcd client over a list of endpoints, with keys relative to ``prefix``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        tls: TLSConfig | None = None,
        deadline: float = DEFAULT_DEADLINE,
        rpc_timeout: float = RPC_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.removeprefix("http://").removeprefix("https://") for e in endpoints]
        self.prefix = prefix.rstrip("/") + "/"
        self.tls = tls
        self.deadline = deadline
        self.rpc_timeout = rpc_timeout
        self._idx = 0
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._maint: Any = None
        self.errors = 0  # unavailable endpoints seen, for metrics

    # connection ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._idx]

    def _connect(self) -> None:
        if self._channel is not None:
            return
        target = self.endpoint
        # No limit on a response's size (etcd's own client sets math.MaxInt32): gRPC's default
        # 4 MiB refused a watch catching up on the IPAM blocks (one response carries every
        # event since the watcher's revision, ~5 MB at 5,000 pods), and the stream's error
        # closed the channel with every other watch on it, again and again (a policy change
        # reached fabricd 0.1-1 s late: docs/bench.md, policy).
        opts = [("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 5000),
                ("grpc.max_receive_message_length", -1)]  # fmt: skip
        if self.tls is not None:
            creds = grpc.ssl_channel_credentials(*self.tls.read())
            self._channel = grpc.aio.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._maint = rpc.MaintenanceStub(self._channel)

    async def _rotate(self, failed: grpc.aio.Channel | None) -> None:
        """Move to the next endpoint after a failure on channel ``failed``. Only when that is
        still the current channel: closing a channel cancels every call on it, so a call that
        failed on a channel another call already replaced must not close the new one."""
        if failed is None or failed is not self._channel:
            return
        self.errors += 1
        ch, self._channel = self._channel, None
        self._idx = (self._idx + 1) % len(self.endpoints)
        if ch is not None:
            with contextlib.suppress(Exception):
                await ch.close()

    async def close(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, fn: Any, deadline: float | None = None) -> Any:
        """Run ``fn()`` (one RPC), rotating endpoints on unavailability until the deadline."""
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        attempt = 0
        why: BaseException
        detail = ""
        while True:
            self._connect()
            ch = self._channel
            try:
                # never past the deadline: an attempt started just before it would otherwise
                # run its whole rpc_timeout (a 5 s --timeout took 8 s against a TLS refusal)
                return await asyncio.wait_for(fn(), max(end - time.monotonic(), 0.05))
            except TimeoutError as e:  # keep what the previous attempt said (a TLS refusal)
                why, detail = e, detail or f"no answer within {self.rpc_timeout:g} s"
            except grpc.aio.AioRpcError as e:
                if not transient(e):
                    raise IPAMError(
                        f"failed to {what}: etcd said {e.code().name}: {e.details()}"
                    ) from e
                why, detail = e, f"{e.code().name} {e.details()}"
            except asyncio.CancelledError as e:
                if _cancelling():
                    raise
                why, detail = e, "the channel was closed under the call"
            attempt += 1
            if time.monotonic() >= end:
                tls = diagnose(detail, self.endpoint, self.tls)
                raise DatastoreUnavailable(
                    f"failed to {what}: {tls}"
                    if tls
                    else f"failed to {what}: no etcd endpoint "
                    f"answered ({', '.join(self.endpoints)}): {detail}"
                ) from why
            await self._rotate(ch)
            if attempt >= len(self.endpoints):
                # Every endpoint failed once: wait a little (jittered) before the next round.
                await asyncio.sleep(min(0.05 * attempt, 0.5) * (0.5 + random.random()))

    def _k(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _kv_of(self, kv: Any) -> KV:
        return KV(
            key=kv.key.decode()[len(self.prefix) :],
            value=kv.value,
            mod=kv.mod_revision,
            create=kv.create_revision,
            version=kv.version,
            lease=kv.lease,
        )

    # key-value -------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        req = rpc.RangeRequest(key=self._k(key))
        resp = await self._call(
            f"read {key}", lambda: self._kv.Range(req, timeout=self.rpc_timeout)
        )
        return self._kv_of(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        """Every key under ``prefix``, and the revision the listing was read at."""
        k = self._k(prefix)
        req = rpc.RangeRequest(key=k, range_end=_range_end(k), keys_only=keys_only)
        resp = await self._call(
            f"list {prefix}", lambda: self._kv.Range(req, timeout=self.rpc_timeout)
        )
        return [self._kv_of(kv) for kv in resp.kvs], int(resp.header.revision)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        req = rpc.PutRequest(key=self._k(key), value=value, lease=lease)
        resp = await self._call(f"write {key}", lambda: self._kv.Put(req, timeout=self.rpc_timeout))
        return int(resp.header.revision)

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        k = self._k(key)
        req = rpc.DeleteRangeRequest(key=k, range_end=_range_end(k) if prefix else b"")
        resp = await self._call(
            f"delete {key}", lambda: self._kv.DeleteRange(req, timeout=self.rpc_timeout)
        )
        return int(resp.deleted)

    def _compare(self, c: Cmp) -> Any:
        m = rpc.Compare(key=self._k(c.key), result=_OPS[c.op])
        if c.prefix:
            m.range_end = _range_end(self._k(c.key))
        if c.target is Target.MOD:
            m.target = rpc.Compare.MOD
            m.mod_revision = int(c.value)
        elif c.target is Target.VERSION:
            m.target = rpc.Compare.VERSION
            m.version = int(c.value)
        elif c.target is Target.CREATE:
            m.target = rpc.Compare.CREATE
            m.create_revision = int(c.value)
        else:
            m.target = rpc.Compare.VALUE
            m.value = bytes(c.value)
        return m

    def _request(self, op: Op) -> Any:
        k = self._k(op.key)
        if op.kind == "put":
            return rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=op.value, lease=op.lease))
        if op.kind == "delete":
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))
        end = _range_end(k) if op.prefix else b""
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=k, range_end=end))

    async def txn(
        self, compare: Iterable[Cmp], success: Iterable[Op], failure: Iterable[Op] = ()
    ) -> TxnResult:
        """One etcd transaction: ``success`` if every comparison holds, else ``failure``."""
        req = rpc.TxnRequest(
            compare=[self._compare(c) for c in compare],
            success=[self._request(o) for o in success],
            failure=[self._request(o) for o in failure],
        )
        resp = await self._call(
            "commit transaction", lambda: self._kv.Txn(req, timeout=self.rpc_timeout)
        )
        gets = tuple(
            tuple(self._kv_of(kv) for kv in r.response_range.kvs)
            for r in resp.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), gets)

    async def status(self, deadline: float | None = None) -> dict[str, int]:
        resp = await self._call(
            "read etcd status",
            lambda: self._maint.Status(rpc.StatusRequest(), timeout=self.rpc_timeout),
            deadline,
        )
        return {"leader": int(resp.leader), "member": int(resp.header.member_id),
                "revision": int(resp.header.revision)}  # fmt: skip

    # leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call(
            "grant lease",
            lambda: self._lease.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=self.rpc_timeout
            ),
        )
        return int(resp.ID)

    async def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(IPAMError):
            await self._call(
                "revoke lease",
                lambda: self._lease.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease), timeout=self.rpc_timeout
                ),
            )

    async def keep_alive(self, lease: int, interval: float) -> AsyncIterator[int]:
        """Keep ``lease`` alive on one long-lived stream; yields the TTL etcd grants each time.

        Yields 0 when etcd reports the lease gone (expired): the caller must grant a new one.
        Reconnects (rotating endpoints) when the stream breaks.
        """
        while True:
            self._connect()
            ch = self._channel

            async def requests() -> AsyncIterator[Any]:
                while True:
                    yield rpc.LeaseKeepAliveRequest(ID=lease)
                    await asyncio.sleep(interval)

            try:
                async for resp in self._lease.LeaseKeepAlive(requests()):
                    yield int(resp.TTL)
                    if resp.TTL <= 0:
                        return
            except grpc.aio.AioRpcError:
                await self._rotate(ch)
                await asyncio.sleep(min(interval, 1.0))
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                await asyncio.sleep(min(interval, 1.0))  # another call rotated: reconnect

    # watches ---------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Every change under ``prefix`` from ``start_revision`` on, surviving etcd restarts.

        On a stream error the watch is re-created from the last revision delivered + 1 (no
        event lost or repeated), on the next endpoint only if this one looks gone: moving
        closes the channel and cancels every call on it. If etcd compacted the history the
        caller needs, raises IPAMError: the caller must resync with a full list."""
        next_rev = start_revision
        k = self._k(prefix)
        while True:
            self._connect()
            ch = self._channel
            create = rpc.WatchRequest(
                create_request=rpc.WatchCreateRequest(
                    key=k, range_end=_range_end(k), start_revision=next_rev
                )
            )
            stop, rotate = asyncio.Event(), True  # a stream closed without a word: rotate

            async def requests(
                create: Any = create, stop: asyncio.Event = stop
            ) -> AsyncIterator[Any]:
                yield create
                await stop.wait()

            try:
                async for resp in self._watch.Watch(requests()):
                    if resp.compact_revision:
                        raise IPAMError(
                            f"failed to watch {prefix}: history compacted at {resp.compact_revision}"
                        )
                    if resp.canceled:
                        rotate = any(w in resp.cancel_reason for w in _TRANSIENT_UNKNOWN)
                        log.warning("etcd cancelled the watch of %s: %s", prefix,
                                    resp.cancel_reason or "no reason given")  # fmt: skip
                        break
                    for ev in resp.events:
                        kv = self._kv_of(ev.kv)
                        t = EventType.DELETE if ev.type == rpc.Event.DELETE else EventType.PUT
                        next_rev = kv.mod + 1
                        yield Event(t, kv)
            except grpc.aio.AioRpcError as e:  # re-created below; said, so a loop shows
                rotate = transient(e)
                log.warning("watch of %s failed (%s: %s); watching again from revision %d",
                            prefix, e.code().name, e.details(), next_rev)  # fmt: skip
            except asyncio.CancelledError:
                if _cancelling():
                    raise
            finally:
                stop.set()
            if rotate:
                await self._rotate(ch)
            await asyncio.sleep(0.2 * (0.5 + random.random()))
