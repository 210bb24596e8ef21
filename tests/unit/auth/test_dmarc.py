"""The DMARC engine in RFC 7489 mode (RFC 7489, RFC 9091 np=; RFC 9989 mode:
test_dmarc_9989.py): records, organizational domains, alignment, policies,
several From domains, temporary errors.

Table-driven; every table has a control row that takes the other branch.
Policy discovery runs against the loopback DNS server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mxguard.auth.dmarc import (
    DkimAuth,
    DmarcResult,
    OrgDomains,
    RecordError,
    RecordIgnored,
    SpfAuth,
    aligned,
    combine,
    evaluate,
    from_domains,
    is_dmarc_record,
    normalize_domain,
    parse_record,
)
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone
from tests.support import DATA

PSL_DIR = DATA / "psl"
ORG = OrgDomains(str(PSL_DIR / "public_suffix_list.dat"))


# ------------------------------------------------------------------ PSL


def psl_checks() -> list[tuple[str | None, str | None]]:
    out: list[tuple[str | None, str | None]] = []
    for line in (PSL_DIR / "tests.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        given, want = line.split()
        out.append((None if given == "null" else given, None if want == "null" else want))
    return out


PSL_CHECKS = psl_checks()


def test_psl_official_tests() -> None:
    """All 78 checks of the PSL's tests.txt (the registrable-domain algorithm)."""
    good = [(given is None and want is None) or
            (given is not None and ORG.registrable(given) == want)
            for given, want in PSL_CHECKS]
    print(f"\nPSL tests: {sum(good)}/{len(PSL_CHECKS)}")
    assert len(PSL_CHECKS) == 78
    assert all(good), [c for c, ok in zip(PSL_CHECKS, good, strict=True) if not ok]


@pytest.mark.parametrize(("domain", "org"), [
    ("mail.example.com", "example.com"),
    ("example.com", "example.com"),  # control: already the org domain
    ("a.b.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
    ("x.y.blogspot.com", "y.blogspot.com"),  # private section used
    ("host.unknowntld", "host.unknowntld"),
])
def test_organizational_domain(domain: str, org: str) -> None:
    assert ORG.organizational(domain) == org


def test_bundled_list_agrees_on_the_basics() -> None:
    from mxguard.auth.dmarc import default_org_domains

    bundled = default_org_domains()
    assert bundled.organizational("a.b.example.co.uk") == "example.co.uk"
    assert bundled.registrable("co.uk") is None


# ------------------------------------------------------------------ records


@pytest.mark.parametrize(("text", "want"), [
    ("v=DMARC1; p=reject", {"p": "reject", "sp": None, "pct": 100, "adkim": "r"}),  # control
    ("v=DMARC1;p=quarantine;sp=none;np=reject;pct=50;adkim=s;aspf=s;"
     "rua=mailto:a@b.example,mailto:c@d.example!10m;ruf=mailto:f@b.example;fo=1;ri=3600",
     {"p": "quarantine", "sp": "none", "np": "reject", "pct": 50, "adkim": "s", "aspf": "s",
      "rua": ("mailto:a@b.example", "mailto:c@d.example!10m"), "ruf": ("mailto:f@b.example",),
      "fo": "1", "ri": 3600}),
    ("  v = DMARC1 ;\tp = none ;", {"p": "none"}),
    ("v=DMARC1; p=Reject; SP=Quarantine", {"p": "reject", "sp": "quarantine"}),
    ("v=DMARC1; p=none; foo=bar", {"p": "none"}),  # unknown tag ignored
    ("v=DMARC1; p=none;; pct=20", {"p": "none", "pct": 20}),  # empty term tolerated
    ("v=DMARC1; rua=mailto:x@y.example", {"p": "none", "p_implied": True}),
    ("v=DMARC1; p=bogus; rua=mailto:x@y.example", {"p": "none", "p_implied": True}),
    ("v=DMARC1; p=reject; sp=bogus; rua=mailto:x@y.example",
     {"p": "none", "sp": None, "p_implied": True}),
    ("v=DMARC1; p=reject; rua=notauri", {"p": "reject", "rua": ()}),
    ("v=DMARC1; p=reject; pct=200", {"pct": 100, "warnings": ("invalid pct=200",)}),
    ("v=DMARC1; p=reject; pct=abc", {"pct": 100, "warnings": ("invalid pct=abc",)}),
    ("v=DMARC1; p=reject; adkim=x", {"adkim": "r", "warnings": ("invalid adkim=x",)}),
    ("v=DMARC1; p=reject; np=bogus", {"np": None, "warnings": ("invalid np=bogus",)}),
])
def test_parse_record(text: str, want: dict[str, Any]) -> None:
    rec = parse_record(text, "7489")
    for key, value in want.items():
        assert getattr(rec, key) == value, key


@pytest.mark.parametrize(("text", "error"), [
    ("v=DMARC1; p=none; reject", RecordError),  # bare term (authheaders test.bad.message)
    ("v=DMARC1; p=none; p=reject", RecordError),  # repeated tag
    ("v=DMARC1; p=none; 1x=y", RecordError),  # bad tag name
    ("p=none; v=DMARC1", RecordError),  # v= not first: not a DMARC record
    ("v=DMARC2; p=none", RecordError),
    ("v=dmarc1; p=none", RecordError),  # the version value is case-sensitive
    ("v=DMARC1p=none", RecordError),
    ("v=DMARC1", RecordIgnored),  # no p=, no rua=
    ("v=DMARC1; sp=quarantine; np=reject", RecordIgnored),  # authheaders test_nop.message
    ("v=DMARC1; p=bogus", RecordIgnored),
    ("v=DMARC1; p=reject; sp=bogus", RecordIgnored),
])
def test_parse_record_rejects(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_record(text, "7489")
    assert parse_record("v=DMARC1; p=none").p == "none"  # control


@pytest.mark.parametrize(("text", "is_dmarc"), [
    ("v=DMARC1; p=none", True), ("v=DMARC1", True), ("V = DMARC1;p=none", True),
    ("v=spf1 -all", False), ("", False), ("v=DMARC10; p=none", False),
])
def test_is_dmarc_record(text: str, is_dmarc: bool) -> None:
    assert is_dmarc_record(text) is is_dmarc


# ------------------------------------------------------------------ alignment


@pytest.mark.parametrize(("auth", "author", "mode", "want"), [
    ("example.com", "example.com", "s", True),  # control: identical names
    ("example.com", "example.com", "r", True),
    ("mail.example.com", "example.com", "s", False),
    ("mail.example.com", "example.com", "r", True),
    ("example.com", "news.example.com", "r", True),
    ("a.example.com", "b.example.com", "r", True),
    ("a.example.com", "b.example.com", "s", False),
    ("example.org", "example.com", "r", False),
    ("example.co.uk", "other.co.uk", "r", False),  # only the public suffix in common
    ("foo.blogspot.com", "bar.blogspot.com", "r", False),  # private PSL section
    ("EXAMPLE.COM.", "example.com", "s", True),
    ("", "example.com", "r", False),
    ("食狮.com.cn", "xn--85x722f.com.cn", "s", True),
])
def test_alignment(auth: str, author: str, mode: str, want: bool) -> None:
    assert aligned(auth, author, mode, ORG) is want


@pytest.mark.parametrize(("name", "want"), [
    ("Example.COM.", "example.com"), ("食狮.com.cn", "xn--85x722f.com.cn"),
    ("[192.0.2.1]", None), ("", None), ("a..b", None), ("-a.example", None),
    ("a" * 64 + ".example", None), ("ok_under.example", "ok_under.example"),
])
def test_normalize_domain(name: str, want: str | None) -> None:
    assert normalize_domain(name) == want


@pytest.mark.parametrize(("values", "domains"), [
    (["Test User <test@example.com>"], ("example.com",)),  # control
    (['"Test, User" <test@example.com>'], ("example.com",)),
    (["a@example.com, B <b@EXAMPLE.com>"], ("example.com",)),
    (["Bad <spoof@example.org>,Test <test@example.com>"], ("example.org", "example.com")),
    (["a@example.org", "b@example.com"], ("example.org", "example.com")),
    (['"Test User"'], ()),
    ([], ()),
    (["undisclosed-recipients:;"], ()),
    (["a@[192.0.2.1]"], ()),
    # malformed: one stdlib parser sees only the first, the other both
    (["attacker@evil.example <victim@bank.example>"], ("evil.example", "bank.example")),
    (["a@example.com\r\n (folded comment)"], ("example.com",)),
])
def test_from_domains(values: list[str], domains: tuple[str, ...]) -> None:
    assert from_domains(values).domains == domains


PLAIN_FROM_CASES = [
    "Test User <test@example.com>", "test@example.com", "  <a.b+c@mail.Example.COM>  ",
    '"Doe, John" <j@example.org>', "O'Brien - Sales <ob@example.net>", "x_y@a-b.example",
    "\tJane\t<jane@example.com>",
]
SLOW_FROM_CASES = [  # control: not a plain mailbox, both parsers decide
    "a@example.com, b@example.org", "attacker@evil.example <victim@bank.example>",
    "Jane (work) <jane@example.com>", '"a\\"b" <x@example.com>',
    "=?utf-8?q?J=C3=A9?= <j@example.com>", ".<a@example.com>", " .@example.com",
    "Group: a@example.com;", "<a@example.com> trailing", "a@[192.0.2.1]",
]


@pytest.mark.parametrize("value", PLAIN_FROM_CASES + SLOW_FROM_CASES)
def test_plain_from_fast_path_agrees_with_both_parsers(value: str) -> None:
    from mxguard.auth import dmarc

    fast = dmarc._PLAIN_FROM.fullmatch(value) is not None
    assert fast == (value in PLAIN_FROM_CASES)
    assert sorted(dmarc._domains_of(value)) == sorted(dmarc._domains_by_parsers(value))


def test_from_domains_never_raises_on_garbage() -> None:
    for junk in ["\x00@\x00", "<" * 500, "a@" + "b." * 300, "=?utf-8?b?////?= <@>",
                 '"unterminated <a@b.example', "(((((", "a@\udcff.example", "@,@,@;;"]:
        from_domains([junk])


# ------------------------------------------------------------------ evaluation

ZONE: Zone = {
    "_dmarc.relaxed.example": [("TXT", "v=DMARC1; p=reject; rua=mailto:r@relaxed.example")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.quar.example": [("TXT", "v=DMARC1; p=quarantine; pct=50")],
    "_dmarc.pct0.example": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "_dmarc.none.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.org.example": [("TXT", "v=DMARC1; p=none; sp=reject; np=quarantine")],
    "exists.org.example": [("A", "192.0.2.1")],
    "mxonly.org.example": [("MX", (10, "mx.org.example"))],
    "nodata.org.example": [("TXT", "hello")],  # exists, but no A/AAAA/MX: non-existent
    "_dmarc.nosp.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.multi.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.mixed.example": [("TXT", "v=spf1 -all"), ("TXT", "v=DMARC1; p=reject")],
    "_dmarc.override.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.sub.override.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.bad.example": [("TXT", "v=DMARC1; p=none; reject")],
    "_dmarc.temp.example": [("TIMEOUT", None)],
    "_dmarc.servfail.example": [("SERVFAIL", None)],
    "_dmarc.orgtemp.example": [("TIMEOUT", None)],
    "_dmarc.x.orgtemp.example": [],
    "_dmarc.nptemp.example": [("TXT", "v=DMARC1; p=none; np=reject")],
    "x.nptemp.example": [("TIMEOUT", None)],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def resolver(dns: DNSServer) -> Resolver:
    return Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=0))


async def run(dns: DNSServer, frm: str | list[str], spf: SpfAuth | None = None,
              dkim: list[DkimAuth] | None = None, **opts: Any) -> DmarcResult:
    values = [frm] if isinstance(frm, str) else frm
    opts.setdefault("sample", lambda pct: True)
    opts.setdefault("rfc", "7489")
    return await evaluate(resolver(dns), values, spf, dkim or [], org=ORG, **opts)


def spf(result: str, domain: str, identity: str = "mailfrom") -> SpfAuth:
    return SpfAuth(result, domain, identity)


def sig(result: str, domain: str) -> DkimAuth:
    return DkimAuth(result, domain, "sel")


ALIGNMENT_CASES: list[tuple[str, str, SpfAuth | None, list[DkimAuth], str, bool, bool]] = [
    # id, From, SPF, DKIM, result, spf_aligned, dkim_aligned
    ("spf-relaxed-sub", "a@relaxed.example", spf("pass", "bounce.relaxed.example"), [],
     "pass", True, False),
    ("spf-relaxed-control", "a@relaxed.example", spf("pass", "other.example"), [],
     "fail", False, False),
    ("spf-not-pass", "a@relaxed.example", spf("softfail", "relaxed.example"), [],
     "fail", False, False),
    ("spf-strict", "a@strict.example", spf("pass", "strict.example"), [], "pass", True, False),
    ("spf-strict-sub", "a@strict.example", spf("pass", "bounce.strict.example"), [],
     "fail", False, False),
    ("spf-helo-null-sender", "a@relaxed.example", spf("pass", "mx.relaxed.example", "helo"),
     [], "pass", True, False),
    ("dkim-relaxed", "a@relaxed.example", None, [sig("pass", "mail.relaxed.example")],
     "pass", False, True),
    ("dkim-failed-sig", "a@relaxed.example", None, [sig("fail", "relaxed.example")],
     "fail", False, False),
    ("dkim-strict", "a@strict.example", None, [sig("pass", "strict.example")],
     "pass", False, True),
    ("dkim-strict-sub", "a@strict.example", None, [sig("pass", "sub.strict.example")],
     "fail", False, False),
    ("dkim-several", "a@relaxed.example", None,
     [sig("fail", "relaxed.example"), sig("pass", "other.example"),
      sig("pass", "relaxed.example")], "pass", False, True),
    ("both", "a@relaxed.example", spf("pass", "relaxed.example"),
     [sig("pass", "relaxed.example")], "pass", True, True),
]


@pytest.mark.parametrize("case", ALIGNMENT_CASES, ids=[c[0] for c in ALIGNMENT_CASES])
async def test_alignment_in_evaluation(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, spf_in, dkim_in, result, spf_ok, dkim_ok = case
    res = await run(dns, frm, spf_in, dkim_in)
    assert (res.result, res.spf_aligned, res.dkim_aligned) == (result, spf_ok, dkim_ok)
    assert res.policy == "reject"


POLICY_CASES: list[tuple[str, str, dict[str, Any], tuple[str, str, str, str]]] = [
    # id, From, options, (result, policy, disposition, policy_tag)
    ("p-reject", "a@relaxed.example", {}, ("fail", "reject", "reject", "p")),
    ("p-none", "a@none.example", {}, ("fail", "none", "none", "p")),
    ("p-quarantine-sampled", "a@quar.example", {}, ("fail", "quarantine", "quarantine", "p")),
    ("p-quarantine-outside-pct", "a@quar.example", {"sample": lambda pct: False},
     ("fail", "quarantine", "none", "p")),
    ("pct-not-honoured", "a@quar.example", {"sample": lambda pct: False, "honour_pct": False},
     ("fail", "quarantine", "quarantine", "p")),
    ("pct0-default-sampler", "a@pct0.example", {"sample": None},
     ("fail", "reject", "quarantine", "p")),
    ("sp-existing-sub", "a@exists.org.example", {}, ("fail", "reject", "reject", "sp")),
    ("sp-mx-only-sub", "a@mxonly.org.example", {}, ("fail", "reject", "reject", "sp")),
    ("np-nxdomain-sub", "a@gone.org.example", {}, ("fail", "quarantine", "quarantine", "np")),
    ("np-nodata-sub", "a@nodata.org.example", {}, ("fail", "quarantine", "quarantine", "np")),
    ("org-itself", "a@org.example", {}, ("fail", "none", "none", "p")),
    ("no-sp-uses-p", "a@deep.sub.nosp.example", {}, ("fail", "quarantine", "quarantine", "p")),
    ("own-record-wins", "a@sub.override.example", {}, ("fail", "none", "none", "p")),
    ("parent-record", "a@other.override.example", {}, ("fail", "reject", "reject", "p")),
    ("one-dmarc-among-txt", "a@mixed.example", {}, ("fail", "reject", "reject", "p")),
    ("several-records", "a@multi.example", {}, ("none", "none", "none", "")),
    ("no-record", "a@nowhere.example", {}, ("none", "none", "none", "")),
    ("malformed", "a@bad.example", {}, ("permerror", "none", "none", "")),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
async def test_policies(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, opts, want = case
    res = await run(dns, frm, spf("fail", "x.invalid"), [], **opts)
    assert (res.result, res.policy, res.disposition, res.policy_tag) == want, res.reason
    assert res.sampled_out is (want[0] == "fail" and want[1] != want[2])


async def test_record_location(dns: DNSServer) -> None:
    res = await run(dns, "a@exists.org.example")
    assert (res.record_domain, res.org_domain) == ("org.example", "org.example")
    own = await run(dns, "a@relaxed.example")  # control: the From domain's own record
    assert (own.record_domain, own.org_domain) == ("relaxed.example", "relaxed.example")


async def test_pass_in_np_domain_needs_no_existence_lookup(dns: DNSServer) -> None:
    before = len(dns.queries)
    res = await run(dns, "a@gone.org.example", None, [sig("pass", "org.example")])
    assert (res.result, res.policy, res.policy_tag) == ("pass", "reject", "sp")
    asked = [q for q in dns.queries[before:] if q[0] == "gone.org.example"]
    assert asked == []


@pytest.mark.parametrize(("frm", "want"), [
    ("a@temp.example", "temperror"),  # _dmarc name times out
    ("a@servfail.example", "temperror"),
    ("a@x.orgtemp.example", "temperror"),  # organizational fallback times out
    ("a@x.nptemp.example", "temperror"),  # RFC 9091 existence check times out
    ("a@relaxed.example", "fail"),  # control
])
async def test_temperror(dns: DNSServer, frm: str, want: str) -> None:
    res = await run(dns, frm, spf("fail", "x.invalid"))
    assert res.result == want
    assert res.disposition in (("none",) if want == "temperror" else ("reject",))


MULTI_CASES: list[tuple[str, list[str], list[DkimAuth], str, tuple[str, str, str]]] = [
    # id, From values, DKIM, multiple_domains, (result, from_domain, disposition)
    ("one-fails", ["a@relaxed.example, b@none.example"], [sig("pass", "none.example")],
     "strictest", ("fail", "relaxed.example", "reject")),
    ("other-order", ["b@none.example, a@relaxed.example"], [sig("pass", "none.example")],
     "strictest", ("fail", "relaxed.example", "reject")),
    ("two-fields", ["a@relaxed.example", "b@none.example"], [sig("pass", "none.example")],
     "strictest", ("fail", "relaxed.example", "reject")),
    ("all-pass", ["a@relaxed.example, b@none.example"],
     [sig("pass", "none.example"), sig("pass", "relaxed.example")],
     "strictest", ("pass", "relaxed.example", "none")),
    ("all-pass-but-fail-mode", ["a@none.example, b@relaxed.example"],
     [sig("pass", "none.example"), sig("pass", "relaxed.example")],
     "fail", ("fail", "relaxed.example", "reject")),
    ("same-domain-twice", ["a@relaxed.example, b@RELAXED.example"], [],
     "fail", ("fail", "relaxed.example", "reject")),  # control: one domain, not "several"
    ("pass-and-none", ["a@relaxed.example, b@nowhere.example"],
     [sig("pass", "relaxed.example")], "strictest", ("none", "nowhere.example", "none")),
]


@pytest.mark.parametrize("case", MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
async def test_multiple_from(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, values, dkim_in, mode, want = case
    res = await run(dns, values, None, dkim_in, multiple_domains=mode)
    assert (res.result, res.from_domain, res.disposition) == want, res.reason
    assert len(res.from_domains) == len({v.split("@")[-1].lower() for v in
                                         ",".join(values).split(",")})


@pytest.mark.parametrize(("values", "want", "reason"), [
    ([], "permerror", "no From header"),
    (['"Test User"'], "permerror", "no usable domain in From"),
    (["a@[192.0.2.1]"], "permerror", "no usable domain in From"),
    (["a@relaxed.example"], "fail", "neither SPF nor DKIM aligned"),  # control
])
async def test_missing_from(dns: DNSServer, values: list[str], want: str, reason: str) -> None:
    res = await run(dns, values)
    assert res.result == want
    assert res.policy == ("reject" if want == "fail" else "none")
    assert res.reason.startswith(reason)


def test_combine_ranks() -> None:
    def r(result: str, dis: str = "none", dom: str = "x") -> DmarcResult:
        return DmarcResult(result, policy=dis, disposition=dis, from_domain=dom)

    assert combine([r("pass"), r("fail", "quarantine", "y")]).from_domain == "y"
    assert combine([r("fail", "none", "a"), r("fail", "reject", "b")]).from_domain == "b"
    assert combine([r("none", dom="a"), r("temperror", dom="b")]).result == "temperror"
    assert combine([r("pass", dom="a"), r("permerror", dom="b")]).result == "permerror"
    assert combine([r("pass", dom="a")]).reason == ""  # control: single result unchanged
