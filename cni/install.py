"""What `fabricctl cni install` writes: the two plugin binaries and the network config list.

Each plugin is a compiled front (cni/front.c, built here with the machine's C compiler) that
does the common path itself, connect, send, print the answer, and execs the Python plugin for
everything else (VERSION, fabricd unreachable, a DEL to record): a short stub in
``<bin-dir>/.fabric-shim`` that imports the shim (cni/shim.py) installed there with its .pyc,
compiled by the plugins' interpreter at install time (a script is compiled at every exec, ~1
ms of a ~7.5 ms start; a module's .pyc is not). Without a C compiler (or with
``compiled=False``) the stub itself is the plugin, as before the front existed: every exec
then pays the interpreter's start (~7-9 ms; the front, well under 1 ms).

Pure rendering plus atomic writes (temporary file in the target directory, fsync, rename),
so a runtime reading the directory never sees half a file, and a plugin being replaced keeps
running from its old inode. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import protocol, shim

SHIM = Path(__file__).with_name("shim.py")
FRONT = Path(__file__).with_name("front.c")
CC_FLAGS = ("-O2", "-s", "-Wall", "-Werror")
SHIM_DIR = ".fabric-shim"  # in --bin-dir; hidden, so no runtime takes it for a plugin
SHIM_MODULE = "fabric_cni_shim"
# run by the plugins' interpreter: the .pyc must be its own (magic number, cache tag)
_COMPILE = "import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)"
COMPILE_TIMEOUT = 60.0
PLUGINS = ("fabric", "fabric-ipam")
CONFLIST = "10-fabric.conflist"
REFERENCE_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
REFERENCE_PLUGINS = ("portmap", "bandwidth", "loopback")
DEFAULT_PYTHON = "/usr/bin/python3"  # never PATH's python3 (a pyenv shim costs 200+ ms)
# podman 4.3's libcni and Debian's reference plugins speak up to 1.0.0; a config at 1.1.0
# would make them refuse to chain.
DEFAULT_CNI_VERSION = "1.0.0"
# fabricd's state dir holds this directory: the plugins record a DEL there while fabricd is
# unreachable (cni/shim.py), fabricd finishes those DELs (fabric/workloads/pending.py)
PENDING_DIR = "pending-del"
DEFAULT_STATE_DIR = Path("/var/lib/fabric")  # cni.stateDir's default in fabricd.yaml
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
_SOCKET_LINE = re.compile(r'^SOCKET = ".*"$', re.M)
_PLUGIN_LINE = re.compile(r'^PLUGIN = ".*"$', re.M)
_PENDING_LINE = re.compile(r'^PENDING = "[^"]*"', re.M)


def plugin_source(socket_path: str, plugin: str, python: str = DEFAULT_PYTHON,
                  pending: str = "") -> str:  # fmt: skip
    """``plugin`` (fabric or fabric-ipam) talking to ``socket_path`` as one standalone
    script (what the stubs run, without the install-time .pyc); ``pending``: where it records
    a DEL while fabricd is unreachable ("": it does not)."""
    if plugin not in PLUGINS:
        raise ValueError(f"unknown plugin {plugin!r}")
    check_socket_path(socket_path)
    _check_python(python)
    text = SHIM.read_text()
    first, _, rest = text.partition("\n")
    rest, n1 = _SOCKET_LINE.subn(f"SOCKET = {json.dumps(socket_path)}", rest, count=1)
    rest, n2 = _PLUGIN_LINE.subn(f"PLUGIN = {json.dumps(plugin)}", rest, count=1)
    rest, n3 = _PENDING_LINE.subn(f"PENDING = {json.dumps(pending)}", rest, count=1)
    if not first.startswith("#!") or n1 != 1 or n2 != 1 or n3 != 1:
        raise RuntimeError(f"{SHIM} lost its shebang, SOCKET, PLUGIN or PENDING line")
    return f"#!{python} -IS\n{rest}"


def stub_source(socket_path: str, plugin: str, shim_dir: Path,
                python: str = DEFAULT_PYTHON, pending: str = "") -> str:  # fmt: skip
    """The installed text of ``plugin``: import the compiled shim from ``shim_dir``, run it
    (``pending``: see :func:`plugin_source`)."""
    if plugin not in PLUGINS:
        raise ValueError(f"unknown plugin {plugin!r}")
    check_socket_path(socket_path)
    _check_python(python)
    if not shim_dir.is_absolute():
        raise ValueError(f"shim directory {shim_dir}: an absolute path is needed")
    broken = json.dumps(_broken(plugin, shim_dir))
    return (
        f"#!{python} -IS\n"
        f"# fabric CNI plugin (fabricctl cni install); the code: {shim_dir}/{SHIM_MODULE}.py\n"
        f"import sys\n\nsys.path.insert(0, {json.dumps(str(shim_dir))})\n"
        f"try:\n    from {SHIM_MODULE} import run\n"
        f"except ImportError:  # the shim's directory was removed: a CNI error, not a traceback\n"
        f"    sys.stdout.write({broken})\n    sys.exit(1)\n"
        f"run({json.dumps(socket_path)}, {json.dumps(plugin)}, {json.dumps(pending)})\n"
    )


def compile_shim(path: Path, python: str) -> None:
    """Write the .pyc of ``path`` with ``python`` (atomically, by py_compile)."""
    try:
        subprocess.run([python, "-IS", "-c", _COMPILE, str(path)], check=True,
                       capture_output=True, timeout=COMPILE_TIMEOUT)  # fmt: skip
    except subprocess.CalledProcessError as e:
        last = e.stderr.decode(errors="replace").strip().splitlines()[-1:]
        why = last[0] if last else f"exit status {e.returncode}"
        raise RuntimeError(f"failed to compile {path} with {python}: {why}") from e


def c_string(text: str) -> str:
    """``text`` as a C string literal (every byte an octal escape: nothing to misquote)."""
    return '"' + "".join(f"\\{b:03o}" for b in text.encode()) + '"'


def find_cc() -> str | None:
    """The C compiler the front is built with: $CC, else cc or gcc on PATH."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return cc or None


def build_front(out: Path, socket_path: str, plugin: str, fallback: Path, cc: str,
                reply_timeout_ms: int = int(shim.REPLY_TIMEOUT * 1000)) -> None:  # fmt: skip
    """Compile cni/front.c into ``out`` (0755, atomically) for ``plugin`` talking to
    ``socket_path``, exec'ing ``fallback`` for everything it does not do itself. The framing's
    constants come from cni/protocol.py, so the C front and the Python sides share them."""
    check_socket_path(socket_path)
    config = (f"#define FABRIC_SOCKET {c_string(socket_path)}\n"
              f"#define FABRIC_PLUGIN {c_string(plugin)}\n"
              f"#define FABRIC_FALLBACK {c_string(str(fallback))}\n"
              f"#define FABRIC_BROKEN {c_string(_broken(plugin, fallback.parent))}\n"
              f"#define MAGIC {c_string(protocol.MAGIC.decode())}\n"
              f"#define MAX_STDIN {protocol.MAX_STDIN}u\n"
              f"#define MAX_REPLY {protocol.MAX_STDOUT}u\n"
              f"#define REPLY_TIMEOUT_MS {int(reply_timeout_ms)}\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=".fabric-cc.", dir=out.parent) as d:
        Path(d, "fabric_front_config.h").write_text(config)
        built = Path(d, plugin)
        try:
            subprocess.run([cc, *CC_FLAGS, "-I", d, "-o", str(built), str(FRONT)], check=True,
                           capture_output=True, timeout=COMPILE_TIMEOUT)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            last = err.decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"failed to build the {plugin} plugin with {cc}: "
                               f"{last[0] if last else e}") from e  # fmt: skip
        write_atomic(out, built.read_bytes(), 0o755)


def _broken(plugin: str, shim_dir: Path) -> str:
    """The CNI error a plugin prints when its Python part is gone from ``shim_dir``."""
    return json.dumps({
        "cniVersion": "1.0.0", "code": 999,
        "msg": f"fabric CNI plugin {plugin} is broken: its module is missing from {shim_dir}",
        "details": "run `fabricctl cni install` again",
    })  # fmt: skip


def _check_python(python: str) -> None:
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise ValueError(f"python {python!r}: an absolute path without spaces is needed")


def check_socket_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"socket {path!r}: an absolute path is needed")
    if len(path.encode()) > MAX_SOCKET_PATH or "\0" in path:
        raise ValueError(f"socket {path!r}: longer than {MAX_SOCKET_PATH} bytes or has a NUL")


def conflist(
    name: str = "fabric",
    mtu: int = 1500,
    pools: Sequence[str] = (),
    cni_version: str = DEFAULT_CNI_VERSION,
) -> dict[str, Any]:
    """The network: fabric, then the reference portmap and bandwidth plugins."""
    ipam: dict[str, Any] = {"type": "fabric-ipam"}
    if pools:
        ipam["pools"] = list(pools)
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {"type": "fabric", "mtu": mtu, "ipam": ipam},
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``) in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_reference(bin_dir: Path, source: Path = REFERENCE_DIR) -> list[Path]:
    """Symlink the reference plugins the config list chains into ``bin_dir``; a regular file
    of that name (an installed plugin) is left alone. Returns the links made."""
    made = []
    for name in REFERENCE_PLUGINS:
        target, link = source / name, bin_dir / name
        if not target.exists() or link.resolve() == target.resolve():
            continue
        if link.exists() and not link.is_symlink():
            continue
        tmp = bin_dir / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
        made.append(link)
    return made


@dataclass(frozen=True, slots=True)
class Installed:
    plugins: tuple[Path, ...]
    conflist: Path
    links: tuple[Path, ...]
    network: dict[str, Any]
    build: str = "python"  # "compiled": the plugins are the C front; "python": the stubs


def install(
    bin_dir: Path,
    conf_dir: Path,
    socket_path: str,
    name: str = "fabric",
    mtu: int = 1500,
    pools: Sequence[str] = (),
    python: str = DEFAULT_PYTHON,
    link: bool = False,
    cni_version: str = DEFAULT_CNI_VERSION,
    state_dir: Path | None = None,
    compiled: bool | None = None,
) -> Installed:
    """Write the shim module and its .pyc (compiled by ``python``) into
    ``bin_dir/.fabric-shim``, both plugin stubs (0755) into ``bin_dir`` and the config list
    (0644) into ``conf_dir``, creating the directories. Idempotent. With ``state_dir``
    (fabricd's cni.stateDir), a DEL while fabricd is unreachable is recorded in its
    ``pending-del`` directory and answered with success; without, it answers 11. The module goes first:
    a stub being replaced meanwhile runs the new module, whose ``run`` keeps its signature.
    ``compiled``: True builds the compiled fronts (an error without a compiler), False
    installs the Python stubs as the plugins, None builds the fronts when a compiler exists.
    """
    shim_dir = bin_dir.absolute() / SHIM_DIR
    pending = str(state_dir.absolute() / PENDING_DIR) if state_dir is not None else ""
    texts = {p: stub_source(socket_path, p, shim_dir, python, pending) for p in PLUGINS}
    network = conflist(name, mtu, pools, cni_version)
    shim_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    module = shim_dir / f"{SHIM_MODULE}.py"
    write_atomic(module, SHIM.read_bytes(), 0o644)
    compile_shim(module, python)
    cc = find_cc() if compiled is not False else None
    if compiled and cc is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) to build the plugins with")
    written = []
    for plugin, text in texts.items():
        if cc is None:
            write_atomic(bin_dir / plugin, text.encode(), 0o755)
        else:  # the stub becomes the front's fallback, beside the module it imports
            write_atomic(shim_dir / plugin, text.encode(), 0o755)
            build_front(bin_dir / plugin, socket_path, plugin, shim_dir / plugin, cc)
        written.append(bin_dir / plugin)
    path = conf_dir / CONFLIST
    write_atomic(path, (json.dumps(network, indent=2) + "\n").encode(), 0o644)
    links = link_reference(bin_dir) if link else []
    return Installed(tuple(written), path, tuple(links), network,
                     "python" if cc is None else "compiled")  # fmt: skip
