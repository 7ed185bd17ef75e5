"""The only door to ``nft``: a typed transaction builder and a reader of one table.

A ``Transaction`` collects typed commands (table, chain, set, map, rule, element; add, flush,
delete) for ONE table and renders them to the text of one ``nft -f -`` run. nft applies a
file as one kernel transaction: either every command takes effect, in one ruleset
generation that packets see at once, or none does and ``NftError`` carries nft's message.

``Nft.list_table`` reads ``nft -j list table`` back into the same typed objects (``SetDef``
with its elements in the text the builder renders, chains with their rules' comments and
counters), so a caller can diff what the kernel holds against what it wants and write only
the difference.

Names (tables, chains, sets) are checked against ``NAME``; strings that reach nft (comments,
interface names) are checked too: nothing a caller passes can break out of its statement.
Used by the NAT table (fabric.dataplane.nat) and the policy table
(fabric.dataplane.policy_table). Design: docs/design/policy.md, "Dataplane".
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.dataplane import libnft

NFT = "/usr/sbin/nft"
NSENTER = "/usr/bin/nsenter"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,254}")
_STRING = re.compile(r'[^"\\\n\r\x00-\x1f]*')
COMMENT_MAX = 127  # bytes nft keeps of a rule comment (NFTNL_UDATA_COMMENT_MAXLEN - 1)
ELEMENTS_PER_LINE = 2000  # keeps nft's parser's lines short in a big write

log = logging.getLogger("fabric.dataplane.nft")


class NftError(Exception):
    """nft refused a transaction or could not be run; ``stderr`` holds nft's own words.
    Nothing of a refused transaction was applied."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def check_name(name: str, what: str = "name") -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"nft {what} {name!r}: a letter, then letters, digits and '_'")
    return name


@functools.lru_cache(maxsize=1 << 14)
def quote(text: str) -> str:
    """``text`` as an nft string literal; ValueError for what nft cannot hold in one."""
    if not _STRING.fullmatch(text):
        raise ValueError(f"{text!r} cannot be an nft string (quotes, backslashes, controls)")
    return f'"{text}"'


@functools.lru_cache(maxsize=1 << 16)
def rule_id(label: str, text: str) -> str:
    """A rule's identity (``RuleDef.id``): memoised, every batch asks it of every rule."""
    data = f"{label}\0{text}".encode()
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class RuleDef:
    """One rule: ``text`` is its statements (matches, ``counter``, verdict) without the
    comment. Its identity ``id`` is a digest of ``label`` and ``text``; the comment written
    with it is ``label #id``, so a rule read back from the kernel is recognised by it."""

    text: str
    label: str = ""

    @property
    def id(self) -> str:
        return rule_id(self.label, self.text)

    @property
    def comment(self) -> str:
        room = COMMENT_MAX - len(self.id) - 2
        label = self.label.encode()[:room].decode(errors="ignore")
        return f"{label} #{self.id}" if label else f"#{self.id}"

    def render(self) -> str:
        return f"{self.text} comment {quote(self.comment)}"


@dataclass(frozen=True, slots=True)
class Hook:
    """A base chain's hook: ``type filter hook forward priority 0; policy accept;``."""

    hook: str
    type: str = "filter"
    priority: int = 0
    policy: str = "accept"

    def render(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"


@dataclass(frozen=True, slots=True)
class ChainDef:
    name: str
    rules: tuple[RuleDef, ...] = ()
    hook: Hook | None = None
    _ids: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", tuple(r.id for r in self.rules))

    def ids(self) -> tuple[str, ...]:  # computed once: every policy batch compares them
        return self._ids


@dataclass(frozen=True, slots=True)
class SetDef:
    """A named set, or a map when ``map_to`` is set (e.g. ``verdict``). ``type`` lists the
    key's data types (several: a concatenation). ``elements`` are rendered element texts
    (``10.0.0.0/24``, ``10.0.0.1 . tcp . 80``, ``"fab1" : jump in_x``): see ``element``."""

    name: str
    type: tuple[str, ...]
    flags: tuple[str, ...] = ()
    map_to: str | None = None
    elements: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return "map" if self.map_to else "set"

    def shape(self) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
        """What cannot change in place (a different shape means delete and add)."""
        return self.type, tuple(sorted(self.flags)), self.map_to

    def body(self) -> str:
        """``type ...; [flags ...;]`` as in a set declaration."""
        body = f"type {' . '.join(self.type)}"
        if self.map_to:
            body += f" : {self.map_to}"
        body += ";"
        if self.flags:
            body += f" flags {', '.join(self.flags)};"
        return body


# ---------------------------------------------------------------------- transactions


@dataclass(slots=True)
class Transaction:
    """Commands for table ``family name``, in order; ``render()`` is one ``nft -f`` file."""

    name: str
    family: str = "inet"
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name, "table")
        if self.family not in ("inet", "ip", "ip6", "arp", "bridge", "netdev"):
            raise ValueError(f"nft family {self.family!r}")

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def _t(self) -> str:
        return f"{self.family} {self.name}"

    def add_table(self) -> None:
        self.lines.append(f"add table {self._t}")

    def delete_table(self) -> None:
        self.lines.append(f"delete table {self._t}")

    def add_chain(self, chain: ChainDef) -> None:
        """Declare the chain (idempotent in nft); its rules are added with ``add_rules``."""
        check_name(chain.name, "chain")
        hook = f" {{ {chain.hook.render()} }}" if chain.hook else ""
        self.lines.append(f"add chain {self._t} {chain.name}{hook}")

    def flush_chain(self, name: str) -> None:
        self.lines.append(f"flush chain {self._t} {check_name(name, 'chain')}")

    def delete_chain(self, name: str) -> None:
        self.lines.append(f"delete chain {self._t} {check_name(name, 'chain')}")

    def add_rules(self, chain: str, rules: Iterable[RuleDef]) -> None:
        check_name(chain, "chain")
        self.lines.extend(f"add rule {self._t} {chain} {r.render()}" for r in rules)

    def add_set(self, s: SetDef) -> None:
        """Declare the set or map with no elements (add them with ``add_elements``)."""
        check_name(s.name, s.kind)
        self.lines.append(f"add {s.kind} {self._t} {s.name} {{ {s.body()} }}")

    def delete_set(self, s: SetDef) -> None:
        self.lines.append(f"delete {s.kind} {self._t} {check_name(s.name, s.kind)}")

    def flush_set(self, s: SetDef) -> None:
        self.lines.append(f"flush {s.kind} {self._t} {check_name(s.name, s.kind)}")

    def add_elements(self, s: str, elements: Iterable[str]) -> None:
        self._elements("add", s, elements)

    def delete_elements(self, s: str, elements: Iterable[str]) -> None:
        self._elements("delete", s, elements)

    def _elements(self, verb: str, s: str, elements: Iterable[str]) -> None:
        check_name(s, "set")
        batch = sorted(elements)
        for i in range(0, len(batch), ELEMENTS_PER_LINE):
            chunk = ", ".join(batch[i : i + ELEMENTS_PER_LINE])
            self.lines.append(f"{verb} element {self._t} {s} {{ {chunk} }}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


# ---------------------------------------------------------------------- elements


def element(value: Any, types: Sequence[str]) -> str:
    """An element as read from ``nft -j`` (a set's or a map's key) in the text the builder
    writes, so kernel and desired elements compare as strings."""
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"]["val"] if isinstance(value["elem"], dict) else value["elem"]
    if isinstance(value, dict) and "concat" in value:
        parts = value["concat"]
        return " . ".join(_scalar(p, t) for p, t in zip(parts, types, strict=False))
    return _scalar(value, types[0] if types else "")


def _scalar(v: Any, t: str) -> str:
    if isinstance(v, dict) and "prefix" in v:
        p = v["prefix"]
        return f"{p['addr']}/{p['len']}"
    if isinstance(v, dict) and "range" in v:
        a, b = v["range"]
        return f"{_scalar(a, t)}-{_scalar(b, t)}"
    if t == "ifname":
        return quote(str(v))
    return str(v)


def verdict(v: Mapping[str, Any]) -> str:
    """``{"jump": {"target": "x"}}`` -> ``jump x``; ``{"accept": null}`` -> ``accept``."""
    (kind, arg), *_ = v.items()
    if kind in ("jump", "goto"):
        return f"{kind} {arg['target']}"
    return str(kind)


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class ListedRule:
    handle: int
    comment: str
    packets: int
    bytes: int
    expr: str  # the rule's expressions as JSON without counter values (for drift checks)

    @property
    def id(self) -> str | None:
        """The id from a ``... #id`` comment (``RuleDef.comment``); None for others' rules."""
        m = re.search(r"#([0-9a-f]{12})$", self.comment)
        return m.group(1) if m else None

    @property
    def label(self) -> str:
        return re.sub(r"\s*#[0-9a-f]{12}$", "", self.comment)


@dataclass(frozen=True, slots=True)
class ListedChain:
    name: str
    hook: Hook | None
    rules: tuple[ListedRule, ...]

    def ids(self) -> tuple[str | None, ...]:
        return tuple(r.id for r in self.rules)


@dataclass(frozen=True, slots=True)
class Listing:
    """One table as the kernel holds it."""

    sets: Mapping[str, SetDef]
    chains: Mapping[str, ListedChain]


def parse_listing(doc: Mapping[str, Any]) -> Listing:
    """``nft -j list table`` output as a ``Listing``. Pure."""
    sets: dict[str, SetDef] = {}
    hooks: dict[str, Hook | None] = {}
    rules: dict[str, list[ListedRule]] = {}
    for item in doc.get("nftables", []):
        if "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            map_to = s.get("map") if "map" in item else None
            elems = frozenset(_listed_element(e, types) for e in s.get("elem", []))
            sets[s["name"]] = SetDef(
                s["name"], tuple(types), tuple(s.get("flags", ())), map_to, elems
            )
        elif "chain" in item:
            c = item["chain"]
            hook = None
            if "hook" in c:
                hook = Hook(c["hook"], c.get("type", "filter"), int(c.get("prio", 0)),
                            c.get("policy", "accept"))  # fmt: skip
            hooks[c["name"]] = hook
            rules.setdefault(c["name"], [])
        elif "rule" in item:
            r = item["rule"]
            packets = nbytes = 0
            expr = []
            for e in r.get("expr", []):
                if "counter" in e:
                    packets += int(e["counter"].get("packets", 0))
                    nbytes += int(e["counter"].get("bytes", 0))
                    expr.append({"counter": None})
                else:
                    expr.append(e)
            rules.setdefault(r["chain"], []).append(ListedRule(
                int(r.get("handle", 0)), r.get("comment", ""), packets, nbytes,
                json.dumps(expr, sort_keys=True)))  # fmt: skip
    chains = {n: ListedChain(n, hooks.get(n), tuple(rules.get(n, ()))) for n in hooks}
    return Listing(sets, chains)


def _listed_element(e: Any, types: list[str]) -> str:
    if isinstance(e, list):  # a map element: [key, data]
        key, data = e
        data_text = verdict(data) if isinstance(data, dict) else str(data)
        return f"{element(key, types)} : {data_text}"
    return element(e, types)


# ---------------------------------------------------------------------- running


class Nft:
    """Runs nft in ``netns`` (a name under /run/netns, a path, or None for our own).

    ``backend``: ``"lib"`` runs every command in process through libnftables
    (fabric.dataplane.libnft: one worker thread and context, calls serialized, off the event
    loop), ``"exec"`` execs ``nft`` (through ``nsenter`` for another netns), ``"auto"`` (the
    default) is ``lib`` for our own netns and the stock nft, ``exec`` otherwise. When the
    library cannot be loaded, ``lib`` falls back to exec (logged once per process). Both
    give the same output and the same ``NftError`` (nft's words; nothing applied)."""

    def __init__(self, netns: str | None = None, nft: str = NFT, backend: str = "auto") -> None:
        if backend not in ("auto", "lib", "exec"):
            raise ValueError(f"nft backend {backend!r}: auto, lib or exec")
        self.netns, self.nft = netns, nft
        self.runs = 0  # nft commands run so far, either backend: one per transaction or read
        self.execs = 0  # of those, how many exec'd the nft program
        self._worker: libnft.Worker | None = None
        self._own_worker = False
        wants_lib = backend == "lib" or (backend == "auto" and netns is None and nft == NFT)
        if wants_lib and _library_ok():
            if netns is None:
                self._worker = _own_netns_worker()
            else:
                self._worker = libnft.Worker(_netns_path(netns))
                self._own_worker = True

    @property
    def backend(self) -> str:
        """``lib`` or ``exec``: how the next command runs."""
        return "lib" if self._worker is not None else "exec"

    def close(self) -> None:
        """End this instance's worker thread (one made for another netns holds it open)."""
        if self._own_worker and self._worker is not None:
            self._worker.close()
        self._worker = None

    async def apply(self, tx: Transaction, what: str = "apply") -> None:
        """Run ``tx`` as one ``nft -f -``. NftError (nothing applied) when nft refuses."""
        if len(tx):
            await self.run(["-f", "-"], tx.render(), what=what, table=tx.name)

    async def list_table(self, name: str, family: str = "inet") -> Listing | None:
        """The table as the kernel holds it; None when it does not exist."""
        if not await self.exists(name, family):
            return None
        out = await self.run(["-j", "list", "table", family, check_name(name, "table")],
                             what="list", table=name)  # fmt: skip
        return parse_listing(json.loads(out))

    async def exists(self, name: str, family: str = "inet") -> bool:
        doc = json.loads(await self.run(["-j", "list", "tables", family], table=name))
        return any(t["table"]["name"] == name for t in doc.get("nftables", []) if "table" in t)

    async def run(
        self, args: list[str], stdin: str | None = None, what: str = "list", table: str = ""
    ) -> str:
        """One nft command line (``-f -`` reads ``stdin``); its stdout. NftError "failed to
        <what> nft table <table>: <nft's message>"."""
        command = _library_command(args, stdin) if self._worker is not None else None
        self.runs += 1
        if command is None or self._worker is None:
            return await self._exec(args, stdin, what, table)
        text, flags, script = command
        try:
            res = await self._worker.run(text, flags, script)
        except libnft.LibraryError as e:
            _warn_fallback(e)
            self._worker = None
            return await self._exec(args, stdin, what, table)
        except OSError as e:
            raise NftError(f"failed to {what} nft table {table}: {e}") from e
        if res.rc != 0:
            err = res.err.strip() or f"libnftables returned {res.rc}"
            raise NftError(f"failed to {what} nft table {table}: {_short(err)}", err)
        return res.out

    async def _exec(self, args: list[str], stdin: str | None, what: str, table: str) -> str:
        """One nft exec; its stdout."""
        argv = [self.nft, *args]
        if self.netns is not None:
            argv = [NSENTER, f"--net={_netns_path(self.netns)}", *argv]
        self.execs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise NftError(f"failed to {what} nft table {table}: {e}") from e
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            raise NftError(f"failed to {what} nft table {table}: {_short(text)}", text)
        return out.decode()


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/run/netns/{netns}"


def _library_command(args: list[str], stdin: str | None) -> tuple[str, int, bool] | None:
    """``args`` (nft's command line) as (command text, output flags, is a ``-f`` script) for
    libnftables; None for options it does not map (the command is then exec'd)."""
    flags, i = 0, 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in libnft.FLAGS:
            flags |= libnft.FLAGS[args[i]]
        elif args[i] == "-f" and args[i + 1 : i + 2] == ["-"] and len(args) == i + 2:
            return (stdin or "", flags, True)
        else:
            return None
        i += 1
    return (" ".join(args[i:]), flags, False) if i < len(args) else None


_own: libnft.Worker | None = None
_warned = False


def _own_netns_worker() -> libnft.Worker:
    """The process's one libnftables worker for its own netns (shared by every ``Nft``)."""
    global _own
    if _own is None:
        _own = libnft.Worker(None)
    return _own


def _library_ok() -> bool:
    try:
        libnft.load()
    except OSError as e:
        _warn_fallback(e)
        return False
    return True


def _warn_fallback(e: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("nft: libnftables cannot be used (%s): exec'ing %s instead", e, NFT)


def _short(text: str, limit: int = 600) -> str:
    """nft echoes the offending line of a refused file; keep the message readable."""
    return text if len(text) <= limit else text[:limit] + " ..."
