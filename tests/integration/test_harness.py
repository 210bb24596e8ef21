"""The integration harness itself: a private Postfix relaying to a sink."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from tests.integration.conftest import PostfixFactory

from mxguard.testing.ports import port_is_free
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import make_message, send

pytestmark = pytest.mark.integration

SENDER = "alice@client.test"


def test_message_is_relayed_to_sink_exactly_once(postfix_factory: PostfixFactory,
                                                 sink: Sink) -> None:
    pf = postfix_factory()
    data = make_message(mail_from=SENDER, to=["bob@example.test"], subject="harness one",
                        headers={"X-Harness": "relay-once"})
    t = send(pf.smtp_port, helo="client.test", mail_from=SENDER,
             rcpts=["bob@example.test"], data=data)
    assert t.banner is not None and t.banner.code == 220, t
    assert t.helo is not None and t.helo.code == 250, t
    assert t.mail == (250, "2.1.0 Ok")
    assert t.rcpts == [(250, "2.1.5 Ok")]
    assert t.data is not None and t.data.code == 354
    assert t.accepted and t.queue_id, t

    (msg,) = sink.wait_for(1, timeout=10)
    assert msg.mail_from == SENDER
    assert msg.rcpts == ["bob@example.test"]
    assert msg.header("Subject") == "harness one"
    assert msg.header("X-Harness") == "relay-once"
    assert msg.header("Message-ID") in data.decode()
    received = msg.headers("Received")
    assert len(received) == 1
    assert received[0].startswith("from client.test (unknown [127.0.0.1]) by mx.example.test "
                                  f"(Postfix) with ESMTP id {t.queue_id} for <bob@example.test>;")
    assert msg.body == b"Hello.\r\n"

    pf.wait_for_log(rf"{t.queue_id}: to=<bob@example\.test>, relay=127\.0\.0\.1.*status=sent")
    pf.wait_queue_empty(timeout=10)
    pf.flush()
    assert len(sink.wait_quiet(1.0)) == 1  # exactly once


def test_rejected_recipient_gets_5xx_and_nothing_arrives(postfix_factory: PostfixFactory,
                                                         sink: Sink) -> None:
    pf = postfix_factory({
        "smtpd_recipient_restrictions":
            "check_recipient_access inline:{blocked@example.test=REJECT}, "
            "permit_mynetworks, reject_unauth_destination",
    })
    t = send(pf.smtp_port, helo="client.test", mail_from=SENDER, rcpts=["blocked@example.test"])
    assert t.rcpts == [(554, "5.7.1 <blocked@example.test>: Recipient address rejected: "
                             "Access denied")]
    assert t.data is None and not t.accepted
    assert t.quit == (221, "2.0.0 Bye")

    # the same transaction with one good recipient: only that one is delivered
    t2 = send(pf.smtp_port, helo="client.test", mail_from=SENDER,
              rcpts=["blocked@example.test", "ok@example.test"])
    assert [r.code for r in t2.rcpts] == [554, 250]
    assert t2.accepted
    (msg,) = sink.wait_for(1, timeout=10)
    assert msg.rcpts == ["ok@example.test"]
    pf.flush()
    assert len(sink.wait_quiet(1.0)) == 1
    assert pf.queue_empty()
    assert ("reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <blocked@example.test>: "
            "Recipient address rejected: Access denied") in pf.maillog_text()


def test_xclient_pretends_another_client(postfix_factory: PostfixFactory, sink: Sink) -> None:
    pf = postfix_factory()
    pretend = {"NAME": "mail.client.test", "ADDR": "192.0.2.10", "HELO": "xhelo.client.test"}

    # XCLIENT, then a fresh EHLO (its name wins over XCLIENT HELO=)
    t = send(pf.smtp_port, xclient=pretend, helo="ehlo.client.test", mail_from=SENDER,
             rcpts=["u1@example.test"])
    assert t.xclient is not None and t.xclient.code == 220, t
    assert t.accepted, t
    # no EHLO after XCLIENT: the XCLIENT HELO name is the session's HELO
    t2 = send(pf.smtp_port, xclient=pretend, helo=None, mail_from=SENDER,
              rcpts=["u2@example.test"])
    assert t2.helo is None and t2.accepted, t2

    msgs = sink.wait_for(2, timeout=10)
    by_rcpt = {m.rcpts[0]: m for m in msgs}
    assert by_rcpt["u1@example.test"].headers("Received")[0].startswith(
        "from ehlo.client.test (mail.client.test [192.0.2.10]) by mx.example.test (Postfix) "
        "with ESMTP id ")
    assert by_rcpt["u2@example.test"].headers("Received")[0].startswith(
        "from xhelo.client.test (mail.client.test [192.0.2.10]) by mx.example.test (Postfix) "
        "with SMTP id ")
    assert f"{t.queue_id}: client=mail.client.test[192.0.2.10]" in pf.maillog_text()

    # a pretend client outside mynetworks cannot relay
    t3 = send(pf.smtp_port, xclient=pretend, helo="ehlo.client.test", mail_from=SENDER,
              rcpts=["x@elsewhere.test"])
    assert t3.rcpts == [(554, "5.7.1 <x@elsewhere.test>: Relay access denied")]


def test_source_address_outside_mynetworks(postfix_factory: PostfixFactory, sink: Sink) -> None:
    pf = postfix_factory()  # mynetworks = 127.0.0.1/32
    t = send(pf.smtp_port, source_ip="127.0.0.7", helo="client.test", mail_from=SENDER,
             rcpts=["x@elsewhere.test", "u@example.test"])
    assert t.rcpts == [(554, "5.7.1 <x@elsewhere.test>: Relay access denied"),
                       (250, "2.1.5 Ok")]
    assert t.accepted
    (msg,) = sink.wait_for(1, timeout=10)
    assert msg.rcpts == ["u@example.test"]
    assert (msg.header("Received") or "").startswith(
        "from client.test (unknown [127.0.0.7]) by mx.example.test")

    # control: from 127.0.0.1 (mynetworks) relaying elsewhere is allowed
    t2 = send(pf.smtp_port, source_ip="127.0.0.1", helo="client.test", mail_from=SENDER,
              rcpts=["x@elsewhere.test"])
    assert t2.accepted, t2
    msgs = sink.wait_for(2, timeout=10)
    assert msgs[1].rcpts == ["x@elsewhere.test"]


def test_exact_reply_texts_and_reload(postfix_factory: PostfixFactory) -> None:
    pf = postfix_factory({"smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"})
    rejected = (504, "5.5.2 <foo>: Helo command rejected: need fully-qualified hostname")

    # smtpd_delay_reject = yes: the HELO verdict comes at RCPT time
    t = send(pf.smtp_port, source_ip="127.0.0.5", helo="foo", mail_from=SENDER,
             rcpts=["u@example.test"])
    assert t.helo is not None and t.helo.code == 250
    assert t.rcpts == [rejected]

    pf.update_main_cf({"smtpd_delay_reject": "no"})  # rewrites main.cf + postfix reload
    assert pf.postconf("smtpd_delay_reject") == "no"
    t = send(pf.smtp_port, source_ip="127.0.0.5", helo="foo", mail_from=SENDER,
             rcpts=["u@example.test"])
    assert t.helo == rejected
    assert t.mail is None and t.rcpts == []


def test_deferred_mail_stays_queued_until_flushed(postfix_factory: PostfixFactory,
                                                  sink: Sink) -> None:
    pf = postfix_factory({"minimal_backoff_time": "60s", "maximal_backoff_time": "60s"})
    sink.set_reply("RCPT", 450, "4.2.0 try again later")
    t = send(pf.smtp_port, helo="client.test", mail_from=SENDER, rcpts=["u@example.test"])
    assert t.accepted
    pf.wait_for_log(rf"{t.queue_id}: to=<u@example\.test>.*status=deferred")
    assert pf.queue_ids() == [t.queue_id]
    assert sink.messages == []

    sink.reset_replies()
    pf.flush()
    (msg,) = sink.wait_for(1, timeout=10)
    assert msg.rcpts == ["u@example.test"]
    pf.wait_queue_empty(timeout=10)


def test_stop_leaves_no_processes(postfix_factory: PostfixFactory) -> None:
    pf = postfix_factory()
    t = send(pf.smtp_port, helo="client.test", mail_from=SENDER, rcpts=["u@example.test"])
    assert t.accepted
    pids = pf.pids()
    assert pf.master_pid in pids and len(pids) > 1
    assert pf.running

    pf.stop()
    assert not pf.running
    assert pf.pids() == []
    for pid in pids:  # gone, not even a zombie of ours
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        assert not re.search(r"\) Z ", stat), stat
    res = subprocess.run(["pgrep", "-f", str(pf.workdir)], capture_output=True, text=True,
                         check=False)
    assert res.stdout == ""
    assert port_is_free(pf.smtp_port)
    pf.stop()  # idempotent
