"""The ``mxguard`` command.

Errors a user can act on (bad config, address in use, unreadable file) are
printed as one line and exit 2; never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from mxguard import __version__, config
from mxguard.cli.common import CONFIG_OPTION, load_or_exit

# Command groups by name -> "module:attribute", imported only when run (or listed by
# --help): `mxguard learn --stdin`, run once per message by Dovecot, does not pay for
# importing every other command (DNS, DKIM, the dashboard ...).
LAZY_COMMANDS: dict[str, str] = {
    "bayes": "mxguard.cli.learn:bayes",
    "demo": "mxguard.cli.demo:demo",
    "dkim": "mxguard.cli.dkim:dkim",
    "dmarc": "mxguard.cli.dmarc_received:dmarc",  # adds ingest and summary to cli.dmarc's group
    "dns": "mxguard.cli.dns:dns",
    "doctor": "mxguard.cli.doctor:doctor",
    "explain": "mxguard.cli.history:explain",
    "greylist": "mxguard.cli.greylist:greylist",
    "history": "mxguard.cli.history:history",
    "learn": "mxguard.cli.learn:learn",
    "metrics": "mxguard.cli.metrics:metrics",
    "postfix": "mxguard.cli.postfix:postfix",
    "rules": "mxguard.cli.scan:rules",
    "scan": "mxguard.cli.scan:scan",
    "spf": "mxguard.cli.spf:spf",
    "storage": "mxguard.cli.storage:storage",
    "web": "mxguard.cli.web:web",
}


class LazyGroup(click.Group):
    """A group whose subcommands in :data:`LAZY_COMMANDS` are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        module_name, _, attr = LAZY_COMMANDS[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        self.add_command(command, cmd_name)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
