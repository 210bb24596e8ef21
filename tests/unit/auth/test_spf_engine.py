"""The SPF engine (mxguard.auth.spf): macros, parsing, limits, identities.

Table-driven; every positive case has a control case that must not fire.
DNS cases go through the loopback DNS server and a fresh Resolver.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mxguard.auth import spf
from mxguard.auth.spf import PermError, check_helo, check_host, check_mailfrom
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone

# ------------------------------------------------------------------ macros

# RFC 7208 §7.4: sender strong-bad@email.example.com, IPv4 192.0.2.3,
# current domain email.example.com.
RFC_7_4 = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]


@pytest.mark.parametrize(("text", "expected"), RFC_7_4, ids=[t for t, _ in RFC_7_4])
def test_rfc7208_7_4_examples(text: str, expected: str) -> None:
    got = spf.expand_macros(text, "192.0.2.3", "strong-bad@email.example.com",
                            "email.example.com")
    assert got == expected


def test_rfc7208_7_4_ipv6_example() -> None:
    got = spf.expand_macros("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01",
                            "strong-bad@email.example.com", "email.example.com")
    assert got == ("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
                   ".ip6._spf.example.com")
    # control: the same macro for an IPv4 client gives in-addr
    assert spf.expand_macros("%{v}", "192.0.2.3", "a@b.example", "b.example") == "in-addr"


@pytest.mark.parametrize(("text", "explanation", "expected", "control"), [
    # upper-case letters are URL-escaped; the lower-case control is not
    ("%{L}", False, "~jack%26jill%3Dup-a_b3.c", "%{l}"),
    # escapes: %% %_ %-
    ("a%%b%_c%-d", False, "a%b c%20d", "abcd"),
    # c, r, t only in explanations
    ("%{c} %{r} %{t}", True, "192.0.2.3 mx.receiver.example 1700000000", "%{i}"),
    # several delimiters, reversal, right-hand parts
    ("%{l2r+-}", False, "bar.foo", "%{l}"),
])
def test_macro_features(text: str, explanation: bool, expected: str, control: str) -> None:
    kw = {"explanation": explanation, "receiver": "mx.receiver.example", "now": 1700000000.0}
    sender = "~jack&jill=up-a_b3.c@example.com" if "L" in text else "foo-bar+zip@example.com"
    got = spf.expand_macros(text, "192.0.2.3", sender, "example.com", **kw)  # type: ignore[arg-type]
    assert got == expected
    assert spf.expand_macros(control, "192.0.2.3", sender, "example.com", **kw) != expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("bad", "good"), [
    ("%{c}", "%{d}"),  # c only in exp
    ("%{r}.example.com", "%{d}.example.com"),  # r only in exp
    ("%{t}", "%{h}"),  # t only in exp
    ("%{a}", "%{i}"),  # no such letter
    ("%(ir)", "%{ir}"),
    ("foo%.bar", "foo%%.bar"),
    ("%{d0}", "%{d1}"),  # zero parts
    ("%{d", "%{d}"),  # unterminated
    ("a b", "a_b"),  # space only in explanations
    ("tr\x00il", "trail"),
])
def test_macro_syntax_errors(bad: str, good: str) -> None:
    with pytest.raises(PermError):
        spf.parse_macro_string(bad)
    assert spf.parse_macro_string(good)


def test_exp_letters_and_spaces_allowed_in_explanation() -> None:
    assert spf.parse_macro_string("From %{c} at %{t} via %{r}", explanation=True)
    with pytest.raises(PermError):  # control: still no unknown letters
        spf.parse_macro_string("The %{x}-files", explanation=True)


def test_long_expansion_is_truncated_from_the_left() -> None:
    name = ".".join([f"label{i:02d}" for i in range(40)]) + ".example.com."
    cut = spf.truncate_domain(name)
    assert len(cut) <= 253 and cut.endswith(".example.com") and not cut.endswith(".")
    assert name[:-1].endswith(cut) and cut.split(".")[0].startswith("label")
    assert spf.truncate_domain("short.example.com.") == "short.example.com"  # control


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(("bad", "good"), [
    ("a:museum", "a:museum.example"),  # a top label alone
    ("a:abc.123", "a:abc.x123"),  # numeric top label
    ("a:example.-com", "a:example.xn--zckzah"),  # top label may not start with '-'
    ("a:example.com:8080", "a:foo:bar/baz.example.com"),  # ':' allowed, not in top label
    ("a/33", "a/32"),
    ("a//129", "a//128"),
    ("a/24/64", "a/24//64"),
    ("ip4:1.2.3.4/032", "ip4:1.2.3.4/32"),
    ("ip4:1.2.3", "ip4:1.2.3.0/24"),
    ("ip4:1.2.3.4//32", "ip4:1.2.3.4"),
    ("ip6::CAFE::BABE", "ip6:CAFE::BABE"),
    ("ip6:::1/129", "ip6:::1/128"),
    ("ptr/0", "ptr"),
    ("ptr:", "ptr:example.com"),
    ("include", "include:example.com"),
    ("exists:example.com/24", "exists:example.com"),
    ("-all.", "-all"),
    ("redirect:example.com", "redirect=example.com"),
    ("exp=", "exp=explain.example.com"),
    ("1up=foo", "up1=foo"),
    ("foo=%abc", "foo=%{d}"),
    ("exp=a.example exp=b.example", "exp=a.example"),
    ("redirect=a.example redirect=a.example", "redirect=a.example"),
])
def test_record_syntax(bad: str, good: str) -> None:
    with pytest.raises(PermError):
        spf.parse_record("v=spf1 " + bad)
    assert spf.parse_record("v=spf1 " + good) is not None


def test_record_is_parsed_whole() -> None:
    rec = spf.parse_record("v=spf1  ip4:192.0.2.1   mx:%{d}  -all moo.cow-far_out=x ")
    assert [m.kind for m in rec.mechanisms] == ["ip4", "mx", "all"]
    assert rec.mechanisms[2].result == "fail"
    with pytest.raises(PermError):  # control: one bad term anywhere -> permerror
        spf.parse_record("v=spf1 ip4:192.0.2.1 -all moo")


@pytest.mark.parametrize(("text", "is_spf"), [
    ("v=spf1", True), ("V=SpF1 -all", True), ("v=spf1 ", True),
    ("v=spf10", False), ("v=spf1mx", False), ("spf1 -all", False), ("v=spf2.0/pra", False),
])
def test_record_selection(text: str, is_spf: bool) -> None:
    assert spf.is_spf_record(text) is is_spf


@pytest.mark.parametrize(("addr", "version"), [
    ("::ffff:192.0.2.1", 4), ("::FFFF:1.2.3.4", 4),
    ("2001:db8::1", 6), ("::1.2.3.4", 6),  # controls: not IPv4-mapped
    ("192.0.2.1", 4),
])
def test_ipv4_mapped_addresses_are_ipv4(addr: str, version: int) -> None:
    assert spf.client_ip(addr).version == version


@pytest.mark.parametrize(("domain", "ok"), [
    ("example.com", True), ("example.com.", True), ("a" * 63 + ".example", True),
    ("a" * 64 + ".example", False), ("a..example", False), ("localhost", False),
    ("[192.0.2.1]", False), ("", False), ("bücher.example", True),
])
def test_identity_domain(domain: str, ok: bool) -> None:
    assert (spf.identity_domain(domain) is not None) is ok


# ------------------------------------------------------------------ DNS evaluation

IP = "192.0.2.10"


def _zone() -> Zone:
    zone: Zone = {
        "ok.test": [("A", IP)],
        "v4.example": [("TXT", "v=spf1 ip4:192.0.2.10 -all")],
        "v6.example": [("TXT", "v=spf1 ip6:::ffff:192.0.2.10 ip6:2001:db8::10 -all")],
        "spf-rr-only.example": [("SPF", "v=spf1 +all")],
        "slow.example": [("TXT", "v=spf1 exists:slow.test -all")],
        "slow.test": [("TIMEOUT", None)],
        "helo.example": [("TXT", "v=spf1 a -all"), ("A", IP)],
        "exp.example": [("TXT", "v=spf1 -all exp=why.exp.example")],
        "why.exp.example": [("TXT", "%{c} may not send for %{o} (at %{r})")],
        "void2.example": [("TXT", "v=spf1 a:nx1.test a:nx2.test -all")],
        "void3.example": [("TXT", "v=spf1 a:nx1.test a:nx2.test a:nx3.test -all")],
        "mx10.example": [("TXT", "v=spf1 mx -all")],
        "mx11.example": [("TXT", "v=spf1 mx -all")],
        "ptr10.example": [("TXT", "v=spf1 ptr -all"), ("A", IP)],
        "10.2.0.192.in-addr.arpa": [("PTR", f"n{i}.other.test") for i in range(9)],
    }
    zone["mx10.example"] += [("MX", (i, f"mx{i}.test")) for i in range(9)] + [
        ("MX", (9, "ok.test"))]
    zone["mx11.example"] += [("MX", (i, "ok.test")) for i in range(11)]
    return zone


def _terms(misses: int) -> str:
    """``misses`` non-matching a: terms, then one that matches."""
    return "v=spf1 " + " ".join(["a:miss.test"] * misses) + " a:ok.test -all"


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    zone = _zone()
    zone["miss.test"] = [("A", "192.0.2.99")]
    zone["ten.example"] = [("TXT", _terms(9))]
    zone["eleven.example"] = [("TXT", _terms(10))]
    with DNSServer(zone) as srv:
        yield srv


def resolver(dns: DNSServer, timeout: float = 0.5) -> Resolver:
    return Resolver(DnsConfig(nameservers=[dns.address], timeout=timeout))


async def _result(dns: DNSServer, domain: str, ip: str = IP) -> spf.SpfResult:
    return await check_host(resolver(dns), ip, domain, f"user@{domain}", "helo.test")


@pytest.mark.parametrize(("domain", "ip", "result"), [
    ("v4.example", "::ffff:192.0.2.10", "pass"),  # mapped IPv6 matches ip4:
    ("v4.example", "::ffff:192.0.2.11", "fail"),  # control
    ("v6.example", "::ffff:192.0.2.10", "fail"),  # mapped never matches ip6:
    ("v6.example", "2001:db8::10", "pass"),  # control: real IPv6 does
    ("spf-rr-only.example", IP, "none"),  # type SPF records are ignored
    ("v4.example", IP, "pass"),  # control
    ("ten.example", IP, "pass"),  # 10 DNS terms: at the limit
    ("eleven.example", IP, "permerror"),  # 11: over
    ("void2.example", IP, "fail"),  # 2 void lookups: at the limit
    ("void3.example", IP, "permerror"),  # 3: over
    ("mx10.example", IP, "pass"),  # 10 MX hosts: fine
    ("mx11.example", IP, "permerror"),  # 11 MX hosts: permerror
])
async def test_evaluation(dns: DNSServer, domain: str, ip: str, result: str) -> None:
    res = await _result(dns, domain, ip)
    assert res.result == result, (res.problem, res.trace)


@pytest.mark.parametrize(("domain", "result"), [
    ("v4.example", "pass"),
    ("eleven.example", "permerror"),
    ("void3.example", "permerror"),
])
async def test_a_result_without_trace_is_the_same_result(
        dns: DNSServer, domain: str, result: str) -> None:
    """The daemon asks for no trace (it keeps thousands of results): same outcome,
    no lookups kept; the control, with the trace, lists them."""
    args = (resolver(dns), IP, domain, f"user@{domain}", "helo.test")
    traced, bare = await check_host(*args), await check_host(*args, trace=False)
    assert (bare.result, bare.mechanism, bare.problem) == \
        (traced.result, traced.mechanism, traced.problem)
    assert traced.result == result
    assert bare.trace == ()
    assert traced.trace and all(isinstance(line, str) for line in traced.trace)


async def test_only_txt_is_queried(dns: DNSServer) -> None:
    before = len(dns.queries)
    await _result(dns, "spf-rr-only.example")
    assert [q for q in dns.queries[before:] if q[0] == "spf-rr-only.example"] == [
        ("spf-rr-only.example", "TXT")]


async def test_ptr_names_beyond_ten_are_ignored(dns: DNSServer) -> None:
    names = [("PTR", f"n{i}.other.test") for i in range(10)] + [("PTR", "ptr10.example")]
    zone = _zone()
    zone["10.2.0.192.in-addr.arpa"] = names
    with DNSServer(zone) as srv:
        assert (await _result(srv, "ptr10.example")).result == "fail"
        zone["10.2.0.192.in-addr.arpa"] = names[1:]  # control: now it is the 10th
        srv.set_zone(zone)
        assert (await _result(srv, "ptr10.example")).result == "pass"


async def test_overall_time_limit_gives_temperror(dns: DNSServer) -> None:
    res = await check_host(resolver(dns, timeout=2.0), IP, "slow.example", "a@slow.example",
                           "helo.test", timeout=0.2)
    assert res.result == "temperror" and "exceeded" in res.problem
    # control: a resolver timeout within the limit is a temperror from DNS
    res = await check_host(resolver(dns, timeout=0.2), IP, "slow.example", "a@slow.example",
                           "helo.test", timeout=5)
    assert res.result == "temperror" and "timeout looking up slow.test" in res.problem


async def test_explanation_with_exp_only_macros(dns: DNSServer) -> None:
    res = await check_host(resolver(dns), IP, "exp.example", "u@exp.example", "helo.test",
                           receiver="mx.receiver.test")
    assert res.result == "fail" and res.explanation_from_domain
    assert res.explanation == "192.0.2.10 may not send for exp.example (at mx.receiver.test)"
    res = await _result(dns, "void2.example")  # control: no exp= -> our default text
    assert res.result == "fail" and not res.explanation_from_domain
    assert "192.0.2.10 is not allowed to send mail for void2.example" in res.explanation


async def test_null_sender_uses_postmaster_at_helo(dns: DNSServer) -> None:
    res = await check_mailfrom(resolver(dns), IP, "", "helo.example")
    assert (res.result, res.domain, res.sender) == ("pass", "helo.example",
                                                     "postmaster@helo.example")
    res = await check_mailfrom(resolver(dns), IP, "x@v6.example", "helo.example")  # control
    assert (res.result, res.domain) == ("fail", "v6.example")


async def test_helo_identity(dns: DNSServer) -> None:
    res = await check_helo(resolver(dns), IP, "helo.example")
    assert (res.result, res.identity, res.mechanism) == ("pass", "helo", "a")
    res = await check_helo(resolver(dns), "192.0.2.99", "helo.example")  # control
    assert res.result == "fail"
    assert (await check_helo(resolver(dns), IP, "[192.0.2.10]")).result == "none"


def test_received_spf_header() -> None:
    res = spf.SpfResult("pass", "example.com", mechanism="ip4:192.0.2.10",
                        client_ip="192.0.2.10", sender="user@example.com", helo="mx.example.com")
    value = spf.received_spf(res, "mx.receiver.test")
    assert value == (
        "pass (mx.receiver.test: domain of user@example.com designates 192.0.2.10 as "
        'permitted sender) client-ip=192.0.2.10; envelope-from="user@example.com"; '
        'helo=mx.example.com; receiver=mx.receiver.test; identity=mailfrom; '
        'mechanism="ip4:192.0.2.10";')
    res.result, res.problem = "permerror", "bad (thing)\r\n"
    value = spf.received_spf(res, "mx.receiver.test")
    assert "\r" not in value and "\n" not in value and "bad \\(thing\\)" in value
