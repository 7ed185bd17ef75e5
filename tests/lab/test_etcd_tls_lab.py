"""A two-rack lab whose etcd requires TLS and client certificates (``Lab(tls=True)``,
``python -m lab up --tls``, ``python -m lab.demo --tls``): fabricd on every host and fabricctl
work through it (the demo's checks), a client without a certificate or with one of another CA
is refused in one line, and no key material appears in fabricd's logs or in `-o yaml`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab_checks import lab_name

from lab import tls
from lab.control import BIN
from lab.demo import Demo
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.fixture(scope="module")
def lab(need_root: None) -> Iterator[Lab]:
    lab = Lab("two-rack", name=lab_name("tls"), tls=True)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def key_lines(pki: tls.PKI) -> list[str]:
    lines = ["PRIVATE KEY"]
    for k in (pki.client_key, pki.server_key, pki.dir / "ca-key.pem"):
        lines += [ln for ln in k.read_text().splitlines() if ln and not ln.startswith("-----")]
    return lines


def test_the_demo_checks_pass_on_a_tls_lab(lab: Lab) -> None:
    cfg = lab.fabricd_config_path("node1").read_text()
    assert "https://" in cfg and "certFile" in cfg and "http://" not in cfg
    demo = Demo(lab)
    demo.steps()
    failed = [what for what, ok in demo.checks if not ok]
    assert demo.checks and not failed, failed


def test_refused_clients_and_no_key_material(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = lab.pki
    assert pki is not None
    other = tls.make(tmp_path_factory.mktemp("other"), [], cn="other")
    eps = ",".join(f"https://{e}" for e in lab.etcd_endpoints)
    ctl = [str(BIN / "fabricctl"), "--etcd-endpoints", eps, "--timeout", "2"]
    for extra, want in (
        (["--etcd-cacert", str(pki.ca)], "requires a client certificate and none was given"),
        (["--etcd-cacert", str(pki.ca), "--etcd-cert", str(other.client_cert), "--etcd-key",
          str(other.client_key)], f"refused the client certificate {other.client_cert}"),
    ):  # fmt: skip
        r = lab.exec("node1", [*ctl, *extra, "pool", "list"], timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr
    secrets = key_lines(pki)
    outputs = []
    for args in (["bgp", "status", "-o", "yaml"], ["node", "list", "-o", "yaml"],
                 ["get", "IPPool", "-o", "yaml"], ["ipam", "show", "-o", "json"]):  # fmt: skip
        r = lab.fabricctl(args)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    for host in lab.nodes("node"):
        outputs.append((lab.dir / host / "fabricd.out").read_text(errors="replace"))
    for m in lab.etcd.members if lab.etcd else []:
        outputs.append(m.log_path.read_text(errors="replace"))
    leaked = [s for s in secrets for text in outputs if s in text]
    assert not leaked, leaked[:3]
