"""Learning from users' Junk folder through a real Dovecot (Debian's dovecot-imapd
and dovecot-sieve) with the IMAPSieve set-up `mxguard learn dovecot-setup` writes.

An IMAP client (imaplib) moves messages around; the Bayes store (SQLite beside
a running `mxguard serve`, or a real redis-server) must count:
into Junk -> spam; out of Junk -> ham (moved from spam); the same message into
Junk twice -> counted once; controls: moves between two other folders, and
from Junk to the Trash, teach nothing.

Both ways of running the pipe programs are tested: as Dovecot ``script``
services (``--run-as``) and from ``sieve_pipe_bin_dir`` as the mail user
(``nobody``, who then owns the SQLite store). When this interpreter lives where
the mail user cannot reach it (pyenv under /root, mode 0700), the bin-dir
programs start the system Python of the same version with this checkout's
package directories on PYTHONPATH (``mxguard_command_for_others``).
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
from mxguard.testing.dovecot import (
    DovecotInstance,
    dovecot_missing,
    imap_ok,
    mxguard_command_for_others,
)
from mxguard.testing.ports import free_port

SPAM = (b"From: Pill Shop <offers@pills.example>\r\nTo: alice@example.org\r\n"
        b"Subject: cheap pills, best prices\r\nMessage-ID: <spam1@pills.example>\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\n"
        b"Buy cheap pills now, no prescription needed. Click here.\r\n")


# the daemon beside the learning: Bayes from one lesson of each class, no DNS
# beyond a dead loopback port, no checks that would need it
DAEMON_CONFIG = (f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1\n'
                 '[helo]\nmode = "off"\n[spf]\nmode = "off"\n[dkim]\nmode = "off"\n'
                 'internal_hosts = []\n[dmarc]\nmode = "off"\n'
                 "[bayes]\nmin_spam = 1\nmin_ham = 1\nautolearn = false\n")


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
    """A Dovecot with mxguard's learning set up: ``storage`` is the [storage] url
    (None: SQLite in a state directory of the work directory); ``run_as`` None
    runs the pipe programs from sieve_pipe_bin_dir as the mail user, else as
    Dovecot script services under that user."""

    def __init__(self, storage: str | None, *, run_as: str | None, mxguard: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mxgdv-", dir="/tmp"))
        self.dovecot = DovecotInstance(self.workdir)
        self.dovecot.write_config()
        self.state = self.workdir / "mxguard-state"
        self.state.mkdir()
        self.daemon: MxguardProcess | None = None
        if storage is None and run_as is not None:  # beside a running daemon
            self.daemon = MxguardProcess(self.state, DAEMON_CONFIG)
            self.daemon.start()
            self.config_path = self.daemon.config
        else:
            self.config_path = self.workdir / "mxguard.toml"
            self.config_path.write_text(
                f'[storage]\nurl = "{storage or f"sqlite:///{self.state}/mxguard.db"}"\n')
        if run_as is None:  # the mail user writes the store (README: who writes it)
            self.dovecot.give_to_mail_user(self.state)
        self.cfg = config.load(str(self.config_path))
        for f in dovecot_files(mxguard=mxguard, config_path=str(self.config_path),
                               run_as=run_as, mail_user=self.dovecot.mail_user.pw_name,
                               **self.dovecot.dirs()):
            write_setup_file(f)
        self.dovecot.compile_sieve()
        self.dovecot.start()
        self.imap = self.dovecot.imap()

    def close(self) -> None:
        try:
            self.imap.logout()
        finally:
            self.dovecot.stop()
            if self.daemon is not None:
                self.daemon.stop()
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

    def move_subject(self, src: str, dst: str, subject: str) -> None:
        imap_ok(self.imap.select(src), f"SELECT {src}")
        (uids,) = imap_ok(self.imap.uid("SEARCH", "SUBJECT", f'"{subject}"'), "SEARCH")
        assert isinstance(uids, bytes) and len(uids.split()) == 1, uids
        imap_ok(self.imap.uid("MOVE", uids.decode(), dst), f"MOVE {src} {dst}")
        imap_ok(self.imap.close(), "CLOSE")

    def count(self, folder: str) -> int:
        data = imap_ok(self.imap.select(folder, readonly=True), f"SELECT {folder}")
        imap_ok(self.imap.close(), "CLOSE")
        return int(data[0])  # type: ignore[call-overload]


@pytest.fixture(params=["sqlite-daemon-services", "redis-services", "sqlite-bin-dir"])
def box(request: pytest.FixtureRequest) -> Iterator[Box]:
    """``-services``: ``--run-as root`` (the programs run as root, the owner of the
    store); ``-bin-dir``: the programs run as the mail user (nobody), who owns
    the SQLite store."""
    require_dovecot()
    if request.param == "sqlite-bin-dir":
        mxguard = mxguard_command_for_others()
        if mxguard is None:
            pytest.fail("no Python the mail user can run mxguard with", pytrace=False)
        b = Box(None, run_as=None, mxguard=mxguard)
    elif request.param == "redis-services":
        b = Box(request.getfixturevalue("redis_url"), run_as="root",
                mxguard=f"{sys.executable} -m mxguard")
    else:
        b = Box(None, run_as="root", mxguard=f"{sys.executable} -m mxguard")
    try:
        yield b
        log = b.dovecot.log_text()
        assert "mxguard-learn-spam" in log
        errors = [ln for ln in log.splitlines() if ": Error: " in ln or ": Fatal: " in ln]
        assert errors == [], errors
        if request.param == "sqlite-bin-dir":  # the mail user ran them and wrote the store
            assert f"program exec:{b.dovecot.bin_dir}/mxguard-learn-spam" in log
            assert (b.state / "mxguard-bayes.db").stat().st_uid == b.dovecot.mail_user.pw_uid
    finally:
        print(b.dovecot.log_tail(60))
        b.close()


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


def test_a_failing_learn_never_stops_the_move() -> None:
    """The store cannot be opened: the user's move still happens, and Dovecot's
    log has mxguard's one line saying why."""
    require_dovecot()
    blocker = Path(tempfile.mkdtemp(prefix="mxgdv-blocker-", dir="/tmp")) / "file"
    blocker.write_text("a file where the state directory should be\n")
    b = Box(f"sqlite:///{blocker}/mxguard.db", run_as="root",
            mxguard=f"{sys.executable} -m mxguard")
    try:
        b.append("INBOX", message(7))
        b.move_all("INBOX", "Junk")
        assert b.count("Junk") == 1 and b.count("INBOX") == 0
        log = b.dovecot.log_text()
        said = [ln for ln in log.splitlines() if "mxguard-learn-spam: Error: mxguard: " in ln]
        assert len(said) == 1 and "cannot open" in said[0], log[-3000:]
        assert "Execution of script" in log  # Dovecot notes the failed script, and moves on
        assert "Traceback" not in log
    finally:
        print(b.dovecot.log_tail(60))
        b.close()
        shutil.rmtree(blocker.parent, ignore_errors=True)


def _bayes_symbol(proc: MxguardProcess, raw: bytes) -> str:
    """The BAYES_* symbol the daemon's milter door gives ``raw`` ("" for none)."""
    from tests.integration.test_redis_fleet import _milter_client_module

    async def send() -> str:
        mc = _milter_client_module()
        client = mc.MilterClient(f"inet:127.0.0.1:{proc.milter_port}", timeout=20)
        try:
            assert await client.open(mc.Client(address="198.51.100.7")) is None
            outcome = await client.message(mc.Message.parse(raw, "bob@example.net",
                                                            ["alice@example.org"]))
        finally:
            await client.close()
        return " ".join(" ".join(outcome.added("X-Spam-Status")).split())

    status = asyncio.run(send())
    tests = status.partition("tests=")[2].partition(" ")[0].split(",")
    found = [t for t in tests if t.startswith("BAYES_")]
    return found[0] if found else ""


def test_the_running_daemon_scores_with_what_users_taught() -> None:
    require_dovecot()
    b = Box(None, run_as="root", mxguard=f"{sys.executable} -m mxguard")
    assert b.daemon is not None
    later_spam = SPAM.replace(b"<spam1@", b"<spam2@").replace(b"Click here.", b"Order today.")
    later_ham = message(2).replace(b"<m2@", b"<m3@")
    try:
        # control: nothing learned yet, Bayes does not score
        assert _bayes_symbol(b.daemon, later_spam) == ""
        b.append("Junk", message(1))  # a user's mistake (APPEND into Junk: spam) ...
        b.move_subject("Junk", "INBOX", "minutes of meeting 1")  # ... undone: ham
        b.append("INBOX", SPAM)
        b.move_subject("INBOX", "Junk", "cheap pills")
        b.wait_totals((1, 1, 2))
        spam_symbol = _bayes_symbol(b.daemon, later_spam)
        ham_symbol = _bayes_symbol(b.daemon, later_ham)
        assert spam_symbol in ("BAYES_95", "BAYES_99", "BAYES_999"), spam_symbol
        assert ham_symbol in ("BAYES_00", "BAYES_05"), ham_symbol
        assert "Traceback" not in b.daemon.log_text()
    finally:
        print(b.dovecot.log_tail(60))
        b.close()
