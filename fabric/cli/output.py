"""Rendering for fabricctl: tables (plain like ``calicoctl get``, boxed like ``calicoctl ipam
show``), JSON and YAML. Pure functions from data to text; no click, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from functools import cache
from typing import Any


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


FORMATS = [str(f) for f in Format]

Row = Sequence[object]


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Row]) -> str:
    """Columns separated by three spaces, headers in capitals (``calicoctl get`` style)."""
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = [headers, *cells]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def boxed(headers: Sequence[str], rows: Iterable[Row], right: Sequence[int] = ()) -> str:
    """A table with ``+---+`` borders (``calicoctl ipam show`` style); headers centred,
    columns whose index is in ``right`` right-aligned."""
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "| " + " | ".join(h.center(w) for h, w in zip(headers, widths, strict=True)) + " |"
    out = [sep, head, sep]
    for r in cells:
        out.append(
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )
    out.append(sep)
    return "\n".join(out)


def properties(items: Iterable[tuple[str, object]]) -> str:
    """``key: value`` lines, keys aligned."""
    pairs = [(k, _cell(v)) for k, v in items]
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}".rstrip() for k, v in pairs)


def percent(part: int, whole: int) -> str:
    """``5 (8%)``, rounded as calicoctl does (to the nearest whole percent)."""
    pct = round(100 * part / whole) if whole else 0
    return f"{part} ({pct}%)"


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


@cache
def _dumper() -> type:
    """A SafeDumper with block style, keys in the order given and no aliases. PyYAML is
    imported on first use: table output (the default) never needs it."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return Dumper


def _dump(data: Any, **kw: Any) -> str:
    import yaml

    return str(yaml.dump(data, Dumper=_dumper(), default_flow_style=False, sort_keys=False, **kw))


def to_yaml(data: Any) -> str:
    return _dump(data).rstrip()


def to_yaml_documents(docs: Sequence[Mapping[str, Any]]) -> str:
    """Several YAML documents separated by ``---`` (valid input for ``apply -f``)."""
    return "".join(_dump(dict(d), explicit_start=True) for d in docs).rstrip()


def structured(data: Any, fmt: Format) -> str:
    """``data`` as JSON or YAML."""
    if fmt is Format.JSON:
        return to_json(data)
    if fmt is Format.YAML:
        return to_yaml(data)
    raise ValueError(f"{fmt} is not a structured format")
