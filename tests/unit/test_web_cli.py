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
