"""A private Dovecot (IMAP only) for tests: its own config, base_dir and log in a
work directory, one passwd-file user with a Maildir there, listening on a
loopback port, with mxguard's IMAPSieve learning set up exactly as
``mxguard learn dovecot-setup`` writes it.

Start it as root (Dovecot's master binds and drops privileges); the mail user
is an unprivileged system account (``nobody`` by default), so the work
directory must be searchable by others and the Bayes store it learns into
writable by that account: :meth:`DovecotInstance.give_to_mail_user`.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from mxguard.testing.others import mxguard_argv_for
from mxguard.testing.ports import free_port

PASSWORD = "mxguard-test-password"  # of the one test user; loopback only


class DovecotError(RuntimeError):
    """Dovecot did not start, or a command failed; the message has the log tail."""


def _find(name: str, fallback: str) -> str | None:
    return shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)


def find_dovecot() -> str | None:
    return _find("dovecot", "/usr/sbin/dovecot")


def find_sievec() -> str | None:
    return _find("sievec", "/usr/bin/sievec")


def dovecot_missing() -> str | None:
    """None when a private Dovecot with IMAPSieve can run here, else what is missing."""
    if find_dovecot() is None:
        return "Dovecot is not installed (Debian: apt-get install dovecot-imapd dovecot-sieve)"
    modules = Path("/usr/lib/dovecot/modules")
    for need in ("lib95_imap_sieve_plugin.so", "sieve/lib90_sieve_imapsieve_plugin.so",
                 "sieve/lib90_sieve_extprograms_plugin.so"):
        if not (modules / need).exists():
            return f"Dovecot's {need} is missing (Debian: apt-get install dovecot-sieve)"
    if find_sievec() is None:
        return "sievec is not installed (Debian: apt-get install dovecot-sieve)"
    if os.geteuid() != 0:
        return "a private Dovecot must be started as root"
    return None


class DovecotInstance:
    """One private Dovecot. ``extra_conf`` is appended to dovecot.conf; ``setup``
    are the (name, text) files of ``mxguard learn dovecot-setup`` whose paths lie in
    this instance's ``sieve``/``bin``/``conf.d`` directories (see :meth:`dirs`)."""

    def __init__(self, workdir: Path, *, user: str = "alice", mail_user: str = "nobody",
                 port: int | None = None) -> None:
        self.workdir = workdir
        self.user = user
        self.mail_user = pwd.getpwnam(mail_user)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "dovecot.conf"
        self.log = workdir / "dovecot.log"
        self.sieve_dir = workdir / "sieve"
        self.bin_dir = workdir / "sieve" / "bin"
        self.conf_dir = workdir / "conf.d"
        self.home = workdir / "home" / user

    def dirs(self) -> dict[str, str]:
        """``dovecot_files`` keyword arguments naming this instance's directories."""
        return {"sieve_dir": str(self.sieve_dir), "bin_dir": str(self.bin_dir),
                "conf_dir": str(self.conf_dir)}

    def give_to_mail_user(self, path: Path) -> None:
        """Make ``path`` (a directory, recursively) owned by the mail user."""
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        os.chown(path, uid, gid)
        for root, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def write_config(self) -> None:
        w = self.workdir
        os.chmod(w, 0o755)  # the mail user runs the pipe programs from here
        for d in (w / "run", w / "state", self.conf_dir, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.give_to_mail_user(w / "home")
        (w / "passwd").write_text(f"{self.user}:{{PLAIN}}{PASSWORD}::::::\n")
        os.chown(w / "passwd", 0, grp.getgrnam("dovecot").gr_gid)  # read by auth (dovecot)
        os.chmod(w / "passwd", 0o640)
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        self.conf.write_text(f"""\
# private Dovecot of mxguard's tests (mxguard.testing.dovecot)
base_dir = {w}/run
state_dir = {w}/state
log_path = {self.log}
info_log_path = {self.log}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {min(uid, 500)}
last_valid_uid = 0
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
  mailbox Archive {{
    auto = create
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {w}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={w}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0600
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
mail_debug = yes
!include_try {self.conf_dir}/*.conf
""")

    def compile_sieve(self) -> None:
        """``sievec`` every script of :attr:`sieve_dir`, as the README tells admins."""
        sievec = find_sievec()
        if sievec is None:
            raise DovecotError("sievec is not installed (Debian: dovecot-sieve)")
        for script in sorted(self.sieve_dir.glob("*.sieve")):
            res = subprocess.run([sievec, "-c", str(self.conf), str(script)],
                                 capture_output=True, text=True, timeout=60, check=False)
            if res.returncode != 0:
                raise DovecotError(f"sievec {script}: {res.stdout}{res.stderr}")

    def start(self, timeout: float = 30.0) -> DovecotInstance:
        dovecot = find_dovecot()
        if dovecot is None:
            raise DovecotError("dovecot is not installed")
        if not self.conf.exists():
            self.write_config()
        self.proc = subprocess.Popen([dovecot, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise DovecotError(f"dovecot exited: {err}\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1.0) as s:
                if s.recv(200).startswith(b"* OK"):
                    return self
            time.sleep(0.1)
        self.stop()
        raise DovecotError(f"dovecot did not answer on port {self.port}\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> DovecotInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "dovecot log tail:\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def imap(self) -> imaplib.IMAP4:
        """A logged-in IMAP connection of the test user."""
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=60)
        conn.login(self.user, PASSWORD)
        return conn


def mxguard_command_for_others() -> str | None:
    """A shell command line that starts this checkout's mxguard for a user other
    than root (the mail user running the pipe programs), or None.

    See ``mxguard.testing.others``: a checkout or environment under a directory
    only root may enter is mirrored to a place the mail user can reach."""
    argv = mxguard_argv_for()
    return None if argv is None else shlex.join(argv)


def imap_ok(result: tuple[str, Sequence[object]], what: str) -> list[object]:
    """The data of an imaplib reply, or DovecotError when it is not OK."""
    typ, data = result
    if typ != "OK":
        raise DovecotError(f"IMAP {what}: {typ} {data!r}")
    return list(data)


__all__ = ["PASSWORD", "DovecotError", "DovecotInstance", "dovecot_missing", "find_dovecot",
           "find_sievec", "imap_ok", "mxguard_command_for_others"]
