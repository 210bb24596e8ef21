"""``mxguard spf ...``: check a sender against SPF, lint a domain's SPF record.

* ``mxguard spf check --ip IP --sender ADDR [--helo NAME] [--trace] [--json]``
  runs the same evaluation as the daemon (HELO identity first when
  ``[spf] helo_check``, then MAIL FROM) and prints the result, the
  explanation, the matched mechanism, the reply mxguard would give, the
  Received-SPF field and, with ``--trace``, every DNS lookup in order.
  Exit code 0 whatever the result; 2 for bad arguments or a bad config.
* ``mxguard spf lint DOMAIN [--ip IP]`` reports the SPF record(s) found, syntax
  errors term by term, the DNS-querying terms counted through include: and
  redirect= (limit 10) and the void lookups (limit 2), whether ``--ip``
  passes, and the record to publish for the recommended policy
  (``v=spf1 mx -all``). One ``PASS`` / ``WARN`` / ``FAIL`` line per finding,
  each problem followed by its fix. Exit code 0 without FAIL lines, 1 with
  some, 2 for bad arguments.

Both use ``[dns]`` of ``--config FILE`` (nameservers, timeout) and ``[spf]``.
The lint's checks are :mod:`mxguard.auth.spf_lint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
from dataclasses import asdict
from typing import Any

import click

from mxguard import config
from mxguard.auth import spf as engine
from mxguard.auth.spf import SpfResult
from mxguard.auth.spf_lint import RECOMMENDED, Lint, lint_domain, printable
from mxguard.cli.common import config_option, ip_option, load_or_exit
from mxguard.core.transaction import Mode
from mxguard.dns import Resolver

_with_config = config_option("mxguard TOML config file ([dns] nameservers, [spf])")


@click.group("spf")
def spf() -> None:
    """Check a sender against SPF, or lint a domain's SPF record."""


# ------------------------------------------------------------------ check


async def _check(cfg: config.Config, ip: str, sender: str, helo: str,
                 receiver: str) -> tuple[SpfResult | None, SpfResult]:
    """(HELO identity result or None, MAIL FROM result), as the daemon evaluates."""
    resolver = Resolver(cfg.dns)
    timeout = cfg.spf.timeout
    helo_res: SpfResult | None = None
    if cfg.spf.helo_check and helo:
        helo_res = await engine.check_helo(resolver, ip, helo, receiver=receiver,
                                           timeout=timeout)
    if not sender and helo_res is not None:  # the same evaluation (RFC 7208 §2.4)
        return None, dataclasses.replace(helo_res, identity="mailfrom")
    mailfrom = await engine.check_mailfrom(resolver, ip, sender, helo, receiver=receiver,
                                           timeout=timeout)
    return helo_res, mailfrom


def _reply(cfg: config.Config, res: SpfResult, receiver: str) -> str:
    """What the daemon answers for this result: an SMTP reply, or the score."""
    from mxguard.checks.spf import decision

    found = decision(cfg.spf, res, receiver)
    if found is not None:
        mode = cfg.mode("spf")
        held = "" if mode is Mode.ENFORCE else f" (not sent: [spf] mode is {mode})"
        return found.reply() + held
    name = ("SPF_HELO_" if res.identity == "helo" else "SPF_") + res.result.upper()
    return f"accept (symbol {name}, score {cfg.score(name):+g})"


def _as_dict(res: SpfResult, cfg: config.Config, receiver: str, trace: bool) -> dict[str, Any]:
    out = asdict(res)
    if not trace:
        del out["trace"]
    out["received_spf"] = engine.received_spf(res, receiver)
    out["reply"] = _reply(cfg, res, receiver)
    return out


@spf.command("check")
@click.option("--ip", required=True, callback=ip_option, help="the client's IP address")
@click.option("--sender", required=True,
              help='MAIL FROM address; "" or "<>" for the null sender (then --helo is needed)')
@click.option("--helo", default="", help="the HELO/EHLO name the client gave")
@click.option("--trace", is_flag=True, help="also print every DNS lookup, in order")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@_with_config
def check_cmd(ip: str, sender: str, helo: str, trace: bool, as_json: bool,
              config_path: str | None) -> None:
    """Evaluate SPF for one client IP, sender and HELO name, as the daemon does."""
    cfg = load_or_exit(config_path)
    sender = sender.strip()
    if sender == "<>":
        sender = ""
    elif sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if not sender and not helo:
        raise click.UsageError("a null sender is checked as postmaster@<HELO>: give --helo")
    receiver = socket.gethostname() or "localhost"
    helo_res, res = asyncio.run(_check(cfg, ip, sender, helo, receiver))
    if as_json:
        doc = _as_dict(res, cfg, receiver, trace)
        doc["helo_result"] = _as_dict(helo_res, cfg, receiver, trace) if helo_res else None
        click.echo(json.dumps(doc, indent=2, ensure_ascii=True))
        return
    _print_result(res, cfg, receiver)
    if helo_res is not None:
        click.echo(f"helo identity: {helo_res.result} for {helo_res.domain or helo!r}"
                   + (f" (mechanism {helo_res.mechanism})" if helo_res.mechanism else "")
                   + (f": {helo_res.problem}" if helo_res.problem
                      and helo_res.result in ("permerror", "temperror") else ""))
        if helo_res.result == "fail":
            click.echo(f"helo reply:   {_reply(cfg, helo_res, receiver)}")
    if trace:
        for title, r in (("trace (helo identity)", helo_res), ("trace (mail from)", res)):
            if r is None:
                continue
            click.echo(f"{title}:")
            for i, line in enumerate(r.trace, 1):
                click.echo(f"  {i:2d}. {printable(line)}")
            if not r.trace:
                click.echo("   (no DNS lookups)")


def _print_result(res: SpfResult, cfg: config.Config, receiver: str) -> None:
    rows = [
        ("result", res.result),
        ("identity", f"{res.identity} ({res.sender})"),
        ("domain", res.domain),
        ("client", res.client_ip),
        ("mechanism", res.mechanism or "-"),
    ]
    if res.result == "fail":
        source = "from the domain's exp=" if res.explanation_from_domain else "default"
        rows.append(("explanation", f"{res.explanation} ({source})"))
    if res.problem:
        rows.append(("problem", res.problem))
    rows.append(("reply", _reply(cfg, res, receiver)))
    rows.append(("header", "Received-SPF: " + engine.received_spf(res, receiver)))
    for key, value in rows:
        click.echo(f"{key + ':':13s} {printable(value)}")


# ------------------------------------------------------------------ lint


@spf.command("lint")
@click.argument("domain")
@click.option("--ip", callback=ip_option, default=None,
              help="also check that this outbound IP address passes")
@_with_config
def lint_cmd(domain: str, ip: str | None, config_path: str | None) -> None:
    """Check DOMAIN's SPF record: syntax, DNS lookup limits, and whether --ip passes."""
    cfg = load_or_exit(config_path)
    name = engine.identity_domain(domain.strip())
    if name is None:
        raise click.BadParameter(f"{domain!r} is not a domain name", param_hint="DOMAIN")
    lint = Lint()
    servers = ", ".join(cfg.dns.nameservers) or "/etc/resolv.conf"
    click.echo(f"SPF lint of {name} (DNS: {servers})")
    suggestion = asyncio.run(lint_domain(cfg, name, ip, lint))
    for line in lint.lines:
        click.echo(line)
    click.echo("record to publish (recommended policy: mail only from your MX hosts"
               + (f" and {ip}" if ip and suggestion != RECOMMENDED else "") + "):")
    click.echo(f'  {name}. IN TXT "{suggestion}"')
    click.echo("      (keep the include:/ip4:/ip6: terms of any other service that sends "
               f"mail as @{name}, before -all)")
    verdict = "FAIL" if lint.fails else ("WARN" if lint.warns else "PASS")
    click.echo(f"result: {verdict} ({lint.fails} failed, {lint.warns} warnings)")
    sys.exit(1 if lint.fails else 0)
