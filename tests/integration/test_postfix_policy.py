"""Through a real Postfix: HELO replies and greylisting as a remote client sees them.

Wiring is what README tells an admin: ``check_policy_service`` with
``policy_context=helo`` in smtpd_helo_restrictions (so Postfix words HELO
rejections itself), after ``permit_mynetworks, reject_unauth_destination`` in
smtpd_recipient_restrictions, and in smtpd_data_restrictions so every header
mxguard owes the message gets prepended. Clients connect from 127.x.y.z source addresses (not in
mynetworks); a loopback DNS server serves the test zones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.daemon import MxguardProcess

from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import send

ZONE = {
    "mail.sender.test": [("A", "192.0.2.10")],
    "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
}
DELAY = 2


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


Stack = tuple[MxguardProcess, PostfixInstance]  # what the conftest `stack` fixture makes


def deliver(pf: PostfixInstance, *, helo: str = "mail.sender.test",
            sender: str = "alice@sender.test", rcpt: str = "bob@example.test",
            source: str = "127.1.0.5", subject: str = "hello") -> tuple[str, bool]:
    data = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            "Message-ID: <m@sender.test>\r\n\r\nhello\r\n")
    t = send(pf.smtp_port, helo=helo, mail_from=sender, rcpts=[rcpt], data=data,
             source_ip=source)
    return str(t.rcpts[0]), t.accepted


@pytest.mark.parametrize(("helo", "reply"), [
    ("foo..sender.test", "501 5.5.2 <foo..sender.test>: Helo command rejected: Invalid name"),
    ("exchange", "504 5.5.2 <exchange>: Helo command rejected: need fully-qualified hostname"),
    ("192.0.2.1", "504 5.5.2 <192.0.2.1>: Helo command rejected: need fully-qualified hostname"),
    ("nx.sender.test", "450 4.7.1 <nx.sender.test>: Helo command rejected: Host not found"),
])
def test_helo_replies_through_postfix(stack: Callable[..., Stack], helo: str,
                                      reply: str) -> None:
    _mx, pf = stack("[greylist]\nmode = \"off\"\n")
    got, accepted = deliver(pf, helo=helo)
    assert got == reply
    assert not accepted


def test_good_helo_is_accepted(stack: Callable[..., Stack], sink: Sink) -> None:  # control
    _mx, pf = stack("[greylist]\nmode = \"off\"\n")
    got, accepted = deliver(pf, helo="mail.sender.test")
    assert got.startswith("250"), got
    assert accepted
    assert len(sink.wait_for(1)) == 1


def test_greylisting_defers_then_delivers_with_x_greylist(stack: Callable[..., Stack],
                                                          sink: Sink) -> None:
    _mx, pf = stack(f"[greylist]\ndelay = {DELAY}\n")
    got, accepted = deliver(pf)
    assert got.startswith("450 4.2.0 <bob@example.test>: Recipient address rejected: "
                          "Greylisted, see "), got
    assert not accepted
    got, _ = deliver(pf)  # too early: still deferred
    assert got.startswith("450 4.2.0"), got
    time.sleep(DELAY + 0.5)
    got, accepted = deliver(pf)
    assert got.startswith("250"), got
    (msg,) = sink.wait_for(1)
    assert msg.header("X-Greylist") is not None
    assert "delayed" in msg.header("X-Greylist")
    assert msg.header("Received-SPF") is not None  # both owed headers arrive
    # the next message of the same triplet passes at once, without a second X-Greylist
    got, accepted = deliver(pf, subject="second")
    assert accepted
    second = sink.wait_for(2)[1]
    assert second.header("X-Greylist") is None


def test_auto_whitelisted_client_is_not_greylisted(stack: Callable[..., Stack],
                                                   sink: Sink) -> None:
    _mx, pf = stack(f"[greylist]\ndelay = {DELAY}\nauto_whitelist_clients = 1\n"
                    "auto_whitelist_interval = 0\n")
    assert deliver(pf)[0].startswith("450 4.2.0")
    time.sleep(DELAY + 0.5)
    assert deliver(pf)[1]  # one successful delivery: the client is now whitelisted
    got, accepted = deliver(pf, sender="carol@sender.test", rcpt="dave@example.test")
    assert accepted, got
    # control: another client network with the same new triplet is still greylisted
    got, accepted = deliver(pf, sender="erin@sender.test", source="127.2.0.5")
    assert got.startswith("450 4.2.0"), got


def test_whitelisted_recipient_is_not_greylisted(stack: Callable[..., Stack],
                                                 tmp_path: Path, sink: Sink) -> None:
    wl = tmp_path / "recipients.txt"
    wl.write_text("# recipients that want every mail at once\nvip@example.test\n")
    _mx, pf = stack(f"[greylist]\ndelay = 300\nrecipient_whitelist_files = [\"{wl}\"]\n")
    got, accepted = deliver(pf, rcpt="vip@example.test")
    assert accepted, got
    got, accepted = deliver(pf, rcpt="other@example.test")  # control
    assert got.startswith("450 4.2.0"), got


def test_observe_mode_delivers_and_logs(stack: Callable[..., Stack], sink: Sink) -> None:
    mx, pf = stack("[greylist]\ndelay = 300\n", top="observe = true\n")
    got, accepted = deliver(pf, helo="exchange")
    assert accepted, got
    assert len(sink.wait_for(1)) == 1
    text = mx.wait_log("observe=")
    assert "greylist:" in text and "Greylisted" in text
    assert "helo:504 5.5.2 <exchange>" in text
