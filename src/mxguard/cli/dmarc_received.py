"""``mxguard dmarc ingest`` and ``mxguard dmarc summary``: aggregate reports we receive.

When our own domains publish ``rua=mailto:`` pointing at us, reporters mail
us their aggregate reports. ``ingest`` reads such mail (or bare XML / gzip /
zip report files) and keeps the reports (:mod:`mxguard.store.received_reports`);
``summary`` shows, per sending source, how much of our domains' mail passed
or failed DMARC and why.

``mxguard dmarc ingest [FILE | - | --mbox FILE | --maildir DIR]`` (standard
input when nothing is given) -- as a Postfix pipe transport (pipe(8) never
runs a command as root: the user must be able to write the store, e.g. own
/var/lib/mxguard/mxguard-received.db and its directory)::

    # master.cf
    dmarcrua  unix  -       n       n       -       -       pipe
      user=mxguard argv=/usr/local/bin/mxguard dmarc ingest
      --config /etc/mxguard/mxguard.toml -
    # main.cf
    transport_maps = inline:{ dmarc-reports@example.com=dmarcrua: }
    dmarcrua_destination_recipient_limit = 1

Exit status: 0 done (a mail that holds no report, a report refused -- a bomb,
a DTD, broken XML -- or one of a domain not in ``[dmarc] received_domains``
is counted and reported on stderr, not bounced); 1 some report in a FILE,
mbox or Maildir was refused; 2 unreadable input or config, or the store is
down (files); 75 (EX_TEMPFAIL) the store is down while reading standard input,
so Postfix keeps the mail and retries.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import mailbox
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click

from mxguard import config
from mxguard.auth.dmarc_ingest import (
    AggregateReport,
    Limits,
    reports_from_bytes,
    summarize,
)
from mxguard.cli.common import config_option, fail, load_or_exit
from mxguard.cli.dmarc import dmarc
from mxguard.store.backends import open_received_reports
from mxguard.store.base import StoreError
from mxguard.store.received_reports import ADDED, DUPLICATE, ReceivedReportsStore

EX_TEMPFAIL = 75
PROGRESS_INTERVAL = 0.2

_with_config = config_option("mxguard TOML config file: [dmarc] received_* and [storage] "
                             "(default: built-in)")


# ------------------------------------------------------------ message sources


@dataclass(frozen=True, slots=True)
class Item:
    """One message (``data``) or one that could not be read (``error``)."""

    where: str
    data: bytes = b""
    error: str = ""


class Unreadable(Exception):
    """The input named on the command line cannot be read at all."""


def _read_bounded(fh: Any, limit: int, where: str) -> Item:
    data = fh.read(limit + 1)
    if len(data) > limit:
        return Item(where, error=f"larger than {limit} bytes")
    if not data.strip():
        return Item(where, error="empty")
    return Item(where, data)


def file_items(path: str, limit: int) -> Iterator[Item]:
    if path == "-":
        yield _read_bounded(sys.stdin.buffer, limit, "-")
        return
    p = Path(path)
    if p.is_dir():
        raise Unreadable(f"{path}: is a directory (use --maildir DIR for a Maildir)")
    try:
        with open(p, "rb") as fh:
            item = _read_bounded(fh, limit, path)
    except OSError as exc:
        raise Unreadable(f"{path}: {exc.strerror or exc}") from None
    yield item


def _box_items(box: mailbox.Mailbox[Any], where: str, limit: int) -> Iterator[Item]:
    try:
        keys = sorted(box.keys())
    except OSError as exc:
        raise Unreadable(f"{where}: {exc.strerror or exc}") from None
    for n, key in enumerate(keys, 1):
        name = f"{where}#{n}"
        try:
            data = box.get_bytes(key)
        except (OSError, KeyError) as exc:
            yield Item(name, error=str(getattr(exc, "strerror", None) or exc))
            continue
        if len(data) > limit:
            yield Item(name, error=f"larger than {limit} bytes")
        else:
            yield Item(name, data)


def mbox_items(path: str, limit: int) -> Iterator[Item]:
    p = Path(path)
    if not p.is_file():
        raise Unreadable(f"{path}: no such mbox file")
    yield from _box_items(mailbox.mbox(p, create=False), path, limit)


def maildir_items(path: str, limit: int) -> Iterator[Item]:
    p = Path(path)
    if not ((p / "cur").is_dir() and (p / "new").is_dir()):
        raise Unreadable(f"{path}: not a Maildir (no cur/ and new/)")
    yield from _box_items(mailbox.Maildir(p, factory=None, create=False), path, limit)


# ------------------------------------------------------------ ingest


@dataclass
class Tally:
    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    expired: int = 0
    other_domain: int = 0
    not_reports: int = 0
    refused: int = 0
    unreadable: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return (f"{self.messages} messages: {self.stored} reports stored, {self.duplicates} "
                f"already stored, {self.expired} too old, {self.other_domain} for other "
                f"domains, {self.not_reports} without a report, {self.refused} refused, "
                f"{self.unreadable} unreadable")


def _ours(domain: str, ours: list[str]) -> bool:
    if not ours:
        return True
    names = [d.lower().rstrip(".") for d in ours]
    return any(domain == d or domain.endswith("." + d) for d in names)


def _store_down(message: str, pipe: bool) -> NoReturn:
    fail(message + (" (temporary failure: Postfix retries)" if pipe else ""),
         EX_TEMPFAIL if pipe else 2)


def ingest_items(items: Iterator[Item], store: ReceivedReportsStore, cfg: config.Config,
                 *, pipe: bool, progress: bool) -> Tally:
    limits = Limits(max_xml_bytes=cfg.dmarc.received_max_bytes,
                    max_records=cfg.dmarc.received_max_records)
    tally = Tally()
    shown = 0.0
    for item in items:
        tally.messages += 1
        if item.error:
            tally.unreadable += 1
            click.echo(f"mxguard: {item.where}: {item.error}", err=True)
            continue
        found = reports_from_bytes(item.data, item.where, limits)
        if not found:
            tally.not_reports += 1
        for f in found:
            if f.report is None:
                tally.refused += 1
                click.echo(f"mxguard: {f.where}: report refused: {f.error}", err=True)
                continue
            if not _ours(f.report.domain, cfg.dmarc.received_domains):
                tally.other_domain += 1
                click.echo(f"mxguard: {f.where}: report for {f.report.domain} skipped "
                           "(not in [dmarc] received_domains)", err=True)
                continue
            try:
                outcome = store.add(f.report)
            except StoreError as exc:
                _store_down(str(exc), pipe)
            if outcome == ADDED:
                tally.stored += 1
            elif outcome == DUPLICATE:
                tally.duplicates += 1
            else:
                tally.expired += 1
        now = time.monotonic()
        if progress and now - shown >= PROGRESS_INTERVAL:
            shown = now
            rate = tally.messages / max(now - tally.started, 1e-9)
            click.echo(f"\r{tally.line()} ({rate:.0f} msgs/s)", err=True, nl=False)
    if progress:
        click.echo("", err=True)
    return tally


@dmarc.command("ingest")
@click.argument("file", required=False, metavar="[FILE|-]")
@click.option("--mbox", "mbox_path", metavar="FILE", help="read every message of an mbox file")
@click.option("--maildir", "maildir_path", metavar="DIR",
              help="read every message of a Maildir (cur/ and new/)")
@click.option("--progress/--no-progress", default=None,
              help="progress line on stderr (default: when stderr is a terminal)")
@_with_config
def ingest(file: str | None, mbox_path: str | None, maildir_path: str | None,
           progress: bool | None, config_path: str | None) -> None:
    """Store the aggregate reports in mail (or bare .xml / .xml.gz / .zip files).

    Standard input (one message) when no source is given: the Postfix pipe
    transport. Exit 75 there when the store is down, so Postfix retries."""
    sources = [s for s in (file, mbox_path, maildir_path) if s is not None]
    if len(sources) > 1:
        fail("give one of FILE, -, --mbox FILE or --maildir DIR")
    pipe = not sources or file == "-"
    if not pipe:
        _ingest(file, mbox_path, maildir_path, progress, config_path, pipe=False)
        return
    try:
        _ingest(file, mbox_path, maildir_path, progress, config_path, pipe=True)
    except Exception as exc:  # a bug must not bounce the mail: Postfix keeps it, retries
        fail(f"ingest failed ({type(exc).__name__}: {exc}); temporary failure: Postfix "
             "retries", EX_TEMPFAIL)


def _ingest(file: str | None, mbox_path: str | None, maildir_path: str | None,
            progress: bool | None, config_path: str | None, *, pipe: bool) -> None:
    cfg = load_or_exit(config_path)
    limit = Limits().max_message_bytes
    if mbox_path is not None:
        items = mbox_items(mbox_path, limit)
    elif maildir_path is not None:
        items = maildir_items(maildir_path, limit)
    else:
        items = file_items(file or "-", limit)
    try:
        first = next(items, None)
    except Unreadable as exc:
        fail(str(exc))
    try:
        store = open_received_reports(cfg)
    except StoreError as exc:
        _store_down(str(exc), pipe)
    show = progress if progress is not None else sys.stderr.isatty()

    def chained() -> Iterator[Item]:
        if first is not None:
            yield first
        yield from items

    try:
        tally = ingest_items(chained(), store, cfg, pipe=pipe, progress=show)
        try:
            store.purge()
        except StoreError as exc:
            click.echo(f"mxguard: purging old reports: {exc}", err=True)
    except Unreadable as exc:
        fail(str(exc))
    finally:
        store.close()
    click.echo(tally.line())
    if pipe:
        if tally.unreadable:
            sys.exit(2)
        return
    if tally.unreadable and tally.unreadable == tally.messages:
        sys.exit(2)
    if tally.refused or tally.unreadable:
        sys.exit(1)


# ------------------------------------------------------------ summary


def _since(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date YYYY-MM-DD") from None


def _day(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


MAX_RESOLVE = 200  # sources looked up per summary, most mail first


async def _names(ips: list[str], cfg: config.Config) -> dict[str, str]:
    """Reverse DNS names of ``ips`` (the first PTR; "" for none or a failure)."""
    from mxguard.dns import DnsTempError, Resolver, reverse_name

    resolver = Resolver(cfg.dns)
    sem = asyncio.Semaphore(20)

    async def one(ip: str) -> tuple[str, str]:
        async with sem:
            try:
                answer = await resolver.query(reverse_name(ip), "PTR")
            except (DnsTempError, ValueError):
                return ip, ""
            return ip, str(answer.records[0]).rstrip(".") if answer.records else ""

    return dict(await asyncio.gather(*(one(ip) for ip in ips[:MAX_RESOLVE])))


def domain_summary(domain: str, reports: list[AggregateReport], top: int,
                   names: dict[str, str] | None = None) -> dict[str, Any]:
    """One domain's figures (the ``--json`` shape)."""
    sources = summarize(reports, domain)
    for s in sources:
        s.name = (names or {}).get(s.source_ip, "")
    mine = [r for r in reports if r.domain == domain]
    messages = sum(s.messages for s in sources)
    return {"domain": domain, "reports": len(mine),
            "reporters": sorted({r.org_name for r in mine}),
            "first_day": _day(min(r.begin for r in mine)) if mine else None,
            "last_day": _day(max(r.end for r in mine)) if mine else None,
            "messages": messages,
            "dmarc_pass": sum(s.dmarc_pass for s in sources),
            "dmarc_fail": sum(s.dmarc_fail for s in sources),
            "sources": [s.as_dict(top) for s in sources]}


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def render(summary: dict[str, Any]) -> str:
    lines = [f"{summary['domain']}: {summary['reports']} reports from "
             f"{len(summary['reporters'])} reporters ({', '.join(summary['reporters'])}), "
             f"{summary['first_day']} .. {summary['last_day']}",
             f"  {summary['messages']} messages: {summary['dmarc_pass']} DMARC pass "
             f"({_pct(summary['dmarc_pass'], summary['messages'])}), {summary['dmarc_fail']} "
             "fail"]
    head = (f"  {'source':<39} {'msgs':>7} {'pass':>7} {'fail':>7} {'dkim':>7} {'spf':>7}  "
            "dispositions; top failure reasons")
    lines.append(head)
    for s in summary["sources"]:
        disp = " ".join(f"{k}={v}" for k, v in s["dispositions"].items())
        why = "; ".join(f"{f['reason']} ({f['messages']})" for f in s["top_failures"])
        source = f"{s['source_ip']} ({s['name']})" if s["name"] else s["source_ip"]
        lines.append(f"  {source:<39} {s['messages']:>7} {s['dmarc_pass']:>7} "
                     f"{s['dmarc_fail']:>7} {s['dkim_aligned']:>7} {s['spf_aligned']:>7}  "
                     f"{disp}" + (f"; {why}" if why else ""))
    return "\n".join(lines)


@dmarc.command("summary")
@click.option("--domain", "domain", metavar="D", help="only reports about this domain")
@click.option("--since", callback=_since, metavar="YYYY-MM-DD",
              help="only reports whose period ends on or after this UTC day")
@click.option("--top", default=3, show_default=True, type=click.IntRange(0, 100),
              help="failure reasons shown per source")
@click.option("--resolve", is_flag=True,
              help=f"show each source's reverse DNS name (PTR; first {MAX_RESOLVE} sources, "
              "[dns] settings)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_with_config
def summary(domain: str | None, since: dt.date | None, top: int, resolve: bool,
            as_json: bool, config_path: str | None) -> None:
    """Per sending source: messages, DMARC pass/fail, SPF/DKIM aligned counts,
    dispositions and the top failure reasons, from the reports received.

    The dkim and spf columns count messages whose DKIM / SPF result was aligned
    and passing; a message passes DMARC when either is."""
    cfg = load_or_exit(config_path)
    start = dt.datetime.combine(since, dt.time(), dt.UTC).timestamp() if since else None
    try:
        store = open_received_reports(cfg)
        try:
            reports = store.reports(since=start, domain=domain)
        finally:
            store.close()
    except StoreError as exc:
        fail(str(exc))
    domains = sorted({r.domain for r in reports})
    names: dict[str, str] = {}
    if resolve:
        ips = [s.source_ip for s in summarize(reports)]
        names = asyncio.run(_names(ips, cfg))
    out = [domain_summary(d, reports, top, names) for d in domains]
    if as_json:
        click.echo(json.dumps({"domains": out}, indent=2))
        return
    if not out:
        click.echo("no aggregate reports received" + (f" for {domain}" if domain else "")
                   + (f" since {since.isoformat()}" if since else ""))
        return
    click.echo("\n\n".join(render(s) for s in out))


COMMANDS = (ingest, summary)

__all__ = ["COMMANDS", "EX_TEMPFAIL", "dmarc", "ingest", "summary"]
