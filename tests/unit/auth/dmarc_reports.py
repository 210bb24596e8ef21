"""Build aggregate report XML, gzip, zip and report mail for the tests (our own
generator, independent of the parser under test)."""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass, field
from email.message import EmailMessage
from xml.sax.saxutils import escape

NS = "urn:ietf:params:xml:ns:dmarc-2.0"


@dataclass
class Rec:
    ip: str
    count: int
    disposition: str = "none"
    dkim: str = "pass"
    spf: str = "pass"
    header_from: str = "ours.example"
    envelope_from: str = "ours.example"
    dkim_results: list[tuple[str, str, str]] = field(
        default_factory=lambda: [("ours.example", "s1", "pass")])
    spf_results: list[tuple[str, str, str]] = field(
        default_factory=lambda: [("ours.example", "mfrom", "pass")])
    reasons: list[tuple[str, str]] = field(default_factory=list)


def report_xml(*, fmt: str = "rfc9990", org: str = "Reporter Inc", report_id: str = "r1",
               domain: str = "ours.example", begin: int = 1_764_547_200,
               end: int = 1_764_633_599, records: list[Rec] | None = None,
               prolog: str = '<?xml version="1.0" encoding="UTF-8"?>\n') -> bytes:
    """One report: ``fmt`` rfc9990 (namespace, np/testing/discovery_method, no pct)
    or rfc7489 (appendix C: pct, no namespace)."""
    recs = records if records is not None else [Rec("192.0.2.1", 1)]
    root = f'<feedback xmlns="{NS}">' if fmt == "rfc9990" else "<feedback>"
    if fmt == "rfc9990":
        policy = ("<p>reject</p><sp>quarantine</sp><np>reject</np><adkim>r</adkim>"
                  "<aspf>r</aspf><testing>n</testing><discovery_method>treewalk"
                  "</discovery_method>")
        gen = "<generator>test generator 1.0</generator>"
    else:
        policy = "<adkim>r</adkim><aspf>r</aspf><p>reject</p><sp>reject</sp><pct>100</pct>"
        gen = ""
    rows = []
    for r in recs:
        reasons = "".join(f"<reason><type>{t}</type><comment>{escape(c)}</comment></reason>"
                          for t, c in r.reasons)
        dkim = "".join(f"<dkim><domain>{d}</domain><selector>{s}</selector>"
                       f"<result>{res}</result></dkim>" for d, s, res in r.dkim_results)
        spf = "".join(f"<spf><domain>{d}</domain><scope>{s}</scope><result>{res}</result>"
                      "</spf>" for d, s, res in r.spf_results)
        rows.append(f"<record><row><source_ip>{r.ip}</source_ip><count>{r.count}</count>"
                    f"<policy_evaluated><disposition>{r.disposition}</disposition>"
                    f"<dkim>{r.dkim}</dkim><spf>{r.spf}</spf>{reasons}</policy_evaluated>"
                    f"</row><identifiers><envelope_from>{r.envelope_from}</envelope_from>"
                    f"<header_from>{r.header_from}</header_from></identifiers>"
                    f"<auth_results>{dkim}{spf}</auth_results></record>")
    text = (f"{prolog}{root}<version>1.0</version><report_metadata>"
            f"<org_name>{escape(org)}</org_name><email>dmarc@reporter.example</email>"
            f"<report_id>{escape(report_id)}</report_id><date_range><begin>{begin}</begin>"
            f"<end>{end}</end></date_range>{gen}</report_metadata>"
            f"<policy_published><domain>{domain}</domain>{policy}</policy_published>"
            + "".join(rows) + "</feedback>\n")
    return text.encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def zipped(data: bytes, name: str = "report.xml") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def report_mail(attachment: bytes, *, ctype: str = "application/gzip",
                filename: str = "reporter.example!ours.example!1!2.xml.gz",
                msgid: str = "<r1@reporter.example>") -> bytes:
    msg = EmailMessage()
    msg["From"] = "dmarc@reporter.example"
    msg["To"] = "dmarc-reports@ours.example"
    msg["Subject"] = "Report Domain: ours.example Submitter: reporter.example"
    msg["Message-ID"] = msgid
    msg.set_content("This is a DMARC aggregate report.\n")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def plain_mail(n: int = 1) -> bytes:
    return (f"From: someone@else.example\nTo: dmarc-reports@ours.example\n"
            f"Subject: hello {n}\nMessage-ID: <plain{n}@else.example>\n\n"
            "Not a report, just mail sent to the report address.\n").encode()
