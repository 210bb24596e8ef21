"""``mxguard greylist ...`` through click's CliRunner on a temp SQLite store."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxguard.cli.greylist import greylist
from mxguard.store.base import WhitelistEntry
from mxguard.store.sqlite import SqliteGreylistStore

# click < 8.2 mixes stderr into stdout unless told not to
_RUNNER_KW: dict[str, Any] = ({"mix_stderr": False}
              if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {})


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "mxguard.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path}"\n'
                    f'[storage]\nurl = "sqlite:///{tmp_path}/gl.db"\n')
    return path


def seed(tmp_path: Path) -> None:
    async def go() -> None:
        store = SqliteGreylistStore(str(tmp_path / "gl.db"))
        now = time.time()
        await store.record_first_seen("192.0.2.0/24\talice@a.example\tbob@b.example", now - 10,
                                      now + 100)
        await store.record_first_seen("198.51.100.0/24\t\tcarol@b.example", now - 9000,
                                      now + 100)
        await store.mark_passed("198.51.100.0/24\t\tcarol@b.example", now - 8000, now + 100)
        await store.count_client("198.51.100.0/24", now - 8000, now + 100, 3600)
        await store.close()

    asyncio.run(go())


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(**_RUNNER_KW).invoke(greylist, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_list(conf: Path, tmp_path: Path) -> None:
    seed(tmp_path)
    code, out, _ = run("list", "--config", str(conf))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("\t") == ["client", "sender", "recipient", "first_seen", "last_seen",
                                    "passed", "expires"]
    rows = [ln.split("\t") for ln in lines[1:]]
    assert rows[0][:3] == ["192.0.2.0/24", "alice@a.example", "bob@b.example"]
    assert rows[0][5] == "-"  # not passed
    assert rows[1][:3] == ["198.51.100.0/24", "<>", "carol@b.example"]
    assert rows[1][5].endswith("Z")
    code, out, _ = run("list", "--config", str(conf), "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2


def test_stats(conf: Path, tmp_path: Path) -> None:
    seed(tmp_path)
    code, out, _ = run("stats", "--config", str(conf))
    assert code == 0
    stats = dict(line.split("\t") for line in out.splitlines())
    assert (stats["triplets"], stats["passed"], stats["pending"], stats["clients"]) == (
        "2", "1", "1", "1")


def test_purge_older_than_and_all(conf: Path, tmp_path: Path) -> None:
    seed(tmp_path)
    code, out, _ = run("purge", "--config", str(conf), "--older-than", "3600")
    assert code == 0 and out == "purged\t2\n"  # the old triplet and its client
    code, out, _ = run("purge", "--config", str(conf), "--all")
    assert code == 0 and out == "purged\t1\n"
    code, out, _ = run("stats", "--config", str(conf))
    assert "triplets\t0" in out


@pytest.mark.parametrize("args", [[], ["--all", "--older-than", "5"]])
def test_purge_needs_exactly_one_option(conf: Path, args: list[str]) -> None:
    code, _, err = run("purge", "--config", str(conf), *args)
    assert code == 2 and "exactly one of" in err


def test_whitelist_add_list_remove(conf: Path, tmp_path: Path) -> None:
    code, out, _ = run("whitelist", "add", "--config", str(conf), "192.0.2.0/24",
                       "--comment", "partner")
    assert code == 0 and out == "added\tclient\t192.0.2.0/24\n"
    code, out, _ = run("whitelist", "add", "--config", str(conf), "postmaster@")
    assert code == 0 and out == "added\trecipient\tpostmaster@\n"
    code, out, _ = run("whitelist", "add", "--config", str(conf), "--recipient", "/^info@/")
    assert code == 0 and out == "added\trecipient\t/^info@/\n"
    code, out, _ = run("whitelist", "add", "--config", str(conf), "192.0.2.0/24")
    assert code == 0 and out.startswith("exists")
    code, out, _ = run("whitelist", "list", "--config", str(conf))
    assert [ln.split("\t")[:2] for ln in out.splitlines()] == [
        ["client", "192.0.2.0/24"], ["recipient", "/^info@/"], ["recipient", "postmaster@"]]
    assert out.splitlines()[0].endswith("\tpartner")

    async def entries() -> list[WhitelistEntry]:
        store = SqliteGreylistStore(str(tmp_path / "gl.db"))
        try:
            return await store.list_whitelist()
        finally:
            await store.close()

    assert len(asyncio.run(entries())) == 3
    code, out, _ = run("whitelist", "remove", "--config", str(conf), "postmaster@")
    assert code == 0 and out == "removed\tpostmaster@\n"
    code, _, err = run("whitelist", "remove", "--config", str(conf), "postmaster@")
    assert code == 1 and "no entry" in err
    assert len(asyncio.run(entries())) == 2


@pytest.mark.parametrize("entry", ["/bad(/", "192.0.2.999", "not a domain"])
def test_whitelist_add_rejects_bad_entries(conf: Path, entry: str) -> None:
    code, _, err = run("whitelist", "add", "--config", str(conf), entry)
    assert code == 2 and err.startswith("mxguard: ") and len(err.splitlines()) == 1


def test_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[greylist]\ndelay = -5\n")
    code, _, err = run("stats", "--config", str(bad))
    assert code == 2 and len(err.splitlines()) == 1 and "greylist.delay" in err
    code, _, err = run("list", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "no such file" in err


def test_store_error_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "gl.db").write_bytes(b"garbage " * 1000)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/gl.db"\n')
    code, _, err = run("stats", "--config", str(conf))
    assert code == 1 and "not a database" in err and len(err.splitlines()) == 1
