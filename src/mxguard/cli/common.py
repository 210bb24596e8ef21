"""What the ``mxguard`` commands share: the ``--config`` option, loading the
config, one-line errors, and the ``--ip`` option.

Every command module imports these from here, never from another command's
module. Errors a user can act on are one line on stderr, ``mxguard: ...``,
and exit 2 unless said otherwise; never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from mxguard import config
from mxguard.auth import spf as engine
from mxguard.redact import redact

CONFIG_HELP = "TOML config file (default: embedded defaults)"

_FC = TypeVar("_FC", bound=Callable[..., Any] | click.Command)


def config_option(help: str = CONFIG_HELP, *, short: bool = True,
                  metavar: str | None = "FILE") -> Callable[[_FC], _FC]:
    """``--config FILE`` (and ``-c`` unless ``short=False``), passed as ``config_path``.

    Each command words ``help`` for the sections it reads; ``metavar=None``
    shows click's default (``PATH``)."""
    names = ("--config", "-c") if short else ("--config",)
    return click.option(*names, "config_path", metavar=metavar,
                        type=click.Path(dir_okay=False), default=None, help=help)


CONFIG_OPTION = config_option()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``mxguard: message`` on stderr and exit with ``code``."""
    click.echo(f"mxguard: {redact(message)}", err=True)
    sys.exit(code)


def load_or_exit(path: str | None) -> config.Config:
    """The config of ``path`` (embedded defaults for None); a bad one exits 2."""
    try:
        return config.load(path)
    except config.ConfigError as exc:
        fail(f"config error: {exc}")


def ip_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """click callback of ``--ip``: the address normalised, ``[...]`` and blanks dropped."""
    if value is None:
        return None
    try:
        return str(engine.client_ip(value.strip().strip("[]")))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 or IPv6 address") from None


__all__ = ["CONFIG_HELP", "CONFIG_OPTION", "config_option", "fail", "ip_option",
           "load_or_exit"]
