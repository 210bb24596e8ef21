"""DMARC aggregate reports (RFC 9990), sans I/O: rows in, XML / gzip / mail out.

* :func:`build_report` turns one policy domain's per-message rows of one
  reporting period into a :class:`Report`: one ``<record>`` per distinct
  (source IP, identifiers, DKIM/SPF results, evaluated disposition), counts
  summed (RFC 9990 §2.1, "one record per ... tuple").
* :func:`report_xml` writes the RFC 9990 XML (namespace
  ``urn:ietf:params:xml:ns:dmarc-2.0``, Appendix A schema); :func:`gzip_report`
  compresses it deterministically (no timestamp, so a retry sends the same bytes).
* :func:`destinations` reads ``rua=`` (``mailto:`` only, RFC 9990 §3 "Transport";
  ``!size`` suffix per RFC 9989's URI syntax); :func:`needs_verification` and
  :func:`verification_name` say when and where the external destination record
  ``<policy-domain>._report._dmarc.<destination-domain>`` is looked up
  (RFC 9990 §3.3 "Verifying External Destinations"), :func:`verified` judges the
  TXT answer.
* :func:`report_filename`, :func:`report_subject` and :func:`report_message`
  follow RFC 9990 §3.1 (filename ``receiver!policy-domain!begin!end.xml.gz``)
  and §3.2 (Subject ``Report Domain: ... Submitter: ... Report-ID: <...>``,
  ``application/gzip`` attachment).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from xml.sax.saxutils import escape

from mxguard.content.evals.base import org_domain
from mxguard.store.results import ResultRecord

NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"
DAY = 86400

_DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror",
                           "permerror"})
_SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror",
                          "permerror"})
_OVERRIDES = frozenset({"forwarded", "sampled_out", "trusted_forwarder", "mailing_list",
                        "local_policy", "other"})
_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
TEST_MODE = "policy_test_mode"  # the override checks/dmarc stores for a t=y record


@dataclass(frozen=True, slots=True)
class Row:
    """One ``<record>``: what RFC 9990 §2.1 groups by, and the message count."""

    source_ip: str
    header_from: str
    envelope_from: str
    envelope_to: str
    disposition: str
    dkim_eval: str  # DMARC-aligned DKIM: pass | fail
    spf_eval: str
    override: str
    override_comment: str
    dkim: tuple[tuple[str, str, str], ...]
    spf: tuple[str, str, str]  # (domain, scope, result)
    count: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    """One aggregate report: one policy domain, one period."""

    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    domain: str
    p: str
    sp: str
    np: str
    adkim: str
    aspf: str
    fo: str
    testing: str  # "y" when the record asked for testing mode (t=y, or pct=0 of RFC 7489)
    rua: tuple[str, ...]
    rows: tuple[Row, ...] = field(default=())

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.rows)


def period_bounds(day: str) -> tuple[int, int]:
    """``YYYY-MM-DD`` -> (begin, end) UNIX seconds of that UTC day; end is the last second."""
    start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)
    begin = int(start.timestamp())
    return begin, begin + DAY - 1


def report_id(domain: str, day: str, org_name: str) -> str:
    """Stable per (domain, period, reporter): a retry re-sends the same Report-ID."""
    digest = hashlib.sha256(f"{org_name}\0{domain}\0{day}".encode()).hexdigest()[:16]
    return f"{day.replace('-', '')}.{digest}@{domain}"


def _disposition(rec: ResultRecord) -> str:
    # RFC 9990 §2.1.4 / ActionDispositionType: "pass" = passed DMARC under an
    # enforcing policy, "none" = no action (p=none or nothing applied)
    if rec.disposition in ("quarantine", "reject"):
        return rec.disposition
    if rec.dmarc_result == "pass" and rec.policy in ("quarantine", "reject"):
        return "pass"
    return "none"


def _row_key(rec: ResultRecord) -> Row:
    spf_result = rec.spf_result if rec.spf_result in _SPF_RESULTS else "none"
    spf_domain = rec.spf_domain or rec.envelope_from or rec.header_from
    return Row(
        source_ip=rec.source_ip, header_from=rec.header_from,
        envelope_from=rec.envelope_from, envelope_to=rec.envelope_to,
        disposition=_disposition(rec),
        dkim_eval="pass" if rec.dkim_aligned else "fail",
        spf_eval="pass" if rec.spf_aligned else "fail",
        override=rec.override if rec.override in _OVERRIDES else ("other" if rec.override
                                                                   else ""),
        override_comment=rec.override_comment,
        dkim=tuple(sorted((d, s, r if r in _DKIM_RESULTS else "permerror")
                          for d, s, r in rec.dkim)),
        spf=(spf_domain, rec.spf_scope if rec.spf_scope in ("helo", "mfrom") else "mfrom",
             spf_result))


def build_report(domain: str, day: str, records: Iterable[ResultRecord], *, org_name: str,
                 email: str) -> Report | None:
    """The report of ``domain`` for UTC ``day``; None without rows or without rua=.

    The published policy is the one seen last in the period (the rows keep what
    applied to each message; the record may change during a day)."""
    recs = [r for r in records if r.policy_domain == domain]
    if not recs:
        return None
    last = max(recs, key=lambda r: r.ts)
    if not last.rua:
        return None
    groups: dict[Row, int] = {}
    for rec in recs:
        key = _row_key(rec)
        groups[key] = groups.get(key, 0) + rec.count
    rows = tuple(Row(**{**{f: getattr(k, f) for f in Row.__slots__ if f != "count"},
                        "count": n})
                 for k, n in sorted(groups.items(), key=lambda kv: (kv[0].source_ip,
                                                                    repr(kv[0]))))
    begin, end = period_bounds(day)
    return Report(org_name=org_name, email=email, report_id=report_id(domain, day, org_name),
                  begin=begin, end=end, domain=domain, p=last.p, sp=last.sp or last.p,
                  np=last.np, adkim=last.adkim if last.adkim in ("r", "s") else "r",
                  aspf=last.aspf if last.aspf in ("r", "s") else "r", fo=last.fo,
                  testing="y" if last.pct == 0 or any(r.override == TEST_MODE for r in recs)
                  else "n",
                  rua=last.rua, rows=rows)


def _el(name: str, value: str | int, indent: int) -> str:
    return f"{' ' * indent}<{name}>{escape(str(value))}</{name}>\n"


def report_xml(report: Report) -> bytes:
    """The RFC 9990 XML document of ``report`` (UTF-8)."""
    out = io.StringIO()
    w = out.write
    w('<?xml version="1.0" encoding="UTF-8"?>\n')
    w(f'<feedback xmlns="{NAMESPACE}">\n')
    w(_el("version", "1.0", 2))
    w("  <report_metadata>\n")
    w(_el("org_name", report.org_name, 4))
    w(_el("email", report.email, 4))
    w(_el("report_id", report.report_id, 4))
    w("    <date_range>\n")
    w(_el("begin", report.begin, 6))
    w(_el("end", report.end, 6))
    w("    </date_range>\n")
    w("  </report_metadata>\n")
    w("  <policy_published>\n")
    w(_el("domain", report.domain, 4))
    w(_el("adkim", report.adkim, 4))
    w(_el("aspf", report.aspf, 4))
    w(_el("p", report.p, 4))
    w(_el("sp", report.sp, 4))
    w(_el("testing", report.testing, 4))
    if report.fo:
        w(_el("fo", report.fo, 4))
    w("  </policy_published>\n")
    for row in report.rows:
        w("  <record>\n    <row>\n")
        w(_el("source_ip", row.source_ip, 6))
        w(_el("count", row.count, 6))
        w("      <policy_evaluated>\n")
        w(_el("disposition", row.disposition, 8))
        w(_el("dkim", row.dkim_eval, 8))
        w(_el("spf", row.spf_eval, 8))
        if row.override:
            w("        <reason>\n")
            w(_el("type", row.override, 10))
            if row.override_comment:
                w(_el("comment", row.override_comment, 10))
            w("        </reason>\n")
        w("      </policy_evaluated>\n    </row>\n")
        w("    <identifiers>\n")
        if row.envelope_to:
            w(_el("envelope_to", row.envelope_to, 6))
        if row.envelope_from:
            w(_el("envelope_from", row.envelope_from, 6))
        w(_el("header_from", row.header_from, 6))
        w("    </identifiers>\n    <auth_results>\n")
        for d, s, r in row.dkim:
            w("      <dkim>\n")
            w(_el("domain", d, 8))
            w(_el("selector", s, 8))
            w(_el("result", r, 8))
            w("      </dkim>\n")
        w("      <spf>\n")
        w(_el("domain", row.spf[0], 8))
        w(_el("scope", row.spf[1], 8))
        w(_el("result", row.spf[2], 8))
        w("      </spf>\n    </auth_results>\n  </record>\n")
    w("</feedback>\n")
    return out.getvalue().encode("utf-8")


def gzip_report(xml: bytes) -> bytes:
    """gzip without a timestamp: the same report compresses to the same bytes."""
    return gzip.compress(xml, compresslevel=9, mtime=0)


# ------------------------------------------------------------ destinations


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # the mailbox of a mailto: URI
    max_size: int | None  # from "!size", bytes; None: no limit given

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


def destinations(rua: Sequence[str]) -> tuple[list[Destination], list[str]]:
    """(usable mailto destinations, problems) of ``rua=``; other schemes are skipped."""
    out: list[Destination] = []
    problems: list[str] = []
    for uri in rua:
        body, _, size = uri.partition("!")
        scheme, _, addr = body.partition(":")
        if scheme.lower() != "mailto":
            problems.append(f"{uri}: only mailto: destinations are supported")
            continue
        addr = addr.split("?", 1)[0].strip()
        if "@" not in addr or any(c in addr for c in "\r\n<>,; "):
            problems.append(f"{uri}: not a mail address")
            continue
        limit: int | None = None
        if size:
            m = _SIZE.match(size.strip())
            if m is None:
                problems.append(f"{uri}: bad size limit {size!r}")
                continue
            limit = int(m.group(1)) * _UNITS[m.group(2).lower()]
        dest = Destination(addr, limit)
        if dest not in out:
            out.append(dest)
    return out, problems


def needs_verification(policy_domain: str, dest: Destination) -> bool:
    """RFC 9990 §3.3: a destination outside the policy domain's organizational
    domain must publish that it accepts the domain's reports."""
    return org_domain(dest.domain) != org_domain(policy_domain)


def verification_name(policy_domain: str, dest: Destination) -> str:
    return f"{policy_domain.rstrip('.')}._report._dmarc.{dest.domain}"


def verified(txt_records: Iterable[str]) -> bool:
    """A TXT answer at the verification name authorises reports when one record
    starts with ``v=DMARC1`` (RFC 9990 §3.3)."""
    return any(re.match(r"^v\s*=\s*DMARC1\s*(;|$)", t.strip()) for t in txt_records)


# ------------------------------------------------------------ the mail


def report_filename(submitter: str, report: Report) -> str:
    """RFC 9990 §3.1: ``receiver "!" policy-domain "!" begin "!" end "." extension``."""
    return f"{submitter}!{report.domain}!{report.begin}!{report.end}.xml.gz"


def report_subject(submitter: str, report: Report) -> str:
    """RFC 9990 §3.2 Subject."""
    return (f"Report Domain: {report.domain} Submitter: {submitter} "
            f"Report-ID: <{report.report_id}>")


def report_message(report: Report, compressed: bytes, *, to: Sequence[str],
                   submitter: str, now: float) -> EmailMessage:
    """The report mail: a short text part and the gzip attachment (RFC 9990 §3.2)."""
    msg = EmailMessage()
    msg["From"] = report.email
    msg["To"] = ", ".join(to)
    msg["Subject"] = report_subject(submitter, report)
    msg["Date"] = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
    msg["Message-ID"] = make_msgid(idstring=report.report_id.split("@", 1)[0],
                                   domain=submitter or None)
    begin = dt.datetime.fromtimestamp(report.begin, dt.UTC).strftime("%Y-%m-%d")
    msg.set_content(f"DMARC aggregate report for {report.domain} ({begin} UTC, "
                    f"{report.messages} messages) from {report.org_name}.\n")
    msg.add_attachment(compressed, maintype="application", subtype="gzip",
                       filename=report_filename(submitter, report))
    return msg


__all__ = ["NAMESPACE", "Destination", "Report", "Row", "build_report", "destinations",
           "gzip_report", "needs_verification", "period_bounds", "report_filename",
           "report_id", "report_message", "report_subject", "report_xml",
           "verification_name", "verified"]
