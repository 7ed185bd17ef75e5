"""rr: three hosts in AS 64512 peering only with a BIRD route reflector (mesh off): every
host has every other host's block."""

from __future__ import annotations

import pytest
from fabric_helpers import allocate, status

from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab: Lab = make_lab("rr")
    lab.start_fabric()
    return lab


def test_route_reflector_plan_all_routes_present(lab: Lab) -> None:
    blocks = {h: allocate(lab, h, f"t.{h}.eth0")[0][1] for h in HOSTS}
    for h in HOSTS:
        doc = status(lab, h)
        assert [s["peerIP"] for s in doc["sessions"]] == [str(lab.node(h).neighbors[0].address)]
        assert doc["sessions"][0]["type"] == "node specific"
    for owner, block in blocks.items():
        nh = lab.address(owner)
        for other in HOSTS:
            if other != owner:
                lab.wait_for(
                    lambda o=other, b=block, n=nh: (
                        f"via {n} " in lab.kernel_routes(o).get(b, "") + " "
                    ),
                    30,
                    what=f"{block} via {owner} on {other}",
                )
