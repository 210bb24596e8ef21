"""Through a real Postfix: SPF decisions and Received-SPF as a remote client sees them.

Wiring as README tells an admin (and as tests/integration/test_postfix_policy.py
does): ``check_policy_service`` with ``policy_context=helo`` in
smtpd_helo_restrictions, after ``permit_mynetworks, reject_unauth_destination``
in smtpd_recipient_restrictions, and in smtpd_data_restrictions. Clients
connect from 127.x.y.z source addresses (not in mynetworks 127.0.0.1/32); a
loopback DNS server serves the senders' SPF records.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import send

CLIENT = "127.1.0.5"
HELO = "mail.client.test"
ZONE = {
    HELO: [("A", CLIENT)],
    "fail.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "pass.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "soft.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
    "skip.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "control.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "skipsoft.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
}
FAIL_REPLY = ("550 5.7.23 <bob@example.test>: Recipient address rejected: SPF fail - not "
              f"authorized: {CLIENT} is not allowed to send mail for fail.test: see the SPF "
              "record of fail.test")
GREYLIST_OFF = '[greylist]\nmode = "off"\n'


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


Stack = tuple[MxguardProcess, PostfixInstance]  # what the conftest `stack` fixture makes


def deliver(pf: PostfixInstance, sender: str, *, rcpt: str = "bob@example.test",
            source: str = CLIENT, subject: str = "hello") -> tuple[str, bool]:
    data = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            "Message-ID: <spf@client.test>\r\n\r\nhello\r\n")
    t = send(pf.smtp_port, helo=HELO, mail_from=sender, rcpts=[rcpt], data=data,
             source_ip=source)
    return str(t.rcpts[0]), t.accepted


def test_spf_fail_is_rejected_and_nothing_arrives(stack: Callable[..., Stack],
                                                  sink: Sink) -> None:
    _mx, pf = stack(GREYLIST_OFF)
    got, accepted = deliver(pf, "alice@fail.test")
    assert got == FAIL_REPLY
    assert not accepted
    # control, same client and session shape: a passing sender is delivered
    got, accepted = deliver(pf, "alice@pass.test", subject="control")
    assert got.startswith("250"), got
    (msg,) = sink.wait_for(1)
    assert msg.header("Subject") == "control"  # and only the control arrived
    assert len(sink.wait_quiet(0.5)) == 1


def test_spf_pass_is_delivered_with_received_spf(stack: Callable[..., Stack],
                                                 sink: Sink) -> None:
    _mx, pf = stack(GREYLIST_OFF)
    got, accepted = deliver(pf, "alice@pass.test")
    assert got.startswith("250"), got
    assert accepted
    (msg,) = sink.wait_for(1)
    headers = msg.headers("Received-SPF")
    assert len(headers) == 1, headers  # one header per message, however many requests
    value = " ".join(headers[0].split())
    assert re.match(rf"pass \([^:]+: domain of alice@pass\.test designates "
                    rf"{re.escape(CLIENT)} as permitted sender\) ", value), value
    assert f"client-ip={CLIENT};" in value
    assert 'envelope-from="alice@pass.test";' in value
    assert f"helo={HELO};" in value
    assert 'mechanism="ip4:127.0.0.0/8";' in value
    assert "identity=mailfrom;" in value


def test_spf_softfail_is_delivered_with_received_spf(stack: Callable[..., Stack],
                                                     sink: Sink) -> None:
    _mx, pf = stack(GREYLIST_OFF)
    got, accepted = deliver(pf, "alice@soft.test")
    assert got.startswith("250"), got
    assert accepted
    (msg,) = sink.wait_for(1)
    (value,) = msg.headers("Received-SPF")
    assert value.startswith("softfail (")
    assert "transitioning domain of alice@soft.test does not designate" in " ".join(
        value.split())
    assert "mechanism=~all;" in value


def test_spf_fail_is_rejected_without_greylisting(stack: Callable[..., Stack],
                                                  sink: Sink) -> None:
    _mx, pf = stack("[greylist]\ndelay = 300\n")
    got, accepted = deliver(pf, "alice@fail.test")
    assert got == FAIL_REPLY  # 550 at once: never a 450 first
    assert not accepted
    # control: a sender that passes SPF is greylisted as usual
    got, accepted = deliver(pf, "alice@pass.test")
    assert got.startswith("450 4.2.0 <bob@example.test>: Recipient address rejected: "
                          "Greylisted"), got
    assert not accepted
    assert sink.wait_quiet(0.5) == []


def test_skip_spf_pass_domains_are_not_greylisted(stack: Callable[..., Stack],
                                                  sink: Sink) -> None:
    _mx, pf = stack('[greylist]\ndelay = 300\n'
                    'skip_spf_pass_domains = ["skip.test", "skipsoft.test"]\n')
    got, accepted = deliver(pf, "alice@skip.test")
    assert got.startswith("250"), got
    assert accepted
    (msg,) = sink.wait_for(1)
    assert msg.header("X-Greylist") is None
    assert (msg.header("Received-SPF") or "").startswith("pass (")
    # control: another domain that passes SPF too, but is not listed
    got, accepted = deliver(pf, "alice@control.test")
    assert got.startswith("450 4.2.0"), got
    assert not accepted
    # control: a listed domain whose SPF only softfails is greylisted
    got, accepted = deliver(pf, "alice@skipsoft.test")
    assert got.startswith("450 4.2.0"), got
    assert not accepted
    assert len(sink.wait_quiet(0.5)) == 1
