"""The in-process nft backend (fabric.dataplane.libnft through fabric.dataplane.nft.Nft)
against the real kernel, in a network namespace the test creates, compared with the exec'd
``nft`` on the same table: the same refusals in the same words with nothing applied, the
same listings, and concurrent callers serialized on the one context."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator

import pytest
from scratch_netns import scratch_netns

from fabric.dataplane import libnft
from fabric.dataplane import nft as nftmod
from fabric.dataplane.nft import Nft, NftError, SetDef, Transaction

TABLE = "tlib"


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("tnl") as name:
        yield name


def nft(ns: str, *args: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def base() -> Transaction:
    tx = Transaction(TABLE)
    tx.add_table()
    tx.add_set(SetDef("s4", ("ipv4_addr",)))
    tx.add_set(SetDef("m", ("ifname",), map_to="verdict"))
    tx.lines.append(f"add chain inet {TABLE} c")
    tx.add_elements("s4", ["10.9.0.1", "10.9.0.2"])
    tx.lines.append(
        f'add rule inet {TABLE} c ip saddr @s4 counter accept comment "x #0123456789ab"'
    )
    return tx


@pytest.mark.root
def test_lib_refuses_a_bad_transaction_in_nfts_words_and_applies_nothing(ns: str) -> None:
    lib, ex = Nft(ns, backend="lib"), Nft(ns, backend="exec")
    assert (lib.backend, ex.backend) == ("lib", "exec")

    async def go() -> tuple[NftError, NftError]:
        await lib.apply(base())
        before = nft(ns, "-s", "list", "table", "inet", TABLE)
        bad = Transaction(TABLE)
        bad.add_elements("s4", ["10.9.0.3"])  # valid alone: must not be applied either
        bad.lines.append(f"add element inet {TABLE} nosuchset {{ 10.9.0.4 }}")
        errors = []
        for runner in (lib, ex):
            with pytest.raises(NftError, match=f"failed to apply nft table {TABLE}: ") as e:
                await runner.apply(bad)
            errors.append(e.value)
            assert nft(ns, "-s", "list", "table", "inet", TABLE) == before
        syntax = Transaction(TABLE)
        syntax.add_elements("s4", ["10.9.0.5"])
        syntax.lines.append(f"add rule inet {TABLE} c ip saddr @s4 frobnicate")
        with pytest.raises(NftError, match="syntax error") as e2:
            await lib.apply(syntax)
        assert "frobnicate" in e2.value.stderr
        assert nft(ns, "-s", "list", "table", "inet", TABLE) == before
        return errors[0], errors[1]

    try:
        from_lib, from_exec = asyncio.run(go())
    finally:
        lib.close()
    # nft's own words, naming and quoting the refused line (the second), as nft -f - does
    assert from_lib.stderr == from_exec.stderr, (from_lib.stderr, from_exec.stderr)
    assert from_lib.stderr.startswith("/dev/stdin:2:")
    assert "nosuchset" in from_lib.stderr and str(from_lib) == str(from_exec)
    assert lib.execs == 0 and lib.runs == 3  # every command in process, none exec'd


@pytest.mark.root
def test_lib_listing_equals_the_nft_programs(ns: str) -> None:
    lib, ex = Nft(ns, backend="lib"), Nft(ns, backend="exec")

    async def go() -> None:
        assert not await lib.exists(TABLE)
        assert await lib.list_table(TABLE) is None
        await lib.apply(base())
        assert await lib.exists(TABLE) and await ex.exists(TABLE)
        got, want = await lib.list_table(TABLE), await ex.list_table(TABLE)
        assert got == want and got is not None
        assert got.sets["s4"].elements == {"10.9.0.1", "10.9.0.2"}
        assert [r.id for r in got.chains["c"].rules] == ["0123456789ab"]
        for flags in (["-t"], ["-s"], []):  # terse (metrics), stateless (nat), plain
            args = [*flags, "list", "table", "inet", TABLE]
            assert await lib.run(args) == await ex.run(args) == nft(ns, *args)
        await lib.run(["delete", "table", "inet", TABLE], what="remove", table=TABLE)
        assert not await ex.exists(TABLE)

    try:
        asyncio.run(go())
    finally:
        lib.close()


@pytest.mark.root
def test_lib_serializes_concurrent_callers(ns: str) -> None:
    lib = Nft(ns, backend="lib")

    async def go() -> None:
        await lib.apply(base())

        async def add(i: int) -> None:
            tx = Transaction(TABLE)
            tx.add_elements("s4", [f"10.8.{i // 250}.{i % 250 + 1}"])
            await lib.apply(tx)

        await asyncio.gather(*(add(i) for i in range(300)), lib.list_table(TABLE))
        listing = await lib.list_table(TABLE)
        assert listing is not None and len(listing.sets["s4"].elements) == 302

    try:
        asyncio.run(go())
    finally:
        lib.close()
    assert lib.execs == 0


def test_backend_choice() -> None:
    if not _library_loads():
        pytest.skip("libnftables1 is not installed")
    assert Nft().backend == "lib"  # our own netns, the stock nft: in process
    assert Nft(nft="/bin/false").backend == "exec"  # another program: exec'd as asked
    assert Nft("somewhere").backend == "exec"  # another netns: nsenter + nft by default
    assert Nft(backend="exec").backend == "exec"
    with pytest.raises(ValueError, match="backend"):
        Nft(backend="fast")


def test_without_the_library_it_execs_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(libnft, "LIBRARY", "libnftables-absent.so.0")
    monkeypatch.setattr(libnft, "_lib", None)
    monkeypatch.setattr(libnft, "_lib_error", None)
    monkeypatch.setattr(nftmod, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="fabric.dataplane.nft"):
        assert Nft(backend="lib").backend == "exec"
        assert Nft().backend == "exec"
    said = [r.getMessage() for r in caplog.records if "libnftables" in r.getMessage()]
    assert len(said) == 1 and "libnftables-absent.so.0" in said[0], said


def _library_loads() -> bool:
    try:
        libnft.load()
    except OSError:
        return False
    return True
