"""Through a real Postfix: the milter door signs, verifies, writes one
Authentication-Results header and enforces DMARC.

Postfix is wired with ``smtpd_milters`` / ``non_smtpd_milters`` to mxguard's
milter port and the policy door as in README. 127.0.0.1 is the internal host
(mynetworks and ``[dkim] internal_hosts``); outside clients connect from
127.1.0.5. A loopback DNS server publishes SPF, DKIM and DMARC records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from tests.support.daemon import MxguardProcess

from mxguard.auth.dkim_keys import SigningKey, public_key_record
from mxguard.auth.dkim_sign import sign
from mxguard.testing.dns import DNSServer
from mxguard.testing.postfix import PostfixInstance, milter_wiring, policy_wiring
from mxguard.testing.sink import Sink
from mxguard.testing.smtp import send

AUTHSERV = "mx.example.test"
OUTSIDE = "127.1.0.5"


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ed": ed25519.Ed25519PrivateKey.generate()}


@pytest.fixture
def dns(keys: dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]) -> Iterator[DNSServer]:
    zone = {
        "mail.sender.test": [("A", "192.0.2.10")],
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
        "rsa._domainkey.sender.test": [("TXT", public_key_record(keys["rsa"]))],
        "ed._domainkey.sender.test": [("TXT", public_key_record(keys["ed"]))],
        "bank.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "_dmarc.bank.test": [("TXT", "v=DMARC1; p=reject")],
        "other.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    }
    with DNSServer(zone) as srv:
        yield srv


Stack = tuple[MxguardProcess, PostfixInstance]


@pytest.fixture
def stack(tmp_path: Path, dns: DNSServer, sink: Sink,
          keys: dict[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey],
          postfix_factory: Callable[..., PostfixInstance]) -> Iterator[Stack]:
    paths = {}
    for name, key in keys.items():
        path = tmp_path / f"sender.test.{name}.key"
        path.write_bytes(_pem(key))
        os.chmod(path, 0o600)
        paths[name] = path
    mx = MxguardProcess(tmp_path, (
        f'[dns]\nnameservers = ["{dns.address}"]\n'
        "[helo]\nexempt_networks = []\n"
        '[greylist]\nmode = "off"\n'
        f'[dkim]\ninternal_hosts = ["127.0.0.1/32"]\nkeys = ["sender.test:rsa:{paths["rsa"]}", '
        f'"sender.test:ed:{paths["ed"]}"]\n'))
    mx.config.write_text(mx.config.read_text().replace(
        "[milter]\n", f'[milter]\nauthserv_id = "{AUTHSERV}"\n'))
    mx.start()
    pf = postfix_factory({**policy_wiring(mx.port), **milter_wiring(mx.milter_port),
                          "message_size_limit": str(BIG + 4 * 1024 * 1024)})
    yield mx, pf
    assert mx.stop() == 0


BIG = 11 * 1024 * 1024  # over [milter] max_scan_size (10 MiB), under max_message_size


def message(sender: str, *, extra: str = "", body: str = "Hello there.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.test\r\nSubject: test\r\n"
            f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <x1@sender.test>\r\n"
            f"{extra}\r\n{body}").encode()


def signed(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, selector: str,
           raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = [tuple(line.split(b":", 1)) for line in head.split(b"\r\n")]
    (value,) = sign(headers, body, [SigningKey("sender.test", selector, key)])  # type: ignore[arg-type]
    return b"DKIM-Signature: " + value.encode() + b"\r\n" + raw


def deliver(pf: PostfixInstance, data: bytes, *, sender: str = "alice@sender.test",
            source: str = OUTSIDE) -> tuple[str, bool]:
    t = send(pf.smtp_port, helo="mail.sender.test", mail_from=sender,
             rcpts=["bob@example.test"], data=data, source_ip=source)
    return str(t.end_of_data or t.rcpts[0]), t.accepted


def test_outgoing_mail_gets_exactly_one_signature_per_key(stack: Stack, sink: Sink) -> None:
    _mx, pf = stack
    reply, ok = deliver(pf, message("alice@sender.test"), source="127.0.0.1")
    assert ok, reply
    (msg,) = sink.wait_for(1)
    sigs = msg.headers("DKIM-Signature")
    assert len(sigs) == 2  # dual signing: rsa-sha256 and ed25519-sha256, once each
    assert {"a=rsa-sha256" in s.replace(" ", "") for s in sigs} == {True, False}
    assert all("d=sender.test" in s for s in sigs)
    assert msg.header("Authentication-Results") is None  # outgoing: not verified


def test_incoming_signed_mail_passes_spf_dkim_dmarc(stack: Stack, sink: Sink,
                                                    keys: dict[str, object]) -> None:
    _mx, pf = stack
    reply, ok = deliver(pf, signed(keys["rsa"], "rsa", message("alice@sender.test")))  # type: ignore[arg-type]
    assert ok, reply
    (msg,) = sink.wait_for(1)
    results = msg.headers("Authentication-Results")
    assert len(results) == 1
    ar = " ".join(results[0].split())
    assert ar.startswith(AUTHSERV + ";")
    for part in ("spf=pass", "dkim=pass", "header.d=sender.test", "dmarc=pass"):
        assert part in ar, ar
    assert len(msg.headers("DKIM-Signature")) == 1  # incoming mail is not signed again


def test_tampered_body_is_dkim_fail(stack: Stack, sink: Sink, keys: dict[str, object]) -> None:
    _mx, pf = stack
    raw = signed(keys["ed"], "ed", message("alice@sender.test"))  # type: ignore[arg-type]
    reply, ok = deliver(pf, raw.replace(b"Hello there.", b"Hello THERE."))
    assert ok, reply  # SPF still passes and aligns: DMARC passes, the mail is delivered
    (msg,) = sink.wait_for(1)
    ar = " ".join(msg.header("Authentication-Results").split())
    assert "dkim=fail" in ar and "dmarc=pass" in ar, ar


def test_forged_mail_from_a_p_reject_domain_is_rejected(stack: Stack, sink: Sink) -> None:
    _mx, pf = stack
    reply, ok = deliver(pf, message("ceo@bank.test"), sender="x@other.test")
    assert not ok
    assert reply.startswith("550 5.7.1"), reply
    assert "bank.test" in reply
    sink.wait_quiet(1.0)
    assert sink.messages == []
    # control: the same envelope with an aligned From is delivered
    reply, ok = deliver(pf, message("x@other.test"), sender="x@other.test")
    assert ok, reply


def test_forged_authentication_results_are_removed(stack: Stack, sink: Sink) -> None:
    _mx, pf = stack
    forged = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test\r\n"
              "Authentication-Results: elsewhere.example; spf=pass\r\n")
    reply, ok = deliver(pf, message("alice@sender.test", extra=forged))
    assert ok, reply
    (msg,) = sink.wait_for(1)
    results = [" ".join(v.split()) for v in msg.headers("Authentication-Results")]
    ours = [r for r in results if r.startswith(AUTHSERV)]
    assert len(ours) == 1 and "header.d=bank.test" not in ours[0]
    assert any(r.startswith("elsewhere.example") for r in results)  # control: kept


GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def test_gtube_is_rejected_at_the_default_thresholds(stack: Stack, sink: Sink) -> None:
    _mx, pf = stack
    reply, ok = deliver(pf, message("alice@sender.test", body=GTUBE + "\r\n"))
    assert not ok
    assert reply.startswith("550 5.7.1"), reply
    sink.wait_quiet(1.0)
    assert sink.messages == []


def test_spam_is_tagged_when_reject_is_off(tmp_path: Path, dns: DNSServer, sink: Sink,
                                           postfix_factory: Callable[..., PostfixInstance]
                                           ) -> None:
    mx = MxguardProcess(tmp_path, (f'[dns]\nnameservers = ["{dns.address}"]\n'
                                   '[greylist]\nmode = "off"\n[dkim]\ninternal_hosts = []\n'
                                   "[actions]\nreject = 0\nrewrite_subject = 5\n"))
    mx.start()
    try:
        milter = f"inet:127.0.0.1:{mx.milter_port}"
        pf = postfix_factory({"smtpd_milters": milter, "milter_default_action": "tempfail"})
        reply, ok = deliver(pf, message("alice@sender.test", body=GTUBE + "\r\n"))
        assert ok, reply
        reply, ok = deliver(pf, message("alice@sender.test"))  # control: a clean message
        assert ok, reply
        got = sink.wait_for(2)
        # Postfix may deliver the two in either order: tell them apart by the body
        (spam,) = [m for m in got if GTUBE.encode() in m.data]
        (ham,) = [m for m in got if GTUBE.encode() not in m.data]
        assert spam.header("X-Spam-Flag") == "YES"
        status = " ".join(spam.header("X-Spam-Status").split())
        assert status.startswith("Yes, score=") and "required=5.0" in status
        assert "tests=" in status and "GTUBE" in status
        assert spam.header("X-Spam-Level").startswith("*****")
        assert spam.header("Subject").startswith("***SPAM***")
        assert ham.header("X-Spam-Flag") is None
        assert " ".join(ham.header("X-Spam-Status").split()).startswith("No, score=")
        assert ham.header("Subject") == "test"
    finally:
        assert mx.stop() == 0


SPAMMY = ("Cheap pills online pharmacy discount viagra cialis casino jackpot winner "
          "claim your prize now limited offer click here unsubscribe\r\n") * 5
HAMMY = ("Hi Bob, the meeting notes from Tuesday are attached; the release branch "
         "builds again and the test suite passes. See you at standup tomorrow.\r\n") * 5


def test_bayes_learned_with_the_cli_scores_mail_through_postfix(
        tmp_path: Path, dns: DNSServer, sink: Sink,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    from click.testing import CliRunner

    from mxguard.cli.learn import learn

    mx = MxguardProcess(tmp_path, (f'[dns]\nnameservers = ["{dns.address}"]\n'
                                   '[greylist]\nmode = "off"\n[dkim]\ninternal_hosts = []\n'
                                   "[bayes]\nmin_spam = 1\nmin_ham = 1\nautolearn = false\n"))
    for kind, text in (("spam", SPAMMY), ("ham", HAMMY)):
        for i in range(3):
            f = tmp_path / f"{kind}{i}.eml"
            f.write_bytes(message(f"x{i}@{kind}.example",
                                  extra=f"Message-ID: <{kind}{i}@learn.test>\r\n", body=text))
        out = CliRunner().invoke(learn, [f"--{kind}", "--no-progress", "-c", str(mx.config),
                                         *[str(p) for p in tmp_path.glob(f"{kind}*.eml")]])
        assert out.exit_code == 0, out.output
    mx.start()
    try:
        pf = postfix_factory({"smtpd_milters": f"inet:127.0.0.1:{mx.milter_port}"})
        assert deliver(pf, message("alice@sender.test", body=SPAMMY))[1]
        assert deliver(pf, message("alice@sender.test", body=HAMMY))[1]  # control
        got = sink.wait_for(2)  # in either order: tell them apart by the body
        (spam,) = [m for m in got if SPAMMY.encode()[:40] in m.data]
        (ham,) = [m for m in got if SPAMMY.encode()[:40] not in m.data]
        spam_status = " ".join(spam.header("X-Spam-Status").split())
        ham_status = " ".join(ham.header("X-Spam-Status").split())
        assert "BAYES_99" in spam_status or "BAYES_999" in spam_status, spam_status
        assert spam.header("X-Spam-Flag") == "YES"
        assert "BAYES_00" in ham_status and ham_status.startswith("No,"), ham_status
    finally:
        assert mx.stop() == 0


def test_report_safe_wraps_spam_and_attaches_the_original_unchanged(
        tmp_path: Path, dns: DNSServer, sink: Sink,
        postfix_factory: Callable[..., PostfixInstance]) -> None:
    mx = MxguardProcess(tmp_path, (f'[dns]\nnameservers = ["{dns.address}"]\n'
                                   '[greylist]\nmode = "off"\n[dkim]\ninternal_hosts = []\n'
                                   "[actions]\nreject = 0\n[content]\nreport_safe = true\n"))
    mx.start()
    try:
        pf = postfix_factory({"smtpd_milters": f"inet:127.0.0.1:{mx.milter_port}",
                              "milter_default_action": "tempfail"})
        spam_raw = message("alice@sender.test", body=f"Buy now.\r\n{GTUBE}\r\nBye.\r\n",
                           extra="Content-Type: text/plain; charset=us-ascii\r\n"
                                 "Content-Transfer-Encoding: 7bit\r\n")
        ham_raw = message("alice@sender.test")  # control: a clean message
        reply, ok = deliver(pf, spam_raw)
        assert ok, reply
        reply, ok = deliver(pf, ham_raw)
        assert ok, reply
        got = sink.wait_for(2)
        # Postfix may deliver the two in either order: tell them apart by the body
        (spam,) = [m for m in got if GTUBE.encode() in m.data]
        (ham,) = [m for m in got if GTUBE.encode() not in m.data]
        assert spam.header("X-Spam-Flag") == "YES"
        assert spam.header("Content-Transfer-Encoding") is None
        assert (spam.header("MIME-Version") or "").strip() == "1.0"
        outer = spam.message
        assert outer.get_content_type() == "multipart/mixed"
        boundary = outer.get_boundary()
        assert boundary and spam.header("Subject") == "test"  # other headers kept
        report, attached = outer.get_payload()  # type: ignore[misc]
        assert report.get_content_type() == "text/plain"
        text = " ".join(str(report.get_payload()).split())
        assert "spam" in text and "GTUBE" in text and "5.0" in text
        assert attached.get_content_type() == "message/rfc822"
        # the attached message is the original, headers and body, byte for byte
        parts = spam.body.split(b"\r\n--" + boundary.encode())
        assert len(parts) == 4 and parts[3] == b"--\r\n"
        assert parts[2].split(b"\r\n\r\n", 1)[1] == spam_raw
        # the clean message is delivered as it was: no wrapping
        assert ham.header("Content-Type") is None and ham.header("MIME-Version") is None
        assert ham.body == ham_raw.partition(b"\r\n\r\n")[2]
        assert " ".join(ham.header("X-Spam-Status").split()).startswith("No, score=")
    finally:
        assert mx.stop() == 0


def big_body(size: int) -> str:
    line = "a line of a big message, long enough to be ordinary text %07d\r\n"
    return "".join(line % i for i in range(size // len(line % 0) + 1))


def dkimpy_verifies(data: bytes, keys: dict[str, object]) -> list[bool]:
    """Every DKIM-Signature of ``data`` checked by dkimpy against our keys' records."""
    import dkim

    records = {f"{name}._domainkey.sender.test.".encode(): public_key_record(key).encode()
               for name, key in keys.items()}  # type: ignore[arg-type]
    count = data.split(b"\r\n\r\n", 1)[0].lower().count(b"\ndkim-signature:") + (
        data.lower().startswith(b"dkim-signature:"))
    d = dkim.DKIM(data)
    return [d.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name))
            for i in range(count)]


@pytest.mark.parametrize("size", [BIG, 0])  # control: a small message
def test_incoming_big_signed_mail_verifies_over_the_whole_body(stack: Stack, sink: Sink,
                                                               keys: dict[str, object],
                                                               size: int) -> None:
    mx, pf = stack
    raw = signed(keys["rsa"], "rsa",  # type: ignore[arg-type]
                 message("alice@sender.test", body=big_body(size) if size else "Hi.\r\n"))
    # envelope from other.test: SPF passes unaligned, so DMARC (p=reject) rests on DKIM
    reply, ok = deliver(pf, raw, sender="x@other.test")
    assert ok, reply
    (msg,) = sink.wait_for(1, timeout=60)
    ar = " ".join(msg.header("Authentication-Results").split())
    assert "dkim=pass" in ar and "dmarc=pass" in ar, ar
    assert len(msg.data) > size
    partial = mx.log_text().count("content: partial scan")
    assert partial == (1 if size else 0)  # content scoring only is partial, logged once


@pytest.mark.parametrize("size", [BIG, 0])  # control: a small message
def test_our_signature_of_big_outgoing_mail_verifies_with_dkimpy(stack: Stack, sink: Sink,
                                                                 keys: dict[str, object],
                                                                 size: int) -> None:
    _mx, pf = stack
    raw = message("alice@sender.test", body=big_body(size) if size else "Hi.\r\n")
    reply, ok = deliver(pf, raw, source="127.0.0.1")
    assert ok, reply
    (msg,) = sink.wait_for(1, timeout=60)
    assert dkimpy_verifies(msg.data, keys) == [True, True]  # rsa and ed25519


@pytest.mark.parametrize(("lines", "refused"), [(5000, True), (150, False)])  # control
def test_a_header_of_thousands_of_empty_lines_is_refused(stack: Stack, sink: Sink,
                                                         lines: int, refused: bool) -> None:
    mx, pf = stack
    raw = message("alice@sender.test", extra="X:\r\n" * lines)
    reply, ok = deliver(pf, raw)
    assert ok is not refused, reply
    if refused:
        assert reply.startswith("552 5.3.4"), reply
        mx.wait_log("milter.max_headers")
        sink.wait_quiet(1.0)
        assert sink.messages == []
    else:
        assert len(sink.wait_for(1)) == 1
    reply, ok = deliver(pf, message("alice@sender.test"))  # the door keeps serving
    assert ok, reply
