"""Certificates for an etcd that requires TLS and client certificates (``--client-cert-auth``),
made with Debian's ``openssl``: a CA, a server certificate for the given addresses, a client
certificate. For tests and TLS labs only: keys are unencrypted files, mode 0600, in the
directory given (the lab's, or a test's temporary one)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"
DAYS = "3"  # a lab lives for hours


class PKIError(RuntimeError):
    """openssl failed (its last stderr line says why)."""


@dataclass(frozen=True, slots=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                       check=False)  # fmt: skip
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise PKIError(f"openssl {args[0]} failed: {last}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path.name, cwd=path.parent)  # fmt: skip
    path.chmod(0o600)


def _sign(d: Path, name: str, subject: str, ext: str) -> None:
    _key(d / f"{name}-key.pem")
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-key", f"{name}-key.pem", "-subj", subject, "-out", f"{name}.csr",
             cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-days", DAYS, "-extfile", f"{name}.ext", "-out", f"{name}.pem",
             cwd=d)  # fmt: skip


def at(d: Path) -> PKI:
    """The files ``make`` writes in ``d`` (made or not)."""
    return PKI(d, d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem",
               d / "client-key.pem")  # fmt: skip


def make(d: Path, addresses: list[str], cn: str = "fabric-lab") -> PKI:
    """A CA (``<cn> CA``), a server certificate valid for ``addresses`` (IPs; 127.0.0.1 and
    localhost always) and a client certificate, in ``d`` (created 0700)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _key(d / "ca-key.pem")
    _openssl("req", "-x509", "-new", "-key", "ca-key.pem", "-subj", f"/CN={cn} CA", "-days",
             DAYS, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d)  # fmt: skip
    sans = ",".join(["DNS:localhost", "IP:127.0.0.1", *(f"IP:{a}" for a in addresses)])
    _sign(d, "server", f"/CN={cn} etcd",
          f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"
          "keyUsage=critical,digitalSignature,keyEncipherment\n")  # fmt: skip
    _sign(d, "client", f"/CN={cn} client",
          "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")  # fmt: skip
    return at(d)
