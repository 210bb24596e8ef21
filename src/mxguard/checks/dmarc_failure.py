"""DMARC failure reports (RFC 9991): the pipeline row :func:`check` (stage DONE,
incoming mail, ``[dmarc] failure_reports``; off by default).

For a message whose From domain's record asks for failure reports (``ruf=``)
and whose SPF/DKIM results meet its ``fo=`` option
(:func:`mxguard.auth.dmarc_failure_report.wanted`), the row counts the report
against the rate limits and hands it to the background; the message never
waits. In the background: each external ``ruf=`` destination is verified
(``<policy domain>._report._dmarc.<destination domain>`` TXT ``v=DMARC1``,
RFC 9990 §4 as RFC 9991 §5 applies it; a DNS failure skips that destination),
the report is built (:func:`mxguard.auth.dmarc_failure_report.build`) and piped
to ``[dmarc] sendmail`` (the local Postfix's sendmail). A failure to
send is logged once per ``[storage] fail_open_log_interval``.

Rate limits (RFC 9991 §2 and §8.1): at most ``failure_reports_per_domain_hour``
reports per policy domain and ``failure_reports_per_hour`` in all per clock
hour. The counters are in memory, per process: with N workers the caps are N
times the configured ones (documented with the keys). Never reported on: mail
that is itself an ARF report (no report loops), records with ``psd=y``
(RFC 9991 §2), temperror results, ``mxguard scan`` (dry run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from mxguard import __version__
from mxguard.auth import authresults
from mxguard.auth import dmarc_failure_report as afrf
from mxguard.auth.dmarc import DmarcResult, OrgDomains, SpfAuth, default_org_domains
from mxguard.checks.dmarc import ORG_SERVICE, DmarcOutcome, auth_inputs
from mxguard.core.runner import log_failure
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, Transaction
from mxguard.dns import DnsTempError

NAME = "dmarc_failure"
SERVICE = "dmarc_failure"  # rt.services key of the Reporter
MAX_PENDING = 100  # reports waiting to be sent; more are dropped (logged)
SENDERS = 4  # sendmail processes at once
SEND_TIMEOUT = 60.0  # seconds one sendmail may take

log = logging.getLogger("mxguard")


class RateLimiter:
    """Reports per policy domain and in all, per clock hour (in memory)."""

    def __init__(self) -> None:
        self._hour = -1
        self._total = 0
        self._domains: dict[str, int] = {}

    def allow(self, domain: str, now: float, per_domain: int, total: int) -> str:
        """"" when a report may be sent (and counts it); else which limit says no."""
        hour = int(now // 3600)
        if hour != self._hour:
            self._hour, self._total = hour, 0
            self._domains.clear()
        if self._total >= total:
            return "global"
        if self._domains.get(domain, 0) >= per_domain:
            return "domain"
        self._total += 1
        self._domains[domain] = self._domains.get(domain, 0) + 1
        return ""


class Reporter:
    """The limiter plus the reports being sent in the background."""

    def __init__(self) -> None:
        self.limiter = RateLimiter()
        self.pending: set[asyncio.Task[None]] = set()
        self._senders: asyncio.Semaphore | None = None

    def senders(self) -> asyncio.Semaphore:
        if self._senders is None:
            self._senders = asyncio.Semaphore(SENDERS)
        return self._senders

    def submit(self, coro: Coroutine[Any, Any, None]) -> bool:
        if len(self.pending) >= MAX_PENDING:
            coro.close()
            return False
        task = asyncio.get_running_loop().create_task(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True

    async def drain(self) -> None:
        """Wait for every report in flight (tests, shutdown)."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)


def reporter(rt: Runtime) -> Reporter:
    found: Reporter = rt.services.setdefault(SERVICE, Reporter())
    return found


def report_from(rt: Runtime) -> str:
    cfg = rt.config
    return cfg.dmarc.failure_report_from or \
        f"postmaster@{cfg.milter.authserv_id or authresults.default_authserv_id()}"


def _org(rt: Runtime) -> OrgDomains:
    org = rt.services.get(ORG_SERVICE)
    return org if isinstance(org, OrgDomains) else default_org_domains()


def _interval(rt: Runtime) -> float:
    return rt.config.storage.fail_open_log_interval


# ------------------------------------------------------------------ background


async def verified(rt: Runtime, res: DmarcResult,
                   dests: Sequence[afrf.Destination]) -> list[afrf.Destination]:
    """The destinations that may receive the report (RFC 9991 §5)."""
    org = _org(rt)
    policy_domain = res.record_domain or res.from_domain
    policy_org = org.organizational(policy_domain)
    ok: list[afrf.Destination] = []
    for dest in dests:
        if not afrf.is_external(org.organizational(dest.domain), policy_org):
            ok.append(dest)
            continue
        name = afrf.verification_name(policy_domain, dest.domain)
        try:
            answer = await rt.resolver.query(name, "TXT")
        except DnsTempError as exc:
            log_failure("dmarc-failure-verify", _interval(rt),
                        "check=dmarc_failure verify=temperror name=%s detail=%r", name, str(exc))
            continue
        texts = [r for r in answer.records if isinstance(r, str)]
        if afrf.authorizes(texts):
            ok.append(dest)
        else:
            log.info("check=dmarc_failure external destination not authorized: no v=DMARC1 "
                     "at %s", name)
    return ok


async def _spf_dns(rt: Runtime, res: DmarcResult, spf: SpfAuth | None) -> tuple[str, ...]:
    """The SPF record of an aligned SPF identifier that failed (RFC 9991 §4: SPF-DNS)."""
    if spf is None or res.spf_aligned or not afrf.spf_failed(spf) or not spf.domain:
        return ()
    domain = spf.domain.lower().rstrip(".")
    org = _org(rt)
    strict = res.record is not None and res.record.aspf == "s"
    if domain != res.from_domain and (strict or org.organizational(domain) != res.org_domain):
        return ()
    try:
        answer = await rt.resolver.query(domain, "TXT")
    except DnsTempError:
        return ()
    return tuple(r for r in answer.records if isinstance(r, str)
                 and r.lower().startswith("v=spf1"))


async def sendmail(rt: Runtime, data: bytes, sender: str, recipients: Sequence[str]) -> bool:
    """Pipe one message to ``[dmarc] sendmail``; False (logged) on failure."""
    argv = [*shlex.split(rt.config.dmarc.sendmail), "-i", "-f", sender, "--", *recipients]
    async with reporter(rt).senders():
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            log_failure("dmarc-failure-send", _interval(rt),
                        "check=dmarc_failure send_error=%r command=%s", str(exc), argv[0])
            return False
        try:
            _out, err = await asyncio.wait_for(proc.communicate(data), SEND_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            log_failure("dmarc-failure-send", _interval(rt),
                        "check=dmarc_failure send_error=%r command=%s", "timed out", argv[0])
            return False
    if proc.returncode != 0:
        detail = " ".join(err.decode("utf-8", "replace").split())[:200]
        log_failure("dmarc-failure-send", _interval(rt),
                    "check=dmarc_failure send_error=%r command=%s exit=%s", detail, argv[0],
                    proc.returncode)
        return False
    return True


async def send_report(rt: Runtime, inc: afrf.Incident,
                      dests: Sequence[afrf.Destination]) -> None:
    """Verify, build, send: the background half of the row."""
    res = inc.result
    to = await verified(rt, res, dests)
    if not to:
        return
    inc = replace(inc, spf_dns=await _spf_dns(rt, res, inc.spf))
    cfg = rt.config
    org = _org(rt)
    authserv = cfg.milter.authserv_id or authresults.default_authserv_id()
    ar = authresults.build(authserv, spf=inc.spf, dkim=list(inc.dkim), dmarc=res)
    org_of = {d.domain.lower(): org.organizational(d.domain.lower()) for d in inc.dkim if d.domain}
    sender = report_from(rt)

    def make(recipients: Sequence[afrf.Destination]) -> bytes:
        return afrf.build(inc, report_from=sender, recipients=[d.address for d in recipients],
                          user_agent=f"mxguard/{__version__}", authresults=ar,
                          body=cfg.dmarc.failure_report_body,
                          redact=cfg.dmarc.failure_report_redact,
                          hostname=authserv, now=rt.clock(), org_of=org_of)

    data = make(to)
    fits = [d for d in to if not d.limit or d.limit >= len(data)]  # ruf=...!size
    if not fits:
        return
    if len(fits) != len(to):
        data = make(fits)
    if await sendmail(rt, data, sender, [d.address for d in fits]):
        log.info("check=dmarc_failure report sent domain=%s destinations=%d queue_id=%s",
                 res.from_domain, len(fits), inc.envelope_id or "-")


# ------------------------------------------------------------------ the row


def _outcome(tx: Transaction) -> DmarcOutcome | None:
    result = tx.results.get("dmarc")
    return result.data if result is not None and isinstance(result.data, DmarcOutcome) \
        else None


async def check(tx: Transaction, rt: Runtime) -> CheckResult | None:
    """Queue a failure report for this message when its domain asks for one."""
    outcome = _outcome(tx)
    if outcome is None or tx.message is None or rt.dry_run:
        return None
    res = outcome.result
    if res.record is None or afrf.is_feedback_report(tx.message.headers) or afrf.has_psd(res):
        return None
    spf, dkim = auth_inputs(tx)
    fo = afrf.wanted(res, spf, dkim or [])
    dests = afrf.destinations(res.record.ruf)
    if not fo or not dests:
        return None
    cfg = rt.config.dmarc
    domain = res.record_domain or res.from_domain
    limited = reporter(rt).limiter.allow(domain, rt.clock(), cfg.failure_reports_per_domain_hour,
                                         cfg.failure_reports_per_hour)
    if limited:
        return CheckResult(NAME, reason=f"rate_limited:{limited}:{domain}",
                           extra={"dmarc_ruf": "rate_limited"})
    body = None
    if cfg.failure_report_body == "full":
        body = tx.message.body_file().read(afrf.MAX_BODY)
    inc = afrf.Incident(res, spf, tuple(dkim or ()), tuple(tx.message.headers), body,
                        tx.client_address, tx.client_port, tx.sender, tx.queue_id, rt.clock())
    if not reporter(rt).submit(send_report(rt, inc, dests)):
        log_failure("dmarc-failure-queue", _interval(rt),
                    "check=dmarc_failure queue_full=%d domain=%s", MAX_PENDING, domain)
        return CheckResult(NAME, reason=f"queue_full:{domain}", extra={"dmarc_ruf": "dropped"})
    return CheckResult(NAME, reason=f"queued:fo={fo}:{domain}", extra={"dmarc_ruf": "queued"})


__all__ = ["NAME", "RateLimiter", "Reporter", "check", "report_from", "reporter", "send_report",
           "sendmail", "verified"]
