"""``mxguard web passwd``: the password from stdin, a ready config line out."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from mxguard.cli import main
from mxguard.web.auth import verify_password


def run(stdin: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["web", "passwd"], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_passwd_from_stdin() -> None:
    code, out, err = run("s3cret-passw0rd\n")
    assert code == 0, err
    m = re.fullmatch(r'password_hash = "(scrypt\$[^"]+)"\n', out)
    assert m, out
    assert verify_password("s3cret-passw0rd", m.group(1))
    assert not verify_password("s3cret-passw0rd\n", m.group(1))  # the newline is not part
    assert "s3cret" not in out  # never the password itself


@pytest.mark.parametrize(("stdin", "needle"), [
    ("short\n", "at least 8"),
    ("", "at least 8"),
    ("x" * 1100 + "\n", "longer than 1024"),
])
def test_passwd_refuses(stdin: str, needle: str) -> None:
    code, out, err = run(stdin)
    assert code == 2 and out == ""
    assert needle in err


def _on_tty(answers: list[str]) -> tuple[int, str]:
    """Run the real command on a pseudo-terminal (its controlling terminal, through
    util-linux ``setsid --ctty``: no fork of this threaded test process), typing
    ``answers`` at its prompts."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(["setsid", "--ctty", sys.executable, "-m", "mxguard", "web",
                             "passwd"], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out = b""
    prompts = (b"New dashboard password:", b"Again:")
    typed = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the other side is closed
                    break
                out += chunk
            asked = sum(out.count(p) for p in prompts)
            while typed < min(asked, len(answers)):
                os.write(master, answers[typed].encode() + b"\r")
                typed += 1
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        while select.select([master], [], [], 0.2)[0]:  # what it wrote last
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace")


def test_passwd_on_a_terminal_asks_twice_without_echo() -> None:
    code, out = _on_tty(["tty-password-1", "tty-password-1"])
    assert code == 0, out
    assert "New dashboard password:" in out and "Again:" in out
    assert "tty-password-1" not in out  # not echoed, not printed
    m = re.search(r'password_hash = "(scrypt\$[^"]+)"', out)
    assert m and verify_password("tty-password-1", m.group(1))


def test_passwd_on_a_terminal_refuses_a_mismatch() -> None:
    code, out = _on_tty(["tty-password-1", "tty-password-2"])  # control: they differ
    assert code == 1 and "the two passwords differ" in out and "password_hash" not in out
