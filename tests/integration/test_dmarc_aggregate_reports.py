"""Through a real Postfix: mail from several domains passes mxguard's milter, the
daemon keeps the DMARC results, then ``mxguard dmarc report --send`` sends each
domain with rua= its aggregate report (RFC 9990) through the private Postfix's
own sendmail; each report arrives at the sink, validates against the RFC 9990
schema and counts exactly what was sent. Controls: a domain without rua= gets no
report, and a second --send sends nothing more."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import xmlschema
from tests.integration.test_dmarc_failure_reports import wait_listening
from tests.support import DATA
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, find_command, milter_wiring
from mxguard.testing.sink import Sink, SinkMessage
from mxguard.testing.smtp import send

OUTSIDE = "127.1.0.6"
SCHEMA = xmlschema.XMLSchema(str(DATA / "dmarc" / "rfc9990.xsd"))
SENT = {"a.test": 3, "b.test": 2, "norua.test": 1}  # messages per From domain


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zone: dict[str, list[tuple[str, object]]] = {}
    for domain in SENT:
        zone[domain] = [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]
    zone["_dmarc.a.test"] = [("TXT", "v=DMARC1; p=none; rua=mailto:rua@a.test")]
    zone["_dmarc.b.test"] = [("TXT", "v=DMARC1; p=quarantine; rua=mailto:rua@b.test")]
    zone["_dmarc.norua.test"] = [("TXT", "v=DMARC1; p=none")]
    with DNSServer(zone) as srv:  # type: ignore[arg-type]
        yield srv


def message(domain: str, n: int) -> bytes:
    return (f"From: user{n}@{domain}\r\nTo: bob@example.test\r\nSubject: hi {n}\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m{n}@{domain}>\r\n"
            "\r\nHello.\r\n").encode()


def report_counts(msg: SinkMessage) -> dict[str, int]:
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    (part,) = [p for p in parsed.walk() if p.get_content_type() == "application/gzip"]
    xml = gzip.decompress(part.get_payload(decode=True)).decode()
    SCHEMA.validate(xml)
    data = SCHEMA.to_dict(xml)
    assert isinstance(data, dict)
    out: dict[str, int] = {}
    for r in data["record"]:
        hf = r["identifiers"]["header_from"]
        out[hf] = out.get(hf, 0) + int(r["row"]["count"])
    return out


def test_reports_of_mail_through_postfix_arrive_valid_and_counted(
        tmp_path: Path, dns: DNSServer, sink: Sink,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    mx = MxguardProcess(tmp_path)
    pf = postfix_factory(milter_wiring(mx.milter_port))
    sendmail = find_command("sendmail")
    assert sendmail is not None
    mx.write_config(
        f'[dns]\nnameservers = ["{dns.address}"]\n[helo]\nexempt_networks = []\n'
        '[greylist]\nmode = "off"\n[dkim]\ninternal_hosts = ["127.0.0.1/32"]\n'
        '[dmarc]\nreport_interval = "off"\nreport_email = "dmarc-reports@mx.example.test"\n'
        f'sendmail = "{sendmail} -C {pf.config_dir}"\n')
    mx.start()
    wait_listening(mx.milter_port)
    try:
        n = 0
        for domain, count in SENT.items():
            for _ in range(count):
                n += 1
                t = send(pf.smtp_port, helo=f"mail.{domain}", mail_from=f"user{n}@{domain}",
                         rcpts=["bob@example.test"], data=message(domain, n),
                         source_ip=OUTSIDE)
                assert t.accepted, t
        sink.wait_for(sum(SENT.values()), timeout=30)
    finally:
        assert mx.stop() == 0  # flushes the results batch

    # The reporting period is a finished UTC day: move today's rows to yesterday.
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    db = sqlite3.connect(tmp_path / "mxguard-dmarc.db")
    with db:
        assert db.execute("SELECT SUM(count) FROM dmarc_results").fetchone()[0] == 6
        db.execute("UPDATE dmarc_results SET ts = ts - 86400, day = ?", (yesterday,))
    db.close()

    mx.start()  # the report mail passes Postfix's non_smtpd_milters: mxguard signs it
    wait_listening(mx.milter_port)
    try:
        cli = [sys.executable, "-m", "mxguard", "dmarc", "report", "--config", str(mx.config),
               "--period", yesterday, "--send"]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        got = sink.wait_for(sum(SENT.values()) + 2, timeout=30)
        reports = {m.rcpts[0]: m for m in got if m.mail_from == "dmarc-reports@mx.example.test"}
        assert sorted(reports) == ["rua@a.test", "rua@b.test"]  # control: none for norua.test
        assert report_counts(reports["rua@a.test"]) == {"a.test": 3}
        assert report_counts(reports["rua@b.test"]) == {"b.test": 2}
        subject = email.message_from_bytes(reports["rua@a.test"].data)["Subject"]
        assert subject.startswith("Report Domain: a.test Submitter: ")

        again = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(sink.wait_quiet(2.0)) == sum(SENT.values()) + 2  # no report twice
    finally:
        assert mx.stop() == 0
