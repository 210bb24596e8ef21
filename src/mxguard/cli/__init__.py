"""The ``mxguard`` command.

Errors a user can act on (bad config, address in use, unreadable file) are
printed as one line and exit 2; never a traceback.
"""

from __future__ import annotations

import sys

import click

from mxguard import __version__, config
from mxguard.cli.common import CONFIG_OPTION, load_or_exit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="mxguard")
def main() -> None:
    """mxguard: one daemon that makes a Postfix mail server spam-resistant."""


@main.command()
@CONFIG_OPTION
def serve(config_path: str | None) -> None:
    """Run the daemon (policy door on [policy] listen) until SIGTERM."""
    from mxguard.server.daemon import StartupError
    from mxguard.server.serve import serve as run

    cfg = load_or_exit(config_path)
    try:
        sys.exit(run(cfg, config_path))
    except StartupError as exc:
        click.echo(f"mxguard: cannot start: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"mxguard: cannot start: {exc.strerror or exc} "
                   f"({getattr(exc, 'filename', None) or cfg.policy.listen})", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(0)


@main.group("config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate FILE; exit 0 when it would load, 2 with the problem otherwise."""
    load_or_exit(file)
    click.echo(f"{file}: OK")


@config_group.command("show")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--no-docs", is_flag=True, help="omit the comment above each key")
def config_show(file: str | None, no_docs: bool) -> None:
    """Print the effective configuration (defaults filled in) as TOML."""
    click.echo(config.dump(load_or_exit(file), docs=not no_docs), nl=False)


def _register() -> None:
    from mxguard.cli import dmarc_received  # noqa: F401 - adds ingest and summary to dmarc
    from mxguard.cli.demo import demo
    from mxguard.cli.dkim import dkim
    from mxguard.cli.dmarc import dmarc
    from mxguard.cli.dns import dns
    from mxguard.cli.doctor import doctor
    from mxguard.cli.greylist import greylist
    from mxguard.cli.history import explain, history
    from mxguard.cli.learn import bayes, learn
    from mxguard.cli.metrics import metrics
    from mxguard.cli.postfix import postfix
    from mxguard.cli.scan import rules, scan
    from mxguard.cli.spf import spf
    from mxguard.cli.storage import storage
    from mxguard.cli.web import web

    for command in (greylist, spf, dkim, dmarc, scan, rules, learn, bayes, storage, postfix, dns,
                    doctor, demo, history, explain, metrics, web):
        main.add_command(command)


_register()
