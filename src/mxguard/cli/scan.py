"""``mxguard scan`` and ``mxguard rules check``: content scoring without a daemon.

* ``mxguard scan [FILE|-] [--json] [--config FILE]`` parses one message (a
  file, or standard input), runs the rules ``[content]`` names (built-in
  ``mxguard.cf``, ``rules_dirs``, ``local_rules``) and prints the score, the
  action ``[actions]`` would take and every rule hit with its points and
  description, like ``spamassassin -t``, followed by the X-Spam-* headers
  mxguard would add. SPF, DKIM, DMARC and HELO results do not exist outside
  the daemon, so rules that use them do not fire; Bayes is not consulted.
  Exit code 0 for ham and spam alike, 2 for an unreadable file or bad config.
* ``mxguard rules check [PATH...] [--config FILE] [--no-builtin]`` loads the
  given rule files/directories (default: those of the config) and reports the
  files read, rules by type (defined and active), ``eval:`` functions the
  engine does not implement (rule counts by name), network rules, metas
  disabled, ignored settings, and every parse error as ``file:line``. Exit
  code 1 when a file has errors, 0 otherwise.

Both commands are registered by ``mxguard.cli``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mxguard import config
from mxguard.checks.content import choose_action, is_spam, spam_headers
from mxguard.content.mime import parse_message
from mxguard.content.rules import BUILTIN_RULES, RuleSet, build_ruleset, rule_paths
from mxguard.core.transaction import Symbol

_CONFIG = click.option("--config", "-c", "config_path", metavar="FILE",
                       type=click.Path(dir_okay=False),
                       help="TOML config file (default: embedded defaults)")


def _config(path: str | None) -> config.Config:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        click.echo(f"mxguard: config error: {exc}", err=True)
        sys.exit(2)


def _read(source: str, limit: int) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read(limit + 1)
        with open(source, "rb") as fh:
            return fh.read(limit + 1)
    except OSError as exc:
        click.echo(f"mxguard: cannot read {source}: {exc.strerror or exc}", err=True)
        sys.exit(2)


def scan_message(raw: bytes, cfg: config.Config, ruleset: RuleSet) -> dict[str, Any]:
    """Everything ``mxguard scan`` prints, as a dict (the ``--json`` output)."""
    parsed = parse_message(raw, max_parts=cfg.content.max_parts,
                           max_bytes=cfg.milter.max_scan_size)
    result = ruleset.scan(parsed)
    action = choose_action(result.score, cfg.actions)
    symbols = [Symbol(h.name, h.score, h.description) for h in result.hits]
    headers = spam_headers(result.score, symbols, cfg,
                           descriptions={h.name: h.description for h in result.hits})
    return {
        "score": result.score,
        "required": cfg.actions.add_header,
        "spam": is_spam(result.score, cfg.actions),
        "action": action,
        "symbols": [{"name": h.name, "score": h.score, "count": h.count,
                     "description": h.description} for h in result.hits],
        "headers": [[h.name, h.value] for h in headers],
        "truncated": parsed.truncated,
        "problems": parsed.problems,
        "uris": len(parsed.uris),
        "attachments": [a.filename or a.content_type for a in parsed.attachments],
    }


def _print_report(report: dict[str, Any]) -> None:
    click.echo(f"Content analysis details:   ({report['score']:.1f} points, "
               f"{report['required']:.1f} required)")
    click.echo("")
    click.echo(" pts rule name              description")
    click.echo("---- ---------------------- " + "-" * 50)
    for sym in sorted(report["symbols"], key=lambda s: (-s["score"], s["name"])):
        name = sym["name"] if len(sym["name"]) <= 22 else sym["name"] + "\n" + " " * 27
        click.echo(f"{sym['score']:4.1f} {name:<22} {sym['description']}".rstrip())
    click.echo("")
    click.echo(f"score={report['score']:.1f} required={report['required']:.1f} "
               f"action={report['action'].replace(' ', '_')}")
    for name, value in report["headers"]:
        click.echo(f"{name}: {value}".replace("\r\n", "\n"))
    for problem in report["problems"]:
        click.echo(f"note: {problem}")


@click.command("scan")
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_CONFIG
def scan(file: str, as_json: bool, config_path: str | None) -> None:
    """Score one message (FILE, or - for standard input) with the content rules."""
    cfg = _config(config_path)
    raw = _read(file, cfg.milter.max_scan_size * 4)
    ruleset = build_ruleset(rule_paths(cfg))
    for err in ruleset.stats.errors[:5]:
        click.echo(f"mxguard: rules: {err}", err=True)
    report = scan_message(raw, cfg, ruleset)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)


@click.group("rules")
def rules() -> None:
    """Inspect content rule files (SpamAssassin .cf syntax)."""


@rules.command("check")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--no-builtin", is_flag=True, help="leave out mxguard's own rules")
@_CONFIG
def rules_check(paths: tuple[str, ...], no_builtin: bool, config_path: str | None) -> None:
    """Load rule files/directories (default: the config's) and report what was read."""
    cfg = _config(config_path)
    if paths:
        sources = ([] if no_builtin else [str(BUILTIN_RULES)]) + list(paths)
    else:
        sources = [p for p in rule_paths(cfg) if not (no_builtin and p == str(BUILTIN_RULES))]
    ruleset = build_ruleset(sources)
    st = ruleset.stats
    click.echo(f"files read: {len(st.files)} (engine {st.engine}, {st.seconds:.2f}s)")
    for f in st.files:
        click.echo(f"  {f}")
    click.echo("rules by type (defined / active):")
    for kind in sorted(set(st.defined) | set(st.active)):
        click.echo(f"  {kind:<10} {st.defined.get(kind, 0):6d} / {st.active.get(kind, 0)}")
    click.echo(f"  active total {sum(st.active.values())}, prefiltered by literals "
               f"{st.prefiltered}")
    unsupported = st.unsupported_evals
    click.echo(f"unsupported eval functions: {sum(unsupported.values())} rules, "
               f"{len(unsupported)} functions")
    for name, count in sorted(unsupported.items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {name} ({count})")
    click.echo(f"network rules (not run here; DNS lists are [dnsbl]): {st.net_rules}")
    click.echo(f"regexes that could not be translated: {st.unsupported_regex}")
    click.echo(f"metas disabled (undefined rule or cycle): {st.disabled_metas}")
    if st.ignored_settings:
        top = ", ".join(f"{k} {v}" for k, v in st.ignored_settings.most_common(12))
        click.echo(f"settings ignored: {sum(st.ignored_settings.values())} ({top})")
    for warning in st.warnings:
        click.echo(f"warning: {warning}")
    click.echo(f"errors: {len(st.errors)}")
    for err in st.errors:
        click.echo(f"  {err}")
    missing = [p for p in paths if not Path(p).exists()]
    sys.exit(1 if st.errors or missing else 0)


__all__ = ["rules", "scan", "scan_message"]
