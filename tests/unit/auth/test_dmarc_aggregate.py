"""RFC 9990 aggregate reports: the XML validates against the RFC's schema, rows
are grouped as §2.1 says, destinations and their verification (§3.3), the
filename (§3.1) and the mail (§3.2). Each positive case has a control."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import gzip
from email.message import Message

import pytest
import xmlschema
from lxml import etree

from mxguard.auth import dmarc_aggregate as agg
from mxguard.store.results import ResultRecord
from tests.support import DATA

SCHEMA = xmlschema.XMLSchema(str(DATA / "dmarc" / "rfc9990.xsd"))
NS = {"d": agg.NAMESPACE}
DAY = "2026-03-01"
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()


def rec(**kw: object) -> ResultRecord:
    base = ResultRecord(
        ts=T0 + 3600, source_ip="192.0.2.1", header_from="example.com",
        envelope_from="example.com", envelope_to="mx.test",
        dkim=(("example.com", "sel", "pass"),), spf_domain="example.com", spf_result="pass",
        policy_domain="example.com", p="reject", rua=("mailto:agg@example.com",),
        dmarc_result="pass", policy="reject", dkim_aligned=True, spf_aligned=True)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def build(records: list[ResultRecord], domain: str = "example.com") -> agg.Report | None:
    return agg.build_report(domain, DAY, records, org_name="MX Test", email="dmarc@mx.test")


def parsed(report: agg.Report) -> etree._Element:
    xml = agg.report_xml(report)
    SCHEMA.validate(xml.decode())  # raises on any deviation from the RFC 9990 schema
    return etree.fromstring(xml)


CASES = [
    # (name, records, expected rows as (ip, count, disposition, dkim, spf)); RFC 9990 §2.1:
    # one record per (source IP, policy evaluated, identifiers, auth results)
    ("same group sums counts (§2.1)", [rec(), rec(ts=T0 + 7200)],
     [("192.0.2.1", 2, "pass", "pass", "pass")]),
    ("control: other IP is another record (§2.1)", [rec(), rec(source_ip="192.0.2.2")],
     [("192.0.2.1", 1, "pass", "pass", "pass"), ("192.0.2.2", 1, "pass", "pass", "pass")]),
    ("failing and rejected (§2.1.4 disposition)",
     [rec(dmarc_result="fail", disposition="reject", dkim_aligned=False, spf_aligned=False,
          dkim=(), spf_result="fail")],
     [("192.0.2.1", 1, "reject", "fail", "fail")]),
    ("control: p=none passes as none, not pass (§2.1.4)",
     [rec(p="none", policy="none")], [("192.0.2.1", 1, "none", "pass", "pass")]),
    ("IPv6 source validates (§2.1 IPAddress)", [rec(source_ip="2001:db8::1")],
     [("2001:db8::1", 1, "pass", "pass", "pass")]),
]


@pytest.mark.parametrize(("name", "records", "want"), CASES, ids=[c[0] for c in CASES])
def test_records_grouped_and_schema_valid(name: str, records: list[ResultRecord],
                                          want: list[tuple[str, int, str, str, str]]) -> None:
    report = build(records)
    assert report is not None
    root = parsed(report)
    got = [(r.findtext("d:row/d:source_ip", namespaces=NS),
            int(r.findtext("d:row/d:count", namespaces=NS) or 0),
            r.findtext("d:row/d:policy_evaluated/d:disposition", namespaces=NS),
            r.findtext("d:row/d:policy_evaluated/d:dkim", namespaces=NS),
            r.findtext("d:row/d:policy_evaluated/d:spf", namespaces=NS))
           for r in root.findall("d:record", NS)]
    assert got == want


def test_override_reason_is_reported_and_control_has_none() -> None:
    # RFC 9990 §2.1.4: a disposition other than the policy carries a reason
    sampled = parsed(build([rec(dmarc_result="fail", disposition="none",
                                override="sampled_out", override_comment="pct=50",
                                dkim_aligned=False, spf_aligned=False)]) or _no())
    assert sampled.findtext(".//d:reason/d:type", namespaces=NS) == "sampled_out"
    plain = parsed(build([rec()]) or _no())
    assert plain.find(".//d:reason", NS) is None


def _no() -> agg.Report:
    raise AssertionError("no report")


def test_no_rua_no_report_and_control() -> None:
    # RFC 9990 §3: reports go to the rua= of the record; none without it
    assert build([rec(rua=())]) is None
    assert build([rec()]) is not None
    assert build([rec()], domain="other.example") is None  # rows of another domain


def test_subdomain_mail_is_in_the_policy_domains_report() -> None:
    # RFC 9989 §4.10 / RFC 9990 §2.1: the report is of the domain whose record applied
    report = build([rec(header_from="news.example.com")])
    assert report is not None and report.domain == "example.com"
    root = parsed(report)
    assert root.findtext(".//d:identifiers/d:header_from", namespaces=NS) == \
        "news.example.com"
    assert root.findtext("d:policy_published/d:domain", namespaces=NS) == "example.com"


def test_metadata_and_period_bounds() -> None:
    root = parsed(build([rec()]) or _no())
    begin = int(root.findtext(".//d:date_range/d:begin", namespaces=NS) or 0)
    end = int(root.findtext(".//d:date_range/d:end", namespaces=NS) or 0)
    assert (begin, end) == (int(T0), int(T0) + 86399)  # one UTC day (§2.1.1)
    assert root.findtext(".//d:org_name", namespaces=NS) == "MX Test"
    assert root.findtext(".//d:email", namespaces=NS) == "dmarc@mx.test"


def test_gzip_is_deterministic_and_round_trips() -> None:
    xml = agg.report_xml(build([rec()]) or _no())
    assert agg.gzip_report(xml) == agg.gzip_report(xml)
    assert gzip.decompress(agg.gzip_report(xml)) == xml


DEST_CASES = [
    # (rua, addresses, limits, problems) -- mailto only, "!size" limits (RFC 9990 §3)
    (("mailto:a@example.com",), ["a@example.com"], [None], 0),
    (("mailto:a@example.com!10m",), ["a@example.com"], [10 * 1024**2], 0),
    (("https://example.com/r",), [], [], 1),
    (("mailto:not-an-address",), [], [], 1),
    (("mailto:a@example.com", "mailto:a@example.com"), ["a@example.com"], [None], 0),
]


@pytest.mark.parametrize(("rua", "addrs", "limits", "problems"), DEST_CASES)
def test_destinations(rua: tuple[str, ...], addrs: list[str], limits: list[int | None],
                      problems: int) -> None:
    dests, probs = agg.destinations(rua)
    assert [d.address for d in dests] == addrs
    assert [d.max_size for d in dests] == limits
    assert len(probs) == problems


def test_external_destination_verification() -> None:
    # RFC 9990 §3.3: another organizational domain must be verified ...
    ext = agg.Destination("r@reports.example.net", None)
    assert agg.needs_verification("example.com", ext)
    assert agg.verification_name("example.com", ext) == \
        "example.com._report._dmarc.reports.example.net"
    assert agg.verified(["v=DMARC1"]) and agg.verified(["v=DMARC1; "])
    assert not agg.verified(["v=spf1 -all"]) and not agg.verified([])
    # ... control: the same organizational domain needs no record
    assert not agg.needs_verification("news.example.com", agg.Destination("a@example.com",
                                                                          None))


def test_filename_subject_and_mail() -> None:
    report = build([rec()]) or _no()
    data = agg.gzip_report(agg.report_xml(report))
    # RFC 9990 §3.1 filename, §3.2 subject and attachment
    name = agg.report_filename("mx.test", report)
    assert name == f"mx.test!example.com!{int(T0)}!{int(T0) + 86399}.xml.gz"
    msg = agg.report_message(report, data, to=["agg@example.com"], submitter="mx.test",
                             now=T0 + 86400)
    parsed_msg: Message = email.message_from_bytes(msg.as_bytes())
    subject = str(parsed_msg["Subject"]).replace("\r", "").replace("\n", "")  # unfolded
    assert subject == (f"Report Domain: example.com Submitter: mx.test "
                       f"Report-ID: <{report.report_id}>")
    parts = [p for p in parsed_msg.walk() if p.get_content_type() == "application/gzip"]
    assert len(parts) == 1 and parts[0].get_filename() == name
    assert parts[0].get_payload(decode=True) == data


def test_parsedmarc_reads_the_report_back() -> None:
    # an independent parser (parsedmarc, which knows RFC 9990's namespace) sees the counts
    import parsedmarc
    report = build([rec(), rec(), rec(source_ip="192.0.2.9", dkim_aligned=False,
                                      dmarc_result="pass")]) or _no()
    out = parsedmarc.parse_aggregate_report_xml(agg.report_xml(report).decode(), offline=True)
    assert out["policy_published"]["domain"] == "example.com"
    got = sorted((r["source"]["ip_address"], r["count"]) for r in out["records"])
    assert got == [("192.0.2.1", 2), ("192.0.2.9", 1)]


@pytest.mark.parametrize(("override", "testing"), [("policy_test_mode", "y"), ("", "n")])
def test_testing_flag_follows_the_t_y_override(override: str, testing: str) -> None:
    from mxguard.auth.dmarc_aggregate import build_report
    from mxguard.store.results import ResultRecord

    rows = [ResultRecord(ts=1_780_000_000.0, source_ip="192.0.2.1", header_from="t.test",
                         policy_domain="t.test", p="reject", rua=("mailto:r@t.test",),
                         dmarc_result="fail", override=override),
            ResultRecord(ts=1_780_000_100.0, source_ip="192.0.2.2", header_from="t.test",
                         policy_domain="t.test", p="reject", rua=("mailto:r@t.test",),
                         dmarc_result="pass")]
    report = build_report("t.test", "2026-05-28", rows, org_name="mx.test", email="d@mx.test")
    assert report is not None and report.testing == testing
