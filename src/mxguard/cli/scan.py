"""``mxguard scan`` and ``mxguard rules check``: content scoring without a daemon.

* ``mxguard scan [FILE|-] [--json] [--network] [--config FILE]`` runs one
  message (a file, or standard input) through the same pipeline the milter
  door runs at end of message: the rules ``[content]`` names, Bayes from the
  configured store (read only: nothing is learned), blocklists when
  ``[dnsbl]`` is on, and with ``--network`` DKIM and DMARC through the
  configured DNS; then the same ``[actions]``. It prints every symbol with its
  points and description, like ``spamassassin -t``, the score and the action,
  and the headers the milter would add -- its X-Spam-Status equals the
  milter's for the same message and config. There is no SMTP client here, so
  SPF and HELO do not run. Exit code 0 for ham and spam alike, 2 for an
  unreadable file or bad config.
* ``mxguard rules check [PATH...] [--config FILE] [--no-builtin]`` loads the
  given rule files/directories (default: those of the config) and reports the
  files read, rules by type (defined and active), ``eval:`` functions the
  engine does not implement (rule counts by name), network rules, metas
  disabled, ignored settings, and every parse error as ``file:line``. Exit
  code 1 when a file has errors, 0 otherwise.

Both commands are registered by ``mxguard.cli``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from mxguard import config
from mxguard.checks import run_message
from mxguard.checks.rules import RULES_SERVICE
from mxguard.cli.common import CONFIG_OPTION, fail, load_or_exit
from mxguard.content.rules import BUILTIN_RULES, RuleSet, build_ruleset, rule_paths
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import HeaderChange, Message, Mode, Stage, Transaction
from mxguard.core.verdict import NO_ACTION, is_spam
from mxguard.dns import Resolver
from mxguard.server.daemon import StartupError, open_content_services


def _read(source: str, limit: int) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read(limit + 1)
        with open(source, "rb") as fh:
            return fh.read(limit + 1)
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror or exc}")


def offline(cfg: config.Config) -> config.Config:
    """The config without the checks that need the network or an SMTP client."""
    off = Mode.OFF
    return dataclasses.replace(cfg, spf=dataclasses.replace(cfg.spf, mode=off),
                               dkim=dataclasses.replace(cfg.dkim, mode=off),
                               dmarc=dataclasses.replace(cfg.dmarc, mode=off))


async def scan_async(raw: bytes, cfg: config.Config, services: dict[str, Any], *,
                     network: bool = False) -> dict[str, Any]:
    """Everything ``mxguard scan`` prints, as a dict (the ``--json`` output)."""
    run_cfg = cfg if network else offline(cfg)
    rt = Runtime(config=run_cfg, resolver=Resolver(run_cfg.dns), services=services,
                 dry_run=True)
    message = Message.from_bytes(raw[:cfg.milter.max_scan_size + 1])
    message.truncated = len(raw) > cfg.milter.max_scan_size
    tx = Transaction(stage=Stage.EOM, size=message.size, message=message)
    verdict = await run_message(tx, rt)
    parsed = tx.parsed
    rules = tx.results.get("rules")
    descriptions = {h.name: h.description for h in rules.data.hits} if rules else {}
    counts = {h.name: h.count for h in rules.data.hits} if rules else {}
    score = round(verdict.score, 3)
    return {
        "score": score,
        "required": cfg.actions.add_header,
        "spam": is_spam(score, cfg.actions),
        "action": verdict.extra.get("spam_action", NO_ACTION),
        "verdict": verdict.action.value,
        "decided_by": verdict.decided_by,
        "reply": verdict.decision.reply() if verdict.decision is not None else "",
        "symbols": [{"name": s.name, "score": s.score, "count": counts.get(s.name, 1),
                     "description": descriptions.get(s.name) or s.detail}
                    for s in verdict.symbols],
        "headers": [[h.name, h.value] for h in verdict.headers
                    if not isinstance(h, HeaderChange) or h.op != "delete"],
        "timings_ms": {k: round(v, 3) for k, v in verdict.timings.items()},
        "truncated": bool(parsed is not None and parsed.truncated),
        "problems": list(parsed.problems) if parsed is not None else [],
        "uris": len(parsed.uris) if parsed is not None else 0,
        "attachments": [a.filename or a.content_type for a in parsed.attachments]
        if parsed is not None else [],
    }


def scan_message(raw: bytes, cfg: config.Config, ruleset: RuleSet | None = None, *,
                 services: dict[str, Any] | None = None,
                 network: bool = False) -> dict[str, Any]:
    """:func:`scan_async` in a fresh event loop; ``ruleset`` overrides the config's."""
    svc = dict(services) if services is not None else {}
    if ruleset is not None:
        svc[RULES_SERVICE] = ruleset
    return asyncio.run(scan_async(raw, cfg, svc, network=network))


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
    if report["reply"]:
        click.echo(f"reply: {report['reply']} (by {report['decided_by']})")
    for name, value in report["headers"]:
        click.echo(f"{name}: {value}".replace("\r\n", "\n"))
    for problem in report["problems"]:
        click.echo(f"note: {problem}")


@click.command("scan")
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--network", is_flag=True,
              help="also verify DKIM and DMARC through the configured DNS")
@CONFIG_OPTION
def scan(file: str, as_json: bool, network: bool, config_path: str | None) -> None:
    """Score one message (FILE, or - for standard input) as the milter door would."""
    cfg = load_or_exit(config_path)
    raw = _read(file, cfg.milter.max_scan_size * 4)
    try:
        services = open_content_services(cfg)
    except StartupError as exc:
        fail(str(exc))
    ruleset = services.get(RULES_SERVICE)
    for err in (ruleset.stats.errors[:5] if isinstance(ruleset, RuleSet) else []):
        click.echo(f"mxguard: rules: {err}", err=True)
    try:
        report = scan_message(raw, cfg, services=services, network=network)
    finally:
        store = services.get("bayes_store")
        close = getattr(store, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                asyncio.run(result)
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
@CONFIG_OPTION
def rules_check(paths: tuple[str, ...], no_builtin: bool, config_path: str | None) -> None:
    """Load rule files/directories (default: the config's) and report what was read."""
    cfg = load_or_exit(config_path)
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
