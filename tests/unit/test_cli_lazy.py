"""The ``mxguard`` group imports its subcommands on first use; each name maps to the
command of that name, and running one command does not import the others."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from mxguard.cli import LAZY_COMMANDS, main


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_each_lazy_name_is_that_command(name: str) -> None:
    ctx = click.Context(main)
    command = main.get_command(ctx, name)
    assert isinstance(command, click.Command)
    assert command.name == name


def test_unknown_command_is_none_not_an_import() -> None:  # control
    assert main.get_command(click.Context(main), "no-such-command") is None


def test_help_lists_every_command() -> None:
    names = main.list_commands(click.Context(main))
    assert set(LAZY_COMMANDS) <= set(names)
    assert {"serve", "config"} <= set(names)


def test_one_command_does_not_import_the_others() -> None:
    code = ("import sys\nfrom mxguard.cli import main\n"
            "main.get_command(__import__('click').Context(main), 'learn')\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('mxguard.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "mxguard.cli.learn" in out
    for other in ("mxguard.cli.web", "mxguard.web.app", "mxguard.cli.dkim", "mxguard.cli.demo"):
        assert other not in out
