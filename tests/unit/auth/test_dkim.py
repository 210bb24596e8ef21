"""DKIM sign and verify (mxguard.auth.dkim), through an in-memory resolver.

``raw_signature`` builds signatures with any tags (l=, x=, rsa-sha1, bad i=
...) from the engine's public pieces, so each refusal is tested against an
otherwise valid signature (the control case).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.auth.dkim import (
    DkimResult,
    SigningKey,
    Verifier,
    parse_message,
    public_key_record,
    sign,
    verify,
)
from mxguard.auth.dkim_canon import BodyHasher, Header, header_data, split_canonicalization
from mxguard.auth.dkim_sign import Signer, SignOptions, signed_header_list
from mxguard.dns import Answer, DnsTempError
from tests.unit.auth.test_dkim_keys import SHORT_RSA_PEM

NOW = 1_700_000_000
RSA_KEY = SigningKey("example.com", "rsa", rsa.generate_private_key(65537, 2048))
ED_KEY = SigningKey("example.com", "ed", ed25519.Ed25519PrivateKey.generate())
SHORT_KEY = SigningKey("example.com", "short",
                       serialization.load_pem_private_key(SHORT_RSA_PEM, None))  # type: ignore[arg-type]
OTHER_RSA = rsa.generate_private_key(65537, 1024)

HEADERS: list[Header] = [
    (b"Received", b" from x by y; Mon, 1 Jan 2024 00:00:00 +0000"),
    (b"From", b" Alice <alice@example.com>"),
    (b"To", b" bob@example.org"),
    (b"Subject", b" Hello   there"),
    (b"Date", b" Mon, 1 Jan 2024 00:00:00 +0000"),
    (b"Message-ID", b" <1@example.com>"),
]
BODY = b"Hi Bob,\r\n\r\nsee you  tomorrow. \r\n\r\n\r\n"


class FakeResolver:
    """``{name: [txt, ...] | None (NXDOMAIN) | Exception}``; records queries."""

    def __init__(self, zone: dict[str, object]) -> None:
        self.zone = {k.lower(): v for k, v in zone.items()}
        self.queries: list[str] = []

    async def query(self, name: str, rdtype: str) -> Answer:
        self.queries.append(name.lower())
        value = self.zone.get(name.lower())
        if isinstance(value, Exception):
            raise value
        if value is None:
            return Answer(name, rdtype, "NXDOMAIN")
        assert isinstance(value, list)
        return Answer(name, rdtype, "NOERROR", tuple(value))


def zone_for(*keys: SigningKey) -> dict[str, object]:
    return {f"{k.selector}._domainkey.{k.domain}": [public_key_record(k.key)] for k in keys}


RESOLVER = FakeResolver(zone_for(RSA_KEY, ED_KEY, SHORT_KEY))


def signed(keys: Sequence[SigningKey] = (RSA_KEY,), headers: Sequence[Header] = HEADERS,
           body: bytes = BODY, **kw: object) -> list[Header]:
    values = sign(headers, body, keys, now=NOW, **kw)  # type: ignore[arg-type]
    return [(b"DKIM-Signature", (" " + v).encode()) for v in values] + list(headers)


async def check(headers: Sequence[Header], body: bytes = BODY,
                resolver: FakeResolver = RESOLVER, **kw: object) -> list[DkimResult]:
    kw.setdefault("now", NOW + 10)
    return await verify(headers, body, resolver, **kw)  # type: ignore[arg-type]


def raw_signature(key: SigningKey, headers: Sequence[Header] = HEADERS, body: bytes = BODY, *,
                  tags: dict[str, str] | None = None, drop: Sequence[str] = (),
                  hash_name: str = "sha256") -> Header:
    """A DKIM-Signature with chosen tags, correctly signed over what it says."""
    spec = {"v": "1", "a": key.algorithm, "c": "relaxed/relaxed", "d": key.domain,
            "s": key.selector, "t": str(NOW), "h": "From:To:Subject"}
    spec.update(tags or {})
    for name in drop:
        spec.pop(name, None)
    try:
        hc, bc = split_canonicalization(spec.get("c", "simple/simple"))
    except ValueError:
        hc, bc = "relaxed", "relaxed"
    length = int(spec["l"]) if "l" in spec else None
    hasher = BodyHasher(bc, hash_name, length)
    hasher.update(body)
    spec.setdefault("bh", base64.b64encode(hasher.digest()).decode())
    value = " " + "; ".join(f"{k}={v}" for k, v in spec.items()) + "; b="
    names = [n.strip() for n in spec.get("h", "").split(":")]
    data = header_data(headers, names, hc, b"DKIM-Signature", value.encode())
    if isinstance(key.key, ed25519.Ed25519PrivateKey):
        sig = key.key.sign(hashlib.sha256(data).digest())
    else:
        algorithm = hashes.SHA1() if hash_name == "sha1" else hashes.SHA256()
        sig = key.key.sign(data, padding.PKCS1v15(), algorithm)
    return (b"DKIM-Signature", (value + base64.b64encode(sig).decode()).encode())


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                   "simple/simple"])
@pytest.mark.parametrize("key", [RSA_KEY, ED_KEY], ids=["rsa", "ed25519"])
async def test_round_trip(key: SigningKey, canon: str) -> None:
    results = await check(signed([key], canonicalization=canon))
    assert [r.result for r in results] == ["pass"]
    r = results[0]
    assert (r.domain, r.selector, r.algorithm, r.identity) == \
        ("example.com", key.selector, key.algorithm, "@example.com")
    assert r.key_bits == key.bits and len(r.header_b) == 8 and r.reason == ""


async def test_dual_signing_both_pass_and_share_body_hash() -> None:
    headers = signed([ED_KEY, RSA_KEY])
    results = await check(headers)
    assert [(r.result, r.algorithm) for r in results] == \
        [("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]
    bhs = {re.search(rb"bh=([^;]+)", v).group(1) for n, v in headers[:2]}  # type: ignore[union-attr]
    assert len(bhs) == 1


async def test_identity_ttl_and_tag_order() -> None:
    (value,) = sign(HEADERS, BODY, [RSA_KEY], now=NOW, ttl=3600, identity="alice@example.com")
    order = re.findall(r"(?:^|;)\s*([a-z]+)=", value)
    assert order == ["v", "a", "c", "d", "s", "i", "t", "x", "h", "bh", "b"]
    assert f"x={NOW + 3600}" in value
    assert all(len(line.expandtabs(8)) <= 78 for line in ("DKIM-Signature: " + value).split("\r\n"))
    results = await check([(b"DKIM-Signature", (" " + value).encode()), *HEADERS])
    assert (results[0].result, results[0].identity) == ("pass", "alice@example.com")


async def test_incremental_feed_equals_whole_body() -> None:
    headers = signed([RSA_KEY, ED_KEY])
    verifier = Verifier(headers, now=NOW)
    for i in range(0, len(BODY), 3):
        verifier.feed(BODY[i:i + 3])
    assert [r.result for r in await verifier.finish(RESOLVER)] == ["pass", "pass"]
    signer = Signer(HEADERS, [RSA_KEY], SignOptions(), now=NOW)
    for i in range(len(BODY)):
        signer.feed(BODY[i:i + 1])
    assert signer.finish() == sign(HEADERS, BODY, [RSA_KEY], now=NOW)


async def test_body_as_file_object_and_str_headers() -> None:
    headers = signed()
    str_headers = [(n.decode(), v.decode()) for n, v in headers]
    results = await verify(str_headers, io.BytesIO(BODY), RESOLVER, now=NOW)
    assert results[0].result == "pass"


async def test_milter_style_lf_folding_verifies() -> None:
    """Postfix gives milters folded values joined by LF; they hash as CRLF."""
    headers = signed(canonicalization="simple/simple")
    lf = [(n, v.replace(b"\r\n", b"\n")) for n, v in headers]
    assert (await check(lf))[0].result == "pass"


# --------------------------------------------------------------- tampering


def _replace(headers: list[Header], name: bytes, value: bytes) -> list[Header]:
    return [(n, value if n == name else v) for n, v in headers]


@pytest.mark.parametrize(("change", "result", "reason"), [
    ("none", "pass", ""),                                                         # control
    ("body", "fail", "body hash mismatch"),
    ("subject", "fail", "signature verification failed"),
    ("from_added_on_top", "fail", "signature verification failed"),               # oversigned
    ("unsigned_header_added", "pass", ""),
    ("relaxed_whitespace", "pass", ""),
    ("body_trailing_blank_lines", "pass", ""),
    ("signature_tag_changed", "fail", "signature verification failed"),
])
async def test_tampering(change: str, result: str, reason: str) -> None:
    headers, body = signed(), BODY
    if change == "body":
        body = BODY.replace(b"tomorrow", b"tonight")
    elif change == "subject":
        headers = _replace(headers, b"Subject", b" Hello there!")
    elif change == "from_added_on_top":
        headers = [headers[0], (b"From", b" Mallory <m@evil.example>"), *headers[1:]]
    elif change == "unsigned_header_added":
        headers = [*headers, (b"X-Spam", b" no")]
    elif change == "relaxed_whitespace":
        headers = _replace(headers, b"Subject", b"   Hello \r\n\t there  ")
    elif change == "body_trailing_blank_lines":
        body = BODY + b"\r\n\r\n"
    elif change == "signature_tag_changed":
        name, value = headers[0]
        headers = [(name, value.replace(b"t=1700000000", b"t=1700000001")), *headers[1:]]
    results = await check(headers, body)
    assert (results[0].result, results[0].reason) == (result, reason)


async def test_from_added_below_without_oversigning_passes() -> None:
    """Control for oversigning: with From not oversigned, a second From added
    *above* is not covered (h= picks fields bottom up), so it still passes."""
    headers = signed(oversign=())
    headers = [headers[0], (b"From", b" Mallory <m@evil.example>"), *headers[1:]]
    assert (await check(headers))[0].result == "pass"


# -------------------------------------------------------- signature checks


@pytest.mark.parametrize(("tags", "drop", "result", "reason"), [
    ({}, (), "pass", ""),                                                       # control
    ({"v": "2"}, (), "permerror", "unsupported signature version v=2"),
    ({}, ("v",), "permerror", "signature has no v= tag"),
    ({"a": "rsa-md5"}, (), "permerror", "unsupported algorithm a=rsa-md5"),
    ({}, ("d",), "permerror", "signature has no d= tag"),
    ({}, ("s",), "permerror", "signature has no s= tag"),
    ({"h": "To:Subject"}, (), "permerror", "h= does not include From"),
    ({"h": "From::To"}, (), "permerror", "malformed h= list"),
    ({"c": "relaxed/future"}, (), "permerror", "unsupported canonicalization"),
    ({"q": "dns/special"}, (), "permerror", "unsupported query method"),
    ({"q": "dns/txt:http"}, (), "pass", ""),
    ({"i": "@example.com"}, (), "pass", ""),
    ({"i": "user@mail.example.com"}, (), "pass", ""),
    ({"i": "user@example.org"}, (), "permerror", "is not in d=example.com"),
    ({"i": "user@badexample.com"}, (), "permerror", "is not in d=example.com"),
    ({"i": "no-at-sign"}, (), "permerror", "is not in d=example.com"),
    ({"d": "exa mple.com"}, (), "permerror", "invalid d="),
    ({"d": "legitimate.com(.attacker.com"}, (), "permerror", "invalid d="),
    ({"s": "a/b"}, (), "permerror", "invalid s="),
    ({"s": ".".join(["a" * 60] * 4)}, (), "permerror", "too long for DNS"),
    ({"x": str(NOW - 1)}, (), "permerror", "x=1699999999 is before t=1700000000"),
    ({"x": str(NOW + 11)}, (), "pass", ""),
    ({"x": str(NOW + 9)}, (), "permerror", "signature expired"),                # now = NOW+10
    ({"t": str(NOW + 10_000)}, (), "permerror", "in the future"),
    ({"t": "abc"}, (), "permerror", "malformed t="),
    ({"l": "-1"}, (), "permerror", "malformed l="),
    ({"bh": "!!!"}, (), "permerror", "malformed bh= (not base64)"),
    ({"z": "From:foo|To:bar", "unknown": "tag"}, (), "pass", ""),              # ignored tags
    ({"d": "EXAMPLE.com"}, (), "pass", ""),                                    # case of d=
])
async def test_signature_tags(tags: dict[str, str], drop: tuple[str, ...], result: str,
                              reason: str) -> None:
    header = raw_signature(RSA_KEY, tags=tags, drop=drop)
    results = await check([header, *HEADERS])
    assert results[0].result == result
    assert reason in results[0].reason


async def test_bad_b_base64_is_permerror() -> None:
    name, value = raw_signature(RSA_KEY)
    broken = re.sub(rb"b=[A-Za-z0-9+/=]+$", b"b=%%%", value)
    results = await check([(name, broken), *HEADERS])
    assert (results[0].result, results[0].reason) == ("permerror", "malformed b= (not base64)")


async def test_rsa_sha1_refused_but_valid_under_historic_rules() -> None:
    header = raw_signature(RSA_KEY, tags={"a": "rsa-sha1"}, hash_name="sha1")
    modern = await check([header, *HEADERS])
    assert (modern[0].result, modern[0].reason) == ("permerror", "rsa-sha1 refused (RFC 8301)")
    historic = await check([header, *HEADERS], historic=True)       # control: it is valid
    assert historic[0].result == "pass"


async def test_short_rsa_key_refused() -> None:
    header = raw_signature(SHORT_KEY)
    results = await check([header, *HEADERS])
    assert (results[0].result, results[0].reason) == \
        ("permerror", "key too short (768 bits < 1024)")
    assert results[0].key_bits == 768
    assert (await check([header, *HEADERS], min_rsa_bits=512))[0].result == "pass"  # control


async def test_min_rsa_bits_from_config() -> None:
    results = await check(signed(), min_rsa_bits=4096)
    assert results[0].reason == "key too short (2048 bits < 4096)"


# ------------------------------------------------------------------- l= tag


@pytest.mark.parametrize(("length", "body", "result", "reason"), [
    (None, BODY, "pass", ""),                                                   # control
    ("30", BODY, "pass", ""),                                                   # exactly all
    ("10", BODY, "policy", "l= covers only part of the body (10 of 30 bytes)"),
    ("30", BODY + b"appended by a list\r\n", "policy", "l= covers only part"),
    ("31", BODY, "permerror", "l=31 exceeds the body length (30)"),
    ("0", BODY, "policy", "l= covers only part"),
])
async def test_body_length_tag(length: str | None, body: bytes, result: str,
                               reason: str) -> None:
    tags = {"l": length} if length else {}
    header = raw_signature(RSA_KEY, tags=tags)
    results = await check([header, *HEADERS], body)
    assert results[0].result == result
    assert results[0].reason.startswith(reason)


# ------------------------------------------------------------------- keys


def _key_zone(*records: object) -> FakeResolver:
    return FakeResolver({"rsa._domainkey.example.com": list(records)})


GOOD = public_key_record(RSA_KEY.key)
OTHER = public_key_record(OTHER_RSA)


@pytest.mark.parametrize(("resolver", "result", "reason"), [
    (_key_zone(GOOD), "pass", ""),                                               # control
    (FakeResolver({}), "permerror", "no key for signature (rsa._domainkey.example.com: "
                                    "NXDOMAIN)"),
    (_key_zone(), "permerror", "no TXT record"),
    (FakeResolver({"rsa._domainkey.example.com": DnsTempError("x", "TXT", "timeout")}),
     "temperror", "key lookup failed: timeout looking up x/TXT"),
    (_key_zone("v=DKIM1; k=rsa; p="), "permerror", "key revoked (empty p=)"),
    (_key_zone("v=DKIM1; k=rsa; p=!!"), "permerror", "bad key encoding (p= is not base64)"),
    (_key_zone(GOOD.replace("k=rsa", "k=ed25519")), "permerror", "invalid ed25519 key"),
    (_key_zone(public_key_record(ED_KEY.key)), "permerror",
     "key type k=ed25519 does not match a=rsa-sha256"),
    (_key_zone(GOOD.replace("k=rsa;", "k=rsa; h=sha1;")), "permerror",
     "key h= does not allow sha256"),
    (_key_zone(GOOD.replace("k=rsa;", "k=rsa; s=tlsrpt;")), "permerror", "key not for email"),
    (_key_zone(GOOD.replace("k=rsa;", "k=rsa; t=s;")), "pass", ""),              # i=@d: ok
    (_key_zone(OTHER), "fail", "signature verification failed"),
    (_key_zone("v=spf1 -all", GOOD), "pass", ""),                # several records: try each
    (_key_zone(OTHER, GOOD), "pass", ""),
    (_key_zone("v=spf1 -all", "junk"), "permerror", "unsupported key record version v=spf1"),
    (_key_zone("junk"), "permerror", "key record syntax error"),
    (_key_zone("k=rsa"), "permerror", "key record has no p="),
])
async def test_key_records(resolver: FakeResolver, result: str, reason: str) -> None:
    results = await check(signed(), resolver=resolver)
    assert results[0].result == result
    assert reason in results[0].reason and bool(reason) == bool(results[0].reason)


async def test_strict_key_refuses_subdomain_identity() -> None:
    resolver = _key_zone(GOOD.replace("k=rsa;", "k=rsa; t=s;"))
    header = raw_signature(RSA_KEY, tags={"i": "a@sub.example.com"})
    results = await check([header, *HEADERS], resolver=resolver)
    assert results[0].reason == "key has t=s: i= domain must equal d="


async def test_testing_flag_is_reported() -> None:
    results = await check(signed(), resolver=_key_zone(GOOD.replace("k=rsa;", "k=rsa; t=y;")))
    assert results[0].result == "pass" and results[0].testing


# ---------------------------------------------------------- hostile input


async def test_many_signatures_bounded_by_max_signatures() -> None:
    sig = raw_signature(RSA_KEY)
    resolver = FakeResolver(zone_for(RSA_KEY))
    results = await check([sig] * 500 + list(HEADERS), resolver=resolver, max_signatures=10)
    assert len(results) == 10 and all(r.result == "pass" for r in results)
    assert len(resolver.queries) <= 10


async def test_header_b_prefixes_are_unique() -> None:
    sig = raw_signature(RSA_KEY)
    name, value = sig
    twin = (name, value[:-4] + b"AAAA")           # same first 8+ characters of b=
    results = await check([sig, twin, *HEADERS])
    assert [r.result for r in results] == ["pass", "fail"]
    assert results[0].header_b != results[1].header_b
    assert len(results[0].header_b) > 8


async def test_one_megabyte_header_line() -> None:
    headers = [*HEADERS, (b"X-Huge", b" " + b"a" * 1_000_000)]
    sign_headers = ("From", "To", "X-Huge")
    results = await check(signed(headers=headers, sign_headers=sign_headers), BODY)
    assert results[0].result == "pass"
    garbage = [(b"DKIM-Signature", b" v=1; " + b"x" * 1_000_000), *HEADERS]
    assert (await check(garbage))[0].result == "permerror"


async def test_bare_lf_body_round_trip() -> None:
    body = b"line one\nline two\n"
    for canon in ("simple/simple", "relaxed/relaxed"):
        assert (await check(signed(body=body, canonicalization=canon), body))[0].result == "pass"


async def test_eight_bit_headers_round_trip() -> None:
    headers = [(b"From", b" Caf\xe9 <cafe@example.com>"), (b"Subject", b" \xff\xfe r\xe9sum\xe9")]
    for canon in ("simple/simple", "relaxed/relaxed"):
        results = await check(signed(headers=headers, canonicalization=canon))
        assert results[0].result == "pass"


@pytest.mark.parametrize("headers", [
    [(b"To", b" x@example.org"), (b"Subject", b" no From")],
    [(b"From", b" a@example.com"), (b"From", b" b@example.com"), (b"Subject", b" two")],
    [],
])
async def test_missing_or_duplicated_from_round_trip(headers: list[Header]) -> None:
    results = await check(signed(headers=headers))
    assert results[0].result == "pass"
    value = sign(headers, BODY, [RSA_KEY], now=NOW)[0]
    assert re.search(r"h=From\b", value)


async def test_no_signature_no_result() -> None:
    assert await check(list(HEADERS)) == []


@pytest.mark.parametrize("value", [
    b"", b" ", b";;;", b" synerr", b" v=1; v=1", b" v=1; a=rsa-sha256; b=; bh=; d=; h=; s=",
    b" v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; bh=AAAA; b=AAAA; i==ZZ",
    b"\xff\xfe\x00garbage", b" v=1; a=ed25519-sha256; d=\xc3\xa9xample.com; s=x; h=from; "
    b"bh=AAAA; b=AAAA",
])
async def test_garbage_signatures_are_permerror(value: bytes) -> None:
    results = await check([(b"DKIM-Signature", value), *HEADERS])
    assert results[0].result in ("permerror", "temperror")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.binary(max_size=200))
async def test_random_input_never_raises(value: bytes, body: bytes) -> None:
    headers = [(b"DKIM-Signature", value), *HEADERS]
    results = await verify(headers, body, RESOLVER, now=NOW)
    assert len(results) == 1 and results[0].result != "pass"


# ------------------------------------------------------------ helpers


def test_signed_header_list() -> None:
    headers = [(b"From", b" a"), (b"to", b" b"), (b"To", b" c"), (b"X-Other", b" d")]
    assert signed_header_list(headers, ["From", "To", "Cc", "bad name:"], ["From", "Cc"]) == \
        ["From", "From", "To", "To", "Cc"]
    assert signed_header_list([], ["Subject"], []) == ["From"]   # From always signed


def test_parse_message_then_sign_lines_fold() -> None:
    headers, body = parse_message(b"From: a@example.com\nSubject: x\n\nbody\n")
    (value,) = sign(headers, body, [ED_KEY], now=NOW)
    assert value.startswith("v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com;")
    assert "\r\n\tb=" in value
