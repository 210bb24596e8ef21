"""The SPF engine on bad input: every case gives a result, never an exception.

Garbage and huge records (TXT over 512 bytes: the UDP answer is truncated and
only a TCP retry can pass), include/redirect loops and chains, CNAME loops,
8-bit bytes in records and senders, IDN sender domains, malformed sender
attributes, and DNS that is down. Each case asserts the RFC 7208 result and a
bounded evaluation time; each group has a control case that passes.

Real DNS: a loopback authoritative server (mxguard.testing.dns).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mxguard.auth import spf
from mxguard.auth.spf import check_helo, check_host, check_mailfrom
from mxguard.checks import spf as spf_check
from mxguard.config import Config, DnsConfig, SpfConfig
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Transaction
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone
from mxguard.testing.ports import free_port

IP = "192.0.2.10"
PASS_RECORD = f"v=spf1 ip4:{IP} -all"
LIMIT = 3.0  # seconds: the overall SPF time limit given to every evaluation here


def _huge(terms_until: int, tail: str) -> list[bytes]:
    """Exactly 10 TXT strings of 255 bytes (2,550 bytes: UDP answers truncate)."""
    body = "v=spf1"
    i = 0
    while len(body) < terms_until:
        body += f" ip4:10.{i // 250 % 250}.{i % 250}.1"
        i += 1
    text = (body + " " + tail).ljust(2550)  # trailing spaces are empty terms
    raw = text.encode()
    assert len(raw) == 2550
    return [raw[i:i + 255] for i in range(0, 2550, 255)]


def _chain(prefix: str, redirects: int) -> Zone:
    """prefix0 -> prefix1 -> ... -> prefixN (N = ``redirects``), which passes IP."""
    zone: Zone = {f"{prefix}{i}.test": [("TXT", f"v=spf1 redirect={prefix}{i + 1}.test")]
                  for i in range(redirects)}
    zone[f"{prefix}{redirects}.test"] = [("TXT", PASS_RECORD)]
    return zone


GARBAGE: list[tuple[str, Any, str]] = [
    # (name, TXT value, expected result)
    ("g-words", "v=spf1 this is garbage", "permerror"),
    ("g-tail", f"{PASS_RECORD} garbage!", "permerror"),  # parsed whole: matches nothing
    ("g-badip", "v=spf1 ip4:999.1.1.1 -all", "permerror"),
    ("g-cidr", "v=spf1 ip4:192.0.2.0/33 -all", "permerror"),
    ("g-cidr-huge", "v=spf1 a/" + "9" * 5000 + " -all", "permerror"),  # was a ValueError
    ("g-cidr6-huge", "v=spf1 a//" + "1" * 5000 + " -all", "permerror"),
    ("g-macro", "v=spf1 a:%{z}.test -all", "permerror"),
    ("g-macro-open", "v=spf1 exists:%{d", "permerror"),
    ("g-macro-digits", "v=spf1 exists:%{d" + "1" * 5000 + "}.nx.test -all", "fail"),
    ("g-qualifier", "v=spf1 ~", "permerror"),
    ("g-redirect-empty", "v=spf1 redirect=", "permerror"),
    ("g-unknown-mech", "v=spf1 spf2:foo.test -all", "permerror"),
    ("g-nul", "v=spf1 a:foo\x00.test -all", "permerror"),
    ("g-not-spf-nul", "\x00v=spf1 +all", "none"),
    ("g-not-spf-tab", "v=spf1\t+all", "none"),
    ("g-not-spf-10", "v=spf10 +all", "none"),
    ("g-empty", "", "none"),
    ("g-only-version", "v=spf1", "neutral"),
    ("g-double-all", "v=spf1 -all -all", "fail"),
    ("g-control", PASS_RECORD, "pass"),  # control
]


def _zone() -> Zone:
    zone: Zone = {
        "ok.test": [("TXT", PASS_RECORD), ("A", IP)],
        # huge records: > 512 bytes, only TCP carries them
        "huge.test": [("TXT", _huge(2400, f"ip4:{IP} -all"))],
        "hugebad.test": [("TXT", _huge(2400, f"ip4:{IP} -all !bad!"))],
        "hugeother.test": [("TXT", "x" * 400 + f" filler {i}") for i in range(6)]
                          + [("TXT", PASS_RECORD)],
        "two.test": [("TXT", "v=spf1 +all"), ("TXT", "v=spf1 -all")],
        # include / redirect loops
        "self.test": [("TXT", "v=spf1 include:self.test -all")],
        "mutual-a.test": [("TXT", "v=spf1 include:mutual-b.test -all")],
        "mutual-b.test": [("TXT", "v=spf1 include:mutual-a.test -all")],
        "inc.test": [("TXT", "v=spf1 include:ok.test -all")],
        "rself.test": [("TXT", "v=spf1 redirect=rself.test")],
        "rloop-a.test": [("TXT", "v=spf1 redirect=rloop-b.test")],
        "rloop-b.test": [("TXT", "v=spf1 redirect=rloop-a.test")],
        "rnx.test": [("TXT", "v=spf1 redirect=nothing-here.test")],
        # CNAME loops (the test server chases at most 8 CNAMEs per answer)
        "cloop1.test": [("CNAME", "cloop2.test")],
        "cloop2.test": [("CNAME", "cloop1.test")],
        "cself.test": [("CNAME", "cself.test")],
        "cinc.test": [("TXT", "v=spf1 include:cloop1.test -all")],
        "ca.test": [("TXT", f"v=spf1 a:cself.test ip4:{IP} -all")],
        "cmx.test": [("TXT", "v=spf1 mx -all"), ("MX", (10, "cloop1.test"))],
        "chain1.test": [("CNAME", "chain2.test")],  # control: a finite chain
        "chain2.test": [("CNAME", "ok.test")],
        "cinc-ok.test": [("TXT", "v=spf1 include:chain1.test -all")],
        # 8-bit bytes
        "bin.test": [("TXT", [b"v=spf1 ip4:192.0.2.10 \xe9 -all"])],
        "bin-tail.test": [("TXT", [b"v=spf1 ip4:192.0.2.10 -all \xff\xfe"])],
        "utf8.test": [("TXT", "v=spf1 include:bücher.example -all")],
        "alabel.test": [("TXT", "v=spf1 include:xn--bcher-kva.example -all")],
        "bin-other.test": [("TXT", [b"\xff\xfe site-verification=\x00\x01"]),
                           ("TXT", PASS_RECORD)],
        "binexp.test": [("TXT", "v=spf1 -all exp=why.binexp.test")],
        "why.binexp.test": [("TXT", [b"not \xff allowed %{i}"])],
        "lmacro.test": [("TXT", "v=spf1 exists:%{l}.yes.test -all")],
        "*.yes.test": [("A", "127.0.0.2")],
        # IDN: the A-label of bücher.example
        "xn--bcher-kva.example": [("TXT", PASS_RECORD), ("A", IP)],
        # DNS failures
        "servfail.test": [("SERVFAIL", None)],
        "silent.test": [("TIMEOUT", None)],
    }
    for name, value, _ in GARBAGE:
        zone[f"{name}.test"] = [("TXT", value)]  # split into 255-byte strings
    zone.update(_chain("ten", 10))
    zone.update(_chain("eleven", 11))
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(_zone()) as srv:
        yield srv


def resolver(address: str, timeout: float = 1.0) -> Resolver:
    return Resolver(DnsConfig(nameservers=[address], timeout=timeout))


async def mailfrom(dns: DNSServer, sender: str, *, ip: str = IP,
                   helo: str = "helo.test") -> spf.SpfResult:
    """check_mailfrom with a fresh resolver; must return within LIMIT (+ slack)."""
    t0 = time.monotonic()
    res = await check_mailfrom(resolver(dns.address), ip, sender, helo, timeout=LIMIT)
    assert time.monotonic() - t0 < LIMIT + 1.0
    assert res.result in spf.RESULTS
    header = spf.received_spf(res, "mx.receiver.test")
    assert header.isascii() and header.isprintable()  # never CR/LF or 8-bit in a header
    return res


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize(("name", "expected"), [(n, r) for n, _, r in GARBAGE],
                         ids=[n for n, _, _ in GARBAGE])
async def test_garbage_records(dns: DNSServer, name: str, expected: str) -> None:
    res = await mailfrom(dns, f"user@{name}.test")
    assert res.result == expected, (res.problem, res.trace)


async def test_two_spf_records_are_a_permerror(dns: DNSServer) -> None:
    res = await mailfrom(dns, "user@two.test")
    assert res.result == "permerror" and "2 SPF records" in res.problem
    assert (await mailfrom(dns, "user@ok.test")).result == "pass"  # control


# ------------------------------------------------------------------ huge records


async def test_huge_record_comes_over_tcp(dns: DNSServer) -> None:
    # 2,550 bytes in 10 strings: the UDP answer is truncated (TC), only the
    # TCP retry carries the record; without it the domain would have none.
    res = await mailfrom(dns, "user@huge.test")
    assert res.result == "pass" and res.mechanism == f"ip4:{IP}", (res.problem, res.trace)
    res = await mailfrom(dns, "user@huge.test", ip="192.0.2.99")  # control: not listed
    assert res.result == "fail" and res.mechanism == "-all"


async def test_huge_record_with_an_error_is_a_permerror(dns: DNSServer) -> None:
    res = await mailfrom(dns, "user@hugebad.test")
    assert res.result == "permerror" and "!bad!" in res.problem


async def test_huge_answer_of_other_txt_records(dns: DNSServer) -> None:
    res = await mailfrom(dns, "user@hugeother.test")
    assert res.result == "pass", (res.problem, res.trace)


# ------------------------------------------------------------------ loops, chains


@pytest.mark.parametrize(("domain", "expected", "problem"), [
    ("self.test", "permerror", "more than 10 DNS-querying terms"),
    ("mutual-a.test", "permerror", "more than 10 DNS-querying terms"),
    ("rself.test", "permerror", "more than 10 DNS-querying terms"),
    ("rloop-a.test", "permerror", "more than 10 DNS-querying terms"),
    ("rnx.test", "permerror", "no SPF record there"),
    ("eleven0.test", "permerror", "more than 10 DNS-querying terms"),  # 11 redirects
    ("ten0.test", "pass", ""),  # control: 10 redirects are within the limit
    ("inc.test", "pass", ""),  # control: a plain include
])
async def test_include_and_redirect_loops(dns: DNSServer, domain: str, expected: str,
                                          problem: str) -> None:
    res = await mailfrom(dns, f"user@{domain}")
    assert res.result == expected, (res.problem, res.trace)
    assert problem in res.problem
    assert len(res.trace) <= 25  # the loop was cut, not run until the time limit


@pytest.mark.parametrize(("sender", "expected"), [
    # Recursive resolvers answer SERVFAIL for a CNAME loop; dnspython reports
    # "CNAME chain too long": a DNS error, so temperror (RFC 7208 §4.4, §5).
    ("user@cloop1.test", "temperror"),
    ("user@cself.test", "temperror"),
    ("user@cinc.test", "temperror"),  # include: target loops
    ("user@ca.test", "temperror"),  # a: target loops
    ("user@cmx.test", "temperror"),  # the MX host loops
    ("user@chain1.test", "pass"),  # control: a finite CNAME chain to ok.test
    ("user@cinc-ok.test", "pass"),  # control: include through a finite chain
])
async def test_cname_loops(dns: DNSServer, sender: str, expected: str) -> None:
    res = await mailfrom(dns, sender)
    assert res.result == expected, (res.problem, res.trace)
    if expected == "temperror":
        assert "cloop" in res.problem or "cself" in res.problem


# ------------------------------------------------------------------ 8-bit bytes


@pytest.mark.parametrize(("domain", "expected"), [
    ("bin.test", "permerror"),  # a Latin-1 byte between terms
    ("bin-tail.test", "permerror"),  # invalid UTF-8 at the end
    ("utf8.test", "permerror"),  # a U-label in a record is not allowed (§4.6.1)
    ("alabel.test", "pass"),  # control: the A-label of the same name
    ("bin-other.test", "pass"),  # binary in a TXT record that is not SPF: ignored
])
async def test_8bit_bytes_in_records(dns: DNSServer, domain: str, expected: str) -> None:
    res = await mailfrom(dns, f"user@{domain}")
    assert res.result == expected, (res.problem, res.trace)
    if expected == "permerror":
        assert "non-ASCII" in res.problem


async def test_8bit_explanation_is_ignored(dns: DNSServer) -> None:
    res = await mailfrom(dns, "user@binexp.test")
    assert res.result == "fail" and not res.explanation_from_domain
    assert res.explanation.startswith(f"{IP} is not allowed to send mail for binexp.test")


@pytest.mark.parametrize(("sender", "expected"), [
    ("us\udce9r@lmacro.test", "fail"),  # undecodable byte from the policy door
    ("üser@lmacro.test", "fail"),  # UTF-8 local part: %{l} is no DNS name
    ("u\x00ser@lmacro.test", "pass"),  # a DNS label may hold any octet, even NUL
    ("us\udce9r@ok.test", "pass"),  # the local part does not matter without macros
    ("üser@ok.test", "pass"),
    ("user@lmacro.test", "pass"),  # control: exists:user.yes.test
])
async def test_8bit_bytes_in_the_sender(dns: DNSServer, sender: str, expected: str) -> None:
    res = await mailfrom(dns, sender)
    assert res.result == expected, (res.problem, res.trace)


# ------------------------------------------------------------------ IDN


@pytest.mark.parametrize(("sender", "expected", "domain"), [
    ("user@bücher.example", "pass", "xn--bcher-kva.example"),  # IDNA to the A-label
    ("user@BÜCHER.EXAMPLE", "pass", "xn--bcher-kva.example"),
    ("user@bücher.example.", "pass", "xn--bcher-kva.example"),
    ("user@xn--bcher-kva.example", "pass", "xn--bcher-kva.example"),  # control
    ("user@☃.example", "none", "xn--n3h.example"),  # valid IDN, no record
    ("user@" + "ü" * 60 + ".example", "none", ""),  # A-label over 63 characters
    ("user@\udcfc\udcfc.example", "none", ""),  # 8-bit bytes, not UTF-8
    ("user@\ud800.example", "none", ""),  # a lone surrogate
    ("user@bü..example", "none", ""),  # empty label
])
async def test_idn_sender_domains(dns: DNSServer, sender: str, expected: str,
                                  domain: str) -> None:
    res = await mailfrom(dns, sender)
    assert res.result == expected, (res.problem, res.trace)
    if domain:
        assert res.domain.lower() == domain
        assert res.sender.lower() == "user@" + domain  # the A-label goes into Received-SPF
    else:
        assert "is not a valid domain name" in res.problem


async def test_idn_helo(dns: DNSServer) -> None:
    res = await check_helo(resolver(dns.address), IP, "bücher.example", timeout=LIMIT)
    assert (res.result, res.domain) == ("pass", "xn--bcher-kva.example")
    res = await check_helo(resolver(dns.address), IP, "b\udcfccher.example", timeout=LIMIT)
    assert res.result == "none"


# ------------------------------------------------------------------ sender attributes


@pytest.mark.parametrize(("sender", "helo", "expected"), [
    ("no-at-sign", "helo.test", "none"),  # a single-label "domain"
    ("@ok.test", "helo.test", "pass"),  # empty local part: postmaster (§4.3)
    ("<>", "helo.test", "none"),  # the brackets are not a null sender here
    ("<user@ok.test>", "helo.test", "none"),
    ("user@", "helo.test", "none"),
    ("user@ok.test.", "helo.test", "pass"),
    ("a@b@ok.test", "helo.test", "pass"),  # the domain is after the last @
    ("user@[192.0.2.10]", "helo.test", "none"),  # address literal
    ("user@192.0.2.10", "helo.test", "none"),
    ("x" * 10000 + "@ok.test", "helo.test", "pass"),
    ("x" * 10000 + "@lmacro.test", "helo.test", "fail"),  # %{l} truncated, no match
    ("user@" + "a" * 300 + ".test", "helo.test", "none"),  # over 253 characters
    ("user@" + "a" * 64 + ".test", "helo.test", "none"),  # a 64-character label
    ("user@ok.test\r\n", "helo.test", "none"),
    ("user@a\\999.test", "helo.test", "none"),  # was a temperror (resolver escape)
    ("user@a\\065.test", "helo.test", "none"),
    ("", "", "none"),  # null sender and no HELO
    ("", "[192.0.2.10]", "none"),
    ("", "ok.test", "pass"),  # control: null sender -> postmaster@HELO
    ("user@ok.test", "helo.test", "pass"),  # control
])
async def test_malformed_senders(dns: DNSServer, sender: str, helo: str,
                                 expected: str) -> None:
    res = await mailfrom(dns, sender, helo=helo)
    assert res.result == expected, (res.problem, res.trace)


@pytest.mark.parametrize(("ip", "expected"), [
    ("fe80::1%eth0", "fail"),  # a zone index: was an AddressValueError in %{i}
    ("::ffff:192.0.2.10", "pass"),
    (IP, "pass"),  # control
])
async def test_odd_client_addresses(dns: DNSServer, ip: str, expected: str) -> None:
    res = await check_host(resolver(dns.address), ip, "lmacro.test", "x@ok.test",
                           timeout=LIMIT)
    assert res.result in ("fail", "pass")
    res = await mailfrom(dns, "user@ok.test", ip=ip)
    assert res.result == expected, (res.problem, res.trace)


async def test_invalid_client_address_is_a_value_error(dns: DNSServer) -> None:
    # The documented contract: the caller validates the address (the policy
    # check never calls with one it could not parse).
    with pytest.raises(ValueError):
        await check_host(resolver(dns.address), "not-an-ip", "ok.test", "u@ok.test")


# ------------------------------------------------------------------ DNS down


async def test_dns_down_is_a_temperror_within_the_time_limit(dns: DNSServer) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    res = await check_mailfrom(resolver(closed, timeout=0.5), IP, "user@ok.test",
                               "helo.test", timeout=LIMIT)
    assert res.result == "temperror", res.problem
    assert time.monotonic() - t0 < LIMIT + 0.5
    # a resolver slower than the overall limit: the limit wins
    t0 = time.monotonic()
    res = await check_mailfrom(resolver(closed, timeout=5.0), IP, "user@ok.test",
                               "helo.test", timeout=0.3)
    assert res.result == "temperror" and "exceeded" in res.problem
    assert time.monotonic() - t0 < 1.5
    # control: the same question to a working server
    assert (await mailfrom(dns, "user@ok.test")).result == "pass"


@pytest.mark.parametrize("domain", ["servfail.test", "silent.test"])
async def test_failing_server_answers_are_temperrors(dns: DNSServer, domain: str) -> None:
    t0 = time.monotonic()
    res = await check_mailfrom(resolver(dns.address, timeout=0.3), IP, f"user@{domain}",
                               "helo.test", timeout=LIMIT)
    assert res.result == "temperror" and domain in res.problem
    assert time.monotonic() - t0 < LIMIT


# ------------------------------------------------------------------ the policy check


@pytest.mark.parametrize(("client", "helo", "sender", "spf_result"), [
    (IP, "\udcff\udcfe", "\ud800@\udcff", "none"),
    (IP, "helo\r\n.test", "us\r\ner@ok.test", "pass"),
    (IP, "a\\999.test", "", "none"),
    ("fe80::1%eth0", "helo.test", "user@ok.test", "fail"),
    (IP, "helo.test", "user@huge.test", "pass"),
    (IP, "helo.test", "user@ok.test", "pass"),  # control
])
async def test_policy_check_on_bad_input(dns: DNSServer, client: str, helo: str, sender: str,
                                         spf_result: str) -> None:
    cfg = Config(spf=SpfConfig(timeout=LIMIT), dns=DnsConfig(nameservers=[dns.address]))
    rt = Runtime(config=cfg, resolver=resolver(dns.address))
    tx = Transaction(client_address=client, helo=helo, sender=sender,
                     recipients=["rcpt@receiver.test"],
                     attrs={"server_name": "mx.receiver.test"})
    result = await spf_check.check(tx, rt)
    assert result is not None
    assert result.extra["spf"] == spf_result
    for header in result.headers:
        assert header.value.isascii() and header.value.isprintable()
    if result.decision is not None:
        assert result.decision.reply().isascii() and result.decision.reply().isprintable()
