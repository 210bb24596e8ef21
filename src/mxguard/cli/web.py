"""``mxguard web passwd``: make the ``[web] password_hash`` of the dashboard login.

On a terminal the password is asked twice without echo (getpass); otherwise it
is the first line of standard input (``echo "$PW" | mxguard web passwd``, or a
file). The output is one ready line, ``password_hash = "scrypt$..."``, to put
under ``[web]``; the password itself is never printed or logged.
"""

from __future__ import annotations

import getpass
import sys

import click

from mxguard.cli.common import fail
from mxguard.web.auth import MAX_PASSWORD, hash_password

MIN_PASSWORD = 8


def read_password() -> str:
    """The new password: asked twice on a tty, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("New dashboard password: ")
        second = getpass.getpass("Again: ")
        if first != second:
            fail("web passwd: the two passwords differ; nothing changed", 1)
        return first
    line = sys.stdin.readline(MAX_PASSWORD + 2)
    return line.rstrip("\r\n")


@click.group("web")
def web() -> None:
    """The web dashboard."""


@web.command("passwd")
def passwd() -> None:
    """Print a password_hash line for [web] (reads the password without echo)."""
    password = read_password()
    if len(password.encode()) > MAX_PASSWORD:
        fail(f"web passwd: a password longer than {MAX_PASSWORD} bytes is not accepted", 2)
    if len(password) < MIN_PASSWORD:
        fail(f"web passwd: the password needs at least {MIN_PASSWORD} characters", 2)
    click.echo(f'password_hash = "{hash_password(password)}"')


__all__ = ["passwd", "web"]
