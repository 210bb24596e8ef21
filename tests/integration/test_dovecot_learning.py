"""Learning from users' Junk folder through a real Dovecot (Debian's dovecot-imapd
and dovecot-sieve) with the IMAPSieve set-up `mxguard learn dovecot-setup` writes.

An IMAP client (imaplib) moves messages around; the Bayes store (SQLite beside
a running `mxguard serve`, or a real redis-server) must count:
into Junk -> spam; out of Junk -> ham (moved from spam); the same message into
Junk twice -> counted once; controls: moves between two other folders, and
from Junk to the Trash, teach nothing.

The pipe programs run as Dovecot ``script`` services (``--run-as root``): the
mail user (``nobody``) cannot run this checkout's Python, which lives under
/root (mode 0700). The programs' command lines themselves are what
``sieve_pipe_bin_dir`` mode runs too (tested in tests/unit/test_learn_cli.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.daemon import MxguardProcess
from tests.support.redis import redis_url  # noqa: F401 - fixture

from mxguard import config
from mxguard.cli.learn import dovecot_files, write_setup_file
from mxguard.store.backends import open_bayes_store
from mxguard.testing.dovecot import DovecotInstance, dovecot_missing, imap_ok

SPAM = (b"From: Pill Shop <offers@pills.example>\r\nTo: alice@example.org\r\n"
        b"Subject: cheap pills, best prices\r\nMessage-ID: <spam1@pills.example>\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n"
        b"Buy cheap pills now, no prescription needed. Click here.\r\n")


def message(n: int) -> bytes:
    return (f"From: Bob <bob@example.net>\r\nTo: alice@example.org\r\n"
            f"Subject: minutes of meeting {n}\r\nMessage-ID: <m{n}@example.net>\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:0{n % 10} +0000\r\n\r\n"
            f"Here are the minutes of meeting number {n}.\r\n").encode()


def require_dovecot() -> None:
    problem = dovecot_missing()
    if problem is None:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI must run the Dovecot test, but {problem}", pytrace=False)
    pytest.skip(problem)


class Box:
    """A Dovecot with mxguard's learning set up against ``config_path``."""

    def __init__(self, config_path: Path) -> None:
        self.cfg = config.load(str(config_path))
        self.workdir = Path(tempfile.mkdtemp(prefix="mxgdv-", dir="/tmp"))
        self.dovecot = DovecotInstance(self.workdir)
        self.dovecot.write_config()
        mxguard = f"{sys.executable} -m mxguard"
        for f in dovecot_files(mxguard=mxguard, config_path=str(config_path), run_as="root",
                               mail_user="nobody", **self.dovecot.dirs()):
            write_setup_file(f)
        self.dovecot.compile_sieve()
        self.dovecot.start()
        self.imap = self.dovecot.imap()

    def close(self) -> None:
        try:
            self.imap.logout()
        finally:
            self.dovecot.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def totals(self) -> tuple[int, int, int]:
        async def go() -> tuple[int, int, int]:
            store = open_bayes_store(self.cfg)
            try:
                st = await store.stats()
            finally:
                await store.close()
            return st.nspam, st.nham, st.seen
        return asyncio.run(go())

    def wait_totals(self, want: tuple[int, int, int], timeout: float = 60.0) -> None:
        """The MOVE returns once the pipe program has finished; poll a little anyway."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.totals()
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == want, f"(nspam, nham, seen) {got} != {want}\n{self.dovecot.log_tail()}"

    def append(self, folder: str, data: bytes) -> None:
        imap_ok(self.imap.append(folder, None, None, data), f"APPEND {folder}")

    def move_all(self, src: str, dst: str, *, copy: bool = False) -> None:
        imap_ok(self.imap.select(src), f"SELECT {src}")
        imap_ok(self.imap.uid("COPY" if copy else "MOVE", "1:*", dst), f"MOVE {src} {dst}")
        imap_ok(self.imap.close(), "CLOSE")

    def count(self, folder: str) -> int:
        data = imap_ok(self.imap.select(folder, readonly=True), f"SELECT {folder}")
        imap_ok(self.imap.close(), "CLOSE")
        return int(data[0])  # type: ignore[call-overload]


@pytest.fixture(params=["sqlite", "redis"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Box]:
    require_dovecot()
    daemon: MxguardProcess | None = None
    if request.param == "sqlite":  # beside a running daemon on the same store
        daemon = MxguardProcess(tmp_path, "[bayes]\nmin_spam = 1\nmin_ham = 1\n").start()
        conf = daemon.config
    else:
        url = request.getfixturevalue("redis_url")
        conf = tmp_path / "mxguard.toml"
        conf.write_text(f'[storage]\nurl = "{url}"\n')
    b = Box(conf)
    try:
        yield b
    finally:
        b.close()
        if daemon is not None:
            daemon.stop()
        print(b.dovecot.log_tail(60))


def test_into_junk_is_spam_out_of_junk_is_ham(box: Box) -> None:
    box.append("INBOX", SPAM)
    # control: between two folders that are not Junk nothing is learned ...
    box.move_all("INBOX", "Archive")
    assert box.count("Archive") == 1
    # ... and the next move, into Junk, is the only lesson
    box.move_all("Archive", "Junk")
    box.wait_totals((1, 0, 1))
    # the same message into Junk again (a client's APPEND): counted once
    box.append("Junk", SPAM)
    assert box.count("Junk") == 2
    box.wait_totals((1, 0, 1))
    # out of Junk (both copies) back to the INBOX: ham, no longer spam
    box.move_all("Junk", "INBOX")
    box.wait_totals((0, 1, 1))
    assert "non-zero exit code" not in box.dovecot.log_text()


def test_copy_into_junk_learns_and_junk_to_trash_does_not(box: Box) -> None:
    box.append("INBOX", message(1))
    box.move_all("INBOX", "Junk", copy=True)  # COPY, not MOVE: the same cause
    box.wait_totals((1, 0, 1))
    # control: deleting spam (Junk -> Trash) is no verdict on it ...
    box.move_all("Junk", "Trash")
    assert box.count("Trash") == 1
    # ... so the next lesson, another message into Junk, is the only change
    box.append("INBOX", message(2))
    imap_ok(box.imap.select("INBOX"), "SELECT")
    imap_ok(box.imap.uid("MOVE", "2", "Junk"), "MOVE")
    box.wait_totals((2, 0, 2))
    assert "non-zero exit code" not in box.dovecot.log_text()
