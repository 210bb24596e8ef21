"""``mxguard dmarc``: DMARC aggregate reports (RFC 9990).

* ``mxguard dmarc report --out DIR [--period YYYY-MM-DD] [--domain D]`` writes
  the reports it would send, one ``.xml.gz`` (RFC 9990 §3.1 filename) and the
  mail as ``.eml`` per policy domain, without sending;
* ``mxguard dmarc report --send`` sends them now (what was sent already is
  not sent again);
* ``mxguard dmarc status`` shows what was sent, when, and what failed.

The work is in :mod:`mxguard.jobs.dmarc_reports` (shared with the daemon's job);
further commands join the :func:`dmarc` group.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import click

from mxguard.cli.common import CONFIG_OPTION, fail, load_or_exit
from mxguard.store.base import StoreError


@click.group("dmarc")
def dmarc() -> None:
    """DMARC aggregate reports: ours (report, status) and the ones we receive (ingest, summary)."""


def _period(value: str | None) -> str:
    today = dt.datetime.now(dt.UTC).date()
    if value is None:
        return (today - dt.timedelta(days=1)).isoformat()
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        fail(f"--period {value!r}: expected a UTC day as YYYY-MM-DD")
    if day >= today:
        fail(f"--period {value}: the day has not ended yet (UTC); reports cover finished days")
    return day.isoformat()


def _write(path: Path, data: bytes) -> None:
    """Create ``path`` anew, never following a symlink (O_EXCL | O_NOFOLLOW)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dmarc.command("report")
@CONFIG_OPTION
@click.option("--period", metavar="YYYY-MM-DD", help="UTC day reported (default: yesterday)")
@click.option("--domain", metavar="D", help="only the report of this policy domain")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="write the reports here instead of sending")
@click.option("--send", is_flag=True, help="send the reports now through [dmarc] sendmail")
def report(config_path: str | None, period: str | None, domain: str | None,
           out_dir: str | None, send: bool) -> None:
    """Write (--out DIR) or send (--send) the aggregate reports of one day."""
    from mxguard.auth.dmarc_aggregate import report_filename
    from mxguard.jobs import dmarc_reports as job
    from mxguard.store.backends import open_results_store
    from mxguard.store.report_log import open_report_log

    if (out_dir is None) == (not send):
        fail("dmarc report: give either --out DIR (write) or --send (send now)")
    cfg = load_or_exit(config_path)
    day = _period(period)
    try:
        results = open_results_store(cfg)
        try:
            if send:
                rlog = open_report_log(cfg)
                try:
                    got = job.send_due(cfg, results, rlog, day, domain)
                finally:
                    rlog.close()
                for e in got.sent:
                    click.echo(f"sent {e.domain} {e.period} to {e.destination}")
                for e in got.failed:
                    click.echo(f"{e.state} {e.domain} {e.period} to {e.destination}: "
                               f"{e.error}")
                if got.skipped:
                    click.echo(f"{got.skipped} already sent or not due")
                if not (got.sent or got.failed or got.skipped):
                    click.echo(f"no reports for {day}")
                if got.failed:
                    raise SystemExit(1)
                return
            assert out_dir is not None
            preps = job.prepare(cfg, results, day, domain)
        finally:
            results.close()
    except (StoreError, job.ReportConfigError) as exc:
        fail(str(exc))
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True, mode=0o750)
    now = time.time()
    for prep in preps:
        name = report_filename(prep.submitter, prep.report)
        to = [d.address for d in prep.send_to] or ["undisclosed-recipients:;"]
        try:
            _write(target / name, prep.compressed)
            _write(target / f"{name.removesuffix('.xml.gz')}.eml", prep.message(to, now))
        except OSError as exc:
            fail(f"{target / name}: {exc.strerror or exc}")
        click.echo(f"{target / name}: {prep.report.messages} messages, to "
                   f"{', '.join(d.address for d in prep.send_to) or 'nobody'}")
        for addr, why in prep.skipped:
            click.echo(f"  not to {addr}: {why}")
    if not preps:
        click.echo(f"no reports for {day}")


@dmarc.command("status")
@CONFIG_OPTION
@click.option("--period", metavar="YYYY-MM-DD", help="only this UTC day")
def status(config_path: str | None, period: str | None) -> None:
    """What was sent, when, and what failed."""
    from mxguard.store.report_log import open_report_log

    cfg = load_or_exit(config_path)
    try:
        rlog = open_report_log(cfg)
        try:
            entries = rlog.entries(period)
        finally:
            rlog.close()
    except StoreError as exc:
        fail(str(exc))
    if not entries:
        click.echo("no reports sent or attempted")
        return

    def when(ts: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"

    for e in entries:
        line = (f"{e.period} {e.domain} -> {e.destination}: {e.state} at {when(e.updated)} "
                f"(attempts {e.attempts}")
        if e.state == "retry":
            line += f", next {when(e.next_try)}"
        line += ")"
        if e.error:
            line += f": {e.error}"
        click.echo(line)


__all__ = ["dmarc"]
