"""``mxguard postfix setup``: wire Postfix to mxguard -- show the changes, or apply them.

    mxguard postfix setup [--config-dir /etc/postfix] [--config FILE]      # dry run: a diff
    mxguard postfix setup --apply [--replace-seed]                         # change, check, reload
    mxguard postfix setup --revert                                         # restore the last backup

What mxguard needs in main.cf, and nothing else (README "Wiring Postfix"):

* ``smtpd_helo_required = yes``;
* ``check_policy_service { <policy>, policy_context=helo }`` in
  ``smtpd_helo_restrictions``, after ``permit_mynetworks`` /
  ``permit_sasl_authenticated``;
* ``check_policy_service <policy>`` in ``smtpd_recipient_restrictions`` after
  ``permit_mynetworks``, ``permit_sasl_authenticated`` and
  ``reject_unauth_destination`` (the last one is added when missing, so nobody
  can probe mxguard for an open relay), and in ``smtpd_data_restrictions``;
* ``smtpd_policy_service_default_action = DUNNO``: mail flows when the
  policy door is down (greylisting and SPF are skipped meanwhile);
* our milter appended to ``smtpd_milters`` and ``non_smtpd_milters`` (other
  milters are kept), ``milter_protocol = 6`` and ``milter_default_action =
  tempfail`` (see :data:`MILTER_DEFAULT_ACTION_WHY`).

An empty restriction list is created as README shows it, with
``permit_mynetworks, permit_sasl_authenticated`` first, so your own users are
never greylisted. Parameters whose effective value (default included) is
already right are left alone. ``--replace-seed`` also removes what mxguard
replaces: ``reject_*_helo_hostname`` and the postgrey / policyd-spf
``check_policy_service`` entries of every restriction list, and comments out
the policyd-spf ``spawn`` service of master.cf once nothing refers to it.

master.cf needs nothing for mxguard: it is a standalone daemon that Postfix
connects to (inet or unix socket), not a service Postfix spawns.

How: values are read with ``postconf -c DIR -h`` (continuation lines
joined, comments dropped) and parsed like Postfix does (commas and
whitespace separate, ``{ ... }`` groups stay one entry). Our entry is
inserted into the value's text, so the rest of the value keeps its
separators. Every change is a ``postconf -c DIR -e`` (or ``-M#`` / ``-#``)
command, first run on a copy of main.cf/master.cf to produce the exact
diff; ``--apply`` then backs up both files (``main.cf.mxguard-<time>``),
runs the same commands on DIR, ``postfix -c DIR check``, and ``postfix
reload`` when ``postfix status`` says it runs. postconf -e writes an edited
parameter on one line (it refuses multi-line values); comment lines that
were inside it stay in the file, below it. Nothing else in the file changes.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import click

from mxguard.cli.common import config_option, fail, load_or_exit
from mxguard.cli.postfix_apply import BACKUP_TAG, apply, check_and_reload, revert
from mxguard.cli.postfix_conf import DEFAULT_CONFIG_DIR, SetupError
from mxguard.cli.postfix_plan import MILTER_DEFAULT_ACTION, Options, Plan, make_plan

# ------------------------------------------------------------------ CLI


def _command(config_dir: Path, args: Sequence[str]) -> str:
    return shlex.join(["postconf", "-c", str(config_dir), *args])


def print_plan(plan: Plan) -> None:
    click.echo(f"Postfix config {plan.config_dir}: mxguard policy door {plan.policy}, "
               f"milter {plan.milter}")
    if not plan.changes:
        click.echo("nothing to change: Postfix is wired to mxguard")
    for change in plan.changes:
        click.echo(f"  change  {change.what}")
    for note in plan.notes:
        click.echo(f"  note    {note}")


@click.group("postfix")
def postfix() -> None:
    """Wire Postfix to mxguard (main.cf, master.cf)."""


@postfix.command("setup")
@click.option("--apply", "do_apply", is_flag=True,
              help="make the changes (default: show them as a diff)")
@click.option("--revert", "do_revert", is_flag=True,
              help="restore main.cf/master.cf from the latest mxguard backup")
@click.option("--config-dir", default=DEFAULT_CONFIG_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Postfix configuration directory")
@config_option("mxguard TOML config ([policy] and [milter] listen)")
@click.option("--replace-seed", is_flag=True,
              help="also remove reject_*_helo_hostname and the postgrey / policyd-spf "
                   "check_policy_service entries (mxguard does those checks)")
@click.option("--milter-default-action", type=click.Choice(["tempfail", "accept"]),
              default=MILTER_DEFAULT_ACTION, show_default=True,
              help="what Postfix does when mxguard's milter is down")
@click.option("--no-check", is_flag=True,
              help="with --apply/--revert: skip postfix check and reload (a copy of a "
                   "config dir, no Postfix running from it)")
@click.option("--no-diff", is_flag=True, help="do not print the diff")
def setup_cmd(do_apply: bool, do_revert: bool, config_dir: str, config_path: str | None,
              replace_seed: bool, milter_default_action: str, no_check: bool,
              no_diff: bool) -> None:
    """Show (default) or apply every Postfix change mxguard needs; idempotent."""
    if do_apply and do_revert:
        raise click.UsageError("--apply and --revert exclude each other")
    cdir = Path(config_dir).absolute()
    try:
        if do_revert:
            _revert(cdir, no_check)
            return
        cfg = load_or_exit(config_path)
        opts = Options(replace_seed=replace_seed, milter_default_action=milter_default_action,
                       milter=cfg.milter.enabled)
        plan = make_plan(cfg, cdir, opts)
        print_plan(plan)
        if not no_diff:
            for text in plan.diffs:
                click.echo(text, nl=False)
        if not plan.changes:
            return
        if not do_apply:
            click.echo("dry run: nothing was changed. The postconf commands:")
            for args in plan.commands():
                click.echo(f"  {_command(cdir, args)}")
            click.echo(f"apply with: mxguard postfix setup --apply --config-dir {cdir}"
                       + (" --replace-seed" if replace_seed else ""))
            return
        made = apply(plan)
        click.echo("backup: " + ", ".join(str(p) for p in made))
        click.echo(f"applied {len(plan.changes)} changes (undo: mxguard postfix setup "
                   f"--revert --config-dir {cdir})")
        if not no_check:
            for line in check_and_reload(cdir, cfg):
                click.echo(line)
    except SetupError as exc:
        fail(str(exc), 1 if do_apply or do_revert else 2)


def _revert(cdir: Path, no_check: bool) -> None:
    done = revert(cdir)
    if not done:
        fail(f"no mxguard backup in {cdir} to restore (backups are named "
              f"main.cf{BACKUP_TAG}<time>)", 1)
    for target, kept in done:
        click.echo(f"restored {target} from its backup (now kept as {kept.name})")
    if not no_check:
        for line in check_and_reload(cdir):
            click.echo(line)


__all__ = ["postfix", "print_plan"]
