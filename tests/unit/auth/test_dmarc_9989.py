"""The DMARC engine in RFC 9989 mode (the default), against the loopback DNS:
the DNS tree walk (§4.10) for policy discovery (§4.10.1) and the
organizational domain (§4.10.2), psd=, np= on non-existent domains, t= test
mode, removed and unknown tags (§4.7), alignment on the tree-walk
organizational domain (§4.4); then the table of the cases where RFC 7489 mode
decides differently.

Every table has a control row that takes the other branch; every row names
the RFC section that decides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mxguard.auth.dmarc import (
    MAX_WALK,
    DkimAuth,
    DmarcResult,
    OrgDomains,
    SpfAuth,
    TreeWalk,
    evaluate,
    parse_record,
    walk_names,
)
from mxguard.config import DnsConfig
from mxguard.dns import Resolver
from mxguard.testing.dns import DNSServer, Zone
from tests.support import DATA

ORG = OrgDomains(str(DATA / "psl" / "public_suffix_list.dat"))  # RFC 7489 rows only
LONG = "l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.long.example"  # 12 labels
SEVEN = "s1.s2.s3.s4.s5.seven.example"  # 7 labels

ZONE: Zone = {
    # tree walk
    "_dmarc.walk.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.long.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.l8.l9.l10.long.example": [("TXT", "v=DMARC1; p=none")],  # 5 labels: on the walk
    "_dmarc.l3.l4.l5.l6.l7.l8.l9.l10.long.example": [("TXT", "v=DMARC1; p=reject")],  # 10
    "_dmarc.seven.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.tw.example": [("TIMEOUT", None)],
    # organizational domain
    "_dmarc.org2.example": [("TXT", "v=DMARC1; p=reject; sp=quarantine")],
    "_dmarc.sub.org2.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.org3.example": [("TXT", "v=DMARC1; p=reject")],
    "_dmarc.dept.org3.example": [("TXT", "v=DMARC1; p=none; sp=quarantine; psd=n")],
    "_dmarc.b.mid.example": [("TXT", "v=DMARC1; p=reject")],
    # public suffix domains (single-label names the walk reaches)
    "_dmarc.psdtld": [("TXT", "v=DMARC1; p=quarantine; sp=none; np=reject; psd=y")],
    "member.psdtld": [("A", "192.0.2.1")],
    "a.member.psdtld": [("A", "192.0.2.2")],
    "_dmarc.plaintld": [("TXT", "v=DMARC1; p=reject")],  # no psd=: not a PSD
    # np=
    "_dmarc.npx.example": [("TXT", "v=DMARC1; p=none; sp=quarantine; np=reject")],
    "exists.npx.example": [("A", "192.0.2.3")],
    "nodata.npx.example": [("TXT", "only a TXT record")],
    # t= and tags
    "_dmarc.trial.example": [("TXT", "v=DMARC1; p=reject; t=y")],
    "_dmarc.trialq.example": [("TXT", "v=DMARC1; p=quarantine; t=y")],
    "_dmarc.trialn.example": [("TXT", "v=DMARC1; p=none; t=y")],
    "_dmarc.live.example": [("TXT", "v=DMARC1; p=reject; t=n")],
    "_dmarc.pct0.example": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "_dmarc.nop.example": [("TXT", "v=DMARC1; sp=reject")],
    "_dmarc.badnp.example": [("TXT", "v=DMARC1; p=reject; np=bogus")],
    "_dmarc.unknown.example": [("TXT", "v=DMARC1; p=reject; foo=bar; rf=xyz; ri=soon")],
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as srv:
        yield srv


def resolver(dns: DNSServer) -> Resolver:
    return Resolver(DnsConfig(nameservers=[dns.address], timeout=0.3, cache_size=0))


def spf(result: str, domain: str) -> SpfAuth:
    return SpfAuth(result, domain)


def sig(result: str, domain: str) -> DkimAuth:
    return DkimAuth(result, domain, "sel")


FAIL = spf("fail", "x.invalid")


async def run(dns: DNSServer, frm: str, spf_in: SpfAuth | None = FAIL,
              dkim: list[DkimAuth] | None = None, rfc: str = "9989") -> DmarcResult:
    return await evaluate(resolver(dns), [f"u@{frm}"], spf_in, dkim or [], org=ORG,
                          sample=lambda pct: pct >= 100, rfc=rfc)


def dmarc_queries(dns: DNSServer, since: int) -> list[str]:
    return [n.removeprefix("_dmarc.") for n, t in dns.queries[since:]
            if n.startswith("_dmarc.") and t == "TXT"]


# ------------------------------------------------------------------ the walk (§4.10)


@pytest.mark.parametrize(("domain", "want"), [
    # §4.10: fewer than 8 labels -- one label less each step, to the top-level label
    ("a.b.example", ["a.b.example", "b.example", "example"]),
    ("example", ["example"]),  # control: nothing above
    (SEVEN, [SEVEN, "s2.s3.s4.s5.seven.example", "s3.s4.s5.seven.example",
             "s4.s5.seven.example", "s5.seven.example", "seven.example", "example"]),
    # §4.10: 8 or more labels -- the name, then straight to its last 7 labels
    (LONG, [LONG, "l6.l7.l8.l9.l10.long.example", "l7.l8.l9.l10.long.example",
            "l8.l9.l10.long.example", "l9.l10.long.example", "l10.long.example",
            "long.example", "example"]),
    ("1.2.3.4.5.6.7.8", ["1.2.3.4.5.6.7.8", "2.3.4.5.6.7.8", "3.4.5.6.7.8", "4.5.6.7.8",
                         "5.6.7.8", "6.7.8", "7.8", "8"]),
])
def test_walk_names(domain: str, want: list[str]) -> None:
    assert walk_names(domain) == want
    assert len(walk_names(domain)) <= MAX_WALK


DISCOVERY_CASES: list[tuple[str, str, tuple[str, str, str, str]]] = [
    # id, From domain, (result, record domain, org domain, policy) -- §4.10.1
    ("own-record", "walk.example", ("fail", "walk.example", "walk.example", "reject")),
    ("five-labels-up", "a.b.c.d.walk.example",
     ("fail", "walk.example", "walk.example", "reject")),
    # §4.10: the 12-label name skips its 8..11-label parents; the 10-label record
    # is never asked, the 5-label one is on the walk -- but policy comes from the
    # organizational domain (fewest labels with a record: long.example)
    ("long-name-shortcut", LONG, ("fail", "long.example", "long.example", "quarantine")),
    # control: the 10-label name itself has the record the shortcut skips
    ("long-name-own-record", "l3.l4.l5.l6.l7.l8.l9.l10.long.example",
     ("fail", "l3.l4.l5.l6.l7.l8.l9.l10.long.example", "long.example", "reject")),
    ("seven-labels", SEVEN, ("fail", "seven.example", "seven.example", "reject")),
    ("no-record", "a.b.nowhere.example", ("none", "", "a.b.nowhere.example", "none")),
    ("walk-timeout", "a.tw.example", ("temperror", "", "", "none")),  # §4.10: DNS failure
]


@pytest.mark.parametrize("case", DISCOVERY_CASES, ids=[c[0] for c in DISCOVERY_CASES])
async def test_policy_discovery(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, want = case
    before = len(dns.queries)
    res = await run(dns, frm)
    assert (res.result, res.record_domain, res.org_domain, res.policy) == want, res.reason
    asked = dmarc_queries(dns, before)
    assert len(set(asked)) <= MAX_WALK  # §4.10: at most 8 names per walk
    assert set(asked) <= set(walk_names(frm))


async def test_long_name_queries_only_the_walk(dns: DNSServer) -> None:
    """§4.10: a 12-label From domain costs 8 queries, none for its 8..11-label
    parents; the 7-label control walks every label (7 queries)."""
    before = len(dns.queries)
    await run(dns, LONG)
    asked = dmarc_queries(dns, before)
    assert sorted(set(asked)) == sorted(walk_names(LONG)) and len(set(asked)) == 8
    assert "l3.l4.l5.l6.l7.l8.l9.l10.long.example" not in asked
    before = len(dns.queries)
    await run(dns, SEVEN)
    assert sorted(set(dmarc_queries(dns, before))) == sorted(walk_names(SEVEN))


async def test_psl_not_needed(dns: DNSServer) -> None:
    """RFC 9989 mode never reads the Public Suffix List (control: 7489 mode does)."""
    res = await evaluate(resolver(dns), ["u@a.b.c.d.walk.example"], FAIL, [], rfc="9989")
    assert (res.result, res.record_domain) == ("fail", "walk.example")
    assert (await evaluate(resolver(dns), ["u@walk.example"], FAIL, [], rfc="7489",
                           org=ORG)).result == "fail"


class _Exploding(OrgDomains):
    """An OrgDomains that raises when asked: 9989 mode must not ask."""

    def __init__(self) -> None:
        pass

    def registrable(self, domain: str) -> str | None:
        raise AssertionError("PSL consulted in RFC 9989 mode")


async def test_exploding_psl_is_not_consulted(dns: DNSServer) -> None:
    res = await evaluate(resolver(dns), ["u@x.walk.example"], FAIL, [], rfc="9989",
                         org=_Exploding())
    assert res.result == "fail"


# ------------------------------------------------------------------ org domain (§4.10.2)


ORG_CASES: list[tuple[str, str, str]] = [
    # id, domain, organizational domain
    ("fewest-labels", "x.sub.org2.example", "org2.example"),  # §4.10.2 step 3
    ("fewest-labels-own", "org2.example", "org2.example"),  # control
    ("psd-n-stops", "x.dept.org3.example", "dept.org3.example"),  # §4.10.2 step 1
    ("psd-n-control", "x.other.org3.example", "org3.example"),  # control: no psd=n on walk
    ("psd-y-one-below", "a.member.psdtld", "member.psdtld"),  # §4.10.2 step 2
    ("psd-y-at-start-ignored", "psdtld", "psdtld"),  # step 2 excludes the start
    ("no-psd-tld-record", "a.x.plaintld", "plaintld"),  # control: no psd=y, fewest labels
    ("no-records", "a.b.nowhere.example", "a.b.nowhere.example"),  # none: the name itself
]


@pytest.mark.parametrize(("name", "domain", "org"), ORG_CASES, ids=[c[0] for c in ORG_CASES])
async def test_organizational_domain(dns: DNSServer, name: str, domain: str, org: str) -> None:
    assert await TreeWalk(resolver(dns)).org(domain) == org


ALIGN_CASES: list[tuple[str, str, SpfAuth | None, list[DkimAuth], str]] = [
    # id, From, SPF, DKIM, result -- §4.4 on the tree-walk organizational domain
    ("relaxed-same-org", "x.sub.org2.example", None, [sig("pass", "org2.example")], "pass"),
    ("relaxed-other-org", "x.sub.org2.example", None, [sig("pass", "org3.example")], "fail"),
    ("psd-n-boundary", "x.dept.org3.example", None, [sig("pass", "org3.example")], "fail"),
    ("psd-n-inside", "x.dept.org3.example", None, [sig("pass", "y.dept.org3.example")],
     "pass"),
    # below a PSD, each registration is its own organizational domain
    ("psd-y-same-member", "a.member.psdtld", spf("pass", "mail.member.psdtld"), [], "pass"),
    ("psd-y-other-member", "a.member.psdtld", spf("pass", "other.psdtld"), [], "fail"),
    # control: without psd=y the TLD's record makes the TLD the org domain
    ("no-psd-tld-aligns", "a.x.plaintld", spf("pass", "y.plaintld"), [], "pass"),
]


@pytest.mark.parametrize("case", ALIGN_CASES, ids=[c[0] for c in ALIGN_CASES])
async def test_alignment(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, spf_in, dkim_in, result = case
    assert (await run(dns, frm, spf_in, dkim_in)).result == result


async def test_strict_alignment_needs_the_same_name(dns: DNSServer) -> None:
    """§4.4: strict mode compares names, not organizational domains."""
    zone: Zone = {"_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s")]}
    with DNSServer(zone) as srv:
        sub = await run(srv, "strict.example", None, [sig("pass", "mail.strict.example")])
        same = await run(srv, "strict.example", None, [sig("pass", "strict.example")])
    assert (sub.result, same.result) == ("fail", "pass")


# ------------------------------------------------------------------ policies


POLICY_CASES: list[tuple[str, str, tuple[str, str, str, bool]]] = [
    # id, From, (policy, tag, disposition, testing)
    # §4.10.1: a PSD's record applies when the domain and its org domain have none;
    # it speaks for the organizational domain (p=) and its subdomains (sp=, np=)
    ("psd-org-domain", "member.psdtld", ("quarantine", "p", "quarantine", False)),
    ("psd-subdomain", "a.member.psdtld", ("none", "sp", "none", False)),
    ("psd-nonexistent", "gone.member.psdtld", ("reject", "np", "reject", False)),
    # np= (§4.7): non-existent = NXDOMAIN; a name with any record exists (NODATA)
    ("np-nxdomain", "gone.npx.example", ("reject", "np", "reject", False)),
    ("np-nodata-exists", "nodata.npx.example", ("quarantine", "sp", "quarantine", False)),
    ("np-a-record", "exists.npx.example", ("quarantine", "sp", "quarantine", False)),
    ("np-org-itself", "npx.example", ("none", "p", "none", False)),  # control: p= only
    # t= (§4.7): reject applied as quarantine, quarantine as none
    ("t-reject", "trial.example", ("reject", "p", "quarantine", True)),
    ("t-quarantine", "trialq.example", ("quarantine", "p", "none", True)),
    ("t-none", "trialn.example", ("none", "p", "none", True)),
    ("t-n-control", "live.example", ("reject", "p", "reject", False)),
    # removed tags (§4.7): pct= is not read
    ("pct-ignored", "pct0.example", ("reject", "p", "reject", False)),
    # §4.7: a record without p= reads as p=none
    ("no-p-is-none", "nop.example", ("none", "p", "none", False)),
    ("unknown-and-removed-tags", "unknown.example", ("reject", "p", "reject", False)),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
async def test_policies(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, want = case
    res = await run(dns, frm)
    assert res.result == "fail", res.reason
    assert (res.policy, res.policy_tag, res.disposition, res.testing) == want, res.reason
    assert not res.sampled_out


async def test_np_asks_only_a_failing_message(dns: DNSServer) -> None:
    """np= existence lookup only when it could change the outcome (control: pass)."""
    before = len(dns.queries)
    res = await run(dns, "gone.npx.example", None, [sig("pass", "npx.example")])
    assert res.result == "pass"
    assert [q for q in dns.queries[before:] if q[0] == "gone.npx.example"] == []


async def test_invalid_np_without_rua_ignores_record(dns: DNSServer) -> None:
    """§4.7 / §4.10.1: an invalid np= (like sp=) without rua=: no policy."""
    res = await run(dns, "badnp.example")
    assert (res.result, res.record) == ("none", None)
    ok = await run(dns, "walk.example")  # control
    assert ok.result == "fail"


@pytest.mark.parametrize(("text", "want"), [
    # §4.7: pct, rf, ri are no longer tags: ignored, their values unchecked
    ("v=DMARC1; p=reject; pct=0; rf=bogus; ri=x",
     {"pct": 100, "removed": ("pct", "rf", "ri"), "warnings": ()}),
    ("v=DMARC1; p=reject", {"removed": (), "psd": "u", "t": False}),  # control
    ("v=DMARC1; p=reject; foo=bar", {"p": "reject", "warnings": ()}),  # unknown tag
    ("v=DMARC1; p=reject; psd=y; t=y", {"psd": "y", "t": True}),
    ("v=DMARC1; p=reject; psd=n; t=n", {"psd": "n", "t": False}),
    ("v=DMARC1; p=reject; psd=maybe; t=2",
     {"psd": "u", "t": False, "warnings": ("invalid psd=maybe", "invalid t=2")}),
    ("v=DMARC1; sp=quarantine", {"p": "none", "sp": "quarantine", "p_implied": True}),
])
def test_parse_record(text: str, want: dict[str, Any]) -> None:
    rec = parse_record(text)
    for key, value in want.items():
        assert getattr(rec, key) == value, key


# ------------------------------------------------------------------ RFC 7489 vs RFC 9989


DIFFERENCES: list[tuple[str, str, list[DkimAuth], tuple[str, str, str], tuple[str, str, str],
                        str]] = [
    # id, From, DKIM, RFC 7489 (result, policy, disposition), RFC 9989 (same), why
    ("pct", "pct0.example", [], ("fail", "reject", "quarantine"), ("fail", "reject", "reject"),
     "7489 §6.6.4 samples pct=0 out; 9989 §4.7 removed pct="),
    ("t-test-mode", "trial.example", [], ("fail", "reject", "reject"),
     ("fail", "reject", "quarantine"), "t= unknown to 7489; 9989 §4.7 test mode"),
    ("np-nodata", "nodata.npx.example", [], ("fail", "reject", "reject"),
     ("fail", "quarantine", "quarantine"),
     "RFC 9091 §2.1: no A/AAAA/MX = non-existent; 9989: NODATA exists"),
    ("missing-p", "nop.example", [], ("none", "none", "none"), ("fail", "none", "none"),
     "7489 §6.6.3 step 6 ignores it without rua=; 9989 §4.7 reads p=none"),
    ("psd-record", "member.psdtld", [], ("none", "none", "none"),
     ("fail", "quarantine", "quarantine"),
     "7489 §6.6.3 stops at the PSL org domain; 9989 §4.10.1 falls back to the PSD"),
    ("intermediate-org", "a.b.mid.example", [], ("none", "none", "none"),
     ("fail", "reject", "reject"),
     "7489 §3.2 org = mid.example (PSL); 9989 §4.10.2 org = b.mid.example (its record)"),
    ("psd-n-alignment", "x.dept.org3.example", [sig("pass", "org3.example")],
     ("pass", "reject", "none"), ("fail", "quarantine", "quarantine"),
     "7489 §3.2 PSL org org3.example aligns; 9989 §4.10.2 psd=n makes dept its own org"),
    ("invalid-np", "badnp.example", [], ("fail", "reject", "reject"), ("none", "none", "none"),
     "7489: an invalid np= is skipped; 9989 §4.7: invalid np= like invalid sp="),
    ("control-same", "walk.example", [], ("fail", "reject", "reject"),
     ("fail", "reject", "reject"), "control: a plain p=reject record decides alike"),
]


@pytest.mark.parametrize("case", DIFFERENCES, ids=[c[0] for c in DIFFERENCES])
async def test_rfc_differences(dns: DNSServer, case: tuple[Any, ...]) -> None:
    _, frm, dkim_in, old, new, _why = case
    for rfc, want in (("7489", old), ("9989", new)):
        res = await run(dns, frm, FAIL, dkim_in, rfc=rfc)
        assert (res.result, res.policy, res.disposition) == want, (rfc, res.reason)
        assert res.rfc == rfc
    assert (old == new) is (case[0] == "control-same")


async def test_unknown_rfc_is_refused(dns: DNSServer) -> None:
    with pytest.raises(ValueError, match="9989, 7489"):
        await evaluate(resolver(dns), ["u@walk.example"], FAIL, [], rfc="2026")
