"""Authentication-Results (RFC 8601): building our header, finding forged ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.auth.authresults import (
    authserv_id_of,
    build,
    default_authserv_id,
    forged_indexes,
    pvalue,
    short_b,
)
from mxguard.auth.dmarc import DkimAuth, DmarcResult, SpfAuth

ID = "mx.example.net"
AR = "Authentication-Results"


def test_full_header_matches_the_documented_shape() -> None:
    value = build(
        "authserv-id", spf=SpfAuth("pass", "example.org"),
        dkim=[DkimAuth("pass", "example.org", "sel", "AbCdEfGhIjKlMnOp")],
        dmarc=DmarcResult("pass", policy="reject", from_domain="example.org"))
    assert value == ("authserv-id; spf=pass smtp.mailfrom=example.org; dkim=pass "
                     "header.d=example.org header.s=sel header.b=AbCdEfGh; "
                     "dmarc=pass (p=reject dis=none) header.from=example.org")


def test_nothing_checked_is_none() -> None:
    assert build(ID) == f"{ID}; none"
    assert build(ID, spf=SpfAuth("skipped", "")) == f"{ID}; none"  # not an SPF result
    assert build(ID, dkim=[]) == f"{ID}; dkim=none (no signatures)"  # control: DKIM ran


def test_default_authserv_id_is_the_host_name() -> None:
    assert build("", dkim=[]).startswith(default_authserv_id() + "; ")
    assert default_authserv_id()


def test_folding_puts_each_result_on_its_own_line() -> None:
    value = build(ID, spf=SpfAuth("fail", "a.example"), dkim=[], fold=True)
    assert value == f"{ID};\n\tspf=fail smtp.mailfrom=a.example;\n\tdkim=none (no signatures)"
    assert "\n" not in build(ID, spf=SpfAuth("fail", "a.example"), dkim=[])  # control


@pytest.mark.parametrize(("spf", "want"), [
    (SpfAuth("pass", "example.org", sender="user@example.org"),
     "spf=pass smtp.mailfrom=user@example.org"),
    (SpfAuth("pass", "mx.example.org", identity="helo"), "spf=pass smtp.helo=mx.example.org"),
    (SpfAuth("softfail", "example.org", comment="mx: 192.0.2.1 (not) permitted"),
     r"spf=softfail (mx: 192.0.2.1 \(not\) permitted) smtp.mailfrom=example.org"),
    (SpfAuth("none", "", sender=""), "spf=none"),
    (SpfAuth("pass", "example.org", sender="we ird@example.org"),
     'spf=pass smtp.mailfrom="we ird@example.org"'),
])
def test_spf_resinfo(spf: SpfAuth, want: str) -> None:
    assert build(ID, spf=spf) == f"{ID}; {want}"


def test_several_dkim_results_and_unique_b_prefixes() -> None:
    sigs = [DkimAuth("pass", "a.example", "s1", "SAMEPREFIXaaaa"),
            DkimAuth("fail", "b.example", "s2", "SAMEPREFIXbbbb", reason="body hash mismatch"),
            DkimAuth("pass", "c.example", "s3", "Other+/=123456", identity="@c.example")]
    value = build(ID, dkim=sigs)
    assert value == (f"{ID}; dkim=pass header.d=a.example header.s=s1 header.b=SAMEPREFIXa; "
                     'dkim=fail reason="body hash mismatch" header.d=b.example header.s=s2 '
                     "header.b=SAMEPREFIXb; dkim=pass header.d=c.example header.i=@c.example "
                     'header.s=s3 header.b="Other+/="')


@pytest.mark.parametrize(("values", "want"), [
    (["AbCdEfGhIjKl"], {"AbCdEfGhIjKl": "AbCdEfGh"}),  # control: 8 is enough
    (["abcdefgh1", "abcdefgh2"], {"abcdefgh1": "abcdefgh1", "abcdefgh2": "abcdefgh2"}),
    (["abc"], {"abc": "abc"}),
    (["abcd efgh\n\tijkl"], {"abcd efgh\n\tijkl": "abcdefgh"}),
])
def test_short_b(values: list[str], want: dict[str, str]) -> None:
    assert short_b(values) == want


@pytest.mark.parametrize(("res", "dis", "want"), [
    (DmarcResult("fail", policy="reject", disposition="reject", from_domain="ex.com"), None,
     "dmarc=fail (p=reject dis=reject) header.from=ex.com"),
    (DmarcResult("fail", policy="reject", disposition="reject", from_domain="ex.com"), "none",
     "dmarc=fail (p=reject dis=none) header.from=ex.com"),  # local policy: not applied
    (DmarcResult("none", from_domain="ex.com", reason="no DMARC record"), None,
     "dmarc=none (no DMARC record) header.from=ex.com"),
    (DmarcResult("temperror", from_domain="ex.com", reason="DNS: timeout (x)"), None,
     r"dmarc=temperror (DNS: timeout \(x\)) header.from=ex.com"),
    (DmarcResult("permerror", reason="no From header"), None,
     "dmarc=permerror (no From header)"),
])
def test_dmarc_resinfo(res: DmarcResult, dis: str | None, want: str) -> None:
    assert build(ID, dmarc=res, dmarc_disposition=dis) == f"{ID}; {want}"


@pytest.mark.parametrize(("text", "want"), [
    ("example.org", "example.org"), ("@example.org", "@example.org"),
    ("a.b+c@example.org", "a.b+c@example.org"), ("a b", '"a b"'), ('a"b', '"a\\"b"'),
    ("x;y", '"x;y"'), ("", '""'),
])
def test_pvalue(text: str, want: str) -> None:
    assert pvalue(text) == want


def test_our_header_is_recognized_as_ours() -> None:
    assert authserv_id_of(build(ID, dkim=[], fold=True)) == ID


# ------------------------------------------------------------------ forged headers

FORGED_CASES: list[tuple[str, list[tuple[str, str]], list[int]]] = [
    ("plain", [(AR, f"{ID}; spf=pass smtp.mailfrom=example.org")], [1]),
    ("other-id-kept", [(AR, "lists.example.org; spf=pass")], []),  # control
    ("case", [(AR, "MX.Example.NET; dkim=pass")], [1]),
    ("version", [(AR, f"{ID} 1; none")], [1]),
    ("version-comment", [(AR, f"{ID} (v) 1 ; none")], [1]),
    ("leading-comment", [(AR, f"(forged for you) {ID}; none")], [1]),
    ("nested-comment", [(AR, f"(a (b \\) c) d) {ID};none")], [1]),
    ("leading-space-folded", [(AR, f" \n\t{ID}\n ;dkim=pass")], [1]),
    ("quoted-id", [(AR, f'"{ID}"; none')], [1]),
    ("trailing-dot", [(AR, f"{ID}.; none")], [1]),
    ("no-semicolon", [(AR, ID)], [1]),
    ("longer-name", [(AR, f"{ID}.evil.example; none")], []),
    ("shorter-name", [(AR, "mx.example; none")], []),
    ("subdomain", [(AR, f"a.{ID}; none")], []),
    ("header-name-case", [("authentication-results", f"{ID}; none")], [1]),
    ("arc-header-kept", [("ARC-Authentication-Results", f"i=1; {ID}; none")], []),
    ("mixed", [(AR, "other.example; none"), (AR, f"{ID}; spf=pass"), ("Received", ID),
               (AR, f"{ID.upper()}; dkim=pass"), (AR, "x.example; none")], [3, 2]),
    ("comment-only", [(AR, f"({ID})")], []),
    ("unterminated-comment", [(AR, f"({ID}; none")], []),
    ("garbage", [(AR, ""), (AR, ";"), (AR, '"'), (AR, "\x00\x01"), (AR, "((((")], []),
]


@pytest.mark.parametrize("case", FORGED_CASES, ids=[c[0] for c in FORGED_CASES])
def test_forged_indexes(case: tuple[str, list[tuple[str, str]], list[int]]) -> None:
    _, headers, want = case
    assert forged_indexes(headers, ID) == want


def test_several_ids_of_ours() -> None:
    headers = [(AR, "mx1.example; none"), (AR, "mx2.example; none"), (AR, "x.example; none")]
    assert forged_indexes(headers, ["mx1.example", "MX2.example."]) == [2, 1]
    assert forged_indexes(headers, "") == []  # control: no id, nothing is ours


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([AR, "From", "authentication-RESULTS"]),
                          st.text(max_size=80)), max_size=6))
def test_forged_indexes_never_raise(headers: list[tuple[str, str]]) -> None:
    found = forged_indexes(headers, ID)
    count = sum(n.lower() == AR.lower() for n, _ in headers)
    assert all(1 <= i <= count for i in found)
    assert found == sorted(found, reverse=True)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_authserv_id_of_never_raises(value: str) -> None:
    got = authserv_id_of(value)
    assert got is None or isinstance(got, str)
