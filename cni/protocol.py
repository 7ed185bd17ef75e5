"""The framing between the plugin shim and fabricd on the unix socket. Standard library only.

One request and one reply per connection, both length-prefixed (big-endian)::

    request:  b"FCN1" | flags (1 byte) | env length (4) | stdin length (4) | env | stdin
    reply:    b"FCN1" | exit code (1 byte) | stdout length (4) | stdout

``env`` is ``KEY=VALUE`` entries separated by NUL: the ``CNI_*`` variables, plus
``FABRIC_CNI_PLUGIN`` (``fabric`` or ``fabric-ipam``, baked into each installed binary).
Flag bit 0 (``STDIN_TOO_LARGE``): stdin was larger than MAX_STDIN, so the shim sent none of it
and fabricd answers with an I/O error. The shim (cni/shim.py) carries its own copy of the
client side, because the installed file may import nothing but os, sys and socket; a test
keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MAGIC = b"FCN1"
HEADER = 13  # magic, flags, env length, stdin length
REPLY_HEADER = 9  # magic, exit code, stdout length
STDIN_TOO_LARGE = 1
# A network config is a few KiB; a runtime's cached prevResult with many interfaces stays far
# below this. Anything larger is refused rather than buffered.
MAX_STDIN = 4 << 20
MAX_ENV = 64 << 10
MAX_STDOUT = 16 << 20
PLUGIN_VAR = "FABRIC_CNI_PLUGIN"


class FramingError(Exception):
    """A frame that is not ours, or longer than allowed."""


@dataclass(frozen=True, slots=True)
class Header:
    flags: int
    env_len: int
    stdin_len: int


def encode_request(env: Mapping[str, str], stdin: bytes, flags: int = 0) -> bytes:
    blob = b"\0".join(f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items())
    return (
        MAGIC
        + bytes([flags])
        + len(blob).to_bytes(4, "big")
        + len(stdin).to_bytes(4, "big")
        + blob
        + stdin
    )


def decode_header(raw: bytes) -> Header:
    """The fixed part of a request; FramingError for a foreign or oversized frame."""
    if len(raw) != HEADER or raw[:4] != MAGIC:
        raise FramingError("not a fabric CNI request")
    h = Header(raw[4], int.from_bytes(raw[5:9], "big"), int.from_bytes(raw[9:13], "big"))
    if h.env_len > MAX_ENV:
        raise FramingError(f"environment of {h.env_len} bytes is larger than {MAX_ENV}")
    if h.stdin_len > MAX_STDIN:
        raise FramingError(f"stdin of {h.stdin_len} bytes is larger than {MAX_STDIN}")
    return h


def decode_env(blob: bytes) -> dict[str, str]:
    env = {}
    for entry in blob.split(b"\0"):
        key, eq, value = entry.partition(b"=")
        if eq:
            env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def encode_reply(code: int, stdout: bytes) -> bytes:
    if not 0 <= code <= 255:
        raise ValueError(f"exit code {code} out of range")
    return MAGIC + bytes([code]) + len(stdout).to_bytes(4, "big") + stdout


def decode_reply(raw: bytes) -> tuple[int, bytes]:
    """(exit code, stdout) of a complete reply; FramingError otherwise."""
    if len(raw) < REPLY_HEADER or raw[:4] != MAGIC:
        raise FramingError("not a fabric CNI reply")
    n = int.from_bytes(raw[5:9], "big")
    if len(raw) != REPLY_HEADER + n:
        raise FramingError(f"reply of {len(raw) - REPLY_HEADER} bytes, header says {n}")
    return raw[4], raw[REPLY_HEADER:]
