"""etcd over TLS with client certificates (``--client-cert-auth``), for real: certificates made
by the test with openssl (lab/tls.py), a loopback etcd that requires them, fabricctl and the
store through it; refused clients get one line naming the file and the reason, within the
deadline, never a traceback or gRPC's own log lines; no key material in the output."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam.errors import DatastoreUnavailable, ValidationError
from ipam.store import Store
from ipam.tls import TLSConfig
from lab import tls
from lab.etcd import EtcdCluster

FABRICCTL = str(Path(sys.executable).parent / "fabricctl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.PKI:
    return tls.make(tmp_path_factory.mktemp("pki"), [])


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tls.PKI:
    """Another CA, with its own client certificate: etcd trusts neither."""
    return tls.make(tmp_path_factory.mktemp("other"), [], cn="other")


@pytest.fixture(scope="module")
def etcd(pki: tls.PKI) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(size=1, tls=pki)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def ctl(etcd: EtcdCluster, *args: str, auth: dict[str, Path] | None = None,
        timeout: float = 3.0,
        urls: list[str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:  # fmt: skip
    """fabricctl with ``auth`` {"ca", "cert", "key"} files; (result, seconds)."""
    argv = [FABRICCTL, "--etcd-endpoints", ",".join(urls or etcd.urls), "--prefix",
            f"/tls-{os.getpid()}", "--timeout", str(timeout)]  # fmt: skip
    for flag, what in (("--etcd-cacert", "ca"), ("--etcd-cert", "cert"), ("--etcd-key", "key")):
        if what in (auth or {}):
            argv += [flag, str((auth or {})[what])]
    started = time.monotonic()
    r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120, check=False)
    return r, time.monotonic() - started


def key_material(pki: tls.PKI) -> list[str]:
    """Lines that must never appear in output: each key's PEM body, and the PEM header."""
    lines = ["PRIVATE KEY"]
    for k in (pki.client_key, pki.server_key, pki.dir / "ca-key.pem"):
        lines += [ln for ln in k.read_text().splitlines() if ln and not ln.startswith("-----")]
    return lines


def test_fabricctl_through_tls(etcd: EtcdCluster, pki: tls.PKI) -> None:
    auth = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
    r, _ = ctl(etcd, "pool", "add", "tls-pool", "--cidr", "10.250.0.0/16", auth=auth)
    assert r.returncode == 0, r.stderr
    for fmt in ("yaml", "json", "table"):
        r, _ = ctl(etcd, "pool", "list", "-o", fmt, auth=auth)
        assert r.returncode == 0 and "tls-pool" in r.stdout, r.stderr
        assert not [m for m in key_material(pki) if m in r.stdout + r.stderr]


@pytest.mark.parametrize("case", ["no client cert", "client cert of another CA",
                                  "server not trusted", "plain http"])  # fmt: skip
def test_a_refused_client_gets_one_line_naming_the_file(
    etcd: EtcdCluster, pki: tls.PKI, other: tls.PKI, case: str
) -> None:
    auth: dict[str, Path] = {
        "no client cert": {"ca": pki.ca},
        "client cert of another CA": {
            "ca": pki.ca,
            "cert": other.client_cert,
            "key": other.client_key,
        },
        "server not trusted": {"ca": other.ca, "cert": pki.client_cert, "key": pki.client_key},
        "plain http": {},
    }[case]
    want = {
        "no client cert": "requires a client certificate and none was given",
        "client cert of another CA": f"refused the client certificate {other.client_cert}",
        "server not trusted": f"is not trusted by {other.ca}",
        "plain http": "does etcd require TLS?",
    }[case]
    urls = [u.replace("https://", "") for u in etcd.urls] if case == "plain http" else None
    r, took = ctl(etcd, "pool", "list", timeout=2.0, urls=urls, auth=auth)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
    assert not [m for m in key_material(pki) + key_material(other) if m in r.stderr + r.stdout]
    assert took < 2.0 + 8.0  # the deadline; start-up of the CLI on a loaded 2-core machine


@pytest.mark.parametrize("case", ["key of another certificate", "CA file is a key"])
def test_unusable_files_are_named_before_connecting(
    etcd: EtcdCluster, pki: tls.PKI, other: tls.PKI, case: str
) -> None:
    if case == "CA file is a key":
        auth, want = {"ca": pki.client_key}, f"{pki.client_key}: not a PEM CA bundle"
    else:
        auth = {"ca": pki.ca, "cert": pki.client_cert, "key": other.client_key}
        want = f"{pki.client_cert} with key {other.client_key}: not a PEM certificate"
    r, _ = ctl(etcd, "pool", "list", auth=auth)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and want in lines[0], r.stderr
    assert not [m for m in key_material(pki) + key_material(other) if m in r.stderr]


def test_the_store_never_waits_past_its_deadline(etcd: EtcdCluster, pki: tls.PKI) -> None:
    async def attempt(cfg: TLSConfig) -> float:
        store = Store(etcd.urls, "/tls-deadline", cfg, deadline=1.5)
        started = time.monotonic()
        try:
            with pytest.raises(DatastoreUnavailable, match="client certificate"):
                await store.list("x/")
            return time.monotonic() - started
        finally:
            await store.close()

    assert asyncio.run(attempt(TLSConfig(pki.ca))) < 1.5 + 1.0
    with pytest.raises(ValidationError, match="needs its key"):
        TLSConfig(pki.ca, pki.client_cert).check()
