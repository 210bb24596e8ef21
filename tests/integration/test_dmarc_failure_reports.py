"""Through a real Postfix: a DMARC-failing message from a domain that publishes
ruf= makes mxguard send a failure report (RFC 9991) through the private
Postfix's own sendmail, and the report reaches the sink; a passing message
(control) makes none."""

from __future__ import annotations

import email
import email.policy
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, find_command, milter_wiring
from mxguard.testing.sink import Sink, SinkMessage
from mxguard.testing.smtp import send

OUTSIDE = "127.1.0.5"


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    zone = {
        "ruf.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        "_dmarc.ruf.test": [("TXT", "v=DMARC1; p=none; ruf=mailto:dmarc-failures@ruf.test")],
        "other.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    }
    with DNSServer(zone) as srv:
        yield srv


def message(sender: str, msgid: str) -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.test\r\nSubject: test\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{msgid}@ruf.test>\r\n"
            "\r\nHello there.\r\n").encode()


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def is_report(msg: SinkMessage) -> bool:
    return msg.message.get_content_type() == "multipart/report"


def test_failing_message_produces_a_report_at_the_sink(
        tmp_path: Path, dns: DNSServer, sink: Sink,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    mx = MxguardProcess(tmp_path)
    pf = postfix_factory(milter_wiring(mx.milter_port))
    sendmail = find_command("sendmail")
    assert sendmail is not None
    mx.write_config(
        f'[dns]\nnameservers = ["{dns.address}"]\n[helo]\nexempt_networks = []\n'
        '[greylist]\nmode = "off"\n[dkim]\ninternal_hosts = ["127.0.0.1/32"]\n'
        "[dmarc]\nfailure_reports = true\n"
        f'failure_report_from = "dmarc-reports@mx.example.test"\n'
        f'sendmail = "{sendmail} -C {pf.config_dir}"\n')
    mx.start()
    wait_listening(mx.milter_port)
    try:
        # control: SPF of ruf.test passes and aligns -- DMARC pass, no report
        t = send(pf.smtp_port, helo="mail.ruf.test", mail_from="alice@ruf.test",
                 rcpts=["bob@example.test"], data=message("alice@ruf.test", "ok1"),
                 source_ip=OUTSIDE)
        assert t.accepted, t
        (first,) = sink.wait_for(1)
        assert not is_report(first)
        # the From domain is not the SPF-authenticated one: DMARC fails (p=none: delivered)
        t = send(pf.smtp_port, helo="mail.other.test", mail_from="x@other.test",
                 rcpts=["bob@example.test"], data=message("ceo@ruf.test", "fail1"),
                 source_ip=OUTSIDE)
        assert t.accepted, t
        got = sink.wait_for(3, timeout=20)
        reports = [m for m in got if is_report(m)]
        assert len(reports) == 1, [m.message.get_content_type() for m in got]
        report = reports[0]
        assert report.rcpts == ["dmarc-failures@ruf.test"]
        assert report.mail_from == "dmarc-reports@mx.example.test"
        parsed = email.message_from_bytes(report.data, policy=email.policy.default)
        assert parsed.get_param("report-type") == "feedback-report"
        assert [p.get_content_type() for p in parsed.iter_parts()] == [  # type: ignore[attr-defined]
            "text/plain", "message/feedback-report", "text/rfc822-headers"]
        text = report.text
        assert "Auth-Failure: dmarc" in text and "Reported-Domain: ruf.test" in text
        assert "<fail1@ruf.test>" in text  # the failing message's header, not the control's
        assert "ceo@ruf.test" not in text  # local part redacted
        sink.wait_quiet(1.0)
        assert len([m for m in sink.messages if is_report(m)]) == 1  # no report on the report
    finally:
        assert mx.stop() == 0
