"""DMARC failure reports (RFC 9991): when to send one, where to, and the report.

No I/O. :func:`wanted` decides per the ``fo=`` tag (RFC 9989 §4.7),
:func:`destinations` reads the ``ruf=`` mailto: URIs, :func:`is_external` /
:func:`verification_name` / :func:`authorizes` are the external destination
check (RFC 9990 §4, which RFC 9991 §5 applies to ``ruf``), :func:`redact_local`
replaces local parts (RFC 6590), and :func:`build` writes the report: an ARF
message (RFC 5965) of Feedback-Type ``auth-failure`` (RFC 6591) with the
fields RFC 9991 §4 adds (``Auth-Failure: dmarc``, ``Identity-Alignment``,
``DKIM-*`` and ``SPF-DNS`` for the aligned identifiers that failed).

Choices, each tested:

* ``fo=`` is a colon-separated list; unknown options are ignored and a list
  with no known option means ``0``. ``0``: neither SPF nor DKIM produced an
  aligned pass (the DMARC fail); ``1``: either did not; ``d``: a DKIM
  signature failed verification (fail, permerror, neutral, policy), aligned
  or not; ``s``: SPF failed (fail, softfail, permerror), aligned or not.
  temperror never triggers a report (no final result).
* Privacy (RFC 9991 §7): by default the third part is ``text/rfc822-headers``
  (no body); with ``body = "full"`` it is ``message/rfc822`` with URLs
  defanged (``hxxp``, §7.3) and non-text parts replaced by a note. Local parts
  of addresses in the original header fields and in ``Original-Mail-From`` are
  replaced by a keyed hash (stable within a process, so one sender's reports
  correlate without naming them); ``Original-Rcpt-To`` is never sent.
"""

from __future__ import annotations

import base64
import email.message
import email.policy
import email.utils
import hashlib
import hmac
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from mxguard.auth.dmarc import DkimAuth, DmarcResult, SpfAuth

FO_OPTIONS = ("0", "1", "d", "s")
DKIM_FAILED = ("fail", "permerror", "neutral", "policy")
SPF_FAILED = ("fail", "softfail", "permerror")
BODY_MODES = ("headers", "full")
MAX_BODY = 256 * 1024  # bytes of the original body a "full" report carries
# Header fields whose addresses are identifiers, not people: kept as they are.
_KEEP = frozenset({"message-id", "in-reply-to", "references", "dkim-signature",
                   "arc-message-signature", "arc-seal", "resent-message-id"})
_ADDRESS = re.compile(r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])"
                      r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                      r"|\"[^\"\r\n]*\")@(?=[A-Za-z0-9\[])")
_URL = re.compile(rb"(?i)\bhttp(s?)://")
_SIZE = re.compile(r"!([0-9]+)([kmgt]?)\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_KEY = os.urandom(32)  # the redaction key: per process, never written anywhere


# ------------------------------------------------------------------ when


def fo_options(fo: str) -> frozenset[str]:
    """The known options of an ``fo=`` value (default ``0``)."""
    found = frozenset(o.strip().lower() for o in fo.split(":")) & set(FO_OPTIONS)
    return found or frozenset({"0"})


def dkim_failed(dkim: Sequence[DkimAuth]) -> bool:
    return any(d.result in DKIM_FAILED for d in dkim)


def spf_failed(spf: SpfAuth | None) -> bool:
    return spf is not None and spf.result in SPF_FAILED


def wanted(res: DmarcResult, spf: SpfAuth | None, dkim: Sequence[DkimAuth]) -> str:
    """The ``fo=`` option that asks for a report of this message, or ``""``."""
    rec = res.record
    if rec is None or res.result not in ("pass", "fail"):
        return ""
    opts = fo_options(rec.fo)
    if "0" in opts and not res.spf_aligned and not res.dkim_aligned:
        return "0"
    if "1" in opts and not (res.spf_aligned and res.dkim_aligned):
        return "1"
    if "d" in opts and dkim_failed(dkim):
        return "d"
    if "s" in opts and spf_failed(spf):
        return "s"
    return ""


# ------------------------------------------------------------------ where


@dataclass(frozen=True, slots=True)
class Destination:
    address: str  # the mailto: address, percent-decoded
    domain: str  # its domain, lower case
    limit: int = 0  # the !size limit in bytes (0: none)


def destinations(ruf: Sequence[str]) -> list[Destination]:
    """The mailto: URIs of ``ruf=`` (RFC 9989 §4.7); other schemes are skipped."""
    found: list[Destination] = []
    for uri in ruf:
        scheme, _, rest = uri.partition(":")
        if scheme.lower() != "mailto":
            continue
        limit = 0
        size = _SIZE.search(rest)
        if size is not None:
            limit = int(size.group(1)) * _UNITS[size.group(2).lower()]
            rest = rest[:size.start()]
        address = urllib.parse.unquote(rest.partition("?")[0]).strip()
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or any(c in address for c in " \t\r\n<>,"):
            continue
        dest = Destination(address, domain.lower().rstrip("."), limit)
        if dest not in found:
            found.append(dest)
    return found


def verification_name(policy_domain: str, dest_domain: str) -> str:
    """Where an external destination says yes (RFC 9990 §4)."""
    return f"{policy_domain.rstrip('.').lower()}._report._dmarc.{dest_domain.rstrip('.').lower()}"


def is_external(dest_org: str, policy_org: str) -> bool:
    """Outside the Organizational Domain of the policy record (RFC 9991 §5)."""
    return dest_org.lower() != policy_org.lower()


def authorizes(texts: Sequence[str]) -> bool:
    """A TXT answer at :func:`verification_name` that starts with ``v=DMARC1``."""
    return any(re.match(r"[ \t]*v[ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)", t) for t in texts)


def has_psd(res: DmarcResult) -> bool:
    """A ``psd=y`` record: its ruf= must not be used (RFC 9991 §2)."""
    rec = res.record
    if rec is None:
        return False
    for term in rec.raw.split(";"):
        name, _, value = term.partition("=")
        if name.strip().lower() == "psd" and value.strip().lower() == "y":
            return True
    return False


# ------------------------------------------------------------------ privacy


def redacted_token(local: str) -> str:
    """A stable stand-in for a local part (RFC 6590): keyed hash, 8 characters."""
    digest = hmac.new(_KEY, local.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return base64.b32encode(digest[:5]).decode("ascii").lower()


def redact_local(text: str) -> str:
    """Every ``local@`` in ``text`` with its local part replaced."""
    return _ADDRESS.sub(lambda m: redacted_token(m.group(1)) + "@", text)


def redact_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v if n.strip().lower() in _KEEP else redact_local(v)) for n, v in headers]


def defang(body: bytes) -> bytes:
    """``http://`` -> ``hxxp://`` so nobody follows a link by accident (RFC 9991 §7.3)."""
    return _URL.sub(lambda m: b"hxxp" + m.group(1) + b"://", body)


# ------------------------------------------------------------------ the report


@dataclass(frozen=True, slots=True)
class Incident:
    """What the report says about one message."""

    result: DmarcResult
    spf: SpfAuth | None
    dkim: tuple[DkimAuth, ...]
    headers: tuple[tuple[str, str], ...]  # the original header fields, (name, value)
    body: bytes | None = None  # the original body (CRLF) for body = "full"
    source_ip: str = ""
    source_port: str = ""
    mail_from: str = ""
    envelope_id: str = ""  # our queue id
    arrival: float = 0.0
    spf_dns: tuple[str, ...] = ()  # the SPF record(s) of an aligned SPF domain that failed


def identity_alignment(res: DmarcResult) -> str:
    """Which mechanisms failed to authenticate an aligned identity (RFC 9991 §4)."""
    failed = [n for n, ok in (("dkim", res.dkim_aligned), ("spf", res.spf_aligned)) if not ok]
    return ", ".join(failed) or "none"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _aligned_with(domain: str, res: DmarcResult, org_of: dict[str, str]) -> bool:
    """Is the signature's d= an aligned identifier (strict: same name; relaxed: same
    Organizational Domain, looked up in ``org_of``)?"""
    name = domain.lower().rstrip(".")
    if name == res.from_domain:
        return True
    relaxed = res.record is None or res.record.adkim != "s"
    return relaxed and org_of.get(name, "") == res.org_domain


def feedback_fields(inc: Incident, *, user_agent: str, authresults: str,
                    redact: bool, org_of: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The machine-readable part (RFC 5965 §3.1, RFC 6591 §3.1, RFC 9991 §4)."""
    res = inc.result
    org_of = org_of or {}
    if redact:  # smtp.mailfrom names the envelope sender
        authresults = redact_local(authresults)
    fields = [("Feedback-Type", "auth-failure"), ("User-Agent", user_agent), ("Version", "1"),
              ("Auth-Failure", "dmarc"), ("Authentication-Results", authresults),
              ("Identity-Alignment", identity_alignment(res))]
    if inc.envelope_id:
        fields.append(("Original-Envelope-Id", inc.envelope_id))
    if inc.mail_from:
        mail_from = redact_local(inc.mail_from) if redact else inc.mail_from
        fields.append(("Original-Mail-From", f"<{mail_from}>"))
    if inc.arrival:
        fields.append(("Arrival-Date", email.utils.formatdate(inc.arrival)))
    if inc.source_ip:
        fields.append(("Source-IP", inc.source_ip))
    if inc.source_port:
        fields.append(("Source-Port", inc.source_port))
    fields.append(("Reported-Domain", res.from_domain))
    if not res.dkim_aligned:  # DKIM failures of an aligned identifier
        for sig in inc.dkim:
            if sig.result in DKIM_FAILED and sig.domain and _aligned_with(sig.domain, res, org_of):
                fields.append(("DKIM-Domain", sig.domain.lower()))
                fields.append(("DKIM-Identity", sig.identity or "@" + sig.domain.lower()))
                if sig.selector:
                    fields.append(("DKIM-Selector", sig.selector))
    if not res.spf_aligned and inc.spf is not None and inc.spf.domain and inc.spf_dns:
        for text in inc.spf_dns:
            fields.append(("SPF-DNS", f"txt : {inc.spf.domain.lower()} : {_quoted(text)}"))
    return fields


def _strip_attachments(raw: bytes) -> bytes:
    """A full copy keeps its text parts; any other part becomes a short note."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if not msg.is_multipart():
        return raw
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() == "text":
            continue
        kind = part.get_content_type()
        for name in ("Content-Transfer-Encoding", "Content-Disposition", "Content-Type"):
            del part[name]
        part["Content-Type"] = "text/plain; charset=us-ascii"
        part.set_payload(f"[{kind} part removed from this report]\r\n")
    return msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))


def original_part(inc: Incident, *, body: str, redact: bool) -> email.message.Message:
    """The third part: the header (text/rfc822-headers) or the message (message/rfc822)."""
    headers = redact_headers(inc.headers) if redact else list(inc.headers)
    head = "".join(f"{n}:{v if v[:1] in (' ', chr(9)) else ' ' + v}\r\n" for n, v in headers)
    head = head.replace("\r\n", "\n").replace("\n", "\r\n")
    part = email.message.Message()
    if body == "full" and inc.body is not None:
        raw = head.encode("utf-8", "surrogateescape") + b"\r\n" + inc.body[:MAX_BODY]
        raw = defang(_strip_attachments(raw))
        part["Content-Type"] = "message/rfc822"
        part["Content-Disposition"] = "inline"
        part.set_payload(raw.decode("ascii", "surrogateescape"))
    else:
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Disposition"] = "inline"
        part.set_payload(head.encode("utf-8", "surrogateescape")
                         .decode("ascii", "replace").replace("\ufffd", "?"))
    return part


def _fields_text(fields: Sequence[tuple[str, str]]) -> str:
    return "".join(f"{n}: {' '.join(v.split())}\r\n" for n, v in fields)


def build(inc: Incident, *, report_from: str, recipients: Sequence[str], user_agent: str,
          authresults: str, body: str = "headers", redact: bool = True,
          hostname: str = "localhost", now: float | None = None,
          org_of: dict[str, str] | None = None) -> bytes:
    """The whole report message (CRLF line ends), ready for sendmail."""
    res = inc.result
    report = email.message.Message()
    report["From"] = report_from
    report["To"] = ", ".join(recipients)
    report["Date"] = email.utils.formatdate(now)
    report["Subject"] = f"DMARC failure report for {res.from_domain}"
    report["Message-ID"] = email.utils.make_msgid("dmarc-failure", domain=hostname)
    report["MIME-Version"] = "1.0"
    report["Auto-Submitted"] = "auto-generated"  # RFC 3834: no replies, no reports on it
    report["Content-Type"] = "multipart/report; report-type=feedback-report"
    human = email.message.Message()
    human["Content-Type"] = "text/plain; charset=us-ascii"
    human["Content-Transfer-Encoding"] = "7bit"
    when = email.utils.formatdate(inc.arrival) if inc.arrival else "an unknown date"
    human.set_payload(
        f"This is a DMARC authentication failure report for an email message\r\n"
        f"claiming to be from {res.from_domain}, received from IP "
        f"{inc.source_ip or 'unknown'} on {when}.\r\n"
        f"DMARC result: {res.result} (policy {res.policy}, aligned: "
        f"{'SPF' if res.spf_aligned else ''}{'DKIM' if res.dkim_aligned else ''}"
        f"{'' if res.spf_aligned or res.dkim_aligned else 'none'}).\r\n")
    machine = email.message.Message()
    machine["Content-Type"] = "message/feedback-report"
    machine["Content-Transfer-Encoding"] = "7bit"
    machine.set_payload(_fields_text(feedback_fields(
        inc, user_agent=user_agent, authresults=authresults, redact=redact, org_of=org_of)))
    report.set_payload([human, machine, original_part(inc, body=body, redact=redact)])
    return report.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))


def is_feedback_report(headers: Sequence[tuple[str, str]]) -> bool:
    """Is this message itself an ARF report (never report on a report)?"""
    for name, value in headers:
        if name.strip().lower() == "content-type":
            low = "".join(value.split()).lower()
            return low.startswith("multipart/report") and "report-type=feedback-report" in \
                low.replace('"', "")
    return False


__all__ = ["BODY_MODES", "Destination", "Incident", "authorizes", "build", "destinations",
           "dkim_failed", "feedback_fields", "fo_options", "has_psd", "identity_alignment",
           "is_external", "is_feedback_report", "redact_headers", "redact_local",
           "redacted_token", "spf_failed", "verification_name", "wanted"]
