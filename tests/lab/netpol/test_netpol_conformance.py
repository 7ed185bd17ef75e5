"""NetworkPolicy conformance on the upstream model, in the two-rack lab.

One lab for every case: fabricd on the four hosts of both racks, nine pods x/a ... z/c
attached through the installed CNI plugin with their Namespace and Pod objects applied
(lab/netpol.py). Each case of netpol_cases.py applies its policies with ``fabricctl apply``,
checks every matrix (polled until it matches or 10 s, as upstream), prints the truth table
when one does not match, then deletes its policies, puts the original labels back and waits
until everything is reachable again before the next case.

At the end the module prints the tally: cases passed and cells as expected (a cell is one
ordered pod pair of one checked matrix; pod-to-itself cells are never compared, IPv6 cells
only between pods of one host: the lab's routers carry IPv4 only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fabric_helpers import fabric_lab
from netpol_cases import CASES, Case

from lab import netpol
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
TALLY: dict[str, Any] = {"cases": {}, "cells": 0, "cells_ok": 0}
OUT = Path(__file__).resolve().parents[3] / "lab" / "out"


@pytest.fixture(scope="module")
def world(make_lab) -> Iterator[netpol.World]:  # type: ignore[no-untyped-def]
    lab: Lab = fabric_lab(make_lab, "two-rack")
    w = netpol.World(lab)
    try:
        w.build()
        yield w
    finally:
        w.close()


def summary() -> str:
    """The tally line (conftest.py prints it at the end of the run) and its JSON file."""
    cases = TALLY["cases"]
    if not cases:
        return ""
    passed = sum(1 for v in cases.values() if v == "passed")
    skipped = sum(1 for v in cases.values() if v.startswith("skipped"))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "netpol-conformance.json").write_text(json.dumps(TALLY, indent=1) + "\n")
    return (f"netpol conformance: {passed}/{len(cases) - skipped} cases passed"
            f" ({skipped} skipped), {TALLY['cells_ok']}/{TALLY['cells']} cells as expected")  # fmt: skip


def test_model_is_up(world: netpol.World) -> None:
    """Nine pods on every host of both racks, each with an IPv4 and an IPv6 address, and
    before any policy every pod reaches every other on TCP and UDP 80 and 81 (IPv6: within
    each host)."""
    hosts = {p.host for p in world.pods.values()}
    assert hosts == set(world.lab.nodes("node")), hosts
    assert all(set(p.ips) == {4, 6} for p in world.pods.values())
    r = world.reachability()
    for proto in world.protocols:
        for port in netpol.PORTS:
            for fam in (4, 6):
                res = world.validate(r, port, proto, fam, timeout=30)
                assert res.ok, res.table()


def _case_id(case: Case) -> str:
    return f"{case.origin}:{case.name}"


def _cleanup(world: netpol.World, applied: dict[str, dict[str, Any]], relabelled: bool) -> None:
    """Delete the case's policies and put the original labels back (the next case checks
    first that everything is reachable again)."""
    if applied:
        world.delete(applied.values())
    if relabelled:
        world.apply(world.baseline())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conformance(world: netpol.World, case: Case) -> None:
    key = _case_id(case)
    if "sctp" in case.needs and not world.sctp:
        TALLY["cases"][key] = "skipped: no SCTP"
        pytest.skip("this kernel has no SCTP (socket(IPPROTO_SCTP) fails): SCTP probes skipped")
    TALLY["cases"][key] = "failed"
    clean = world.validate(world.reachability(), 80, "TCP")
    assert clean.ok, "before the case, after the previous one was cleaned up:\n" + clean.table()
    values = netpol.address_values(world)
    applied: dict[str, dict[str, Any]] = {}
    relabelled = False
    try:
        for n, step in enumerate(case.steps, start=1):
            if step.apply:
                docs = [netpol.substitute(d, values) for d in step.apply]
                world.apply(docs)
                applied.update({_name(d): d for d in docs})
            if step.delete:
                docs = [netpol.substitute(d, values) for d in step.delete]
                world.delete(docs)
                for d in docs:
                    applied.pop(_name(d), None)
            for kind, target, changes in step.label:
                world.label(kind, target, changes)
                relabelled = True
            for chk in step.checks:
                expect = world.reachability()
                for src, dst, ok in chk.expect:
                    expect.expect(src, dst, ok)
                res = world.validate(expect, chk.port, chk.protocol, chk.family)
                TALLY["cells"] += len(res.compared)
                TALLY["cells_ok"] += len(res.compared) - len(res.wrong)
                assert res.ok, f"step {n}: {res.table()}"
        TALLY["cases"][key] = "passed"
    finally:
        _cleanup(world, applied, relabelled)


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"
