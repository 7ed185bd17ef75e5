"""The installed plugin, executed as a runtime does it (env + stdin, exec), with and without a
fabricd; fabricd's side of the socket is the real CNIServer with stand-in verbs. The plugin
tests run on both builds: the compiled front (cni/front.c, exec'ing the Python plugin for
what it does not do itself) and the Python plugin alone."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import install as inst
from cni import protocol
from cni.errors import Code
from cni.spec import SUPPORTED, Verb
from fabric.workloads.server import CNIServer, answer

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee",
    "CNI_NETNS": "/run/netns/pod",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p",
}
CONF = json.dumps({"cniVersion": "1.0.0", "name": "fabric", "type": "fabric"}).encode()


BUILDS = ["compiled", "python"]


def _compiled(build: str) -> bool:
    if build == "compiled" and inst.find_cc() is None:
        pytest.skip("no C compiler: the compiled front cannot be built")
    return build == "compiled"


@pytest.fixture(params=BUILDS)
def plugin(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "cni.sock"),
                        compiled=_compiled(request.param))  # fmt: skip
    assert done.build == request.param
    return done.plugins[0]


def python_part(exe: Path) -> Path:
    """The Python plugin of an installed plugin: itself, or the compiled front's fallback."""
    return exe if exe.read_bytes()[:2] == b"#!" else exe.parent / inst.SHIM_DIR / exe.name


def run(
    exe: Path, env: dict[str, str], stdin: bytes = CONF, **extra: str
) -> tuple[int, Any, float]:
    started = time.monotonic()
    p = subprocess.run([str(exe)], input=stdin, env={**env, **extra}, capture_output=True,
                       timeout=30, check=False)  # fmt: skip
    took = time.monotonic() - started
    assert p.stderr == b""
    return p.returncode, json.loads(p.stdout) if p.stdout else None, took


class _Recorder:
    """Stand-in verbs: records each request, answers ADD with a fixed result."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    async def run(self, plugin: str, req: Any) -> bytes:
        self.requests.append((plugin, req))
        if req.env.command is Verb.ADD:
            return json.dumps({"cniVersion": req.conf.cni_version, "ips": []}).encode()
        return b""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Recorder]:
    rec = _Recorder()
    loop = asyncio.new_event_loop()
    srv = CNIServer(tmp_path / "cni.sock",
                    functools.partial(answer, rec, lambda *_: None))  # type: ignore[arg-type]  # fmt: skip
    loop.run_until_complete(srv.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield rec
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


# ---------------------------------------------------------------- without fabricd


def test_version_is_answered_by_the_shim(plugin: Path) -> None:
    env = {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy",
           "CNI_PATH": "dummy", "CNI_CONTAINERID": ""}  # fmt: skip
    code, doc, _ = run(plugin, env, b'{"cniVersion":"1.0.0"}')
    assert code == 0
    assert doc == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED)}


@pytest.mark.parametrize("verb", ["ADD", "CHECK", "DEL", "GC"])
def test_no_fabricd_is_try_again_later_quickly(plugin: Path, verb: str) -> None:
    conf = json.dumps({"cniVersion": "0.4.0", "name": "fabric", "type": "fabric"}).encode()
    code, doc, took = run(plugin, {**ENV, "CNI_COMMAND": verb}, conf)
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER
    assert doc["cniVersion"] == "0.4.0"
    assert "cni.sock" in doc["details"]
    assert took < 1.0


@pytest.fixture(params=BUILDS)
def recording(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A plugin installed with a state dir: it records a DEL while fabricd is down."""
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "cni.sock"),
                        state_dir=tmp_path / "state" / "deep",
                        compiled=_compiled(request.param))  # fmt: skip
    return done.plugins[0]


def test_a_del_whose_answer_is_lost_is_recorded_once_not_sent_again(
    recording: Path, tmp_path: Path
) -> None:
    """fabricd takes the request and goes away without answering: the DEL is recorded (the
    compiled front hands it to the Python plugin with why) and not sent a second time."""
    from fabric.workloads.pending import PendingDir

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "cni.sock"))
    s.listen(4)
    got: list[bytes] = []

    def serve() -> None:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while True:
                c, _ = s.accept()
                got.append(c.recv(1 << 16))
                c.close()  # no answer

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        code, doc, _ = run(recording, {**ENV, "CNI_COMMAND": "DEL"})
    finally:
        s.close()
        t.join(6)
    assert (code, doc) == (0, None)
    assert len(got) == 1 and got[0][:4] == protocol.MAGIC
    (f,) = PendingDir(tmp_path / "state" / "deep").files()
    assert f.read_bytes() == got[0]  # the request as it was framed, recorded


def test_del_without_fabricd_is_recorded_and_answered_success(
    recording: Path, tmp_path: Path
) -> None:
    from fabric.workloads.pending import PendingDir

    pending = PendingDir(tmp_path / "state" / "deep")
    for verb in ("ADD", "CHECK"):  # only DEL is recorded
        code, doc, _ = run(recording, {**ENV, "CNI_COMMAND": verb})
        assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER
    assert pending.files() == []
    code, doc, took = run(recording, {**ENV, "CNI_COMMAND": "DEL"})
    assert (code, doc) == (0, None) and took < 1.0
    run(recording.with_name("fabric-ipam"), {**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    files = pending.files()
    assert len(files) == 2 and sorted(os.listdir(pending.path)) == [f.name for f in files]
    assert stat.S_IMODE(pending.path.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    first, second = (pending.read(f) for f in files)
    assert (first.plugin, second.plugin) == ("fabric", "fabric-ipam")
    assert first.request.env.command is Verb.DEL and first.request.env.container_id == "c0ffee"
    assert first.request.env.netns == "/run/netns/pod" and second.request.env.netns == ""
    assert first.request.conf.name == "fabric"


def test_del_that_cannot_be_recorded_is_try_again_later(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state dir should be")
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "cni.sock"),
                        state_dir=tmp_path / "state")  # fmt: skip
    code, doc, _ = run(done.plugins[0], {**ENV, "CNI_COMMAND": "DEL"})
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER
    assert "recording the DEL in" in doc["details"] and "pending-del" in doc["details"]


def test_pending_dir_sets_aside_what_is_not_a_del(tmp_path: Path) -> None:
    from fabric.workloads.pending import PendingDir

    pending = PendingDir(tmp_path)
    pending.path.mkdir()
    add = protocol.encode_request({**ENV, "FABRIC_CNI_PLUGIN": "fabric"}, CONF)
    (pending.path / "1.del").write_bytes(add)
    (pending.path / "2.del").write_bytes(b"garbage")
    (pending.path / "3.del").write_bytes(add[:-3])
    seen: list[str] = []

    async def go() -> set[str]:
        return await pending.finish(lambda p: asyncio.sleep(0, seen.append(p.path.name)))

    assert asyncio.run(go()) == set() and seen == []
    assert sorted(os.listdir(pending.path)) == ["1.del.bad", "2.del.bad", "3.del.bad"]


def test_stale_socket_file_is_try_again_later(plugin: Path, tmp_path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "cni.sock"))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    code, doc, took = run(plugin, ENV)
    assert (code, doc["code"]) == (1, Code.TRY_AGAIN_LATER) and took < 1.0


def test_status_without_fabricd_is_not_available(plugin: Path) -> None:
    code, doc, took = run(plugin, {"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"})
    assert code == 1 and doc["code"] == Code.NOT_AVAILABLE and took < 1.0


def test_bad_command_answered_locally(plugin: Path) -> None:
    code, doc, _ = run(plugin, {**ENV, "CNI_COMMAND": "BOGUS"})
    assert code == 1 and doc["code"] == Code.INVALID_ENVIRONMENT and "CNI_COMMAND" in doc["msg"]
    code, doc, _ = run(plugin, {k: v for k, v in ENV.items() if k != "CNI_COMMAND"})
    assert code == 1 and doc["code"] == Code.INVALID_ENVIRONMENT


def test_ten_megabytes_of_stdin_without_fabricd(plugin: Path) -> None:
    code, doc, _ = run(plugin, ENV, b"x" * (10 << 20))
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER


def test_socket_override_and_json_escaping(plugin: Path, tmp_path: Path) -> None:
    odd = str(tmp_path / 'a"b\\c\x01\u00e9')
    code, doc, _ = run(plugin, ENV, FABRIC_CNI_SOCKET=odd)
    assert code == 1 and doc["details"].startswith(odd)


# ---------------------------------------------------------------- with a server


def test_request_reaches_fabricd_and_answer_is_printed(plugin: Path, server: _Recorder) -> None:
    code, doc, _ = run(plugin, {**ENV, "UNRELATED": "secret"})
    assert code == 0 and doc == {"cniVersion": "1.0.0", "ips": []}
    plugin_name, req = server.requests[0]
    assert plugin_name == "fabric"
    assert (req.env.container_id, req.env.ifname, req.env.args.pod_name) == ("c0ffee", "eth0", "p")


def test_ipam_binary_says_so(tmp_path: Path, plugin: Path, server: _Recorder) -> None:
    run(tmp_path / "bin" / "fabric-ipam", {**ENV, "CNI_COMMAND": "DEL"})
    assert server.requests[0][0] == "fabric-ipam"


def test_errors_from_fabricd(plugin: Path, server: _Recorder) -> None:
    code, doc, _ = run(plugin, ENV, b"{not json")
    assert code == 1 and doc["code"] == Code.DECODE_FAILURE
    code, doc, _ = run(plugin, {**ENV, "CNI_IFNAME": "x" * 16})
    assert code == 1 and doc["code"] == Code.INVALID_ENVIRONMENT and "CNI_IFNAME" in doc["msg"]
    assert server.requests == []


def test_ten_megabytes_of_stdin_with_fabricd(plugin: Path, server: _Recorder) -> None:
    code, doc, took = run(plugin, ENV, b"{" + b" " * (10 << 20) + b"}")
    assert code == 1 and doc["code"] == Code.IO_FAILURE
    assert server.requests == [] and took < 5


def test_stdin_of_exactly_the_limit_is_sent_and_one_byte_more_is_not(
    plugin: Path, server: _Recorder
) -> None:
    # both builds take the limit from cni/protocol.py (the front through its generated header)
    body = CONF[:-1] + b" " * (protocol.MAX_STDIN - len(CONF)) + b"}"
    assert len(body) == protocol.MAX_STDIN
    code, doc, _ = run(plugin, ENV, body)
    assert code == 0 and doc == {"cniVersion": "1.0.0", "ips": []}
    assert len(server.requests) == 1
    code, doc, _ = run(plugin, ENV, body + b" ")
    assert code == 1 and doc["code"] == Code.IO_FAILURE and len(server.requests) == 1


def test_status_and_version_through_fabricd(plugin: Path, server: _Recorder) -> None:
    conf = json.dumps({"cniVersion": "1.1.0", "name": "fabric", "type": "fabric"}).encode()
    code, doc, _ = run(plugin, {"CNI_COMMAND": "STATUS", "CNI_PATH": "/x"}, conf)
    assert (code, doc) == (0, None)


@pytest.mark.parametrize("build", BUILDS)
def test_a_hung_fabricd_times_out(tmp_path: Path, build: str) -> None:
    text = inst.plugin_source(str(tmp_path / "hung.sock"), "fabric")
    text = text.replace("REPLY_TIMEOUT = 60.0", "REPLY_TIMEOUT = 1.0")
    exe = tmp_path / "fabric-fast"
    inst.write_atomic(exe, text.encode(), 0o755)
    if _compiled(build):  # a front with a 1 s timeout, the script above as its fallback
        cc = inst.find_cc()
        assert cc is not None
        inst.build_front(tmp_path / "fabric", str(tmp_path / "hung.sock"), "fabric", exe, cc,
                         reply_timeout_ms=1000)  # fmt: skip
        exe = tmp_path / "fabric"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "hung.sock"))
    s.listen(1)  # accepts (in the backlog), never answers
    try:
        code, doc, took = run(exe, ENV)
    finally:
        s.close()
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER and 0.9 < took < 3


def test_a_foreign_answer_is_try_again_later(tmp_path: Path, plugin: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "cni.sock"))
    s.listen(1)

    def reply() -> None:
        c, _ = s.accept()
        c.recv(1 << 16)
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        c.close()

    t = threading.Thread(target=reply)
    t.start()
    try:
        code, doc, _ = run(plugin, ENV)
    finally:
        t.join(5)
        s.close()
    assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER


def test_the_plugin_imports_only_c_modules(plugin: Path) -> None:
    """os, socket and json cost 0.8, 5 and 20 ms at every exec: the shim does without."""
    env = {"CNI_COMMAND": "ADD", "PATH": "/usr/bin"}  # no fabricd: error 11, all code run
    p = subprocess.run(["/usr/bin/python3", "-IS", "-X", "importtime", str(python_part(plugin))],
                       input=CONF, env=env, capture_output=True, timeout=30, check=False)  # fmt: skip
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}  # fmt: skip
    assert json.loads(p.stdout)["code"] == Code.TRY_AGAIN_LATER
    assert "_socket" in imported and "fabric_cni_shim" in imported
    assert not imported & {"os", "socket", "json", "posixpath", "_collections_abc"}


# ---------------------------------------------------------------- framing and the socket


def test_shim_framing_matches_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    from cni import shim

    monkeypatch.setattr(shim.posix, "environ", {b"CNI_COMMAND": b"ADD", b"HOME": b"/root"})
    raw = shim.request(b"{}", too_large=False)
    h = protocol.decode_header(raw[: protocol.HEADER])
    env = protocol.decode_env(raw[protocol.HEADER : protocol.HEADER + h.env_len])
    assert env == {"CNI_COMMAND": "ADD", protocol.PLUGIN_VAR: "fabric"}
    assert raw[protocol.HEADER + h.env_len :] == b"{}" and h.flags == 0
    assert shim.request(b"", too_large=True)[4] == protocol.STDIN_TOO_LARGE
    assert (shim.MAGIC, shim.MAX_STDIN) == (protocol.MAGIC, protocol.MAX_STDIN)
    assert protocol.decode_reply(protocol.encode_reply(3, b"out")) == (3, b"out")


def test_server_socket_mode_stale_file_and_live_owner(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cni.sock"
    path.parent.mkdir()
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()  # stale

    async def go() -> None:
        srv = CNIServer(path, functools.partial(answer, _Recorder(), lambda *_: None))  # type: ignore[arg-type]
        await srv.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            with pytest.raises(RuntimeError, match="another process"):
                await CNIServer(path, srv.handler).start()
        finally:
            await srv.stop()
        assert not path.exists()

    asyncio.run(go())


def test_server_drops_foreign_and_oversized_frames(tmp_path: Path) -> None:
    path = tmp_path / "cni.sock"

    async def go() -> None:
        srv = CNIServer(path, functools.partial(answer, _Recorder(), lambda *_: None))  # type: ignore[arg-type]
        await srv.start()
        try:
            for frame in (b"GET / HTTP/1.0\r\n\r\n",
                          protocol.MAGIC + b"\0" + (1 << 30).to_bytes(4, "big") + bytes(4)):  # fmt: skip
                r, w = await asyncio.open_unix_connection(str(path))
                w.write(frame)
                await w.drain()
                assert await asyncio.wait_for(r.read(), 5) == b""  # closed, no answer
                w.close()
        finally:
            await srv.stop()

    asyncio.run(go())


# ---------------------------------------------------------------- fabricctl cni install


def test_fabricctl_cni_install(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fabric.cli.main import main

    args = ["cni", "install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir",
            str(tmp_path / "net.d"), "--socket", "/run/x/cni.sock", "--pool", "pods",
            "--state-dir", str(tmp_path / "state"),
            "--pool", "fd00::/64", "--mtu", "1450", "--network-name", "k8s-pods"]  # fmt: skip
    for fmt in ("json", "yaml", "table"):
        r = CliRunner().invoke(main, [*args, "-o", fmt])
        assert r.exit_code == 0, r.output
    if inst.find_cc() is not None:  # by default the plugins are the compiled front
        data = json.loads(CliRunner().invoke(main, [*args, "-o", "json"]).output)
        assert data["build"] == "compiled"
        for p in data["plugins"]:
            assert Path(p).read_bytes()[:4] == b"\x7fELF"
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o755
    r = CliRunner().invoke(main, [*args, "--build", "python", "-o", "json"])
    data = json.loads(r.output)
    assert data["build"] == "python"
    for p in data["plugins"]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o755
        text = Path(p).read_text()
        assert text.startswith("#!/usr/bin/python3 -IS\n")
        pending = tmp_path / "state" / inst.PENDING_DIR
        assert f'run("/run/x/cni.sock", "{Path(p).name}", "{pending}")' in text
    conf = json.loads(Path(data["conflist"]).read_text())
    assert stat.S_IMODE(os.stat(data["conflist"]).st_mode) == 0o644
    assert conf["name"] == "k8s-pods"
    assert [p["type"] for p in conf["plugins"]] == ["fabric", "portmap", "bandwidth"]
    assert conf["plugins"][0] == {"type": "fabric", "mtu": 1450,
                                  "ipam": {"type": "fabric-ipam", "pools": ["pods", "fd00::/64"]}}  # fmt: skip
    assert conf["plugins"][1]["capabilities"] == {"portMappings": True}
    names = sorted(p.name for p in (tmp_path / "bin").iterdir())
    assert names == [inst.SHIM_DIR, "fabric", "fabric-ipam"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--socket", "relative.sock"], "--socket"),
        (["--socket", "/" + "x" * 120], "--socket"),
        (["--network-name", "bad name"], "--network-name"),
        (["--pool", "10.0.0.1/8"], "--pool"),
        (["--python", "python3"], "--python"),
    ],
)
def test_fabricctl_cni_install_refuses(tmp_path: Path, extra: list[str], field: str) -> None:
    from click.testing import CliRunner

    from fabric.cli.main import main

    r = CliRunner().invoke(main, ["cni", "install", "--bin-dir", str(tmp_path / "b"),
                                  "--conf-dir", str(tmp_path / "c"), *extra])  # fmt: skip
    assert r.exit_code == 1 and field in r.output
    assert not (tmp_path / "b").exists()


def test_link_reference(tmp_path: Path) -> None:
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", "/run/x.sock", link=True)
    if not inst.REFERENCE_DIR.exists():
        pytest.skip("no reference plugins in /usr/lib/cni")
    assert {p.name for p in done.links} == set(inst.REFERENCE_PLUGINS)
    assert (tmp_path / "bin" / "portmap").resolve() == inst.REFERENCE_DIR / "portmap"
    again = inst.install(tmp_path / "bin", tmp_path / "net.d", "/run/x.sock", link=True)
    assert again.links == ()  # already there


def test_installed_stub_runs_the_shim_from_its_install_time_pyc(tmp_path: Path) -> None:
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "cni.sock"),
                        compiled=False)  # fmt: skip
    shim_dir = tmp_path / "bin" / inst.SHIM_DIR
    pycs = list((shim_dir / "__pycache__").glob(f"{inst.SHIM_MODULE}.*.pyc"))
    assert len(pycs) == 1  # written by the plugins' interpreter at install time
    before = pycs[0].stat().st_mtime_ns
    for exe in done.plugins:
        code, doc, _ = run(exe, ENV)  # nobody listens: the shim's own answer
        assert code == 1 and doc["code"] == Code.TRY_AGAIN_LATER
    assert pycs[0].stat().st_mtime_ns == before  # used as it is, not recompiled
    assert len(done.plugins[0].read_text().splitlines()) < 12


@pytest.mark.parametrize("build", BUILDS)
def test_a_stub_without_its_module_answers_a_cni_error(tmp_path: Path, build: str) -> None:
    done = inst.install(tmp_path / "bin", tmp_path / "net.d", str(tmp_path / "cni.sock"),
                        compiled=_compiled(build))  # fmt: skip
    shutil.rmtree(tmp_path / "bin" / inst.SHIM_DIR)
    for exe in done.plugins:
        code, doc, _ = run(exe, ENV)  # run() also asserts nothing went to stderr
        assert code == 1 and doc["code"] == Code.INTERNAL, doc
        assert "fabricctl cni install" in doc["details"] and str(inst.SHIM_DIR) in doc["msg"]
