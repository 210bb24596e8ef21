"""A store that is down is not a reason to refuse mail (issue 14, items 4 and 8).

Through the real ``mxguard serve`` process:

* Redis down at start: the daemon starts (no traceback), the policy door
  answers ``[policy] fail_action`` (DUNNO), the milter door accepts the message
  with Bayes skipped (``BAYES_ERROR``, not 451), the error line comes once per
  ``fail_open_log_interval``; once Redis is started greylisting works again and
  the recovery is logged. Control: Redis up at start greylists at once.
* The SQLite files turned read-only under a running daemon: the same (the
  writes fail, the mail flows, autolearn failures are logged once per interval).
  Control: the writable file.
* The Redis password appears in no log line (item 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.test_redis_fleet import _milter_client_module
from tests.support.daemon import MxguardProcess, PolicyClient
from tests.support.redis import RedisServer

from mxguard.testing.ports import free_port

SECRET = "s3cret"
HAM = ("Hi Bob, the meeting notes from Tuesday are attached; the release branch "
       "builds again and the test suite passes. See you at standup tomorrow.\r\n") * 3


def config(proc: MxguardProcess, url: str) -> None:
    """Milter and policy doors; greylisting, content and Bayes (autolearn on); no DNS."""
    proc.config.write_text(
        f'[server]\nstate_dir = "{proc.tmp}"\n'
        f'[policy]\nlisten = "127.0.0.1:{proc.port}"\n'
        f'[milter]\nlisten = "127.0.0.1:{proc.milter_port}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
        f'[storage]\nurl = "{url}"\nredis_timeout = 0.5\nbusy_timeout = 0.2\n'
        '[helo]\nmode = "off"\n[spf]\nmode = "off"\n'
        '[dkim]\nmode = "off"\ninternal_hosts = []\n[dmarc]\nmode = "off"\n'
        "[bayes]\nmin_spam = 1\nmin_ham = 1\n")


def eml(i: int) -> bytes:
    return (f"From: x{i}@ham.example\r\nTo: bob@example.test\r\nSubject: notes {i}\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <ham{i}@outage.test>\r\n"
            f"\r\n{HAM}").encode()


async def _send(port: int, raw: bytes) -> tuple[bool, str]:
    mc = _milter_client_module()
    deadline = time.monotonic() + 10
    while True:
        client = mc.MilterClient(f"inet:127.0.0.1:{port}", timeout=20)
        try:
            assert await client.open(mc.Client(address="198.51.100.7")) is None
            break
        except OSError:
            await client.close()
            assert time.monotonic() < deadline, "milter door did not open"
            await asyncio.sleep(0.1)
    try:
        outcome = await client.message(mc.Message.parse(raw, "alice@sender.test",
                                                        ["bob@example.test"]))
    finally:
        await client.close()
    status = " ".join(outcome.added("X-Spam-Status"))
    return outcome.delivered, " ".join(status.split())


def milter_message(proc: MxguardProcess, i: int) -> tuple[bool, str]:
    """(delivered, X-Spam-Status) of one message through the milter door."""
    return asyncio.run(_send(proc.milter_port, eml(i)))


def ask(c: PolicyClient, sender: str) -> str:
    return c.ask(sender=sender, client_address="198.51.100.7")


def milter_lines(proc: MxguardProcess) -> list[str]:
    """The milter door's decision lines."""
    return [ln for ln in proc.log_text().splitlines() if " door=milter " in ln]


def error_lines(proc: MxguardProcess, check: str) -> list[str]:
    return [ln for ln in proc.log_text().splitlines() if f"check={check} error=" in ln]


def assert_sane(proc: MxguardProcess) -> None:
    assert proc.proc is not None and proc.proc.poll() is None, proc.log_text()[-3000:]
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]
    assert SECRET not in proc.log_text()


@pytest.mark.parametrize("redis_at_start", [True, False], ids=["control-up", "down"])
def test_redis_down_at_start_serves_fail_open_and_recovers(
        tmp_path: Path, redis_at_start: bool) -> None:
    server = RedisServer(tmp_path, password=SECRET)
    if redis_at_start:
        server.start()
    proc = MxguardProcess(tmp_path)
    config(proc, server.url(0))
    try:
        proc.start()  # old code: exited with a traceback when Redis was down
        c = PolicyClient(proc.port, timeout=10)
        first = ask(c, "first@sender.test")
        if redis_at_start:
            assert first.startswith("DEFER_IF_PERMIT 4.2.0"), first
        else:
            assert first == "DUNNO", first  # [policy] fail_action
            assert [ask(c, f"more{i}@sender.test") for i in range(3)] == ["DUNNO"] * 3
        for i in range(3):
            delivered, status = milter_message(proc, i)
            assert delivered, (status, proc.log_text()[-2000:])  # not 451
        skipped = [ln for ln in milter_lines(proc) if "BAYES_ERROR" in ln]
        assert len(skipped) == (0 if redis_at_start else 3), proc.log_text()[-3000:]
        if redis_at_start:
            assert error_lines(proc, "bayes") == []
            assert "recovered" not in proc.log_text()
        else:
            lines = error_lines(proc, "bayes")
            assert len(lines) == 1, lines  # once per fail_open_log_interval
            assert "fail=skipped" in lines[0]
            proc.wait_log("store unavailable at start")
            server.start()
            deadline = time.monotonic() + 15
            i = 0
            while not ask(c, f"after{i}@sender.test").startswith("DEFER_IF_PERMIT 4.2.0"):
                assert time.monotonic() < deadline, proc.log_text()[-3000:]
                i += 1
                time.sleep(0.1)
            proc.wait_log("recovered")
            # Bayes' own connection retries within RETRY_AFTER of its last failure
            while True:
                delivered, status = milter_message(proc, 9)
                assert delivered, status
                if "BAYES_ERROR" not in milter_lines(proc)[-1]:
                    break
                assert time.monotonic() < deadline, proc.log_text()[-3000:]
                time.sleep(0.1)
        c.close()
        assert_sane(proc)
    finally:
        assert proc.stop() == 0
        server.stop()
    assert SECRET not in proc.log_text()


@contextlib.contextmanager
def read_only_view(src: Path) -> Iterator[Path]:
    """``src`` bind-mounted read-only (root ignores file modes; a mount does not)."""
    where = Path(tempfile.mkdtemp(prefix="mxg-ro-", dir="/tmp"))
    try:
        if os.geteuid() != 0:
            pytest.skip("a read-only bind mount needs root")
        r = subprocess.run(["mount", "--bind", str(src), str(where)], capture_output=True,
                           text=True, timeout=10, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], check=True,
                           capture_output=True, timeout=10)
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10,
                           check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


@pytest.mark.parametrize("read_only", [False, True], ids=["control-writable", "read-only"])
def test_sqlite_read_only_accepts_mail(tmp_path: Path, read_only: bool) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "first").mkdir()
    first = MxguardProcess(tmp_path / "first")
    config(first, f"sqlite:///{state}/mxguard.db")
    first.start()  # the files exist, made by a daemon that could write them
    try:
        assert ask(PolicyClient(first.port), "first@sender.test").startswith("DEFER_IF_PERMIT")
        assert milter_message(first, 0)[0]
    finally:
        assert first.stop() == 0
    view = read_only_view(state) if read_only else contextlib.nullcontext(state)
    with view as where:
        proc = MxguardProcess(tmp_path)
        config(proc, f"sqlite:///{where}/mxguard.db")
        proc.start()  # old code: exited with a traceback on the read-only file
        try:
            c = PolicyClient(proc.port, timeout=10)
            replies = [ask(c, f"new{i}@sender.test") for i in range(3)]
            if read_only:
                assert replies == ["DUNNO"] * 3, replies  # [policy] fail_action
            else:
                assert all(r.startswith("DEFER_IF_PERMIT 4.2.0") for r in replies), replies
            for i in range(1, 5):
                delivered, status = milter_message(proc, i)
                assert delivered, (status, proc.log_text()[-2000:])  # never 451
            skipped = [ln for ln in milter_lines(proc) if "BAYES_ERROR" in ln]
            if read_only:
                assert len(skipped) == 4, proc.log_text()[-3000:]
                # one line per check per interval, not one per message
                assert len(error_lines(proc, "greylist")) == 1, proc.log_text()[-3000:]
                assert len(error_lines(proc, "bayes")) == 1, proc.log_text()[-3000:]
                proc.wait_log("store unavailable at start")
            else:
                assert skipped == []
                assert error_lines(proc, "greylist") == error_lines(proc, "bayes") == []
            c.close()
            assert_sane(proc)
        finally:
            assert proc.stop() == 0
    assert not re.search(r"fail=tempfail", proc.log_text())
