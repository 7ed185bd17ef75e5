"""The policy table's snapshot: the last table fabricd wrote, kept in its state directory,
restored with ONE ``nft -f`` when fabricd starts and the kernel has no table of its own.

Why: a fabricd that starts while its table is absent (deleted by hand or by a firewall
reload while fabricd was down) needs ~1 s of imports, etcd reads and a full compile before
its first write; pods would be unprotected for that long. The snapshot closes that gap to
one nft transaction, run before anything heavy is imported (this module imports only the
standard library). The first compile from etcd then reads the kernel's table and repairs
only what changed since the snapshot was written (docs/design/policy.md, "Snapshot").

Safety, each enforced here:
- never over an existing table: the script's first command is ``create table``, which nft
  refuses when the table exists, and the file is one transaction (all or nothing), so the
  check and the restore are one kernel transaction with no race;
- only fabricd's own table: every line is checked to be ``create table`` / ``add ...`` on
  ``inet <table>``; nothing else reaches nft;
- versioned and verified: a header with the format version, table, node and the SHA-256 of
  the body; a file that does not match (truncated, corrupt, another node's, another
  version) is ignored with the reason, never raised;
- written atomically (temporary file, fsync, rename); nft reads the very file that was
  checked (the open descriptor, ``/dev/fd/N``: a rename meanwhile cannot swap it).

Imports only light parts of the standard library (fabricd imports it before anything else:
no dataclasses, no subprocess; nft is spawned with ``os.posix_spawn``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

VERSION = 1
TABLE = "fabric_filter"  # fabric.dataplane.policy_table.TABLE (not imported: too heavy here)
MAGIC = "# fabricd policy snapshot"
FILENAME = "policy-table.nft"
NFT = "/usr/sbin/nft"
NSENTER = "/usr/bin/nsenter"
RESTORE_TIMEOUT = 30.0


class SnapshotError(Exception):
    """A snapshot file that must not be applied (the reason is the message)."""


class Restored:
    """What ``restore`` did: ``applied`` (the table was absent and is now the snapshot's),
    else ``reason`` says why not, and ``warn`` when that is a problem (a snapshot that is
    corrupt or foreign, nft refusing it) rather than the ordinary case (no snapshot, the
    table in the kernel); ``written`` is the snapshot's time (epoch seconds)."""

    __slots__ = ("applied", "reason", "seconds", "size", "warn", "written")

    def __init__(self, applied: bool, reason: str, seconds: float = 0.0, written: float = 0.0,
                 size: int = 0, warn: bool = False) -> None:  # fmt: skip
        self.applied, self.reason, self.seconds = applied, reason, seconds
        self.written, self.size, self.warn = written, size, warn

    def __repr__(self) -> str:
        return f"Restored(applied={self.applied}, reason={self.reason!r})"


def path_in(state_dir: Path | str) -> Path:
    return Path(state_dir) / FILENAME


def encode(script: str, table: str, node: str, written: float | None = None) -> str:
    """The file for ``script``: the full-table transaction fabricd rendered (its first line
    ``add table inet <table>``, then only ``add`` commands on that table). ValueError for a
    script that is not one."""
    lines = script.splitlines()
    if not lines or lines[0] != f"add table inet {table}":
        raise ValueError(f"a snapshot starts with 'add table inet {table}'")
    body = "\n".join([f"create table inet {table}", *lines[1:]]) + "\n"
    _check_body(body, table)
    when = time.time() if written is None else written
    digest = hashlib.sha256(body.encode()).hexdigest()
    head = (f"{MAGIC}\n# version: {VERSION}\n# table: inet {table}\n# node: {node}\n"
            f"# written: {when:.3f}\n# sha256: {digest}\n")  # fmt: skip
    return head + body


def decode(text: str, table: str, node: str) -> tuple[str, float]:
    """(the body to give ``nft -f``, when it was written); SnapshotError with the reason."""
    head, body = _split(text)
    want = {"version": str(VERSION), "table": f"inet {table}", "node": node}
    for key, value in want.items():
        if head.get(key) != value:
            raise SnapshotError(f"{key} is {head.get(key)!r}, not {value!r}")
    if hashlib.sha256(body.encode()).hexdigest() != head.get("sha256"):
        raise SnapshotError("its SHA-256 does not match its content (truncated or corrupt)")
    try:
        written = float(head.get("written", ""))
    except ValueError:
        raise SnapshotError("its written time is not a number") from None
    _check_body(body, table)
    return body, written


def _split(text: str) -> tuple[dict[str, str], str]:
    if not text.startswith(MAGIC + "\n"):
        raise SnapshotError("not a fabricd policy snapshot")
    head: dict[str, str] = {}
    rest = text[len(MAGIC) + 1 :]
    while rest.startswith("# "):
        line, _, rest = rest.partition("\n")
        key, sep, value = line[2:].partition(": ")
        if not sep:
            raise SnapshotError(f"bad header line {line!r}")
        head[key] = value
    return head, rest


def _check_body(body: str, table: str) -> None:
    """Only ``create table inet <table>`` first, then ``add <what> inet <table> ...``."""
    lines = body.splitlines()
    if not lines or lines[0] != f"create table inet {table}":
        raise SnapshotError(f"its first command is not 'create table inet {table}'")
    for n, line in enumerate(lines[1:], 2):
        parts = line.split(" ", 4)
        if (len(parts) < 5 or parts[0] != "add" or parts[2:4] != ["inet", table]
                or parts[1] not in ("set", "map", "chain", "rule", "element")):  # fmt: skip
            raise SnapshotError(f"line {n} is not an 'add' on inet {table}: {line[:80]!r}")


def save(path: Path, text: str) -> None:
    """Write ``text`` (``encode``'s) to ``path`` atomically: a reader sees the old file or
    the new one, never a part (and a crash leaves at most a stray temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def restore(
    path: Path, table: str, node: str, nft: str = NFT, netns: str | None = None
) -> Restored:
    """Apply the snapshot at ``path`` when the kernel has no table ``inet <table>``, in one
    ``nft -f`` transaction (in network namespace ``netns``, a name under /run/netns, if
    given: tests). Never raises: every reason not to apply is in the result."""
    started = time.monotonic()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Restored(False, f"no snapshot at {path}")
    except OSError as e:
        return Restored(False, f"cannot read snapshot {path}: {e}", warn=True)
    try:
        try:
            text = _read_all(fd).decode("utf-8")
            written = decode(text, table, node)[1]
        except SnapshotError as e:
            return Restored(False, f"ignoring snapshot {path}: {e}", warn=True)
        except (OSError, UnicodeDecodeError) as e:
            return Restored(False, f"cannot read snapshot {path}: {e}", warn=True)
        try:  # the header is nft comments: nft reads the checked file itself, from its start
            os.lseek(fd, 0, os.SEEK_SET)
            os.set_inheritable(fd, True)
            argv = [nft, "-f", f"/dev/fd/{fd}"]
            if netns is not None:
                argv = [NSENTER, f"--net=/run/netns/{netns}", *argv]
            rc, err = _run(argv)
        except OSError as e:
            return Restored(False, f"cannot run {nft}: {e}", warn=True)
    finally:
        os.close(fd)
    seconds = time.monotonic() - started
    if rc != 0:
        if "File exists" in err:  # ``create table``: the kernel holds one (adopted as ever)
            return Restored(False, f"table inet {table} is in the kernel", seconds, written)
        return Restored(False, f"nft refused snapshot {path}: {err.strip()[:400]}", seconds,
                        written, warn=True)  # fmt: skip
    return Restored(True, "restored", seconds, written, len(text))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _run(argv: list[str]) -> tuple[int, str]:
    """Run ``argv`` (inheritable descriptors inherited), stdin /dev/null, stdout and stderr
    collected; (exit status, their text). Bounded by RESTORE_TIMEOUT (then killed)."""
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_DUP2, w, 2),
        ])  # fmt: skip
    finally:
        os.close(w)
        os.close(null)
    out = b""
    deadline = time.monotonic() + RESTORE_TIMEOUT
    try:
        os.set_blocking(r, False)
        while True:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                out += chunk
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                out += _drain(r)
                return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return -9, f"nft did not finish within {RESTORE_TIMEOUT:.0f} s"
            time.sleep(0.001)
    finally:
        os.close(r)


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk
