"""Received DMARC aggregate reports: parsing (RFC 9990 and RFC 7489 appendix C),
containers (gzip, zip, mail), the limits that refuse hostile input, summaries.

Table-driven; each positive row has a control row next to it that must not
fire. Reports come from tests/data/dmarc/received (parsedmarc's samples, see
PROVENANCE.md) and from our own generator (tests/unit/auth/dmarc_reports.py).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mxguard.auth.dmarc_ingest import (
    RFC7489,
    RFC9990,
    AggregateReport,
    Limits,
    ReportError,
    decompress,
    parse_report,
    report_attachments,
    reports_from_bytes,
    summarize,
)
from tests.support import DATA
from tests.unit.auth.dmarc_reports import Rec, gz, plain_mail, report_mail, report_xml, zipped

SAMPLES = DATA / "dmarc" / "received"
RFC9990_SAMPLE = (SAMPLES / "rfc9990-sample.xml").read_bytes()
RFC7489_SAMPLE = (SAMPLES / "example.net!example.com!1529366400!1529452799.xml").read_bytes()
TWILIGHT = (SAMPLES / "twilight.eml").read_bytes()


# ------------------------------------------------------------------ formats


@dataclass(frozen=True)
class FormatCase:
    name: str
    rfc: str  # the section that decides it
    data: bytes
    format: str
    org: str
    domain: str
    messages: int
    np: str
    pct: str


FORMAT_CASES = [
    FormatCase("rfc9990 sample: namespace, np, no pct", "RFC 9990 §3, appendix A",
               RFC9990_SAMPLE, RFC9990, "Sample Reporter", "example.com", 123, "none", ""),
    FormatCase("control: rfc7489 sample: no namespace, pct", "RFC 7489 appendix C",
               RFC7489_SAMPLE, RFC7489, "example.net", "example.com", 1, "", "100"),
    FormatCase("generated rfc9990", "RFC 9990 §3, appendix A",
               report_xml(records=[Rec("192.0.2.1", 4), Rec("2001:db8::1", 6)]), RFC9990,
               "Reporter Inc", "ours.example", 10, "reject", ""),
    FormatCase("control: generated rfc7489", "RFC 7489 appendix C",
               report_xml(fmt="rfc7489", records=[Rec("192.0.2.1", 4)]), RFC7489,
               "Reporter Inc", "ours.example", 4, "", "100"),
    FormatCase("windows-1252 declared (expat does not know it)", "RFC 7489 appendix C",
               report_xml(fmt="rfc7489", org="Caf\xe9", prolog='<?xml version="1.0" '
                          'encoding="windows-1252"?>\n').decode().encode("cp1252"),
               RFC7489, "Caf\xe9", "ours.example", 1, "", "100"),
]


@pytest.mark.parametrize("case", FORMAT_CASES, ids=lambda c: c.name)
def test_formats(case: FormatCase) -> None:
    rep = parse_report(case.data)
    assert (rep.format, rep.org_name, rep.domain, rep.messages, rep.np, rep.pct) == \
        (case.format, case.org, case.domain, case.messages, case.np, case.pct)


def test_rfc9990_fields() -> None:
    """RFC 9990 §3 / appendix A: testing, discovery_method, generator, disposition pass,
    the DKIM selector and the SPF scope (mfrom when absent)."""
    rep = parse_report(RFC9990_SAMPLE)
    assert (rep.testing, rep.discovery_method, rep.generator) == \
        ("n", "treewalk", "Example DMARC Aggregate Reporter v1.2")
    rec = rep.records[0]
    assert (rec.disposition, rec.dkim, rec.spf, rec.dmarc_pass) == ("pass", "pass", "fail", True)
    assert rec.dkim_results == (("example.com", "abc123", "pass"),)
    assert rec.spf_results == (("example.com", "mfrom", "fail"),)
    # control: the 7489 sample fails both aligned identifiers
    assert parse_report(RFC7489_SAMPLE).records[0].dmarc_pass is False


def test_json_round_trip() -> None:
    rep = parse_report(report_xml(records=[Rec("192.0.2.1", 3, reasons=[("forwarded", "x")])]))
    assert AggregateReport.from_json(rep.to_json()) == rep


# ------------------------------------------------------------------ containers

XML = report_xml(report_id="c1")


def _zip_of_many(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"r{i}.xml", XML)
    return buf.getvalue()


@dataclass(frozen=True)
class ContainerCase:
    name: str
    data: bytes
    reports: int  # reports found
    error: str = ""  # substring of the refusal ("" none)


CONTAINER_CASES = [
    ContainerCase("bare xml", XML, 1),
    ContainerCase("gzip (.xml.gz)", gz(XML), 1),
    ContainerCase("control: truncated gzip", gz(XML)[:30], 0, "gzip"),
    ContainerCase("zip", zipped(XML), 1),
    ContainerCase("control: truncated zip", zipped(XML)[:40], 0, "zip"),
    ContainerCase("mail with application/gzip attachment", report_mail(gz(XML)), 1),
    ContainerCase("mail with application/zip attachment",
                  report_mail(zipped(XML), ctype="application/zip", filename="r.zip"), 1),
    ContainerCase("mail with text/xml attachment",
                  report_mail(XML, ctype="text/xml", filename="r.xml"), 1),
    ContainerCase("mail, octet-stream but .xml.gz name",
                  report_mail(gz(XML), ctype="application/octet-stream",
                              filename="a!b!1!2.xml.gz"), 1),
    ContainerCase("control: a mail without a report is skipped", plain_mail(), 0),
    ContainerCase("control: a mail with a PDF attachment is skipped",
                  report_mail(b"%PDF-1.4 x", ctype="application/pdf", filename="a.pdf"), 0),
    ContainerCase("real report mail (zip, parsedmarc sample)", TWILIGHT, 1),
]


@pytest.mark.parametrize("case", CONTAINER_CASES, ids=lambda c: c.name)
def test_containers(case: ContainerCase) -> None:
    found = reports_from_bytes(case.data, "t")
    assert sum(1 for f in found if f.report is not None) == case.reports
    errors = [f.error for f in found if f.error]
    if case.error:
        assert errors and case.error in errors[0]
    else:
        assert errors == []


def test_report_attachments_names_the_part() -> None:
    parts = report_attachments(TWILIGHT)
    assert [name for name, _ in parts] == ["google.com!twlnet.com!1549756800!1549843199.zip"]
    assert report_attachments(plain_mail()) == []  # control


# ------------------------------------------------------------------ hostile input

SMALL = Limits(max_xml_bytes=64 * 1024, max_records=10, max_depth=16, max_members=4)
def _lying_zip() -> bytes:
    """A zip bomb whose headers claim 100 bytes for a 1 MiB member."""
    data = bytearray(zipped(b"<feedback>" + b" " * (1 << 20) + b"</feedback>"))
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 22:local + 26] = (100).to_bytes(4, "little")
    data[central + 24:central + 28] = (100).to_bytes(4, "little")
    return bytes(data)


BILLION_LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE feedback [<!ENTITY a "aaaaaaaaaa">'
                  b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                  b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>\n'
                  b"<feedback><report_metadata><org_name>&c;</org_name></report_metadata>"
                  b"</feedback>")
XXE = (b'<?xml version="1.0"?>\n<!DOCTYPE feedback SYSTEM "file:///etc/passwd">\n'
       + XML.split(b"\n", 1)[1])
DEEP = b"<feedback>" + b"<x>" * 40 + b"</x>" * 40 + b"</feedback>"


@dataclass(frozen=True)
class HostileCase:
    name: str
    make: Callable[[], bytes]
    error: str  # substring of the one-line refusal ("" : control, accepted)


HOSTILE_CASES = [
    HostileCase("gzip bomb (1 MiB of zeros under a 64 KiB limit)",
                lambda: gz(b"<feedback>" + b" " * (1 << 20) + b"</feedback>"),
                "expands beyond 65536 bytes"),
    HostileCase("control: gzip under the limit", lambda: gz(XML), ""),
    HostileCase("zip bomb (member expands beyond the limit)",
                lambda: zipped(b"<feedback>" + b" " * (1 << 20) + b"</feedback>"),
                "refused (limit 65536)"),
    HostileCase("zip bomb whose headers lie about the size", _lying_zip, "zip member"),
    HostileCase("control: zip under the limit", lambda: zipped(XML), ""),
    HostileCase("zip with too many members", lambda: _zip_of_many(5), "zip with 5 members"),
    HostileCase("control: zip with the most members allowed", lambda: _zip_of_many(4), ""),
    HostileCase("huge XML", lambda: b"<feedback>" + b" " * (70 * 1024) + b"</feedback>",
                "XML of 71701 bytes refused (limit 65536)"),
    HostileCase("too many records",
                lambda: report_xml(records=[Rec(f"192.0.2.{i}", 1) for i in range(11)]),
                "11 records refused (limit 10)"),
    HostileCase("control: the most records allowed",
                lambda: report_xml(records=[Rec(f"192.0.2.{i}", 1) for i in range(10)]), ""),
    HostileCase("nesting too deep", lambda: DEEP, "nested deeper than 16"),
    HostileCase("DTD with entities (billion laughs)", lambda: BILLION_LAUGHS,
                "DTD (<!DOCTYPE>) refused"),
    HostileCase("DTD naming an external file", lambda: XXE, "DTD (<!DOCTYPE>) refused"),
    HostileCase("control: the same report without a DTD", lambda: XML, ""),
    HostileCase("not XML, gzip or zip", lambda: b"\x00\x01binary junk", "neither XML"),
    HostileCase("XML that is not a report", lambda: b"<html><body/></html>",
                "not a DMARC aggregate report (root element <html>)"),
    HostileCase("broken XML", lambda: XML[:-20], "not well-formed XML"),
    HostileCase("source_ip not an address",
                lambda: report_xml(records=[Rec("999.1.1.1", 1)]), "is not an IP address"),
]


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=lambda c: c.name)
def test_hostile_input(case: HostileCase) -> None:
    data = case.make()
    if not case.error:
        docs = decompress(data, SMALL)
        assert all(parse_report(d, SMALL).org_name for d in docs)
        return
    with pytest.raises(ReportError) as err:
        for doc in decompress(data, SMALL):
            parse_report(doc, SMALL)
    message = str(err.value)
    assert case.error in message
    assert "\n" not in message and "Traceback" not in message


def test_refusal_reaches_the_caller_as_found_error() -> None:
    found = reports_from_bytes(report_mail(BILLION_LAUGHS, ctype="text/xml",
                                           filename="r.xml"), "mail")
    assert [f.report for f in found] == [None]
    assert found[0].where == "mail:r.xml" and "DTD" in found[0].error


# ------------------------------------------------------------------ summary

DAY = 86400
BEGIN = 1_764_547_200  # 2025-12-01


def _reports() -> list[AggregateReport]:
    a = parse_report(report_xml(org="Big Mail", report_id="a", begin=BEGIN,
                                end=BEGIN + DAY - 1, records=[
        Rec("192.0.2.1", 10),
        Rec("198.51.100.7", 5, disposition="quarantine", dkim="fail", spf="fail",
            dkim_results=[("evil.example", "x", "fail")],
            spf_results=[("bounce.other.example", "mfrom", "softfail")]),
        Rec("203.0.113.9", 2, dkim="fail", spf="fail",
            dkim_results=[("esp.example", "k", "pass")],
            spf_results=[("esp.example", "mfrom", "pass")],
            reasons=[("mailing_list", "list")]),
    ]))
    b = parse_report(report_xml(org="Small Mail", report_id="b", begin=BEGIN + DAY,
                                end=BEGIN + 2 * DAY - 1, records=[
        Rec("192.0.2.1", 3, spf="fail", spf_results=[("ours.example", "mfrom", "fail")]),
        Rec("198.51.100.7", 1, disposition="reject", dkim="fail", spf="fail",
            dkim_results=[], spf_results=[("bounce.other.example", "mfrom", "softfail")]),
    ]))
    other = parse_report(report_xml(org="Big Mail", report_id="c", domain="theirs.example",
                                    records=[Rec("192.0.2.200", 99)]))
    return [a, b, other]


def test_summary_figures() -> None:
    """Per source: DMARC passes when an aligned identifier passes (RFC 9989 §4.4,
    the policy_evaluated dkim/spf of RFC 9990 §3); dispositions as reported."""
    by_ip = {s.source_ip: s for s in summarize(_reports(), "ours.example")}
    assert list(by_ip) == ["192.0.2.1", "198.51.100.7", "203.0.113.9"]  # most mail first
    good, bad, esp = by_ip["192.0.2.1"], by_ip["198.51.100.7"], by_ip["203.0.113.9"]
    assert (good.messages, good.dmarc_pass, good.dmarc_fail, good.dkim_aligned,
            good.spf_aligned) == (13, 13, 0, 13, 10)
    assert good.reporters == {"Big Mail", "Small Mail"} and not good.failures
    assert (bad.messages, bad.dmarc_pass, bad.dmarc_fail) == (6, 0, 6)
    assert dict(bad.dispositions) == {"quarantine": 5, "reject": 1}
    assert bad.failures.most_common(1) == [("SPF softfail for bounce.other.example", 6)]
    assert bad.failures["DKIM fail for evil.example"] == 5
    assert bad.failures["no DKIM signature"] == 1
    assert esp.failures["DKIM pass for esp.example not aligned with ours.example"] == 2
    assert esp.failures["override mailing_list"] == 2
    # control: the other domain's source is not in our summary
    assert "192.0.2.200" not in by_ip


def test_summary_since() -> None:
    day2 = dt.date(2025, 12, 2)
    by_ip = {s.source_ip: s for s in summarize(_reports(), "ours.example", since=day2)}
    assert by_ip["192.0.2.1"].messages == 3  # only report b ends on or after day 2
    # control: the day before keeps both reports
    assert {s.source_ip: s for s in summarize(
        _reports(), "ours.example", since=day2 - dt.timedelta(days=1))}["192.0.2.1"] \
        .messages == 13
