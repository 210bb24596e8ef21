"""The DMARC aggregate report job (RFC 9990): build, verify, send, remember.

:func:`prepare` builds, for one UTC day, the report of every policy domain
with results and ``rua=`` and the destinations it may go to (external ones
verified in DNS, RFC 9990 §3.3; size limits applied). :func:`send_due` sends
what is due through the local sendmail, one mail per destination, each
claimed first in the :mod:`~mxguard.store.report_log` (so never twice), with
retries and doubling back-off when sendmail refuses. :func:`run_once` is one
tick of the daemon's job: under the fleet lock, every finished day still in
the results store, then purge of old results and log entries.
:func:`run_forever` is the daemon task (:meth:`Daemon.start`); the blocking
work runs in a thread, so the event loop never waits on SQLite, Redis, DNS or
sendmail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shlex
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Any

from mxguard.auth import dmarc_aggregate as agg
from mxguard.store.base import StoreError
from mxguard.store.report_log import LogEntry, ReportLog, open_report_log
from mxguard.store.results import ResultsStore, utc_day

log = logging.getLogger("mxguard")

TICK = 300.0  # seconds between runs of the job in the daemon
BACKOFF = 300.0  # first retry delay; doubles per attempt
LEASE = 600.0  # a claimed send not finished by then may be taken again
LOCK_TTL = 900.0
SENDMAIL_TIMEOUT = 120.0


class ReportConfigError(Exception):
    """[dmarc] lacks what sending reports needs (one line for the admin)."""


@dataclass
class Prepared:
    report: agg.Report
    compressed: bytes
    submitter: str
    send_to: list[agg.Destination] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (destination, why)

    def message(self, to: list[str], now: float) -> bytes:
        return agg.report_message(self.report, self.compressed, to=to,
                                  submitter=self.submitter, now=now).as_bytes()


def identity(cfg: Any) -> tuple[str, str, str]:
    """(email, org_name, submitter domain) of the reports; raises ReportConfigError."""
    email = cfg.dmarc.report_email.strip()
    if "@" not in email:
        raise ReportConfigError(f"{cfg.source}: [dmarc] report_email is not set (the From "
                                "address of aggregate reports, e.g. dmarc@mx.example.com)")
    submitter = email.rpartition("@")[2].lower()
    return email, cfg.dmarc.report_org_name.strip() or submitter, submitter


async def _verify(policy_domain: str, dests: list[agg.Destination],
                  cfg: Any) -> dict[agg.Destination, str]:
    """Why each destination may not receive the report ("" = it may)."""
    from mxguard.dns import DnsTempError, Resolver

    resolver = Resolver(cfg.dns)
    out: dict[agg.Destination, str] = {}
    for dest in dests:
        if not agg.needs_verification(policy_domain, dest):
            out[dest] = ""
            continue
        name = agg.verification_name(policy_domain, dest)
        try:
            answer = await resolver.query(name, "TXT")
        except DnsTempError:
            out[dest] = f"temporary DNS failure looking up {name}"
            continue
        texts = [r if isinstance(r, str) else str(r) for r in answer.records]
        out[dest] = "" if agg.verified(texts) else \
            f"external destination not verified: no v=DMARC1 TXT at {name}"
    return out


def prepare(cfg: Any, results: ResultsStore, day: str,
            domain: str | None = None) -> list[Prepared]:
    """The reports of ``day`` (one per policy domain with rua=), ready to send."""
    email, org_name, submitter = identity(cfg)
    domains = [domain.lower().rstrip(".")] if domain else results.domains(day)
    out: list[Prepared] = []
    for dom in domains:
        report = agg.build_report(dom, day, results.query(day, dom), org_name=org_name,
                                  email=email)
        if report is None or not report.rows:
            continue
        compressed = agg.gzip_report(agg.report_xml(report))
        prep = Prepared(report, compressed, submitter)
        dests, problems = agg.destinations(report.rua)
        prep.skipped.extend((p.split(":", 1)[0], p) for p in problems)
        why = asyncio.run(_verify(dom, dests, cfg)) if dests else {}
        for dest in dests:
            limit = min(cfg.dmarc.report_max_size, dest.max_size or cfg.dmarc.report_max_size)
            if why[dest]:
                prep.skipped.append((dest.address, why[dest]))
            elif len(compressed) > limit:
                prep.skipped.append((dest.address, f"report of {len(compressed)} bytes "
                                     f"exceeds the limit of {limit} bytes"))
            else:
                prep.send_to.append(dest)
        out.append(prep)
    return out


def sendmail(cfg: Any, sender: str, recipient: str, message: bytes) -> str:
    """Submit one message; "" when accepted, else why not (one line)."""
    try:
        argv = [*shlex.split(cfg.dmarc.sendmail), "-i", "-f", sender, "--", recipient]
    except ValueError as exc:
        return f"[dmarc] sendmail {cfg.dmarc.sendmail!r}: {exc}"
    try:
        done = subprocess.run(argv, input=message, capture_output=True,
                              timeout=SENDMAIL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {getattr(exc, 'strerror', None) or exc}"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{argv[0]} exited {done.returncode}: {err[-1] if err else 'no message'}"
    return ""


@dataclass
class Outcome:
    sent: list[LogEntry] = field(default_factory=list)
    failed: list[LogEntry] = field(default_factory=list)  # retry or failed
    skipped: int = 0  # already sent, being sent elsewhere, or not due


def send_due(cfg: Any, results: ResultsStore, rlog: ReportLog, day: str,
             domain: str | None = None, now: float | None = None) -> Outcome:
    """Send the reports of ``day`` not sent yet (and due, if retried)."""
    out = Outcome()
    for prep in prepare(cfg, results, day, domain):
        rep = prep.report
        for addr, why in prep.skipped:
            t = time.time() if now is None else now
            entry = rlog.claim(rep.domain, day, addr, now=t, lease=LEASE)
            if entry is None:
                out.skipped += 1
                continue
            if why.startswith("temporary DNS failure"):
                entry = _retry(cfg, entry, why, t)
            else:
                entry = replace(entry, state="failed", error=why, updated=t, next_try=0.0,
                                report_id=rep.report_id, size=len(prep.compressed))
            rlog.finish(entry)
            out.failed.append(entry)
        for dest in prep.send_to:
            t = time.time() if now is None else now
            entry = rlog.claim(rep.domain, day, dest.address, now=t, lease=LEASE)
            if entry is None:
                out.skipped += 1
                continue
            error = sendmail(cfg, rep.email, dest.address, prep.message([dest.address], t))
            if error:
                entry = _retry(cfg, entry, error, t)
                log.warning("dmarc report %s %s to %s: %s (attempt %d, %s)", rep.domain, day,
                            dest.address, error, entry.attempts, entry.state)
                out.failed.append(entry)
            else:
                entry = replace(entry, state="sent", error="", updated=t, next_try=0.0)
                log.info("dmarc report %s %s sent to %s (%d messages, %d bytes)", rep.domain,
                         day, dest.address, rep.messages, len(prep.compressed))
                out.sent.append(entry)
            rlog.finish(replace(entry, report_id=rep.report_id, size=len(prep.compressed)))
    return out


def _retry(cfg: Any, entry: LogEntry, error: str, now: float) -> LogEntry:
    if entry.attempts >= cfg.dmarc.report_retries:
        return replace(entry, state="failed", error=error, updated=now, next_try=0.0)
    return replace(entry, state="retry", error=error, updated=now,
                   next_try=now + BACKOFF * 2 ** (entry.attempts - 1))


def finished_days(results: ResultsStore, now: float, max_age: int) -> list[str]:
    """Every UTC day before today within ``max_age`` days, oldest first."""
    today = dt.date.fromisoformat(utc_day(now))
    return [(today - dt.timedelta(days=n)).isoformat() for n in range(max_age, 0, -1)]


def run_once(cfg: Any, now: float | None = None) -> Outcome | None:
    """One tick: under the fleet lock, send what is due; purge old data. None when
    another host holds the lock."""
    from mxguard.store.backends import open_results_store

    t = time.time() if now is None else now
    total = Outcome()
    results = open_results_store(cfg)
    try:
        rlog = open_report_log(cfg)
        try:
            token = rlog.lock(LOCK_TTL)
            if token is None:
                return None
            try:
                for day in finished_days(results, t, cfg.dmarc.results_max_age):
                    if not results.domains(day):
                        continue
                    one = send_due(cfg, results, rlog, day, now=t)
                    total.sent += one.sent
                    total.failed += one.failed
                    total.skipped += one.skipped
                results.purge(cfg.dmarc.results_max_age, now=t)
                rlog.purge(cfg.dmarc.results_max_age, now=t)
            finally:
                rlog.unlock(token)
        finally:
            rlog.close()
    finally:
        results.close()
    return total


async def run_forever(cfg: Any) -> None:
    """The daemon task: a tick every few minutes when [dmarc] report_interval is daily."""
    if cfg.dmarc.report_interval == "off" or not cfg.dmarc.store_results:
        return
    try:
        identity(cfg)
    except ReportConfigError as exc:
        log.warning("dmarc reports: not sent: %s", exc)
        return
    while True:
        try:
            await asyncio.to_thread(run_once, cfg)
        except (StoreError, ReportConfigError) as exc:
            log.warning("dmarc reports: %s (trying again in %gs)", exc, TICK)
        await asyncio.sleep(TICK)


__all__ = ["Outcome", "Prepared", "ReportConfigError", "identity", "prepare", "run_forever",
           "run_once", "send_due", "sendmail"]
