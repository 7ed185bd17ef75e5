"""Lab fixtures: a real lab (namespaces, etcd, FRR, BIRD) per test module, always torn down.

Lab names carry the test run's PID so a test run never collides with a developer's lab.
Tests that build labs need root; they are skipped (with the reason) otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from lab_checks import lab_name

from lab.runner import Lab


@pytest.fixture(scope="module")
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")


@pytest.fixture(scope="module")
def make_lab(need_root: None) -> Iterator[Callable[[str], Lab]]:
    """Factory: ``make_lab("two-rack")`` brings a lab up; every lab is downed at module end."""
    labs: list[Lab] = []

    def make(topology: str) -> Lab:
        lab = Lab(topology, name=lab_name(topology))
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()
