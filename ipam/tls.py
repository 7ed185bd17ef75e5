"""TLS to etcd: the client's files, checked before the first connection, and what a failed
handshake means, in words that name the file to look at.

gRPC reports a refused handshake as an unavailable endpoint with a terse detail (``Unwrap
failed (TSI_DATA_CORRUPTED)`` when the server sent an alert, ``CERTIFICATE_VERIFY_FAILED``
when the client did not trust the server) and writes its own lines to stderr; the store
turns the detail into one sentence (``diagnose``) and gRPC's own logging is off
(``GRPC_VERBOSITY=NONE`` unless set, in ipam/store.py). Key material is never read into a
message: files are named, never shown.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ipam.errors import ValidationError


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cacert: Path | None = None  # None: the system's trust store
    cert: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        """Raise ValidationError naming the file when one cannot be used: missing,
        unreadable, not PEM, a key that does not match its certificate, only one of the two."""
        if (self.cert is None) != (self.key is None):
            have, need = ("cert", "key") if self.key is None else ("key", "cert")
            raise ValidationError(have, f"a client {have} needs its {need} too", "etcd TLS")
        for field, path in (("cacert", self.cacert), ("cert", self.cert), ("key", self.key)):
            if path is not None:
                try:
                    path.read_bytes()
                except OSError as e:
                    raise ValidationError(field, f"{path}: {e.strerror}", "etcd TLS") from e
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.cacert is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.cacert))
            except (ssl.SSLError, ValueError) as e:
                raise ValidationError("cacert", f"{self.cacert}: not a PEM CA bundle ({_why(e)})",
                                      "etcd TLS") from e  # fmt: skip
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (ssl.SSLError, ValueError) as e:
                raise ValidationError(
                    "cert", f"{self.cert} with key {self.key}: not a PEM certificate and its "
                    f"matching unencrypted key ({_why(e)})", "etcd TLS") from e  # fmt: skip

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) as gRPC takes them; ``check`` first."""
        self.check()
        return tuple(p.read_bytes() if p else None for p in (self.cacert, self.key, self.cert))  # type: ignore[return-value]


def _why(e: Exception) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e) or type(e).__name__


def diagnose(detail: str, endpoint: str, tls: TLSConfig | None) -> str | None:
    """One sentence for a connection failure that is about TLS, naming the file to look at;
    None for anything else (etcd down, refused, unreachable)."""
    if tls is None:
        if "Socket closed" in detail or "Connection reset" in detail:
            return (f"{endpoint} closed the connection at once: does etcd require TLS? "
                    "(https:// endpoints, --etcd-cacert/--etcd-cert/--etcd-key)")  # fmt: skip
        return None
    ca = str(tls.cacert) if tls.cacert else "the system trust store"
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        why = detail.split("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":", maxsplit=1)[0].strip()
        return f"the certificate of {endpoint} is not trusted by {ca} ({why or 'not verified'})"
    if "Peer name" in detail and "not in peer certificate" in detail:
        return f"the certificate of {endpoint} does not name that address (subjectAltName)"
    if (
        "TSI_DATA_CORRUPTED" in detail
        or "BAD_CERTIFICATE" in detail
        or "CERTIFICATE_REQUIRED" in detail
    ):
        if tls.cert is None:
            return (f"{endpoint} refused the TLS handshake: it requires a client certificate "
                    "and none was given (--etcd-cert/--etcd-key, etcd.certFile/keyFile)")  # fmt: skip
        return (f"{endpoint} refused the client certificate {tls.cert} (bad certificate: not "
                "signed by a CA that etcd trusts, or expired)")  # fmt: skip
    if "handshake" in detail.lower() or "SSL" in detail:
        return f"TLS handshake with {endpoint} failed ({detail.strip()}); CA file: {ca}"
    if "Socket closed" in detail:
        return (f"{endpoint} closed the connection during the TLS handshake (is it an https "
                f"endpoint? does it trust the client certificate {tls.cert}?)")  # fmt: skip
    return None
