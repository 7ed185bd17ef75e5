#!/usr/bin/python3 -IS
"""fabric CNI plugin: forwards the request to fabricd and prints its answer.

Installed by `fabricctl cni install` as a module beside two stubs, ``fabric`` and
``fabric-ipam``, that import it (from the .pyc written at install time: a script is compiled
at every exec, ~1 ms) and call :func:`run` with fabricd's socket and their name
(``FABRIC_CNI_SOCKET`` overrides the socket, for tests). Run directly, it is the same plugin
with SOCKET and PLUGIN as written below. The interpreter runs isolated and without site
(-IS) and this file imports only ``posix`` and ``_socket``, the C halves of os and socket
(``import os`` costs ~0.8 ms per exec, mostly _collections_abc for os.environ; socket.py
~5 ms of enums; ``json`` ~20 ms).
The work (IPAM in etcd, netlink) happens in the warm daemon. Framing: cni/protocol.py.
Answered here without fabricd:

- VERSION (runtimes call it with dummy values in the other variables);
- fabricd unreachable: error 11 (try again later), or 50 for STATUS, within CONNECT_TIMEOUT;
  no answer within REPLY_TIMEOUT: error 11;
- DEL while fabricd is unreachable (or gone mid-request): the request, framed exactly as it
  would have been sent, is written durably to a new file in PENDING (fabricd's state dir,
  ``pending-del/``; temporary file, fsync, rename, fsync of the directory) and the answer is
  success, so the runtime can remove the sandbox and its netns. fabricd finishes every such
  DEL before it serves an ADD of the same attachment (docs/design/cni.md). Without PENDING
  (an old install) or when the file cannot be written: error 11 as before;
- a missing or unknown CNI_COMMAND: error 4.
"""

import _socket as socket  # socket's C core: the same calls, without socket.py's 5 ms of enum
import posix  # os's C core: read, write, environ (bytes), times, _exit
import time  # built in (no file to load): time_ns for the recorded DEL's name

SOCKET = "/run/fabric/cni.sock"
PLUGIN = "fabric"
PENDING = ""  # where a DEL is recorded while fabricd is unreachable ("": not recorded)
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
MAGIC = b"FCN1"
MAX_STDIN = 4 << 20  # larger: fabricd is told (flag 1) and answers with an I/O error
MAX_REPLY = 16 << 20
CONNECT_TIMEOUT = 1.0  # a unix connect either succeeds at once or fabricd is not there
REPLY_TIMEOUT = 60.0  # fabricd answers within its own request timeout (50 s) before this


def escape(text: str) -> str:
    """``text`` as the inside of a JSON string, ASCII only."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o > 0xFFFF:
            o -= 0x10000
            out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out)


def error(code: int, msg: str, details: str = "", version: str = LATEST) -> bytes:
    doc = f'{{"cniVersion": "{escape(version)}", "code": {code:d}, "msg": "{escape(msg)}"'
    if details:
        doc += f', "details": "{escape(details)}"'
    return (doc + "}").encode("ascii")


def version_of(stdin: bytes) -> str:
    """The config's cniVersion when it is one we support (a cheap scan, not a parse)."""
    at = stdin.find(b'"cniVersion"')
    if at < 0:
        return LATEST
    rest = stdin[at + 12 : at + 64].lstrip()
    if rest[:1] != b":":
        return LATEST
    rest = rest[1:].lstrip()
    if rest[:1] != b'"':
        return LATEST
    value = rest[1:].split(b'"', 1)[0].decode("ascii", "replace")
    return value if value in VERSIONS else LATEST


def read_stdin() -> tuple[bytes, bool]:
    """(stdin, too large); a stdin larger than MAX_STDIN is not read to its end."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = posix.read(0, 1 << 20)
        except OSError:
            return b"", False
        if not chunk:
            return b"".join(chunks), False
        total += len(chunk)
        if total > MAX_STDIN:
            return b"", True
        chunks.append(chunk)


def request(stdin: bytes, too_large: bool) -> bytes:
    env = [k + b"=" + v for k, v in posix.environ.items() if k.startswith(b"CNI_")]
    env.append(b"FABRIC_CNI_PLUGIN=" + PLUGIN.encode())
    blob = b"\0".join(env)
    head = MAGIC + bytes([1 if too_large else 0])
    return head + len(blob).to_bytes(4, "big") + len(stdin).to_bytes(4, "big") + blob + stdin


def exchange(path: str, data: bytes) -> tuple[int, bytes]:
    """Send one request, return (exit code, stdout); OSError when fabricd does not answer."""
    deadline = posix.times().elapsed + REPLY_TIMEOUT
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(CONNECT_TIMEOUT)
        s.connect(path)
        s.settimeout(REPLY_TIMEOUT)
        s.sendall(data)
        buf = b""
        need = 9
        while len(buf) < need:
            left = deadline - posix.times().elapsed
            if left <= 0:
                raise TimeoutError(f"no answer within {REPLY_TIMEOUT:.0f} s")
            s.settimeout(left)
            chunk = s.recv(max(65536, need - len(buf)))
            if not chunk:
                raise ConnectionResetError("fabricd closed the connection without an answer")
            buf += chunk
            if len(buf) >= 9 and need == 9:
                if buf[:4] != MAGIC:
                    raise ConnectionResetError("not a fabricd answer")
                need = 9 + min(int.from_bytes(buf[5:9], "big"), MAX_REPLY)
        return buf[4], buf[9:need]
    finally:
        s.close()


def mkdirs(path: str) -> None:
    """``path`` and its missing parents, mode 0700."""
    try:
        posix.mkdir(path, 0o700)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = path.rsplit("/", 1)[0]
        if not parent or parent == path:
            raise
        mkdirs(parent)
        try:  # noqa: SIM105 (contextlib costs an import at every exec)
            posix.mkdir(path, 0o700)
        except FileExistsError:
            pass


def record(directory: str, data: bytes) -> None:
    """Write ``data`` as a new file in ``directory`` (created 0700 with its parents if
    missing): temporary name, fsync, rename, fsync of the directory. Raises OSError."""
    mkdirs(directory)
    name = f"{time.time_ns():020d}.{posix.getpid()}.del"
    tmp = f"{directory}/.{name}.tmp"
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[posix.write(fd, view) :]
        posix.fsync(fd)
    finally:
        posix.close(fd)
    try:
        posix.rename(tmp, f"{directory}/{name}")
    except OSError:
        posix.unlink(tmp)
        raise
    fd = posix.open(directory, posix.O_RDONLY)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


def getenv(name: str) -> str:
    """``name``'s value as os.environ would give it ("" when unset)."""
    return posix.environ.get(name.encode(), b"").decode("utf-8", "surrogateescape")


def write(data: bytes) -> None:
    while data:
        try:
            n = posix.write(1, data)
        except OSError:
            return
        data = data[n:]


def main() -> int:
    command = getenv("CNI_COMMAND")
    stdin, too_large = read_stdin()
    if command == "VERSION":
        versions = ", ".join(f'"{v}"' for v in VERSIONS)
        write(f'{{"cniVersion": "{LATEST}", "supportedVersions": [{versions}]}}'.encode())
        return 0
    # the compiled front (cni/front.c) sent the request and got no answer: it hands over
    # stdin and why, and this answers as for an unreachable fabricd without sending again
    failed = getenv("FABRIC_CNI_FRONT_FAILED")
    too_large = too_large or getenv("FABRIC_CNI_FRONT_TOO_LARGE") == "1"
    version = version_of(stdin)
    if command not in VERBS:
        known = ", ".join((*VERBS, "VERSION"))
        what = f"{command!r} is not one of {known}" if command else "is not set"
        write(error(4, "CNI_COMMAND " + what, version=version))
        return 1
    path = getenv("FABRIC_CNI_SOCKET") or SOCKET
    data = request(stdin, too_large)
    try:
        if failed:
            raise ConnectionResetError(failed)
        code, out = exchange(path, data)
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        if command == "DEL" and PENDING:
            try:
                record(PENDING, data)
                return 0  # fabricd finishes it before an ADD of this attachment
            except OSError as e2:
                why += f"; recording the DEL in {PENDING} failed: {e2.strerror or e2}"
        if command == "STATUS":
            msg = "fabric is not available: fabricd does not answer"
            write(error(50, msg, f"{path}: {why}", version))
        else:
            msg = "fabricd is not reachable; try again later"
            write(error(11, msg, f"{path}: {why}", version))
        return 1
    write(out)
    return code


def run(socket_path: str, plugin: str, pending: str = "") -> None:
    """The installed stub's entry: this module is imported from its install-time .pyc."""
    global SOCKET, PLUGIN, PENDING
    SOCKET, PLUGIN, PENDING = socket_path, plugin, pending
    posix._exit(main())


if __name__ == "__main__":
    posix._exit(main())  # stdout is written unbuffered; skip the interpreter's teardown
