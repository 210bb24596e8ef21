"""DMARC failure reports (RFC 9991): fo= options, privacy, rate limits, external
destination verification, the report format, off by default. Real DNS on
loopback and a real sendmail stand-in (a script that keeps what it was given);
every positive case has a control next to it."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxguard.auth import dmarc_failure_report as afrf
from mxguard.auth.dkim import DkimResult
from mxguard.auth.dmarc import DkimAuth, DmarcRecord, DmarcResult, OrgDomains, SpfAuth
from mxguard.checks import PIPELINE, dmarc, dmarc_failure
from mxguard.config import Config, ConfigError, DmarcConfig, DnsConfig, MilterConfig, load
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import CheckResult, Message, Mode, Stage, Transaction
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone
from tests.support import DATA

ORG = OrgDomains(str(DATA / "psl" / "public_suffix_list.dat"))
NOW = 1_780_000_000.0

ZONE: Zone = {
    # fo= cases (RFC 9989 §4.7), reports to an address inside the domain
    "_dmarc.fo0.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:ruf@fo0.example")],
    "_dmarc.fo1.example": [("TXT", "v=DMARC1; p=none; fo=1; ruf=mailto:ruf@fo1.example")],
    "_dmarc.fod.example": [("TXT", "v=DMARC1; p=none; fo=d; ruf=mailto:ruf@fod.example")],
    "_dmarc.fos.example": [("TXT", "v=DMARC1; p=none; fo=s; ruf=mailto:ruf@fos.example")],
    "_dmarc.noruf.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.psd.example": [("TXT", "v=DMARC1; p=reject; psd=y; ruf=mailto:ruf@psd.example")],
    # external destinations (RFC 9991 §5, RFC 9990 §4)
    "_dmarc.ext.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:ruf@vendor.example")],
    "ext.example._report._dmarc.vendor.example": [("TXT", "v=DMARC1")],
    "_dmarc.rogue.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:victim@vendor.example")],
    "_dmarc.tmp.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:ruf@slow.example")],
    "tmp.example._report._dmarc.slow.example": [("SERVFAIL", None)],
    "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:a@two.example,"
                                   "mailto:b@vendor.example")],
    "_dmarc.tiny.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:small@tiny.example!1k,"
                                    "mailto:big@tiny.example!10m")],
    "spfd.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
    "_dmarc.spfd.example": [("TXT", "v=DMARC1; p=reject; ruf=mailto:ruf@spfd.example")],
}
for i in range(3):
    ZONE[f"_dmarc.d{i}.example"] = [("TXT", f"v=DMARC1; p=reject; ruf=mailto:r@d{i}.example")]


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


@pytest.fixture
def sendmail(tmp_path: Path) -> Path:
    """A sendmail stand-in: each call appends {"argv", "data"} to calls.jsonl."""
    script = tmp_path / "sendmail"
    script.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as fh:\n"
        "    fh.write(json.dumps({'argv': sys.argv[1:], "
        "'data': sys.stdin.buffer.read().decode('utf-8', 'replace')}) + '\\n')\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(sendmail: Path) -> list[dict[str, Any]]:
    path = sendmail.parent / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def runtime(dns: DNSServer, sendmail: Path, **opts: Any) -> Runtime:
    opts.setdefault("failure_reports", True)
    cfg = Config(dmarc=DmarcConfig(sendmail=str(sendmail), **opts),
                 dns=DnsConfig(nameservers=[dns.address], timeout=0.3),
                 milter=MilterConfig(authserv_id="mx.receiver.test"))
    resolver = Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=0))
    return Runtime(cfg, resolver, services={dmarc.ORG_SERVICE: ORG}, clock=lambda: NOW)


BODY = b"Hi Bob,\r\nsee http://evil.example/x\r\n"


def transaction(frm: str, spf: SpfAuth | None, dkim: list[DkimResult]) -> Transaction:
    headers = [("Received", " from mail.sender.example ([192.0.2.9]) by mx for <bob@rcpt.test>"),
               ("From", f" Alice <{frm}>"), ("To", " Bob <bob@rcpt.test>"),
               ("Subject", " quarterly numbers"), ("Message-ID", " <id123@sender.example>")]
    tx = Transaction(Stage.DONE, client_address="192.0.2.9", client_port="40000",
                     sender=f"bounce@{frm.rpartition('@')[2]}", recipients=["bob@rcpt.test"],
                     queue_id="4ABCDEF")
    tx.message = Message(headers, lambda: __import__("io").BytesIO(BODY), len(BODY))
    if spf is not None:
        tx.results["spf"] = CheckResult("spf", data=spf)
    tx.results["dkim_verify"] = CheckResult("dkim_verify", data=dkim)
    return tx


async def run(rt: Runtime, frm: str, spf: SpfAuth | None = None,
              dkim: list[DkimResult] | None = None) -> CheckResult | None:
    tx = transaction(frm, spf, dkim or [])
    got = await dmarc.check(tx, rt)
    assert got is not None
    tx.results["dmarc"] = got
    result = await dmarc_failure.check(tx, rt)
    await dmarc_failure.reporter(rt).drain()
    return result


def spf_of(result: str, frm: str) -> SpfAuth:
    return SpfAuth(result, frm.rpartition("@")[2], "mailfrom", f"bounce@{frm.rpartition('@')[2]}")


def dkim_of(result: str, domain: str) -> DkimResult:
    return DkimResult(result, domain=domain, selector="s1", identity=f"@{domain}",
                      header_b="abcdefgh")


# ------------------------------------------------------------------ fo=


FO_CASES: list[tuple[str, str, str | None, str | None, bool]] = [
    # id (RFC 9989 §4.7 fo= tag), From, SPF result (aligned), DKIM result (aligned), report?
    ("fo0-both-fail", "a@fo0.example", "fail", None, True),
    ("fo0-spf-pass-control", "a@fo0.example", "pass", "fail", False),
    ("fo1-dkim-fails-spf-passes", "a@fo1.example", "pass", "fail", True),
    ("fo1-both-pass-control", "a@fo1.example", "pass", "pass", False),
    ("fod-dkim-fails", "a@fod.example", "pass", "fail", True),
    ("fod-no-dkim-failure-control", "a@fod.example", "fail", "pass", False),
    ("fos-spf-fails", "a@fos.example", "fail", "pass", True),
    ("fos-spf-passes-control", "a@fos.example", "pass", "fail", False),
    # RFC 9991 §2: ruf= of a psd=y record is not used; no ruf=, nothing to do
    ("psd-y", "a@psd.example", "fail", None, False),
    ("no-ruf", "a@noruf.example", "fail", None, False),
]


@pytest.mark.parametrize(("frm", "spf", "dkim", "sent"), [c[1:] for c in FO_CASES],
                         ids=[c[0] for c in FO_CASES])
async def test_fo_option_decides(dns: DNSServer, sendmail: Path, frm: str, spf: str | None,
                                 dkim: str | None, sent: bool) -> None:
    rt = runtime(dns, sendmail)
    domain = frm.rpartition("@")[2]
    await run(rt, frm, spf_of(spf, frm) if spf else None,
              [dkim_of(dkim, domain)] if dkim else [])
    got = calls(sendmail)
    assert len(got) == (1 if sent else 0)
    if sent:
        assert got[0]["argv"][-1] == f"ruf@{domain}"
        assert got[0]["argv"][:4] == ["-i", "-f", "postmaster@mx.receiver.test", "--"]


def test_fo_options_parse() -> None:
    assert afrf.fo_options("d:s") == {"d", "s"}
    assert afrf.fo_options("x") == {"0"}  # nothing known: the default (RFC 9989 §4.7)
    assert afrf.fo_options("1:x") == {"1"}


async def test_temperror_never_reports() -> None:
    rec = DmarcRecord(p="reject", ruf=("mailto:r@x.example",), fo="1")
    assert afrf.wanted(DmarcResult("temperror", record=rec), None, []) == ""
    assert afrf.wanted(DmarcResult("fail", record=rec), None, []) == "1"  # control


# ------------------------------------------------------------------ off by default


async def test_off_by_default(dns: DNSServer, sendmail: Path) -> None:
    assert DmarcConfig().failure_reports is False
    row = next(r for r in PIPELINE.rows if r.name == dmarc_failure.NAME)
    assert row.stage is Stage.DONE
    assert row.mode(Config()) is Mode.OFF
    assert row.mode(Config(dmarc=DmarcConfig(failure_reports=True))) is Mode.ENFORCE  # control


# ------------------------------------------------------------------ the report


def parsed(data: str) -> email.message.EmailMessage:
    msg = email.message_from_string(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


async def test_report_is_multipart_report_with_feedback_part(dns: DNSServer,
                                                             sendmail: Path) -> None:
    rt = runtime(dns, sendmail)
    await run(rt, "alice@fo0.example", spf_of("fail", "alice@fo0.example"),
              [dkim_of("fail", "fo0.example")])
    (call,) = calls(sendmail)
    msg = parsed(call["data"])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    assert msg["Auto-Submitted"] == "auto-generated"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/feedback-report", "text/rfc822-headers"]
    text = call["data"]
    for line in ("Feedback-Type: auth-failure", "Auth-Failure: dmarc", "Version: 1",
                 "Identity-Alignment: dkim, spf", "Reported-Domain: fo0.example",
                 "Source-IP: 192.0.2.9", "Original-Envelope-Id: 4ABCDEF",
                 "DKIM-Domain: fo0.example", "DKIM-Selector: s1"):
        assert line in text, line
    assert "dmarc=fail" in text


async def test_spf_dns_for_a_failed_aligned_spf_identifier(dns: DNSServer,
                                                          sendmail: Path) -> None:
    rt = runtime(dns, sendmail)
    await run(rt, "a@spfd.example", spf_of("fail", "a@spfd.example"))
    (call,) = calls(sendmail)
    assert 'SPF-DNS: txt : spfd.example : "v=spf1 ip4:192.0.2.1 -all"' in call["data"]
    # control: an unaligned SPF domain's record is not looked up or reported
    rt2 = runtime(dns, sendmail)
    await run(rt2, "a@fo0.example", SpfAuth("fail", "spfd.example"))
    assert "SPF-DNS" not in calls(sendmail)[1]["data"]


# ------------------------------------------------------------------ privacy


async def test_local_parts_redacted_and_body_left_out(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail)
    await run(rt, "alice@fo0.example", spf_of("fail", "alice@fo0.example"))
    data = calls(sendmail)[0]["data"]
    headers_part = data.split("Content-Type: text/rfc822-headers", 1)[1]
    assert "alice@" not in headers_part and "bob@" not in headers_part
    assert "@fo0.example" in headers_part and "@rcpt.test" in headers_part  # domains stay
    assert afrf.redacted_token("alice") + "@fo0.example" in headers_part
    assert "<id123@sender.example>" in headers_part  # Message-ID kept: an identifier
    assert "bounce@" not in data  # Original-Mail-From redacted too
    assert "Original-Rcpt-To" not in data
    assert "evil.example" not in data  # headers only by default (RFC 9991 §7)


async def test_redaction_off_keeps_local_parts(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail, failure_report_redact=False)
    await run(rt, "alice@fo0.example", spf_of("fail", "alice@fo0.example"))
    data = calls(sendmail)[0]["data"]
    assert "alice@fo0.example" in data and "Original-Mail-From: <bounce@fo0.example>" in data


async def test_full_body_is_defanged(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail, failure_report_body="full")
    await run(rt, "alice@fo0.example", spf_of("fail", "alice@fo0.example"))
    msg = parsed(calls(sendmail)[0]["data"])
    third = list(msg.iter_parts())[2]
    assert third.get_content_type() == "message/rfc822"
    text = third.as_string()
    assert "hxxp://evil.example/x" in text and "http://evil" not in text  # RFC 9991 §7.3


def test_attachments_removed_from_full_copies() -> None:
    raw = (b"From: a@x.example\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--b\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n")
    out = afrf._strip_attachments(raw)
    assert b"TVqQ" not in out and b"application/octet-stream part removed" in out
    assert b"hello" in out  # control: the text part stays


# ------------------------------------------------------------------ rate limits


async def test_per_domain_limit_and_other_domain_still_sent(dns: DNSServer,
                                                            sendmail: Path) -> None:
    rt = runtime(dns, sendmail, failure_reports_per_domain_hour=2)
    results = [await run(rt, "a@d0.example", spf_of("fail", "a@d0.example")) for _ in range(3)]
    assert [r.extra["dmarc_ruf"] if r else None for r in results] == \
        ["queued", "queued", "rate_limited"]
    await run(rt, "a@d1.example", spf_of("fail", "a@d1.example"))  # control: other domain
    assert [c["argv"][-1] for c in calls(sendmail)] == \
        ["r@d0.example", "r@d0.example", "r@d1.example"]


async def test_global_limit(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail, failure_reports_per_hour=2)
    for i in range(3):
        await run(rt, f"a@d{i}.example", spf_of("fail", f"a@d{i}.example"))
    assert len(calls(sendmail)) == 2


def test_limits_reset_each_hour() -> None:
    lim = dmarc_failure.RateLimiter()
    assert lim.allow("x", NOW, 1, 10) == ""
    assert lim.allow("x", NOW, 1, 10) == "domain"
    assert lim.allow("x", NOW + 3600, 1, 10) == ""  # the next hour


# ------------------------------------------------------------------ external destinations


EXT_CASES = [
    # id (RFC 9991 §5 -> RFC 9990 §4), From, recipients the report goes to
    ("external-authorized", "a@ext.example", ["ruf@vendor.example"]),
    ("external-not-authorized", "a@rogue.example", []),
    ("external-dns-failure", "a@tmp.example", []),
    ("internal-needs-no-check", "a@fo0.example", ["ruf@fo0.example"]),  # control
    ("mixed", "a@two.example", ["a@two.example"]),
]


@pytest.mark.parametrize(("frm", "to"), [c[1:] for c in EXT_CASES], ids=[c[0] for c in EXT_CASES])
async def test_external_destination_verification(dns: DNSServer, sendmail: Path, frm: str,
                                                 to: list[str]) -> None:
    rt = runtime(dns, sendmail)
    await run(rt, frm, spf_of("fail", frm))
    got = calls(sendmail)
    assert [c["argv"][4:] for c in got] == ([to] if to else [])


async def test_size_limit_of_a_destination(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail)
    await run(rt, "a@tiny.example", spf_of("fail", "a@tiny.example"))
    (call,) = calls(sendmail)
    assert call["argv"][4:] == ["big@tiny.example"]  # !1k is too small; !10m (control) fits


def test_destinations_parse() -> None:
    got = afrf.destinations(["mailto:r%40x@a.example!10k", "https://x.example/r",
                             "mailto:bad address@a.example", "mailto:r@b.example"])
    assert got == [afrf.Destination("r@x@a.example", "a.example", 10240),
                   afrf.Destination("r@b.example", "b.example")]
    assert afrf.verification_name("Ext.example.", "vendor.example") == \
        "ext.example._report._dmarc.vendor.example"


# ------------------------------------------------------------------ loops, failures


async def test_no_report_on_a_report(dns: DNSServer, sendmail: Path) -> None:
    rt = runtime(dns, sendmail)
    tx = transaction("a@fo0.example", spf_of("fail", "a@fo0.example"), [])
    assert tx.message is not None
    tx.message.headers.append(("Content-Type",
                               ' multipart/report; report-type="feedback-report"'))
    tx.results["dmarc"] = await dmarc.check(tx, rt)  # type: ignore[assignment]
    assert await dmarc_failure.check(tx, rt) is None
    tx.message.headers.pop()  # control: the same message, not a report
    assert await dmarc_failure.check(tx, rt) is not None
    await dmarc_failure.reporter(rt).drain()


async def test_send_failure_logged_once_per_interval(dns: DNSServer, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from mxguard.core.runner import ERROR_LOG
    ERROR_LOG.reset()
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'queue is down' >&2\nexit 75\n")
    broken.chmod(0o755)
    rt = runtime(dns, broken)
    for _ in range(3):
        result = await run(rt, "a@fo0.example", spf_of("fail", "a@fo0.example"))
        assert result is not None and result.extra["dmarc_ruf"] == "queued"  # never blocks
    lines = [r.getMessage() for r in caplog.records if "send_error" in r.getMessage()]
    assert len(lines) == 1 and "queue is down" in lines[0] and "exit=75" in lines[0]
    ERROR_LOG.reset()


async def test_dry_run_sends_nothing(dns: DNSServer, sendmail: Path) -> None:
    rt = dataclasses.replace(runtime(dns, sendmail), dry_run=True)
    assert await run(rt, "a@fo0.example", spf_of("fail", "a@fo0.example")) is None
    assert calls(sendmail) == []


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(("text", "ok"), [
    ('failure_report_from = "dmarc@example.org"', True),
    ('failure_report_from = "not an address"', False),
    ('sendmail = "/usr/sbin/sendmail -C /etc/postfix"', True),
    ('sendmail = "sendmail"', False),
    ('failure_report_body = "none"', False),
])
def test_config_keys(tmp_path: Path, text: str, ok: bool) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text(f"[dmarc]\n{text}\n")
    if ok:
        load(path)
    else:
        with pytest.raises(ConfigError, match="dmarc"):
            load(path)


def test_dkim_auth_alignment_of_reported_signatures() -> None:
    res = DmarcResult("fail", from_domain="x.example", org_domain="x.example",
                      record=DmarcRecord(p="reject"))
    inc = afrf.Incident(res, None, (DkimAuth("fail", "mail.x.example", "s"),
                                    DkimAuth("fail", "other.example", "s")), ())
    fields = afrf.feedback_fields(inc, user_agent="t", authresults="a; none", redact=True,
                                  org_of={"mail.x.example": "x.example",
                                          "other.example": "other.example"})
    assert ("DKIM-Domain", "mail.x.example") in fields
    assert ("DKIM-Domain", "other.example") not in fields  # control: not an aligned identifier

