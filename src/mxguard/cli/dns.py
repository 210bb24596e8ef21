"""``mxguard dns ...``: the DNS records a mail domain needs, and a check of them.

* ``mxguard dns records DOMAIN [--selector S] [--ip IP] [--helo NAME] [--from-mx]``
  prints zone-file lines to publish: SPF (``v=spf1 mx -all``; ``--from-mx``
  lists the MX hosts' addresses as ip4:/ip6: instead), the DKIM key record of
  every selector of DOMAIN in ``[dkim] keys`` (and of a pending rotation key),
  a DMARC record starting at ``p=none`` with reports to
  ``dmarc-reports@DOMAIN``, and for ``--ip`` the PTR and HELO advice.
* ``mxguard dns check DOMAIN [--ip IP] [--helo NAME]`` reads what DNS serves
  (through the Resolver, ``[dns]``) and prints ``PASS`` / ``WARN`` / ``FAIL``
  lines, each problem with its fix: SPF (the checks of ``mxguard spf lint``:
  syntax, DNS-querying terms vs 10, void lookups, whether ``--ip`` passes),
  DKIM (record present and matching the local private key, per selector),
  DMARC against RFC 9989 (the record the tree walk finds; removed tags
  pct/rf/ri, p=, t=, rua= and the authorization record of an external rua=
  destination), MX, the forward-confirmed reverse DNS of
  ``--ip`` and whether the ``--helo`` name resolves to it. DNS errors and
  timeouts are reported as findings. Exit code 0 without FAIL lines, 1 with
  some, 2 for bad arguments or a bad config.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import click

from mxguard import config
from mxguard.auth import dkim_rotation, dmarc
from mxguard.auth import spf as engine
from mxguard.auth.dkim_keys import DkimKeyError, public_key_record, read_private_key
from mxguard.auth.dkim_rotation import ACTIVE, PENDING, DomainKey, RotationError, check_record
from mxguard.auth.spf_lint import RECOMMENDED, Lint, lint_domain, suggestion
from mxguard.cli.common import config_option, ip_option, load_or_exit
from mxguard.cli.dkim import zone_line
from mxguard.dns import DnsTempError, Resolver, reverse_name

REPORT_LOCAL_PART = "dmarc-reports"


def _domain(value: str) -> str:
    name = engine.identity_domain(value.strip().rstrip("."))
    if name is None or "." not in name:
        raise click.BadParameter(f"{value!r} is not a domain name", param_hint="DOMAIN")
    return name.lower()


def published_keys(cfg: config.Config, domain: str) -> list[DomainKey]:
    """Keys of ``domain`` whose records DNS should serve; a bad state file counts as none."""
    try:
        return dkim_rotation.published_keys(cfg, domain)
    except (RotationError, DkimKeyError):
        return []


def dmarc_record(domain: str) -> str:
    return f"v=DMARC1; p=none; rua=mailto:{REPORT_LOCAL_PART}@{domain}"


_with_config = config_option("mxguard TOML config ([dns], [dkim] keys)")


@click.group("dns")
def dns() -> None:
    """DNS records to publish for a mail domain, and a check of what is published."""


# ------------------------------------------------------------------ records


async def _mx_addresses(resolver: Resolver, domain: str) -> tuple[list[str], str]:
    """Addresses of the domain's MX hosts, and a problem (empty when fine)."""
    try:
        mx = await resolver.query(domain, "MX")
        hosts = [h for _, h in sorted(mx.records) if h and h != "."]
        if not hosts:
            return [], f"{domain} has no MX record"
        found: list[str] = []
        for host in hosts[:engine.MAX_NAMES]:
            addrs, _ = await resolver.addresses(host)
            found += [a for a in addrs if a not in found]
        return found, "" if found else "its MX hosts have no addresses"
    except DnsTempError as exc:
        return [], f"DNS error: {exc}"


async def spf_record(resolver: Resolver, domain: str, ip: str | None,
                     from_mx: bool) -> tuple[str, str]:
    """(record, comment) for ``domain``."""
    if not from_mx:
        record = await suggestion(resolver, domain, ip)
        why = "only the domain's MX hosts may send mail as @" + domain
        if record != RECOMMENDED:
            why += f", and {ip} (the MX hosts do not cover it)"
        return record, why
    addrs, problem = await _mx_addresses(resolver, domain)
    if ip is not None and ip not in addrs:
        addrs.append(ip)
    if not addrs:
        return RECOMMENDED, f"computed from MX failed ({problem}): the mx form instead"
    terms = [f"ip{ipaddress.ip_address(a).version}:{a}" for a in addrs]
    return (f"v=spf1 {' '.join(terms)} -all",
            "the MX hosts' addresses" + (f" and {ip}" if ip else "") + " (update it when "
            "they change; the mx form follows them by itself)")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def record_lines(cfg: config.Config, domain: str, selector: str | None, ip: str | None,
                       helo: str, from_mx: bool) -> tuple[list[str], bool]:
    """The zone-file lines; False when a ``--selector`` has no key."""
    resolver = Resolver(cfg.dns)
    out = [f"; DNS records for {domain} (mxguard dns records)"]
    record, why = await spf_record(resolver, domain, ip, from_mx)
    out += [f"; SPF: {why}", f"{domain}. IN TXT {_quote(record)}"]
    keys = [k for k in published_keys(cfg, domain) if selector is None or k.selector == selector]
    ok = True
    if not keys:
        ok = selector is None
        which = f"with selector {selector} " if selector else ""
        out += [f"; DKIM: no key {which}for {domain} in [dkim] keys; make one with",
                f";   mxguard dkim rotate {domain}   (or: mxguard dkim genkey -d {domain} "
                f"-s SELECTOR --dir {cfg.state_dir}/dkim)"]
    for k in keys:
        try:
            text = public_key_record(read_private_key(k.path))
        except DkimKeyError as exc:
            out.append(f"; DKIM {k.selector}: {exc}")
            ok = False
            continue
        what = {ACTIVE: "signs now", PENDING: "pending rotation: publish, then "
                f"`mxguard dkim rotate {domain} --advance`"}.get(k.state, "retired: keep "
                                                                 "until the grace period ends")
        out += [f"; DKIM selector {k.selector} ({what}), key {k.path}",
                zone_line(domain, k.selector, text)]
    out += ["; DMARC: start by monitoring; once the reports show only your own servers, "
            "p=quarantine, then p=reject",
            f"_dmarc.{domain}. IN TXT {_quote(dmarc_record(domain))}",
            f"; MX, if not published yet: {domain}. IN MX 10 {helo}."]
    if ip is not None:
        out += [f"; reverse DNS of {ip}: set by whoever owns the address (your hosting "
                "provider), not in your zone; it must name your HELO host:",
                f";   {reverse_name(ip)}. IN PTR {helo}.",
                f"; HELO: set Postfix's myhostname = {helo}; it must resolve to {ip}:",
                f"{helo}. IN {'A' if ipaddress.ip_address(ip).version == 4 else 'AAAA'} {ip}"]
    return out, ok


@dns.command("records")
@click.argument("domain")
@click.option("--selector", "-s", default=None, help="only the DKIM key of this selector")
@click.option("--ip", callback=ip_option, default=None,
              help="the server's outbound address: PTR and HELO advice, added to SPF if needed")
@click.option("--helo", default=None, help="the server's HELO name (default: mail.DOMAIN)")
@click.option("--from-mx", is_flag=True,
              help="SPF with the MX hosts' addresses (ip4:/ip6:) instead of the mx mechanism")
@_with_config
def records_cmd(domain: str, selector: str | None, ip: str | None, helo: str | None,
                from_mx: bool, config_path: str | None) -> None:
    """Zone-file lines to publish for DOMAIN: SPF, DKIM, DMARC, PTR/HELO advice."""
    cfg = load_or_exit(config_path)
    name = _domain(domain)
    helo_name = _domain(helo) if helo else f"mail.{name}"
    lines, ok = asyncio.run(record_lines(cfg, name, selector, ip, helo_name, from_mx))
    for line in lines:
        click.echo(line)
    sys.exit(0 if ok else 1)


# ------------------------------------------------------------------ check


@dataclass
class Section:
    title: str
    lint: Lint = field(default_factory=Lint)


async def _spf_section(cfg: config.Config, domain: str, ip: str | None, lint: Lint) -> None:
    publish = await lint_domain(cfg, domain, ip, lint)
    if lint.fails:
        lint.note(f'record to publish: {domain}. IN TXT "{publish}"')


async def _dkim_section(cfg: config.Config, resolver: Resolver, domain: str,
                        lint: Lint) -> None:
    keys = published_keys(cfg, domain)
    if not keys:
        lint.say("WARN", f"no DKIM key for {domain} in [dkim] keys: its mail is not signed",
                 f"mxguard dkim rotate {domain}, publish the record, then --advance")
        return
    checks = await asyncio.gather(*(check_record(resolver, domain, k.selector, k.path)
                                    for k in keys))
    for key, check in zip(keys, checks, strict=True):
        if key.state == PENDING:
            if check.ok:
                lint.say("PASS", f"pending key {check.text}")
                lint.note(f"next: mxguard dkim rotate {domain} --advance")
            else:
                lint.say("WARN", f"pending key {key.selector}: {check.text}",
                         f"publish it (mxguard dns records {domain} -s {key.selector}), "
                         f"then mxguard dkim rotate {domain} --advance")
            continue
        if check.ok:
            lint.say("PASS", check.text)
        elif key.state != ACTIVE:
            lint.say("PASS", f"retired key {key.selector}: {check.text}")
        else:
            harm = "" if check.status == "error" else ": receivers cannot verify the signatures"
            lint.say("FAIL", f"{check.text}{harm}", _dkim_fix(check.status, domain, key))


def _dkim_fix(status: str, domain: str, key: DomainKey) -> str:
    if status == "nokey":
        return f"check the path and permissions of {key.path} ([dkim] keys)"
    if status == "error":
        return "check the name servers of the zone; receivers get temperror meanwhile"
    return (f"publish the record of the local key: mxguard dns records {domain} "
            f"-s {key.selector}")


async def _dmarc_texts(resolver: Resolver, name: str) -> tuple[list[str], list[str]]:
    """(DMARC records, TXT records that almost are) at ``_dmarc.name``."""
    answer = await resolver.query(f"_dmarc.{name}", "TXT")
    texts = [t for t in answer.records if isinstance(t, str)]
    good = [t for t in texts if dmarc.is_dmarc_record(t)]
    near = [t for t in texts if t.lower().lstrip().startswith("v=dmarc") and t not in good]
    return good, near


async def _dmarc_section(resolver: Resolver, domain: str, lint: Lint) -> None:
    """The record RFC 9989 receivers find for ``domain`` (tree walk, §4.10.1),
    linted: removed tags, p=, rua= and its external destinations."""
    publish = f'_dmarc.{domain}. IN TXT "{dmarc_record(domain)}"'
    walk = dmarc.TreeWalk(resolver)
    try:
        found, near = await _dmarc_texts(resolver, domain)
        where = domain
        if not found and not near:
            discovered = await walk.discover(domain)
            if discovered.domain:
                where = discovered.domain
                found, near = await _dmarc_texts(resolver, where)
            elif discovered.result == "temperror":
                lint.say("FAIL", f"{discovered.reason} (DMARC tree walk)", "check the zone's "
                         "name servers; receivers get temperror meanwhile")
                return
    except DnsTempError as exc:
        lint.say("FAIL", f"DNS error: {exc}", "check the zone's name servers; receivers get "
                 "temperror meanwhile")
        return
    for text in near:
        lint.say("WARN", f"TXT {text[:60]!r} at _dmarc.{where} is no DMARC record",
                 'start it with exactly "v=DMARC1;"')
    if not found:
        lint.say("FAIL", f"no DMARC record at _dmarc.{domain}: receivers apply no policy and "
                 "send no reports", f"publish {publish}")
        return
    if len(found) > 1:
        lint.say("FAIL", f"{len(found)} DMARC records at _dmarc.{where}: receivers ignore "
                 "them all", "keep one")
        return
    try:
        record = dmarc.parse_record(found[0], "9989")
    except (dmarc.RecordError, dmarc.RecordIgnored) as exc:
        kind = "malformed (permerror)" if isinstance(exc, dmarc.RecordError) else "ignored"
        lint.say("FAIL", f"_dmarc.{where}: {kind}: {exc}", f"replace it: {publish}")
        return
    inherited = f" (the record of {where} applies to {domain})" if where != domain else ""
    lint.say("PASS", f"one DMARC record: {record.raw}{inherited}")
    _dmarc_policy(lint, record, domain, where)
    await _rua_authorized(resolver, walk, lint, record, where)


def _has_tag(record: dmarc.DmarcRecord, name: str) -> bool:
    try:
        return name in dmarc.split_tags(record.raw)
    except dmarc.RecordError:
        return False


def _dmarc_policy(lint: Lint, record: dmarc.DmarcRecord, domain: str, where: str) -> None:
    policy = record.sp if where != domain and record.sp else record.p
    for warning in record.warnings:
        lint.say("WARN", f"{warning}: receivers use the default", "fix or remove the tag")
    for tag in record.removed:
        fix = "remove it; t=y is RFC 9989's test mode" if tag == "pct" else "remove it"
        lint.say("WARN", f"{tag}= was removed by RFC 9989: receivers ignore it", fix)
    if record.p_implied and not _has_tag(record, "p"):
        lint.say("WARN", "no p=: RFC 9989 receivers read p=none, older ones may ignore the "
                 "record", "write p=none, p=quarantine or p=reject")
    elif record.p_implied:
        lint.say("WARN", "no valid p=: read as p=none", "write p=none, p=quarantine or "
                 "p=reject")
    if record.t:
        lint.say("WARN", "t=y: test mode, receivers apply reject as quarantine and "
                 "quarantine as none", "remove t=y when the reports are clean")
    if policy == "none":
        lint.say("WARN", "p=none: monitoring only, mail forging your domain is still "
                 "delivered", "when the reports show only your servers: p=quarantine, then "
                 "p=reject")
    else:
        verb = "reject" if policy == "reject" else "quarantine"
        lint.say("PASS", f"policy {policy}: receivers {verb} mail that fails DMARC")
    if not record.rua:
        lint.say("WARN", "no rua=: you get no aggregate reports",
                 f"add rua=mailto:{REPORT_LOCAL_PART}@{domain}")


def _mailto_domain(uri: str) -> str | None:
    if not uri.lower().startswith("mailto:"):
        return None
    address = uri[7:].partition("!")[0].partition("?")[0]
    return dmarc.normalize_domain(address.rpartition("@")[2]) if "@" in address else None


async def _rua_authorized(resolver: Resolver, walk: dmarc.TreeWalk, lint: Lint,
                          record: dmarc.DmarcRecord, where: str) -> None:
    """External rua= destinations need ``<domain>._report._dmarc.<dest>`` TXT
    "v=DMARC1" (RFC 9990, verifying external destinations), else receivers send
    them nothing."""
    for uri in record.rua:
        dest = _mailto_domain(uri)
        if dest is None:
            continue
        try:
            if await walk.org(dest) == await walk.org(where):
                continue
            name = f"{where}._report._dmarc.{dest}"
            answer = await resolver.query(name, "TXT")
        except DnsTempError as exc:
            lint.say("WARN", f"rua {uri}: DNS error checking its authorization: {exc}",
                     "check again later")
            continue
        if any(isinstance(t, str) and t.strip().startswith("v=DMARC1") for t in answer.records):
            lint.say("PASS", f"rua {uri}: {dest} accepts reports for {where}")
        else:
            lint.say("WARN", f"rua {uri}: external destination without authorization "
                     f"record: receivers send it no reports",
                     f'ask {dest} to publish {name}. IN TXT "v=DMARC1"')


async def _mx_section(resolver: Resolver, domain: str, lint: Lint) -> list[str]:
    """MX checks; returns the MX hosts' addresses."""
    try:
        answer = await resolver.query(domain, "MX")
    except DnsTempError as exc:
        lint.say("FAIL", f"DNS error: {exc}", "check the zone's name servers")
        return []
    if answer.rcode == "NXDOMAIN":
        lint.say("FAIL", f"{domain} does not exist in DNS (NXDOMAIN)",
                 "check the spelling, or create the zone")
        return []
    hosts = sorted(answer.records)
    if not hosts:
        lint.say("FAIL", f"no MX record: senders fall back to {domain}'s own address, and "
                 'SPF "mx" matches nothing', f"publish {domain}. IN MX 10 mail.{domain}.")
        return []
    if len(hosts) == 1 and hosts[0][1] in ("", "."):
        lint.say("WARN", "null MX (RFC 7505): the domain receives no mail",
                 "publish your mail server's MX if it should")
        return []
    found: list[str] = []
    for pref, host in hosts:
        try:
            addrs, nx = await resolver.addresses(host)
        except DnsTempError as exc:
            lint.say("FAIL", f"MX {pref} {host}: DNS error: {exc}", "check its name servers")
            continue
        if addrs:
            lint.say("PASS", f"MX {pref} {host} -> {', '.join(addrs)}")
            found += addrs
        else:
            lint.say("FAIL", f"MX {pref} {host} has no A/AAAA record"
                     + (" (NXDOMAIN)" if nx else ""), f"publish {host}. IN A <its address>")
    return found


async def _ptr_section(resolver: Resolver, ip: str | None, helo: str | None,
                       lint: Lint) -> None:
    names: list[str] = []
    if ip is not None:
        names = await _fcrdns(resolver, ip, lint)
    if helo is None:
        return
    try:
        addrs, nx = await resolver.addresses(helo)
    except DnsTempError as exc:
        lint.say("FAIL", f"HELO {helo}: DNS error: {exc}", "check its name servers")
        return
    reject = ("receivers with reject_unknown_helo_hostname (the seed's own HELO "
              "restrictions) reject your mail")
    if not addrs:
        lint.say("FAIL", f"HELO name {helo} does not resolve{' (NXDOMAIN)' if nx else ''}: "
                 + reject, f"publish {helo}. IN A {ip or '<your address>'}")
        return
    if ip is not None and ip not in addrs:
        lint.say("FAIL", f"HELO name {helo} resolves to {', '.join(addrs)}, not {ip}",
                 f"publish {helo}. IN A {ip}, or use the name that does")
        return
    lint.say("PASS", f"HELO name {helo} resolves to {', '.join(addrs)}")
    if names and helo.lower() not in (n.lower() for n in names):
        lint.say("WARN", f"HELO name {helo} is not the PTR name of {ip} ({', '.join(names)})",
                 "set Postfix's myhostname to the PTR name, or the PTR to the HELO name")


async def _fcrdns(resolver: Resolver, ip: str, lint: Lint) -> list[str]:
    try:
        answer = await resolver.query(reverse_name(ip), "PTR")
    except DnsTempError as exc:
        lint.say("FAIL", f"PTR of {ip}: DNS error: {exc}", "check the reverse zone's servers")
        return []
    fix = (f"ask whoever owns {ip} (your hosting provider) for a PTR naming your HELO host, "
           "and publish that name's A/AAAA record")
    if not answer.records:
        lint.say("FAIL", f"{ip} has no PTR record: many receivers reject or score mail from "
                 "addresses without reverse DNS", fix)
        return []
    names = [str(n) for n in answer.records]
    confirmed: list[str] = []
    for name in names:
        try:
            addrs, _ = await resolver.addresses(name)
        except DnsTempError:
            continue
        if ip in addrs:
            confirmed.append(name)
    if confirmed:
        lint.say("PASS", f"forward-confirmed reverse DNS: {ip} -> {confirmed[0]} -> {ip}")
    else:
        lint.say("FAIL", f"PTR of {ip} ({', '.join(names)}) does not resolve back to {ip}",
                 fix)
    return names


async def _guarded(section: Section, work: Awaitable[object]) -> None:
    """Run one section; an unexpected error becomes a FAIL line, never a traceback."""
    try:
        await work
    except DnsTempError as exc:
        section.lint.say("FAIL", f"DNS error: {exc}", "check [dns] nameservers and the "
                         "zone's name servers")
    except Exception as exc:
        section.lint.say("FAIL", f"internal error: {type(exc).__name__}: {exc}",
                         "please report this")


async def check_domain(cfg: config.Config, domain: str, ip: str | None = None,
                       helo: str | None = None) -> list[Section]:
    """Every check of ``dns check``, sections run concurrently."""
    resolver = Resolver(cfg.dns)
    sections: list[tuple[Section, Callable[[Lint], Awaitable[object]]]] = [
        (Section("SPF"), lambda lint: _spf_section(cfg, domain, ip, lint)),
        (Section("DKIM"), lambda lint: _dkim_section(cfg, resolver, domain, lint)),
        (Section("DMARC"), lambda lint: _dmarc_section(resolver, domain, lint)),
        (Section("MX"), lambda lint: _mx_section(resolver, domain, lint)),
    ]
    if ip is not None or helo is not None:
        title = "reverse DNS and HELO (" + ", ".join(x for x in (ip, helo) if x) + ")"
        sections.append((Section(title), lambda lint: _ptr_section(resolver, ip, helo, lint)))
    await asyncio.gather(*(_guarded(s, run(s.lint)) for s, run in sections))
    return [s for s, _ in sections]


def print_sections(sections: list[Section]) -> tuple[int, int]:
    fails = warns = 0
    for s in sections:
        click.echo(s.title)
        for line in s.lint.lines:
            click.echo(line)
        fails += s.lint.fails
        warns += s.lint.warns
    return fails, warns


@dns.command("check")
@click.argument("domain")
@click.option("--ip", callback=ip_option, default=None,
              help="the server's outbound address: SPF pass, reverse DNS, HELO")
@click.option("--helo", default=None, help="the server's HELO name (Postfix myhostname)")
@_with_config
def check_cmd(domain: str, ip: str | None, helo: str | None, config_path: str | None) -> None:
    """Check DOMAIN's published records: PASS / WARN / FAIL with the fix for each."""
    cfg = load_or_exit(config_path)
    name = _domain(domain)
    helo_name = _domain(helo) if helo else None
    servers = ", ".join(cfg.dns.nameservers) or "/etc/resolv.conf"
    click.echo(f"DNS check of {name} (DNS: {servers})")
    fails, warns = print_sections(asyncio.run(check_domain(cfg, name, ip, helo_name)))
    verdict = "FAIL" if fails else ("WARN" if warns else "PASS")
    click.echo(f"result: {verdict} ({fails} failed, {warns} warnings)")
    sys.exit(1 if fails else 0)


__all__ = ["Section", "check_domain", "dmarc_record", "dns", "print_sections", "record_lines",
           "spf_record"]
