"""The house rules of the code base, read from the source (nothing is imported or run):
no import cycles, the rooms of fabric/ import only what their __init__ docstrings allow,
fabric/ keeps at most three modules at its top, and modules stay under 500 lines.

Every import counts, including ones inside functions and under TYPE_CHECKING: a cycle hidden
from the interpreter is still a cycle for the reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fabric", "bgp", "ipam", "cni", "lab")
MAX_LINES = 500
# Modules allowed over MAX_LINES, each with the reason no honest seam was found.
OVER_LIMIT: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> Iterator[str]:
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            found = _resolve(t)
            if found and found != module:
                yield found


GRAPH = {m: set(_imports(m)) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(GRAPH):
        if start in index:
            continue
        work = [(start, iter(sorted(GRAPH[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(GRAPH[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    assert _cycles() == []


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fabric" and len(parts) > 2 else module


# (importer prefix, forbidden prefixes): the rules of ARCHITECTURE.md and fabric/__init__.py
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    ("ipam", ("fabric", "bgp", "cni", "lab")),
    ("bgp", ("fabric", "ipam", "cni", "lab")),
    ("cni", ("fabric", "ipam", "bgp", "lab")),
    ("fabric", ("lab",)),
    ("fabric.dataplane", ("fabric.agent", "fabric.workloads", "fabric.resources",
                          "fabric.cli", "fabric.policy", "fabric.errors", "fabric.unit",
                          "fabric.explain")),
    ("fabric.cli", ("fabric.agent", "fabric.dataplane", "fabric.workloads")),
    ("fabric.workloads", ("fabric.agent", "fabric.cli")),
    ("fabric.resources", ("fabric.agent", "fabric.cli", "fabric.dataplane", "fabric.workloads")),
    ("fabric.policy", ("fabric.agent", "fabric.cli", "fabric.dataplane", "fabric.workloads")),
    ("fabric.explain", ("fabric.agent", "fabric.cli", "fabric.dataplane", "fabric.workloads")),
]  # fmt: skip
# Allowed although a rule above forbids it, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("fabric.dataplane.policy_table", "fabric.policy.model"):
        "the compiled NetworkPolicy is pure data: the contract the policy table renders",
    ("fabric.dataplane.policy_counters", "fabric.policy.model"):
        "the policy table's per-rule counters name the same contract's Direction",
}  # fmt: skip


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_rooms_import_only_what_they_may() -> None:
    bad = []
    for module, targets in GRAPH.items():
        for importer, forbidden in FORBIDDEN:
            if _under(module, importer):
                bad += [f"{module} -> {t}" for t in targets
                        if any(_under(t, f) for f in forbidden) and (module, t) not in ALLOWED]  # fmt: skip
    assert sorted(set(bad)) == []


def test_fabric_top_level_is_small() -> None:
    top = sorted(p.name for p in (ROOT / "fabric").glob("*.py"))
    assert len(top) <= 3, top


@pytest.mark.parametrize(
    "room", ["agent", "cli", "dataplane", "explain", "policy", "resources", "workloads"]
)
def test_every_room_says_what_it_owns(room: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "fabric" / room / "__init__.py").read_text()))
    assert doc and "import" in doc, f"fabric/{room}/__init__.py must say what it may import"


def test_modules_stay_under_500_lines() -> None:
    over = {
        m: n
        for m, f in MODULES.items()
        if (n := len(f.read_text().splitlines())) > MAX_LINES and m not in OVER_LIMIT
    }
    assert over == {}, f"split these where a real seam is, or name the reason: {over}"
