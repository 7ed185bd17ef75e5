"""Shared fixtures: real etcd servers from Debian's etcd-server, stopped by PID at the end.

One single-member etcd (data on tmpfs) serves the whole session; each test gets its own key
prefix, so tests never see each other's data. A 3-member cluster is started per module that
asks for it (failover tests kill and restart its members).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from lab.etcd import EtcdCluster


def _need_etcd() -> None:
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: run `make deps` (scripts/install-deps.sh)")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    _need_etcd()
    cluster = EtcdCluster(size=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_endpoints(etcd_server: EtcdCluster) -> list[str]:
    return etcd_server.endpoints


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"/fabric-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_env(etcd_endpoints: list[str], prefix: str) -> dict[str, str]:
    """Environment for running fabricctl against this test's etcd prefix."""
    return {
        **os.environ,
        "FABRIC_ETCD_ENDPOINTS": ",".join(etcd_endpoints),
        "FABRIC_PREFIX": prefix,
    }


@pytest.fixture(scope="module")
def etcd_cluster3() -> Iterator[EtcdCluster]:
    _need_etcd()
    cluster = EtcdCluster(size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
