"""One scratch network namespace for a kernel test: ``scratch_netns(prefix, setup)`` skips
the test when not root, creates ``<prefix><4 hex digits>``, runs ``setup`` (``ip -batch``
lines) in it, yields its name and deletes it, pass or fail."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence

import pytest

from lab import netns as labns

# a veth pair v0/v1 inside the namespace, v0 addressed (v4 and v6): the route tests' setup
VETH_PAIR = (
    "link set lo up",
    "link add v0 type veth peer name v1",
    "link set v0 up",
    "link set v1 up",
    "addr add 10.78.0.1/24 dev v0",
    "addr add fd78::1/112 dev v0 nodad",
)


@contextlib.contextmanager
def scratch_netns(prefix: str, setup: Sequence[str] = ()) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"{prefix}{secrets.token_hex(2)}"
    labns.add(name)
    try:
        if setup:
            labns.batch(name, list(setup))
        yield name
    finally:
        labns.delete(name)
