"""Shared fixtures: real etcd servers from Debian's etcd-server, stopped by PID at the end.

One single-member etcd (data on tmpfs) serves the whole session; each test gets its own key
prefix, so tests never see each other's data. A 3-member cluster is started per module that
asks for it (failover tests kill and restart its members).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner, Result

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


@pytest.fixture
def cli(etcd_endpoints: list[str], prefix: str) -> Callable[..., Result]:
    """Run fabricctl in-process (CliRunner) against this test's prefix (``pfx=`` another);
    asserts the exit code (``code=``, 0 unless told)."""
    from fabric.cli.main import main

    runner = CliRunner()
    env = {"FABRIC_ETCD_ENDPOINTS": ",".join(etcd_endpoints), "FABRIC_PREFIX": prefix}

    def run(*args: str, input: str | None = None, code: int = 0, pfx: str = prefix) -> Result:
        r = runner.invoke(main, list(args), env={**env, "FABRIC_PREFIX": pfx}, input=input,
                          catch_exceptions=False)  # fmt: skip
        assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr)
        return r

    return run
